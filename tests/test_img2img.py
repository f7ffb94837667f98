"""Image-to-image (issue 23): the sampler against diffusers' own img2img pipelines on the tiny
weights, the strength rules, bad input, and the same request on ONNX Runtime.

Reference points: `StableDiffusionXLImg2ImgPipeline` and `FluxImg2ImgPipeline` made from the same
tiny pipelines (`from_pipe`), GAG never applied; our sampler feeds the GAG identity, which is the
unmodified attention, so the images must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from runtime_helpers import ONE_THREAD, PROMPT, exported_graphs, max_pixel_diff, torch_sampler, torch_threads

from gag_export.cli import cli
from gag_export.core.errors import InvalidInputError
from gag_export.models import load_pipeline
from gag_export.runtime import IDENTITY_GAG, GenerationConfig, Sampler, read_png_metadata

SAME_IMAGE = 2  # levels of 255, as the txt2img tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 64x64 RGB test image with structure (gradients) and texture (seeded noise), as a PNG file."""
    y, x = np.mgrid[0:64, 0:64]
    noise = np.random.default_rng(0).integers(0, 40, (64, 64, 3))
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + noise
    path = tmp_path_factory.mktemp("img2img") / "input.png"
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    with torch_sampler(tmp_path_factory, "tiny-sdxl") as sampler:
        yield sampler


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    with torch_sampler(tmp_path_factory, "tiny-flux") as sampler:
        yield sampler


# --------------------------------------------------------------------------------------------
# Against diffusers
# --------------------------------------------------------------------------------------------


