"""TensorRT and TensorRT-RTX engines from exported graphs: build with Polygraphy's loaders, cache, validate.

Build side. Reads `graphs/<model>/manifest.json` (`artifacts.manifest`), writes the engine cache
(`artifacts.engines`), and never imports `runtime/` or the CLI. Modules: `options` (what was
asked, precision rules), `profiles` (shape profiles from the manifest, GAG nodes), `plans` (specs,
the cache, Polygraphy's loader chain). The builder module is imported lazily in one place (`import_tensorrt`); what differs
between TensorRT and TensorRT-RTX is a field of their `core.tensorrt.TensorRTFlavor`, and what
depends on the installed version is decided in one place (`TensorRTCapabilities`).

TensorRT builds on the GPU that runs the engine. TensorRT-RTX builds ahead of time, on any
machine (no GPU needed), for a list of compute capabilities (`RuntimeTarget.ahead_of_time`).

Precision is decided at export. TensorRT 11 builds only strongly typed networks (every tensor
has the type the ONNX graph gives it; `BuilderFlag.FP16/BF16/INT8/FP8` are gone), so an fp16
graph makes an fp16 engine and an fp32 graph an fp32 engine, on 10.x and 11.x alike. TensorRT
10.x can still build an fp32 graph with `BuilderFlag.FP16/BF16` ("weakly typed"); that path is
opt-in (`EngineOptions.weakly_typed`) and pins the GAG attention layers to fp32.

The engine cache cannot hand out a wrong engine: a plan's file name carries what it was built
from and for (`<onnx-sha12>-trt<version>-sm<XY>-<precision>-<settings-hash>.plan`; TensorRT-RTX:
`-rtx<version>-sm80_86_89_120-`) and its JSON sidecar records it in full; `load_engine_bytes` checks the sidecar against the running TensorRT
and GPU and the plan's bytes against the sidecar before anything is deserialized.

    caps = trt_features()                       # MissingDependencyError without tensorrt
    target = RuntimeTarget.current(caps)        # TensorRT version + this GPU
    records = build_engines(Path("graphs/tiny-sdxl"), Path("engines"), EngineOptions(),
                            target, PolygraphyPlanBuilder(caps))
    plan = load_engine_bytes(records[0].path, target, onnx_sha256=...)
"""

from ..artifacts.engines import (
    RuntimeTarget,
    Sidecar,
    find_engine,
    load_engine_bytes,
    read_sidecar,
    validate_engine,
)
from ..core.tensorrt import TensorRTCapabilities, trt_features
from .options import EngineOptions, PrecisionPlan, ShapeMode, resolve_precision
from .plans import (
    EngineRecord,
    EngineSpec,
    PlanBuilder,
    PolygraphyPlanBuilder,
    build,
    build_engine,
    build_engines,
    component_specs,
    default_timing_cache,
    engine_io,
    network_io,
)
from .profiles import (
    InputRange,
    ShapeProfile,
    derive_profile,
    gag_node_names,
    layer_from_nodes,
    load_manifest,
)

__all__ = [
    "EngineOptions", "EngineRecord", "EngineSpec", "InputRange", "PlanBuilder", "PolygraphyPlanBuilder", "PrecisionPlan",
    "RuntimeTarget", "ShapeMode", "ShapeProfile", "Sidecar", "TensorRTCapabilities", "build", "build_engine",
    "build_engines", "component_specs", "default_timing_cache", "derive_profile", "engine_io", "find_engine",
    "gag_node_names", "layer_from_nodes", "load_engine_bytes", "load_manifest", "network_io", "read_sidecar",
    "resolve_precision", "trt_features", "validate_engine",
]
