"""Image-to-image: the input image through the VAE encoder, noised to the first timestep that the
strength leaves, then the sampler's usual loop. GAG needs nothing here: it lives in the denoiser.

Line for line what diffusers' `StableDiffusionXLImg2ImgPipeline` and `FluxImg2ImgPipeline` do, so a
seed gives their image: the schedule is cut by `strength` (their `get_timesteps`, whose rounding
differs between the two: SDXL truncates steps x strength, FLUX keeps it fractional), the encoder's
moments are sampled with the request's generator (`DiagonalGaussianDistribution.sample`) before the
noise is drawn, and the image is brought into denoiser space by the VAE's scaling (and FLUX's shift).
The per-family noising (SDXL: `scheduler.add_noise`; FLUX: `scale_noise`, then packing) is in
`conditioning`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import InvalidInputError
from ..core.shapes import ImageShape

log = logging.getLogger(__name__)

# diffusers' defaults when a caller gives an image and no strength (the two pipelines differ)
DEFAULT_STRENGTH = {"sdxl": 0.3, "flux": 0.6}


def check_strength(strength: Any) -> float:
    """A strength in (0, 1], else InvalidInputError: 0 would leave no step, > 1 is no image-to-image."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < float(strength) <= 1:
        raise InvalidInputError(f"strength: must be in (0, 1], got {strength!r}")
    return float(strength)


def load_image(image: Any):
    """A PIL RGB image from a PIL image, a path, or an [H, W, 3] uint8 array; InvalidInputError otherwise."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(f"image: an array must be [height, width, 3] uint8, got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image, "RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except FileNotFoundError:
            raise InvalidInputError(f"image: {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInputError(f"image: {path} is not an image this machine can read ({exc})") from None
    raise InvalidInputError(f"image: expected a path, a PIL image or a uint8 array, got {type(image).__name__}")


def image_shape(image, multiple: int) -> ImageShape:
    """The size diffusers' img2img pipelines generate at for an image: its own, rounded down to `multiple`."""
    width, height = image.size
    shape = ImageShape(height - height % multiple, width - width % multiple)
    if shape.height == 0 or shape.width == 0:
        raise InvalidInputError(f"image: {width}x{height} is smaller than the model's {multiple}-pixel grid")
    return shape


def pixels(image, shape: ImageShape, vae_scale_factor: int) -> np.ndarray:
    """[1, 3, H, W] float32 in [-1, 1], as `VaeImageProcessor.preprocess` makes it; resized (with a
    note) when the image is not the generation's size, e.g. for graphs exported at a static size."""
    from diffusers.image_processor import VaeImageProcessor  # noqa: PLC0415

    if image.size != (shape.width, shape.height):
        log.info("resizing the input image from %dx%d to %dx%d (the generation's size)",
                 image.size[0], image.size[1], shape.width, shape.height)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    return processor.preprocess(image, height=shape.height, width=shape.width).float().numpy()


def cut_schedule(scheduler, timesteps: torch.Tensor, strength: float, fractional: bool) -> torch.Tensor:
    """The timesteps `strength` leaves (the pipelines' `get_timesteps`); InvalidInputError when none.

    SDXL: int(steps x strength) steps are run; FLUX: steps - int(steps - steps x strength). Both
    tell the scheduler where it begins (`set_begin_index`), as the pipelines do.
    """
    order = getattr(scheduler, "order", 1)
    steps = len(timesteps) // order
    kept = min(steps * strength, steps) if fractional else min(int(steps * strength), steps)
    start = int(max(steps - kept, 0))
    if steps - start < 1:
        raise InvalidInputError(
            f"strength: {strength:g} of {steps} step(s) leaves no step to run (steps x strength must be at least 1); "
            "raise --strength or --steps"
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    return timesteps[start * order:]


def sample_latents(moments: np.ndarray, generator: torch.Generator, scaling_factor: float,
                   shift_factor: float) -> torch.Tensor:
    """Encoder moments -> denoiser-space latents: a sample of the posterior drawn with the request's
    generator (diffusers' own distribution class), then (z - shift) x scaling."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: PLC0415

    posterior = DiagonalGaussianDistribution(torch.from_numpy(np.asarray(moments, dtype=np.float32)))
    latents = posterior.sample(generator)
    if shift_factor:
        latents = latents - shift_factor
    return latents * scaling_factor


__all__ = ["DEFAULT_STRENGTH", "check_strength", "cut_schedule", "image_shape", "load_image", "pixels", "sample_latents"]
