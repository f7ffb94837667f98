"""The `gag-export` command line: options become configs, configs go to the layers.

No logic lives here. Each command turns its options into the objects the layers take and
reports what they return. Errors from the layers (`GagExportError`) become one line on stderr
and the exit code documented in README (see `gag_export.core.errors.EXIT_CODES`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import warnings
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from . import __version__
from .core.errors import EXIT_CODES, INTERRUPTED_EXIT_CODE, GagExportError, ResourceExhaustedError

console = Console(stderr=True)
log = logging.getLogger("gag_export")


class GagGroup(click.Group):
    """A click group that turns every failure into one line and its documented exit code.

    `GagExportError`: its own code. Out of memory, or out of disk space (ENOSPC/EDQUOT) from any
    layer: 7, like `ResourceExhaustedError`. Any other exception is a bug: 1, with the traceback
    under --verbose. Click's usage errors keep click's code (2). Done here rather than in `main`
    so that click's CliRunner (tests) sees the same exit codes.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1, the code of a bug
            self._fail(ctx, "interrupted; nothing half-written was left", INTERRUPTED_EXIT_CODE)
        except GagExportError as exc:
            self._fail(ctx, str(exc), exc.exit_code)
        except MemoryError:
            self._fail(ctx, "out of memory (use a smaller model, dtype or shape, or a machine with more RAM)",
                       ResourceExhaustedError.exit_code)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._fail(ctx, f"out of disk space: {exc}", ResourceExhaustedError.exit_code)
            else:
                self._fail(ctx, f"internal error: {type(exc).__name__}: {exc} {_BUG}", 1)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            self._fail(ctx, f"internal error: {type(exc).__name__}: {first} {_BUG}", 1)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int):
        if ctx.obj and ctx.obj.get("verbose"):
            console.print_exception()
        click.echo(f"error: {message}", err=True)
        ctx.exit(code)


_BUG = "(a bug: please report it with the output of --verbose)"


def _exit_codes_epilog() -> str:
    return "\b\nExit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items()))


@click.group(cls=GagGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_exit_codes_epilog())
@click.version_option(__version__, prog_name="gag-export")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Geometry-Aware Attention Guidance inside exported diffusion graphs.

    \b
    Examples:
      gag-export build --model tiny-sdxl       # everything, on the built-in tiny model
      gag-export build --model dmd2            # the real DMD2 (needs its weights)
      gag-export models                        # what can be built
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    if not verbose:  # library noise that says nothing about the user's run; --verbose shows it
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "torchvision is not installed"
        warnings.filterwarnings("ignore", category=FutureWarning)
        # read when those libraries are first imported (lazily, by the command): their import-time
        # notices ("requires torchvision") and schedule remarks (DMD2's card timesteps) are not errors
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet


# Options several commands share, declared once.
engines_option = click.option(
    "--engines", "engines_root", type=click.Path(file_okay=False, path_type=Path), default=Path("engines"),
    show_default=True, help="TensorRT engine cache root.")
