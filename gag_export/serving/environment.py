"""The Python environment that a Triton server's Python models (sampler, stand-ins) run in.

Triton's Python backend starts one stub process per model instance; the stub embeds the Python
of the interpreter it finds first on `PATH` and links `libpythonX.Y.so` (`LD_LIBRARY_PATH`). That
Python must import this package and its dependencies with numpy < 2: the stub's numpy bindings
(Triton 2.51, the server in the `nvidia-pytriton` 0.7.0 wheel) do not load numpy 2. A development
environment with numpy 2 therefore gets a dedicated virtual environment:

    gag-export serve --setup          # ~/.cache/gag-export/triton-venv (GAG_EXPORT_TRITON_ENV)

It holds `nvidia-pytriton` (the `tritonserver` binary, Python backend and stubs), `numpy<2`, and
this package's dependencies pinned to the versions installed here (torch, onnxruntime, diffusers,
transformers, ...), so the server computes what the local runtime computes. This package itself is
not installed there: `server.py` puts the running copy of `gag_export` on the server's `PYTHONPATH`,
so a checkout and its server never disagree. The environment is built in a temp folder and renamed
into place (a lock file serializes concurrent builders) and rebuilt when its recorded requirements
differ from today's (`gag-export-env.json`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..core.atomic import as_if_created_plainly, swap_into_place
from ..core.errors import GagExportError, MissingDependencyError

log = logging.getLogger(__name__)

ENV_VARIABLE = "GAG_EXPORT_TRITON_ENV"
DEFAULT_ENV = Path("~/.cache/gag-export/triton-venv")
PYTRITON = "nvidia-pytriton==0.7.0"
NUMPY = "numpy<2"
RECORD = "gag-export-env.json"
RECORD_FORMAT = 1
SETUP_HINT = "gag-export serve --setup"


def default_env_path() -> Path:
    return Path(os.environ.get(ENV_VARIABLE) or DEFAULT_ENV).expanduser()


@dataclass(frozen=True)
class PythonEnvironment:
    """An interpreter for the Python backend: where it lives and what the stub needs to know."""

    python: Path  # the interpreter (bin/python of a venv, or sys.executable)
    version: str  # "3.11"
    libdir: Path | None  # folder holding libpythonX.Y.so (None: not a shared-library build)
    numpy: str | None  # numpy version it imports, None if none
    pytriton: Path | None  # the installed `pytriton` package folder, if any

    @property
    def bin_dir(self) -> Path:
        return self.python.parent

    @property
    def tritonserver(self) -> Path | None:
        if self.pytriton is None:
            return None
        binary = self.pytriton / "tritonserver" / "bin" / "tritonserver"
        return binary if binary.is_file() else None

    @property
    def numpy_ok(self) -> bool:
        return self.numpy is not None and int(self.numpy.split(".")[0]) < 2


_PROBE = r"""
import importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
try:
    import numpy
    numpy_version = numpy.__version__
except Exception:
    numpy_version = None
print(json.dumps({
    "version": "%d.%d" % sys.version_info[:2],
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "numpy": numpy_version,
    "pytriton": list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None,
}))
"""


def describe(python: Path) -> PythonEnvironment:
    """Ask `python` about itself (version, libpython folder, numpy, pytriton)."""
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True).stdout
        data = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise MissingDependencyError(f"cannot run {python} to describe it ({exc}); rebuild it with `{SETUP_HINT}`") from None
    libdir = Path(data["libdir"]) if data["shared"] and data["libdir"] else None
    return PythonEnvironment(Path(python), data["version"], libdir, data["numpy"],
                             Path(data["pytriton"]) if data["pytriton"] else None)


def _base_requirement(requirement: str) -> str | None:
    """A dependency of gag-export pinned to the version installed here (None for extras-only ones)."""
    from packaging.requirements import Requirement  # noqa: PLC0415

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    if req.name.lower() == "numpy":
        return NUMPY
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return str(req)
    return f"{req.name}=={installed.split('+')[0]}"  # a local label (+cpu) is matched by ==X.Y.Z


def requirements() -> list[str]:
    """What the serving environment installs: pytriton, numpy<2, this package's pinned dependencies."""
    try:
        declared = importlib.metadata.requires("gag-export") or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError("gag-export is not installed (`pip install -e .`), so its dependencies are "
                                     "unknown") from None
    pinned = [r for r in (_base_requirement(item) for item in declared) if r]
    return sorted({PYTRITON, NUMPY, *pinned})


def _record(reqs: list[str]) -> dict:
    return {"format": RECORD_FORMAT, "python": "%d.%d" % sys.version_info[:2], "requirements": reqs}


def _matches(path: Path, record: dict) -> bool:
    try:
        return json.loads((path / RECORD).read_text()) == record and (path / "bin" / "python").exists()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip(python: Path, args: list[str], on_line: Callable[[str], None]) -> None:
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    on_line("pip install " + " ".join(args))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip()
        if line and not line.startswith("WARNING: Location"):
            tail = (tail + [line])[-15:]
            log.debug("%s", line)
    if process.wait() != 0:
        raise MissingDependencyError("installing the serving environment failed (pip exit code "
                                     f"{process.returncode}):\n" + "\n".join(tail))


def ensure_environment(path: Path | None = None, *, rebuild: bool = False,
                       on_step: Callable[[str], None] | None = None) -> PythonEnvironment:
    """The serving virtual environment at `path` (default `default_env_path()`), built if missing or stale."""
    path = Path(path or default_env_path()).expanduser()
    notify = on_step or (lambda message: log.info("%s", message))
    reqs = requirements()
    record = _record(reqs)
    with _locked(path):
        if not rebuild and _matches(path, record):
            return describe(path / "bin" / "python")
        start = time.perf_counter()
        tmp = as_if_created_plainly(Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)))
        try:
            notify(f"creating the serving environment in {path} (Python {record['python']}, {NUMPY}, {PYTRITON})")
            venv.EnvBuilder(with_pip=True, symlinks=True).create(tmp)
            _pip(tmp / "bin" / "python", reqs, notify)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        notify(f"serving environment ready in {time.perf_counter() - start:.0f} s")
    env = describe(path / "bin" / "python")
    if not env.numpy_ok:
        raise GagExportError(f"{path} imports numpy {env.numpy}, the Triton Python backend needs numpy < 2")
    return env
