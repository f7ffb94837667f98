"""One small interface over three ways of running an exported component: torch, ONNX Runtime, TensorRT.

Layer 7. A `Component` runs one graph (text encoder, denoiser or VAE decoder) by name with
numpy or torch inputs and returns numpy outputs that the caller owns (copied out of any reused
buffer). Like a Polygraphy runner it is activated once (session, engine and context, buffers)
and then called many times, also as a context manager:

    components = load_components("tiny-sdxl", "ort", graphs=Path("graphs"))
    with components:
        out = components["unet"].infer({"sample": x, "timestep": t, ...})   # {"latent": ndarray}

Backends:
- `torch`: the GAG-rewritten eager component, through the descriptor's `export_module` so torch and
  the graphs share one I/O contract; optional `torch.compile`.
- `ort`: an `onnxruntime.InferenceSession` per graph, session options set once; the CUDA (or, when
  asked for, TensorRT) execution provider where onnxruntime-gpu offers it, else the CPU.
- `tensorrt`: a cached, validated engine (`engine.py`), tensors bound by name, device buffers
  allocated once per input shape, `execute_async_v3` on a CUDA stream, optionally the denoiser
  step captured in a CUDA graph and replayed.
- `tensorrt-rtx`: the same for a TensorRT-RTX engine (built ahead of time, on any machine), whose
  JIT specialises it for this GPU on first use and keeps the result in a runtime cache beside the
  engine; CUDA graphs are TensorRT-RTX's own (`CudaGraphStrategy.WHOLE_GRAPH_CAPTURE`). It needs
  an NVIDIA RTX GPU (Ampere or newer) and driver.

Feeds are checked before they reach a backend: every input present, no unknown names, ranks and
static dims as declared; values are cast to the declared dtype.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..core.errors import ArtifactError, GagExportError, InvalidInputError, MissingDependencyError, ResourceExhaustedError
from ..export import Manifest, onnx_element_type, to_numpy, to_torch
from ..models.base import TensorSpec

log = logging.getLogger(__name__)

BACKENDS = ("torch", "ort", "tensorrt", "tensorrt-rtx")
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")  # the backends that run engines (trt_flavors.FLAVORS)
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
# Execution providers in order of preference when none are asked for. The TensorRT EP builds its
# own engines on first use (minutes for a UNet), so it is used only when asked for by name.
ORT_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def parse_backend(name: str) -> str:
    """The backend name, or `InvalidInputError` listing the known ones."""
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return value


@dataclass(frozen=True)
class BackendOptions:
    """How components are run; each field matters to one backend only.

    device: torch backend device ("auto": CUDA when available, else CPU).
    compile: torch backend, wrap each module in `torch.compile`.
    ort_providers: ONNX Runtime execution providers in order (empty: CUDA if present, else CPU).
    threads: ONNX Runtime intra-op threads (0: its default).
    cuda_graph: TensorRT backends, capture the denoiser's step in a CUDA graph and replay it.
    """

    device: str = "auto"
    compile: bool = False
    ort_providers: tuple[str, ...] = ()
    threads: int = 0
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidInputError(f"BackendOptions.device: use auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidInputError(f"BackendOptions.threads: must be an integer >= 0, got {self.threads!r}")
        object.__setattr__(self, "ort_providers", tuple(self.ort_providers))

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError(f"device {self.device!r} asked for, but torch sees no CUDA GPU here")
        return torch.device(self.device)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


def spec_from_manifest(entry: Mapping) -> TensorSpec:
    """A manifest I/O entry (`{"name", "dtype", "shape"}`) as a TensorSpec."""
    try:
        return TensorSpec(entry["name"], entry["dtype"], tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest I/O entry {entry!r} is unreadable ({exc}): re-export the model") from None


def as_tensor(value: Any) -> torch.Tensor:
    """A numpy array (bfloat16 included), torch tensor or Python number as a torch tensor (no copy if avoidable)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf" and value.flags.c_contiguous:
            return torch.from_numpy(value)  # 0-d stays 0-d (np.ascontiguousarray would make it 1-d)
        return to_torch(value)
    return torch.as_tensor(value)


