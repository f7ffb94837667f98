"""Running a model with GAG over a prompt set and recording its pre-cap update norms.

The run is the runtime's own: a torch `Sampler` over the pipeline (the same loop `generate` runs),
with an observer on the GAG layers (`GuidanceParams.observe`) and two hooks on the denoiser that
say which sampling step each call belongs to. Only the statistics are kept (`stats.NormStats`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ...core.errors import GagExportError, InvalidInputError
from ...core.gag_config import DEFAULT_EXPORT_GAG, ENTMAX_METHODS, GAGConfig
from ...core.shapes import check_prompt
from ...models.loading import WEIGHTS_KINDS
from ..evaluate import default_prompts
from .stats import DEFAULT_ETA_GRID, RESOLUTION, NormStats

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration. None means the model's default (steps, size, weights); prompts () the shipped set.

    gag: the guidance the model runs with while it is measured (scale, eta, zeta, alpha, layers):
        the norms a layer sees depend on the caps of the layers before it, so measure with the
        values you deploy. Its method is forced to an entmax method ("auto"/"fused" -> "bisect"):
        the fused kernel is CUDA only and computes the norm out of reach of the observer.
    clip_share: the rule's knob: recommend, per layer, the eta that caps this share of tokens.
    step_tolerance: recommend per-step values for a layer only where a step's differs from the
        layer's by more than this (relative); the histogram's own resolution is RESOLUTION (4.7%).
    """

    model: str
    prompts: tuple[str, ...] = ()
    steps: int | None = None
    seed: int = 0
    weights: str | None = None
    height: int | None = None
    width: int | None = None
    gag: GAGConfig = DEFAULT_EXPORT_GAG
    clip_share: float = 0.1
    step_tolerance: float = 0.25
    eta_grid: tuple[float, ...] = DEFAULT_ETA_GRID
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(check_prompt(p) for p in self.prompts) or default_prompts())
        if self.gag.method not in ENTMAX_METHODS:
            object.__setattr__(self, "gag", replace(self.gag, method="bisect"))
        if not (isinstance(self.clip_share, (int, float)) and 0 < self.clip_share < 1):
            raise InvalidInputError(f"--clip-share: must be in (0, 1), got {self.clip_share!r}")
        if not (isinstance(self.step_tolerance, (int, float)) and self.step_tolerance > RESOLUTION):
            raise InvalidInputError(f"--step-tolerance: must be above the histogram's resolution ({RESOLUTION:.3f}), "
                                    f"got {self.step_tolerance!r}")
        grid = tuple(sorted({float(v) for v in self.eta_grid}))
        if not grid or any(not math.isfinite(v) or v <= 0 for v in grid):
            raise InvalidInputError(f"--eta-grid: finite values > 0 needed, got {list(self.eta_grid)}")
        object.__setattr__(self, "eta_grid", grid)
        if self.weights is not None and self.weights not in WEIGHTS_KINDS:
            raise InvalidInputError(f"--weights: use one of {', '.join(WEIGHTS_KINDS)}, got {self.weights!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"--seed: must be an integer in [0, 2**63), got {self.seed!r}")


@dataclass
class Calibration:
    """What a run measured: the layers in `apply_gag`'s order, the steps, and their statistics."""

    config: CalibrationConfig
    family: str
    layer_names: list[str]
    steps: int
    stats: NormStats
    seconds: float = 0.0
    timesteps: list[float] = field(default_factory=list)


def _calls_per_step(sampler) -> int:
    """Denoiser calls per sampling step: two where classifier-free guidance runs uncond and cond apart."""
    family = sampler.family
    return 2 if getattr(family, "cfg", False) and not getattr(family, "batched_cfg", False) else 1


class _StepTracker:
    """Hooks on the denoiser: which step the current call belongs to, and a callback per finished step."""

    def __init__(self, calls_per_step: int, on_step: Callable[[], None]):
        self.calls_per_step = calls_per_step
        self.on_step = on_step
        self.calls = 0

    @property
    def step(self) -> int:
        return self.calls // self.calls_per_step

    def after_call(self, module, args, output) -> None:
        self.calls += 1
        if self.calls % self.calls_per_step == 0:
            self.on_step()


def run_calibration(config: CalibrationConfig, progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Sample every prompt with GAG on (torch) and record the pre-cap update norms per layer and step.

    `progress(done, total)` is called after every sampling step (total = prompts x steps).
    Bad input (model, steps, size, weights) fails before any weights are loaded.
    """
    from ...gag.attention import gag_layer_names, guidance_params  # noqa: PLC0415
    from ...models import denoiser_module, descriptors_for, load_pipeline, resolve_entry  # noqa: PLC0415
    from ...runtime import BackendOptions, GAGParams, GenerationConfig, Sampler, SamplerAssets, check_request  # noqa: PLC0415
    from ...runtime.torch_backend import torch_component_set  # noqa: PLC0415

    entry = resolve_entry(config.model)
    weights = config.weights or ("tiny" if entry.is_tiny else "pretrained")
    if entry.is_tiny != (weights == "tiny"):
        raise InvalidInputError(f"{entry.name}: --weights tiny is for tiny-* models (and they take no other)")
    request = GenerationConfig(config.prompts[0], seed=config.seed, steps=config.steps, height=config.height,
                               width=config.width, gag=GAGParams(config.gag.scale, config.gag.eta, config.gag.zeta))
    steps, _ = check_request(entry, request)
    options = BackendOptions(device=config.device)

    pipe = load_pipeline(entry, weights=weights, seed=config.seed)
    components = torch_component_set(entry, pipe, config.gag, options)  # applies GAG to the denoiser
    denoiser = denoiser_module(pipe)
    names = gag_layer_names(denoiser)  # in the order of per-layer values
    sampler = Sampler(entry, components, SamplerAssets.from_pipeline(pipe),
                      {d.name: d for d in descriptors_for(entry, pipe, img2img=True)})
    modules = dict(denoiser.named_modules())
    layer_of = {id(modules[name]): index for index, name in enumerate(names)}
    stats = NormStats(len(names), steps, config.eta_grid)
    total, done = len(config.prompts) * steps, 0

    def finished_step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    tracker = _StepTracker(_calls_per_step(sampler), finished_step)

    def observe(attn, norms) -> None:
        stats.add(layer_of[id(attn)], tracker.step, norms.detach().float().cpu().numpy())

    start, timesteps = time.perf_counter(), []
    handle = denoiser.register_forward_hook(tracker.after_call)
    try:
        with sampler, guidance_params(denoiser).observe(observe):
            for prompt in config.prompts:
                tracker.calls = 0
                result = sampler.generate(replace(request, prompt=prompt, steps=steps))
                if tracker.calls != steps * tracker.calls_per_step:
                    raise GagExportError(f"calibration expected {steps * tracker.calls_per_step} denoiser calls for "
                                         f"{steps} steps, counted {tracker.calls} (a bug)")
                timesteps = list(result.timesteps)
    finally:
        handle.remove()
    if stats.nonfinite:
        log.warning("%d update norms were NaN/inf (guidance too strong?) and are left out of the statistics",
                    stats.nonfinite)
    empty = [(names[i], s) for i in range(len(names)) for s in range(steps) if stats.count[i, s] == 0]
    if empty:
        raise GagExportError(f"calibration saw no finite update norm at (layer, step) {empty[:3]}: guidance diverged "
                             "(lower --gag-scale)")
    return Calibration(config, entry.family, names, steps, stats, time.perf_counter() - start, timesteps)


__all__ = ["Calibration", "CalibrationConfig", "run_calibration"]
