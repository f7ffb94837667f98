"""Plots of a calibration (matplotlib, the `[bench]` extra): norm histograms per layer, clipped share against eta."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..figures import pyplot, save_figure
from .run import Calibration
from .stats import EDGES


def plot_paths(json_path: Path) -> tuple[Path, Path]:
    """Where the plots of `cal.json` go: `cal-norms.png` and `cal-clipped.png` beside it."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("") if json_path.suffix else json_path
    return Path(f"{stem}-norms.png"), Path(f"{stem}-clipped.png")


def write_plots(cal: Calibration, data: dict, json_path: Path) -> tuple[Path, Path]:
    """Both PNGs for the calibration `cal` whose document is `data` (its recommendations marked)."""
    plt = pyplot()

    norms_path, clipped_path = plot_paths(json_path)
    stats, names = cal.stats, cal.layer_names
    title = (f"{data['model']}: {data['prompts']} prompts x {data['steps']} steps, GAG scale {data['gag']['scale']:g}, "
             f"clip share {data['rule']['clip_share']:g}")

    cols = min(6, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows + 0.6), squeeze=False)
    lower = np.concatenate([[EDGES[0] / 10], EDGES])  # bin 0 drawn from a decade below the first edge
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        hist = stats.hist[i].sum(axis=0)
        top = max(float(stats.maximum[i].max()), float(EDGES[-1]) * 1.01)
        upper = np.concatenate([EDGES, [top]])
        used = np.nonzero(hist)[0]
        span = slice(used[0], used[-1] + 1)
        ax.bar(lower[span], hist[span] / hist.sum(), width=upper[span] - lower[span], align="edge", color="#7570b3")
        ax.axvline(data["layers"][i]["recommended_eta"], color="#d95f02", lw=1.2)
        ax.set_xscale("log")
        ax.set_title(_short(names[i]), fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"pre-cap update norm per head and token (orange: recommended eta)\n{title}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, norms_path, dpi=90)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    grid = np.asarray(data["eta_grid"])
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, len(names)))
    for i, name in enumerate(names):
        share = stats.above[i].sum(axis=0) / stats.count[i].sum()
        ax.plot(grid, share, color=colors[i], lw=1, label=_short(name) if len(names) <= 12 else None)
    ax.axhline(data["rule"]["clip_share"], color="#d95f02", ls="--", lw=1, label="clip share")
    ax.set_xscale("log")
    ax.set_xlabel("eta")
    ax.set_ylabel("share of tokens capped")
    ax.set_title(f"clipped share against eta, one line per layer (dark: first)\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, clipped_path, dpi=90)
    return norms_path, clipped_path


def _short(name: str) -> str:
    """A layer name short enough for a small panel: down_blocks.1.attentions.0.transformer_blocks.1.attn2 -> d1.a0.t1"""
    words = {"down_blocks": "d", "up_blocks": "u", "mid_block": "m", "attentions": "a", "transformer_blocks": "t",
             "single_transformer_blocks": "s"}
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        if parts[i] in words and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(words[parts[i]] + parts[i + 1])
            i += 2
        elif parts[i] in ("attn", "attn2"):
            i += 1
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out) or name


__all__ = ["plot_paths", "write_plots"]
