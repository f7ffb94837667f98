"""The `gag-export` command line: options become configs, configs go to the layers.

No logic lives here. Each command turns its options into the objects the layers take and
reports what they return. Errors from the layers (`GagExportError`) become one line on stderr
and the exit code documented in README (see `gag_export.errors.EXIT_CODES`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import __version__
from .errors import GagExportError

console = Console(stderr=True)
log = logging.getLogger("gag_export")


class GagGroup(click.Group):
    """A click group that turns `GagExportError` into one line and its exit code.

    Done here rather than in `main` so that click's CliRunner (tests) sees the same exit codes.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GagExportError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                console.print_exception()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=GagGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet


@cli.command("engine")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("engines"),
              show_default=True, help="Engine cache root: <out>/<model>/<component>/<key>.plan + .json sidecar.")
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
def engine_command(graphs_dir: Path, out_dir: Path, precision, shapes, timing_cache, workspace_gb, opt_level,
                   weakly_typed: bool, rebuild: bool, components: tuple[str, ...]) -> None:
    """Build (or reuse) TensorRT engines for an exported model, e.g. `gag-export engine graphs/tiny-sdxl`."""
    from . import engine

    options = engine.EngineOptions(
        precision=precision, shapes=shapes or "manifest", weakly_typed=weakly_typed, opt_level=opt_level,
        workspace_gb=workspace_gb, timing_cache=timing_cache, rebuild=rebuild, components=components,
    )
    records = engine.build(graphs_dir, out_dir, options)
    table = Table(show_header=True, header_style="bold")
    for column in ("component", "engine", "status", "precision", "seconds"):
        table.add_column(column)
    for r in records:
        table.add_row(r.component, str(r.path), r.status, r.sidecar.precision, f"{r.seconds:.1f}")
    Console().print(table)


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_command(as_json: bool) -> None:
    """What this machine can run (GPU, TensorRT, ONNX Runtime providers...) and how to get the rest."""
    from . import doctor

    report = doctor.diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(doctor.render(report))


def main() -> None:
    """Console-script entry point."""
    cli(obj={})


if __name__ == "__main__":
    main()
