"""Atomic replacement of generated folders: a reader sees the old one or the new one, never half."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactError, GagExportError, ResourceExhaustedError


def write_failure(exc: OSError, dest: Path) -> GagExportError:
    """An OSError met while writing the artifact `dest`, as the error the CLI documents: out of
    disk space (or quota) exit 7, anything else (a folder that is a file, no permission) exit 5."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(f"out of disk space writing {dest}; nothing half-written was left")
    return ArtifactError(f"cannot write {dest}: {exc}")


def umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def as_if_created_plainly(path: Path) -> Path:
    """Give a `tempfile.mkstemp`/`mkdtemp` result the mode `open()`/`mkdir()` would have given it.

    Those make 0600 files and 0700 folders whatever the umask, and an artifact renamed into
    place keeps its temp file's mode: exported graphs, images and engines would be readable by
    their owner alone (a serving account or a teammate could not read them).
    """
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())
    return Path(path)


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
