"""Building plans: the spec of each engine, the cache reused or filled, Polygraphy's loader chain.

Polygraphy (and the builder module) is imported when a build runs, never when this module is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..artifacts.engines import (
    RuntimeTarget,
    Sidecar,
    sidecar_path,
    validate_engine,
    version_tag,
)
from ..artifacts.integrity import verify_graph
from ..artifacts.manifest import Manifest, data_path, sha256_files
from ..core.atomic import temp_beside, write_atomic, write_failure
from ..core.errors import ArtifactError, CheckFailedError, InvalidInputError
from ..core.memory import ENGINE_BUILD_FACTOR, GIB, ensure_memory, files_bytes
from ..core.precision import Precision
from ..core.tensorrt import (
    TENSORRT_RTX,
    TensorRTCapabilities,
    TensorRTFlavor,
    get_flavor,
    import_tensorrt,
    trt_features,
)
from .options import EngineOptions, PrecisionPlan, resolve_precision
from .profiles import (
    ShapeProfile,
    derive_profile,
    gag_node_names,
    layer_from_nodes,
    load_manifest,
)

log = logging.getLogger(__name__)


def use_in_polygraphy(flavor: TensorRTFlavor) -> None:
    """Make Polygraphy's TensorRT loaders use `flavor`'s module from now on, in this process."""
    from polygraphy import config  # noqa: PLC0415
    from polygraphy.mod.trt_importer import lazy_import_trt  # noqa: PLC0415

    config.USE_TENSORRT_RTX = flavor is TENSORRT_RTX
    # Polygraphy's modules bound `trt = lazy_import_trt()` when they were imported, for the flavor
    # of that moment: bind them again (a lazy module imports nothing until it is used)
    for name, module in list(sys.modules.items()):
        if name.startswith("polygraphy.") and type(getattr(module, "trt", None)).__name__ == "LazyModule":
            module.trt = lazy_import_trt()
    log.debug("Polygraphy drives %s", flavor.label)


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine is built from; its file name follows from it and the target."""

    model: str
    component: str
    graphs_dir: Path
    onnx_path: Path
    onnx_sha256: str
    precision: PrecisionPlan
    profile: ShapeProfile
    opt_level: int | None = None
    workspace_bytes: int | None = None
    fp32_nodes: tuple[str, ...] = ()  # weakly typed path: ONNX nodes whose layers are pinned to fp32
    refittable: bool = False  # BuilderFlag.REFIT (engine/refit.py)

    def builder_flags(self) -> dict:
        """The builder settings that shape the engine (recorded in the sidecar, hashed into the name)."""
        return {
            "typing": "strong" if self.precision.strongly_typed else "weak",
            "precision_flag": None if self.precision.strongly_typed else self.precision.precision.value,
            "precision_constraints": None if self.precision.strongly_typed else "obey",
            "fp32_pinned_nodes": len(self.fp32_nodes),
            "tf32": False,
            "builder_optimization_level": self.opt_level,
            "workspace_bytes": self.workspace_bytes,
            **({"refittable": True} if self.refittable else {}),  # absent otherwise: older engines keep their names
        }

    def settings_hash(self) -> str:
        """Hash of the shape profile and the builder settings (the file name's last part)."""
        blob = {"profile": self.profile.to_dict(), "flags": self.builder_flags(), "fp32_nodes": sorted(self.fp32_nodes)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]

    def filename(self, target: RuntimeTarget) -> str:
        return f"{self.onnx_sha256[:12]}-{target.file_tag}-{target.sm_tag}-{self.precision.precision.value}-{self.settings_hash()}.plan"

    def plan_path(self, out_dir: Path, target: RuntimeTarget) -> Path:
        return Path(out_dir) / self.model / self.component / self.filename(target)


class PlanBuilder(Protocol):
    """Builds one plan file at `dest` and returns the engine's I/O description."""

    def __call__(self, spec: EngineSpec, dest: Path, timing_cache: Path | None) -> list[dict]: ...


@dataclass(frozen=True)
class EngineRecord:
    component: str
    path: Path
    sidecar: Sidecar
    status: str  # "built" or "reused"
    seconds: float


def default_timing_cache(out_dir: Path, target: RuntimeTarget) -> Path | None:
    """Timing caches hold kernel timings of one TensorRT version on one GPU model (TensorRT's docs:
    specific to the device and the versions), so the default path names all three: two GPUs of
    the same architecture (an H100 PCIe and an SXM) must not pool their timings. An ahead-of-time
    build times nothing (no GPU): None."""
    if get_flavor(target.flavor).ahead_of_time:
        return None
    gpu = re.sub(r"[^0-9A-Za-z]+", "_", target.gpu_name).strip("_") or "gpu"
    return Path(out_dir) / "timing" / f"trt{version_tag(target.trt_version)}-{target.sm_tag}-{gpu}.cache"


