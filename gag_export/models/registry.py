"""The models gag-export knows by name: where their weights live and how they are sampled.

    entry = get_entry("dmd2")
    entry.source.denoiser_file              # "dmd2_sdxl_4step_unet_fp16.bin"
    entry.scheduler.timesteps_for(4)        # (999, 749, 499, 249)
    entry.scheduler.build(pipe.scheduler.config)

Schedules follow each model card: the scheduler class and options, the step counts the model
was distilled for, and fixed timesteps where the card prescribes them (passed to the pipeline
as `timesteps=`). `cfg_scale` is None for distilled models (no classifier-free guidance, one
denoiser call per step); `embedded_guidance` is a guidance value the model takes as an input
(LCM-SDXL's w-embedding via `timestep_cond`, FLUX-dev's `guidance`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.errors import InvalidInputError
from ..core.names import FAMILIES


def _frozen(mapping: Mapping | None) -> Mapping:
    return types.MappingProxyType(dict(mapping or {}))


def _hashable(mapping: Mapping) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in mapping.items()))


@dataclass(frozen=True)
class SchedulerSpec:
    """How a model is sampled: diffusers scheduler class and options, step counts, fixed timesteps.

    class_name: a diffusers scheduler class ("LCMScheduler", "EulerDiscreteScheduler", ...).
    kwargs: options over the checkpoint's scheduler config (e.g. timestep_spacing="trailing").
    default_steps / min_steps / max_steps: the step counts the model supports.
    timesteps: {steps: fixed timesteps} where the model card prescribes them.
    call_kwargs: extra pipeline-call arguments the card uses (TCD's `eta`).
    """

    class_name: str
    default_steps: int
    min_steps: int = 1
    max_steps: int | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timesteps: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_steps", self.default_steps if self.max_steps is None else self.max_steps)
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))
        object.__setattr__(self, "call_kwargs", _frozen(self.call_kwargs))
        object.__setattr__(self, "timesteps", _frozen({int(k): tuple(v) for k, v in self.timesteps.items()}))
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError(f"{self.class_name}: default_steps outside [min_steps, max_steps]")
        for steps, fixed in self.timesteps.items():
            if len(fixed) != steps:
                raise ValueError(f"{self.class_name}: {steps} steps need {steps} timesteps, got {fixed}")

    def __hash__(self) -> int:
        return hash((self.class_name, self.default_steps, self.min_steps, self.max_steps,
                     _hashable(self.kwargs), _hashable(self.timesteps), _hashable(self.call_kwargs)))

    def check_steps(self, steps: int) -> int:
        if not isinstance(steps, int) or isinstance(steps, bool) or not self.min_steps <= steps <= self.max_steps:
            allowed = f"{self.min_steps}" if self.min_steps == self.max_steps else f"{self.min_steps}..{self.max_steps}"
            raise InvalidInputError(f"steps: this model samples with {allowed} steps, got {steps!r}")
        return steps

    def timesteps_for(self, steps: int) -> tuple[int, ...] | None:
        """The prescribed timesteps for this step count, or None to let the scheduler space them."""
        return self.timesteps.get(self.check_steps(steps))

    def build(self, base_config: Mapping | None = None):
        """The scheduler: `class_name.from_config(base_config, **kwargs)` (base: the checkpoint's config)."""
        import diffusers

        scheduler_cls = getattr(diffusers, self.class_name)
        return scheduler_cls.from_config(dict(base_config or {}), **dict(self.kwargs))


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from on the Hugging Face Hub (None for built-in tiny models).

    repo_id: the diffusers pipeline repo (text encoders, VAE, scheduler config; the denoiser too
        unless `denoiser_repo` is given).
    denoiser_repo / denoiser_file: a replacement UNet/transformer: a single file (safetensors or a
        torch `.bin` state dict, diffusers key layout) or, without a file, a diffusers model repo.
    variant: a weights variant to fall back to in `repo_id` (e.g. "fp16" files only).
    """

    repo_id: str | None
    denoiser_repo: str | None = None
    denoiser_file: str | None = None
    variant: str | None = None

    def describe(self) -> str:
        if self.repo_id is None:
            return "built-in tiny config"
        if self.denoiser_repo is None:
            return self.repo_id
        denoiser = f"{self.denoiser_repo}/{self.denoiser_file}" if self.denoiser_file else self.denoiser_repo
        return f"{self.repo_id} + {denoiser}"


@dataclass(frozen=True)
class ModelEntry:
    """A named model: family, weights source, default size, schedule and guidance."""

    name: str
    family: str
    description: str
    source: WeightsSource
    height: int
    width: int
    scheduler: SchedulerSpec
    cfg_scale: float | None = None
    embedded_guidance: float | None = None
    # T5 max_sequence_length (FLUX); SDXL's CLIP length is fixed at 77.
    text_len: int | None = None
    # Overrides over the family's full-size configs, per component (random weights, descriptors
    # without a loaded pipeline), e.g. LCM-SDXL's UNet has `time_cond_proj_dim`.
    config_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}")
        object.__setattr__(self, "config_overrides", _frozen({k: _frozen(v) for k, v in self.config_overrides.items()}))

    def __hash__(self) -> int:
        return hash((self.name, self.family, self.source, self.scheduler))

    @property
    def is_tiny(self) -> bool:
        return self.source.repo_id is None

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale is not None


# --------------------------------------------------------------------------- entries

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

DMD2_4STEP = SchedulerSpec(
    "LCMScheduler", default_steps=4, min_steps=1, max_steps=4, timesteps={4: (999, 749, 499, 249)}
)
SCHNELL = SchedulerSpec("FlowMatchEulerDiscreteScheduler", default_steps=4, min_steps=1, max_steps=4)

_ENTRIES = (
    ModelEntry(
        name="dmd2",
        family="sdxl",
        description="DMD2 4-step distilled SDXL UNet (Yin et al. 2024) on SDXL base",
        source=WeightsSource(SDXL_BASE, "tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", variant="fp16"),
        height=1024,
        width=1024,
        scheduler=DMD2_4STEP,
    ),
    ModelEntry(
        name="dmd2-1step",
        family="sdxl",
        description="DMD2 1-step distilled SDXL UNet on SDXL base",
        source=WeightsSource(SDXL_BASE, "tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin", variant="fp16"),
        height=1024,
        width=1024,
        scheduler=SchedulerSpec("LCMScheduler", default_steps=1, timesteps={1: (399,)}),
    ),
    ModelEntry(
        name="sdxl-turbo",
        family="sdxl",
        description="SDXL-Turbo (adversarial diffusion distillation), 1-4 steps at 512x512",
        source=WeightsSource("stabilityai/sdxl-turbo", variant="fp16"),
        height=512,
        width=512,
        scheduler=SchedulerSpec(
            "EulerAncestralDiscreteScheduler", default_steps=1, min_steps=1, max_steps=4,
            kwargs={"timestep_spacing": "trailing"},
        ),
        config_overrides={"unet": {"sample_size": 64}},
    ),
    ModelEntry(
        name="hyper-sdxl-1step",
        family="sdxl",
        description="Hyper-SDXL 1-step UNet (ByteDance Hyper-SD) on SDXL base, TCD at t=800",
        source=WeightsSource(SDXL_BASE, "ByteDance/Hyper-SD", "Hyper-SDXL-1step-Unet.safetensors", variant="fp16"),
        height=1024,
        width=1024,
        scheduler=SchedulerSpec("TCDScheduler", default_steps=1, timesteps={1: (800,)}, call_kwargs={"eta": 1.0}),
    ),
    ModelEntry(
        name="sdxl-lightning-4step",
        family="sdxl",
        description="SDXL-Lightning 4-step UNet (ByteDance) on SDXL base",
        source=WeightsSource(SDXL_BASE, "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors", variant="fp16"),
        height=1024,
        width=1024,
        # The card: use the checkpoint made for the step count (1, 2, 4 and 8-step files exist).
        scheduler=SchedulerSpec(
            "EulerDiscreteScheduler", default_steps=4, min_steps=4, kwargs={"timestep_spacing": "trailing"}
        ),
    ),
    ModelEntry(
        name="lcm-sdxl",
        family="sdxl",
        description="Latent Consistency Model SDXL UNet on SDXL base, 2-8 steps, w-embedded guidance",
        source=WeightsSource(SDXL_BASE, "latent-consistency/lcm-sdxl", None, variant="fp16"),
        height=1024,
        width=1024,
        scheduler=SchedulerSpec("LCMScheduler", default_steps=4, min_steps=2, max_steps=8),
        embedded_guidance=8.0,
        config_overrides={"unet": {"time_cond_proj_dim": 256}},
    ),
    ModelEntry(
        name="sdxl",
        family="sdxl",
        description="SDXL base 1.0 with classifier-free guidance (the undistilled reference)",
        source=WeightsSource(SDXL_BASE, variant="fp16"),
        height=1024,
        width=1024,
        scheduler=SchedulerSpec("EulerDiscreteScheduler", default_steps=30, min_steps=1, max_steps=100),
        cfg_scale=5.0,
    ),
    ModelEntry(
        name="flux-schnell",
        family="flux",
        description="FLUX.1-schnell (timestep-distilled rectified flow transformer), 1-4 steps",
        source=WeightsSource("black-forest-labs/FLUX.1-schnell"),
        height=1024,
        width=1024,
        scheduler=SCHNELL,
        text_len=256,
    ),
    ModelEntry(
        name="tiny-sdxl",
        family="sdxl",
        description="tiny random SDXL-architecture pipeline built in code (tests, CPU smoke runs)",
        source=WeightsSource(None),
        height=64,
        width=64,
        scheduler=DMD2_4STEP,
    ),
    ModelEntry(
        name="tiny-flux",
        family="flux",
        description="tiny random FLUX-architecture pipeline built in code (tests, CPU smoke runs)",
        source=WeightsSource(None),
        height=64,
        width=64,
        scheduler=SCHNELL,
        text_len=32,
    ),
)

_BY_NAME = {entry.name: entry for entry in _ENTRIES}


def list_entries() -> list[ModelEntry]:
    """All registered models, in registry order."""
    return list(_ENTRIES)


def get_entry(name: str) -> ModelEntry:
    """The entry named `name`; InvalidInputError listing the known names otherwise."""
    if isinstance(name, ModelEntry):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise InvalidInputError(
            f"unknown model {name!r}; known models: {', '.join(_BY_NAME)} (or a local diffusers folder)"
        ) from None
