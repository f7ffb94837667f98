"""`gag-export doctor`: what this machine can run, and the exact step to get what it cannot.

Sits beside `workflows/`: it asks `core.tensorrt` for the TensorRT capabilities and `core.gpu` for the
GPU, and otherwise only looks at which packages import and at their versions. It imports nothing but
`core`, loads no model and touches no artifact.

    report = diagnose()            # probe_environment() + assess_backends()
    report.to_dict()               # for --json
    render(report)                 # rich tables for the terminal
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
import sys
from dataclasses import dataclass

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from .core.errors import GagExportError
from .core.extras import ORT_GPU_INSTALL
from .core.gpu import GpuInfo, detect_gpu
from .core.tensorrt import TENSORRT_INSTALL, TENSORRT_RTX, TensorRTCapabilities

TRITON_INSTALL = 'pip install "gag-export[gpu]"'
NEEDS_GPU = "needs an NVIDIA GPU with CUDA (none is visible here)"
ON_A_GPU = "run on a machine with an NVIDIA GPU and its CUDA driver"
ORT_MIN_FOR_TRT11 = (1, 27)  # ONNX Runtime's TensorRT EP supports TensorRT 11 from 1.27 on
PACKAGES = ("diffusers", "transformers", "onnx", "onnxscript", "onnxslim", "nvidia-ml-py", "nvidia-modelopt")


@dataclass(frozen=True)
class Environment:
    """What the probes found. Plain values, so `assess_backends` is testable on any machine."""

    python: str
    platform: str
    torch: str | None = None
    torch_cuda: str | None = None  # the CUDA version torch was built with (None: a CPU build)
    torch_sees_gpu: bool = False  # torch.cuda.is_available(): a CUDA build with a driver it can use
    torch_error: str | None = None
    gpu: GpuInfo | None = None
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    tensorrt_rtx: str | None = None
    tensorrt_rtx_error: str | None = None
    tensorrt_rtx_targets: tuple[tuple[int, int], ...] = ()  # what its AOT builder offers
    polygraphy: str | None = None
    onnxruntime: str | None = None
    ort_providers: tuple[str, ...] = ()
    onnxruntime_error: str | None = None
    triton: str | None = None
    triton_error: str | None = None
    packages: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Backend:
    name: str
    usable: bool
    detail: str
    install: str | None = None  # the step that makes it usable (None when it is)


@dataclass(frozen=True)
class DoctorReport:
    environment: Environment
    backends: tuple[Backend, ...]

    def to_dict(self) -> dict:
        env = dataclasses.asdict(self.environment)
        gpu = self.environment.gpu
        env["gpu"] = (
            None
            if gpu is None
            else {"name": gpu.name, "sm": f"sm{gpu.sm[0]}{gpu.sm[1]}", "compute_capability": list(gpu.sm),
                  "memory_bytes": gpu.memory_bytes}
        )
        env["ort_providers"] = list(self.environment.ort_providers)
        env["tensorrt_rtx_targets"] = [f"sm{a}{b}" for a, b in self.environment.tensorrt_rtx_targets]
        env["packages"] = dict(self.environment.packages)
        return {"environment": env, "backends": [dataclasses.asdict(b) for b in self.backends]}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_version(module: str) -> tuple[str | None, str | None, object | None]:
    """(version, error, module): import it for real, since installed is not importable."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or OSError when a shared library is missing
        return None, _first_line(exc), None
    return str(getattr(mod, "__version__", "unknown")), None, mod


def probe_environment() -> Environment:
    """Look at this machine: interpreter, torch/CUDA, GPU, TensorRT, ONNX Runtime, Triton, packages."""
    torch_version, torch_error, torch = _import_version("torch")
    torch_cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    torch_sees_gpu = _torch_sees_gpu(torch)
    trt_version, trt_error, _ = _import_version("tensorrt")
    rtx_version, rtx_error, rtx = _import_version(TENSORRT_RTX.module)
    ort_version, ort_error, ort = _import_version("onnxruntime")
    providers: tuple[str, ...] = ()
    if ort is not None:
        try:
            providers = tuple(ort.get_available_providers())
        except Exception as exc:
            ort_error = _first_line(exc)
    triton_version, triton_error, _ = _import_version("triton")
    return Environment(
        python=f"{platform.python_version()} ({sys.executable})",
        platform=platform.platform(),
        torch=torch_version,
        torch_cuda=torch_cuda,
        torch_sees_gpu=torch_sees_gpu,
        torch_error=torch_error,
        gpu=detect_gpu(),
        tensorrt=trt_version,
        tensorrt_error=trt_error,
        tensorrt_rtx=rtx_version,
        tensorrt_rtx_error=rtx_error,
        tensorrt_rtx_targets=TENSORRT_RTX.compute_capabilities(rtx) if rtx is not None else (),
        polygraphy=_dist_version("polygraphy"),
        onnxruntime=ort_version,
        ort_providers=providers,
        onnxruntime_error=ort_error,
        triton=triton_version,
        triton_error=triton_error,
        packages=tuple((name, _dist_version(name)) for name in PACKAGES),
    )


