"""SDXL-UNet family (SDXL base, Turbo, DMD2, Hyper-SD, Lightning, LCM): one descriptor per component.

Graph I/O, for the runtime to wire up (SDXL pipeline's `encode_prompt` and denoising loop):

    text_encoder    input_ids [b,77] int64 -> text_embeddings [b,77,768]  (hidden_states[-2]),
                                              pooled_embeds [b,768]       (pooler_output, unused by SDXL)
    text_encoder_2  input_ids [b,77] int64 -> text_embeddings [b,77,1280] (hidden_states[-2]),
                                              pooled_embeds [b,1280]      (text_embeds: projected)
    unet            sample [b,4,h/8,w/8], timestep [b] float32 (0..999),
                    encoder_hidden_states [b,77,2048] = concat(te1, te2 text_embeddings, dim=-1),
                    text_embeds [b,1280] = te2 pooled_embeds, time_ids [b,6] = (H, W, 0, 0, H, W),
                    timestep_cond [b,256] (only LCM-SDXL: the w-embedding of its guidance scale),
                    gag_scale, gag_eta, gag_zeta (0-d float32, when GAG is applied)
                    -> latent [b,4,h/8,w/8] (the UNet's prediction, epsilon for these models)
    vae_decoder     latent [b,4,h/8,w/8] (denoiser space) -> images [b,3,h,w] in about [-1, 1]
    vae_encoder     image [b,3,h,w] in [-1, 1] -> moments [b,8,h/8,w/8] (mean, logvar; img2img only,
                    exported when asked: the host samples latents from them as diffusers does)

The VAE decoder graph divides by `scaling_factor` itself (SDXL 0.13025), so the runtime feeds it
the scheduler's final latents unchanged and only maps images to [0, 1] (`x / 2 + 0.5`, clamp).
SDXL's VAE overflows in fp16 (its config says `force_upcast`): asked for fp16 it is exported in
fp32 (`export_dtype`), and the runtime casts latents to float32 before it; the encoder likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from .base import (
    ComponentDescriptor,
    DenoiserWrapper,
    ExportWrapper,
    Precision,
    TensorSpec,
    gag_specs,
    model_has_gag,
    pipeline_component,
)
from .components import ClipTextEncoder, VaeDecoder, VaeEncoder, vae_scale_factor

SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


class SDXLFamily:
    """Family-level facts shared by the SDXL descriptors."""

    family = "sdxl"

    @classmethod
    def family_dims(cls, configs):
        """Images must be multiples of the VAE factor times the UNet's downsampling (8 * 4 = 32).

        diffusers' UNet handles other sizes with a data-dependent branch (`forward_upsample_size`),
        which does not belong in an exported graph.
        """
        factor = vae_scale_factor(configs)
        unet = configs.get("unet") or {}
        levels = len(unet.get("block_out_channels", (320, 640, 1280)))
        return {"vae_scale_factor": factor, "pixel_multiple": factor * 2 ** (levels - 1)}


# --------------------------------------------------------------------------- text encoders


@dataclass(frozen=True)
class SDXLTextEncoder(SDXLFamily, ClipTextEncoder):
    """CLIP ViT-L/14 text model (CLIPTextModel)."""

    pixel_multiple: int = 32
    name = "text_encoder"


@dataclass(frozen=True)
class SDXLTextEncoder2(SDXLFamily, ClipTextEncoder):
    """OpenCLIP ViT-bigG/14 text model with projection (CLIPTextModelWithProjection)."""

    pixel_multiple: int = 32
    hidden_size: int = 1280
    pooled_dim: int = 1280
    name = "text_encoder_2"
    projected: ClassVar[bool] = True


# --------------------------------------------------------------------------- UNet


class UNetWrapper(DenoiserWrapper):
    def call_model(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
        out = self.model(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]
        return (out,)


@dataclass(frozen=True)
class SDXLUNet(SDXLFamily, ComponentDescriptor):
    """UNet2DConditionModel with `addition_embed_type="text_time"` (all sizes from its config)."""

    pixel_multiple: int = 32
    in_channels: int = 4
    out_channels: int = 4
    text_len: int = 77
    text_dim: int = 2048
    pooled_dim: int = 1280
    time_cond_dim: int | None = None
    num_train_timesteps: int = 1000

    name = "unet"
    role = "denoiser"

    @classmethod
    def from_configs(cls, configs, **choices):
        unet = configs.get("unet") or {}
        if not unet:
            return cls(**cls.family_dims(configs), **choices)
        text_encoder = configs.get("text_encoder") or {}
        time_embed_dim = unet.get("addition_time_embed_dim") or 256
        return cls(
            **cls.family_dims(configs),
            in_channels=int(unet["in_channels"]),
            out_channels=int(unet["out_channels"]),
            text_len=int(text_encoder.get("max_position_embeddings", 77)),
            text_dim=int(unet["cross_attention_dim"]),
            pooled_dim=int(unet["projection_class_embeddings_input_dim"]) - SDXL_TIME_IDS * int(time_embed_dim),
            time_cond_dim=unet.get("time_cond_proj_dim"),
            num_train_timesteps=int((configs.get("scheduler") or {}).get("num_train_timesteps", 1000)),
            **choices,
        )

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        f = self.float_dtype(dtype)
        specs = [
            TensorSpec("sample", f, ("batch", self.in_channels, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", f, ("batch", self.text_len, self.text_dim)),
            TensorSpec("text_embeds", f, ("batch", self.pooled_dim)),
            TensorSpec("time_ids", f, ("batch", SDXL_TIME_IDS)),
        ]
        if self.time_cond_dim:
            specs.append(TensorSpec("timestep_cond", f, ("batch", self.time_cond_dim)))
        return specs + (gag_specs(self.gag_layers) if gag else [])

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("latent", self.float_dtype(dtype), ("batch", self.out_channels, "latent_height", "latent_width"))]

    def _sample(self, spec, shape, dims, gen):
        if spec.name == "timestep":
            return torch.randint(0, self.num_train_timesteps, shape, generator=gen).float()
        if spec.name == "time_ids":
            height, width = dims["image_height"], dims["image_width"]
            return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(shape[0], 1)
        return super()._sample(spec, shape, dims, gen)

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        unet = pipeline_component(pipe, "unet")
        gag = model_has_gag(unet)
        return UNetWrapper.wrap(self.input_names(gag), self.output_names(gag), unet, gag=gag)


# --------------------------------------------------------------------------- VAE decoder


@dataclass(frozen=True)
class SDXLVaeDecoder(SDXLFamily, VaeDecoder):
    pixel_multiple: int = 32


@dataclass(frozen=True)
class SDXLVaeEncoder(SDXLFamily, VaeEncoder):
    pixel_multiple: int = 32


SDXL_DESCRIPTORS = (SDXLTextEncoder, SDXLTextEncoder2, SDXLUNet, SDXLVaeDecoder)
SDXL_IMG2IMG_DESCRIPTORS = (SDXLVaeEncoder,)  # exported only when asked


def sdxl_descriptors(configs: Mapping[str, Mapping] | None = None, img2img: bool = False) -> list[ComponentDescriptor]:
    """The SDXL family's descriptors in export order; full-size SDXL dims where a config is missing.

    `img2img`: also the VAE encoder, after the others.
    """
    configs = configs or {}
    return [cls.from_configs(configs) for cls in SDXL_DESCRIPTORS + (SDXL_IMG2IMG_DESCRIPTORS if img2img else ())]
