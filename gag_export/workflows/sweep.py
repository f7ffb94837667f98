"""`gag-export sweep`: one prompt and seed over a grid of GAG scales x etas, as one labelled contact sheet.

    grid = parse_grid("0,5,10,15", "5,15,inf", baseline=True)
    with Sampler.load("tiny-sdxl", "ort", graphs=Path("graphs")) as sampler:
        result = run_sweep(sampler, GenerationConfig("a red fox", seed=1), grid, Path("sweep"))
    result.sheet    # sweep/sheet.png: rows = scale, columns = eta, values written on it

The guidance values are the denoiser's per-call inputs (graph inputs on ONNX Runtime and TensorRT,
bound values on torch), so one loaded pipeline serves the whole grid; every tile starts from the
same seed, so the tiles differ by guidance alone. Each tile is also written on its own
(`scale-10_eta-inf.png`) with the PNG metadata `generate` writes; the sheet is written last, so a
sheet already there is replaced only by a complete new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import InvalidInputError
from ..images import SheetLayout, contact_sheet, save_png
from ..runtime import GAGParams, GenerationConfig, GenerationResult, Sampler

SHEET_NAME = "sheet.png"
BASELINE_NAME = "no-gag.png"
GAG_KEYS = ("gag", "gag_scale", "gag_eta", "gag_zeta")  # a tile's PNG metadata of its one setting


def format_value(value: float) -> str:
    """10.0 -> "10", 2.5 -> "2.5", inf -> "inf": how values are written on sheets, tables and file names."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


@dataclass(frozen=True)
class GridSetting:
    """One cell of a sweep: a GAG scale and eta, or the unguided baseline (both None)."""

    scale: float | None
    eta: float | None

    @property
    def is_baseline(self) -> bool:
        return self.scale is None

    @property
    def label(self) -> str:
        return "GAG off" if self.is_baseline else f"scale {format_value(self.scale)}, eta {format_value(self.eta)}"

    @property
    def file_name(self) -> str:
        if self.is_baseline:
            return BASELINE_NAME
        return f"scale-{format_value(self.scale)}_eta-{format_value(self.eta)}.png"


@dataclass(frozen=True)
class SweepGrid:
    """The values swept: every scale with every eta (rows x columns), and the GAG-off baseline when asked."""

    scales: tuple[float, ...]
    etas: tuple[float, ...]
    baseline: bool = False
    zeta: float | None = None  # None: the export's default

    def settings(self) -> list[GridSetting]:
        """Every cell, the baseline first, then row by row (scale), column by column (eta)."""
        cells = [GridSetting(scale, eta) for scale in self.scales for eta in self.etas]
        return [GridSetting(None, None), *cells] if self.baseline else cells


def parse_values(text: str, option: str) -> tuple[float, ...]:
    """"0,5,10" -> (0.0, 5.0, 10.0); "inf" is accepted. InvalidInputError naming `option` otherwise."""
    values = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            value = float(part)
        except ValueError:
            raise InvalidInputError(f"{option}: {part!r} is not a number (give comma-separated values, "
                                    "e.g. 0,5,10 or 5,15,inf)") from None
        if value in values:
            raise InvalidInputError(f"{option}: {part} is given twice")
        values.append(value)
    return tuple(values)


def parse_grid(scales: str, etas: str, baseline: bool = False, zeta: float | None = None) -> SweepGrid:
    """A grid from the CLI's comma-separated values, each checked by GAG's own rules (core/gag_config.py:
    scale within SCALE_LIMITS, eta > 0 or inf, zeta within [0, MAX_ZETA]) before anything runs."""
    grid = SweepGrid(parse_values(scales, "--scale"), parse_values(etas, "--eta"), baseline, zeta)
    for option, name, values in (("--scale", "scale", grid.scales), ("--eta", "eta", grid.etas),
                                 ("--zeta", "zeta", () if zeta is None else (zeta,))):
        for value in values:
            try:
                GAGParams(**{name: value})
            except InvalidInputError as exc:
                raise InvalidInputError(f"{option} {format_value(value)}: {exc}") from None
    return grid


