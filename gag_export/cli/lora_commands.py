"""`gag-export lora`: a LoRA variant of an existing export, and refit copies of its refittable engines."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..core.errors import MissingDependencyError
from ..core.extras import require_extra
from .app import cli, engines_option

log = logging.getLogger(__name__)


@cli.command("lora")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lora", "loras", multiple=True, required=True, metavar="PATH[:SCALE]",
              help="A LoRA .safetensors file (diffusers/PEFT or kohya keys) and its scale [default 1.0]; repeatable.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Graphs root of the new export: <out>/<model>/... (written atomically; never the original's).")
@engines_option
@click.option("--no-refit", is_flag=True, help="Leave the original's refittable engines alone.")
def lora_command(graphs_dir: Path, loras: tuple[str, ...], out_dir: Path, engines_root: Path, no_refit: bool) -> None:
    """Fuse LoRAs into an exported denoiser without tracing it again: only the weights they change
    are rewritten (exit 2 when one touches a weight the export's weight map cannot place); the
    original export is never modified. Refittable engines of the original (`gag-export engine
    --refittable`) are refit into copies for the new graph (needs their GPU).

    \b
    Examples:
      gag-export lora graphs/tiny-sdxl --lora style.safetensors:0.8 --out graphs-style
      gag-export lora graphs/sdxl --lora dmd2_lora.safetensors --lora detail.safetensors:0.5 --out graphs-dmd2
    """
    require_extra("export", "gag-export lora")
    from ..artifacts.manifest import Manifest
    from ..export.lora_variant import denoiser_name, make_lora_variant
    from ..models.lora import LoraSpec

    specs = [LoraSpec.parse(text) for text in loras]
    variant = make_lora_variant(graphs_dir, out_dir, specs)
    component = denoiser_name(variant)
    click.echo(f"wrote {variant.graphs_dir} ({variant.data['derived_from']['changed_initializers']} initializers of "
               f"{component} changed)")
    if no_refit:
        return
    from ..engine.refit import refit_engines, refittable_engines

    original = Manifest.load(graphs_dir)
    if not refittable_engines(engines_root, original, component):
        return
    try:
        for record in refit_engines(engines_root, original, variant, component):
            click.echo(f"{component}: refit {record.path} ({record.seconds:.1f} s)")
    except MissingDependencyError as exc:  # the graphs are written and whole; the engines wait for their GPU
        log.warning("engines not refit: %s; run `gag-export lora` again on the machine that runs them", exc)