weights_option = click.option(
    "--weights", type=click.Choice(["pretrained", "random", "tiny"]), default=None,
    help="pretrained (local HF cache), random (full-size architecture, no download) or tiny "
         "[default: tiny for tiny-*, else pretrained].")


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
def build_command(model, weights, graphs_root, engines_root, height, width, batch, dynamic, dtype, no_gag, gag_scale,
                  gag_eta, gag_zeta, gag_layers, prompt, seed, image_path, engine_backend, require_engine, skip_smoke) -> None:
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
    from .build import DEFAULT_PROMPT, BuildConfig, run_build
    from .guidance import GAGConfig

    given = {k: v for k, v in (("scale", gag_scale), ("eta", gag_eta), ("zeta", gag_zeta)) if v is not None}
    if no_gag and given:
        raise click.UsageError("--no-gag cannot be combined with --gag-scale/--gag-eta/--gag-zeta")
    gag = None if no_gag else GAGConfig(**given, method="bisect", layers=gag_layers)
    config = BuildConfig(
        model=model, weights=weights, graphs_root=graphs_root, engines_root=engines_root, height=height, width=width,
        batch=batch, dynamic=dynamic, precision=dtype, gag=gag, prompt=DEFAULT_PROMPT if prompt is None else prompt,
        seed=seed, image=image_path, require_engine=require_engine, smoke=not skip_smoke, engine_backend=engine_backend,
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
def engine_command(graphs_dir: Path, out_dir: Path, backend: str, targets, precision, shapes, timing_cache, workspace_gb,
                   opt_level, weakly_typed: bool, rebuild: bool, components: tuple[str, ...]) -> None:
    """Build (or reuse) TensorRT or TensorRT-RTX engines for an exported model (exit 3 without the
    builder, or without a GPU for TensorRT).

    \b
    Examples:
      gag-export engine graphs/tiny-sdxl
      gag-export engine graphs/dmd2 --dynamic --timing-cache trt.cache
      gag-export engine graphs/tiny-sdxl --backend tensorrt-rtx --target sm86,sm89
    """
    from . import engine

    options = engine.EngineOptions(
        backend=backend, targets=targets, precision=precision, shapes=shapes or "manifest", weakly_typed=weakly_typed,
        opt_level=opt_level, workspace_gb=workspace_gb, timing_cache=timing_cache, rebuild=rebuild, components=components,
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
              help="Only this component (repeatable); the other components of an export made with the same "
                   "settings in --out are kept.")
@click.option("--slim", is_flag=True, help="onnxslim each graph; kept only if parity still holds.")
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (TensorRT 10.0 parses 9..20).")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True)
@click.option("--no-check", is_flag=True, help="Skip `check` (checker, lint, parity) after export.")
def export_command(model, out_dir, height, width, batch, dynamic, min_height, min_width, min_batch, max_height,
                   max_width, max_batch, dtype, no_gag, gag_scale, gag_eta, gag_zeta, gag_layers, gag_method,
                   weights, components, slim, opset, exporter, no_check) -> None:
    """Export a model's components to ONNX with GAG inside the denoiser, then check them.

    \b
    Examples:
      gag-export export --model tiny-sdxl
      gag-export export --model dmd2 --dtype fp16 --dynamic --max-height 1536 --max-width 1536
    """
    from . import check, export
    from .guidance import GAGConfig
    from .models import ImageShape, load_pipeline, resolve_entry

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
        exporter=exporter, slim=slim, weights=weights, components=components,
        min_shape=_shape(ImageShape, min_height, min_width, min_batch, shape) if ranged else None,
        max_shape=_shape(ImageShape, max_height, max_width, max_batch, shape) if ranged else None,
    )
    if not dynamic and any(v is not None for v in (min_height, min_width, min_batch, max_height, max_width, max_batch)):
        raise click.UsageError("--min-*/--max-* need --dynamic")
    with console.status(f"loading {model} ({weights or 'default'} weights)"):
        pipe = load_pipeline(entry, weights=weights, components=list(components) or None)
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
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
    from . import check

    with console.status(f"checking {graphs_dir}"):
        report = check.check_graphs(graphs_dir, parity=not no_parity, seed=seed, parser=parser)
    _print_check_report(report)
    report.raise_for_failures()


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_command(as_json: bool) -> None:
    """What this machine can run (GPU, TensorRT, ONNX Runtime providers...) and how to get the rest.

    \b
    Examples:
      gag-export doctor
      gag-export doctor --json
    """
    from . import doctor

    report = doctor.diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(doctor.render(report))


@cli.command("generate")
@click.option("--model", required=True, help="Registry name (`gag-export models`), e.g. tiny-sdxl, dmd2, flux-schnell.")
@click.option("--prompt", required=True, help="Text prompt (longer than the text encoder's limit: truncated, with a warning).")
@click.option("--negative-prompt", default="", help="Negative prompt (only models with classifier-free guidance, e.g. sdxl).")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the model's, e.g. 4 for DMD2].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial latents and scheduler noise.")
@click.option("--backend", default="ort", show_default=True, help="torch | ort | tensorrt | tensorrt-rtx (an RTX GPU).")
@click.option("--gag-scale", type=float, default=None, help="GAG scale (lambda) [default: the export's, else 10].")
@click.option("--gag-eta", type=float, default=None, help="GAG norm cap eta [default: the export's, else 15].")
@click.option("--gag-zeta", type=float, default=None, help="GAG orthogonal weight zeta [default: the export's, else 0].")
@click.option("--no-gag", is_flag=True, help="The unmodified model (identity values fed to a GAG graph).")
@click.option("--height", type=int, default=None, help="Image height in pixels [default: the graphs' or the model's].")
@click.option("--width", type=int, default=None, help="Image width in pixels [default: the graphs' or the model's].")
@click.option("--graphs", "graphs_root", type=click.Path(file_okay=False, path_type=Path), default=Path("graphs"),
              show_default=True, help="Graphs root (<graphs>/<model>/manifest.json).")
