"""One sampling loop for every backend and family: prompt -> text encoders -> denoiser steps -> VAE -> PNG.

Layer 7. The loop is the one diffusers' SDXL and FLUX pipelines run, over `Component.infer`
instead of torch modules, so torch, ONNX Runtime and TensorRT share it line for line:

    sampler = Sampler.load("tiny-sdxl", "ort", graphs=Path("graphs"))
    with sampler:
        result = sampler.generate(GenerationConfig("a red fox", seed=1, gag=GAGParams(scale=10)))
    result.save("fox.png")          # PNG with prompt, seed, steps, timesteps, GAG parameters...
    result.timesteps, result.timings

What is diffusers' and what is ours:
- Schedulers are diffusers' (`SchedulerSpec.build` over the checkpoint's scheduler config, then
  `retrieve_timesteps` with the model card's fixed `timesteps=` where it prescribes them); the
  FLUX sigmas/shift, latent packing and image ids are `FluxPipeline`'s own helpers; the LCM
  w-embedding is the SDXL pipeline's `get_guidance_scale_embedding`; images go through
  `VaeImageProcessor.postprocess`. No scheduler math is written here.
- Per family (`SDXLConditioning`, `FluxConditioning`): how a prompt becomes denoiser inputs and
  how latents are laid out. Everything else is shared.

Latents and stochastic scheduler noise come from one `torch.Generator` on the CPU seeded with the
request's seed (as in diffusers), so a seed gives the same image on every backend and run.
GAG parameters are fed per call as the denoiser's `gag_scale`/`gag_eta` ([L], one per rewritten layer;
0-d in older exports) and 0-d `gag_zeta` inputs, per step when the request has a schedule;
"GAG off" on a GAG graph feeds the exact identity (scale -1, zeta 1, eta 1e9: the dense output).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..core.errors import ArtifactError, InvalidInputError
from ..core.names import GAG_INPUTS
from ..core.shapes import ImageShape
from .components import BackendOptions, ComponentSet, parse_backend
from . import img2img
from .conditioning import FAMILY_CONDITIONING, step_kwargs
from .generation import (
    IDENTITY_GAG,
    GAGParams,
    GenerationConfig,
    GenerationResult,
    StageTimings,
    build_metadata,
)
from .loading import load_components

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerAssets:
    """What the loop needs besides the graphs: tokenizers per text encoder and the scheduler's base config."""

    tokenizers: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]

    @classmethod
    def from_pipeline(cls, pipe) -> "SamplerAssets":
        tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2}
        return cls(tokenizers, dict(pipe.scheduler.config))


def load_assets(model, weights: str | None = None, pipe=None) -> SamplerAssets:
    """Tokenizers and scheduler config of a model: from `pipe` when given, else from the registry
    with no model weights loaded (`load_pipeline(..., components=())`)."""
    if pipe is None:
        from ..models import load_pipeline  # noqa: PLC0415

        pipe = load_pipeline(model, weights=weights, components=())
    return SamplerAssets.from_pipeline(pipe)


def static_batch_reason(manifest) -> str | None:
    """Why this export cannot generate (its graphs are static at a batch other than 1), or None.

    The sampler makes one image per request: every graph is fed batch 1 (classifier-free
    guidance's pair goes to the denoiser as two calls or as a batch of two where it takes one).
    """
    batch = manifest.shape().batch
    if manifest.data.get("dynamic") or batch == 1:
        return None
    return (f"the graphs in {manifest.graphs_dir} are static at batch {batch}, and generation runs at batch 1 "
            "(one image per request); export at --batch 1 or with --dynamic to generate from them")


def check_request(entry, config: GenerationConfig, pixel_multiple: int | None = None) -> tuple[int, ImageShape]:
    """(steps, image shape) of a request for `entry`, or InvalidInputError: steps outside the model's
    range, or a size that is not a multiple of the model's latent factor. Needs no weights or graphs."""
    spec = entry.scheduler
    steps = spec.check_steps(spec.default_steps if config.steps is None else config.steps)
    if pixel_multiple is None:
        from ..models import descriptors_for  # noqa: PLC0415

        pixel_multiple = next(d.pixel_multiple for d in descriptors_for(entry) if d.role == "denoiser")
    shape = ImageShape(entry.height if config.height is None else config.height,  # 0 is an error, not the default
                       entry.width if config.width is None else config.width)
    shape.require_multiple(int(pixel_multiple), f"{entry.family} ({entry.name})")
    return steps, shape