def _version_tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (version or "").split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _trt_caps(env: Environment) -> tuple[TensorRTCapabilities | None, str | None]:
    if env.tensorrt is None:
        return None, f"`import tensorrt` failed ({env.tensorrt_error or 'not installed'})"
    try:
        return TensorRTCapabilities.from_version(env.tensorrt), None
    except GagExportError as exc:
        return None, str(exc)


def _torch_sees_gpu(torch) -> bool:
    try:
        return torch is not None and bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install: torch runs on the CPU
        return False


def _why_torch_on_cpu(env: Environment) -> str:
    if not env.torch_cuda:
        return "a CPU build of torch"
    if env.gpu is None:
        return "no GPU visible"
    # the GPU was found (NVML), but torch's CUDA cannot use it: most often a driver older than it needs
    return f"torch's CUDA {env.torch_cuda} cannot use {env.gpu.name} (driver too old for it?)"


def assess_backends(env: Environment) -> tuple[Backend, ...]:
    """Each backend: usable or not, why, and the exact install step."""
    gpu = env.gpu
    on_gpu = f"on {gpu.name} (sm{gpu.sm[0]}{gpu.sm[1]})" if gpu else ""
    backends = []

    if env.torch is None:
        backends.append(Backend("torch", False, f"`import torch` failed ({env.torch_error})", "pip install torch"))
    elif gpu is not None and env.torch_sees_gpu:
        backends.append(Backend("torch", True, f"torch {env.torch}, CUDA {env.torch_cuda} {on_gpu}"))
    else:
        backends.append(Backend("torch", True, f"torch {env.torch} on CPU ({_why_torch_on_cpu(env)})"))

    providers = set(env.ort_providers)
    if env.onnxruntime is None:
        backends.append(Backend("ort-cpu", False, f"`import onnxruntime` failed ({env.onnxruntime_error})",
                                "pip install onnxruntime"))
    else:
        backends.append(Backend("ort-cpu", "CPUExecutionProvider" in providers,
                                f"onnxruntime {env.onnxruntime}, CPUExecutionProvider",
                                None if "CPUExecutionProvider" in providers else "pip install --force-reinstall onnxruntime"))

    if gpu is None:
        backends.append(Backend("ort-cuda", False, NEEDS_GPU, ORT_GPU_INSTALL))
    elif "CUDAExecutionProvider" not in providers:
        backends.append(Backend("ort-cuda", False, "onnxruntime has no CUDAExecutionProvider (the CPU package)",
                                ORT_GPU_INSTALL))
    else:
        backends.append(Backend("ort-cuda", True, f"onnxruntime {env.onnxruntime} CUDAExecutionProvider {on_gpu}"))

    caps, trt_problem = _trt_caps(env)
    ort_trt_install = f'{ORT_GPU_INSTALL} && {TENSORRT_INSTALL}'
    if gpu is None:
        backends.append(Backend("ort-trt", False, NEEDS_GPU, ort_trt_install))
    elif "TensorrtExecutionProvider" not in providers:
        backends.append(Backend("ort-trt", False, "onnxruntime has no TensorrtExecutionProvider", ort_trt_install))
    elif caps is None:
        backends.append(Backend("ort-trt", False, f"the TensorRT EP needs TensorRT: {trt_problem}", TENSORRT_INSTALL))
    elif caps.major >= 11 and _version_tuple(env.onnxruntime) < ORT_MIN_FOR_TRT11:
        backends.append(Backend("ort-trt", False,
                                f"onnxruntime {env.onnxruntime} predates TensorRT 11 support (1.27+); TensorRT is {caps.version}",
                                "pip install -U onnxruntime-gpu"))
    else:
        backends.append(Backend("ort-trt", True, f"TensorrtExecutionProvider with TensorRT {caps.version} {on_gpu}"))

    if caps is None:
        backends.append(Backend("tensorrt", False, f"{trt_problem}; install on a machine with an NVIDIA GPU and CUDA",
                                TENSORRT_INSTALL))
    elif gpu is None:
        backends.append(Backend("tensorrt", False, f"TensorRT {caps.version} is installed but {NEEDS_GPU}", ON_A_GPU))
    elif env.polygraphy is None:
        backends.append(Backend("tensorrt", False, "polygraphy is missing", "pip install polygraphy"))
    else:
        typing = "strongly typed only" if not caps.weak_typing else "strongly typed; --weakly-typed available"
        backends.append(Backend("tensorrt", True, f"TensorRT {caps.version} ({typing}), polygraphy {env.polygraphy} {on_gpu}"))

    backends += _rtx_backends(env)

    if env.triton is None:
        backends.append(Backend("triton-kernels", False, f"`import triton` failed ({env.triton_error})", TRITON_INSTALL))
    elif gpu is None:
        backends.append(Backend("triton-kernels", False, f"triton {env.triton} is installed but {NEEDS_GPU}", ON_A_GPU))
    elif not env.torch_cuda:
        backends.append(Backend("triton-kernels", False, f"triton {env.triton} needs a CUDA build of torch",
                                "pip install torch (a CUDA build: see https://pytorch.org/get-started/locally/)"))
    elif not env.torch_sees_gpu:
        backends.append(Backend("triton-kernels", False, f"triton {env.triton}: {_why_torch_on_cpu(env)}", ON_A_GPU))
    else:
        backends.append(Backend("triton-kernels", True, f"triton {env.triton} {on_gpu}"))
    return tuple(backends)


