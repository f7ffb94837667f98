"""The tensorrt and tensorrt-rtx backends: a cached, validated engine (`artifacts.engines`), tensors
bound by name, device buffers allocated once per input shape, `execute_async_v3` on a CUDA stream,
optionally the denoiser step captured in a CUDA graph and replayed. The engine is deserialized with
the builder module's own runtime: no Polygraphy and no engine building on the run side."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..arrays import to_numpy
from ..artifacts.engines import (
    RuntimeTarget,
    find_engine,
    load_engine_bytes,
    runtime_cache_path,
)
from ..artifacts.manifest import Manifest
from ..core.atomic import write_atomic
from ..core.errors import (
    ArtifactError,
    GagExportError,
    InvalidInputError,
    MissingDependencyError,
    ResourceExhaustedError,
)
from ..core.precision import Precision
from ..core.tensorrt import get_flavor, import_tensorrt, trt_features
from .components import BackendOptions, Component
from .exports import manifest_specs

log = logging.getLogger(__name__)


def deserialize_engine(plan: bytes, flavor: str = "tensorrt"):
    """An `ICudaEngine` from validated plan bytes, with the flavor's own `Runtime`."""
    flavor = get_flavor(flavor)
    trt = import_tensorrt(flavor)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:  # the builder logged why: another GPU, a newer plan format, a damaged file
        raise ArtifactError(f"{flavor.label} could not deserialize the engine (see its log); rebuild it with --rebuild")
    return engine


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
        cache = getattr(self, "_runtime_cache", None)
        if cache is not None:
            try:
                write_atomic(runtime_cache_path(self.plan_path), bytes(cache.serialize()))
            except GagExportError as exc:  # the next process compiles again; this one has its results
                log.warning("%s: runtime cache not saved: %s", self.name, exc)
        self._runtime_cache = None
        super()._deactivate()


def tensorrt_components(manifest: Manifest, graphs_root: Path, engines_root: Path, options: BackendOptions,
                         backend: str = "tensorrt") -> dict:
    caps = trt_features(backend)  # MissingDependencyError without the builder's module
    target = RuntimeTarget.current(caps)  # MissingDependencyError without a GPU it runs on
    component_class = TensorRTRtxComponent if backend == "tensorrt-rtx" else TensorRTComponent
    components = {}
    for name, entry in manifest.components.items():
        # any engine precision (a weakly typed fp16 engine of an fp32 graph), the graph's own first
        plan = find_engine(engines_root, manifest.model, name, target, entry["sha256"], prefer=Precision(manifest.data["dtype"]))
        if plan is None:
            flag = "" if backend == "tensorrt" else f" --backend {backend}"
            raise ArtifactError(
                f"no {caps.trt_flavor.label} engine for {manifest.model}/{name} (graph {entry['sha256'][:12]}, "
                f"{caps.label}, {target.sm_tag}) in {engines_root}: run "
                f"`gag-export engine {graphs_root / manifest.model}{flag} --out {engines_root}`"
            )
        log.info("%s: %s engine %s", name, caps.trt_flavor.label, plan.name)
        components[name] = component_class(
            name, entry["role"], *manifest_specs(entry), plan_path=plan, target=target, onnx_sha256=entry["sha256"],
            cuda_graph=options.cuda_graph and entry["role"] == "denoiser",
        )
    return components


__all__ = ["TensorRTComponent", "TensorRTRtxComponent", "deserialize_engine", "tensorrt_components"]
