"""The `gag-export` group: logging, one-line errors with their documented exit codes, shared options."""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler

from .. import __version__
from ..core.errors import (
    EXIT_CODES,
    INTERRUPTED_EXIT_CODE,
    GagExportError,
    ResourceExhaustedError,
)
from ..core.signals import Terminated, raise_if_terminated, terminate_on_signals

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
            with terminate_on_signals():
                value = super().invoke(ctx)
                raise_if_terminated()  # a stop signal whose exception was swallowed: the work finished whole
                return value
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated as exc:  # SIGTERM/SIGHUP: unwound like Ctrl-C, so the temp files are gone
            self._fail(ctx, f"terminated by {exc.name}; nothing half-written was left", exc.exit_code)
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


@contextmanager
def counted_progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A bar for work counted in units (images, sampling steps), hidden by --quiet and when stderr is
    no terminal. Yields `advance(done=None, total=None)`: one more unit, or `done` of `total`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    context = click.get_current_context(silent=True)
    quiet = bool(context and (context.find_object(dict) or {}).get("quiet"))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(done: int | None = None, total: int | None = None) -> None:
            if done is None:
                progress.advance(task)
            else:
                progress.update(task, completed=done, total=total)

        yield advance


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


def _lora_specs(ctx, param, values) -> tuple:
    if not values:
        return ()
    from ..models.lora import LoraSpec  # noqa: PLC0415  (torch: only when a LoRA is given)

    return tuple(LoraSpec.parse(value) for value in values)


lora_option = click.option(
    "--lora", "loras", multiple=True, metavar="PATH[:SCALE]", callback=_lora_specs,
    help="A LoRA .safetensors file (diffusers/PEFT or kohya) fused into the denoiser before GAG, with its "
         "scale [default 1.0]; repeatable.")


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
