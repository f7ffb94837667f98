"""Per family: how a prompt becomes denoiser inputs and how latents are laid out (the sampler's one
place of SDXL/FLUX differences). The math is diffusers' own helpers; see `sampler` for the loop."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import numpy as np
import torch

from ..core.errors import InvalidInputError
from ..core.shapes import ImageShape
from .components import Component, ComponentSet
from .generation import GenerationConfig

log = logging.getLogger(__name__)


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


def step_kwargs(scheduler, generator: torch.Generator, call_kwargs: Mapping[str, Any]) -> dict:
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
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        retrieve_timesteps,  # noqa: PLC0415
    )

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

    # img2img: how `strength` cuts the schedule (see `img2img.cut_schedule`)
    fractional_strength = False

    def noise_image_latents(self, scheduler, image_latents: torch.Tensor, first: torch.Tensor,
                            generator: torch.Generator, shape: ImageShape) -> tuple[torch.Tensor, dict[str, Any]]:
        """img2img: the encoded image noised to the first timestep left, laid out for the denoiser."""

    def set_timesteps(self, scheduler, steps: int, fixed: tuple[int, ...] | None, shape: ImageShape) -> torch.Tensor:
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

    def noise_image_latents(self, scheduler, image_latents, first, generator, shape):
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        # StableDiffusionXLImg2ImgPipeline.prepare_latents: add_noise at the first timestep
        noise = randn_tensor(image_latents.shape, generator=generator, dtype=torch.float32)
        return scheduler.add_noise(image_latents, noise, first.repeat(shape.batch)), {}

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

    fractional_strength = True  # FluxImg2ImgPipeline.get_timesteps keeps steps x strength fractional

    def noise_image_latents(self, scheduler, image_latents, first, generator, shape):
        from diffusers import FluxPipeline  # noqa: PLC0415
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        # FluxImg2ImgPipeline.prepare_latents: scale_noise (flow matching) at the first timestep, then pack
        batch, channels, height, width = image_latents.shape
        noise = randn_tensor(image_latents.shape, generator=generator, dtype=torch.float32)
        latents = scheduler.scale_noise(image_latents, first.repeat(shape.batch), noise)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        return FluxPipeline._pack_latents(latents, batch, channels, height, width), {"img_ids": img_ids}

    def set_timesteps(self, scheduler, steps, fixed, shape):
        if fixed is not None:
            return super().set_timesteps(scheduler, steps, fixed, shape)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: PLC0415

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        height, width = self._latent_hw(shape)
        mu = calculate_shift(  # the packed sequence length: one token per 2x2 latent patch
            (height // 2) * (width // 2), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
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


__all__ = ["FAMILY_CONDITIONING", "Conditioning", "FluxConditioning", "SDXLConditioning", "step_kwargs", "tokenize"]
