"""Shared fixtures: tiny seeded models of the real architectures, built from configs in code."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The verified-graph record (artifacts/integrity.py) in a folder of this run, not the user's cache;
    child processes inherit it."""
    previous = os.environ.get("GAG_EXPORT_CACHE")
    os.environ["GAG_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("gag-export-cache"))
    yield
    if previous is None:
        os.environ.pop("GAG_EXPORT_CACHE", None)
    else:
        os.environ["GAG_EXPORT_CACHE"] = previous


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-architecture UNet: two down/up levels, cross-attention, text_time added embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled text (32)
        norm_num_groups=8,
        use_linear_projection=True,
    ).eval()


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def unet_inputs(batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500.0] * batch),
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        },
    }


def flux_inputs(batch: int = 1, seed: int = 1, text_len: int = 7, height: int = 4, width: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return {
        "hidden_states": torch.randn(batch, height * width, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "timestep": torch.tensor([0.5] * batch),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_len, 3),
    }


@pytest.fixture
def unet():
    return tiny_sdxl_unet()


@pytest.fixture
def flux():
    return tiny_flux_transformer()