def require_gag_inputs(sampler: Sampler) -> None:
    """A sweep feeds guidance values per call: an export made with --no-gag has nowhere to feed them."""
    if not sampler.components.has_gag_inputs:
        where = sampler.components.manifest.graphs_dir if sampler.components.manifest is not None else sampler.entry.name
        raise InvalidInputError(f"{where} was exported without GAG (--no-gag), so guidance cannot be swept: "
                                f"export it with GAG (`gag-export export --model {sampler.entry.name}`)")


def generate_grid(sampler: Sampler, request: GenerationConfig, grid: SweepGrid) -> Iterator[tuple[GridSetting, GenerationResult]]:
    """Each setting of `grid` with the image `request` gives under it (same seed, prompt and size)."""
    require_gag_inputs(sampler)
    for setting in grid.settings():
        gag = None if setting.is_baseline else sampler.gag_params(setting.scale, setting.eta, grid.zeta)
        yield setting, sampler.generate(replace(request, gag=gag))


@dataclass(frozen=True)
class SweepResult:
    sheet: Path
    layout: SheetLayout
    tiles: dict[GridSetting, Path]  # each setting's own PNG
    rows: tuple[str, ...]           # the sheet's row labels, top to bottom
    columns: tuple[str, ...]        # its column labels, left to right


def run_sweep(sampler: Sampler, request: GenerationConfig, grid: SweepGrid, out_dir: Path,
              on_tile: Callable[[GridSetting], None] | None = None) -> SweepResult:
    """Generate every setting of `grid` into `out_dir` (one PNG each), then the contact sheet `out_dir/sheet.png`.

    Rows are scales and columns etas; the baseline, when asked, is a row of its own on top ("GAG off",
    first column). `on_tile` is called after each image is written (a progress bar).
    """
    out_dir = Path(out_dir)
    images, tiles, first = {}, {}, None
    for setting, result in generate_grid(sampler, request, grid):
        tiles[setting] = result.save(out_dir / setting.file_name)
        images[setting] = result.image
        first = first or result
        if on_tile is not None:
            on_tile(setting)
    rows = [f"scale {format_value(s)}" for s in grid.scales]
    columns = [f"eta {format_value(e)}" for e in grid.etas]
    cells = [[images[GridSetting(s, e)] for e in grid.etas] for s in grid.scales]
    if grid.baseline:
        rows.insert(0, "GAG off")
        cells.insert(0, [images[GridSetting(None, None)]] + [None] * (len(columns) - 1))
    zeta = "" if grid.zeta is None else f", zeta {format_value(grid.zeta)}"
    title = f"{first.model} ({first.backend}), seed {request.seed}, {first.steps} steps{zeta}: {request.prompt}"
    sheet, layout = contact_sheet(cells, rows, columns, title=title)
    # the generation's own metadata (prompt, seed, steps, model...) less its one GAG setting
    metadata = {key: value for key, value in first.metadata.items() if key not in GAG_KEYS}
    metadata.update({
        "gag": "sweep",
        "sweep_rows": "gag_scale", "sweep_columns": "gag_eta",
        "sweep_scales": json.dumps([format_value(s) for s in grid.scales]),
        "sweep_etas": json.dumps([format_value(e) for e in grid.etas]),
        "sweep_baseline": "yes" if grid.baseline else "no",
        "sweep_zeta": "" if grid.zeta is None else repr(float(grid.zeta)),
        "sweep_tiles": json.dumps([setting.file_name for setting in tiles]),
        # where each tile lies (SheetLayout's fields: the title wraps, so the header height varies)
        "sweep_layout": json.dumps(dataclasses.asdict(layout)),
    })
    path = save_png(sheet, out_dir / SHEET_NAME, metadata)
    return SweepResult(path, layout, tiles, tuple(rows), tuple(columns))


__all__ = ["BASELINE_NAME", "SHEET_NAME", "GridSetting", "SweepGrid", "SweepResult", "format_value", "generate_grid",
           "parse_grid", "parse_values", "require_gag_inputs", "run_sweep"]
