"""Build-side commands: `build` (everything), `export`, `check`, `engine`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.extras import require_extra
from .app import cli, console, engines_option, lora_option, weights_option

IMG2IMG_HELP = ("Also the VAE encoder (component vae_encoder: image [b,3,h,w] in [-1, 1] -> moments "
                "[b,2*latent_channels,h/8,w/8]) that img2img needs; without it a txt2img export is made.")


@cli.command("build")
@click.option("--model", required=True, help="Registry name (`gag-export models`) or a local diffusers folder.")
@weights_option
@click.option("--out", "graphs_root", type=click.Path(file_okay=False, path_type=Path), default=Path("graphs"),
              show_default=True, help="Graphs root: <out>/<model>/<component>/model.onnx + manifest.json.")
@engines_option
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image height in pixels [default: the model's].")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image width in pixels [default: the model's].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size of the graphs.")
@click.option("--dynamic", is_flag=True, help="Symbolic batch/height/width (opt shape: --batch/--height/--width).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Graph precision; GAG arithmetic stays fp32 inside.")
@click.option("--no-gag", is_flag=True, help="Export the unmodified denoiser (the baseline).")
@click.option("--gag-scale", type=float, default=None, help="GAG scale (lambda) [default: 10].")
@click.option("--gag-eta", type=float, default=None, help="GAG norm cap eta, > 0 [default: 15].")
@click.option("--gag-zeta", type=float, default=None, help="GAG orthogonal weight zeta, >= 0 [default: 0].")
@click.option("--gag-layers", default="down,up", show_default=True, help="Layers to rewrite: down,up | all | mid | globs.")
@click.option("--prompt", default=None, help="Prompt of the smoke image [default: a red fox in the snow].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the smoke image and parity inputs.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Smoke image path [default: <model>-<seed>.png].")
@click.option("--engine-backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto",
              show_default=True, help="Engine builder: auto takes TensorRT where it imports and sees a GPU, "
                                      "else TensorRT-RTX (builds without a GPU, for RTX GPUs).")
@click.option("--require-engine", is_flag=True, help="Fail (exit 3) instead of skipping engines when no builder is usable.")
@click.option("--skip-smoke", is_flag=True, help="Do not generate the smoke image.")
@click.option("--img2img", is_flag=True, help=IMG2IMG_HELP)
@lora_option
def build_command(model, weights, graphs_root, engines_root, height, width, batch, dynamic, dtype, no_gag, gag_scale,
                  gag_eta, gag_zeta, gag_layers, prompt, seed, image_path, engine_backend, require_engine, skip_smoke,
                  img2img, loras) -> None:
    """Everything for one model: load, GAG, export, check, engines, one smoke image.

    \b
    Stages: load -> apply GAG -> export every component -> check (ONNX checker, shape inference,
    TensorRT lint and real parser, ORT-vs-torch parity) -> TensorRT or TensorRT-RTX engines
    (skipped with the reason when neither is usable, unless --require-engine) -> one image with
    the best backend available (the engines' where they run here > ort-cuda > ort) -> a summary
    of artifacts, parity errors and timings. Graphs are exported again on every run (same
    weights: identical files); engines are reused from the cache when graph, builder, GPU or
    targets, and settings match.

    \b
    Examples:
      gag-export build --model tiny-sdxl                      # a minute or two on a laptop CPU
      gag-export build --model dmd2 --dtype fp16              # real weights from the HF cache
      gag-export build --model sdxl-turbo --weights random --skip-smoke
    """
    require_extra("export", "gag-export build")
    from ..gag import GAGConfig
    from ..workflows.build import SMOKE_PROMPT, BuildConfig, run_build

    given = {k: v for k, v in (("scale", gag_scale), ("eta", gag_eta), ("zeta", gag_zeta)) if v is not None}
    if no_gag and given:
        raise click.UsageError("--no-gag cannot be combined with --gag-scale/--gag-eta/--gag-zeta")
    gag = None if no_gag else GAGConfig(**given, method="bisect", layers=gag_layers)
    config = BuildConfig(
        model=model, weights=weights, graphs_root=graphs_root, engines_root=engines_root, height=height, width=width,
        batch=batch, dynamic=dynamic, precision=dtype, gag=gag, prompt=SMOKE_PROMPT if prompt is None else prompt,
        seed=seed, image=image_path, require_engine=require_engine, smoke=not skip_smoke, engine_backend=engine_backend,
        img2img=img2img, loras=loras,
    )
    with _build_progress(quiet=click.get_current_context().find_object(dict).get("quiet", False)) as on_event:
        result = run_build(config, progress=on_event)
    if result.check is not None and not result:
        _print_check_report(result.check)
    _print_build_summary(result)
    result.raise_for_failures()


@contextlib.contextmanager
def _build_progress(quiet: bool):
    """A rich progress display with one line per build stage; yields the BuildEvent callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=quiet, transient=True)
    tasks: dict[str, int] = {}
    marks = {"done": "[green]done[/]", "reused": "[green]reused[/]", "skipped": "[yellow]skipped[/]",
             "failed": "[bold red]failed[/]"}
    try:
        def on_event(event) -> None:
            progress.start()  # on the first event: option errors found before any stage print no empty display
            if event.stage not in tasks:
                tasks[event.stage] = progress.add_task(event.stage, total=None)
            task = tasks[event.stage]
            if event.state in marks:
                total = progress.tasks[task].total or 1
                progress.update(task, total=total, completed=total,
                                description=f"{event.stage}: {marks[event.state]} {escape(event.message)}".rstrip())
                progress.stop_task(task)
            else:
                progress.update(task, total=event.total, completed=event.completed or 0,
                                description=f"{event.stage}: {escape(event.message)}")

        yield on_event
    finally:
        progress.stop()


