"""SDXL and FLUX at non-square sizes against diffusers' own pipelines, on the torch and ORT backends.

Every other comparison with diffusers is square, and torch-vs-ORT tests share the sampler's code,
so a height/width swap in the sampler (SDXL's `time_ids`, FLUX's latent packing, image ids or
unpacking) passes them all. ORT runs from a static 32x64 export (a dynamic one costs a minute of
export time here); torch runs both orientations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from runtime_helpers import ONE_THREAD, PROMPT, exported_graphs, max_pixel_diff, torch_threads

from gag_export.models import load_pipeline
from gag_export.runtime import IDENTITY_GAG, GAGParams, GenerationConfig, Sampler

SAME_IMAGE = 2  # max abs pixel difference, in 8-bit levels
# Final latents (the VAE's input), as test_runtime holds torch against ORT. A FLUX img_ids swap
# moves them by 0.016-0.028 but the image by only 0-3 levels: the latents are what catch it.
LATENT_ATOL = 1e-3
ORT_SIZE = (32, 64)  # (height, width) of the static ORT export
CASES = [("torch", 32, 64), ("torch", 64, 32), ("ort", *ORT_SIZE)]
IDS = [f"{backend}-{h}x{w}" for backend, h, w in CASES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def samplers(tmp_path_factory):
    """{(model, backend): active Sampler}; ORT from a static export at ORT_SIZE."""
    opened = {}
    try:
        for model in ("tiny-sdxl", "tiny-flux"):
            graphs = {"torch": tmp_path_factory.mktemp("no-graphs"),
                      "ort": exported_graphs(tmp_path_factory, model, *ORT_SIZE)}
            for backend, root in graphs.items():
                opened[model, backend] = Sampler.load(model, backend, graphs=root, options=ONE_THREAD).__enter__()
        yield opened
    finally:
        for sampler in opened.values():
            sampler.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pipes():
    """diffusers' pipelines on the same tiny weights, GAG never applied."""
    return {model: load_pipeline(model) for model in ("tiny-sdxl", "tiny-flux")}


def sdxl_reference(pipe, seed: int, height: int, width: int, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, timesteps=[999, 499], guidance_scale=0.0, height=height, width=width,
                generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


def flux_reference(pipe, seed: int, height: int, width: int, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=32, height=height, width=width,
                generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


@pytest.mark.parametrize("backend, height, width", CASES, ids=IDS)
def test_sdxl_non_square_matches_diffusers(samplers, pipes, backend, height, width):
    """time_ids are (h, w, 0, 0, h, w) as StableDiffusionXLPipeline builds them; latents [1, 4, h/8, w/8]."""
    result = samplers["tiny-sdxl", backend].generate(
        GenerationConfig(PROMPT, seed=3, steps=2, height=height, width=width, gag=IDENTITY_GAG))
    assert result.timesteps == (999, 499)
    assert result.image.size == (width, height)
    latents = sdxl_reference(pipes["tiny-sdxl"], 3, height, width, output_type="latent")
    np.testing.assert_allclose(result.latents, latents[None].numpy(), atol=LATENT_ATOL)
    assert max_pixel_diff(result.image, sdxl_reference(pipes["tiny-sdxl"], 3, height, width)) <= SAME_IMAGE


def test_sdxl_time_ids_order_shows_in_the_image(pipes):
    """diffusers fed (w, h) as original/target size gives another image: the tiny UNet's time
    embedding is sensitive enough for the comparisons above to catch a swap."""
    pipe = pipes["tiny-sdxl"]
    right = sdxl_reference(pipe, 3, 32, 64)
    swapped = sdxl_reference(pipe, 3, 32, 64, original_size=(64, 32), target_size=(64, 32))
    assert max_pixel_diff(right, swapped) > SAME_IMAGE


@pytest.mark.parametrize("backend, height, width", CASES, ids=IDS)
def test_flux_non_square_matches_diffusers(samplers, pipes, backend, height, width):
    """Packed latents [1, (h/16)(w/16), 64], img_ids (row, column) and unpacking as FluxPipeline does them."""
    result = samplers["tiny-flux", backend].generate(
        GenerationConfig(PROMPT, seed=7, steps=2, height=height, width=width, gag=IDENTITY_GAG))
    assert result.timesteps == (1000, 500)
    assert result.image.size == (width, height)
    packed = flux_reference(pipes["tiny-flux"], 7, height, width, output_type="latent")  # [(h/16)(w/16), 64]
    assert packed.shape == ((height // 16) * (width // 16), 64)
    latents = FluxPipeline._unpack_latents(packed[None], height, width, 8).numpy()  # diffusers' own unpacking
    np.testing.assert_allclose(result.latents, latents, atol=LATENT_ATOL)
    assert max_pixel_diff(result.image, flux_reference(pipes["tiny-flux"], 7, height, width)) <= SAME_IMAGE


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_ort_non_square_gag_matches_torch(samplers, model):
    """GAG on (not the identity) at a non-square size: the exported graph computes what torch does."""
    config = GenerationConfig(PROMPT, seed=5, steps=2, height=ORT_SIZE[0], width=ORT_SIZE[1], gag=GAGParams(scale=10.0))
    on_torch = samplers[model, "torch"].generate(config)
    on_ort = samplers[model, "ort"].generate(config)
    assert max_pixel_diff(on_torch.image, on_ort.image) <= SAME_IMAGE
    np.testing.assert_allclose(on_ort.latents, on_torch.latents, atol=LATENT_ATOL)
    identity = samplers[model, "torch"].generate(GenerationConfig(PROMPT, seed=5, steps=2, height=ORT_SIZE[0],
                                                                  width=ORT_SIZE[1], gag=IDENTITY_GAG))
    assert max_pixel_diff(on_torch.image, identity.image) > SAME_IMAGE  # GAG acts, so the match means something
