"""Start, watch and stop a Triton Inference Server on a generated repository.

    with TritonServer(ServerConfig(Path("triton/tiny-sdxl"), http_port=0)) as server:   # 0: a free port
        server.urls.http                                                                  # "127.0.0.1:41233"

Which server: `ServerConfig.tritonserver`, else a `tritonserver` on `PATH` (or the official
container's `/opt/tritonserver/bin/tritonserver`), else the one bundled in the `nvidia-pytriton`
wheel, found in the serving environment (`environment.py`) or in this interpreter.

The bundled server needs what `pytriton` itself arranges (facts measured with nvidia-pytriton
0.7.0 / Triton 2.51): its shared libraries (`nvidia_pytriton.libs`) on `LD_LIBRARY_PATH`; a
backends folder holding the Python backend plus the stub built for the serving Python's version
(copied into a temp workspace per run); the serving interpreter's `bin/` first on `PATH` (the stub
embeds the first `python` it finds there) and its `libpythonX.Y.so` folder on `LD_LIBRARY_PATH`
(else the stub may load another Python's library, e.g. a system `/lib/.../libpython3.11.so`).
The embedded Python ignores `PYTHONPATH`: the generated `model.py` files put the folder named by
`GAG_EXPORT_PYTHONPATH` (a link to the running `gag_export`) first on `sys.path` instead.

Every server gets its own shared-memory prefix (`--backend-config=python,shm-region-prefix-name=`)
so `stop()` can remove the Python backend's `/dev/shm` regions if a crash left them; the temp
workspace is removed too. The server runs in its own process group: `stop()` sends SIGINT (Triton
unloads the models and exits), waits, then kills the group. Servers bind to 127.0.0.1 unless told.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from ..core.errors import (
    ArtifactError,
    GagExportError,
    InvalidInputError,
    MissingDependencyError,
)
from .environment import SETUP_HINT, PythonEnvironment, default_env_path, describe

log = logging.getLogger(__name__)

CONTAINER_SERVER = Path("/opt/tritonserver/bin/tritonserver")
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "gagexport"
PYTHONPATH_VARIABLE = "GAG_EXPORT_PYTHONPATH"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerConfig:
    """How to run the server. Ports 0 mean "pick a free one"."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    tritonserver: Path | None = None  # the binary (default: see the module docstring)
    environment: Path | None = None  # the Python for the Python backend (a venv folder or an interpreter)
    ready_timeout: float = 600.0
    stop_timeout: float = 60.0
    log_verbose: int = 0

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise InvalidInputError(f"{name}: a TCP port 0..65535 (0: a free one), got {port!r}")
        if not self.host:
            raise InvalidInputError("host: give an address to bind, e.g. 127.0.0.1")


@dataclass(frozen=True)
class ServerUrls:
    http: str  # host:port (what tritonclient takes)
    grpc: str
    metrics: str


@dataclass(frozen=True)
class Launch:
    """Everything resolved before the process starts: the binary and the Python environment."""

    binary: Path
    bundled: bool  # the nvidia-pytriton wheel's server (needs a backends folder and library path)
    environment: PythonEnvironment | None


def _python_of(path: Path) -> Path:
    path = Path(path).expanduser()
    return path / "bin" / "python" if path.is_dir() else path


