"""The ort backend: an `onnxruntime.InferenceSession` per graph, session options set once; the CUDA
(or, when asked for, TensorRT) execution provider where onnxruntime-gpu offers it, else the CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..arrays import to_numpy
from ..artifacts.manifest import onnx_element_type
from ..core.errors import ArtifactError, MissingDependencyError
from ..core.extras import ORT_GPU_INSTALL
from .components import Component

log = logging.getLogger(__name__)

# Execution providers in order of preference when none are asked for. The TensorRT EP builds its
# own engines on first use (minutes for a UNet), so it is used only when asked for by name.
ORT_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def ort_providers(requested: Sequence[str] = ()) -> list[str]:
    """The execution providers to use: `requested` (each must be available), else the best default."""
    import onnxruntime as ort  # noqa: PLC0415

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise MissingDependencyError(
                f"ONNX Runtime here offers {available}, not {missing}; for CUDA/TensorRT providers: `{ORT_GPU_INSTALL}`"
            )
        return list(requested)
    return [p for p in ORT_DEFAULT_PROVIDERS if p in available]


class OrtComponent(Component):
    """An `onnxruntime.InferenceSession` on one exported graph.

    Graphs with bfloat16 inputs or outputs run through an I/O binding: `session.run` takes no
    bfloat16 numpy array (ml_dtypes' type is unknown to it) and `OrtValue.numpy()` gives none
    back, so tensors are bound by address and ONNX element type and bf16 outputs read as raw
    16-bit words.
    """

    backend = "ort"

    def __init__(self, name, role, inputs, outputs, path: Path, providers: Sequence[str] = (), threads: int = 0,
                 model: str = ""):
        super().__init__(name, role, inputs, outputs)
        self.path = Path(path)
        self.providers = tuple(providers)
        self.threads = threads
        self.model = model
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = ort_providers(self.providers)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=self._with_options(providers))
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if "Could not find an implementation" in first:  # a sound graph this runtime has no kernel for
                raise MissingDependencyError(
                    f"ONNX Runtime on {providers} has no kernel for a node of {self.path} ({first}); "
                    "bfloat16 graphs need TensorRT or a provider with bf16 kernels, or export fp16/fp32"
                ) from None
            raise ArtifactError(
                f"ONNX Runtime cannot load {self.path}: {first}; re-export it (`gag-export export --model {self.model or 'NAME'}`)"
            ) from None
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if sorted(got_in) != sorted(self.input_names) or sorted(got_out) != sorted(self.output_names):
            raise ArtifactError(
                f"{self.path} takes {got_in} -> {got_out}, its manifest says {self.input_names} -> {self.output_names}; "
                "re-export the model"
            )
        log.debug("%s: ONNX Runtime session on %s", self.name, session.get_providers())
        if providers[0] not in session.get_providers():  # e.g. the CUDA provider without its cuDNN
            log.warning("%s: ONNX Runtime could not start %s and runs on %s (its log says why: -v)",
                        self.name, providers[0], session.get_providers())
        self.session = session
        self._bf16_io = any(spec.torch_dtype == torch.bfloat16 for spec in self.inputs + self.outputs)

    def _with_options(self, providers: list[str]) -> list:
        """The providers as ONNX Runtime takes them, with the options this runtime relies on.

        TensorRT: its engines cached beside the graph (a graph re-exported replaces the folder and
        so the cache), or every session would rebuild them, minutes for a UNet; and CUDA after it,
        so the nodes TensorRT does not take run on the GPU rather than fall to the CPU. CUDA:
        TF32 off, as the TensorRT engines this project builds and torch's matmuls have it, so
        an "fp32" graph computes in fp32 on every backend (ONNX Runtime's default is on).
        """
        names = list(providers)
        if "TensorrtExecutionProvider" in names and "CUDAExecutionProvider" not in names:
            import onnxruntime as ort  # noqa: PLC0415

            if "CUDAExecutionProvider" in ort.get_available_providers():
                names.insert(names.index("TensorrtExecutionProvider") + 1, "CUDAExecutionProvider")
        cache = self.path.parent / "ort-tensorrt-cache"
        options = {
            "TensorrtExecutionProvider": {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                                          "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)},
            "CUDAExecutionProvider": {"use_tf32": "0"},
        }
        return [(name, options[name]) if name in options else name for name in names]

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feed):
        if self._bf16_io:
            return self._infer_bound(feed)
        arrays = {name: to_numpy(tensor) for name, tensor in feed.items()}
        outputs = self.session.run(self.output_names, arrays)  # fresh arrays each run
        return dict(zip(self.output_names, outputs))

    def _infer_bound(self, feed):
        """One run through an I/O binding on host memory (ONNX Runtime copies to its device)."""
        binding = self.session.io_binding()
        host = {name: tensor.detach().cpu().contiguous() for name, tensor in feed.items()}  # alive until the run ends
        for name, tensor in host.items():  # check_feed cast each to its spec's dtype
            element_type = onnx_element_type(self.input_spec(name).dtype)
            binding.bind_input(name, "cpu", 0, element_type, list(tensor.shape), tensor.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: _ortvalue_to_numpy(value) for name, value in zip(self.output_names, binding.get_outputs())}


def _ortvalue_to_numpy(value) -> np.ndarray:
    """A host OrtValue as a numpy array of its own; bfloat16 (which `.numpy()` refuses) as ml_dtypes'."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    import ctypes  # noqa: PLC0415

    import ml_dtypes  # noqa: PLC0415

    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    words = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(value.data_ptr())) if count else np.empty(0, np.uint16)
    return words.copy().reshape(shape).view(ml_dtypes.bfloat16)


__all__ = ["ORT_DEFAULT_PROVIDERS", "OrtComponent", "ort_providers"]
