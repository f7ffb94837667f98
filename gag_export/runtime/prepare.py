"""Make sure a backend's artifacts exist before sampling: export graphs and build engines when absent.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import ArtifactError
from .backends import ENGINE_BACKENDS, load_manifest_for, parse_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareStep:
    """One stage `ensure_artifacts` ran: "export" or "engine", and where it wrote."""

    stage: str
    path: Path


def _missing_engines(manifest, engines: Path, target) -> list[str]:
    from ..engine import find_engine  # noqa: PLC0415

    return [
        name
        for name, entry in manifest.components.items()
        if find_engine(engines, manifest.model, name, target, entry["sha256"]) is None
    ]


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
) -> list[PrepareStep]:
    """Export `model` into `graphs` (at `height`x`width`, default the model's size) if it has no
    manifest there, and for TensorRT build the missing engines into `engines`; return what ran.

    `on_export` receives export.py's `ExportEvent`s; `on_stage` a line per stage started.
    """
    backend = parse_backend(backend)
    if backend == "torch":
        return []
    graphs, engines = Path(graphs), Path(engines)
    notify = on_stage or (lambda message: None)
    target = None
    if backend in ENGINE_BACKENDS:
        from ..engine import RuntimeTarget, trt_features  # noqa: PLC0415

        target = RuntimeTarget.current(trt_features(backend))  # MissingDependencyError, before any export
    steps = []
    if not (graphs / model / "manifest.json").is_file():
        if (graphs / model).exists():
            log.info("%s has no manifest.json (an interrupted export?); exporting again", graphs / model)
        from ..export import DEFAULT_EXPORT_GAG, ExportConfig, export_model  # noqa: PLC0415
        from ..models import ImageShape, get_entry, load_pipeline  # noqa: PLC0415

        entry = get_entry(model)
        shape = ImageShape(height or entry.height, width or entry.width)
        notify(f"exporting {model} at {shape.height}x{shape.width} to {graphs / model}")
        pipe = load_pipeline(model)
        export_model(pipe, entry, ExportConfig(model, graphs, shape, gag=DEFAULT_EXPORT_GAG), progress=on_export)
        steps.append(PrepareStep("export", graphs / model))
    if backend in ENGINE_BACKENDS:
        from ..engine import EngineOptions, build  # noqa: PLC0415

        manifest = load_manifest_for(model, graphs)
        missing = _missing_engines(manifest, engines, target)
        if missing:
            notify(f"building {backend} engines for {model}: {', '.join(missing)}")
            targets = target.sm_tag if backend == "tensorrt-rtx" else None  # this GPU's: one target builds fastest
            build(graphs / model, engines, EngineOptions(backend=backend, targets=targets, components=tuple(missing)))
            if _missing_engines(manifest, engines, target):
                raise ArtifactError(f"engines for {model} are still missing after a build in {engines}")
            steps.append(PrepareStep("engine", engines / model))
    return steps