@engines_option
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output PNG [default: <model>-<seed>.png].")
@click.option("--no-build", is_flag=True, help="Fail when graphs/engines are missing instead of building them.")
@click.option("--compile", "compile_torch", is_flag=True, help="torch backend: wrap components in torch.compile.")
@click.option("--cuda-graph", is_flag=True, help="tensorrt(-rtx) backends: capture the denoiser step in a CUDA graph.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ort backend: intra-op threads (0: ONNX Runtime's default).")
@click.option("--ort-provider", "ort_providers", multiple=True, metavar="NAME",
              help="ort backend: execution provider, in order (repeatable), e.g. TensorrtExecutionProvider "
                   "[default: CUDA if available, else CPU].")
def generate_command(model, prompt, negative_prompt, steps, seed, backend, gag_scale, gag_eta, gag_zeta, no_gag, height,
                     width, graphs_root, engines_root, out_path, no_build, compile_torch, cuda_graph, threads,
                     ort_providers) -> None:
    """Generate an image from exported graphs or engines (exported or built first when missing).

    \b
    Examples:
      gag-export generate --model tiny-sdxl --prompt "a red fox" --backend ort
      gag-export generate --model dmd2 --prompt "a red fox" --backend tensorrt --gag-scale 5
      gag-export generate --model dmd2 --prompt "a red fox" --backend tensorrt-rtx    # RTX PCs
    """
    from dataclasses import replace

    from .runtime import BackendOptions, GAGParams, GenerationConfig, Sampler, check_request, ensure_artifacts, parse_backend
    from .runtime.backends import model_entry

    backend = parse_backend(backend)
    given = {k: v for k, v in (("scale", gag_scale), ("eta", gag_eta), ("zeta", gag_zeta)) if v is not None}
    if no_gag and given:
        raise click.UsageError("--no-gag cannot be combined with --gag-scale/--gag-eta/--gag-zeta")
    GAGParams(**given)  # bad values fail here, before anything is built
    request = GenerationConfig(prompt, seed=seed, steps=steps, height=height, width=width, gag=None,
                               negative_prompt=negative_prompt)
    check_request(model_entry(model, graphs_root), request)  # bad steps/size fail before anything is built
    if not no_build:
        with console.status(f"checking artifacts for {model} ({backend})") as status:
            ensure_artifacts(model, backend, graphs=graphs_root, engines=engines_root, height=height, width=width,
                             on_stage=status.update,
                             on_export=lambda e: status.update(f"exporting {model}: {e.component} {e.stage} "
                                                               f"({e.index + 1}/{e.total})"))
    with console.status(f"loading {model} on {backend}"):
        sampler = Sampler.load(model, backend, graphs=graphs_root, engines=engines_root,
                               options=BackendOptions(compile=compile_torch, cuda_graph=cuda_graph, threads=threads,
                                                      ort_providers=ort_providers))
    gag = None if no_gag else sampler.gag_params(gag_scale, gag_eta, gag_zeta)
    with sampler, console.status(f"generating with {model} on {backend}"):
        result = sampler.generate(replace(request, gag=gag))
    path = result.save(out_path or Path(f"{model}-{seed}.png"))
    table = Table(title=f"{model} ({backend}) {result.width}x{result.height}", header_style="bold")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    for stage, seconds in result.timings.rows(result.timesteps):
        table.add_row(stage, f"{seconds * 1000:.1f}")
    Console().print(table)
    click.echo(f"wrote {path}")


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print README's supported-models table (Markdown).")
def models_command(as_json: bool, as_markdown: bool) -> None:
    """List the models that can be exported and sampled by name.

    \b
    Columns: family, default steps (range) and CFG scale, scheduler, resolution, weights source,
    and whether the pretrained weights are in the local Hugging Face cache ("built in" for
    tiny-*; every model also builds with --weights random, no download).

    \b
    Examples:
      gag-export models
      gag-export models --json
    """
    from .models import list_entries
    from .models.loading import weights_present

    entries = list_entries()
    if as_markdown:
        click.echo(_models_markdown(entries))
        return
    local = {e.name: weights_present(e) for e in entries}
    if as_json:
        click.echo(json.dumps([{
            "name": e.name, "family": e.family, "source": e.source.describe(), "height": e.height, "width": e.width,
            "scheduler": e.scheduler.class_name, "steps": e.scheduler.default_steps, "cfg_scale": e.cfg_scale,
            "description": e.description, "weights_present": local[e.name],
        } for e in entries], indent=2))
        return
    table = Table(header_style="bold")
    for column in ("model", "family", "size", "steps", "scheduler", "weights", "local"):
        table.add_column(column)
    for e in entries:
        steps = f"{e.scheduler.default_steps} ({e.scheduler.min_steps}-{e.scheduler.max_steps})"
        cfg = "" if e.cfg_scale is None else f", cfg {e.cfg_scale:g}"
        present = {None: "built in", True: "yes", False: "no"}[local[e.name]]
        table.add_row(e.name, e.family, f"{e.width}x{e.height}", steps + cfg, e.scheduler.class_name,
                      e.source.describe(), present)
    Console().print(table)


