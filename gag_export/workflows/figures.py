"""matplotlib for the workflows' plots (bench, calibrate, eval): the one place that picks its
backend and writes a figure, atomically. matplotlib is the `[bench]` extra, imported only here
and only when a plot is asked for."""

from __future__ import annotations

from pathlib import Path

from ..core.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed (CI, servers)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, dest: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG to `dest` (temp file, then rename) and close it."""
    with atomic_path(dest, make_parents=True) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return Path(dest)


__all__ = ["pyplot", "save_figure"]
