"""What a generation is asked for and what it returns: GAG parameters, the request, stage timings,
the result and the PNG metadata it is saved with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..core.errors import InvalidInputError
from ..core.gag_config import GAGConfig, GuidanceValue, guidance_value
from ..core.shapes import check_prompt, require_positive_int
from ..images import save_png


@dataclass(frozen=True)
class GAGParams:
    """Guidance values fed to the denoiser graph per call (validated like `GAGConfig`).

    `scale`, `eta`: one number for every rewritten layer, or a sequence with one per layer (in the
    manifest's `gag.layer_names` order; its length is checked against the graph when fed).
    `scale_steps`, `eta_steps`: a per-step schedule, one number per denoising step, the last one
    repeating (so `(15, 10)` is 15 at the first step, 10 after); a step's value replaces `scale` /
    `eta` for every layer at that step. Empty: the same values at every step.
    """

    scale: GuidanceValue = 10.0
    eta: GuidanceValue = 15.0
    zeta: float = 0.0
    scale_steps: tuple[float, ...] = ()
    eta_steps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        GAGConfig(zeta=self.zeta)  # InvalidInputError naming the field
        for name in ("scale", "eta"):
            value = getattr(self, name)
            layers = len(value) if isinstance(value, (list, tuple)) else None
            object.__setattr__(self, name, guidance_value(name, value, layers))
            steps = getattr(self, f"{name}_steps")
            if not isinstance(steps, (list, tuple)):
                raise InvalidInputError(f"{name}_steps: one value per step (a sequence), got {steps!r}")
            for index, entry in enumerate(steps):
                try:
                    guidance_value(name, entry)
                except InvalidInputError as exc:
                    raise InvalidInputError(f"{name}_steps[{index}]: {exc}") from None
            object.__setattr__(self, f"{name}_steps", tuple(float(entry) for entry in steps))

    def check_steps(self, steps: int) -> None:
        """A schedule longer than the steps run would be ignored in part: refused."""
        for name in ("scale_steps", "eta_steps"):
            if len(getattr(self, name)) > steps:
                raise InvalidInputError(f"{name}: {len(getattr(self, name))} values for {steps} denoising steps "
                                        "(one per step, the last repeating; give at most one per step)")

    def at_step(self, index: int) -> "GAGParams":
        """The values of denoising step `index` (0-based), the schedule applied."""
        def pick(schedule, value):
            return schedule[min(index, len(schedule) - 1)] if schedule else value
        return GAGParams(pick(self.scale_steps, self.scale), pick(self.eta_steps, self.eta), self.zeta)

    def feed(self, shapes: Mapping[str, tuple] | None = None) -> dict[str, np.ndarray]:
        """The `gag_*` inputs for a graph declaring these `shapes` (absent: 0-d). A number fills an
        [L] input; per-layer values must match L and cannot go to a 0-d input (an older export)."""
        shapes = shapes or {}
        feed = {}
        for name, value in (("gag_scale", self.scale), ("gag_eta", self.eta), ("gag_zeta", self.zeta)):
            shape = tuple(shapes.get(name, ()))
            if name != "gag_zeta":
                guidance_value(name[4:], value, shape[0] if shape else None)
            feed[name] = np.broadcast_to(np.asarray(value, dtype=np.float32), shape).copy()
        return feed


# scale = -1, zeta = 1, eta = 1e9: out = S + (-1)(D - S) = D, the unmodified attention (GAG.md).
IDENTITY_GAG = GAGParams(scale=-1.0, eta=1e9, zeta=1.0)


@dataclass(frozen=True)
class GenerationConfig:
    """One image request. None means the model's default (steps, size); `gag=None` turns GAG off."""

    prompt: str
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    gag: GAGParams | None = GAGParams()
    negative_prompt: str = ""
    # img2img: a path, PIL image or [H, W, 3] uint8 array (read here, so a bad file fails before any
    # model loads), and how much of the schedule to run on it, in (0, 1] (None: diffusers' default)
    image: Any = field(default=None, compare=False)
    strength: float | None = None
    image_source: str = field(default="", compare=False)  # the path it was read from (PNG metadata)

    def __post_init__(self) -> None:
        from .img2img import check_strength, load_image  # noqa: PLC0415

        if self.image is not None:
            if isinstance(self.image, (str, Path)) and not self.image_source:
                object.__setattr__(self, "image_source", str(self.image))
            object.__setattr__(self, "image", load_image(self.image))
            if self.strength is not None:
                object.__setattr__(self, "strength", check_strength(self.strength))
        elif self.strength is not None:
            raise InvalidInputError("strength: given without an image (it sets how much of an input image is kept)")
        check_prompt(self.prompt)
        check_prompt(self.negative_prompt, "negative prompt")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("height", "width"):  # None: the model's (or the export's) size
            if getattr(self, name) is not None:
                require_positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock seconds per stage of one generation."""

    text_encode: float
    denoise: tuple[float, ...]
    vae_decode: float
    vae_encode: float = 0.0  # img2img only

    @property
    def total(self) -> float:
        return self.text_encode + self.vae_encode + sum(self.denoise) + self.vae_decode

    def rows(self, timesteps: tuple[float, ...] = ()) -> list[tuple[str, float]]:
        """(stage, seconds) in order: text encode, each denoise step (with its timestep), VAE decode, total."""
        labels = [f"denoise step {i + 1}" + (f" (t={_number(timesteps[i])})" if i < len(timesteps) else "")
                  for i in range(len(self.denoise))]
        steps = list(zip(labels, self.denoise))
        encode = [("vae encode", self.vae_encode)] if self.vae_encode else []
        return [("text encode", self.text_encode), *encode, *steps, ("vae decode", self.vae_decode), ("total", self.total)]


@dataclass(frozen=True)
class GenerationResult:
    image: Any  # PIL.Image.Image
    config: GenerationConfig
    model: str
    backend: str
    steps: int
    height: int
    width: int
    timesteps: tuple[float, ...]
    timings: StageTimings
    metadata: dict[str, str] = field(repr=False)
    latents: np.ndarray = field(repr=False)  # final latents fed to the VAE decoder (denoiser space)

    def save(self, path: Path) -> Path:
        """Write the image as PNG with its metadata, atomically."""
        return save_png(self.image, Path(path), self.metadata)


def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def _guidance_text(value: GuidanceValue) -> str:
    """A number as before (repr), per-layer values as a JSON list."""
    return json.dumps(list(value)) if isinstance(value, tuple) else repr(float(value))


def build_metadata(model: str, backend: str, config: GenerationConfig, steps: int, height: int, width: int,
                   timesteps: tuple[float, ...], scheduler: str, strength: float | None = None) -> dict[str, str]:
    """The PNG text chunks of one generation (all values are strings; lists and dicts as JSON)."""
    gag = config.gag
    data = {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "seed": str(config.seed),
        "steps": str(steps),
        "height": str(height),
        "width": str(width),
        "model": model,
        "backend": backend,
        "scheduler": scheduler,
        "timesteps": json.dumps([_number(t) for t in timesteps]),
        "gag": "on" if gag is not None else "off",
        "gag_scale": "" if gag is None else _guidance_text(gag.scale),
        "gag_eta": "" if gag is None else _guidance_text(gag.eta),
        "gag_zeta": "" if gag is None else repr(float(gag.zeta)),
        **({"gag_scale_steps": json.dumps(gag.scale_steps)} if gag is not None and gag.scale_steps else {}),
        **({"gag_eta_steps": json.dumps(gag.eta_steps)} if gag is not None and gag.eta_steps else {}),
        **({"init_image": config.image_source or "(in memory)", "strength": repr(strength)}
           if config.image is not None else {}),
        "gag_export_version": __version__,
        "Software": f"gag-export {__version__}",
    }
    return data


__all__ = ["IDENTITY_GAG", "GAGParams", "GenerationConfig", "GenerationResult", "StageTimings", "build_metadata"]
