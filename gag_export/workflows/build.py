"""`gag-export build`: load -> apply GAG -> export -> check -> engines -> smoke image, in one call.

A workflow: imports both sides (models, export, check, engine; runtime), never the CLI. It
decides nothing the layers decide already; it runs them in order, times each stage, and collects
what they wrote so that the CLI can print one summary.

    result = run_build(BuildConfig("tiny-sdxl"), progress=print)
    result.image_path, result.manifest.path, result.stage("export").seconds
    result.raise_for_failures()            # CheckFailedError (exit 4) if a check failed

Stages, each recorded as a `StageRecord` (status "done", "reused", "skipped" or "failed"):

- `load`: the pipeline through the registry (`models.load_pipeline`; pretrained weights from the
  local Hugging Face cache only, `WeightsNotFoundError` naming the download command otherwise).
- `export`: every component to `<graphs>/<model>/` with GAG applied to the denoiser (with
  `img2img`, the VAE encoder too). Export has
  no cache (its output depends on the weights, which nothing hashes cheaply), so every build
  exports again and atomically replaces the previous folder. The graphs are byte-identical for
  the same weights and settings, so their sha256 and with it the engine cache keys stay the same.
- `check`: ONNX checker, shape inference, TensorRT lint and ORT-vs-torch parity against the
  pipeline still in memory. A failed check stops the build (no engines from bad graphs).
- `engine`: plans through `engine.build`, which reuses a cached plan whose graph sha256, builder
  version, GPU (or TensorRT-RTX targets) and settings match. `engine_backend` "auto" builds with
  TensorRT where it imports and sees a GPU, else with TensorRT-RTX (ahead of time, no GPU needed)
  where that imports; "tensorrt" or "tensorrt-rtx" asks for one. With none usable the stage is
  skipped with the reason; with `require_engine` that is an error (exit 3), found before the
  pipeline is even loaded.
- `smoke`: one image with the best backend available: the engines' when this machine runs them
  (TensorRT-RTX engines need an RTX GPU), else ONNX Runtime (its CUDA provider when
  onnxruntime-gpu sees a GPU, else the CPU).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts.engines import RuntimeTarget
from ..artifacts.manifest import Manifest
from ..check import CheckReport, check_graphs
from ..core.errors import InvalidInputError, MissingDependencyError
from ..core.gag_config import DEFAULT_EXPORT_GAG, GAGConfig
from ..core.precision import Precision
from ..core.shapes import ImageShape, check_prompt, require_positive_int
from ..core.tensorrt import (
    FLAVORS,
    TENSORRT,
    TENSORRT_RTX,
    TensorRTFlavor,
    get_flavor,
    trt_features,
)
from ..export import ExportConfig, ExportEvent, export_model
from ..images import require_png_path
from ..models import ModelEntry, descriptors_for, load_pipeline, resolve_entry
from ..models.lora import LoraSpec

log = logging.getLogger(__name__)

BUILD_STAGES = ("load", "export", "check", "engine", "smoke")
ENGINE_BUILDERS = ("auto", *FLAVORS)
SMOKE_PROMPT = "a photo of a red fox in the snow, detailed fur, soft light"


# --------------------------------------------------------------------------------------------
# Configuration, progress and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    """What `gag-export build` was asked for; validated on construction (InvalidInputError).

    model: a registry name or a local diffusers pipeline folder.
    weights: "pretrained" | "random" | "tiny"; None: tiny for tiny-* entries, else pretrained.
    height/width: None means the model's default size. `batch` is the static batch (the opt
        batch of a dynamic export).
    gag: the export's GAG configuration (its scale/eta/zeta become the manifest's defaults and
        the smoke image's values); None exports the unmodified denoiser.
    image: the smoke image's path; None: `<model>-<seed>.png` in the current folder.
    img2img: also export (check, build engines for) the VAE encoder img2img needs.
    loras: `LoraSpec`s fused into the denoiser before GAG and export (recorded in the manifest).
    """

    model: str
    weights: str | None = None
    graphs_root: Path = Path("graphs")
    engines_root: Path = Path("engines")
    height: int | None = None
    width: int | None = None
    batch: int = 1
    dynamic: bool = False
    precision: Precision = Precision.FP32
    gag: GAGConfig | None = DEFAULT_EXPORT_GAG
    prompt: str = SMOKE_PROMPT
    seed: int = 0
    image: Path | None = None
    require_engine: bool = False
    smoke: bool = True
    engine_backend: str = "auto"  # "auto", "tensorrt" or "tensorrt-rtx"
    img2img: bool = False
    loras: tuple[LoraSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        object.__setattr__(self, "loras", tuple(self.loras))
        object.__setattr__(self, "graphs_root", Path(self.graphs_root))
        object.__setattr__(self, "engines_root", Path(self.engines_root))
        if self.image is not None:
            object.__setattr__(self, "image", require_png_path(Path(self.image)))
        check_prompt(self.prompt)
        if self.weights is not None and self.weights not in ("pretrained", "random", "tiny"):
            raise InvalidInputError(f"weights: use pretrained, random or tiny, got {self.weights!r}")
        for name in ("height", "width"):  # None: the model's size
            if getattr(self, name) is not None:
                require_positive_int(name, getattr(self, name))
        require_positive_int("batch", self.batch)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        if self.engine_backend not in ENGINE_BUILDERS:
            raise InvalidInputError(f"engine_backend: use one of {', '.join(ENGINE_BUILDERS)}, got {self.engine_backend!r}")
        if self.gag is not None and not isinstance(self.gag, GAGConfig):
            raise InvalidInputError(f"gag: a GAGConfig or None, got {type(self.gag).__name__}")

    def shape(self, entry: ModelEntry) -> ImageShape:
        return ImageShape(self.height or entry.height, self.width or entry.width, self.batch)

    def image_path(self, entry: ModelEntry) -> Path:
        return self.image if self.image is not None else Path(f"{entry.name}-{self.seed}.png")


@dataclass(frozen=True)
class BuildEvent:
    """Progress for the CLI (this layer does not print).

    stage: one of BUILD_STAGES; state: "start" | "update" | "done" | "reused" | "skipped" | "failed";
    completed/total: a count within the stage when known (components exported, checks run).
    """

    stage: str
    state: str
    message: str = ""
    completed: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class StageRecord:
    name: str
    status: str  # "done" | "reused" | "skipped" | "failed"
    seconds: float
    details: str = ""


@dataclass(frozen=True)
class Artifact:
    """One file the build wrote or reused: what it is, where, how big."""

    kind: str  # "graph" | "manifest" | "engine" | "image"
    name: str
    path: Path
    size_bytes: int
    status: str = "written"  # "written" | "reused" | "built"


@dataclass
class BuildResult:
    """Everything a build did, for the summary; falsy when a check failed."""

    config: BuildConfig
    entry: ModelEntry
    stages: list[StageRecord] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    manifest: Manifest | None = None
    check: CheckReport | None = None
    engines: list = field(default_factory=list)  # engine.EngineRecord
    engine_skip_reason: str | None = None
    engine_builder: str | None = None  # "TensorRT-RTX 1.7.1.116 for sm80_86_89_120_121", say
    backend: str | None = None  # the smoke image's: "tensorrt" | "tensorrt-rtx" | "ort-cuda" | "ort"
    image_path: Path | None = None
    generation: object | None = None  # runtime.GenerationResult

    def __bool__(self) -> bool:
        return self.check is None or bool(self.check)

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def parity(self) -> dict[str, tuple[float, float] | None]:
        """{component: (max abs error, max rel error)} over its outputs; None where parity did not run."""
        out: dict[str, tuple[float, float] | None] = {}
        for name in (self.manifest.components if self.manifest is not None else {}):
            r = self.check.get(name, "parity") if self.check is not None else None
            out[name] = (max(p.max_abs for p in r.parity), max(p.max_rel for p in r.parity)) if r and r.parity else None
        return out

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def raise_for_failures(self) -> None:
        if self.check is not None:
            self.check.raise_for_failures()


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


class _Stage:
    """Times one stage and reports its start/end as BuildEvents."""

    def __init__(self, result: BuildResult, name: str, notify: Callable[[BuildEvent], None], message: str):
        self.result, self.name, self.notify, self.message = result, name, notify, message
        self.status, self.details = "done", ""

    def __enter__(self) -> "_Stage":
        self.start = time.perf_counter()
        self.notify(BuildEvent(self.name, "start", self.message))
        return self

    def finish(self, status: str, details: str = "") -> None:
        self.status, self.details = status, details

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "failed" if exc_type is not None else self.status
        details = self.details if exc is None else (str(exc).splitlines() or [type(exc).__name__])[0]
        self.result.stages.append(StageRecord(self.name, status, time.perf_counter() - self.start, details))
        self.notify(BuildEvent(self.name, status, details))


def engine_flavor(choice: str) -> TensorRTFlavor:
    """The builder a build uses: the one asked for, or for "auto" TensorRT where it imports and a GPU
    is visible (it builds on the GPU), else TensorRT-RTX where it imports (no GPU needed), else
    `MissingDependencyError` saying how to get either."""

    if choice != "auto":
        return get_flavor(choice)
    reasons = []
    for flavor in (TENSORRT, TENSORRT_RTX):
        try:
            if not flavor.ahead_of_time:
                RuntimeTarget.current(trt_features(flavor))
            else:
                trt_features(flavor)
            return flavor
        except MissingDependencyError as exc:
            reasons.append((str(exc).splitlines() or [flavor.label])[0])
    raise MissingDependencyError(
        f"no engine builder here: {'; '.join(reasons)}. TensorRT-RTX builds on any machine: `{TENSORRT_RTX.install}`"
    )


def _check_engine_requirements(choice: str) -> None:
    """MissingDependencyError unless the chosen builder can build here (TensorRT: and a GPU)."""

    flavor = engine_flavor(choice)
    caps = trt_features(flavor)
    if not flavor.ahead_of_time:
        RuntimeTarget.current(caps)


def _smoke_backend(result: "BuildResult") -> tuple[str, str, str]:
    """(runtime backend, label, note) of the best backend available: the engines' > ort-cuda > ort."""
    if result.engines:

        flavor = get_flavor(result.engines[0].sidecar.flavor)
        try:
            RuntimeTarget.current(trt_features(flavor))
        except MissingDependencyError as exc:
            note = f"{flavor.label} engines not run here ({(str(exc).splitlines() or [''])[0]})"
        else:
            return flavor.name, flavor.name, ""
    else:
        note = ""
    from ..runtime.ort_backend import ort_providers  # noqa: PLC0415

    return "ort", "ort-cuda" if "CUDAExecutionProvider" in ort_providers() else "ort", note


