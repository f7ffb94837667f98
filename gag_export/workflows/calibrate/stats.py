"""Streaming statistics of GAG's pre-cap update norms, per (layer, step), in fixed memory (numpy only).

A full-size SDXL step at 1024^2 sends 60 layers x 10-20 heads x 4096 tokens of norms through the
observer, and a calibration runs many prompts and steps; keeping them would cost gigabytes. Each
(layer, step) keeps instead:

- exact: count, sum (float64, for the mean), max, and the count above each value of the eta grid
  (so `clipped_share` at the grid is exact, not read off a histogram);
- a histogram on log-spaced bins: BINS_PER_DECADE bins per decade from 10^LOG_LO to 10^LOG_HI,
  one bin below (0 included) and one above. Quantiles are read off it, interpolated geometrically
  inside their bin; the true quantile lies in the same bin, so the relative error is below one
  bin's width, RESOLUTION (10^(1/50) - 1 = 4.7%). The norms of different layers differ by orders of
  magnitude, which is why the bins are log-spaced: the same relative resolution everywhere.

Memory: (602 + grid) int64 per (layer, step): 60 layers x 4 steps, under 1.2 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_LO, LOG_HI, BINS_PER_DECADE = -6, 6, 50
_BINS = (LOG_HI - LOG_LO) * BINS_PER_DECADE
# inner bin edges 10^LOG_LO ... 10^LOG_HI; bin 0 is [0, 10^LOG_LO), bin _BINS + 1 is [10^LOG_HI, max]
EDGES = 10.0 ** np.linspace(LOG_LO, LOG_HI, _BINS + 1)
RESOLUTION = 10.0 ** (1.0 / BINS_PER_DECADE) - 1.0

REPORTED_QUANTILES = (0.5, 0.9, 0.99)

# The default eta grid: a 1-2-5 series over the norms seen in SDXL- and FLUX-family layers (which
# differ by orders of magnitude), plus 15, GAG's default cap.
DEFAULT_ETA_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


def bin_index(norms: np.ndarray) -> np.ndarray:
    """The histogram bin of each norm (>= 0, finite)."""
    with np.errstate(divide="ignore"):  # log10(0) = -inf: the lowest bin
        position = (np.log10(norms) - LOG_LO) * BINS_PER_DECADE
    return np.clip(np.floor(position) + 1, 0, _BINS + 1).astype(np.int64)


def bin_bounds(index: int, maximum: float) -> tuple[float, float]:
    """[low, high] of bin `index`; the top bin ends at the largest norm seen."""
    if index == 0:
        return 0.0, float(EDGES[0])
    if index == _BINS + 1:
        return float(EDGES[-1]), max(float(maximum), float(EDGES[-1]))
    return float(EDGES[index - 1]), float(EDGES[index])


def histogram_quantile(hist: np.ndarray, q: float, maximum: float) -> float:
    """The q-quantile of the norms counted in `hist`, within one bin (RESOLUTION, relative)."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    rank = q * total
    cumulative = np.cumsum(hist)
    index = int(np.searchsorted(cumulative, rank, side="left"))
    index = min(index, len(hist) - 1)
    before = float(cumulative[index - 1]) if index > 0 else 0.0
    fraction = (rank - before) / max(float(hist[index]), 1.0)
    low, high = bin_bounds(index, maximum)
    if low > 0:  # geometric inside the bin, as the bins are
        value = low * (high / low) ** fraction
    else:
        value = low + (high - low) * fraction
    return float(min(value, maximum))


@dataclass
class NormStats:
    """Accumulators of one calibration: [layers, steps] of counts, sums, maxima, histograms, grid counts."""

    layers: int
    steps: int
    eta_grid: tuple[float, ...]

    def __post_init__(self) -> None:
        shape = (self.layers, self.steps)
        self.count = np.zeros(shape, dtype=np.int64)
        self.total = np.zeros(shape, dtype=np.float64)
        self.maximum = np.zeros(shape, dtype=np.float64)
        self.hist = np.zeros((*shape, _BINS + 2), dtype=np.int64)
        self.above = np.zeros((*shape, len(self.eta_grid)), dtype=np.int64)
        self.nonfinite = 0
        self._grid = np.asarray(self.eta_grid, dtype=np.float64)

    def add(self, layer: int, step: int, norms: np.ndarray) -> None:
        """Count one layer call's norms (any shape) at (layer, step); non-finite ones only in `nonfinite`."""
        values = np.asarray(norms, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            values = values[finite]
        if values.size == 0:
            return
        self.count[layer, step] += values.size
        self.total[layer, step] += float(values.sum())
        self.maximum[layer, step] = max(self.maximum[layer, step], float(values.max()))
        self.hist[layer, step] += np.bincount(bin_index(values), minlength=_BINS + 2)
        self.above[layer, step] += _count_above(self._grid, values)

    def quantile(self, layer: int, step: int | None, q: float) -> float:
        """q-quantile at (layer, step), or over every step of the layer when `step` is None."""
        if step is None:
            return histogram_quantile(self.hist[layer].sum(axis=0), q, float(self.maximum[layer].max()))
        return histogram_quantile(self.hist[layer, step], q, float(self.maximum[layer, step]))


def _count_above(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many `values` are strictly above each value of the sorted `grid`."""
    return values.size - np.searchsorted(np.sort(values), grid, side="right")


__all__ = ["BINS_PER_DECADE", "DEFAULT_ETA_GRID", "EDGES", "LOG_HI", "LOG_LO", "NormStats", "REPORTED_QUANTILES",
           "RESOLUTION", "bin_bounds", "bin_index", "histogram_quantile"]
