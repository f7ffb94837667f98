"""Memory guards: a stage that cannot fit stops first, with exit 7 and a line, instead of being
killed by the kernel (exit 137, no message, the user never learns what was already written).

Each guard compares an estimate of the stage's peak with the most this process could have: the
memory the OS reports available plus what the process already holds. The second term matters:
after an export, freed weights stay resident in the allocator's arenas and are reused by the next
stage, so "available" alone would refuse builds that do fit (the full-size dmd2 build of
benchmarks/README.md ran its engine stage with little reported free). The guard therefore only
stops what cannot fit even if everything the process holds were given back; between that bound
and the real peak the kernel can still be the judge, and the estimates are guards, not models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import ResourceExhaustedError

# Peak memory of an ONNX Runtime CPU session per byte of graph: 1.40 measured on the full-size SDXL
# UNet at 1024x1024 (a 9.6 GiB graph, 13.4 GiB peak RSS: weights, prepacked GEMM weights, activations).
ORT_SESSION_FACTOR = 1.4
# An engine build holds the ONNX weights parsed into the network and the serialized plan, which is
# the size of the graph (the full-size SDXL UNet: 5.17 GB of graph, 5.18 GB of TensorRT-RTX plan).
ENGINE_BUILD_FACTOR = 2.0

GIB = 2**30


def available_bytes() -> int:
    """What the OS could give this process now (MemAvailable on Linux)."""
    import psutil

    return int(psutil.virtual_memory().available)


def process_bytes() -> int:
    """What this process already holds (its resident set), reusable by its next stage."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def files_bytes(paths: Iterable[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists())


def ensure_memory(need: float, what: str, advice: str) -> None:
    """Raise ResourceExhaustedError (exit 7) when `need` bytes cannot fit even with every byte this
    process holds given back: "<what> needs ~X GiB, this machine can give it at most Y GiB: <advice>"."""
    available = available_bytes()
    ceiling = available + process_bytes()
    if need > ceiling:
        raise ResourceExhaustedError(
            f"{what} needs ~{need / GIB:.1f} GiB, this machine can give it at most {ceiling / GIB:.1f} GiB "
            f"({available / GIB:.1f} GiB available): {advice}"
        )


__all__ = [
    "ENGINE_BUILD_FACTOR", "GIB", "ORT_SESSION_FACTOR", "available_bytes", "ensure_memory", "files_bytes", "process_bytes",
]
