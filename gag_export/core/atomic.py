"""Writing artifacts: a reader sees the old one or the new one, never half (one helper for every artifact)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

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


def temp_beside(dest: Path) -> Path:
    """A new empty temp file in `dest`'s folder (same file system: `os.replace` is atomic), with
    the mode `open()` would have given it."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return as_if_created_plainly(Path(name))


@contextlib.contextmanager
def atomic_path(dest: Path, make_parents: bool = False) -> Iterator[Path]:
    """A temp file beside `dest`, renamed onto it when the block succeeds and removed otherwise.

    A path that cannot be written (its folder is a file, no permission, a read-only or full disk),
    there or inside the block, is `write_failure`'s ArtifactError or ResourceExhaustedError naming
    `dest`, not an internal error.
    """
    dest = Path(dest)
    try:
        if make_parents:
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(dest)
    except OSError as exc:
        raise write_failure(exc, dest) from exc
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        raise write_failure(exc, dest) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, data: bytes | str, make_parents: bool = False) -> None:
    """Write `data` to `dest` through a temp file renamed into place (`atomic_path`)."""
    with atomic_path(dest, make_parents) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def check_writable(dest: Path) -> None:
    """Fail now, not after a long run, when `dest` cannot be written (its folder is created)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(dest))
        temp_beside(dest).unlink()
    except OSError as exc:
        raise write_failure(exc, dest) from exc


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def make_temp_folder(parent: Path, stem: str) -> Path:
    """A new temp folder `.<stem>.<host>-<pid>.<random>.tmp` in `parent`, mode as `mkdir` gives.

    Host and pid let a later run tell a folder left by a killed process (SIGKILL, power loss) from
    one a live run is filling (`remove_stale_temp_folders`).
    """
    prefix = f".{stem}.{_host()}-{os.getpid()}."
    return as_if_created_plainly(Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_folders(parent: Path, stem: str) -> tuple[list[Path], list[Path]]:
    """Remove the temp folders `make_temp_folder` made in `parent` for `stem` whose process, on this
    host, is gone; return (removed, unknown): `unknown` are temp folders of another host or of an
    older naming, which are reported, never removed (their writer may be alive elsewhere)."""
    removed, unknown = [], []
    pattern = re.compile(rf"\.{re.escape(stem)}\.(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.)?[^./]+\.tmp")
    for folder in sorted(Path(parent).glob(".*.tmp")):
        match = pattern.fullmatch(folder.name)
        if match is None or not folder.is_dir():
            continue
        if match["pid"] is None or match["host"] != _host():
            unknown.append(folder)
        elif int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed, unknown


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` at `dst` (no second copy of a 10 GB graph; nothing ever writes an artifact in
    place), or copy it where links are impossible (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["as_if_created_plainly", "atomic_path", "check_writable", "link_or_copy", "make_temp_folder",
           "remove_stale_temp_folders", "swap_into_place", "temp_beside", "umask", "write_atomic", "write_failure"]

