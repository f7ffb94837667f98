"""Make sure a backend's artifacts exist before sampling: export graphs and build engines when absent.

The one copy of "build whatever is missing", for `generate`, `bench` and the Python API:

    built = ensure_artifacts("tiny-sdxl", "ort", graphs=Path("graphs"), engines=Path("engines"),
                             on_export=print)          # ["export"] the first time, [] after

Only what is absent is built: an existing export is never replaced (a static export at another
size is reported by the sampler, with the command to re-export). The torch backend needs no
artifacts. For the engine backends (TensorRT, TensorRT-RTX), the builder and a GPU that runs its
engines are checked first, so a machine without them fails in a second with
`MissingDependencyError` instead of after a long export. TensorRT-RTX engines are built for this
GPU's compute capability (an engine built ahead of time for several, this one among them, is used
as it is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..artifacts.engines import RuntimeTarget, find_engine
from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError, InvalidInputError
from ..core.tensorrt import get_flavor, trt_features
from ..runtime.components import ENGINE_BACKENDS, parse_backend
from ..runtime.exports import load_manifest_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareStep:
    """One stage `ensure_artifacts` ran: "export" or "engine", and where it wrote."""

    stage: str
    path: Path


def missing_engines(manifest: Manifest, engines: Path, target: RuntimeTarget) -> list[str]:
    """The components of an export with no engine for `target` in `engines`."""
    return [
        name
        for name, entry in manifest.components.items()
        if find_engine(engines, manifest.model, name, target, entry["sha256"]) is None
    ]


def engine_target(backend: str) -> RuntimeTarget:
    """What an engine backend runs on here; `MissingDependencyError` without its builder or a GPU it runs on."""
    return RuntimeTarget.current(trt_features(backend))


def _check_loras(model: str, graphs: Path, loras) -> None:
    """InvalidInputError unless the export in `graphs` was made with exactly `loras` (None: any)."""
    if loras is None:
        return
    there = load_manifest_for(model, graphs).loras
    if [(r["sha256"], r["scale"]) for r in there] != [(s.sha256, s.scale) for s in loras]:
        def names(records):
            return ", ".join(f"{r['name']}:{r['scale']:g}" for r in records) or "no LoRA"
        raise InvalidInputError(f"{graphs / model} was exported with {names(there)}, not with "
                                f"{names([s.record() for s in loras])}: export into another --out (it is never replaced here)")


def ensure_graphs(model: str, graphs: Path, *, height: int | None = None, width: int | None = None,
                  on_export: Callable | None = None, img2img: bool = False, loras=None) -> bool:
    """Export `model` into `graphs` (at `height`x`width`, default the model's size) with the default
    GAG when it has no manifest there, with the VAE encoder too when `img2img`; True when it exported.
    An existing export without the encoder is left as it is (the sampler says how to add it).
    `loras`: `LoraSpec`s the export must have been made with (fused into a new one); None takes
    the export there as it is (its graphs carry the LoRAs they were exported with)."""
    graphs = Path(graphs)
    if (graphs / model / "manifest.json").is_file():
        _check_loras(model, graphs, loras)
        return False
    if (graphs / model).exists():
        log.info("%s has no manifest.json (an interrupted export?); exporting again", graphs / model)
    from ..export import DEFAULT_EXPORT_GAG, ExportConfig, export_model  # noqa: PLC0415
    from ..models import ImageShape, get_entry, load_pipeline  # noqa: PLC0415

    entry = get_entry(model)
    shape = ImageShape(height or entry.height, width or entry.width)
    config = ExportConfig(model, graphs, shape, gag=DEFAULT_EXPORT_GAG, img2img=img2img, loras=tuple(loras or ()))
    export_model(load_pipeline(model), entry, config, progress=on_export, release=True)
    return True


def ensure_engines(model: str, backend: str, graphs: Path, engines: Path, target: RuntimeTarget | None = None) -> list[str]:
    """Build the engines of an export that `engines` lacks for this machine (`backend`: "tensorrt" or
    "tensorrt-rtx"); return the components built. TensorRT-RTX builds for this GPU's target only."""
    from ..engine import EngineOptions, build  # noqa: PLC0415

    target = target or engine_target(backend)
    manifest = load_manifest_for(model, graphs)
    missing = missing_engines(manifest, Path(engines), target)
    if missing:
        targets = target.sm_tag if get_flavor(backend).ahead_of_time else None
        log.info("building %s engines for %s: %s", backend, model, ", ".join(missing))
        build(Path(graphs) / model, Path(engines), EngineOptions(backend=backend, targets=targets, components=tuple(missing)))
        if missing_engines(manifest, Path(engines), target):
            raise ArtifactError(f"engines for {model} are still missing after a build in {engines}")
    return missing


def ensure_artifacts(
    model: str,
    backend: str,
    *,
    graphs: Path = Path("graphs"),
    engines: Path = Path("engines"),
    height: int | None = None,
    width: int | None = None,
    on_export: Callable | None = None,
    on_stage: Callable[[str], None] | None = None,
    img2img: bool = False,
    loras=None,
) -> list[PrepareStep]:
    """Export `model` into `graphs` if it has no manifest there, and for the engine backends build
    the missing engines into `engines`; return what ran. `loras`: as for `ensure_graphs`.

    `on_export` receives the exporter's `ExportEvent`s; `on_stage` a line per stage started.
    """
    backend = parse_backend(backend)
    if backend == "torch":
        return []
    graphs, engines = Path(graphs), Path(engines)
    notify = on_stage or (lambda message: None)
    target = engine_target(backend) if backend in ENGINE_BACKENDS else None  # before any export
    steps = []
    if not (graphs / model / "manifest.json").is_file():
        notify(f"exporting {model} to {graphs / model}")
    if ensure_graphs(model, graphs, height=height, width=width, on_export=on_export, img2img=img2img, loras=loras):
        steps.append(PrepareStep("export", graphs / model))
    if target is not None:
        manifest = load_manifest_for(model, graphs)
        if missing_engines(manifest, engines, target):
            notify(f"building {backend} engines for {model}")
            ensure_engines(model, backend, graphs, engines, target)
            steps.append(PrepareStep("engine", engines / model))
    return steps


__all__ = ["PrepareStep", "engine_target", "ensure_artifacts", "ensure_engines", "ensure_graphs", "missing_engines"]
