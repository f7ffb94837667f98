"""What the machine is and uses: resident memory and its peak, GPU memory, CPU model, load."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from pathlib import Path

from ...core.memory import process_bytes as rss_bytes  # noqa: F401  (the one probe of this process's RSS, re-exported)
from .config import BenchConfig, default_threads

log = logging.getLogger(__name__)


MIB = float(1 << 20)


THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark: Linux's VmHWM, else `ru_maxrss` (KiB on Linux, bytes on macOS).

    Not `ru_maxrss` on Linux: the kernel carries it over fork and exec, so a bench child would
    report its parent's peak when that was higher (seen: a child of 13 MiB read 813).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def to_mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def nvml_used_bytes() -> int | None:
    """GPU memory this process uses according to NVML (None without nvidia-ml-py or a GPU)."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no library, no driver, no permission: not measured
        log.debug("NVML: %s", exc)
    return None


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ("model name"), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(config: BenchConfig) -> dict:
    """Where the figures were measured: CPU, memory, GPU, versions, precision, threads."""
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ...core.gpu import detect_gpu  # noqa: PLC0415
    from ...export import versions  # noqa: PLC0415

    gpu = detect_gpu()
    found = versions()
    for dist in ("numpy", "psutil", "matplotlib"):
        with contextlib.suppress(Exception):
            import importlib.metadata as md  # noqa: PLC0415

            found[dist] = md.version(dist)
    from ...core.tensorrt import FLAVORS  # noqa: PLC0415

    for flavor in FLAVORS.values():
        with contextlib.suppress(Exception):
            found[flavor.module] = flavor.import_module().__version__
    return {
        "cpu": {"model": cpu_model(), "physical_cores": psutil.cpu_count(logical=False),
                "logical_cores": psutil.cpu_count(logical=True), "available_to_process": default_threads()},
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None if gpu is None else {"name": gpu.name, "sm": f"{gpu.sm[0]}.{gpu.sm[1]}",
                                         "memory_gib": None if gpu.memory_bytes is None else round(gpu.memory_bytes / 2**30, 1)},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": found,
        "precision": "fp32",
        "tf32": False,  # off on every backend: torch (matmuls and convolutions), ort-cuda, TensorRT's builder
        "threads": {"torch": config.cpu_threads, "ort": config.cpu_threads},
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV if os.environ.get(name) is not None},
        "load_average": load_average(),
        "torch_cuda": torch.version.cuda,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes competing for the CPUs), where the OS has them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def gpu_reset() -> None:
    """Start a variant's peak (not yet initialized, CUDA's counters start at zero anyway)."""
    if _cuda_in_use():
        import torch  # noqa: PLC0415

        torch.cuda.reset_peak_memory_stats()


def gpu_peak(backend: str) -> int | None:
    """torch's CUDA allocator peak since `gpu_reset`, for torch variants only: it holds everything
    they allocate, and nothing of ONNX Runtime's or TensorRT's (whose rows would read ~0)."""
    if not backend.startswith("torch") or not _cuda_in_use():
        return None
    import torch  # noqa: PLC0415

    return torch.cuda.max_memory_allocated()


def _cuda_in_use() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available() and torch.cuda.is_initialized()