def run_build(config: BuildConfig, progress: Callable[[BuildEvent], None] | None = None) -> BuildResult:
    """Run every stage of a build (see the module docstring); return what was done and written.

    Raises the layers' errors as they come (InvalidInputError, WeightsNotFoundError,
    ArtifactError, ResourceExhaustedError, MissingDependencyError with `require_engine`). A failed
    check does not raise: the result is falsy, later stages are skipped, and
    `result.raise_for_failures()` raises the CheckFailedError.
    """
    notify = progress or (lambda event: None)
    entry = resolve_entry(config.model)
    shape = config.shape(entry)
    descriptors = descriptors_for(entry)  # no weights: checks the size against the model before any loading
    denoiser = next(d for d in descriptors if d.role == "denoiser")
    shape.require_multiple(int(denoiser.pixel_multiple), f"{entry.family} ({entry.name})")
    if config.require_engine:
        _check_engine_requirements(config.engine_backend)  # exit 3 in a second, not after a long export
    result = BuildResult(config, entry)

    export_config = ExportConfig(  # before loading: bad settings fail in a second
        model=entry.name, out_dir=config.graphs_root, shape=shape, dynamic=config.dynamic, precision=config.precision,
        gag=config.gag, weights=config.weights, seed=config.seed, img2img=config.img2img, loras=config.loras,
    )
    with _Stage(result, "load", notify, f"loading {entry.name} ({config.weights or 'default'} weights)"):
        pipe = load_pipeline(entry, weights=config.weights)

    with _Stage(result, "export", notify, f"exporting {entry.name} to {export_config.graphs_dir}") as stage:
        def on_export(event: ExportEvent) -> None:
            notify(BuildEvent("export", "update", f"{event.component}: {event.stage} {event.message}".strip(),
                              completed=event.index + (event.stage == "done"), total=event.total))

        # handed over: each component's weights go once exported (the check uses recorded references)
        manifest = export_model(pipe, entry, export_config, progress=on_export, release=True)
        result.manifest = manifest
        stage.finish("done", f"{len(manifest.components)} graphs, {manifest.precision.value}, "
                             f"{'dynamic' if config.dynamic else 'static'} {shape.height}x{shape.width}")
    for name, comp in manifest.components.items():
        result.artifacts.append(Artifact("graph", name, manifest.graph_path(name), int(comp["size_bytes"])))
    result.artifacts.append(Artifact("manifest", "manifest.json", manifest.path, manifest.path.stat().st_size))

    # What the sampler needs besides the graphs (tokenizers, scheduler config, descriptors: no
    # weights, which the export released); the check compares with torch's outputs recorded at
    # export, so no pipeline is held while ONNX Runtime loads a graph (an fp32 SDXL pipeline and
    # an ORT session of its fp16 UNet do not fit in 24 GB together).
    from ..runtime import SamplerAssets  # noqa: PLC0415

    assets = SamplerAssets.from_pipeline(pipe)
    descriptors = {d.name: d for d in descriptors_for(entry, pipe, img2img=config.img2img)}
    pipe = None
    gc.collect()
    with _Stage(result, "check", notify, f"checking {manifest.graphs_dir}") as stage:
        checks_total = len(manifest.components) * 7
        counter = {"n": 0}

        def on_check(component: str, check: str) -> None:
            counter["n"] += 1
            notify(BuildEvent("check", "update", f"{component}: {check}", completed=min(counter["n"], checks_total),
                              total=checks_total))

        report = check_graphs(manifest.graphs_dir, parity=True, entry=entry, seed=config.seed, progress=on_check)
        result.check = report
        failed = report.failures()
        stage.finish("failed" if failed else "done",
                     f"{len(failed)} failed: " + ", ".join(f"{r.component}/{r.check}" for r in failed) if failed
                     else f"{sum(r.passed for r in report.results)} passed, "
                          f"{sum(r.status == 'skipped' for r in report.results)} skipped")

    if not report:
        for name in ("engine", "smoke"):
            result.stages.append(StageRecord(name, "skipped", 0.0, "a check failed"))
            notify(BuildEvent(name, "skipped", "a check failed"))
        return result

    _engine_stage(config, result, manifest, notify)
    if config.smoke:
        _smoke_stage(config, result, entry, assets, descriptors, notify)
    else:
        result.stages.append(StageRecord("smoke", "skipped", 0.0, "--skip-smoke"))
        notify(BuildEvent("smoke", "skipped", "--skip-smoke"))
    return result


