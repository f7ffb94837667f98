"""Refit copies of refittable engines with a LoRA variant's weights, instead of rebuilding them.

`gag-export engine --refittable` builds with BuilderFlag.REFIT (the flag is in the sidecar's
`builder_flags` and so in the plan's settings hash: a refittable engine never replaces a plain
one). `gag-export lora` then, for each refittable engine of the original denoiser graph, loads a
copy, hands it the variant graph's initializers through TensorRT's `OnnxParserRefitter` (it
matches ONNX initializers to the engine's refittable weights by name: the variant keeps every
name, only values change) and `Refitter.refit_cuda_engine`, and saves it under the variant
graph's sha256, with a sidecar that records the LoRAs and the engine it was refit from. The
original plan is only read. Polygraphy has no refit loader (0.53), so this is TensorRT's API,
the same for TensorRT and TensorRT-RTX (`tensorrt_rtx` has both classes).

Refitting deserializes the engine, so it needs a GPU the engine runs on (`RuntimeTarget.current`:
exit 3 without one); TensorRT-RTX engines built ahead of time on a CPU-only machine are refit on
the RTX GPU that runs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts.engines import RuntimeTarget, Sidecar, read_sidecar, sidecar_path, validate_engine
from ..artifacts.manifest import Manifest
from ..core.atomic import write_atomic
from ..core.errors import ArtifactError, CheckFailedError
from ..core.tensorrt import get_flavor, import_tensorrt, trt_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitRecord:
    component: str
    source: Path  # the original's engine (read only)
    path: Path  # the refit copy
    seconds: float


def refittable_engines(engines_root: Path, manifest: Manifest, component: str) -> list[Path]:
    """The cached plans of `component`'s graph (by its sha256) that were built refittable."""
    folder = Path(engines_root) / manifest.model / component
    sha = manifest.components[component]["sha256"]
    plans = []
    for plan in sorted(folder.glob(f"{sha[:12]}-*.plan")):
        try:
            if read_sidecar(plan).builder_flags.get("refittable"):
                plans.append(plan)
        except ArtifactError as exc:
            log.warning("%s: not refit (%s)", plan, exc)
    return plans


def refit_plan(plan: bytes, onnx_path: Path, flavor: str) -> bytes:
    """A refittable plan with its weights replaced by the ONNX graph's initializers (needs a GPU)."""
    trt = import_tensorrt(get_flavor(flavor))
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise ArtifactError("the engine could not be deserialized on this GPU; rebuild it")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailedError(f"TensorRT could not take the weights of {onnx_path}: {errors}")
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise CheckFailedError(f"TensorRT could not refit the engine from {onnx_path}"
                               + (f" (weights missing: {', '.join(missing[:5])})" if missing else ""))
    return bytes(engine.serialize())


def refit_sidecar(original: Sidecar, variant: Manifest, component: str, plan: bytes, seconds: float) -> Sidecar:
    """The refit copy's sidecar: the original's builder, target and settings; the variant's graph and LoRAs."""
    return dataclasses.replace(
        original, graphs_dir=str(variant.graphs_dir), onnx_path=str(variant.graph_path(component)),
        onnx_sha256=variant.components[component]["sha256"], engine_sha256=hashlib.sha256(plan).hexdigest(),
        engine_size_bytes=len(plan), build_seconds=round(seconds, 3), built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        loras=tuple(variant.data.get("loras", ())), refit_from=original.engine_sha256)


def refit_path(source: Path, variant: Manifest, component: str) -> Path:
    """Where the refit copy goes: the original's name with the variant graph's sha256 in front (the
    builder, target, precision and settings are the original's), under the variant's model."""
    rest = source.name.split("-", 1)[1]
    return Path(source).parent.parent.parent / variant.model / component / f"{variant.components[component]['sha256'][:12]}-{rest}"


def refit_engines(engines_root: Path, original: Manifest, variant: Manifest, component: str) -> list[RefitRecord]:
    """Refit a copy of every refittable engine of `original`'s `component` with `variant`'s weights."""
    sources = refittable_engines(engines_root, original, component)
    records = []
    for source in sources:
        sidecar = read_sidecar(source)
        target = RuntimeTarget.current(trt_features(sidecar.flavor))  # MissingDependencyError without a GPU
        _, plan = validate_engine(source, target, onnx_sha256=original.components[component]["sha256"])
        start = time.perf_counter()
        refit = refit_plan(plan, variant.graph_path(component), sidecar.flavor)
        seconds = time.perf_counter() - start
        dest = refit_path(source, variant, component)
        write_atomic(dest, refit, make_parents=True)
        write_atomic(sidecar_path(dest), refit_sidecar(sidecar, variant, component, refit, seconds).to_json())
        log.info("%s: refit %s -> %s in %.1f s", component, source, dest, seconds)
        records.append(RefitRecord(component, source, dest, seconds))
    return records


__all__ = ["RefitRecord", "refit_engines", "refit_path", "refit_plan", "refit_sidecar", "refittable_engines"]
