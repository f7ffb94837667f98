"""Timers (CUDA events or the wall clock) and the statistics of timed samples."""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ...core.errors import InvalidInputError


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed samples, in milliseconds.

    Percentiles are numpy's default (linear interpolation between the closest ranks); `std` is
    the sample standard deviation (ddof=1), 0 for a single sample.
    """

    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_s: Sequence[float]) -> LatencyStats:
    """Statistics of latencies given in seconds (InvalidInputError when empty or not finite)."""
    ms = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if ms.size == 0:
        raise InvalidInputError("no timed samples to summarize (iters must be >= 1)")
    if not np.all(np.isfinite(ms)):
        raise InvalidInputError("timed samples contain NaN or inf")
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
    return LatencyStats(int(ms.size), float(ms.mean()), std, p50, p90, p99, float(ms.min()), float(ms.max()))


def paired_ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> float:
    """Median of per-round ratios of two interleaved series (same length)."""
    a, b = np.asarray(numerator_s, dtype=np.float64), np.asarray(denominator_s, dtype=np.float64)
    if a.size == 0 or a.size != b.size:
        raise InvalidInputError(f"paired_ratio needs two series of the same non-zero length, got {a.size} and {b.size}")
    return float(np.median(a / b))


class Timer(abc.ABC):
    """Times one call of `fn` in seconds, the call being complete when the time is read."""

    kind = ""

    @abc.abstractmethod
    def measure(self, fn: Callable[[], Any]) -> float: ...


class WallTimer(Timer):
    """`time.perf_counter` around the call (CPU backends; every backend returns host arrays)."""

    kind = "perf_counter"

    def measure(self, fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaEventTimer(Timer):
    """CUDA events recorded before and after the call on the current stream, then synchronized."""

    kind = "cuda-events"

    def __init__(self, device: Any = None):
        import torch  # noqa: PLC0415

        self._torch = torch
        self.device = torch.device(device or "cuda")
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def measure(self, fn):
        cuda = self._torch.cuda
        cuda.synchronize(self.device)
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        cuda.synchronize(self.device)
        return self._start.elapsed_time(self._end) / 1e3


def timer_for(device: str) -> Timer:
    """The timer for a variant running on `device` ("cpu", "cuda", "cuda:N").

    CUDA events need torch's CUDA: with onnxruntime-gpu beside a CPU build of torch, ort-cuda
    variants get the wall clock, which is exact for them (every call returns host arrays, so it
    ends synchronized).
    """
    if str(device).startswith("cuda") and _torch_cuda_available():
        return CudaEventTimer(device)
    return WallTimer()


def _torch_cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()