def test_sdxl_img2img_is_diffusers_img2img(sdxl, picture):
    """DMD2's 4 timesteps cut by strength 0.5 (SDXL truncates 4 x 0.5 = 2 steps): 499, 249."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    result = sdxl.generate(GenerationConfig(PROMPT, seed=3, gag=IDENTITY_GAG, image=picture, strength=0.5))
    reference = StableDiffusionXLImg2ImgPipeline.from_pipe(load_pipeline("tiny-sdxl"))(
        PROMPT, image=Image.open(picture), strength=0.5, num_inference_steps=4, timesteps=[999, 749, 499, 249],
        guidance_scale=0.0, generator=torch.Generator().manual_seed(3)).images[0]
    assert result.timesteps == (499, 249)
    assert (result.width, result.height) == (64, 64)
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE


def test_flux_img2img_is_diffusers_img2img(flux, picture):
    """FLUX keeps 4 x 0.6 = 2.4 fractional: int(4 - 2.4) = 1 step skipped, 3 run (SDXL would run 2)."""
    from diffusers import FluxImg2ImgPipeline

    result = flux.generate(GenerationConfig(PROMPT, seed=7, gag=IDENTITY_GAG, image=picture, strength=0.6))
    reference = FluxImg2ImgPipeline.from_pipe(load_pipeline("tiny-flux"))(
        PROMPT, image=Image.open(picture), strength=0.6, num_inference_steps=4, guidance_scale=0.0,
        max_sequence_length=32, height=64, width=64, generator=torch.Generator().manual_seed(7)).images[0]
    assert result.timesteps == (750, 500, 250)
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE


def test_less_strength_keeps_more_of_the_image(sdxl, picture):
    """Distance to the input's own VAE round trip shrinks with strength (the tiny VAE is random, so the
    round trip, not the input, is what strength -> 0 tends to)."""
    round_trip = np.asarray(sdxl.generate(GenerationConfig(PROMPT, seed=1, image=picture, strength=0.25, steps=4)).image,
                            dtype=np.float64)
    distances = []
    for strength in (0.25, 0.5, 1.0):
        image = sdxl.generate(GenerationConfig(PROMPT, seed=1, gag=IDENTITY_GAG, image=picture, strength=strength)).image
        distances.append(np.abs(np.asarray(image, dtype=np.float64) - round_trip).mean())
    assert distances[0] < distances[1] < distances[2], distances


def test_the_image_sets_the_size_and_the_metadata_says_where_it_came_from(sdxl, tmp_path, picture):
    wide = tmp_path / "wide.png"
    Image.open(picture).resize((96, 64)).save(wide)
    result = sdxl.generate(GenerationConfig(PROMPT, seed=2, image=wide, strength=0.5))
    assert (result.width, result.height) == (96, 64)
    saved = read_png_metadata(result.save(tmp_path / "out.png"))
    assert saved["init_image"] == str(wide) and saved["strength"] == "0.5"
    assert "vae encode" in dict(result.timings.rows())


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.5, float("nan"), True])
def test_strength_outside_zero_one_is_refused(strength, picture):
    with pytest.raises(InvalidInputError, match=r"strength: must be in \(0, 1\]"):
        GenerationConfig(PROMPT, image=picture, strength=strength)


def test_strength_without_an_image_is_refused():
    with pytest.raises(InvalidInputError, match="strength: given without an image"):
        GenerationConfig(PROMPT, strength=0.5)


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(InvalidInputError, match="is not an image"):
        GenerationConfig(PROMPT, image=text)
    with pytest.raises(InvalidInputError, match="does not exist"):
        GenerationConfig(PROMPT, image=tmp_path / "missing.png")


def test_a_strength_that_leaves_no_step_is_refused_not_an_empty_loop(sdxl, picture):
    with pytest.raises(InvalidInputError, match="leaves no step to run"):
        sdxl.generate(GenerationConfig(PROMPT, image=picture, strength=0.2, steps=4))  # int(0.8) = 0 steps


# --------------------------------------------------------------------------------------------
# ONNX Runtime and the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img_graphs(tmp_path_factory):
    return exported_graphs(tmp_path_factory, "tiny-sdxl", img2img=True)


@pytest.mark.parametrize("model, strength, timesteps", [
    ("tiny-sdxl", 0.75, (749, 499, 249)),  # int(4 x 0.75) = 3 steps
    ("tiny-flux", 0.6, (750, 500, 250)),  # 4 - int(4 - 2.4) = 3 steps
])
def test_ort_img2img_agrees_with_torch(model, strength, timesteps, request, tmp_path_factory, picture):
    on_torch_sampler = request.getfixturevalue("sdxl" if model == "tiny-sdxl" else "flux")
    config = GenerationConfig(PROMPT, seed=4, image=picture, strength=strength)
    graphs = exported_graphs(tmp_path_factory, model, img2img=True)
    with Sampler.load(model, "ort", graphs=graphs, options=ONE_THREAD) as ort:
        on_ort = ort.generate(config)
    on_torch = on_torch_sampler.generate(config)
    assert on_ort.timesteps == on_torch.timesteps == timesteps
    assert max_pixel_diff(on_ort.image, on_torch.image) <= SAME_IMAGE


def test_a_static_export_resizes_the_image_to_its_size_with_a_note(img2img_graphs, picture, tmp_path, caplog):
    wide = tmp_path / "wide.png"
    Image.open(picture).resize((96, 64)).save(wide)
    with Sampler.load("tiny-sdxl", "ort", graphs=img2img_graphs, options=ONE_THREAD) as ort, \
            caplog.at_level("INFO", logger="gag_export.runtime"):
        result = ort.generate(GenerationConfig(PROMPT, seed=4, image=wide, strength=0.5))
    assert (result.width, result.height) == (64, 64)  # the graphs' static size
    assert "resizing the input image from 96x64 to 64x64" in caplog.text


def test_cli_img2img_writes_the_image_with_its_strength(img2img_graphs, picture, tmp_path):
    out = tmp_path / "fox.png"
    result = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "--backend", "ort",
                                      "--graphs", str(img2img_graphs), "--no-build", "--threads", "1",
                                      "--image", str(picture), "--strength", "0.5", "--out", str(out)], obj={})
    assert result.exit_code == 0, result.output
    assert read_png_metadata(out)["strength"] == "0.5"
    missing = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "--no-build",
                                       "--graphs", str(img2img_graphs), "--image", str(tmp_path / "none.png"),
                                       "--out", str(tmp_path / "x.png")], obj={})
    assert missing.exit_code == 2 and "does not exist" in missing.output and not (tmp_path / "x.png").exists()


def test_an_export_without_the_encoder_is_exit_5_saying_how_to_get_one(tmp_path_factory, picture, tmp_path):
    graphs = exported_graphs(tmp_path_factory, "tiny-sdxl")  # the default export: txt2img only
    result = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "--backend", "ort",
                                      "--graphs", str(graphs), "--no-build", "--threads", "1", "--image", str(picture),
                                      "--out", str(tmp_path / "x.png")], obj={})
    assert result.exit_code == 5, result.output
    assert "--img2img" in " ".join(result.output.split()) and not (tmp_path / "x.png").exists()
