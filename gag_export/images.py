"""PNG output with text metadata, written atomically (temp file in the same folder, then os.replace)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from PIL import Image, PngImagePlugin

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
