"""What a generation is asked for and what it returns: GAG parameters, the request, stage timings,
the result and the PNG metadata it is saved with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.errors import InvalidInputError
from ..core.gag_config import GAGConfig
from ..core.shapes import check_prompt, require_positive_int
from ..images import save_png


@dataclass(frozen=True)
class GAGParams:
    """Guidance values fed to the denoiser graph per call (validated like `GAGConfig`)."""

    scale: float = 10.0
    eta: float = 15.0
    zeta: float = 0.0

    def __post_init__(self) -> None:
        GAGConfig(scale=self.scale, eta=self.eta, zeta=self.zeta)  # InvalidInputError naming the field

    def feed(self) -> dict[str, np.ndarray]:
        return {
            "gag_scale": np.array(self.scale, dtype=np.float32),
            "gag_eta": np.array(self.eta, dtype=np.float32),
            "gag_zeta": np.array(self.zeta, dtype=np.float32),
        }


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
        "gag_scale": "" if gag is None else repr(float(gag.scale)),
        "gag_eta": "" if gag is None else repr(float(gag.eta)),
        "gag_zeta": "" if gag is None else repr(float(gag.zeta)),
        **({"init_image": config.image_source or "(in memory)", "strength": repr(strength)}
           if config.image is not None else {}),
        "gag_export_version": __version__,
        "Software": f"gag-export {__version__}",
    }
    return data


__all__ = ["IDENTITY_GAG", "GAGParams", "GenerationConfig", "GenerationResult", "StageTimings", "build_metadata"]
