"""Commands that help choose GAG's values: `calibrate`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..core.errors import InvalidInputError
from ..core.extras import missing_modules, require_extra
from .app import cli, counted_progress, log, weights_option


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated numbers expected, got {text!r}", param_hint=option) from None


@cli.command("calibrate")
@click.option("--model", required=True, help="Registry name (`gag-export models`), e.g. tiny-sdxl, dmd2, flux-schnell.")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Prompt file, one a line (# comments) [default: the 24 prompts shipped with gag-export].")
@click.option("--steps", type=int, default=None, help="Sampling steps per prompt [default: the model's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every prompt's latents.")
@weights_option
@click.option("--height", type=int, default=None, help="Image height [default: the model's].")
@click.option("--width", type=int, default=None, help="Image width [default: the model's].")
@click.option("--gag-scale", type=float, default=None, help="GAG scale run while measuring [default: the export's, else 10].")
@click.option("--gag-eta", type=float, default=None,
              help="GAG eta run while measuring (a layer's norms depend on the caps before it) [default: the export's, else 15].")
@click.option("--gag-zeta", type=float, default=None, help="GAG zeta [default: the export's, else 0].")
@click.option("--gag-layers", default=None, help="Rewritten layers, as export's --gag-layers [default: the export's, else down,up].")
@click.option("--clip-share", type=float, default=0.1, show_default=True,
              help="Rule: per layer, the eta that caps this share of tokens (the (1 - share)-quantile of the norm).")
@click.option("--step-tolerance", type=float, default=0.25, show_default=True,
              help="Give per-step etas for a layer when a step's differs from the layer's by more than this (relative).")
@click.option("--eta-grid", default=None, help="Comma-separated etas at which to report the clipped share [default: 0.01 ... 1000].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration JSON [default: <model>-calibration.json]; plots beside it (<stem>-norms.png, <stem>-clipped.png).")
@click.option("--plot/--no-plot", default=None,
              help="Write the plots (matplotlib, the [bench] extra) [default: when matplotlib is installed].")
@click.option("--apply", "apply_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An export's folder (graphs/<model>): calibrate with its GAG settings and weights, then record the "
                   "per-layer etas as its defaults.")
@click.option("--device", default="auto", show_default=True, help="torch device: auto, cpu, cuda, cuda:N.")
def calibrate_command(model, prompts_path, steps, seed, weights, height, width, gag_scale, gag_eta, gag_zeta, gag_layers,
                      clip_share, step_tolerance, eta_grid, out_path, plot, apply_dir, device) -> None:
    """Measure GAG's update norms over a prompt set and recommend eta per layer (JSON, plots).

    \b
    Examples:
      gag-export calibrate --model tiny-sdxl --steps 2 --out cal.json
      gag-export calibrate --model dmd2 --apply graphs/dmd2          # then: gag-export generate --model dmd2 ...
      gag-export calibrate --model sdxl --weights random --prompts my-prompts.txt --clip-share 0.05
    """
    from dataclasses import replace

    from ..artifacts.manifest import Manifest
    from ..core.atomic import check_writable
    from ..core.gag_config import DEFAULT_EXPORT_GAG
    from ..workflows import calibrate
    from ..workflows.evaluate import read_prompts

    has_matplotlib = "matplotlib" not in missing_modules("bench")  # plots need nothing else of the extra
    if plot and not has_matplotlib:
        require_extra("bench", "gag-export calibrate --plot")
    plot = has_matplotlib if plot is None else plot
    gag, manifest = DEFAULT_EXPORT_GAG, None
    if apply_dir is not None:  # the export's settings, so that the layers and the guidance match what it runs
        manifest = Manifest.load(apply_dir)
        if manifest.model != model:
            raise InvalidInputError(f"--apply: {apply_dir} holds {manifest.model!r}, not {model!r}")
        if manifest.gag is None:
            raise InvalidInputError(f"--apply: {apply_dir} was exported without GAG (--no-gag): nothing to calibrate")
        gag = manifest.gag
        weights = weights or manifest.data.get("weights")
    given = {k: v for k, v in (("scale", gag_scale), ("eta", gag_eta), ("zeta", gag_zeta), ("layers", gag_layers))
             if v is not None}
    config = calibrate.CalibrationConfig(
        model, prompts=read_prompts(prompts_path) if prompts_path else (), steps=steps, seed=seed,
        weights=weights, height=height, width=width, gag=replace(gag, **given), clip_share=clip_share,
        step_tolerance=step_tolerance, eta_grid=_floats(eta_grid, "--eta-grid") or calibrate.DEFAULT_ETA_GRID,
        device=device,
    )
    out_path = out_path or Path(f"{model}-calibration.json")
    for path in (out_path, *(calibrate.plot_paths(out_path) if plot else ())):
        check_writable(path)  # before the run, not after it

    cal = _run_with_progress(calibrate, config)
    data = calibrate.write_calibration(cal, out_path)
    Console().print(_summary(data))
    click.echo(f"wrote {out_path}")
    if plot:
        for path in calibrate.write_plots(cal, data, out_path):
            click.echo(f"wrote {path}")
    else:
        log.info("plots not written: they need matplotlib (pip install \"gag-export[bench]\")")
    if apply_dir is not None:
        calibrate.apply_calibration(data, out_path, apply_dir)
        click.echo(f"recorded the per-layer eta as the defaults of {apply_dir}")


def _run_with_progress(calibrate, config):
    with counted_progress(f"calibrating {config.model}: {len(config.prompts)} prompts x steps") as advance:
        return calibrate.run_calibration(config, progress=advance)


def _summary(data: dict) -> Table:
    """One row per layer: the norm over every prompt and step, and the recommendation."""
    table = Table(title=f"{data['model']}: pre-cap update norm, {data['prompts']} prompts x {data['steps']} steps; "
                        f"eta capping {data['rule']['clip_share']:g} of tokens", header_style="bold")
    for column in ("layer", "mean", "max", "eta", "eta per step"):
        # layer names are folded onto more lines, never cut: they are what --apply and the manifest match
        table.add_column(column, justify="left" if column == "layer" else "right",
                         overflow="fold" if column == "layer" else "ellipsis")
    for layer in data["layers"]:
        steps = layer["steps"]
        mean = sum(s["mean"] * s["count"] for s in steps) / sum(s["count"] for s in steps)
        per_step = layer["recommended_eta_per_step"]
        table.add_row(layer["name"], f"{mean:.3g}", f"{max(s['max'] for s in steps):.3g}", f"{layer['recommended_eta']:.3g}",
                      ", ".join(f"{v:.3g}" for v in per_step) if per_step else "-")
    return table


__all__ = ["calibrate_command"]