class Sampler:
    """Generates images for one model on one backend; activate once (context manager), generate many."""

    def __init__(self, entry, components: ComponentSet, assets: SamplerAssets, descriptors: Mapping[str, Any]):
        self.entry = entry
        self.components = components
        self.assets = assets
        self.descriptors = dict(descriptors)
        denoiser = self.descriptors[components.denoiser.name]
        if components.has_gag_inputs:  # the per-layer input length the graph declares (0: an older 0-d export)
            layers = (components.denoiser.input_spec("gag_eta").shape or (0,))[0]
            denoiser = self.descriptors[denoiser.name] = dataclasses.replace(denoiser, gag_layers=layers)
        self.pixel_multiple = int(denoiser.pixel_multiple)
        self.vae_scale_factor = int(denoiser.vae_scale_factor)
        self.family = FAMILY_CONDITIONING[entry.family](entry, components, assets.tokenizers, self.vae_scale_factor)

    @classmethod
    def load(cls, model: str, backend: str, *, graphs: Path = Path("graphs"), engines: Path = Path("engines"),
             options: BackendOptions = BackendOptions()) -> "Sampler":
        """Components from graphs/ (and engines/) plus tokenizers and scheduler config (InvalidInputError /
        ArtifactError / MissingDependencyError before anything heavy when the request cannot work)."""
        from ..models import descriptors_for  # noqa: PLC0415
        from .exports import model_entry  # noqa: PLC0415

        backend = parse_backend(backend)
        entry = model_entry(model, graphs)
        components = load_components(model, backend, graphs=graphs, engines=engines, options=options)
        weights = components.manifest.data.get("weights") if components.manifest is not None else None
        assets = load_assets(entry, weights, pipe=components.pipe)
        descriptors = {d.name: d for d in descriptors_for(entry, components.pipe, img2img=True)}
        return cls(entry, components, assets, descriptors)

    def __enter__(self) -> "Sampler":
        self.components.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.components.deactivate()

    # -- validation
    def resolve_shape(self, config: GenerationConfig) -> ImageShape:
        manifest = self.components.manifest
        static = manifest is not None and not manifest.data.get("dynamic") and self.components.backend != "torch"
        default = manifest.shape() if static else ImageShape(self.entry.height, self.entry.width)
        if config.image is not None and not static:  # img2img: the image's own size, as diffusers' SDXL img2img
            default = img2img.image_shape(config.image, self.pixel_multiple)
        shape = ImageShape(default.height if config.height is None else config.height,  # 0: an error, not the default
                           default.width if config.width is None else config.width)
        shape.require_multiple(self.pixel_multiple, f"{self.entry.family} ({self.entry.name})")
        if static and (shape.height, shape.width) != (default.height, default.width):
            raise InvalidInputError(
                f"height/width: the graphs in {manifest.graphs_dir} are static at {default.height}x{default.width}, "
                f"got {shape.height}x{shape.width}; export at that size (`gag-export export --model {self.entry.name} "
                f"--height {shape.height} --width {shape.width}`) or with --dynamic"
            )
        batch_reason = static_batch_reason(manifest) if static else None
        if batch_reason:
            raise InvalidInputError(batch_reason)
        return shape

    def gag_params(self, scale=None, eta=None, zeta: float | None = None, *, scale_steps=(),
                   eta_steps=()) -> GAGParams | None:
        """GAG values for a request: those given, the rest from the export's defaults (the manifest's,
        calibrated per-layer values included), else GAGParams(). `scale`/`eta`: a number or one per
        rewritten layer; `*_steps`: per-step schedules (GAGParams).

        None when none were given and the graphs take no GAG inputs (a --no-gag export): there is
        nothing to fill in, and plain sampling is what such an export does. Values given for it are
        returned, so that `gag_feed` refuses them.
        """
        if not self.components.has_gag_inputs and (scale, eta, zeta) == (None, None, None) \
                and not (scale_steps or eta_steps):
            return None
        base = self.components.gag or GAGParams()
        manifest = self.components.manifest
        defaults = manifest.gag_defaults if manifest is not None and manifest.gag is not None \
            else {"scale": base.scale, "eta": base.eta}
        return GAGParams(
            scale=defaults["scale"] if scale is None else scale,
            eta=defaults["eta"] if eta is None else eta,
            zeta=base.zeta if zeta is None else zeta,
            scale_steps=tuple(scale_steps), eta_steps=tuple(eta_steps),
        )

    def gag_feed(self, gag: GAGParams | None) -> dict[str, np.ndarray]:
        """The denoiser's gag_* inputs, shaped as its graph declares them (0-d, or [L] per layer)."""
        if not self.components.has_gag_inputs:
            if gag is not None:
                where = self.components.manifest.graphs_dir if self.components.manifest is not None else "the model"
                raise InvalidInputError(
                    f"GAG parameters given, but {where} was exported without GAG (--no-gag): pass --no-gag, "
                    f"or re-export with GAG (`gag-export export --model {self.entry.name}`)"
                )
            return {}
        denoiser = self.components.denoiser
        shapes = {name: denoiser.input_spec(name).shape for name in GAG_INPUTS}
        return (gag if gag is not None else IDENTITY_GAG).feed(shapes)

    # -- the loop
    def generate(self, config: GenerationConfig) -> GenerationResult:
        spec = self.entry.scheduler
        steps = spec.check_steps(spec.default_steps if config.steps is None else config.steps)
        fixed = spec.timesteps_for(steps)
        shape = self.resolve_shape(config)
        self.gag_feed(config.gag)  # refused here, before any model runs, when the graphs cannot take it
        if config.gag is not None:
            config.gag.check_steps(steps)  # img2img runs fewer: the schedule counts the steps run
        if config.negative_prompt and not getattr(self.family, "cfg", False):
            log.warning("%s samples without classifier-free guidance: the negative prompt is ignored", self.entry.name)
        generator = torch.Generator("cpu").manual_seed(config.seed)

        start = time.perf_counter()
        cond = self.family.encode(config, shape)
        text_seconds = time.perf_counter() - start

        scheduler = spec.build(self.assets.scheduler_config)
        timesteps = self.family.set_timesteps(scheduler, steps, fixed, shape)
        strength, encode_seconds = None, 0.0
        if config.image is None:
            latents, layout_inputs = self.family.initial_latents(shape, generator)
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            strength = config.strength if config.strength is not None else img2img.DEFAULT_STRENGTH[self.entry.family]
            timesteps = img2img.cut_schedule(scheduler, timesteps, strength, self.family.fractional_strength)
            begin = time.perf_counter()
            image_latents = self._encode_image(config.image, shape, generator)
            encode_seconds = time.perf_counter() - begin
            latents, layout_inputs = self.family.noise_image_latents(scheduler, image_latents, timesteps[:1], generator, shape)
        cond = {**cond, **layout_inputs}
        step_options = step_kwargs(scheduler, generator, spec.call_kwargs)
        scale_input = getattr(scheduler, "scale_model_input", None)
        gag_steps = [self.gag_feed(config.gag.at_step(i) if config.gag is not None else None)
                     for i in range(len(timesteps))]
        step_seconds = []
        for t, gag in zip(timesteps, gag_steps):
            begin = time.perf_counter()
            model_input = scale_input(latents, t) if scale_input is not None else latents
            prediction = self.family.predict(model_input, t, cond, gag)
            latents = scheduler.step(prediction, t, latents, **step_options, return_dict=False)[0]
            step_seconds.append(time.perf_counter() - begin)
        if not torch.isfinite(latents).all():
            log.warning("the final latents contain NaN/inf (guidance too strong, or a precision problem)")

        begin = time.perf_counter()
        vae_latents = self.family.vae_input(latents, shape)
        vae = self.components.by_role("vae_decoder")
        if len(vae) != 1:
            raise ArtifactError(f"{self.entry.name}: expected one vae_decoder component, found {[c.name for c in vae]}")
        images = vae[0].infer({"latent": vae_latents})["images"]
        image = _to_pil(images)
        vae_seconds = time.perf_counter() - begin

        recorded = tuple(float(t) for t in timesteps)
        metadata = build_metadata(self.entry.name, self.components.backend, config, steps, shape.height, shape.width,
                                  recorded, type(scheduler).__name__, strength)
        log.debug("%s on %s: timesteps %s", self.entry.name, self.components.backend, recorded)
        return GenerationResult(
            image=image, config=config, model=self.entry.name, backend=self.components.backend, steps=steps,
            height=shape.height, width=shape.width, timesteps=recorded,
            timings=StageTimings(text_seconds, tuple(step_seconds), vae_seconds, encode_seconds), metadata=metadata,
            latents=vae_latents.numpy().copy(),
        )

    def _encode_image(self, image, shape: ImageShape, generator: torch.Generator) -> torch.Tensor:
        """The input image in denoiser space, through the export's vae_encoder (`--img2img` exports it)."""
        encoder = self.components.by_role("vae_encoder")
        if not encoder:
            where = self.components.manifest.graphs_dir if self.components.manifest is not None else self.entry.name
            raise ArtifactError(f"image-to-image needs the VAE encoder, and {where} has none: export it with "
                                f"`gag-export export --model {self.entry.name} --img2img`")
        decoder = self.descriptors["vae_decoder"]  # the VAE's scaling/shift, as the decoder graph undoes them
        moments = encoder[0].infer({"image": img2img.pixels(image, shape, self.vae_scale_factor)})["moments"]
        return img2img.sample_latents(moments, generator, decoder.scaling_factor, decoder.shift_factor)


def _to_pil(images: np.ndarray):
    """VAE output in about [-1, 1] -> a PIL image (diffusers' VaeImageProcessor: x/2 + 0.5, clamp, round)."""
    from diffusers.image_processor import VaeImageProcessor  # noqa: PLC0415

    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32))
    return VaeImageProcessor(do_normalize=True).postprocess(tensor, output_type="pil")[0]


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (inf when identical)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


__all__ = ["Sampler", "SamplerAssets", "check_request", "load_assets", "psnr", "static_batch_reason"]