def _print_build_summary(result) -> None:
    out = Console()
    parity = result.parity()
    graphs_dir = result.manifest.graphs_dir if result.manifest is not None else None
    title = f"{result.entry.name}: artifacts" + (f" (graphs in {graphs_dir})" if graphs_dir else "")
    artifacts = Table(title=title, header_style="bold")
    artifacts.add_column("path", overflow="fold")
    artifacts.add_column("size", justify="right", no_wrap=True)
    artifacts.add_column("status")
    artifacts.add_column("parity max abs / rel err", overflow="fold")
    for a in result.artifacts:
        errors = parity.get(a.name) if a.kind == "graph" else None
        path = a.path.relative_to(graphs_dir) if graphs_dir and a.path.is_relative_to(graphs_dir) else a.path
        artifacts.add_row(str(path), _size(a.size_bytes), a.status,
                          f"{errors[0]:.1e} / {errors[1]:.1e}" if errors else "")
    out.print(artifacts)
    stages = Table(title=f"{result.entry.name}: stages", header_style="bold")
    for column in ("stage", "status", "time", "details"):
        stages.add_column(column, justify="right" if column == "time" else "left")
    for s in result.stages:
        stages.add_row(s.name, s.status, f"{s.seconds:.1f} s", escape(s.details))
    stages.add_row("total", "", f"{result.total_seconds:.1f} s", "")
    out.print(stages)
    if result.engine_builder is not None:
        click.echo(f"engines: {result.engine_builder}")
    if result.image_path is not None:
        click.echo(f"wrote {result.image_path} ({result.backend})")


@cli.command("engine")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("engines"),
              show_default=True, help="Engine cache root: <out>/<model>/<component>/<key>.plan + .json sidecar.")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default="tensorrt", show_default=True,
              help="TensorRT (built on the GPU that runs it) or TensorRT-RTX (built ahead of time on any machine, "
                   "CPU-only included, for RTX GPUs).")
@click.option("--target", "targets", default=None, metavar="SM,...",
              help="TensorRT-RTX: compute capabilities to build for, e.g. sm86,sm89 [default: every one it offers "
                   "from sm80 up: sm80, sm86, sm89, sm120, sm121].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "fp8"]), default=None,
              help="Engine precision; must be the exported graph's dtype (default: that dtype). fp8 is refused for now.")
@click.option("--static", "shapes", flag_value="static", help="Fix every input at the profile's opt shape.")
@click.option("--dynamic", "shapes", flag_value="dynamic", help="Use the manifest's min/opt/max ranges (refused for a static graph).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Persistent tactic timing cache [default: <out>/timing/trt<version>-sm<XY>.cache].")
@click.option("--workspace", "workspace_gb", type=float, default=None, metavar="GB", help="Workspace memory pool limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level (TensorRT default 3).")
@click.option("--weakly-typed", is_flag=True,
              help="TensorRT 10.x only: build an fp32 graph with BuilderFlag.FP16/BF16, GAG layers pinned to fp32.")
@click.option("--rebuild", is_flag=True, help="Build even when a matching cached engine exists.")
@click.option("--component", "components", multiple=True, metavar="NAME", help="Only this component (repeatable).")
@click.option("--refittable", is_flag=True, help="BuilderFlag.REFIT: `gag-export lora` refits a copy with a LoRA's "
              "weights instead of rebuilding (a separate cache entry from the plain engine).")
