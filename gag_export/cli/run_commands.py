"""Run-side commands: `generate`, `bench`, `models`, `doctor`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..core.errors import CheckFailedError, GagExportError, InvalidInputError
from ..core.extras import require_extra
from .app import cli, console, engines_option, lora_option, weights_option


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_command(as_json: bool) -> None:
    """What this machine can run (GPU, TensorRT, ONNX Runtime providers...) and how to get the rest.

    \b
    Examples:
      gag-export doctor
      gag-export doctor --json
    """
    from .. import doctor

    report = doctor.diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(doctor.render(report))


def number_list(option: str, text: str) -> tuple[float, ...]:
    """`15,10` -> (15.0, 10.0); InvalidInputError (exit 2) naming the option otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(f"{option}: comma-separated numbers, got {text!r}") from None
    return values


def guidance_option(option: str, text: str | None):
    """`--gag-scale`/`--gag-eta`: one number for every layer, or `V1,...,VL` one per rewritten layer."""
    if text is None:
        return None
    values = number_list(option, text)
    return values[0] if len(values) == 1 else values


@cli.command("generate")
@click.option("--model", required=True, help="Registry name (`gag-export models`), e.g. tiny-sdxl, dmd2, flux-schnell.")
@click.option("--prompt", required=True, help="Text prompt (longer than the text encoder's limit: truncated, with a warning).")
@click.option("--negative-prompt", default="", help="Negative prompt (only models with classifier-free guidance, e.g. sdxl).")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the model's, e.g. 4 for DMD2].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial latents and scheduler noise.")
@click.option("--backend", default="ort", show_default=True, help="torch | ort | tensorrt | tensorrt-rtx (an RTX GPU).")
@click.option("--gag-scale", default=None, metavar="S|S1,...,SL",
              help="GAG scale (lambda): one number, or one per rewritten layer in the manifest's gag.layer_names "
                   "order [default: the export's, else 10].")
@click.option("--gag-eta", default=None, metavar="E|E1,...,EL",
              help="GAG norm cap eta ('inf': no cap), one number or one per layer as --gag-scale "
                   "[default: the export's (calibrated per layer where applied), else 15].")
@click.option("--gag-zeta", type=float, default=None, help="GAG orthogonal weight zeta [default: the export's, else 0].")
@click.option("--gag-scale-steps", default=None, metavar="S1,S2,...",
              help="Per-step GAG scale, one per denoising step, the last repeating (15,10: 15 at the first step).")
@click.option("--gag-eta-steps", default=None, metavar="E1,E2,...", help="Per-step GAG eta, as --gag-scale-steps.")
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
@click.option("--image", "image_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image-to-image: the input image (any format Pillow reads); generated at its size unless the "
                   "graphs are static. Needs the VAE encoder (`export --img2img`).")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much of the schedule runs on the image, in (0, 1] "
                   "[default: diffusers', 0.3 for SDXL models, 0.6 for FLUX].")
@lora_option
def generate_command(model, prompt, negative_prompt, steps, seed, backend, gag_scale, gag_eta, gag_zeta, gag_scale_steps,
                     gag_eta_steps, no_gag, height, width, graphs_root, engines_root, out_path, no_build, compile_torch,
                     cuda_graph, threads, ort_providers, image_path, strength, loras) -> None:
    """Generate an image from exported graphs or engines (exported or built first when missing).

    \b
    Examples:
      gag-export generate --model tiny-sdxl --prompt "a red fox" --backend ort
      gag-export generate --model dmd2 --prompt "a red fox" --backend tensorrt --gag-scale 5
      gag-export generate --model dmd2 --prompt "a red fox" --backend tensorrt-rtx    # RTX PCs
      gag-export generate --model sdxl-turbo --prompt "a watercolor fox" --image fox.png --strength 0.5 --steps 2
      gag-export generate --model dmd2 --prompt "a red fox" --backend torch --lora style.safetensors:0.8
    """
    from dataclasses import replace

    from ..runtime import (
        BackendOptions,
        GAGParams,
        GenerationConfig,
        Sampler,
        check_request,
        parse_backend,
    )
    from ..images import require_png_path
    from ..runtime.exports import model_entry
    from ..workflows.artifacts import ensure_artifacts

    backend = parse_backend(backend)
    if loras and backend != "torch":
        raise InvalidInputError(f"--lora is for --backend torch: {backend} runs exported graphs, which carry the LoRAs "
                                "they were exported with (`gag-export export --lora`, or `gag-export lora` on an export)")
    out_path = require_png_path(out_path or Path(f"{model}-{seed}.png"))  # before anything is built
    gag_scale, gag_eta = guidance_option("--gag-scale", gag_scale), guidance_option("--gag-eta", gag_eta)
    given = {k: v for k, v in (("scale", gag_scale), ("eta", gag_eta), ("zeta", gag_zeta)) if v is not None}
    schedules = {f"{k}_steps": number_list(f"--gag-{k}-steps", v)
                 for k, v in (("scale", gag_scale_steps), ("eta", gag_eta_steps)) if v is not None}
    if no_gag and (given or schedules):
        raise click.UsageError("--no-gag cannot be combined with --gag-scale/--gag-eta/--gag-zeta/--gag-*-steps")
    values = GAGParams(**given, **schedules)  # bad values fail here, before anything is built
    request = GenerationConfig(prompt, seed=seed, steps=steps, height=height, width=width, gag=None,
                               negative_prompt=negative_prompt, image=image_path, strength=strength)
    steps_run, _ = check_request(model_entry(model, graphs_root), request)  # bad steps/size fail before anything is built
    values.check_steps(steps_run)
    if not no_build:
        with console.status(f"checking artifacts for {model} ({backend})") as status:
            ensure_artifacts(model, backend, graphs=graphs_root, engines=engines_root, height=height, width=width,
                             on_stage=status.update, img2img=image_path is not None,
                             on_export=lambda e: status.update(f"exporting {model}: {e.component} {e.stage} "
                                                               f"({e.index + 1}/{e.total})"))
    with console.status(f"loading {model} on {backend}"):
        sampler = Sampler.load(model, backend, graphs=graphs_root, engines=engines_root,
                               options=BackendOptions(compile=compile_torch, cuda_graph=cuda_graph, threads=threads,
                                                      ort_providers=ort_providers, loras=loras))
    gag = None if no_gag else sampler.gag_params(gag_scale, gag_eta, gag_zeta, **schedules)
    with sampler, console.status(f"generating with {model} on {backend}"):
        result = sampler.generate(replace(request, gag=gag))
    path = result.save(out_path)
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
    from ..models import list_entries
    from ..models.loading import weights_present

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
    rows = []
    for e in entries:
        steps = f"{e.scheduler.default_steps} ({e.scheduler.min_steps}-{e.scheduler.max_steps})"
        cfg = "" if e.cfg_scale is None else f", cfg {e.cfg_scale:g}"
        present = {None: "built in", True: "yes", False: "no"}[local[e.name]]
        rows.append((e.name, e.family, f"{e.width}x{e.height}", steps + cfg, e.scheduler.class_name,
                     e.source.describe(), present))
    if not sys.stdout.isatty():  # piped: plain lines that grep and cut can read
        click.echo(plain_table(MODEL_COLUMNS, rows))
    else:
        console = Console()
        console.print(models_table(rows, console.width))


