"""An exported graph checked against its manifest before anything reads it, cheaply when unchanged.

Every reader of a graph (the ONNX Runtime backend, `triton`, `bench`, engine builds) calls
`verify_graph`: the files must exist, have the manifest's size, and hash to its `sha256`; else
`ArtifactError` (exit 5) naming the file, before any output is written.

Hashing a full-size SDXL UNet (5 GB) on every `generate` would cost seconds, so a file that
verified is remembered by what the kernel says of it: device, inode, size, mtime and ctime
(nanoseconds). Any write to the file changes its ctime, which no user call can set back, so an
entry cannot outlive a change to the bytes; the next read hashes again. The record is a small
JSON file in the user's cache folder (`$GAG_EXPORT_CACHE`, else `$XDG_CACHE_HOME/gag-export`,
else `~/.cache/gag-export`); when that cannot be written every read hashes, and nothing fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..core.atomic import write_atomic
from ..core.errors import ArtifactError, GagExportError
from .manifest import Manifest, data_path, sha256_files

log = logging.getLogger(__name__)

VERIFIED_NAME = "verified-graphs.json"
_MAX_ENTRIES = 256  # a few models' graphs; the oldest are dropped beyond that


def cache_dir() -> Path:
    if os.environ.get("GAG_EXPORT_CACHE"):
        return Path(os.environ["GAG_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gag-export"


def _signature(paths: list[Path]) -> list[list[int]]:
    return [[s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns] for s in (p.stat() for p in paths)]


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, value: dict) -> None:
    path = cache_dir() / VERIFIED_NAME
    record = _read_record(path)
    record.pop(key, None)
    record[key] = value
    while len(record) > _MAX_ENTRIES:
        record.pop(next(iter(record)))
    try:
        write_atomic(path, json.dumps(record), make_parents=True)
    except GagExportError as exc:  # a read-only home: verification still happened, it is just not remembered
        log.debug("not remembering a verified graph: %s", exc)


def verify_graph(manifest: Manifest, component: str, hint: str = "re-export the model") -> None:
    """`component`'s graph files are the ones the manifest names: present, its size, its sha256."""
    entry = manifest.components[component]
    path = manifest.graph_path(component)
    files = [path] + ([data_path(path)] if entry.get("external_data") else [])
    for file in files:
        if not file.is_file():
            raise ArtifactError(f"{manifest.model}: {file} is missing (named in its manifest); {hint}")
    size = sum(f.stat().st_size for f in files)
    if entry.get("size_bytes") is not None and size != entry["size_bytes"]:
        raise ArtifactError(f"{manifest.model}: {path} is {size} bytes, its manifest records {entry['size_bytes']} "
                            f"(truncated, or changed after export); {hint}")
    key = str(path.resolve())
    remembered = _read_record(cache_dir() / VERIFIED_NAME).get(key)
    signature = _signature(files)
    if remembered == {"sha256": entry["sha256"], "files": signature}:
        return
    actual = sha256_files(files)
    if actual != entry["sha256"]:
        raise ArtifactError(f"{manifest.model}: {path} does not match its manifest (sha256 {actual[:12]}..., "
                            f"recorded {str(entry['sha256'])[:12]}...): the file is damaged or changed after export; {hint}")
    if _signature(files) == signature:  # unchanged while it was hashed
        _remember(key, {"sha256": entry["sha256"], "files": signature})


def verify_graphs(manifest: Manifest, components=None, hint: str = "re-export the model") -> None:
    for name in components if components is not None else manifest.components:
        verify_graph(manifest, name, hint)


def read_checked_file(graphs_dir: Path, entry, what: str) -> bytes:
    """The bytes of a file a manifest entry names beside a graph (`{"path", "sha256"}`: a parity
    reference, a weight map), checked against its sha256; `ArtifactError` naming `what` otherwise."""
    path = Path(graphs_dir) / entry["path"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{what} {path} is unreadable ({exc}); re-export the model") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ArtifactError(f"{what} {path} does not match its manifest's sha256; re-export the model")
    return data


__all__ = ["VERIFIED_NAME", "cache_dir", "read_checked_file", "verify_graph", "verify_graphs"]
