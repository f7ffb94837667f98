"""Layer 3: the model registry, loading (HF cache, local folder, single file, random, tiny), and
one descriptor per exported component.

    entry = get_entry("tiny-sdxl")
    pipe = load_pipeline(entry)                         # StableDiffusionXLPipeline
    for desc in descriptors_for(entry, pipe):           # text encoders, denoiser, vae_decoder
        module = desc.export_module(pipe)               # forward(*inputs) -> tuple(outputs)
        feed = desc.sample_inputs(ImageShape(64, 64))
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..core.errors import InvalidInputError
from ..core.names import IMG2IMG_COMPONENTS
from .base import (
    GAG_INPUTS,
    ComponentDescriptor,
    ExportWrapper,
    ImageShape,
    Precision,
    TensorSpec,
    pipeline_configs,
)
from .flux import (
    FluxT5Encoder,
    FluxTextEncoder,
    FluxTransformer,
    FluxVaeDecoder,
    FluxVaeEncoder,
    float32_rotary,
    flux_descriptors,
    latent_image_ids,
)
from .loading import (
    PIPELINE_FAMILIES,
    build_random_pipeline,
    denoiser_from_file,
    entry_configs,
    load_pipeline,
    load_state_dict,
    manifest_entry,
    resolve_entry,
    shipped_config,
)
from .registry import (
    FAMILIES,
    ModelEntry,
    SchedulerSpec,
    WeightsSource,
    get_entry,
    list_entries,
)
from .sdxl import (
    SDXLTextEncoder,
    SDXLTextEncoder2,
    SDXLUNet,
    SDXLVaeDecoder,
    SDXLVaeEncoder,
    sdxl_descriptors,
)
from .tiny import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_sdxl_pipeline,
)

_ENTRY_NAMES = {entry.name for entry in list_entries()}


def _family_of(pipe) -> str:
    family = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if family is None:
        raise InvalidInputError(f"unsupported pipeline {type(pipe).__name__}; supported: {', '.join(PIPELINE_FAMILIES)}")
    return family


def denoiser_module(pipe) -> torch.nn.Module | None:
    """The pipeline's UNet or transformer, or None when it was loaded without one."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def descriptors_for(entry_or_family: ModelEntry | str | None = None, pipe=None,
                    img2img: bool = False) -> list[ComponentDescriptor]:
    """The descriptors of a model in export order: text encoders, denoiser, vae_decoder
    (then vae_encoder with `img2img`: IMG2IMG_COMPONENTS, exported only when asked).

    `entry_or_family`: a ModelEntry, a registered name, a local diffusers folder, or a family
    ("sdxl", "flux"); may be None when `pipe` is given. Dims come from, in order of preference:
    the loaded `pipe`'s component configs; the entry's configs (tiny configs for tiny-*, else
    the shipped full-size configs with its overrides); the family's full-size configs. FLUX's
    T5 length is the entry's `text_len` (256 for a bare "flux").
    """
    entry: ModelEntry | None = None
    if isinstance(entry_or_family, ModelEntry):
        entry = entry_or_family
    elif entry_or_family is not None and not (entry_or_family in FAMILIES and entry_or_family not in _ENTRY_NAMES):
        entry = resolve_entry(entry_or_family)
    if entry is not None:
        family = entry.family
    elif entry_or_family is not None:
        family = entry_or_family
    elif pipe is not None:
        family = _family_of(pipe)
    else:
        raise InvalidInputError("descriptors_for needs a model entry, a family name or a pipeline")
    if pipe is not None and _family_of(pipe) != family:
        raise InvalidInputError(f"a {type(pipe).__name__} is not a {family} pipeline")

    if pipe is not None:
        configs: Mapping[str, Mapping] = pipeline_configs(pipe)
    elif entry is not None:
        configs = entry_configs(entry)
    else:
        configs = {name: shipped_config(family, name) for name in _FAMILY_FILES[family]}
    if family == "sdxl":
        return sdxl_descriptors(configs, img2img=img2img)
    text_len = entry.text_len if entry is not None and entry.text_len else 256
    return flux_descriptors(configs, text_len=text_len, img2img=img2img)


_FAMILY_FILES = {
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler"),
    "flux": ("text_encoder", "text_encoder_2", "transformer", "vae", "scheduler"),
}

__all__ = [
    "GAG_INPUTS",
    "IMG2IMG_COMPONENTS",
    "denoiser_module",
    "ComponentDescriptor",
    "ExportWrapper",
    "ImageShape",
    "Precision",
    "TensorSpec",
    "ModelEntry",
    "SchedulerSpec",
    "WeightsSource",
    "FAMILIES",
    "get_entry",
    "list_entries",
    "load_pipeline",
    "manifest_entry",
    "resolve_entry",
    "entry_configs",
    "shipped_config",
    "build_random_pipeline",
    "load_state_dict",
    "denoiser_from_file",
    "build_tiny_sdxl_pipeline",
    "build_tiny_flux_pipeline",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "descriptors_for",
    "pipeline_configs",
    "SDXLTextEncoder",
    "SDXLTextEncoder2",
    "SDXLUNet",
    "SDXLVaeDecoder",
    "SDXLVaeEncoder",
    "FluxTextEncoder",
    "FluxT5Encoder",
    "FluxTransformer",
    "FluxVaeDecoder",
    "FluxVaeEncoder",
    "sdxl_descriptors",
    "flux_descriptors",
    "float32_rotary",
    "latent_image_ids",
]