def resolve_launch(config: ServerConfig) -> Launch:
    """Which binary and which Python environment this config runs with (MissingDependencyError with the fix)."""
    env = None
    if config.environment is not None:
        env = describe(_python_of(config.environment))
    elif (default_env_path() / "bin" / "python").exists():
        env = describe(default_env_path() / "bin" / "python")

    if config.tritonserver is not None:
        binary = Path(config.tritonserver).expanduser()
        if not binary.is_file():
            raise MissingDependencyError(f"--tritonserver {binary} does not exist")
        return Launch(binary, _is_bundled(binary), env)
    system = shutil.which("tritonserver") or (str(CONTAINER_SERVER) if CONTAINER_SERVER.is_file() else None)
    if system:
        return Launch(Path(system), _is_bundled(Path(system)), env)
    for candidate in ([env] if env is not None else []) + [describe(Path(sys.executable))]:
        if candidate.tritonserver is not None:
            if not candidate.numpy_ok:
                raise MissingDependencyError(
                    f"{candidate.python} has the bundled Triton server but imports numpy {candidate.numpy}; its Python "
                    f"backend needs numpy < 2: create the serving environment with `{SETUP_HINT}`")
            return Launch(candidate.tritonserver, True, candidate)
    raise MissingDependencyError(
        "no Triton server found: no `tritonserver` on PATH (the official container has one) and no nvidia-pytriton "
        f"in {default_env_path()}; create it with `{SETUP_HINT}` (or `pip install 'gag-export[serve]'` in an "
        "environment with numpy < 2)")


def _is_bundled(binary: Path) -> bool:
    return binary.parent.parent.name == "tritonserver" and binary.parent.parent.parent.name == "pytriton"


PLATFORM_BACKENDS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}


def required_backends(repository: Path) -> dict[str, str]:
    """{model: backend} for every model of a repository that needs a backend (ensembles need none)."""
    needed = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        text = config.read_text()
        backend = re.search(r'^backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^platform:\s*"([^"]+)"', text, re.M)
        if backend:
            needed[config.parent.name] = backend.group(1)
        elif platform and platform.group(1) != "ensemble":
            needed[config.parent.name] = PLATFORM_BACKENDS.get(platform.group(1), platform.group(1))
    return needed


def check_backends(repository: Path, backends_dir: Path) -> None:
    """MissingDependencyError when the server lacks a backend the repository's models need."""
    available = {p.name for p in Path(backends_dir).iterdir() if p.is_dir()} if Path(backends_dir).is_dir() else set()
    missing = {model: backend for model, backend in required_backends(repository).items() if backend not in available}
    if missing:
        listed = ", ".join(f"{model} ({backend})" for model, backend in missing.items())
        raise MissingDependencyError(
            f"this Triton server has the {', '.join(sorted(available)) or 'no'} backend(s), but {listed} need others: "
            "the server bundled in nvidia-pytriton runs Python models only; serve this repository in the official "
            "container (nvcr.io/nvidia/tritonserver), or regenerate it with `gag-export triton ... --cpu-standin`")


def _pythonpath_dir(workspace: Path) -> Path:
    """A folder holding only a link to the running `gag_export` package, for the server's PYTHONPATH."""
    package = Path(__file__).resolve().parents[1]
    folder = workspace / "pythonpath"
    folder.mkdir()
    (folder / package.name).symlink_to(package, target_is_directory=True)
    return folder


def _prepare_backends(launch: Launch, workspace: Path) -> Path:
    """The bundled server's backends folder: the Python backend plus the stub for the serving Python."""
    dist = launch.binary.parent.parent
    env = launch.environment
    stub = dist / "python_backend_stubs" / env.version / "triton_python_backend_stub"
    if not stub.is_file():
        built = sorted(p.name for p in (dist / "python_backend_stubs").iterdir()) if (dist / "python_backend_stubs").is_dir() else []
        raise MissingDependencyError(f"the bundled Triton server has no Python backend stub for Python {env.version} "
                                     f"(it has {built}); use a serving environment with one of those")
    target = workspace / "backends"
    shutil.copytree(dist / "backends", target)
    shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
    return target