def _rtx_backends(env: Environment) -> list[Backend]:
    """TensorRT-RTX: building (ahead of time, on any machine) and running (an RTX GPU it targets)."""
    if env.tensorrt_rtx is None:
        why = f"`import {TENSORRT_RTX.module}` failed ({env.tensorrt_rtx_error or 'not installed'})"
        return [Backend("tensorrt-rtx-build", False, why, TENSORRT_RTX.install),
                Backend("tensorrt-rtx", False, why, TENSORRT_RTX.install)]
    targets = ", ".join(f"sm{a}{b}" for a, b in env.tensorrt_rtx_targets)
    build = Backend("tensorrt-rtx-build", True, f"TensorRT-RTX {env.tensorrt_rtx}: engines for {targets}, no GPU needed")
    gpu = env.gpu
    if gpu is None:
        run = Backend("tensorrt-rtx", False, f"its engines run on {TENSORRT_RTX.gpus}; none is visible here",
                      "run on an RTX PC or workstation with its driver")
    elif tuple(gpu.sm) not in env.tensorrt_rtx_targets:
        run = Backend("tensorrt-rtx", False, f"{gpu.name} (sm{gpu.sm[0]}{gpu.sm[1]}) is no TensorRT-RTX target ({targets})",
                      "use the tensorrt backend on this GPU" if gpu.sm[0] == 9 else "run on an RTX GPU")
    else:
        run = Backend("tensorrt-rtx", True, f"TensorRT-RTX {env.tensorrt_rtx} on {gpu.name} (sm{gpu.sm[0]}{gpu.sm[1]})")
    return [build, run]


def diagnose() -> DoctorReport:
    env = probe_environment()
    return DoctorReport(env, assess_backends(env))


def _or_missing(value: str | None, error: str | None = None) -> str:
    """Rich markup for a version, or for why there is none (data escaped: `gag-export[tensorrt]` is no tag)."""
    if value is not None:
        return escape(value)
    return f"[red]not importable[/red] ({escape(error)})" if error else "[dim]not installed[/dim]"


def render(report: DoctorReport) -> Group:
    """Two rich tables: the environment, then each backend with its install step."""
    env = report.environment
    facts = Table(title="gag-export doctor", show_header=True, header_style="bold")
    facts.add_column("component")
    facts.add_column("found")
    facts.add_row("Python", escape(env.python))
    facts.add_row("platform", escape(env.platform))
    torch = _or_missing(env.torch, env.torch_error)
    if env.torch is not None:
        torch += f" (CUDA {env.torch_cuda})" if env.torch_cuda else " (CPU build)"
    facts.add_row("torch", torch)
    if env.gpu is None:
        facts.add_row("GPU", "[dim]no NVIDIA GPU visible[/dim]")
    else:
        memory = f", {env.gpu.memory_bytes / (1 << 30):.1f} GiB" if env.gpu.memory_bytes else ""
        facts.add_row("GPU", escape(f"{env.gpu.name}, sm{env.gpu.sm[0]}{env.gpu.sm[1]}{memory}"))
    facts.add_row("TensorRT", _or_missing(env.tensorrt, env.tensorrt_error))
    facts.add_row("TensorRT-RTX", _or_missing(env.tensorrt_rtx, env.tensorrt_rtx_error))
    facts.add_row("Polygraphy", _or_missing(env.polygraphy))
    ort = _or_missing(env.onnxruntime, env.onnxruntime_error)
    if env.onnxruntime is not None:
        ort += escape(f" [{', '.join(env.ort_providers) or 'no providers'}]")
    facts.add_row("onnxruntime", ort)
    facts.add_row("triton", _or_missing(env.triton, env.triton_error))
    for name, version in env.packages:
        facts.add_row(name, _or_missing(version))

    backends = Table(title="backends", show_header=True, header_style="bold")
    backends.add_column("backend")
    backends.add_column("usable")
    backends.add_column("detail")
    backends.add_column("to make it usable")
    for b in report.backends:
        usable = "[green]yes[/green]" if b.usable else "[red]no[/red]"
        backends.add_row(b.name, usable, escape(b.detail), escape(b.install or ""))
    return Group(facts, backends)
