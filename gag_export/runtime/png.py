"""PNG output with text metadata, written atomically (temp file in the same folder, then os.replace)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Mapping

from PIL import Image, PngImagePlugin

from ..core.atomic import as_if_created_plainly
from ..core.errors import ArtifactError, ResourceExhaustedError


def save_png(image: Image.Image, path: Path, metadata: Mapping[str, str]) -> Path:
    """Write `image` to `path` as PNG with one tEXt/iTXt chunk per metadata key; return the path.

    A reader sees either the previous file or the complete new one, never a partial PNG.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(str(key), str(value))  # iTXt: UTF-8, so any prompt round-trips
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        as_if_created_plainly(Path(tmp))
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOSPC:
                raise ResourceExhaustedError(f"out of disk space while writing {path}; nothing was left behind") from None
            raise ArtifactError(f"cannot write {path}: {exc}") from None
        raise
    return path


def read_png_metadata(path: Path) -> dict[str, str]:
    """The text chunks of a PNG as a dict (what `save_png` wrote)."""
    try:
        with Image.open(path) as image:
            image.load()
            return dict(image.text)
    except (OSError, SyntaxError) as exc:
        raise ArtifactError(f"cannot read PNG metadata from {path}: {exc}") from None