def _models_markdown(entries) -> str:
    """The registry as README's table: one row per entry, nothing that depends on this machine."""
    rows = ["| model | family | steps: default (range) | scheduler | resolution | guidance | weights (Hugging Face) |",
            "|---|---|---|---|---|---|---|"]
    for e in entries:
        spec = e.scheduler
        steps = f"{spec.default_steps} ({spec.min_steps}-{spec.max_steps})" if spec.min_steps != spec.max_steps \
            else f"{spec.default_steps}"
        fixed = spec.timesteps.get(spec.default_steps)
        options = [f"{k}={v}" for k, v in {**spec.kwargs, **spec.call_kwargs}.items()]
        if fixed:
            options.append(f"t = {', '.join(map(str, fixed))}")
        schedule = spec.class_name + (f" ({'; '.join(options)})" if options else "")
        if e.cfg_scale is not None:
            guidance = f"CFG {e.cfg_scale:g} + GAG"
        elif e.embedded_guidance is not None:
            guidance = f"GAG (no CFG; w-embedding {e.embedded_guidance:g})"
        else:
            guidance = "GAG (no CFG)"
        denoiser = " + UNet " if e.family == "sdxl" else " + transformer "
        source = "built in code" if e.is_tiny else e.source.describe().replace(" + ", denoiser)
        rows.append(f"| `{e.name}` | {e.family} | {steps} | {schedule} | {e.width}x{e.height} | {guidance} | {source} |")
    return "\n".join(rows)


@cli.command("bench")
@click.option("--model", required=True, help="Registry name, e.g. tiny-sdxl, tiny-flux, dmd2.")
@click.option("--backends", default="torch,ort", show_default=True,
              help="Comma-separated: torch, torch-compile, ort, tensorrt, tensorrt-rtx (unavailable ones are reported as skipped).")
@click.option("--steps", type=int, default=None, help="Denoising steps of the end-to-end runs [default: the model's].")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Image height in pixels [default: the model's].")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Image width in pixels [default: the model's].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch of the denoiser step (e2e needs 1).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed rounds after each variant's first call.")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed rounds.")
@click.option("--gag", "gag_mode", flag_value="gag", help="Only the GAG graphs.")
@click.option("--no-gag", "gag_mode", flag_value="no-gag", help="Only the plain (--no-gag) graphs.")
@click.option("--both", "gag_mode", flag_value="both", default=True,
              help="GAG and plain graphs interleaved: the GAG overhead [default].")
@weights_option
@click.option("--e2e/--no-e2e", default=True, show_default=True,
              help="Also time whole generations; --no-e2e loads and exports the denoiser alone.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch and ONNX Runtime intra-op threads (0: every CPU this process may use).")
@click.option("--isolate", type=click.Choice(["none", "backend", "variant"]), default="backend", show_default=True,
              help="backend: a child process per backend (runtimes in one process disturb each other's threads; "
                   "own peak RSS); variant: per backend and GAG setting; none: one process, all interleaved.")
@click.option("--graphs", "graphs_root", type=click.Path(file_okay=False, path_type=Path), default=Path("graphs/bench"),
              show_default=True, help="Cache of the benchmark's exports: <graphs>/{gag,no-gag}/<model>.")
