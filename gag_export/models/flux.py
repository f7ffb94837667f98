"""FLUX family (FLUX.1-schnell, and -dev style models with guidance embeds): one descriptor per component.

Graph I/O, for the runtime to wire up (FluxPipeline's `encode_prompt` and denoising loop):

    text_encoder    input_ids [b,77] int64 -> pooled_embeds [b,768] (CLIP pooler_output)
    text_encoder_2  input_ids [b,T] int64  -> text_embeddings [b,T,4096] (T5; T = max_sequence_length)
    transformer     hidden_states [b, image_tokens, 64]: 2x2-packed latents (FluxPipeline._pack_latents),
                    encoder_hidden_states [b,T,4096], pooled_projections [b,768],
                    timestep [b] float32 in [0, 1] (sigma; the model multiplies by 1000),
                    img_ids [image_tokens, 3] (0, row, col of the packed grid), txt_ids [T, 3] (zeros),
                    guidance [b] float32 (only with `guidance_embeds`, e.g. 3.5 for dev),
                    gag_scale, gag_eta, gag_zeta (0-d float32, when GAG is applied)
                    -> latent [b, image_tokens, 64] (velocity, still packed)
    vae_decoder     latent [b,16,h/8,w/8] (unpacked, denoiser space) -> images [b,3,h,w] in about [-1, 1]
    vae_encoder     image [b,3,h,w] in [-1, 1] -> moments [b,32,h/8,w/8] (mean, logvar; img2img only,
                    exported when asked; no quant_conv in FLUX's VAE)

image_tokens = (h/16) * (w/16); images must be multiples of 16 (VAE factor 8 times the 2x2 packing).
The VAE decoder graph applies `latent / scaling_factor + shift_factor` (0.3611, 0.1159) itself.
T is static in the graph: the pipeline always pads T5 input to max_sequence_length.

Rotary tables: diffusers' `FluxPosEmbed` computes them in float64 on CPU, which would put
doubles into the graph (TensorRT has none). The transformer wrapper swaps in a float32 version
for the duration of each call (`float32_rotary`), so the eager reference and the graph agree.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping

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
from .components import (
    AutoencoderKLComponent,
    ClipTextEncoder,
    T5TextEncoder,
    VaeDecoder,
    VaeEncoder,
    vae_scale_factor,
)

# FLUX.1-schnell's max_sequence_length; dev uses 512.
SCHNELL_TEXT_LEN = 256


class FluxFamily:
    family = "flux"

    @classmethod
    def family_dims(cls, configs):
        """Images must be multiples of the VAE factor times the 2x2 latent packing (8 * 2 = 16)."""
        factor = vae_scale_factor(configs)
        return {"vae_scale_factor": factor, "pixel_multiple": factor * 2}

    def extra_dims(self, latent_height: int, latent_width: int) -> dict[str, int]:
        return {"image_tokens": (latent_height // 2) * (latent_width // 2)}


# --------------------------------------------------------------------------- text encoders


@dataclass(frozen=True)
class FluxTextEncoder(FluxFamily, ClipTextEncoder):
    """CLIP ViT-L/14 text model; FLUX uses only its pooled output."""

    pixel_multiple: int = 16
    name = "text_encoder"
    with_hidden: ClassVar[bool] = False


@dataclass(frozen=True)
class FluxT5Encoder(FluxFamily, T5TextEncoder):
    """T5 v1.1 XXL encoder (exported with eager attention)."""

    pixel_multiple: int = 16
    text_len: int = SCHNELL_TEXT_LEN
    name = "text_encoder_2"


# --------------------------------------------------------------------------- rotary patch


class Float32FluxPosEmbed(torch.nn.Module):
    """diffusers' FluxPosEmbed with float32 frequency tables (it uses float64 off MPS/NPU).

    cos/sin of positions up to a few hundred differ from the float64 tables by ~1e-5 at most.
    """

    def __init__(self, theta: int, axes_dim):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = ids.float()
        cos_out, sin_out = [], []
        for i, dim in enumerate(self.axes_dim):
            cos, sin = get_1d_rotary_pos_embed(
                dim, pos[:, i], theta=self.theta, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float32
            )
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


@contextmanager
def float32_rotary(transformer) -> Iterator[None]:
    """Compute a FluxTransformer2DModel's rotary tables in float32 inside the block, then restore."""
    original = transformer.pos_embed
    transformer.pos_embed = Float32FluxPosEmbed(original.theta, original.axes_dim)
    try:
        yield
    finally:
        transformer.pos_embed = original