class Component(abc.ABC):
    """One graph of a model behind `infer(feed) -> {output name: ndarray}`.

    Subclasses implement `_activate`, `_deactivate` and `_infer` (which receives the checked
    feed as torch tensors of the declared dtypes, in `input_names` order).
    """

    backend: ClassVar[str] = ""

    def __init__(self, name: str, role: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.name = name
        self.role = role
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._specs = {spec.name: spec for spec in self.inputs}
        self.is_active = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, role={self.role!r}, active={self.is_active})"

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input_spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise InvalidInputError(f"{self.name} has no input {name!r}; its inputs are {self.input_names}") from None

    def activate(self) -> "Component":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Component":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
        """Run the component once; the returned arrays belong to the caller."""
        if not self.is_active:
            raise GagExportError(f"{self.backend} component {self.name!r} is not active: call activate() first")
        return self._infer(self.check_feed(feed))

    def check_feed(self, feed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The feed as torch tensors of the declared dtypes, or InvalidInputError naming the problem."""
        missing = [name for name in self.input_names if name not in feed]
        unknown = sorted(set(feed) - set(self.input_names))
        if missing or unknown:
            parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
            raise InvalidInputError(f"{self.name}: feed has {' and '.join(parts)} inputs; expected {self.input_names}")
        checked = {}
        for spec in self.inputs:
            tensor = as_tensor(feed[spec.name])
            if tensor.numel() == 1 and all(dim == 1 for dim in spec.shape) and tensor.dim() != len(spec.shape):
                tensor = tensor.reshape(spec.shape)  # a scalar fed to a 0-d or [1] input, either way round
            if tensor.dim() != len(spec.shape) or any(
                isinstance(dim, int) and dim != got for dim, got in zip(spec.shape, tensor.shape)
            ):
                raise InvalidInputError(
                    f"{self.name}: input {spec.name!r} has shape {list(tensor.shape)}, the graph takes {list(spec.shape)}"
                )
            checked[spec.name] = tensor.to(spec.torch_dtype)
        return checked

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


class TorchComponent(Component):
    """An eager (optionally compiled) module whose forward takes the graph inputs in order.

    On CUDA it runs with TF32 off for matmuls and cuDNN convolutions alike (torch's default
    leaves it on for convolutions): fp32 weights compute in fp32, as on the ONNX Runtime and
    TensorRT backends, so backends compared side by side do the same math.
    """

    backend = "torch"

    def __init__(self, name, role, inputs, outputs, module: torch.nn.Module, device: torch.device | str = "cpu",
                 compile: bool = False):
        super().__init__(name, role, inputs, outputs)
        self.module = module
        self.device = torch.device(device)
        self.compile = compile
        self._call = None

    def _activate(self) -> None:
        self.module.to(self.device).eval()
        self._call = torch.compile(self.module) if self.compile else self.module

    def _deactivate(self) -> None:
        self._call = None

    def _infer(self, feed):
        args = [feed[name].to(self.device) for name in self.input_names]
        with torch.inference_mode(), _no_tf32(self.device.type == "cuda"):
            outputs = self._call(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        # .cpu() copies from a GPU; on the CPU the outputs are fresh tensors of this call.
        return {name: to_numpy(out) for name, out in zip(self.output_names, outputs)}


@contextlib.contextmanager
def _no_tf32(active: bool) -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (the flags are global)."""
    if not active:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------


def _trt_torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
        "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
    }
    for key, value in table.items():
        if getattr(trt.DataType, key, None) == dtype:
            return value
    raise ArtifactError(f"the engine has a tensor of type {dtype}, which the runtime cannot bind")


