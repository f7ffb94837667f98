"""Atomic replacement of generated folders: a reader sees the old one or the new one, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def swap_into_place(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` (same file system); a previous `final` is replaced.

    The old folder is first renamed aside, so at no moment is `final` missing a file that the
    new one has or holding a mix of both; it is deleted only once the new one is in place.
    """
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