def component_specs(
    graphs_dir: Path, manifest: Mapping, options: EngineOptions, caps: TensorRTCapabilities
) -> list[EngineSpec]:
    """One `EngineSpec` per selected component; checks the graphs on disk against the manifest."""
    graphs_dir = Path(graphs_dir)
    components = manifest["components"]
    names = list(options.components) or list(components)
    unknown = [n for n in names if n not in components]
    if unknown:
        raise InvalidInputError(
            f"no component {', '.join(map(repr, unknown))} in {graphs_dir}; it has {', '.join(components)}"
        )
    plan = resolve_precision(manifest["dtype"], options.precision, caps, weakly_typed=options.weakly_typed, graphs_dir=graphs_dir)
    specs = []
    for name in names:
        entry = components[name]
        onnx_path = graphs_dir / entry["path"]
        verify_graph(Manifest(graphs_dir, manifest), name)  # size and sha256: the plan's cache key is the manifest's
        fp32_nodes: tuple[str, ...] = ()
        if not plan.strongly_typed:
            modules = (manifest.get("gag") or {}).get("rewritten") or []
            fp32_nodes = gag_node_names(onnx_path, modules) if modules else ()
            if modules and not fp32_nodes:
                raise InvalidInputError(
                    f"--weakly-typed: none of the {len(modules)} GAG attention modules of {graphs_dir} could be found "
                    f"in {onnx_path}, so they cannot be pinned to fp32; export the graph in "
                    f"{plan.precision.value} instead (`gag-export export --dtype {plan.precision.value}`)"
                )
        specs.append(
            EngineSpec(
                model=manifest["model"],
                component=name,
                graphs_dir=graphs_dir,
                onnx_path=onnx_path,
                onnx_sha256=entry["sha256"],  # verified above
                precision=plan,
                profile=derive_profile(manifest, name, options.shapes, graphs_dir=graphs_dir),
                opt_level=options.opt_level,
                workspace_bytes=options.workspace_bytes,
                fp32_nodes=fp32_nodes,
                refittable=options.refittable,
            )
        )
    return specs


def build_engine(
    spec: EngineSpec,
    out_dir: Path,
    target: RuntimeTarget,
    plan_builder: PlanBuilder,
    *,
    timing_cache: Path | None,
    rebuild: bool = False,
) -> EngineRecord:
    """Reuse the cached engine of `spec` when it validates, else build it (temp file + rename)."""
    dest = spec.plan_path(out_dir, target)
    if dest.exists() and not rebuild:
        try:
            sidecar, _ = validate_engine(dest, target, onnx_sha256=spec.onnx_sha256)
        except ArtifactError as exc:
            log.warning("%s: cached engine is unusable (%s); rebuilding", spec.component, exc)
        else:
            log.info("%s: reusing %s", spec.component, dest)
            return EngineRecord(spec.component, dest, sidecar, "reused", 0.0)

    builder = get_flavor(target.flavor).label
    graph_bytes = files_bytes([spec.onnx_path, data_path(spec.onnx_path)])
    ensure_memory(ENGINE_BUILD_FACTOR * graph_bytes, f"the {builder} engine build of {spec.model}/{spec.component} "
                  f"(from its {graph_bytes / GIB:.1f} GiB graph)",
                  "build it on a machine with more memory (TensorRT-RTX engines build ahead of time anywhere: "
                  "`gag-export engine --backend tensorrt-rtx --target ...`), or close other programs")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "%s: building %s %s engine (%s typed) for %s from %s",
        spec.component,
        builder,
        spec.precision.precision.value,
        "strongly" if spec.precision.strongly_typed else "weakly",
        target.gpu_name or target.sm_tag,
        spec.onnx_path,
    )
    tmp = temp_beside(dest)
    start = time.perf_counter()
    try:
        io = plan_builder(spec, tmp, None if timing_cache is None else Path(timing_cache))
        seconds = time.perf_counter() - start
        size = tmp.stat().st_size
        if size == 0:
            raise CheckFailedError(f"{builder} produced an empty engine for {spec.component}")
        sidecar = Sidecar(
            model=spec.model,
            component=spec.component,
            graphs_dir=str(spec.graphs_dir),
            onnx_path=str(spec.onnx_path),
            onnx_sha256=spec.onnx_sha256,
            engine_sha256=sha256_files([tmp]),
            engine_size_bytes=size,
            tensorrt_version=target.trt_version,
            gpu_name=target.gpu_name,
            compute_capability=tuple(target.sm),
            precision=spec.precision.precision.value,
            profile=spec.profile.to_dict(),
            builder_flags=spec.builder_flags(),
            build_seconds=round(seconds, 3),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            io=tuple(io),
            flavor=target.flavor,
            targets=tuple(target.targets),
        )
        os.replace(tmp, dest)  # the plan first: a plan without a (matching) sidecar is never reused
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(exc, dest) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomic(sidecar_path(dest), sidecar.to_json())
    missing = [r.name for r in spec.profile.inputs if io and r.name not in {t["name"] for t in io}]
    if missing:
        log.warning(
            "%s: TensorRT dropped unused input(s) %s from the engine (the tensorrt backend feeds only the engine's inputs)",
            spec.component,
            ", ".join(missing),
        )
    log.info("%s: built %s in %.1f s", spec.component, dest, seconds)
    return EngineRecord(spec.component, dest, sidecar, "built", seconds)


