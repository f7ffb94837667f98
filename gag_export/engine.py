"""TensorRT and TensorRT-RTX engines from exported graphs: build with Polygraphy's loaders, cache, validate.

Layer 6. Reads `graphs/<model>/manifest.json` (written by export) and never imports `runtime/`
or the CLI. The builder module is imported lazily in one place (`import_tensorrt`); what differs
between TensorRT and TensorRT-RTX is a field of their `trt_flavors.TensorRTFlavor`, and what
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
    engine = deserialize_engine(plan)           # a tensorrt.ICudaEngine
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from . import __version__
from .core.atomic import as_if_created_plainly, write_failure
from .core.errors import ArtifactError, CheckFailedError, InvalidInputError, MissingDependencyError
from .core.names import MANIFEST_NAME
from .trt_flavors import TENSORRT, TensorRTFlavor, get_flavor, parse_sm_tag, parse_targets, sm_tag

log = logging.getLogger(__name__)

SIDECAR_FORMAT_VERSION = 1
TENSORRT_INSTALL = 'pip install "gag-export[tensorrt]"'
RUNTIME_CACHE_SUFFIX = ".runtime-cache"  # TensorRT-RTX: the JIT's runtime cache, beside its engine
GAG_SCALAR_PREFIX = "gag_"


# --------------------------------------------------------------------------------------------
# TensorRT: the one import, and the one place that knows what each major version can do
# --------------------------------------------------------------------------------------------


def import_tensorrt(flavor: TensorRTFlavor | str = TENSORRT):
    """Import and return the `tensorrt` (or `tensorrt_rtx`) module, or raise `MissingDependencyError` saying how to get it."""
    return get_flavor(flavor).import_module()


@dataclass(frozen=True)
class TensorRTCapabilities:
    """What the installed builder can do, decided from its flavor and version in one place.

    TensorRT 10.x: strongly typed networks on request (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`),
          and the deprecated (since 10.12) weak-typing flags `BuilderFlag.FP16/BF16` with precision
          constraints.
    TensorRT 11.x: every network is strongly typed (the flag is accepted but ignored); weak-typing
          flags, precision constraints and implicit INT8/FP8 are removed.
    TensorRT-RTX 1.x: strongly typed only, no precision flags, builds ahead of time for named
          compute capabilities.
    """

    version: str
    major: int
    minor: int
    weak_typing: bool  # BuilderFlag.FP16/BF16 + OBEY_PRECISION_CONSTRAINTS exist
    strongly_typed_flag: bool  # pass STRONGLY_TYPED when creating the network
    flavor: str = TENSORRT.name

    @property
    def trt_flavor(self) -> TensorRTFlavor:
        return get_flavor(self.flavor)

    @property
    def label(self) -> str:
        return f"{self.trt_flavor.label} {self.version}"

    @classmethod
    def from_version(cls, version: str, *, strongly_typed_flag: bool = True,
                     flavor: TensorRTFlavor | str = TENSORRT) -> "TensorRTCapabilities":
        flavor = get_flavor(flavor)
        major, minor = flavor.check_version(version)
        return cls(
            version=version,
            major=major,
            minor=minor,
            weak_typing=flavor is TENSORRT and major < 11,
            strongly_typed_flag=strongly_typed_flag,
            flavor=flavor.name,
        )

    @classmethod
    def from_module(cls, trt, flavor: TensorRTFlavor | str = TENSORRT) -> "TensorRTCapabilities":
        caps = cls.from_version(
            trt.__version__,
            strongly_typed_flag=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
            flavor=flavor,
        )
        # Trust the module over the version number: a 10.x build without the flags is 11-like.
        return dataclasses.replace(caps, weak_typing=caps.weak_typing and hasattr(trt.BuilderFlag, "FP16"))


def trt_features(flavor: TensorRTFlavor | str = TENSORRT) -> TensorRTCapabilities:
    """The capabilities of the importable TensorRT or TensorRT-RTX (`MissingDependencyError` without it)."""
    return TensorRTCapabilities.from_module(import_tensorrt(flavor), flavor)


# --------------------------------------------------------------------------------------------
# The real ONNX parser, for `check` (no build, no GPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParserError:
    """One node TensorRT's ONNX parser refused."""

    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.message}"


@dataclass
class ParsedNetwork:
    """What the parser made of a graph: the network (alive while its builder and parser are) or errors."""

    caps: TensorRTCapabilities
    errors: list[ParserError]
    network: Any = None
    _keep: tuple = ()  # builder and parser: the network is only valid while they live

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_layers(self) -> int:
        return self.network.num_layers if self.network is not None else 0


def parse_onnx(onnx_path: Path, flavor: TensorRTFlavor | str = TENSORRT) -> ParsedNetwork:
    """Parse a graph (and its external data) into a strongly typed network with the real ONNX parser
    of TensorRT or TensorRT-RTX; refused nodes come back as `ParserError`s, not as log lines."""
    flavor = get_flavor(flavor)
    trt = import_tensorrt(flavor)
    caps = TensorRTCapabilities.from_module(trt, flavor)

    class _Quiet(trt.ILogger):  # the parser's errors are read from the parser; its log goes to ours
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.debug("%s: %s", flavor.label, msg)

    logger = _Quiet()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if caps.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return ParsedNetwork(caps, [], network, (builder, parser, logger))
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        code, desc = str(e.code()).rsplit(".", 1)[-1], str(e.desc()).strip()
        detail = f": {desc}" if desc and desc != "false" else f" ({e.func()})" if e.func() else ""  # "false": a failed assert
        errors.append(ParserError(e.node_name() or f"#{e.node()}", e.node_operator() or "?", f"{code}{detail}"))
    return ParsedNetwork(caps, errors or [ParserError("<model>", "?", "the parser failed without saying why")])


# --------------------------------------------------------------------------------------------
# Precision and build options
# --------------------------------------------------------------------------------------------


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"

    @classmethod
    def parse(cls, value: str) -> "Precision":
        aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
        try:
            return cls(aliases.get(value, value))
        except ValueError:
            raise InvalidInputError(
                f"unknown precision {value!r}; choose one of {', '.join(p.value for p in cls)}"
            ) from None


class ShapeMode(str, enum.Enum):
    MANIFEST = "manifest"  # the manifest's profile as it is
    STATIC = "static"  # every input fixed at its `opt` shape
    DYNAMIC = "dynamic"  # the manifest's min/opt/max ranges; refused for a static graph


@dataclass(frozen=True)
class EngineOptions:
    """What `gag-export engine` was asked for. Validated on construction."""

    backend: str = TENSORRT.name  # "tensorrt" or "tensorrt-rtx" (trt_flavors.FLAVORS)
    targets: str | None = None  # TensorRT-RTX: compute capabilities, "sm80,sm86"; None: every default one
    precision: Precision | None = None  # None: the exported graph's dtype
    shapes: ShapeMode = ShapeMode.MANIFEST
    weakly_typed: bool = False  # TensorRT 10.x only: fp32 graph + BuilderFlag.FP16/BF16
    opt_level: int | None = None  # builder optimization level 0-5; None: TensorRT's default (3)
    workspace_gb: float | None = None  # workspace memory pool limit; None: TensorRT's default
    timing_cache: Path | None = None  # None: <out>/timing/trt<version>-sm<XY>.cache
    rebuild: bool = False
    components: tuple[str, ...] = ()  # empty: every component in the manifest

    def __post_init__(self) -> None:
        flavor = get_flavor(self.backend)  # InvalidInputError for an unknown one
        object.__setattr__(self, "backend", flavor.name)
        if self.targets and not flavor.ahead_of_time:
            raise InvalidInputError(f"--target is for TensorRT-RTX; {flavor.label} builds for the GPU it runs on")
        if self.timing_cache is not None and flavor.ahead_of_time:
            raise InvalidInputError(f"--timing-cache: {flavor.label} builds ahead of time and times no tactics; drop it")
        # accept the CLI's strings; keep the enums inside
        if isinstance(self.precision, str) and not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", Precision.parse(self.precision))
        if not isinstance(self.shapes, ShapeMode):
            object.__setattr__(self, "shapes", ShapeMode(self.shapes))
        object.__setattr__(self, "components", tuple(self.components))
        if self.precision is Precision.FP8:
            raise InvalidInputError(
                "--precision fp8 is not supported yet: FP8 engines need explicit quantization "
                "(Q/DQ nodes from NVIDIA ModelOpt, `nvidia-modelopt`), which gag-export does not insert yet. "
                "Build an fp16 or bf16 engine from an fp16/bf16 export instead."
            )
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise InvalidInputError(f"--opt-level must be between 0 and 5, not {self.opt_level}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise InvalidInputError(f"--workspace must be a positive number of GB, not {self.workspace_gb}")
        if self.weakly_typed and self.precision not in (Precision.FP16, Precision.BF16):
            raise InvalidInputError(
                "--weakly-typed builds an fp32 graph as an fp16 or bf16 engine: give --precision fp16 or bf16 with it"
            )

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * (1 << 30))


@dataclass(frozen=True)
class PrecisionPlan:
    """The engine precision and how TensorRT gets there."""

    precision: Precision
    strongly_typed: bool  # False only for the TensorRT 10.x FP16/BF16-flag path


def resolve_precision(
    graph_dtype: str, requested: Precision | None, caps: TensorRTCapabilities, *, weakly_typed: bool, graphs_dir: Path
) -> PrecisionPlan:
    """Check the requested engine precision against the exported graph's dtype."""
    graph = Precision.parse(graph_dtype)
    wanted = graph if requested is None else requested
    if wanted is Precision.FP8:  # EngineOptions refuses it too; kept for direct callers
        raise InvalidInputError("fp8 engines are not supported yet (they need NVIDIA ModelOpt Q/DQ nodes)")
    if weakly_typed:
        if not caps.weak_typing:
            raise InvalidInputError(
                f"--weakly-typed needs TensorRT 10.x; TensorRT {caps.version} removed BuilderFlag.FP16/BF16 "
                f"and builds only strongly typed networks. Export the graph in {wanted.value} instead: "
                f"`gag-export export --dtype {wanted.value}`."
            )
        if graph is not Precision.FP32:
            raise InvalidInputError(
                f"--weakly-typed starts from an fp32 graph, but {graphs_dir} was exported as {graph.value}; "
                f"drop --weakly-typed to build it as {graph.value}"
            )
        return PrecisionPlan(wanted, strongly_typed=False)
    if wanted is not graph:
        hint = (
            f" On TensorRT 10.x, `--precision {wanted.value} --weakly-typed` builds the fp32 graph with "
            f"BuilderFlag.{wanted.name} and the GAG layers pinned to fp32 (deprecated by NVIDIA since 10.12)."
            if caps.weak_typing and graph is Precision.FP32 and wanted in (Precision.FP16, Precision.BF16)
            else ""
        )
        raise InvalidInputError(
            f"{graphs_dir} was exported as {graph.value}, so its engine is {graph.value}: TensorRT builds it "
            f"strongly typed (the ONNX types are the engine's types), and an {graph.value} graph cannot become "
            f"a {wanted.value} engine. Re-export with `gag-export export --dtype {wanted.value}`, or build "
            f"without --precision.{hint}"
        )
    return PrecisionPlan(graph, strongly_typed=True)


# --------------------------------------------------------------------------------------------
# Manifests and shape profiles
# --------------------------------------------------------------------------------------------


def load_manifest(graphs_dir: Path) -> dict:
    """`graphs_dir/manifest.json` as a dict, read and checked by the export layer's one reader."""
    from .export import Manifest  # noqa: PLC0415  (torch and polygraphy only when a manifest is read)

    return Manifest.load(Path(graphs_dir)).data


@dataclass(frozen=True)
class InputRange:
    """min/opt/max shapes of one engine input (`()` for a 0-d scalar such as `gag_scale`)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: an `InputRange` per engine input, in the manifest's order."""

    inputs: tuple[InputRange, ...]

    @property
    def is_static(self) -> bool:
        return all(r.is_static for r in self.inputs)

    def to_dict(self) -> dict:
        return {r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.inputs}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_polygraphy(self):
        """A `polygraphy.backend.trt.Profile` (constructing it does not need tensorrt)."""
        from polygraphy.backend.trt import Profile  # noqa: PLC0415

        profile = Profile()
        for r in self.inputs:
            profile.add(r.name, min=r.min, opt=r.opt, max=r.max)
        return profile


def _graph_is_static(manifest: Mapping, component: Mapping) -> bool:
    if manifest.get("dynamic") is False:
        return True
    return all(isinstance(d, int) for inp in component.get("inputs", []) for d in inp.get("shape", []))


def derive_profile(manifest: Mapping, component_name: str, mode: ShapeMode, *, graphs_dir: Path) -> ShapeProfile:
    """The optimization profile of one component, from `components.<name>.{inputs, profile}`.

    Every manifest input becomes an engine input, 0-d `gag_*` scalars included (shape `()`).
    `STATIC` collapses each range to its `opt` shape; `DYNAMIC` refuses a static graph.
    """
    component = manifest["components"][component_name]
    where = f"{Path(graphs_dir) / MANIFEST_NAME}: components.{component_name}"
    if mode is ShapeMode.DYNAMIC and _graph_is_static(manifest, component):
        raise InvalidInputError(
            f"{graphs_dir} was exported with static shapes (component {component_name!r} takes only the "
            f"exported shapes), so it cannot give a dynamic-shape engine. Re-export with "
            f"`gag-export export --dynamic`, or build without --dynamic."
        )
    ranges_in = component.get("profile") or {}
    inputs = component.get("inputs")
    if not inputs:
        raise ArtifactError(f"{where} lists no inputs: re-export the model")
    ranges = []
    for inp in inputs:
        name, shape = inp["name"], list(inp.get("shape", []))
        entry = ranges_in.get(name)
        if entry is None:
            if any(not isinstance(d, int) for d in shape):
                raise ArtifactError(f"{where}.profile has no min/opt/max for dynamic input {name!r} {shape}")
            entry = {"min": shape, "opt": shape, "max": shape}
        try:
            lo, opt, hi = (tuple(int(d) for d in entry[k]) for k in ("min", "opt", "max"))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}.profile.{name} needs integer lists 'min', 'opt' and 'max': {entry}") from None
        for label, dims in (("min", lo), ("opt", opt), ("max", hi)):
            if len(dims) != len(shape):
                raise ArtifactError(f"{where}.profile.{name}.{label} {list(dims)} has rank {len(dims)}; input {name!r} is {shape}")
        for axis, dim in enumerate(shape):
            if not lo[axis] <= opt[axis] <= hi[axis]:
                raise ArtifactError(
                    f"{where}.profile.{name}: axis {axis} needs min <= opt <= max, got {lo[axis]}, {opt[axis]}, {hi[axis]}"
                )
            if lo[axis] < 0:
                raise ArtifactError(f"{where}.profile.{name}: axis {axis} has a negative size {lo[axis]}")
            if isinstance(dim, int) and not dim == lo[axis] == hi[axis]:
                raise ArtifactError(
                    f"{where}.profile.{name}: axis {axis} is static ({dim}) in the graph but the profile says "
                    f"{lo[axis]}..{hi[axis]}"
                )
        if mode is ShapeMode.STATIC:
            lo = hi = opt
        ranges.append(InputRange(name, lo, opt, hi))
    return ShapeProfile(tuple(ranges))


# --------------------------------------------------------------------------------------------
# GAG layers (for the TensorRT 10.x weakly typed path: pinned to fp32)
# --------------------------------------------------------------------------------------------


def gag_node_names(onnx_path: Path, modules: Iterable[str]) -> tuple[str, ...]:
    """Names of the ONNX nodes computed directly by the given attention modules (not by their
    projections `to_q`/`to_out`/norms, which are child modules): the GAG attention core."""
    import onnx  # noqa: PLC0415

    from .check import in_modules, node_module  # noqa: PLC0415  (torch-heavy; only this path needs it)

    wanted = tuple(modules)
    model = onnx.load(str(onnx_path), load_external_data=False)
    return tuple(n.name for n in model.graph.node if n.name and in_modules(node_module(n), wanted))


def layer_from_nodes(layer_name: str, node_names: frozenset[str]) -> bool:
    """Whether a TensorRT layer came from one of these ONNX nodes (the parser names a node's layers
    after the node, with `_<n>` suffixes for the extra ones)."""
    name = layer_name
    for _ in range(3):
        if name in node_names:
            return True
        stripped = re.sub(r"_\d+$", "", name)
        if stripped == name:
            return False
        name = stripped
    return False


# --------------------------------------------------------------------------------------------
# The target (TensorRT + GPU), the engine spec and its cache path, the sidecar
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RuntimeTarget:
    """What an engine is built for and must match to be loaded: the builder (flavor and version) and the GPU.

    TensorRT: one GPU model (`gpu_name`, `sm`). TensorRT-RTX, building ahead of time: the compute
    capabilities in `targets`, no GPU involved (`gpu_name` ""); running: the GPU it runs on.
    """

    trt_version: str
    gpu_name: str
    sm: tuple[int, int]
    flavor: str = TENSORRT.name
    targets: tuple[tuple[int, int], ...] = ()  # an ahead-of-time build's compute capabilities

    @property
    def capabilities(self) -> tuple[tuple[int, int], ...]:
        return self.targets or (tuple(self.sm),)

    @property
    def sm_tag(self) -> str:
        return sm_tag(self.capabilities)

    @property
    def file_tag(self) -> str:
        """The builder part of engine file names: `trt10.13.0.35`, `rtx1.7.1.116`."""
        return f"{get_flavor(self.flavor).file_tag}{_version_tag(self.trt_version)}"

    @classmethod
    def current(cls, caps: TensorRTCapabilities, device: int = 0) -> "RuntimeTarget":
        """This machine's GPU, for building (TensorRT) or running (both) engines."""
        flavor = caps.trt_flavor
        gpu = detect_gpu(device)
        if gpu is None:
            raise MissingDependencyError(
                f"{caps.label} is installed but no NVIDIA GPU is visible (CUDA device {device}); "
                f"its engines run on {flavor.gpus}"
            )
        if flavor.ahead_of_time:
            offered = flavor.compute_capabilities(import_tensorrt(flavor))
            if tuple(gpu.sm) not in offered:
                raise MissingDependencyError(
                    f"{gpu.name} (sm{gpu.sm[0]}{gpu.sm[1]}) is no {flavor.label} target: its engines run on {flavor.gpus}"
                    + ("; on Hopper use --backend tensorrt" if gpu.sm[0] == 9 else "")
                )
        return cls(caps.version, gpu.name, gpu.sm, flavor=flavor.name)

    @classmethod
    def ahead_of_time(cls, caps: TensorRTCapabilities, targets: str | None = None) -> "RuntimeTarget":
        """A TensorRT-RTX build for `targets` ("sm80,sm86"; None: the defaults), on any machine."""
        flavor = caps.trt_flavor
        if not flavor.ahead_of_time:
            raise InvalidInputError(f"{flavor.label} builds on the GPU that runs the engine, not ahead of time")
        chosen = parse_targets(targets, flavor, import_tensorrt(flavor))
        return cls(caps.version, "", chosen[0], flavor=flavor.name, targets=chosen)

    @classmethod
    def for_build(cls, caps: TensorRTCapabilities, targets: str | None = None) -> "RuntimeTarget":
        """What `engine` builds for: ahead of time where the flavor does that, else this machine's GPU."""
        return cls.ahead_of_time(caps, targets) if caps.trt_flavor.ahead_of_time else cls.current(caps)


def _version_tag(version: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "_", version)


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
        }

    def settings_hash(self) -> str:
        """Hash of the shape profile and the builder settings (the file name's last part)."""
        blob = {"profile": self.profile.to_dict(), "flags": self.builder_flags(), "fp32_nodes": sorted(self.fp32_nodes)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]

    def filename(self, target: RuntimeTarget) -> str:
        return f"{self.onnx_sha256[:12]}-{target.file_tag}-{target.sm_tag}-{self.precision.precision.value}-{self.settings_hash()}.plan"

    def plan_path(self, out_dir: Path, target: RuntimeTarget) -> Path:
        return Path(out_dir) / self.model / self.component / self.filename(target)


def sidecar_path(plan_path: Path) -> Path:
    return Path(plan_path).with_suffix(".json")


def runtime_cache_path(plan_path: Path) -> Path:
    """TensorRT-RTX's JIT runtime cache for an engine: beside it, named after it."""
    return Path(plan_path).with_suffix(RUNTIME_CACHE_SUFFIX)


@dataclass(frozen=True)
class Sidecar:
    """The JSON record beside each plan: what it was built from, with, and for."""

    model: str
    component: str
    graphs_dir: str
    onnx_path: str
    onnx_sha256: str
    engine_sha256: str
    engine_size_bytes: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profile: dict
    builder_flags: dict
    build_seconds: float
    built_at: str
    gag_export_version: str = __version__
    io: tuple[dict, ...] = ()  # the engine's I/O tensors: name, mode, dtype, shape
    format_version: int = SIDECAR_FORMAT_VERSION
    flavor: str = TENSORRT.name  # "tensorrt" or "tensorrt-rtx" (sidecars before it: TensorRT)
    targets: tuple[tuple[int, int], ...] = ()  # TensorRT-RTX: the compute capabilities it was built for

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["targets"] = [list(t) for t in self.targets]
        data["io"] = list(self.io)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Sidecar":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format_version") != SIDECAR_FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, expected {SIDECAR_FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(known - set(data) - {"gag_export_version", "io", "format_version", "flavor", "targets"})
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["compute_capability"] = tuple(int(x) for x in data["compute_capability"])
        kwargs["io"] = tuple(data.get("io", ()))
        kwargs["targets"] = tuple(tuple(int(x) for x in t) for t in data.get("targets", ()))
        get_flavor(kwargs.setdefault("flavor", TENSORRT.name))  # ValueError-like InvalidInputError for an unknown one
        kwargs.setdefault("gag_export_version", "unknown")
        return cls(**kwargs)

    @property
    def capabilities(self) -> tuple[tuple[int, int], ...]:
        return self.targets or (tuple(self.compute_capability),)

    @property
    def sm_tag(self) -> str:
        return sm_tag(self.capabilities)

    @property
    def builder_label(self) -> str:
        return f"{get_flavor(self.flavor).label} {self.tensorrt_version}"


def read_sidecar(plan_path: Path) -> Sidecar:
    path = sidecar_path(plan_path)
    try:
        return Sidecar.from_json(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"engine {plan_path} has no sidecar {path.name} (an interrupted build, or not built by gag-export); "
            "rebuild it with `gag-export engine <graphs> --rebuild`"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"engine sidecar {path} is unreadable ({exc}); rebuild it with --rebuild") from None


def _rebuild_hint(sidecar: Sidecar) -> str:
    backend = "" if sidecar.flavor == TENSORRT.name else f" --backend {sidecar.flavor}"
    return f"rebuild it: `gag-export engine {sidecar.graphs_dir}{backend} --component {sidecar.component} --rebuild`"


def sidecar_mismatches(sidecar: Sidecar, target: RuntimeTarget, *, onnx_sha256: str | None = None) -> list[str]:
    """What makes an engine unusable here, one phrase per mismatch (empty: it matches).

    TensorRT: the same version, GPU model and sm. TensorRT-RTX: the same version, and every compute
    capability of `target` among the engine's (its GPU at run time; its targets when building)."""
    problems = []
    here = f"{get_flavor(target.flavor).label} {target.trt_version}"
    if sidecar.flavor != target.flavor or sidecar.tensorrt_version != target.trt_version:
        problems.append(f"built with {sidecar.builder_label}, this machine runs {here}")
    elif get_flavor(target.flavor).ahead_of_time:
        missing = [c for c in target.capabilities if c not in sidecar.capabilities]
        if missing:
            what = f"{target.gpu_name} ({target.sm_tag})" if target.gpu_name else sm_tag(target.capabilities)
            problems.append(f"built for {sidecar.sm_tag}, not for {what}")
    elif tuple(sidecar.compute_capability) != tuple(target.sm):
        problems.append(
            f"built for {sidecar.gpu_name} ({sidecar.sm_tag}), this GPU is {target.gpu_name} ({target.sm_tag})"
        )
    elif sidecar.gpu_name != target.gpu_name:
        problems.append(
            f"built on a {sidecar.gpu_name}, this GPU is a {target.gpu_name} (same {target.sm_tag}, different device model)"
        )
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256:
        problems.append(
            f"built from ONNX sha256 {sidecar.onnx_sha256[:12]}..., the manifest's graph is now {onnx_sha256[:12]}... "
            "(the graph was re-exported)"
        )
    return problems


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def validate_engine(plan_path: Path, target: RuntimeTarget, *, onnx_sha256: str | None = None) -> tuple[Sidecar, bytes]:
    """Check a cached plan against its sidecar, the running TensorRT/GPU and (optionally) the
    manifest's ONNX sha256; return the sidecar and the plan bytes, or raise `ArtifactError`."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise ArtifactError(f"no engine at {plan_path}: build it with `gag-export engine <graphs>`")
    sidecar = read_sidecar(plan_path)
    problems = sidecar_mismatches(sidecar, target, onnx_sha256=onnx_sha256)
    if problems:
        raise ArtifactError(f"engine {plan_path} does not match: {'; '.join(problems)}; {_rebuild_hint(sidecar)}")
    size = plan_path.stat().st_size
    if size != sidecar.engine_size_bytes:
        kind = "truncated" if size < sidecar.engine_size_bytes else "larger than recorded"
        raise ArtifactError(
            f"engine {plan_path} is {kind}: {size} bytes, its sidecar records {sidecar.engine_size_bytes}; "
            f"{_rebuild_hint(sidecar)}"
        )
    data = plan_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if sha != sidecar.engine_sha256:
        raise ArtifactError(
            f"engine {plan_path} is corrupt: sha256 {sha[:12]}... differs from its sidecar's "
            f"{sidecar.engine_sha256[:12]}...; {_rebuild_hint(sidecar)}"
        )
    return sidecar, data


def load_engine_bytes(path: Path, target: RuntimeTarget, *, onnx_sha256: str | None = None) -> bytes:
    """The plan's bytes after `validate_engine`: safe to hand to `deserialize_engine`."""
    return validate_engine(path, target, onnx_sha256=onnx_sha256)[1]


def deserialize_engine(plan: bytes, flavor: TensorRTFlavor | str = TENSORRT):
    """A `tensorrt.ICudaEngine` (or TensorRT-RTX's) from validated plan bytes (Polygraphy's `EngineFromBytes`)."""
    flavor = get_flavor(flavor)
    flavor.import_module()
    flavor.use_in_polygraphy()
    from polygraphy.backend.trt import EngineFromBytes  # noqa: PLC0415
    from polygraphy.exception import PolygraphyException  # noqa: PLC0415

    try:
        return EngineFromBytes(plan)()
    except PolygraphyException as exc:
        raise ArtifactError(f"{flavor.label} could not deserialize the engine: {exc}; rebuild it with --rebuild") from None


def find_engine(
    out_dir: Path, model: str, component: str, target: RuntimeTarget, onnx_sha256: str,
    precision: Precision | None = None, prefer: Precision | None = None,
) -> Path | None:
    """The cached plan for this component, ONNX graph and target, if one exists: the newest of any
    builder settings. `precision` names the engine precision, or None for any: an fp32 graph
    can have fp32 engines and weakly typed fp16/bf16 ones; `prefer` (the graph's own dtype, say)
    is then taken first where it exists, so that a weakly typed engine runs only where asked
    for or alone. A TensorRT-RTX engine is found when it was built for the target's compute
    capability among others. Loading it still goes through `load_engine_bytes`."""
    folder = Path(out_dir) / model / component
    precision_tag = "*" if precision is None else Precision(precision).value
    # names are sha-<flavor><version>-<sm tag>-PRECISION-settings.plan, with no other dashes
    plans = [p for p in folder.glob(f"{onnx_sha256[:12]}-{target.file_tag}-sm*-{precision_tag}-*.plan")
             if set(target.capabilities) <= set(parse_sm_tag(p.name.split("-")[2]))]
    plans.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if prefer is not None:
        plans.sort(key=lambda p: p.name.split("-")[3] != Precision(prefer).value)  # stable: newest first within each
    return plans[0] if plans else None


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


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


def _tmp_path(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return as_if_created_plainly(Path(name))


def _write_text_atomic(dest: Path, text: str) -> None:
    tmp = _tmp_path(dest)
    try:
        tmp.write_text(text)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(exc, dest) from None


def default_timing_cache(out_dir: Path, target: RuntimeTarget) -> Path | None:
    """Timing caches hold kernel timings of one TensorRT version on one GPU model (TensorRT's docs:
    specific to the device and the versions), so the default path names all three: two GPUs of
    the same architecture (an H100 PCIe and an SXM) must not pool their timings. An ahead-of-time
    build times nothing (no GPU): None."""
    if get_flavor(target.flavor).ahead_of_time:
        return None
    gpu = re.sub(r"[^0-9A-Za-z]+", "_", target.gpu_name).strip("_") or "gpu"
    return Path(out_dir) / "timing" / f"trt{_version_tag(target.trt_version)}-{target.sm_tag}-{gpu}.cache"


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
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path} is missing (listed in {graphs_dir / MANIFEST_NAME}): re-export the model")
        recorded = entry.get("sha256")
        from .export import graph_sha256  # noqa: PLC0415

        actual = graph_sha256(onnx_path)  # the manifest's definition: model.onnx + its external data
        if recorded != actual:
            raise ArtifactError(
                f"{onnx_path} does not match its manifest (sha256 {actual[:12]}..., manifest says "
                f"{str(recorded)[:12]}...): the graph changed after export; re-export the model"
            )
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
                onnx_sha256=actual,
                precision=plan,
                profile=derive_profile(manifest, name, options.shapes, graphs_dir=graphs_dir),
                opt_level=options.opt_level,
                workspace_bytes=options.workspace_bytes,
                fp32_nodes=fp32_nodes,
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

    dest.parent.mkdir(parents=True, exist_ok=True)
    if timing_cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    builder = get_flavor(target.flavor).label
    log.info(
        "%s: building %s %s engine (%s typed) for %s from %s",
        spec.component,
        builder,
        spec.precision.precision.value,
        "strongly" if spec.precision.strongly_typed else "weakly",
        target.gpu_name or target.sm_tag,
        spec.onnx_path,
    )
    tmp = _tmp_path(dest)
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
            engine_sha256=_sha256_file(tmp),
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
    _write_text_atomic(sidecar_path(dest), sidecar.to_json())
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


# --------------------------------------------------------------------------------------------
# The TensorRT build itself, as a Polygraphy loader chain
# --------------------------------------------------------------------------------------------


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
        self.caps.trt_flavor.use_in_polygraphy()
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
        self.caps.trt_flavor.use_in_polygraphy()  # its config classes check the flavor they are built for
        from polygraphy import func  # noqa: PLC0415
        from polygraphy.backend.trt import CreateConfig  # noqa: PLC0415

        trt = import_tensorrt(self.caps.flavor)
        kwargs: dict[str, Any] = {"profiles": [spec.profile.to_polygraphy()]}
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
        from polygraphy.backend.trt import EngineBytesFromNetwork, EngineFromNetwork, SaveEngine  # noqa: PLC0415
        from polygraphy.exception import PolygraphyException  # noqa: PLC0415
        from polygraphy.logger import G_LOGGER  # noqa: PLC0415

        self.caps.trt_flavor.use_in_polygraphy()
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
    "EngineOptions",
    "EngineRecord",
    "EngineSpec",
    "GpuInfo",
    "InputRange",
    "ParsedNetwork",
    "ParserError",
    "PlanBuilder",
    "PolygraphyPlanBuilder",
    "Precision",
    "PrecisionPlan",
    "RuntimeTarget",
    "ShapeMode",
    "ShapeProfile",
    "Sidecar",
    "TensorRTCapabilities",
    "build",
    "build_engine",
    "build_engines",
    "component_specs",
    "derive_profile",
    "deserialize_engine",
    "detect_gpu",
    "engine_io",
    "find_engine",
    "gag_node_names",
    "import_tensorrt",
    "load_engine_bytes",
    "load_manifest",
    "network_io",
    "parse_onnx",
    "runtime_cache_path",
    "read_sidecar",
    "resolve_precision",
    "sidecar_mismatches",
    "trt_features",
    "validate_engine",
]