MODEL_COLUMNS = ("model", "family", "size", "steps", "scheduler", "weights", "local")


def plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns padded with spaces, one line per row, nothing cut: what `models` prints into a pipe."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (header, *rows))


def models_table(rows: list[tuple[str, ...]], width: int) -> Table:
    """The terminal's table, `width` columns wide. A name is what a user types, so no value is ever
    cut: the weights' sources wrap, and on a terminal too narrow for them (then for the scheduler)
    those columns are left out, saying so; `--json` and a pipe always have every field."""
    widths = {c: max(len(str(row[i])) for row in (MODEL_COLUMNS, *rows)) for i, c in enumerate(MODEL_COLUMNS)}
    shown = list(MODEL_COLUMNS)

    def unwrapped(columns) -> int:  # each column: its text, two spaces of padding, one border
        return 1 + sum(widths[c] + 3 for c in columns if c != "weights")

    if width - unwrapped(shown) < 24:  # too little room to wrap a repository id legibly
        shown.remove("weights")
    if unwrapped(shown) > width:
        shown.remove("scheduler")
    hidden = [c for c in MODEL_COLUMNS if c not in shown]
    table = Table(header_style="bold", caption=f"{' and '.join(hidden)} left out at this width: "
                  "`gag-export models --json` has every field" if hidden else None)
    for column in shown:
        if column == "weights":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True, min_width=widths[column])
    for row in rows:
        table.add_row(*(cell for cell, column in zip(row, MODEL_COLUMNS) if column in shown))
    return table


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
@click.option("--img2img", is_flag=True,
              help="Also time image-to-image generations (a fixed generated input image, strength 0.5); "
                   "the graphs are exported with the VAE encoder.")
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
def bench_command(model, backends, steps, height, width, batch, warmup, iters, gag_mode, weights, e2e, img2img, threads,
                  isolate, graphs_root, engines_root, seed, reexport, json_path, markdown_path, plot_path) -> None:
    """Time backends against PyTorch eager and GAG against the plain graph, in one run, e.g.
    `gag-export bench --model tiny-sdxl --backends torch,ort --json out.json --plot out.png`."""
    require_extra("bench", "gag-export bench")
    from ..workflows import bench

    config = bench.BenchConfig(
        model=model, backends=bench.parse_backends(backends), gag=gag_mode, steps=steps, height=height, width=width,
        batch=batch, warmup=warmup, iters=iters, weights=weights, e2e=e2e, threads=threads, isolate=isolate,
        seed=seed, graphs=graphs_root, engines=engines_root, reexport=reexport, img2img=img2img,
    )
    outputs = [(path, write) for path, write in
               ((json_path, bench.write_json), (markdown_path, bench.write_markdown), (plot_path, bench.write_plot))
               if path is not None]
    for path, _ in outputs:  # a path that cannot be written fails now, not after the whole benchmark
        bench.check_writable(path)
    with console.status(f"benchmarking {model}") as status:
        result = bench.run_bench(config, progress=status.update)
    click.echo(bench.render_markdown(result))  # first: the results survive a write that still fails
    _write_bench_outputs(result, outputs)
    failed = [r for r in result.results if r.status == "failed"]
    if failed:  # skipped (not installed here) is not a failure; a requested variant that broke is
        raise CheckFailedError(f"bench: {len(failed)} of {len(result.results)} variants failed: "
                               + "; ".join(f"{r.backend}/{'gag' if r.gag else 'no-gag'}: {r.reason}" for r in failed))


def _write_bench_outputs(result, outputs) -> None:
    """Write every output that can be written; then raise the first failure (exit 5, or 7 when the disk is full)."""
    failures = []
    for path, write in outputs:
        try:
            write(result, path)
        except GagExportError as exc:
            failures.append(exc)
            continue
        click.echo(f"wrote {path}", err=True)
    for exc in failures[1:]:
        click.echo(f"error: {exc}", err=True)
    if failures:
        raise failures[0]
