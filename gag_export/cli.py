"""The `gag-export` command line: options become configs, configs go to the layers.

No logic lives here. Each command turns its options into the objects the layers take and
reports what they return. Errors from the layers (`GagExportError`) become one line on stderr
and the exit code documented in README (see `gag_export.errors.EXIT_CODES`).
"""

from __future__ import annotations

import logging
import click
from rich.console import Console
from rich.logging import RichHandler

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


def main() -> None:
    """Console-script entry point."""
    cli(obj={})


if __name__ == "__main__":
    main()
