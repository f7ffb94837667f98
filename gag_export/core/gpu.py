"""This machine's NVIDIA GPU, as torch, NVML or cuda-python sees it (each imported only when asked)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    sm: tuple[int, int]
    memory_bytes: int | None


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """This machine's CUDA GPU via torch, else nvidia-ml-py, else cuda-python; None when none sees one."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available() and torch.cuda.device_count() > device:
            props = torch.cuda.get_device_properties(device)
            return GpuInfo(props.name, (props.major, props.minor), int(props.total_memory))
    except Exception as exc:  # a broken CUDA install must not hide the NVML answer
        log.debug("torch.cuda could not describe GPU %d: %s", device, exc)
    try:
        import pynvml  # noqa: PLC0415 (the nvidia-ml-py package)

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        finally:
            pynvml.nvmlShutdown()
        return GpuInfo(name.decode() if isinstance(name, bytes) else str(name), (int(major), int(minor)), int(memory))
    except Exception as exc:
        log.debug("nvidia-ml-py could not describe GPU %d: %s", device, exc)
    try:  # cuda-python comes with the tensorrt extra
        try:
            from cuda.bindings import runtime as cudart  # noqa: PLC0415 (cuda-python >= 12.6)
        except ImportError:
            from cuda import cudart  # noqa: PLC0415
        status, props = cudart.cudaGetDeviceProperties(device)
        if status == cudart.cudaError_t.cudaSuccess:
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return GpuInfo(name.rstrip("\x00"), (int(props.major), int(props.minor)), int(props.totalGlobalMem))
    except Exception as exc:
        log.debug("cuda-python could not describe GPU %d: %s", device, exc)
    return None


__all__ = ["GpuInfo", "detect_gpu"]