@engines_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample inputs and of the e2e runs.")
@click.option("--reexport", is_flag=True, help="Export the graphs again even if the cache matches (e.g. after a GAG code change).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the Markdown tables.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: latency per backend, GAG off/on.")
def bench_command(model, backends, steps, height, width, batch, warmup, iters, gag_mode, weights, e2e, threads, isolate,
                  graphs_root, engines_root, seed, reexport, json_path, markdown_path, plot_path) -> None:
    """Time backends against PyTorch eager and GAG against the plain graph, in one run, e.g.
    `gag-export bench --model tiny-sdxl --backends torch,ort --json out.json --plot out.png`."""
    from . import bench

    config = bench.BenchConfig(
        model=model, backends=bench.parse_backends(backends), gag=gag_mode, steps=steps, height=height, width=width,
        batch=batch, warmup=warmup, iters=iters, weights=weights, e2e=e2e, threads=threads, isolate=isolate,
        seed=seed, graphs=graphs_root, engines=engines_root, reexport=reexport,
    )
    outputs = [(path, write) for path, write in
               ((json_path, bench.write_json), (markdown_path, bench.write_markdown), (plot_path, bench.write_plot))
               if path is not None]
    for path, _ in outputs:  # a path that cannot be written fails now, not after the whole benchmark
        bench.check_writable(path)
    with console.status(f"benchmarking {model}") as status:
        doc = bench.run_bench(config, progress=status.update)
    click.echo(bench.render_markdown(doc))  # first: the results survive a write that still fails
    _write_bench_outputs(doc, outputs)


def _write_bench_outputs(doc, outputs) -> None:
    """Write every output that can be written; then raise the first failure (exit 5, or 7 when the disk is full)."""
    failures = []
    for path, write in outputs:
        try:
            write(doc, path)
        except GagExportError as exc:
            failures.append(exc)
            continue
        click.echo(f"wrote {path}", err=True)
    for exc in failures[1:]:
        click.echo(f"error: {exc}", err=True)
    if failures:
        raise failures[0]


def _gpu_ids(ctx, param, value):
    """`--gpus 0,1` as a tuple of ints (empty: every GPU)."""
    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated GPU ids, e.g. 0,1; got {value!r}") from None


@cli.command("triton")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The model repository to write, e.g. triton/<model> (replaced atomically).")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The model's engine folder (engines/<model>) for --backend plan or tensorrt-rtx.")
@click.option("--backend", type=click.Choice(["plan", "onnx", "tensorrt-rtx"]), default=None,
              help="Components as TensorRT plans, ONNX models, or TensorRT-RTX plans (Python models running them: "
                   "Triton's TensorRT backend cannot load those) [default: plan with --engines, else onnx].")
@click.option("--cpu-standin", is_flag=True,
              help="Every component a Python model running its ONNX graph on ONNX Runtime, KIND_CPU (loads without a GPU).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each component model per GPU (stand-ins: per machine).")
@click.option("--gpus", callback=_gpu_ids, default=None, metavar="IDS", help="GPU ids for the instance groups, e.g. 0,1 [default: all].")
@click.option("--max-batch", type=click.IntRange(min=0), default=8, show_default=True,
              help="Largest batch Triton may form for a batchable model (0: no batching).")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True,
              help="Let Triton batch concurrent requests to batchable models.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500, show_default=True,
              help="How long the dynamic batcher waits for more requests.")
@click.option("--sampler-instances", type=click.IntRange(min=1), default=2, show_default=True,
              help="Sampler instances (CPU processes running scheduler loops concurrently).")
@click.option("--cpu-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime threads per stand-in instance (0: its default).")
@click.option("--max-prompt-chars", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Longest prompt the pipeline accepts.")
def triton_command(graphs_dir, out_dir, engines_dir, backend, cpu_standin, instances, gpus, max_batch, dynamic_batching,
                   max_queue_delay_us, sampler_instances, cpu_threads, max_prompt_chars) -> None:
    """Write a Triton Inference Server model repository for an export, e.g.
    `gag-export triton graphs/tiny-sdxl --out triton/tiny-sdxl --cpu-standin`."""
    from .serving import RepositoryOptions, build_repository

    options = RepositoryOptions(
        backend=backend or ("plan" if engines_dir is not None else "onnx"), cpu_standin=cpu_standin,
        instances=instances, gpus=gpus, max_batch=max_batch, dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us, sampler_instances=sampler_instances, standin_threads=cpu_threads,
        max_prompt_chars=max_prompt_chars,
    )
    with console.status(f"writing {out_dir}"):
        report = build_repository(graphs_dir, out_dir, options, engines_dir=engines_dir)
    table = Table(title=f"{report.model} -> {report.path}", header_style="bold")
    for column in ("model", "kind", "max batch", "instances", "files"):
        table.add_column(column)
    for m in report.models:
        table.add_row(m.name, m.kind, str(m.max_batch_size), m.instances, ", ".join(m.files))
    Console().print(table)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"serve it: gag-export serve --repo {report.path}")


