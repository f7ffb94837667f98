"""Descriptors of components shared by the families: CLIP, T5 and the AutoencoderKL decoder and encoder.

Family modules subclass these to set `name`, `family` and the family's shape rules.
Text encoder outputs are named the same everywhere: `text_embeddings` (per-token hidden
states for the denoiser's cross/joint attention) and `pooled_embeds` (one vector per prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from .base import (
    ComponentDescriptor,
    ExportWrapper,
    Precision,
    TensorSpec,
    pipeline_component,
    token_ids,
)

# CLIP configs saved before transformers PR #24773 carry eos_token_id=2 (SDXL's and FLUX's
# text encoders do); transformers then pools at argmax(input_ids), i.e. at the real
# <|endoftext|>, which is the vocabulary's last id. The tokenizer ids are these:
CLIP_LEGACY_EOS = 2


def clip_special_ids(config: Mapping) -> tuple[int, int, int]:
    """(bos, eos, pad) token ids that a CLIP text config's tokenizer produces."""
    vocab = int(config.get("vocab_size", 49408))
    eos = config.get("eos_token_id", vocab - 1)
    if eos is None or eos == CLIP_LEGACY_EOS:
        return vocab - 2, vocab - 1, vocab - 1
    bos = config.get("bos_token_id", eos - 1)
    pad = config.get("pad_token_id", eos)
    return int(bos), int(eos), int(eos if pad is None else pad)


# --------------------------------------------------------------------------- CLIP


class ClipWrapper(ExportWrapper):
    """input_ids -> (hidden_states[-2], pooled) or (pooled,)."""

    def __init__(self, model, with_hidden: bool, projected: bool):
        super().__init__()
        self.model = model
        self.with_hidden = with_hidden
        self.projected = projected

    def run(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=self.with_hidden)
        pooled = out.text_embeds if self.projected else out.pooler_output
        if self.with_hidden:
            return out.hidden_states[-2], pooled
        return (pooled,)


@dataclass(frozen=True)
class ClipTextEncoder(ComponentDescriptor):
    """CLIP text model: input_ids [batch, 77] int64 -> penultimate hidden states and pooled vector.

    `projected`: CLIPTextModelWithProjection (pooled = text_embeds, the projection of the
    pooled state); otherwise CLIPTextModel (pooled = pooler_output).
    `with_hidden`: also output hidden_states[-2] (SDXL); FLUX uses only the pooled vector.
    """

    text_len: int = 77
    hidden_size: int = 768
    pooled_dim: int = 768
    vocab_size: int = 49408
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    role = "text_encoder"
    projected: ClassVar[bool] = False
    with_hidden: ClassVar[bool] = True

    @classmethod
    def from_configs(cls, configs, **choices):
        config = configs.get(cls.name) or {}
        if not config:
            return cls(**cls.family_dims(configs), **choices)
        bos, eos, pad = clip_special_ids(config)
        hidden = int(config["hidden_size"])
        return cls(
            text_len=int(config.get("max_position_embeddings", 77)),
            hidden_size=hidden,
            pooled_dim=int(config.get("projection_dim", hidden)) if cls.projected else hidden,
            vocab_size=int(config["vocab_size"]),
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            **cls.family_dims(configs),
            **choices,
        )

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("input_ids", "int64", ("batch", self.text_len))]

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        float_dtype = self.float_dtype(dtype)
        pooled = TensorSpec("pooled_embeds", float_dtype, ("batch", self.pooled_dim))
        if not self.with_hidden:
            return [pooled]
        return [TensorSpec("text_embeddings", float_dtype, ("batch", self.text_len, self.hidden_size)), pooled]

    def _sample(self, spec, shape, dims, gen):
        return token_ids(shape[0], shape[1], self.vocab_size, self.bos_token_id, self.eos_token_id, self.pad_token_id, gen)

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        model = pipeline_component(pipe, self.name)
        return ClipWrapper.wrap(
            self.input_names(), self.output_names(), model, with_hidden=self.with_hidden, projected=self.projected
        )