def engine_command(graphs_dir: Path, out_dir: Path, backend: str, targets, precision, shapes, timing_cache, workspace_gb,
                   opt_level, weakly_typed: bool, rebuild: bool, components: tuple[str, ...], refittable: bool) -> None:
    """Build (or reuse) TensorRT or TensorRT-RTX engines for an exported model (exit 3 without the
    builder, or without a GPU for TensorRT).

    \b
    Examples:
      gag-export engine graphs/tiny-sdxl
      gag-export engine graphs/dmd2 --dynamic --timing-cache trt.cache
      gag-export engine graphs/tiny-sdxl --backend tensorrt-rtx --target sm86,sm89
    """
    require_extra("export", "gag-export engine")
    from .. import engine

    options = engine.EngineOptions(
        backend=backend, targets=targets, precision=precision, shapes=shapes or "manifest", weakly_typed=weakly_typed,
        opt_level=opt_level, workspace_gb=workspace_gb, timing_cache=timing_cache, rebuild=rebuild, components=components,
        refittable=refittable,
    )
    records = engine.build(graphs_dir, out_dir, options)
    if not records:
        return
    first = records[0].sidecar
    table = Table(title=f"{first.builder_label} engines for {first.gpu_name or first.sm_tag}", header_style="bold")
    for column in ("component", "status", "precision", "size", "seconds"):
        table.add_column(column, justify="right" if column in ("size", "seconds") else "left")
    for r in records:
        table.add_row(r.component, r.status, r.sidecar.precision, f"{r.sidecar.engine_size_bytes / 2**20:.1f} MiB",
                      f"{r.seconds:.1f}")
    Console().print(table)
    for r in records:  # paths whole, never folded into a table cell
        click.echo(f"{r.component}: {r.path}")


def _shape(shape_cls, height, width, batch, default):
    """An ImageShape from options; unset (None) ones fall back to `default` (InvalidInputError on bad values).

    `is None`, not `or`: a 0 given by the user is an error to report, not a request for the default.
    """
    return shape_cls(height=default.height if height is None else height,
                     width=default.width if width is None else width,
                     batch=default.batch if batch is None else batch)


@cli.command("export")
@click.option("--model", required=True, help="Registry name (`gag-export models`), e.g. tiny-sdxl, dmd2, or a local diffusers folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("graphs"),
              show_default=True, help="Graphs root: <out>/<model>/<component>/model.onnx + manifest.json.")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image height in pixels [default: the model's].")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image width in pixels [default: the model's].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size (the opt shape if --dynamic).")
@click.option("--dynamic", is_flag=True, help="Symbolic batch/height/width; traced from a batch-2 example.")
@click.option("--min-height", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --height].")
@click.option("--min-width", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --width].")
@click.option("--min-batch", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --batch].")
@click.option("--max-height", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --height].")
@click.option("--max-width", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --width].")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Dynamic range [default: --batch].")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Graph precision; GAG arithmetic and diffusers' upcasts stay fp32 inside.")
@click.option("--no-gag", is_flag=True, help="Export the unmodified denoiser (the benchmark baseline).")
@click.option("--gag-scale", type=float, default=10.0, show_default=True, help="Default gag_scale (manifest).")
@click.option("--gag-eta", type=float, default=15.0, show_default=True, help="Default gag_eta (manifest).")
@click.option("--gag-zeta", type=float, default=0.0, show_default=True, help="Default gag_zeta (manifest).")
@click.option("--gag-layers", default="down,up", show_default=True, help="Layers to rewrite: down,up | all | mid | globs.")
@click.option("--gag-method", type=click.Choice(["bisect", "sort"]), default="bisect", show_default=True,
              help="Sparse branch: bisect (no TopK, TensorRT-friendly) or sort (TopK).")
@weights_option
@click.option("--component", "components", multiple=True, metavar="NAME",
              help="Only this component (repeatable; vae_encoder included); the other components of an export "
                   "made with the same settings in --out are kept.")