@cli.command("serve")
@click.option("--repo", "repository", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A repository written by `gag-export triton`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP, gRPC and metrics endpoints bind to.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0: a free port.")
@click.option("--tritonserver", "binary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The server binary [default: tritonserver on PATH, else the nvidia-pytriton wheel's].")
@click.option("--python-env", type=click.Path(path_type=Path), default=None,
              help="Virtual environment (or interpreter) for the Python models [default: the serving environment if set up].")
@click.option("--setup", is_flag=True,
              help="Create or update the serving environment (~/.cache/gag-export/triton-venv: nvidia-pytriton, numpy<2, "
                   "this package's dependencies) first; alone, only that.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds to wait for every model to load.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the server's log there [default: stderr].")
def serve_command(repository, host, http_port, grpc_port, metrics_port, binary, python_env, setup, ready_timeout,
                  log_file) -> None:
    """Run Triton Inference Server on a generated repository until Ctrl-C, e.g.
    `gag-export serve --setup --repo triton/tiny-sdxl`."""
    import sys

    from .serving.environment import ensure_environment
    from .serving.server import ServerConfig, TritonServer, interrupt_on_signals

    if repository is None and not setup:
        raise click.UsageError("give --repo (and/or --setup)")
    if setup:
        with console.status("serving environment") as status:
            env = ensure_environment(python_env, on_step=status.update)
        click.echo(f"serving environment: {env.python.parent.parent} (Python {env.version}, numpy {env.numpy})", err=True)
        if repository is None:
            return
    config = ServerConfig(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          tritonserver=binary, environment=python_env, ready_timeout=ready_timeout)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupt_on_signals())
        sink = stack.enter_context(open(log_file, "a")) if log_file is not None else sys.stderr
        with console.status(f"starting Triton on {repository} (loading models)"):
            server = stack.enter_context(TritonServer(config, log_file=sink))
        click.echo(f"ready: http://{server.urls.http}  grpc://{server.urls.grpc}  metrics http://{server.urls.metrics}"
                   "/metrics  (Ctrl-C stops)", err=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            click.echo("stopping (unloading models)...", err=True)
            return
    if code:
        raise GagExportError(f"tritonserver exited with code {code}")


@cli.command("client")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="http://host:port or grpc://host:port of a `gag-export serve` server.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None, help="For a URL without scheme [default: http].")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the initial latents.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the served model's].")
@click.option("--gag-scale", type=float, default=None, help="GAG scale [default: the served export's].")
@click.option("--gag-eta", type=float, default=None, help="GAG norm cap eta [default: the served export's].")
@click.option("--gag-zeta", type=float, default=None, help="GAG orthogonal weight zeta [default: the served export's].")
@click.option("--model", "model_name", default="pipeline", show_default=True, help="The served model to call.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="Seconds to wait for the image.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output PNG [default: triton-<seed>.png].")
def client_command(url, protocol, prompt, seed, steps, gag_scale, gag_eta, gag_zeta, model_name, timeout, out_path) -> None:
    """Request an image from a served pipeline, e.g.
    `gag-export client --url http://127.0.0.1:8000 --prompt "a red fox" --out fox.png`."""
    from PIL import Image

    from .runtime import save_png
    from .serving.client import PipelineClient, PipelineRequest

    request = PipelineRequest(prompt, seed=seed, steps=steps, gag_scale=gag_scale, gag_eta=gag_eta, gag_zeta=gag_zeta)
    with PipelineClient(url, protocol=protocol, model=model_name, timeout=timeout) as client, \
            console.status(f"requesting {model_name} at {url}"):
        request = client.resolve(request)
        image = client.generate(request)
        served = client.defaults.get("gag_export_model", "")
    metadata = {"prompt": prompt, "seed": str(seed), "steps": str(request.steps), "model": served,
                "backend": f"triton {client.protocol}://{client.address}", **{
                    k: "" if v is None else repr(float(v)) for k, v in
                    (("gag_scale", request.gag_scale), ("gag_eta", request.gag_eta), ("gag_zeta", request.gag_zeta))},
                "Software": f"gag-export {__version__}"}
    path = save_png(Image.fromarray(image), out_path or Path(f"triton-{seed}.png"), metadata)
    click.echo(f"wrote {path} ({image.shape[1]}x{image.shape[0]})")


def main() -> None:
    """Console-script entry point."""
    cli(obj={})


if __name__ == "__main__":
    main()
