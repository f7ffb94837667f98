"""PNG output with text metadata, written atomically (temp file in the same folder, then os.replace), and
labelled contact sheets of same-size images (`gag-export sweep`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .core.atomic import atomic_path
from .core.errors import ArtifactError, InvalidInputError


def require_png_path(path: Path) -> Path:
    """Images are PNG files (they carry their prompt, seed and settings as text chunks): a name with
    another suffix would hold PNG bytes under a false name, so it is refused (exit 2)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"{path}: images are written as PNG, with their generation settings; "
                                f"give a .png name (got {path.suffix or 'no suffix'!r})")
    return path


def save_png(image: Image.Image, path: Path, metadata: Mapping[str, str]) -> Path:
    """Write `image` to `path` as PNG with one tEXt/iTXt chunk per metadata key; return the path.

    A reader sees either the previous file or the complete new one, never a partial PNG.
    """
    path = require_png_path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(str(key), str(value))  # iTXt: UTF-8, so any prompt round-trips
    with atomic_path(path, make_parents=True) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_png_metadata(path: Path) -> dict[str, str]:
    """The text chunks of a PNG as a dict (what `save_png` wrote)."""
    try:
        with Image.open(path) as image:
            image.load()
            return dict(image.text)
    except (OSError, SyntaxError) as exc:
        raise ArtifactError(f"cannot read PNG metadata from {path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Contact sheets: a grid of same-size images with their settings written beside them
# --------------------------------------------------------------------------------------------

SHEET_BACKGROUND = (255, 255, 255)
SHEET_INK = (0, 0, 0)


@dataclass(frozen=True)
class SheetLayout:
    """Where a contact sheet puts things: a label column `left` pixels wide, a header `top` pixels
    high (an optional title line above the column labels), then the tiles with `gutter` pixels between them."""

    tile_width: int
    tile_height: int
    left: int
    top: int
    gutter: int

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, upper, right, lower) of a tile, as `Image.crop` takes it."""
        x = self.left + column * (self.tile_width + self.gutter)
        y = self.top + row * (self.tile_height + self.gutter)
        return x, y, x + self.tile_width, y + self.tile_height

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        """(width, height) of a sheet of rows x columns tiles (a gutter after each, so none touches the edge)."""
        return (self.left + columns * (self.tile_width + self.gutter), self.top + rows * (self.tile_height + self.gutter))


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels (Pillow >= 10.1 scales it); the fixed bitmap font before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def contact_sheet(tiles: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str],
                  column_labels: Sequence[str], title: str = "") -> tuple[Image.Image, SheetLayout]:
    """One RGB image of `tiles` (rows of same-size images; None leaves a cell blank) with each row's and
    column's label written beside it and `title` above; returns the sheet and where each tile lies.

    Tiles are pasted unscaled, so each cell holds its image pixel for pixel. The font grows with the
    tiles (a twelfth of the smaller side, 10 to 48 pixels), so labels stay legible at 64 and at 1024 pixels.
    """
    first = next((tile for row in tiles for tile in row if tile is not None), None)
    if first is None or len(row_labels) != len(tiles) or any(len(row) != len(column_labels) for row in tiles):
        raise InvalidInputError(f"contact sheet: {len(tiles)} rows for {len(row_labels)} row labels, rows of "
                                f"{sorted({len(row) for row in tiles})} for {len(column_labels)} column labels, "
                                "and at least one image are needed")
    width, height = first.size
    if any(tile is not None and tile.size != (width, height) for row in tiles for tile in row):
        raise InvalidInputError(f"contact sheet: every tile must be {width}x{height} like the first")
    font = label_font(max(10, min(48, round(min(width, height) / 12))))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3]
    pad = max(4, line_height // 3)
    left = int(max(measure.textlength(label, font=font) for label in row_labels) + 2 * pad + 0.999)
    # the title (model, seed, prompt...) is wrapped, never cut: on 64-pixel tiles it takes several lines
    sheet_width = SheetLayout(width, height, left=left, top=0, gutter=pad).size(len(tiles), len(column_labels))[0]
    title_lines = _wrap(measure, title, font, sheet_width - 2 * pad) if title else []
    layout = SheetLayout(width, height, left=left, top=(line_height + pad) * (len(title_lines) + 1) + pad, gutter=pad)
    sheet = Image.new("RGB", layout.size(len(tiles), len(column_labels)), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, line in enumerate(title_lines):
        draw.text((pad, pad + index * (line_height + pad)), line, font=font, fill=SHEET_INK)
    for column, label in enumerate(column_labels):
        x0, y0, x1, _ = layout.box(0, column)
        draw.text(((x0 + x1) / 2, y0 - pad), _fit(draw, label, font, width), font=font, fill=SHEET_INK, anchor="md")
    for row, (label, images) in enumerate(zip(row_labels, tiles)):
        x0, y0, _, y1 = layout.box(row, 0)
        draw.text((x0 - pad, (y0 + y1) / 2), label, font=font, fill=SHEET_INK, anchor="rm")
        for column, tile in enumerate(images):
            if tile is not None:
                sheet.paste(tile.convert("RGB"), layout.box(row, column)[:2])
    return sheet, layout


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a word wider than a line on its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis where it would be wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
