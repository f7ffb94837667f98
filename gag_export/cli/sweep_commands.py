"""Tuning commands that look at guidance: `sweep` (a labelled contact sheet) and `eval` (scores per setting)."""

from __future__ import annotations

from pathlib import Path

import click

from .app import cli, console, counted_progress, engines_option

# Options `sweep` and `eval` share, declared once.
_GRID_OPTIONS = (
    click.option("--model", required=True, help="Registry name (`gag-export models`), e.g. tiny-sdxl, dmd2."),
    click.option("--scale", "scales", default="0,5,10,15", show_default=True,
                 help="GAG scales (lambda), comma-separated: the sheet's rows."),
    click.option("--eta", "etas", default="5,15,inf", show_default=True,
                 help="GAG norm caps eta, comma-separated ('inf': no cap): the sheet's columns."),
    click.option("--zeta", type=float, default=None, help="GAG orthogonal weight for every setting [default: the export's]."),
    click.option("--no-gag", "baseline", is_flag=True, help="Add the unguided model (GAG off) as a baseline setting."),
    click.option("--steps", type=int, default=None, help="Denoising steps [default: the model's]."),
    click.option("--backend", default="ort", show_default=True, help="torch | ort | tensorrt | tensorrt-rtx."),
    click.option("--height", type=int, default=None, help="Image height in pixels [default: the graphs' or the model's]."),
    click.option("--width", type=int, default=None, help="Image width in pixels [default: the graphs' or the model's]."),
    click.option("--graphs", "graphs_root", type=click.Path(file_okay=False, path_type=Path), default=Path("graphs"),
                 show_default=True, help="Graphs root (<graphs>/<model>/manifest.json)."),
    engines_option,
    click.option("--no-build", is_flag=True, help="Fail when graphs/engines are missing instead of building them."),
    click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                 help="torch and ort backends: intra-op threads (0: the library's default)."),
)


def grid_options(command):
    for option in reversed(_GRID_OPTIONS):
        command = option(command)
    return command


def _load_sampler(model, backend, graphs_root, engines_root, height, width, no_build, threads):
    """Build what `backend` lacks (unless --no-build), then load it once for every setting."""
    from ..runtime import BackendOptions, Sampler
    from ..workflows.artifacts import ensure_artifacts
    from ..workflows.sweep import require_gag_inputs

    if not no_build:
        with console.status(f"checking artifacts for {model} ({backend})") as status:
            ensure_artifacts(model, backend, graphs=graphs_root, engines=engines_root, height=height, width=width,
                             on_stage=status.update)
    with console.status(f"loading {model} on {backend}"):
        sampler = Sampler.load(model, backend, graphs=graphs_root, engines=engines_root,
                               options=BackendOptions(threads=threads))
    require_gag_inputs(sampler)
    return sampler


@cli.command("sweep")
@grid_options
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--negative-prompt", default="", help="Negative prompt (models with classifier-free guidance).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed shared by every tile.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder: one PNG per setting and sheet.png [default: sweep-<model>-<seed>].")
def sweep_command(model, scales, etas, zeta, baseline, steps, backend, height, width, graphs_root, engines_root,
                  no_build, threads, prompt, negative_prompt, seed, out_dir) -> None:
    """One image per GAG scale x eta from the same seed, and one labelled contact sheet of them.

    \b
    Rows are scales, columns etas (values written on the sheet); --no-gag adds a "GAG off" row on top.
    The pipeline loads once: guidance values are fed per call.
    Examples:
      gag-export sweep --model tiny-sdxl --prompt "a red fox" --backend torch
      gag-export sweep --model dmd2 --prompt "a red fox" --seed 3 --scale 0,5,10,15 --eta 5,15,inf --no-gag
    """
    from ..core.atomic import check_writable
    from ..runtime import GenerationConfig, check_request, parse_backend
    from ..runtime.exports import model_entry
    from ..workflows.sweep import SHEET_NAME, parse_grid, run_sweep

    backend = parse_backend(backend)
    grid = parse_grid(scales, etas, baseline, zeta)  # bad values fail here, before anything is written
    request = GenerationConfig(prompt, seed=seed, steps=steps, height=height, width=width, negative_prompt=negative_prompt)
    check_request(model_entry(model, graphs_root), request)
    out_dir = out_dir or Path(f"sweep-{model}-{seed}")
    check_writable(out_dir / SHEET_NAME)
    sampler = _load_sampler(model, backend, graphs_root, engines_root, height, width, no_build, threads)
    total = len(grid.settings())
    with sampler, counted_progress(f"{model} on {backend}: images", total) as advance:
        result = run_sweep(sampler, request, grid, out_dir, on_tile=lambda setting: advance())
    click.echo(f"wrote {total} images and {result.sheet} (rows: {', '.join(result.rows)}; "
               f"columns: {', '.join(result.columns)})")