@click.option("--img2img", is_flag=True, help=IMG2IMG_HELP)
@click.option("--slim", is_flag=True, help="onnxslim each graph; kept only if parity still holds.")
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (TensorRT 10.0 parses 9..20).")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True)
@click.option("--no-check", is_flag=True, help="Skip `check` (checker, lint, parity) after export.")
@lora_option
def export_command(model, out_dir, height, width, batch, dynamic, min_height, min_width, min_batch, max_height,
                   max_width, max_batch, dtype, no_gag, gag_scale, gag_eta, gag_zeta, gag_layers, gag_method,
                   weights, components, img2img, slim, opset, exporter, no_check, loras) -> None:
    """Export a model's components to ONNX with GAG inside the denoiser, then check them.

    \b
    Examples:
      gag-export export --model tiny-sdxl
      gag-export export --model dmd2 --dtype fp16 --dynamic --max-height 1536 --max-width 1536
      gag-export export --model tiny-flux --img2img           # with the VAE encoder
      gag-export export --model dmd2 --lora style.safetensors:0.8 --lora detail.safetensors
    """
    require_extra("export", "gag-export export")
    from .. import check, export
    from ..gag import GAGConfig
    from ..models import ImageShape, load_pipeline, resolve_entry

    ctx = click.get_current_context()
    gag_options = ("gag_scale", "gag_eta", "gag_zeta", "gag_layers", "gag_method")
    typed = [f"--{n.replace('_', '-')}" for n in gag_options if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]
    if no_gag and typed:  # they have defaults, so only what was typed tells the conflict (build/generate refuse it too)
        raise click.UsageError(f"--no-gag cannot be combined with {', '.join(typed)}")
    entry = resolve_entry(model)  # a registry name or a local diffusers folder
    gag = None if no_gag else GAGConfig(scale=gag_scale, eta=gag_eta, zeta=gag_zeta, method=gag_method, layers=gag_layers)
    shape = _shape(ImageShape, height, width, batch, ImageShape(entry.height, entry.width, 1))
    ranged = dynamic and any(v is not None for v in (min_height, min_width, min_batch, max_height, max_width, max_batch))
    config = export.ExportConfig(
        model=entry.name, out_dir=out_dir, shape=shape, dynamic=dynamic, precision=dtype, gag=gag, opset=opset,
        exporter=exporter, slim=slim, weights=weights, components=components, img2img=img2img, loras=loras,
        min_shape=_shape(ImageShape, min_height, min_width, min_batch, shape) if ranged else None,
        max_shape=_shape(ImageShape, max_height, max_width, max_batch, shape) if ranged else None,
    )
    if not dynamic and any(v is not None for v in (min_height, min_width, min_batch, max_height, max_width, max_batch)):
        raise click.UsageError("--min-*/--max-* need --dynamic")
    with console.status(f"loading {model} ({weights or 'default'} weights)"):
        pipe = load_pipeline(entry, weights=weights, components=list(config.components) or None)
    manifest = _export_with_progress(export, pipe, entry, config)
    table = Table(title=f"{model} -> {manifest.graphs_dir}", show_header=True, header_style="bold")
    for column in ("component", "nodes", "size", "time", "slim"):
        table.add_column(column, justify="right" if column != "component" else "left")
    for name, s in manifest.stats.items():
        slim_note = "" if s.nodes_before_slim is None else (
            f"{s.nodes_before_slim} -> {s.nodes}" if s.slimmed else f"rejected ({s.nodes_before_slim})")
        table.add_row(name, str(s.nodes), _size(s.size_bytes), f"{s.seconds:.1f} s", slim_note)
    Console().print(table)
    del pipe  # its weights went with the export (release=True); the check compares with recorded references
    if not no_check:
        report = check.check_graphs(manifest.graphs_dir, parity=True, entry=entry)
        _print_check_report(report)
        report.raise_for_failures()


def _export_with_progress(export, pipe, entry, config):
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    quiet = click.get_current_context().find_object(dict).get("quiet", False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=quiet) as progress:
        task = progress.add_task(f"exporting {config.model}", total=None)

        def on_event(event):
            progress.update(task, total=event.total, completed=event.index + (event.stage == "done"),
                            description=f"{event.component}: {event.stage} {event.message}".strip())

        return export.export_model(pipe, entry, config, progress=on_event, release=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _print_check_report(report) -> None:
    table = Table(title=f"check {report.graphs_dir}", show_header=True, header_style="bold")
    for column in ("component", "check", "result", "details"):
        table.add_column(column)
    style = {"passed": "green", "failed": "bold red", "skipped": "yellow"}
    for r in report.results:
        details = "\n".join([r.details, *map(str, r.findings), *map(str, r.parity)])
        table.add_row(r.component, r.check, f"[{style[r.status]}]{r.status}[/]", details)
    Console().print(table)


@cli.command("check")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-parity", is_flag=True, help="Skip ORT-vs-torch parity (no pipeline is loaded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the parity sample inputs.")
@click.option("--parser", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx", "none"]), default="auto",
              show_default=True, help="Real ONNX parser of the trt_parser check: auto takes TensorRT, else TensorRT-RTX.")
def check_command(graphs_dir: Path, no_parity: bool, seed: int, parser: str) -> None:
    """Check exported graphs: checker, shape inference, TensorRT lint, the real TensorRT(-RTX) ONNX
    parser, precision, parity (exit 4 on failure).

    \b
    Examples:
      gag-export check graphs/tiny-sdxl
      gag-export check graphs/dmd2 --no-parity     # no pipeline loaded: structure only
    """
    require_extra("export", "gag-export check")
    from .. import check

    with console.status(f"checking {graphs_dir}"):
        report = check.check_graphs(graphs_dir, parity=not no_parity, seed=seed, parser=parser)
    _print_check_report(report)
    report.raise_for_failures()