def build_engines(
    graphs_dir: Path,
    out_dir: Path,
    options: EngineOptions,
    target: RuntimeTarget,
    plan_builder: PlanBuilder,
    caps: TensorRTCapabilities,
) -> list[EngineRecord]:
    """Build (or reuse) an engine for every selected component of an exported model."""
    manifest = load_manifest(Path(graphs_dir))
    specs = component_specs(Path(graphs_dir), manifest, options, caps)
    timing_cache = options.timing_cache or default_timing_cache(out_dir, target)
    return [
        build_engine(spec, Path(out_dir), target, plan_builder, timing_cache=timing_cache, rebuild=options.rebuild)
        for spec in specs
    ]


def build(graphs_dir: Path, out_dir: Path, options: EngineOptions) -> list[EngineRecord]:
    """`gag-export engine`: build with the installed TensorRT on this machine's GPU, or with
    TensorRT-RTX ahead of time for its targets (any machine)."""
    caps = trt_features(options.backend)
    target = RuntimeTarget.for_build(caps, options.targets)
    log.info("%s for %s", caps.label, f"{target.gpu_name} ({target.sm_tag})" if target.gpu_name else target.sm_tag)
    return build_engines(graphs_dir, out_dir, options, target, PolygraphyPlanBuilder(caps, target), caps)


def engine_io(engine, trt=None) -> list[dict]:
    """The I/O tensors of an `ICudaEngine`: name, mode, dtype, shape (-1: dynamic)."""
    trt = trt or import_tensorrt()
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        tensors.append(_io_entry(name, "input" if mode == trt.TensorIOMode.INPUT else "output",
                                 engine.get_tensor_dtype(name), engine.get_tensor_shape(name)))
    return tensors


