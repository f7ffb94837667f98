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
GAG parameters are fed per call as the denoiser's 0-d `gag_scale`/`gag_eta`/`gag_zeta` inputs;
"GAG off" on a GAG graph feeds the exact identity (scale -1, zeta 1, eta 1e9: the dense output).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .. import __version__
from ..core.errors import ArtifactError, InvalidInputError
from ..guidance import GAGConfig
from ..models.base import ImageShape, require_positive_int
from .backends import BackendOptions, Component, ComponentSet, load_components, parse_backend
from .png import save_png

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidInputError(f"prompt: must be text, got {type(self.prompt).__name__}")
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

    @property
    def total(self) -> float:
        return self.text_encode + sum(self.denoise) + self.vae_decode

    def rows(self, timesteps: tuple[float, ...] = ()) -> list[tuple[str, float]]:
        """(stage, seconds) in order: text encode, each denoise step (with its timestep), VAE decode, total."""
        labels = [f"denoise step {i + 1}" + (f" (t={_number(timesteps[i])})" if i < len(timesteps) else "")
                  for i in range(len(self.denoise))]
        steps = list(zip(labels, self.denoise))
        return [("text encode", self.text_encode), *steps, ("vae decode", self.vae_decode), ("total", self.total)]


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
                   timesteps: tuple[float, ...], scheduler: str) -> dict[str, str]:
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
        "gag_export_version": __version__,
        "Software": f"gag-export {__version__}",
    }
    return data


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def tokenize(tokenizer, prompt: str, length: int, label: str) -> np.ndarray:
    """[1, length] int64 ids padded to `length`; a longer prompt is truncated with a warning."""
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    full = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    if len(full) > length:
        kept = tokenizer.decode(ids[0], skip_special_tokens=True)
        log.warning(
            "prompt is %d %s tokens, the encoder takes %d: truncated to %r", len(full), label, length, kept
        )
    return ids.astype(np.int64)