@cli.command("eval")
@grid_options
@click.option("--prompts", "prompts_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Prompt set: a text file, one prompt per line ('#' starts a comment) [default: the 24 shipped prompts].")
@click.option("--negative-prompt", default="", help="Negative prompt for every image (models with classifier-free guidance).")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i is sampled with seed + i at every setting.")
@click.option("--scorer", type=click.Choice(["clip", "pickscore", "imagereward"]), default="clip", show_default=True,
              help="clip: 100 * max(cos, 0) of CLIP embeddings (torchmetrics' CLIPScore); pickscore; imagereward.")
@click.option("--scorer-model", default=None,
              help="Scorer weights: a Hub id in the local cache or a local folder [default: openai/clip-vit-large-patch14, "
                   "yuvalkirstain/PickScore_v1, ImageReward-v1.0].")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Also write eval.png (needs matplotlib: the [bench] extra).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder: eval.md, eval.json, eval.csv, eval.png [default: eval-<model>-<scorer>].")
def eval_command(model, scales, etas, zeta, baseline, steps, backend, height, width, graphs_root, engines_root,
                 no_build, threads, prompts_path, negative_prompt, seed, scorer, scorer_model, plot, out_dir) -> None:
    """Score every GAG setting of a sweep over a prompt set: a table (Markdown, JSON, CSV) and a plot.

    \b
    Scorer weights come from the local Hugging Face cache only (nothing is downloaded; a missing
    one stops at once, exit 6, naming the download command).
    Examples:
      gag-export eval --model dmd2 --prompts prompts.txt --scale 0,5,10 --eta 15,inf --no-gag --backend tensorrt
      gag-export eval --model tiny-sdxl --prompts prompts.txt --backend torch --scorer-model ./tiny-clip
    """
    from ..core.atomic import check_writable
    from ..core.extras import require_extra
    from ..runtime import GenerationConfig, check_request, parse_backend
    from ..runtime.exports import model_entry
    from ..workflows.evaluate import OUTPUT_NAMES, default_prompts, read_prompts, render_eval_markdown, run_eval, write_outputs
    from ..workflows.scorers import load_scorer
    from ..workflows.sweep import parse_grid

    backend = parse_backend(backend)
    grid = parse_grid(scales, etas, baseline, zeta)  # bad input fails before anything loads or is written
    prompts = read_prompts(prompts_path) if prompts_path is not None else list(default_prompts())
    check_request(model_entry(model, graphs_root),
                  GenerationConfig(prompts[0], seed=seed, steps=steps, height=height, width=width))
    if plot:
        require_extra("bench", "gag-export eval's plot (or pass --no-plot)")
    out_dir = out_dir or Path(f"eval-{model}-{scorer}")
    for name in OUTPUT_NAMES.values():
        check_writable(out_dir / name)
    with console.status(f"loading scorer {scorer}"):  # before the sampler: a scorer not in the cache fails at once
        scoring = load_scorer(scorer, scorer_model)
    sampler = _load_sampler(model, backend, graphs_root, engines_root, height, width, no_build, threads)
    total = len(prompts) * len(grid.settings())
    with sampler, counted_progress(f"{model} on {backend}: images", total) as advance:
        result = run_eval(sampler, scoring, prompts, grid, seed=seed, steps=steps, height=height, width=width,
                          negative_prompt=negative_prompt, on_image=advance)
    click.echo(render_eval_markdown(result))
    for path in write_outputs(result, out_dir, plot=plot):
        click.echo(f"wrote {path}", err=True)
