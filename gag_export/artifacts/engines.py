"""The engine cache: where a plan lives, its JSON sidecar, and the checks before one is used.

A plan's file name carries what it was built from and for (`<onnx-sha12>-trt<version>-sm<XY>-
<precision>-<settings-hash>.plan`; TensorRT-RTX: `-rtx<version>-sm80_86_89_120-`), and its sidecar
records it in full; `load_engine_bytes` checks the sidecar against the running builder and GPU
(`RuntimeTarget`) and the plan's bytes against the sidecar before anything is deserialized. The
build side (`engine/`) writes entries, the run side reads them: neither imports the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..core.errors import ArtifactError, InvalidInputError, MissingDependencyError
from ..core.gpu import detect_gpu
from ..core.precision import Precision
from ..core.tensorrt import (
    TENSORRT,
    TensorRTCapabilities,
    get_flavor,
    import_tensorrt,
    parse_sm_tag,
    parse_targets,
    sm_tag,
)

SIDECAR_FORMAT_VERSION = 1
RUNTIME_CACHE_SUFFIX = ".runtime-cache"  # TensorRT-RTX: the JIT's runtime cache, beside its engine


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
        return f"{get_flavor(self.flavor).file_tag}{version_tag(self.trt_version)}"

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


def version_tag(version: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "_", version)


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
    loras: tuple[dict, ...] = ()  # a refit engine: the LoRAs of the graph it was refit from (`gag-export lora`)
    refit_from: str | None = None  # a refit engine: the sha256 of the engine it is a refit copy of

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        data["targets"] = [list(t) for t in self.targets]
        data["io"] = list(self.io)
        data["loras"] = list(self.loras)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Sidecar":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format_version") != SIDECAR_FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, expected {SIDECAR_FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(known - set(data) - {"gag_export_version", "io", "format_version", "flavor", "targets",
                                              "loras", "refit_from"})
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["compute_capability"] = tuple(int(x) for x in data["compute_capability"])
        kwargs["io"] = tuple(data.get("io", ()))
        kwargs["loras"] = tuple(data.get("loras", ()))
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


def _built_on_another_gpu_model(plan_path: Path, target: RuntimeTarget) -> bool:
    """TensorRT: the sidecar names another GPU model than `target`'s (TensorRT-RTX engines are not
    tied to one). A missing or unreadable sidecar is left to `load_engine_bytes` to report."""
    if get_flavor(target.flavor).ahead_of_time:
        return False
    try:
        return read_sidecar(plan_path).gpu_name != target.gpu_name
    except ArtifactError:
        return False


def find_engine(
    out_dir: Path, model: str, component: str, target: RuntimeTarget, onnx_sha256: str,
    precision: Precision | None = None, prefer: Precision | None = None,
) -> Path | None:
    """The cached plan for this component, ONNX graph and target, if one exists: the newest of any
    builder settings. `precision` names the engine precision, or None for any: an fp32 graph
    can have fp32 engines and weakly typed fp16/bf16 ones; `prefer` (the graph's own dtype, say)
    is then taken first where it exists, so that a weakly typed engine runs only where asked
    for or alone. A TensorRT-RTX engine is found when it was built for the target's compute
    capability among others. A TensorRT engine's name has no GPU model: one built on another model
    of the same sm (which does not load here) is passed over by its sidecar. Loading it still goes
    through `load_engine_bytes`."""
    folder = Path(out_dir) / model / component
    precision_tag = "*" if precision is None else Precision(precision).value
    # names are sha-<flavor><version>-<sm tag>-PRECISION-settings.plan, with no other dashes
    plans = [p for p in folder.glob(f"{onnx_sha256[:12]}-{target.file_tag}-sm*-{precision_tag}-*.plan")
             if set(target.capabilities) <= set(parse_sm_tag(p.name.split("-")[2]))
             and not _built_on_another_gpu_model(p, target)]
    plans.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if prefer is not None:
        plans.sort(key=lambda p: p.name.split("-")[3] != Precision(prefer).value)  # stable: newest first within each
    return plans[0] if plans else None


__all__ = [
    "RUNTIME_CACHE_SUFFIX", "SIDECAR_FORMAT_VERSION", "RuntimeTarget", "Sidecar", "find_engine", "load_engine_bytes",
    "read_sidecar", "runtime_cache_path", "sidecar_mismatches", "sidecar_path", "validate_engine", "version_tag",
]