def _fit(component: Component, name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """`value` shaped for the input: [batch] for a batch-leading 1-d input, 0-d for a scalar."""
    spec = component.input_spec(name)
    value = torch.as_tensor(value, dtype=torch.float32)
    if len(spec.shape) == 0:
        return value.reshape(())
    return value.reshape(-1)[:1].expand(batch).contiguous()


def _max_batch(components: ComponentSet, component: Component, name: str) -> int:
    """The largest batch an input takes: its static dim, else the profile's max, else unbounded."""
    dim = component.input_spec(name).shape[0]
    if isinstance(dim, int):
        return dim
    if components.manifest is not None:
        profile = components.manifest.components.get(component.name, {}).get("profile", {}).get(name)
        if profile:
            return int(profile["max"][0])
    return 1 << 30


def _step_kwargs(scheduler, generator: torch.Generator, call_kwargs: Mapping[str, Any]) -> dict:
    """The keyword arguments `scheduler.step` accepts: the generator, and the card's (TCD's eta)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {"generator": generator} if "generator" in accepted else {}
    for key, value in call_kwargs.items():
        if key in accepted:
            kwargs[key] = value
        else:
            log.debug("%s.step takes no %r; ignored", type(scheduler).__name__, key)
    return kwargs


def _retrieve_timesteps(scheduler, steps: int | None, **kwargs):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps  # noqa: PLC0415

    try:
        return retrieve_timesteps(scheduler, steps, "cpu", **kwargs)[0]
    except ValueError as exc:  # e.g. a scheduler whose set_timesteps takes no `timesteps=`
        raise InvalidInputError(f"{type(scheduler).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Families: prompt -> denoiser inputs, latent layout
# --------------------------------------------------------------------------------------------


class Conditioning:
    """What differs between families. Subclasses: `SDXLConditioning`, `FluxConditioning`."""

    def __init__(self, entry, components: ComponentSet, tokenizers: Mapping[str, Any], vae_scale_factor: int):
        self.entry = entry
        self.components = components
        self.tokenizers = tokenizers
        self.vae_scale_factor = vae_scale_factor
        self.denoiser = components.denoiser

    def _ids(self, component: str, prompt: str) -> np.ndarray:
        encoder = self.components[component]
        length = encoder.input_spec("input_ids").shape[1]
        if not isinstance(length, int):
            length = int(getattr(self.tokenizers[component], "model_max_length", 77))
        return tokenize(self.tokenizers[component], prompt, length, component)

    def encode(self, config: GenerationConfig, shape: ImageShape) -> dict[str, np.ndarray]: ...

    def initial_latents(self, shape: ImageShape, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        """Seeded initial latents (before `init_noise_sigma`) and any denoiser inputs that follow from their layout."""

    def set_timesteps(self, scheduler, steps: int, fixed: tuple[int, ...] | None, latents: torch.Tensor) -> torch.Tensor:
        if fixed is not None:
            return _retrieve_timesteps(scheduler, None, timesteps=list(fixed))
        return _retrieve_timesteps(scheduler, steps)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Mapping[str, np.ndarray],
                gag: Mapping[str, np.ndarray]) -> torch.Tensor: ...

    def vae_input(self, latents: torch.Tensor, shape: ImageShape) -> torch.Tensor:
        return latents


class SDXLConditioning(Conditioning):
    """StableDiffusionXLPipeline: two CLIP encoders, text_embeds/time_ids, optional CFG or w-embedding."""

    def __init__(self, entry, components, tokenizers, vae_scale_factor):
        super().__init__(entry, components, tokenizers, vae_scale_factor)
        self.w_embedding = "timestep_cond" in self.denoiser.input_names
        # diffusers: CFG when guidance_scale > 1 and the UNet has no guidance (w) embedding.
        self.cfg = (entry.cfg_scale is not None and entry.cfg_scale > 1 and not self.w_embedding)
        self.batched_cfg = self.cfg and _max_batch(components, self.denoiser, "sample") >= 2

    def _embed(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        out1 = self.components["text_encoder"].infer({"input_ids": self._ids("text_encoder", prompt)})
        out2 = self.components["text_encoder_2"].infer({"input_ids": self._ids("text_encoder_2", prompt)})
        hidden = np.concatenate([out1["text_embeddings"], out2["text_embeddings"]], axis=-1)
        return hidden.astype(np.float32), out2["pooled_embeds"].astype(np.float32)

    def encode(self, config, shape):
        hidden, pooled = self._embed(config.prompt)
        time_ids = np.array([[shape.height, shape.width, 0, 0, shape.height, shape.width]], dtype=np.float32)
        cond = {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": time_ids}
        if self.w_embedding:
            from diffusers import StableDiffusionXLPipeline  # noqa: PLC0415

            guidance = self.entry.embedded_guidance if self.entry.embedded_guidance is not None else (self.entry.cfg_scale or 1.0)
            dim = self.denoiser.input_spec("timestep_cond").shape[-1]
            w = torch.tensor([guidance - 1.0])
            cond["timestep_cond"] = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).numpy()
        if self.cfg:
            # diffusers' SDXL default (force_zeros_for_empty_prompt): an empty negative prompt is zeros.
            if config.negative_prompt:
                neg_hidden, neg_pooled = self._embed(config.negative_prompt)
            else:
                neg_hidden, neg_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
            cond["negative"] = {"encoder_hidden_states": neg_hidden, "text_embeds": neg_pooled, "time_ids": time_ids}
        return cond

    def initial_latents(self, shape, generator):
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        channels = self.denoiser.input_spec("sample").shape[1]
        size = (shape.batch, channels, shape.height // self.vae_scale_factor, shape.width // self.vae_scale_factor)
        return randn_tensor(size, generator=generator, dtype=torch.float32), {}

    def _run(self, sample: torch.Tensor, t: torch.Tensor, cond: Mapping[str, np.ndarray], gag) -> torch.Tensor:
        batch = sample.shape[0]
        feed = {"sample": sample, "timestep": _fit(self.denoiser, "timestep", t, batch), **cond, **gag}
        return torch.from_numpy(self.denoiser.infer(feed)["latent"]).float()

    def predict(self, latents, t, cond, gag):
        positive = {k: v for k, v in cond.items() if k != "negative"}
        if not self.cfg:
            return self._run(latents, t, positive, gag)
        negative = {**positive, **cond["negative"]}
        if self.batched_cfg:  # one call on [uncond; cond], as diffusers does
            both = {k: np.concatenate([negative[k], positive[k]]) for k in positive}
            uncond, text = self._run(torch.cat([latents, latents]), t, both, gag).chunk(2)
        else:  # a batch-1 graph: the same math in two calls
            uncond, text = self._run(latents, t, negative, gag), self._run(latents, t, positive, gag)
        return uncond + self.entry.cfg_scale * (text - uncond)


class FluxConditioning(Conditioning):
    """FluxPipeline: CLIP pooled + T5 tokens, 2x2-packed latents, img_ids/txt_ids, sigmas with shift."""

    def encode(self, config, shape):
        pooled = self.components["text_encoder"].infer({"input_ids": self._ids("text_encoder", config.prompt)})
        tokens = self.components["text_encoder_2"].infer({"input_ids": self._ids("text_encoder_2", config.prompt)})
        text = tokens["text_embeddings"].astype(np.float32)
        cond = {
            "encoder_hidden_states": text,
            "pooled_projections": pooled["pooled_embeds"].astype(np.float32),
            "txt_ids": np.zeros((text.shape[1], 3), dtype=np.float32),
        }
        if "guidance" in self.denoiser.input_names:
            guidance = self.entry.embedded_guidance if self.entry.embedded_guidance is not None else 3.5
            cond["guidance"] = np.full((shape.batch,), guidance, dtype=np.float32)
        return cond

    def _latent_hw(self, shape: ImageShape) -> tuple[int, int]:
        # FluxPipeline.prepare_latents: 2 * (size // (vae_scale_factor * 2))
        return 2 * (shape.height // (self.vae_scale_factor * 2)), 2 * (shape.width // (self.vae_scale_factor * 2))

    def initial_latents(self, shape, generator):
        from diffusers import FluxPipeline  # noqa: PLC0415
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        channels = self.denoiser.input_spec("hidden_states").shape[-1] // 4
        height, width = self._latent_hw(shape)
        latents = randn_tensor((shape.batch, channels, height, width), generator=generator, dtype=torch.float32)
        img_ids = FluxPipeline._prepare_latent_image_ids(shape.batch, height // 2, width // 2, "cpu", torch.float32)
        return FluxPipeline._pack_latents(latents, shape.batch, channels, height, width), {"img_ids": img_ids}

    def set_timesteps(self, scheduler, steps, fixed, latents):
        if fixed is not None:
            return super().set_timesteps(scheduler, steps, fixed, latents)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: PLC0415

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        return _retrieve_timesteps(scheduler, steps, sigmas=sigmas, mu=mu)

    def predict(self, latents, t, cond, gag):
        batch = latents.shape[0]
        feed = {
            "hidden_states": latents,
            "timestep": _fit(self.denoiser, "timestep", t / 1000, batch),  # the model multiplies by 1000
            **cond,
            **gag,
        }
        return torch.from_numpy(self.denoiser.infer(feed)["latent"]).float()

    def vae_input(self, latents, shape):
        from diffusers import FluxPipeline  # noqa: PLC0415

        return FluxPipeline._unpack_latents(latents, shape.height, shape.width, self.vae_scale_factor)


FAMILY_CONDITIONING = {"sdxl": SDXLConditioning, "flux": FluxConditioning}


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
        self.pixel_multiple = int(denoiser.pixel_multiple)
        self.vae_scale_factor = int(denoiser.vae_scale_factor)
        self.family = FAMILY_CONDITIONING[entry.family](entry, components, assets.tokenizers, self.vae_scale_factor)

    @classmethod
    def load(cls, model: str, backend: str, *, graphs: Path = Path("graphs"), engines: Path = Path("engines"),
             options: BackendOptions = BackendOptions()) -> "Sampler":
        """Components from graphs/ (and engines/) plus tokenizers and scheduler config (InvalidInputError /
        ArtifactError / MissingDependencyError before anything heavy when the request cannot work)."""
        from ..models import descriptors_for  # noqa: PLC0415
        from .backends import model_entry  # noqa: PLC0415

        backend = parse_backend(backend)
        entry = model_entry(model, graphs)
        components = load_components(model, backend, graphs=graphs, engines=engines, options=options)
        weights = components.manifest.data.get("weights") if components.manifest is not None else None
        assets = load_assets(entry, weights, pipe=components.pipe)
        descriptors = {d.name: d for d in descriptors_for(entry, components.pipe)} if components.pipe is not None else {
            d.name: d for d in descriptors_for(entry)
        }
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

    def gag_params(self, scale: float | None = None, eta: float | None = None,
                   zeta: float | None = None) -> GAGParams | None:
        """GAG values for a request: those given, the rest from the export's defaults (manifest), else GAGParams().

        None when none were given and the graphs take no GAG inputs (a --no-gag export): there is
        nothing to fill in, and plain sampling is what such an export does. Values given for it are
        returned, so that `gag_feed` refuses them.
        """
        if not self.components.has_gag_inputs and (scale, eta, zeta) == (None, None, None):
            return None
        defaults = self.components.gag or GAGParams()
        return GAGParams(
            scale=defaults.scale if scale is None else scale,
            eta=defaults.eta if eta is None else eta,
            zeta=defaults.zeta if zeta is None else zeta,
        )

    def gag_feed(self, gag: GAGParams | None) -> dict[str, np.ndarray]:
        if not self.components.has_gag_inputs:
            if gag is not None:
                where = self.components.manifest.graphs_dir if self.components.manifest is not None else "the model"
                raise InvalidInputError(
                    f"GAG parameters given, but {where} was exported without GAG (--no-gag): pass --no-gag, "
                    f"or re-export with GAG (`gag-export export --model {self.entry.name}`)"
                )
            return {}
        return (gag if gag is not None else IDENTITY_GAG).feed()

    # -- the loop
    def generate(self, config: GenerationConfig) -> GenerationResult:
        spec = self.entry.scheduler
        steps = spec.check_steps(spec.default_steps if config.steps is None else config.steps)
        fixed = spec.timesteps_for(steps)
        shape = self.resolve_shape(config)
        gag = self.gag_feed(config.gag)
        if config.negative_prompt and not getattr(self.family, "cfg", False):
            log.warning("%s samples without classifier-free guidance: the negative prompt is ignored", self.entry.name)
        generator = torch.Generator("cpu").manual_seed(config.seed)

        start = time.perf_counter()
        cond = self.family.encode(config, shape)
        text_seconds = time.perf_counter() - start

        scheduler = spec.build(self.assets.scheduler_config)
        latents, layout_inputs = self.family.initial_latents(shape, generator)
        cond = {**cond, **layout_inputs}
        timesteps = self.family.set_timesteps(scheduler, steps, fixed, latents)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        step_kwargs = _step_kwargs(scheduler, generator, spec.call_kwargs)
        scale_input = getattr(scheduler, "scale_model_input", None)
        step_seconds = []
        for t in timesteps:
            begin = time.perf_counter()
            model_input = scale_input(latents, t) if scale_input is not None else latents
            prediction = self.family.predict(model_input, t, cond, gag)
            latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
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
                                  recorded, type(scheduler).__name__)
        log.debug("%s on %s: timesteps %s", self.entry.name, self.components.backend, recorded)
        return GenerationResult(
            image=image, config=config, model=self.entry.name, backend=self.components.backend, steps=steps,
            height=shape.height, width=shape.width, timesteps=recorded,
            timings=StageTimings(text_seconds, tuple(step_seconds), vae_seconds), metadata=metadata,
            latents=vae_latents.numpy().copy(),
        )


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


__all__ = [
    "GAGParams", "IDENTITY_GAG", "GenerationConfig", "GenerationResult", "StageTimings", "Sampler", "SamplerAssets",
    "load_assets", "tokenize", "build_metadata", "psnr",
]