def network_io(network) -> list[dict]:
    """The same for an `INetworkDefinition`: an ahead-of-time engine cannot be deserialized without a
    GPU, and its network has every input the engine takes (it keeps unused ones)."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return [_io_entry(t.name, mode, t.dtype, t.shape) for mode, group in (("input", tensors), ("output", outputs)) for t in group]


def _io_entry(name: str, mode: str, dtype, shape) -> dict:
    return {"name": name, "mode": mode, "dtype": str(dtype).rsplit(".", 1)[-1].lower(), "shape": [int(d) for d in shape]}


@dataclass(frozen=True)
class PolygraphyPlanBuilder:
    """`PlanBuilder` on Polygraphy's loaders. TensorRT:

        SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx, strongly_typed=...),
                                     config=CreateConfig(profiles=[...], ...),
                                     save_timing_cache=cache), path=tmp)

    The engine is deserialized before it is saved, so a plan that does not load on this GPU is
    never written to the cache. TensorRT-RTX, ahead of time (no GPU to deserialize on):

        SaveBytes(EngineBytesFromNetwork(NetworkFromOnnxPath(onnx, strongly_typed=True),
                                         config=CreateConfigRTX(compute_capabilities=[...], profiles=[...])), path=tmp)
    """

    caps: TensorRTCapabilities
    target: RuntimeTarget | None = None  # for TensorRT-RTX: the compute capabilities to build for

    def network(self, spec: EngineSpec):
        use_in_polygraphy(self.caps.trt_flavor)
        from polygraphy.backend.trt import NetworkFromOnnxPath, PostprocessNetwork  # noqa: PLC0415

        strongly = spec.precision.strongly_typed
        network = NetworkFromOnnxPath(
            str(spec.onnx_path),
            # 10.x: strong typing is opt-in; 11.x: always on, the flag accepted but ignored (if present)
            strongly_typed=strongly and self.caps.strongly_typed_flag,
        )
        if not strongly and spec.fp32_nodes:
            network = PostprocessNetwork(network, _Fp32Pinning(frozenset(spec.fp32_nodes)), name="PinGagLayersFp32")
        return network

    def config(self, spec: EngineSpec, timing_cache: Path | None):
        use_in_polygraphy(self.caps.trt_flavor)  # its config classes check the flavor they are built for
        from polygraphy import func  # noqa: PLC0415
        from polygraphy.backend.trt import CreateConfig  # noqa: PLC0415

        trt = import_tensorrt(self.caps.flavor)
        kwargs: dict[str, Any] = {"profiles": [spec.profile.to_polygraphy()]}
        if spec.refittable:
            kwargs["refittable"] = True
        if timing_cache is not None:
            kwargs["load_timing_cache"] = str(timing_cache)
        if spec.opt_level is not None:
            kwargs["builder_optimization_level"] = spec.opt_level
        if spec.workspace_bytes is not None:
            kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: spec.workspace_bytes}
        if self.caps.trt_flavor.ahead_of_time:
            from polygraphy.backend.tensorrt_rtx import CreateConfigRTX  # noqa: PLC0415

            targets = self.target.capabilities if self.target is not None else ()
            config = CreateConfigRTX(compute_capabilities=list(targets), **kwargs)

            @func.extend(config)
            def no_tf32(builder_config):  # CreateConfigRTX has no tf32 option: fp32 stays fp32, as on TensorRT
                builder_config.clear_flag(trt.BuilderFlag.TF32)

            return no_tf32
        kwargs["tf32"] = False
        if not spec.precision.strongly_typed:
            if not self.caps.weak_typing:  # resolve_precision refuses this; a second guard costs nothing
                raise InvalidInputError(f"{self.caps.label} has no weakly typed builds")
            kwargs["fp16"] = spec.precision.precision is Precision.FP16
            kwargs["bf16"] = spec.precision.precision is Precision.BF16
            kwargs["precision_constraints"] = "obey"
        return CreateConfig(**kwargs)

    def __call__(self, spec: EngineSpec, dest: Path, timing_cache: Path | None) -> list[dict]:
        from polygraphy.backend.common import SaveBytes  # noqa: PLC0415
        from polygraphy.backend.trt import (  # noqa: PLC0415
            EngineBytesFromNetwork,
            EngineFromNetwork,
            SaveEngine,
        )
        from polygraphy.exception import PolygraphyException  # noqa: PLC0415
        from polygraphy.logger import G_LOGGER  # noqa: PLC0415

        use_in_polygraphy(self.caps.trt_flavor)
        # Polygraphy asks for colors by default and prints a warning when `colored` is missing: ask only where it is
        G_LOGGER.colors = G_LOGGER.colors and importlib.util.find_spec("colored") is not None
        cache = None if timing_cache is None else str(timing_cache)
        try:
            with G_LOGGER.verbosity(_polygraphy_severity(G_LOGGER)):
                if self.caps.trt_flavor.ahead_of_time:
                    builder, network, parser = self.network(spec)()
                    io = network_io(network)
                    SaveBytes(EngineBytesFromNetwork((builder, network, parser), config=self.config(spec, None)),
                              path=str(dest))()
                    return io
                engine = SaveEngine(
                    EngineFromNetwork(self.network(spec), config=self.config(spec, timing_cache), save_timing_cache=cache),
                    path=str(dest),
                )()
        except PolygraphyException as exc:
            raise CheckFailedError(
                f"{self.caps.label} could not build {spec.component} from {spec.onnx_path}: {exc} "
                "(run with --verbose for its log)"
            ) from None
        try:
            return engine_io(engine)
        finally:
            del engine


def _polygraphy_severity(g_logger) -> int:
    """Polygraphy's log level following ours: its configuration and progress, and the builder's
    detail, with --verbose (our DEBUG) only; warnings and errors always (ours says what it builds)."""
    return g_logger.VERBOSE if log.isEnabledFor(logging.DEBUG) else g_logger.WARNING


@dataclass(frozen=True)
class _Fp32Pinning:
    """`PostprocessNetwork` step for the 10.x weakly typed path: GAG layers compute in fp32."""

    node_names: frozenset[str]

    def __call__(self, network) -> None:
        trt = import_tensorrt()
        floats = {trt.float32, trt.float16, trt.bfloat16}
        pinned = 0
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if not layer_from_nodes(layer.name, self.node_names) or layer.type == trt.LayerType.SHAPE:
                continue
            outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
            if not outputs or any(t.dtype not in floats for t in outputs):
                continue
            layer.precision = trt.float32
            for i in range(layer.num_outputs):
                layer.set_output_type(i, trt.float32)
            pinned += 1
        log.info("pinned %d GAG layers to fp32", pinned)
        if not pinned:
            raise CheckFailedError(
                "--weakly-typed: no TensorRT layer came from the GAG attention nodes, so none could be pinned "
                "to fp32; export the graph in fp16/bf16 instead"
            )


__all__ = [
    "EngineRecord", "EngineSpec", "PlanBuilder", "PolygraphyPlanBuilder", "build", "build_engine", "build_engines",
    "component_specs", "default_timing_cache", "engine_io", "network_io",
]