def server_environment(launch: Launch, workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stub's embedded Python ignores PYTHONPATH; the generated model.py files read this instead.
    env[PYTHONPATH_VARIABLE] = str(_pythonpath_dir(workspace))
    libs = []
    if launch.environment is not None:
        env["PATH"] = os.pathsep.join([str(launch.environment.bin_dir), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        if launch.environment.libdir is not None:
            libs.append(str(launch.environment.libdir))
    if launch.bundled:
        libs.append(str(launch.binary.parent.parent.parent.parent / "nvidia_pytriton.libs"))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")  # each model sets its own thread counts; no spin-waiting pools
    return env


class TritonServer:
    """One `tritonserver` process: `start()` (waits until ready), `stop()`, or use it as a context manager."""

    def __init__(self, config: ServerConfig, log_file: IO[str] | None = None):
        self.config = config
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.shm_prefix = f"{SHM_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.urls: ServerUrls | None = None
        self.launch: Launch | None = None
        self._log_tail: list[str] = []
        self._reader: threading.Thread | None = None

    # -- lifecycle
    def command(self, backends: Path | None) -> list[str]:
        c = self.config
        args = [
            str(self.launch.binary), f"--model-repository={Path(c.repository).resolve()}",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
            f"--log-verbose={c.log_verbose}", "--allow-gpu-metrics=false",
        ]
        if backends is not None:
            args.append(f"--backend-directory={backends}")
        return args

    def start(self) -> "TritonServer":
        repository = Path(self.config.repository)
        if not (repository / "pipeline" / "config.pbtxt").is_file():
            raise ArtifactError(f"{repository} is not a gag-export Triton repository (no pipeline/config.pbtxt): "
                                "generate it with `gag-export triton graphs/<model> --out <repository>`")
        self.launch = resolve_launch(self.config)
        c = self.config
        ports = {name: getattr(c, name) or free_port(c.host if c.host != "0.0.0.0" else "127.0.0.1")
                 for name in ("http_port", "grpc_port", "metrics_port")}
        self.config = replace(c, **ports)
        self.urls = ServerUrls(*(f"{_client_host(c.host)}:{ports[name]}" for name in ("http_port", "grpc_port", "metrics_port")))
        self.workspace = Path(tempfile.mkdtemp(prefix="gag-export-triton-"))
        try:
            backends = _prepare_backends(self.launch, self.workspace) if self.launch.bundled else None
            if backends is not None:
                check_backends(repository, backends)
            env = server_environment(self.launch, self.workspace)
            command = self.command(backends)
            log.info("starting %s", " ".join(command))
            # cwd: the stub puts '' (the working folder) on sys.path, where a `triton/` repository folder
            # would shadow the `triton` package torch imports; the workspace's link folder holds only gag_export.
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, errors="replace", start_new_session=True,
                                            cwd=env[PYTHONPATH_VARIABLE])
            self._reader = threading.Thread(target=self._pump, name="tritonserver-log", daemon=True)
            self._reader.start()
            self.wait_ready(self.config.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._log_tail = (self._log_tail + [line.rstrip()])[-60:]
            if self.log_file is not None:
                self.log_file.write(line)
                self.log_file.flush()

    @property
    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.urls.http}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise GagExportError(f"tritonserver exited with code {self.process.returncode} before it was ready; "
                                     f"its last lines:\n{self.log_tail}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise GagExportError(f"tritonserver was not ready after {timeout:.0f} s; its last lines:\n{self.log_tail}")

    def stop(self) -> int | None:
        """Stop the server (SIGINT, then SIGKILL to its process group), remove its shm regions and workspace."""
        code = None
        try:
            if self.process is not None:
                code = self._terminate()
        finally:
            self.remove_shared_memory()
            if self.workspace is not None:
                shutil.rmtree(self.workspace, ignore_errors=True)
                self.workspace = None
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (its exit code), or `timeout` seconds pass (None)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _terminate(self) -> int:
        process = self.process
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=self.config.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop within %.0f s; killing it", self.config.stop_timeout)
        finally:  # also on a second Ctrl-C while waiting
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # stubs left behind by a crash share the group
        code = process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def shared_memory_regions(self) -> list[Path]:
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def remove_shared_memory(self) -> None:
        for region in self.shared_memory_regions():
            with contextlib.suppress(OSError):
                region.unlink()
                log.info("removed leftover shared memory %s", region)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def interrupt_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while inside (so `serve` stops its
    server cleanly also when a shell started it with SIGINT ignored, or a supervisor sends SIGTERM)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