# --------------------------------------------------------------------------- T5


@contextmanager
def attention_implementation(model, implementation: str):
    """Run a transformers model with another attention implementation, then restore it.

    T5 under the default sdpa fails to export with dynamo (a view/stride error in
    modeling_t5.py); eager exports fine and computes the same thing.
    """
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield model
    finally:
        config._attn_implementation = previous


class T5Wrapper(ExportWrapper):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def run(self, input_ids):
        with attention_implementation(self.model, "eager"):
            return (self.model(input_ids=input_ids, output_hidden_states=False)[0],)


@dataclass(frozen=True)
class T5TextEncoder(ComponentDescriptor):
    """T5 encoder: input_ids [batch, text_len] int64 -> text_embeddings [batch, text_len, d_model].

    `text_len` is the pipeline's `max_sequence_length` (FLUX.1-schnell 256, dev 512); it is a
    choice, not part of the model, and static in the graph (the pipeline always pads to it).
    """

    text_len: int = 256
    hidden_size: int = 4096
    vocab_size: int = 32128
    eos_token_id: int = 1
    pad_token_id: int = 0

    role = "text_encoder"
    CHOICE_FIELDS: ClassVar[tuple[str, ...]] = ("text_len",)

    @classmethod
    def from_configs(cls, configs, **choices):
        config = configs.get(cls.name) or {}
        if not config:
            return cls(**cls.family_dims(configs), **choices)
        return cls(
            hidden_size=int(config["d_model"]),
            vocab_size=int(config["vocab_size"]),
            eos_token_id=int(config.get("eos_token_id", 1)),
            pad_token_id=int(config.get("pad_token_id", 0)),
            **cls.family_dims(configs),
            **choices,
        )

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("input_ids", "int64", ("batch", self.text_len))]

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("text_embeddings", self.float_dtype(dtype), ("batch", self.text_len, self.hidden_size))]

    def _sample(self, spec, shape, dims, gen):
        return token_ids(shape[0], shape[1], self.vocab_size, None, self.eos_token_id, self.pad_token_id, gen)

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        return T5Wrapper.wrap(self.input_names(), self.output_names(), pipeline_component(pipe, self.name))


def vae_scale_factor(configs: Mapping[str, Mapping], default: int = 8) -> int:
    vae = configs.get("vae") or {}
    blocks = vae.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else default


# --------------------------------------------------------------------------- AutoencoderKL


@dataclass(frozen=True)
class AutoencoderKLComponent(ComponentDescriptor):
    """What the VAE's two halves share: its config's dims, its precision rule and its tolerance.

    Both halves come from the pipeline's one `vae` module, so the same `force_upcast` holds for both.
    """

    latent_channels: int = 4
    scaling_factor: float = 0.13025
    shift_factor: float = 0.0
    force_upcast: bool = True

    pipeline_attr = "vae"

    # The decoder's output becomes an 8-bit image, where one level is 2/255 = 7.8e-3 of [-1, 1].
    # The full-size SDXL decoder at 1024x1024 (dozens of 512-channel 3x3 convolutions) differs from
    # torch by up to 4.4e-4 in fp32 under ONNX Runtime (mean 5e-5, measured: benchmarks/README.md):
    # summation order, not a defect. An absolute tolerance of an eighth of one level (9.8e-4) can move
    # a pixel by at most one level where it sits on a rounding edge; a wrong weight or op is far above.
    # The encoder is the same convolution stack run the other way, so its summation noise is of the
    # same size; its moments are multiplied by scaling_factor (< 0.4) before the denoiser sees them,
    # so the same bound is tighter still in latent space.
    IMAGE_ATOL = (2 / 255) / 8

    @classmethod
    def from_configs(cls, configs, **choices):
        vae = configs.get("vae") or {}
        if not vae:
            return cls(**cls.family_dims(configs), **choices)
        return cls(
            **cls.family_dims(configs),
            latent_channels=int(vae["latent_channels"]),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            shift_factor=float(vae.get("shift_factor") or 0.0),
            force_upcast=bool(vae.get("force_upcast", True)),
            **choices,
        )

    def export_dtype(self, dtype: Precision | str) -> Precision:
        """fp16 -> fp32 when the VAE's config says `force_upcast` (SDXL's VAE overflows in fp16)."""
        precision = Precision.parse(dtype)
        if precision is Precision.FP16 and self.force_upcast:
            return Precision.FP32
        return precision

    def tolerance(self, dtype: Precision | str = "fp32") -> dict[str, float]:
        tolerance = super().tolerance(dtype)
        tolerance["atol"] = max(tolerance["atol"], self.IMAGE_ATOL)
        return tolerance