def _engine_stage(config: BuildConfig, result: BuildResult, manifest: Manifest, notify) -> None:
    from .. import engine  # noqa: PLC0415

    with _Stage(result, "engine", notify, f"building engines into {config.engines_root}") as stage:
        try:
            flavor = engine_flavor(config.engine_backend)
            records = engine.build(manifest.graphs_dir, config.engines_root, engine.EngineOptions(backend=flavor.name))
        except MissingDependencyError as exc:
            if config.require_engine:
                raise
            reason = (str(exc).splitlines() or ["no engine builder is available"])[0]
            result.engine_skip_reason = reason
            stage.finish("skipped", reason)
            return
        result.engines = records
        built = sum(r.status == "built" for r in records)
        if records:
            first = records[0].sidecar
            result.engine_builder = f"{first.builder_label} for {first.gpu_name or first.sm_tag}"
        stage.finish("reused" if records and not built else "done",
                     f"{built} built, {len(records) - built} reused from the cache ({result.engine_builder})")
    for r in records:
        result.artifacts.append(Artifact("engine", r.component, r.path, r.path.stat().st_size,
                                         "built" if r.status == "built" else "reused"))


def _smoke_stage(config: BuildConfig, result: BuildResult, entry: ModelEntry, assets, descriptors, notify) -> None:
    from ..runtime import GenerationConfig, Sampler, load_components  # noqa: PLC0415
    from ..runtime.sampler import static_batch_reason  # noqa: PLC0415

    backend, label, note = _smoke_backend(result)
    path = config.image_path(entry)
    with _Stage(result, "smoke", notify, f"generating one image on {label}") as stage:
        if backend == "ort" and label == "ort" and result.manifest.precision is Precision.BF16:
            stage.finish("skipped", "bf16 graphs cannot run on ONNX Runtime's CPU provider (no bfloat16 kernels)")
            return
        batch_reason = static_batch_reason(result.manifest)
        if batch_reason:
            stage.finish("skipped", batch_reason)
            return
        components = load_components(entry.name, backend, graphs=config.graphs_root, engines=config.engines_root)
        sampler = Sampler(entry, components, assets, descriptors)
        gag = sampler.gag_params() if config.gag is not None else None
        shape = config.shape(entry)
        request = GenerationConfig(config.prompt, seed=config.seed, height=shape.height, width=shape.width, gag=gag)
        with sampler:
            generation = sampler.generate(request)
        result.image_path = generation.save(path)
        result.backend, result.generation = label, generation
        stage.finish("done", f"{generation.width}x{generation.height}, {generation.steps} steps on {label}"
                             + (f"; {note}" if note else ""))
    result.artifacts.append(Artifact("image", path.name, result.image_path, result.image_path.stat().st_size))


__all__ = ["BuildConfig", "BuildEvent", "BuildResult", "StageRecord", "Artifact", "run_build", "engine_flavor", "BUILD_STAGES",
           "SMOKE_PROMPT", "ENGINE_BUILDERS"]