class TensorRTComponent(Component):
    """A TensorRT engine bound by tensor name, run with `execute_async_v3` on its own CUDA stream.

    Device buffers (torch CUDA tensors) are allocated once per set of input shapes and their
    addresses set on the execution context; each call copies the feed into them, runs, and copies
    the outputs back to the host. With `cuda_graph`, the first run at a shape is a warm-up and
    the second captures `execute_async_v3` into a CUDA graph that later calls replay (TensorRT
    needs one enqueue before capture to finish its lazy allocations; a capture that fails is not
    tried again at that shape, the calls enqueue instead).

    TensorRT may drop graph inputs that no output depends on; the engine then takes a subset of
    the manifest's inputs, and the others are checked and not fed.
    """

    backend = "tensorrt"

    def __init__(self, name, role, inputs, outputs, plan_path: Path, target, onnx_sha256: str | None = None,
                 cuda_graph: bool = False, device: int = 0):
        # which builder made the engine: the sidecar says, the target must agree (`load_engine_bytes`)
        super().__init__(name, role, inputs, outputs)
        self.plan_path = Path(plan_path)
        self.target = target
        self.onnx_sha256 = onnx_sha256
        self.cuda_graph = cuda_graph
        self.device = torch.device("cuda", device)
        self._engine = self._context = self._stream = self._graph = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._runs_at_shape = 0
        self._capture_failed = False
        self._engine_inputs: list[str] = []

    def _activate(self) -> None:
        from ..engine import deserialize_engine, import_tensorrt, load_engine_bytes  # noqa: PLC0415

        trt = import_tensorrt(self.target.flavor)
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"the {self.backend} backend needs a CUDA GPU that torch can see (torch.cuda is unavailable)")
        # TensorRT deserializes onto, and runs on, the current CUDA device: make it this component's
        with torch.cuda.device(self.device):
            plan = load_engine_bytes(self.plan_path, self.target, onnx_sha256=self.onnx_sha256)
            engine = deserialize_engine(plan, self.target.flavor)
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self._check_io(engine, trt, inputs, outputs)
            context = self._create_context(engine, trt)
            if context is None:  # TensorRT returns None (and logs why) when it cannot allocate one
                raise ResourceExhaustedError(
                    f"{self.name}: TensorRT could not create an execution context for {self.plan_path} "
                    "(out of GPU memory? see the TensorRT log)"
                )
            self._stream = torch.cuda.Stream(self.device)
        self._trt = trt
        self._engine = engine
        self._context = context
        self._engine_inputs = inputs
        self._dtypes = {n: _trt_torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._dynamic = {n for n in inputs if any(d < 0 for d in engine.get_tensor_shape(n))}

    def _check_io(self, engine, trt, inputs: list[str], outputs: list[str]) -> None:
        """The engine's tensors must be the manifest's (inputs TensorRT dropped aside), all on the GPU."""
        if not set(inputs) <= set(self.input_names) or sorted(outputs) != sorted(self.output_names):
            raise ArtifactError(
                f"engine {self.plan_path} takes {inputs} -> {outputs}, the manifest says {self.input_names} -> "
                f"{self.output_names}; rebuild it with `gag-export engine <graphs> --rebuild`"
            )
        dropped = [n for n in self.input_names if n not in inputs]
        if dropped:
            log.debug("%s: the engine has no input(s) %s (TensorRT dropped them as unused)", self.name, dropped)
        on_host = [n for n in inputs + outputs if engine.get_tensor_location(n) == trt.TensorLocation.HOST]
        if on_host:  # shape tensors live on the host; this runtime binds device buffers only
            raise ArtifactError(f"engine {self.plan_path}: tensors {on_host} are host (shape) tensors, which this runtime does not feed")

    def _create_context(self, engine, trt):
        return engine.create_execution_context()

    def _deactivate(self) -> None:
        self._graph = None
        self._buffers = {}
        self._shapes = None
        self._context = self._engine = self._stream = None

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set input shapes, allocate every buffer for them and bind the addresses (once per shape set)."""
        self._graph = None
        self._runs_at_shape = 0
        self._capture_failed = False
        for name, shape in shapes.items():
            if name in self._dynamic and not self._context.set_input_shape(name, shape):
                raise InvalidInputError(
                    f"{self.name}: input {name!r} shape {list(shape)} is outside the engine's profile; "
                    "build an engine for it (`gag-export engine <graphs> --dynamic`)"
                )
        buffers = {name: torch.empty(shape, dtype=self._dtypes[name], device=self.device) for name, shape in shapes.items()}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise GagExportError(f"{self.name}: TensorRT left output {name!r} shape {shape} unresolved")
            buffers[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
        for name, buffer in buffers.items():
            self._context.set_tensor_address(name, buffer.data_ptr())
        self._buffers = buffers
        self._shapes = shapes

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise GagExportError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _infer(self, feed):
        feed = {name: feed[name] for name in self._engine_inputs}
        shapes = {name: tuple(tensor.shape) for name, tensor in feed.items()}
        with torch.cuda.device(self.device):
            if shapes != self._shapes:
                self._allocate(shapes)
            # CUDA inputs may still be being written on the caller's stream (check_feed's dtype cast
            # among them): the copies on this component's stream must wait for that work
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for name, tensor in feed.items():
                    self._buffers[name].copy_(tensor, non_blocking=True)
                self._run()
                outputs = {name: self._buffers[name].to("cpu", non_blocking=False) for name in self.output_names}
            self._stream.synchronize()
        self._runs_at_shape += 1
        return {name: to_numpy(tensor) for name, tensor in outputs.items()}

    def _run(self) -> None:
        """Replay the captured graph, capture one (second run at a shape), or enqueue."""
        if self._graph is not None:
            self._graph.replay()
            return
        if self.cuda_graph and self._runs_at_shape >= 1 and not self._capture_failed:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self._stream):
                    self._enqueue()
            except (RuntimeError, GagExportError) as exc:  # a layer or plugin that cannot be captured
                self._capture_failed = True
                log.warning("%s: CUDA graph capture failed (%s); enqueueing without a graph", self.name, exc)
            else:
                self._graph = graph
                graph.replay()  # capture records the work; replay does it
                return
        self._enqueue()


class TensorRTRtxComponent(TensorRTComponent):
    """A TensorRT-RTX engine: the TensorRT component with TensorRT-RTX's runtime configuration.

    The engine was built ahead of time for a list of compute capabilities; on first use its JIT
    compiles kernels for this GPU. The runtime cache keeps them across processes: read from
    `<engine>.runtime-cache` when the context is made, written back (temp file + rename) when the
    component is deactivated. CUDA graphs are TensorRT-RTX's own capture of the whole enqueue.
    """

    backend = "tensorrt-rtx"

    def _create_context(self, engine, trt):
        from ..engine import runtime_cache_path  # noqa: PLC0415

        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        path = runtime_cache_path(self.plan_path)
        if path.is_file():
            try:
                cache.deserialize(path.read_bytes())
            except Exception as exc:  # a stale or damaged cache costs a JIT, never the run
                log.warning("%s: runtime cache %s not used (%s); the JIT compiles again", self.name, path, exc)
                cache = config.create_runtime_cache()
        config.set_runtime_cache(cache)
        if self.cuda_graph:
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.cuda_graph = False  # TensorRT-RTX captures: no torch capture around its enqueue
        self._runtime_cache = cache
        return engine.create_execution_context(config)

    def _deactivate(self) -> None:
        from ..core.atomic import write_failure  # noqa: PLC0415
        from ..engine import runtime_cache_path  # noqa: PLC0415

        cache = getattr(self, "_runtime_cache", None)
        if cache is not None:
            path = runtime_cache_path(self.plan_path)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_bytes(bytes(cache.serialize()))
                tmp.replace(path)
            except OSError as exc:  # the next process compiles again; this one has its results
                tmp.unlink(missing_ok=True)
                log.warning("%s: runtime cache not saved: %s", self.name, write_failure(exc, path))
        self._runtime_cache = None
        super()._deactivate()


# --------------------------------------------------------------------------------------------
# All components of one model
# --------------------------------------------------------------------------------------------


class ComponentSet:
    """The components of one model on one backend, by name, activated and deactivated together.

    `manifest` is the export's manifest (None for a torch set built without graphs); `pipe` the
    diffusers pipeline a torch set runs (None otherwise).
    """

    def __init__(self, model: str, backend: str, components: Mapping[str, Component], manifest: Manifest | None = None,
                 pipe: Any = None, gag: Any = None):
        self.model = model
        self.backend = backend
        self.components = dict(components)
        self.manifest = manifest
        self.pipe = pipe
        self.gag = gag  # the GAGConfig the denoiser was rewritten with, or None

    def __getitem__(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            raise ArtifactError(
                f"{self.model} has no component {name!r} on {self.backend} (it has {sorted(self.components)}); re-export it"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.components

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components.values())

    def by_role(self, role: str) -> list[Component]:
        return [c for c in self.components.values() if c.role == role]

    @property
    def denoiser(self) -> Component:
        found = self.by_role("denoiser")
        if len(found) != 1:
            raise ArtifactError(f"{self.model}: expected one denoiser, found {[c.name for c in found]}; re-export it")
        return found[0]

    @property
    def has_gag_inputs(self) -> bool:
        return "gag_scale" in self.denoiser.input_names

    def activate(self) -> "ComponentSet":
        done = []
        try:
            for component in self.components.values():
                component.activate()
                done.append(component)
        except BaseException:
            for component in done:
                component.deactivate()
            raise
        return self

    def deactivate(self) -> None:
        for component in self.components.values():
            component.deactivate()

    def __enter__(self) -> "ComponentSet":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()


def _export_hint(model: str, graphs_root: Path) -> str:
    return f"`gag-export export --model {model} --out {graphs_root}`"


def model_entry(model: str, graphs_root: Path):
    """The registry entry of `model`, or, for graphs exported from a local folder, that folder's entry."""
    manifest = Manifest.load(Path(graphs_root) / model) if (Path(graphs_root) / model / "manifest.json").is_file() else None
    return entry_for(model, manifest)


def entry_for(model: str, manifest: Manifest | None):
    """`model_entry` with the manifest already read (None: there is no export)."""
    from ..models import manifest_entry, resolve_entry  # noqa: PLC0415

    return manifest_entry(manifest.data) if manifest is not None else resolve_entry(model)


def load_manifest_for(model: str, graphs_root: Path) -> Manifest:
    """`graphs_root/<model>/manifest.json`, or `ArtifactError` naming the command that makes it."""
    graphs_dir = Path(graphs_root) / model
    if not (graphs_dir / "manifest.json").is_file():
        raise ArtifactError(f"no exported graphs for {model} in {graphs_dir}: run {_export_hint(model, graphs_root)}")
    manifest = Manifest.load(graphs_dir)
    if manifest.model != model:
        raise ArtifactError(f"{graphs_dir}/manifest.json is for model {manifest.model!r}, not {model!r}: re-export it")
    return manifest


def _check_graph_files(manifest: Manifest, graphs_root: Path) -> None:
    """Every component's ONNX file (and external data) is present with its recorded size."""
    from ..export import data_path  # noqa: PLC0415

    for name, entry in manifest.components.items():
        path = manifest.graph_path(name)
        files = [path] + ([data_path(path)] if entry.get("external_data") else [])
        for file in files:
            if not file.is_file():
                raise ArtifactError(
                    f"{manifest.model}: {file} is missing (named in its manifest); re-run {_export_hint(manifest.model, graphs_root)}"
                )
        size = sum(f.stat().st_size for f in files)
        if entry.get("size_bytes") is not None and size != entry["size_bytes"]:
            raise ArtifactError(
                f"{manifest.model}: {path} is {size} bytes, its manifest records {entry['size_bytes']} (truncated or "
                f"replaced); re-run {_export_hint(manifest.model, graphs_root)}"
            )


def _manifest_specs(entry: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return [spec_from_manifest(e) for e in entry["inputs"]], [spec_from_manifest(e) for e in entry["outputs"]]


def load_components(
    model: str,
    backend: str,
    *,
    graphs: Path = Path("graphs"),
    engines: Path = Path("engines"),
    options: BackendOptions = BackendOptions(),
) -> ComponentSet:
    """Every component of `model` for `backend`, validated but not yet activated.

    ort/tensorrt read `graphs/<model>/manifest.json` (and `engines/<model>/...` for TensorRT) and
    raise `ArtifactError` naming the command to run when something is missing. The torch backend
    builds the pipeline from the registry and, when an export exists, rewrites it with the same
    GAG config as the graphs (so both backends compute the same function).
    """
    backend = parse_backend(backend)
    graphs = Path(graphs)
    if backend == "torch":
        return _load_torch(model, graphs, options)
    manifest = load_manifest_for(model, graphs)
    _check_graph_files(manifest, graphs)
    if backend == "ort":
        components = {
            name: OrtComponent(name, entry["role"], *_manifest_specs(entry), path=manifest.graph_path(name),
                               providers=options.ort_providers, threads=options.threads, model=model)
            for name, entry in manifest.components.items()
        }
    else:
        components = _tensorrt_components(manifest, graphs, Path(engines), options, backend)
    return ComponentSet(model, backend, components, manifest=manifest, gag=manifest.gag)


def _tensorrt_components(manifest: Manifest, graphs_root: Path, engines_root: Path, options: BackendOptions,
                         backend: str = "tensorrt") -> dict:
    from ..engine import Precision as EnginePrecision  # noqa: PLC0415
    from ..engine import RuntimeTarget, find_engine, trt_features  # noqa: PLC0415

    caps = trt_features(backend)  # MissingDependencyError without the builder's module
    target = RuntimeTarget.current(caps)  # MissingDependencyError without a GPU it runs on
    component_class = TensorRTRtxComponent if backend == "tensorrt-rtx" else TensorRTComponent
    components = {}
    for name, entry in manifest.components.items():
        # any engine precision (a weakly typed fp16 engine of an fp32 graph), the graph's own first
        plan = find_engine(engines_root, manifest.model, name, target, entry["sha256"], prefer=EnginePrecision(manifest.data["dtype"]))
        if plan is None:
            flag = "" if backend == "tensorrt" else f" --backend {backend}"
            raise ArtifactError(
                f"no {caps.trt_flavor.label} engine for {manifest.model}/{name} (graph {entry['sha256'][:12]}, "
                f"{caps.label}, {target.sm_tag}) in {engines_root}: run "
                f"`gag-export engine {graphs_root / manifest.model}{flag} --out {engines_root}`"
            )
        log.info("%s: %s engine %s", name, caps.trt_flavor.label, plan.name)
        components[name] = component_class(
            name, entry["role"], *_manifest_specs(entry), plan_path=plan, target=target, onnx_sha256=entry["sha256"],
            cuda_graph=options.cuda_graph and entry["role"] == "denoiser",
        )
    return components


def torch_runtime_gag(config):
    """The GAG config the torch backend runs: the graph's values with method "auto".

    The manifest's method ("bisect" or "sort") describes the exported graph. Running the model in
    PyTorch, "auto" gives the same function (the methods agree to fp32 rounding) at the device's
    best speed: the fused Triton kernel on CUDA where it fits, else bisect.
    """
    return None if config is None else replace(config, method="auto")


def _load_torch(model: str, graphs_root: Path, options: BackendOptions) -> ComponentSet:
    from ..attention import apply_gag  # noqa: PLC0415
    from ..export import DEFAULT_EXPORT_GAG  # noqa: PLC0415
    from ..models import descriptors_for, load_pipeline  # noqa: PLC0415

    manifest = None
    if (graphs_root / model / "manifest.json").is_file():
        manifest = load_manifest_for(model, graphs_root)
    entry = entry_for(model, manifest)
    gag = torch_runtime_gag(manifest.gag if manifest is not None else DEFAULT_EXPORT_GAG)
    weights = manifest.data.get("weights") if manifest is not None else None
    pipe = load_pipeline(entry, weights=weights) if weights else load_pipeline(entry)
    if gag is not None:
        apply_gag(pipe.unet if entry.family == "sdxl" else pipe.transformer, gag)
    device = options.torch_device()
    components = {}
    for descriptor in descriptors_for(entry, pipe):
        has_gag = gag is not None and descriptor.role == "denoiser"
        components[descriptor.name] = TorchComponent(
            descriptor.name, descriptor.role, descriptor.inputs("fp32", has_gag), descriptor.outputs("fp32", has_gag),
            module=descriptor.export_module(pipe), device=device, compile=options.compile,
        )
    return ComponentSet(model, "torch", components, manifest=manifest, pipe=pipe, gag=gag)