# --------------------------------------------------------------------------- VAE decoder


class VaeDecoderWrapper(ExportWrapper):
    """latent (denoiser space) -> images: decode(latent / scaling_factor + shift_factor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def run(self, latent):
        z = latent.to(self.vae.dtype) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        return (self.vae.decode(z, return_dict=False)[0],)


@dataclass(frozen=True)
class VaeDecoder(AutoencoderKLComponent):
    """AutoencoderKL decoder taking denoiser-space latents (the graph applies scaling/shift)."""

    name = "vae_decoder"
    role = "vae_decoder"

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("latent", self.float_dtype(dtype), ("batch", self.latent_channels, "latent_height", "latent_width"))]

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("images", self.float_dtype(dtype), ("batch", 3, "image_height", "image_width"))]

    def _sample(self, spec, shape, dims, gen):
        # Final latents in denoiser space: roughly unit variance after scaling.
        return torch.randn(shape, generator=gen)

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        return VaeDecoderWrapper.wrap(self.input_names(), self.output_names(), pipeline_component(pipe, self.module_attr))


# --------------------------------------------------------------------------- VAE encoder


class VaeEncoderWrapper(ExportWrapper):
    """image in [-1, 1] -> moments: `AutoencoderKL._encode` without its tiling branch.

    The graph stops before `DiagonalGaussianDistribution`: the host splits mean/logvar, clamps and
    samples (with its own generator), exactly as diffusers does, so no randomness is in the graph.
    Tiling and slicing are host-side memory savers of the eager model (off by default), not part
    of the function.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def run(self, image):
        moments = self.vae.encoder(image.to(self.vae.dtype))
        if self.vae.quant_conv is not None:  # FLUX's VAE has none (use_quant_conv False)
            moments = self.vae.quant_conv(moments)
        return (moments,)


@dataclass(frozen=True)
class VaeEncoder(AutoencoderKLComponent):
    """AutoencoderKL encoder for img2img: image [b,3,h,w] -> moments [b, 2 * latent_channels, h/8, w/8].

    Exported only when asked (`img2img`): txt2img never runs it.
    """

    name = "vae_encoder"
    role = "vae_encoder"

    def inputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        return [TensorSpec("image", self.float_dtype(dtype), ("batch", 3, "image_height", "image_width"))]

    def outputs(self, dtype: Precision | str = "fp32", gag: bool = True) -> list[TensorSpec]:
        moments = 2 * self.latent_channels  # mean and logvar, concatenated on the channel axis
        return [TensorSpec("moments", self.float_dtype(dtype), ("batch", moments, "latent_height", "latent_width"))]

    def _sample(self, spec, shape, dims, gen):
        # Pixels as diffusers' image processor gives them: [-1, 1].
        return torch.rand(shape, generator=gen) * 2 - 1

    def export_module(self, pipe) -> ExportWrapper:
        self.check_pipeline(pipe)
        return VaeEncoderWrapper.wrap(self.input_names(), self.output_names(), pipeline_component(pipe, self.module_attr))