# --------------------------------------------------------------------------- transformer


class FluxTransformerWrapper(DenoiserWrapper):
    def call_model(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        with float32_rotary(self.model):
            out = self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        return (out,)


@dataclass(frozen=True)
class FluxTransformer(FluxFamily, ComponentDescriptor):
    """FluxTransformer2DModel on packed latents (all sizes from its config)."""

    pixel_multiple: int = 16
    in_channels: int = 64
    out_channels: int = 64
    text_len: int = SCHNELL_TEXT_LEN
    joint_dim: int = 4096
    pooled_dim: int = 768
    guidance: bool = False

    name = "transformer"
    role = "denoiser"
    CHOICE_FIELDS: ClassVar[tuple[str, ...]] = ("text_len",)
    SAMPLE_GUIDANCE: ClassVar[float] = 3.5

    @classmethod
    def from_configs(cls, configs, **choices):
        config = configs.get("transformer") or {}
        if not config:
            return cls(**cls.family_dims(configs), **choices)
        in_channels = int(config["in_channels"])
        return cls(
            **cls.family_dims(configs),
            in_channels=in_channels,
            out_channels=int(config.get("out_channels") or in_channels),
            joint_dim=int(config["joint_attention_dim"]),
            pooled_dim=int(config["pooled_projection_dim"]),
            guidance=bool(config.get("guidance_embeds", False)),
            **choices,
        )

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        f = self.float_dtype(dtype)
        specs = [
            TensorSpec("hidden_states", f, ("batch", "image_tokens", self.in_channels)),
            TensorSpec("encoder_hidden_states", f, ("batch", self.text_len, self.joint_dim)),
            TensorSpec("pooled_projections", f, ("batch", self.pooled_dim)),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("img_ids", "float32", ("image_tokens", 3)),
            TensorSpec("txt_ids", "float32", (self.text_len, 3)),
        ]
        if self.guidance:
            specs.append(TensorSpec("guidance", "float32", ("batch",)))
        return specs + (gag_specs(self.gag_layers) if gag else [])

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("latent", self.float_dtype(dtype), ("batch", "image_tokens", self.out_channels))]

    def _sample(self, spec, shape, dims, gen):
        if spec.name == "timestep":
            return torch.rand(shape, generator=gen)
        if spec.name == "img_ids":
            return latent_image_ids(dims["latent_height"] // 2, dims["latent_width"] // 2)
        if spec.name == "txt_ids":
            return torch.zeros(shape)
        if spec.name == "guidance":
            return torch.full(shape, self.SAMPLE_GUIDANCE)
        return super()._sample(spec, shape, dims, gen)

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        transformer = pipeline_component(pipe, "transformer")
        gag = model_has_gag(transformer)
        return FluxTransformerWrapper.wrap(self.input_names(gag), self.output_names(gag), transformer, gag=gag)


def latent_image_ids(rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 3] position ids of the packed latent grid: (0, row, col), row-major."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :]
    return ids.reshape(rows * cols, 3)


# --------------------------------------------------------------------------- VAE


@dataclass(frozen=True)
class FluxVae(FluxFamily, AutoencoderKLComponent):
    """FLUX's AutoencoderKL dims, shared by its decoder and encoder (used where no config is given)."""

    pixel_multiple: int = 16
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass(frozen=True)
class FluxVaeDecoder(FluxVae, VaeDecoder):
    pass


@dataclass(frozen=True)
class FluxVaeEncoder(FluxVae, VaeEncoder):
    pass


FLUX_DESCRIPTORS = (FluxTextEncoder, FluxT5Encoder, FluxTransformer, FluxVaeDecoder)
FLUX_IMG2IMG_DESCRIPTORS = (FluxVaeEncoder,)  # exported only when asked


def flux_descriptors(configs: Mapping[str, Mapping] | None = None, text_len: int = SCHNELL_TEXT_LEN,
                     img2img: bool = False) -> list[ComponentDescriptor]:
    """The FLUX family's descriptors in export order; full-size dims where a config is missing.

    `img2img`: also the VAE encoder, after the others.
    """
    configs = configs or {}
    return [
        cls.from_configs(configs, **({"text_len": text_len} if "text_len" in cls.CHOICE_FIELDS else {}))
        for cls in FLUX_DESCRIPTORS + (FLUX_IMG2IMG_DESCRIPTORS if img2img else ())
    ]
