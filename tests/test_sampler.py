"""The sampling loop (gag_export/runtime/sampler.py) on the torch backend with the tiny models.

Reference points: diffusers' own StableDiffusionXLPipeline / FluxPipeline on the same tiny weights
(no GAG) for the loop itself, the GAG identity, CFG and TCD's eta; each real entry's SchedulerSpec
for the timesteps.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from runtime_helpers import PROMPT, max_pixel_diff, pixels, torch_sampler, torch_threads

from gag_export import __version__
from gag_export.core.errors import InvalidInputError
from gag_export.models import get_entry, load_pipeline
from gag_export.runtime import (
    IDENTITY_GAG,
    ComponentSet,
    GAGParams,
    GenerationConfig,
    Sampler,
    TorchComponent,
    check_request,
    read_png_metadata,
    save_png,
)

# 2/255 on 8-bit images: the bar for "the same image".
SAME_IMAGE = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """tiny-sdxl on torch with GAG applied (no export in its graphs folder: the default bisect config)."""
    with torch_sampler(tmp_path_factory, "tiny-sdxl") as sampler:
        yield sampler


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    with torch_sampler(tmp_path_factory, "tiny-flux") as sampler:
        yield sampler


@pytest.fixture(scope="module")
def sdxl_pipe():
    """diffusers' pipeline on the same tiny weights, GAG never applied: the unmodified model."""
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline("tiny-flux")


def with_entry(sampler: Sampler, name: str, **changes) -> Sampler:
    """The same tiny components driven with a real entry's schedule and guidance (tiny image size)."""
    entry = dataclasses.replace(get_entry(name), height=64, width=64, **changes)
    return Sampler(entry, sampler.components, sampler.assets, sampler.descriptors)


def record_timesteps(monkeypatch, sampler: Sampler) -> list:
    """Spy on the denoiser: the `timestep` input of every call, in order."""
    denoiser = sampler.components.denoiser
    seen = []
    original = denoiser.infer

    def infer(feed):
        seen.append(np.asarray(feed["timestep"]).reshape(-1)[0].item())
        return original(feed)

    monkeypatch.setattr(denoiser, "infer", infer)
    return seen


# --------------------------------------------------------------------------------------------
# The loop against diffusers' own pipelines
# --------------------------------------------------------------------------------------------


def test_sdxl_gag_identity_reproduces_the_unmodified_pipeline(sdxl, sdxl_pipe):
    """scale=-1, zeta=1, eta=1e9 through the GAG processors == diffusers' pipeline without GAG (DMD2 4 steps)."""
    result = sdxl.generate(GenerationConfig(PROMPT, seed=3, gag=IDENTITY_GAG))
    reference = sdxl_pipe(PROMPT, num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0.0,
                          generator=torch.Generator().manual_seed(3), height=64, width=64).images[0]
    assert result.timesteps == (999, 749, 499, 249)
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE


def test_sdxl_gag_changes_the_image(sdxl):
    plain = sdxl.generate(GenerationConfig(PROMPT, seed=3, gag=IDENTITY_GAG))
    guided = sdxl.generate(GenerationConfig(PROMPT, seed=3, gag=GAGParams(scale=10.0, eta=15.0, zeta=0.5)))
    assert np.abs(guided.latents - plain.latents).max() > 1e-3
    assert max_pixel_diff(guided.image, plain.image) > SAME_IMAGE  # so the identity tests' tolerance is meaningful


def test_gag_off_feeds_the_identity(sdxl):
    """GAG off on a GAG denoiser is the identity values, not the export's defaults."""
    off = sdxl.generate(GenerationConfig(PROMPT, seed=5, gag=None))
    identity = sdxl.generate(GenerationConfig(PROMPT, seed=5, gag=IDENTITY_GAG))
    np.testing.assert_array_equal(off.latents, identity.latents)
    assert off.metadata["gag"] == "off" and identity.metadata["gag"] == "on"


def test_flux_gag_identity_reproduces_the_unmodified_pipeline(flux, flux_pipe):
    """FLUX schnell schedule, packed latents, img_ids/txt_ids, T5 length 32: same image as FluxPipeline."""
    result = flux.generate(GenerationConfig(PROMPT, seed=7, gag=IDENTITY_GAG))
    reference = flux_pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=32, height=64,
                          width=64, generator=torch.Generator().manual_seed(7)).images[0]
    assert result.timesteps == (1000, 750, 500, 250)
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE
    guided = flux.generate(GenerationConfig(PROMPT, seed=7, gag=GAGParams(scale=10.0)))
    assert max_pixel_diff(guided.image, result.image) > SAME_IMAGE


def test_cfg_doubles_the_batch_and_matches_diffusers(sdxl, sdxl_pipe, monkeypatch):
    """The `sdxl` entry (CFG 5.0, Euler): one batch-2 denoiser call per step, GAG in both halves."""
    sampler = with_entry(sdxl, "sdxl")
    batches = []
    original = sampler.components.denoiser.infer
    monkeypatch.setattr(sampler.components.denoiser, "infer",
                        lambda feed: batches.append(feed["sample"].shape[0]) or original(feed))
    result = sampler.generate(GenerationConfig(PROMPT, seed=2, steps=2, gag=IDENTITY_GAG))
    assert batches == [2, 2]
    assert result.timesteps == (501, 1)

    pipe = load_pipeline("tiny-sdxl")  # a fresh pipeline: EulerDiscreteScheduler as the sdxl entry has it
    pipe.scheduler = get_entry("sdxl").scheduler.build(pipe.scheduler.config)
    reference = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(2),
                     height=64, width=64).images[0]
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE
    negative = sampler.generate(GenerationConfig(PROMPT, seed=2, steps=2, gag=IDENTITY_GAG, negative_prompt="blurry, dark"))
    reference = pipe(PROMPT, negative_prompt="blurry, dark", num_inference_steps=2, guidance_scale=5.0, height=64,
                     width=64, generator=torch.Generator().manual_seed(2)).images[0]
    assert max_pixel_diff(negative.image, reference) <= SAME_IMAGE
    assert max_pixel_diff(negative.image, result.image) > SAME_IMAGE
    no_cfg = with_entry(sdxl, "sdxl", cfg_scale=None).generate(GenerationConfig(PROMPT, seed=2, steps=2, gag=IDENTITY_GAG))
    assert max_pixel_diff(no_cfg.image, result.image) > SAME_IMAGE


def test_tcd_eta_from_the_model_card_reaches_the_scheduler(sdxl):
    """Hyper-SDXL's TCDScheduler with eta=1.0 (SchedulerSpec.call_kwargs), run as diffusers runs it.

    eta only acts between steps, so the card's 1-step schedule is stretched to 2 steps here.
    """
    hyper = get_entry("hyper-sdxl-1step").scheduler
    assert dict(hyper.call_kwargs) == {"eta": 1.0}
    spec = dataclasses.replace(hyper, default_steps=2, max_steps=2, timesteps={})
    result = with_entry(sdxl, "hyper-sdxl-1step", scheduler=spec).generate(GenerationConfig(PROMPT, seed=4, gag=IDENTITY_GAG))
    pipe = load_pipeline("tiny-sdxl")
    pipe.scheduler = spec.build(pipe.scheduler.config)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=0.0, height=64, width=64)
    reference = pipe(**kwargs, eta=1.0, generator=torch.Generator().manual_seed(4)).images[0]
    other_eta = pipe(**kwargs, eta=0.3, generator=torch.Generator().manual_seed(4)).images[0]
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE
    assert max_pixel_diff(other_eta, reference) > SAME_IMAGE  # eta matters, so the comparison means something


# --------------------------------------------------------------------------------------------
# Schedules: the timesteps each real entry's loop feeds the denoiser
# --------------------------------------------------------------------------------------------


# Expected values from the model cards' own sampling code, not from the registry: DMD2
# (tianweiy/DMD2: `timesteps=[999, 749, 499, 249]` for the 4-step UNet, `timesteps=[399]` for the
# 1-step one), Hyper-SDXL 1-step UNet (ByteDance/Hyper-SD: TCDScheduler, `timesteps=[800]`, eta 1.0),
# SDXL-Lightning and SDXL-Turbo (Euler, "trailing" spacing over 1000 training steps), LCM-SDXL
# (LCMScheduler's own skipping of its 50 original steps).
SDXL_SCHEDULES = [
    ("dmd2", 4, [999, 749, 499, 249]),
    ("dmd2", 1, [999]),  # no prescribed 1-step timesteps: LCM's own spacing
    ("dmd2-1step", 1, [399]),
    ("hyper-sdxl-1step", 1, [800]),
    ("sdxl-turbo", 1, [999]),
    ("sdxl-turbo", 2, [999, 499]),  # trailing spacing
    ("sdxl-turbo", 4, [999, 749, 499, 249]),
    ("sdxl-lightning-4step", 4, [999, 749, 499, 249]),
    ("lcm-sdxl", 4, [999, 759, 499, 259]),
]


@pytest.mark.parametrize("name, steps, expected", SDXL_SCHEDULES, ids=[f"{n}-{s}" for n, s, _ in SDXL_SCHEDULES])
def test_sdxl_entries_drive_the_denoiser_with_their_timesteps(sdxl, monkeypatch, name, steps, expected):
    sampler = with_entry(sdxl, name)
    seen = record_timesteps(monkeypatch, sampler)
    result = sampler.generate(GenerationConfig(PROMPT, seed=0, steps=steps))
    assert seen == expected
    assert list(result.timesteps) == expected
    assert json.loads(result.metadata["timesteps"]) == expected
    assert result.metadata["scheduler"] == get_entry(name).scheduler.class_name


@pytest.mark.parametrize("steps, expected", [(4, [1000, 750, 500, 250]), (2, [1000, 500]), (1, [1000])])
def test_flux_schnell_sigmas(flux, monkeypatch, steps, expected):
    """FlowMatchEuler with schnell's config (shift 1, no dynamic shifting): sigmas linspace(1, 1/n, n);
    the transformer takes timestep / 1000."""
    sampler = with_entry(flux, "flux-schnell", text_len=32)
    seen = record_timesteps(monkeypatch, sampler)
    result = sampler.generate(GenerationConfig(PROMPT, seed=0, steps=steps))
    assert list(result.timesteps) == expected
    assert seen == pytest.approx([t / 1000 for t in expected])


# --------------------------------------------------------------------------------------------
# Requests: validation, reproducibility, prompts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 5, -1])
def test_steps_outside_the_models_range_are_refused(sdxl, steps):
    with pytest.raises(InvalidInputError, match=r"steps: this model samples with 1\.\.4 steps"):
        sdxl.generate(GenerationConfig(PROMPT, steps=steps))


def test_sizes_must_be_multiples_of_the_latent_factor(sdxl, flux):
    # tiny-sdxl: VAE x8 times the UNet's two levels = 16; FLUX: VAE x8 times 2x2 packing = 16.
    with pytest.raises(InvalidInputError, match=r"height: 72 is not a multiple of 16.*use 64 or 80"):
        sdxl.generate(GenerationConfig(PROMPT, height=72))
    with pytest.raises(InvalidInputError, match=r"width: 40 is not a multiple of 16"):
        flux.generate(GenerationConfig(PROMPT, width=40))
    # The full-size SDXL UNet downsamples three times: 1000 is not a multiple of 32.
    with pytest.raises(InvalidInputError, match=r"multiple of 32"):
        check_request(get_entry("dmd2"), GenerationConfig(PROMPT, height=1000))
    assert check_request(get_entry("flux-schnell"), GenerationConfig(PROMPT, height=1008, width=512))[1].height == 1008


def test_bad_request_values(sdxl):
    with pytest.raises(InvalidInputError, match="seed"):
        GenerationConfig(PROMPT, seed=-1)
    with pytest.raises(InvalidInputError, match="eta"):
        GAGParams(eta=0.0)
    with pytest.raises(InvalidInputError, match="unknown backend 'cuda'.*torch, ort, tensorrt"):
        Sampler.load("tiny-sdxl", "cuda")
    with pytest.raises(InvalidInputError, match="unknown model 'nope'"):
        Sampler.load("nope", "torch")


def test_other_sizes_on_the_torch_backend(sdxl):
    result = sdxl.generate(GenerationConfig(PROMPT, seed=1, height=32, width=48, steps=1))
    assert result.image.size == (48, 32)
    assert result.latents.shape == (1, 4, 4, 6)


def test_same_seed_same_image_other_seed_other_image(sdxl):
    config = GenerationConfig(PROMPT, seed=11, gag=GAGParams(scale=5.0))
    first, second = sdxl.generate(config), sdxl.generate(config)
    np.testing.assert_array_equal(pixels(first.image), pixels(second.image))
    np.testing.assert_array_equal(first.latents, second.latents)
    other = sdxl.generate(dataclasses.replace(config, seed=12))
    assert np.abs(other.latents - first.latents).max() > 1e-3


def test_a_stochastic_scheduler_is_reproducible_too(sdxl):
    """SDXL-Turbo's EulerAncestral draws noise each step from the request's generator."""
    sampler = with_entry(sdxl, "sdxl-turbo")
    config = GenerationConfig(PROMPT, seed=9, steps=3)
    np.testing.assert_array_equal(sampler.generate(config).latents, sampler.generate(config).latents)


def test_long_prompts_are_truncated_with_a_warning(sdxl, flux, caplog):
    long_prompt = " ".join(["a very detailed painting of a red fox in the snowy forest"] * 30)
    with caplog.at_level(logging.WARNING, logger="gag_export.runtime"):
        result = sdxl.generate(GenerationConfig(long_prompt, seed=1, steps=1))
    assert result.image.size == (64, 64)
    assert "the encoder takes 77: truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gag_export.runtime"):
        flux.generate(GenerationConfig(long_prompt, seed=1, steps=1))
    assert "text_encoder_2 tokens, the encoder takes 32" in caplog.text  # T5 at the entry's text_len


def test_prompt_changes_the_image(sdxl):
    a = sdxl.generate(GenerationConfig("a red fox", seed=1, steps=1))
    b = sdxl.generate(GenerationConfig("a blue lighthouse on a rocky coast", seed=1, steps=1))
    assert np.abs(a.latents - b.latents).max() > 1e-4


def test_gag_values_on_a_graph_without_gag_inputs_are_refused(sdxl):
    """A denoiser exported with --no-gag takes no gag_* inputs: GAG values are an error, GAG off is fine."""
    pipe = load_pipeline("tiny-sdxl")
    descriptors = {d.name: d for d in sdxl.descriptors.values()}
    components = {
        name: TorchComponent(name, d.role, d.inputs("fp32", False), d.outputs("fp32", False), d.export_module(pipe))
        for name, d in descriptors.items()
    }
    plain = Sampler(sdxl.entry, ComponentSet("tiny-sdxl", "torch", components, pipe=pipe), sdxl.assets, descriptors)
    with plain:
        with pytest.raises(InvalidInputError, match="exported without GAG"):
            plain.generate(GenerationConfig(PROMPT, gag=GAGParams()))
        off = plain.generate(GenerationConfig(PROMPT, seed=3, gag=None))
    identity = sdxl.generate(GenerationConfig(PROMPT, seed=3, gag=IDENTITY_GAG))
    assert max_pixel_diff(off.image, identity.image) <= SAME_IMAGE


def test_gag_params_of_a_graph_without_gag_inputs_is_none_unless_values_are_given(sdxl):
    """A --no-gag export samples plainly when the user gave no GAG values; given values are still refused."""
    pipe = load_pipeline("tiny-sdxl")
    components = {
        name: TorchComponent(name, d.role, d.inputs("fp32", False), d.outputs("fp32", False), d.export_module(pipe))
        for name, d in sdxl.descriptors.items()
    }
    plain = Sampler(sdxl.entry, ComponentSet("tiny-sdxl", "torch", components, pipe=pipe), sdxl.assets, sdxl.descriptors)
    assert plain.gag_params() is None
    assert plain.gag_params(scale=3.0).scale == 3.0  # returned, so that gag_feed refuses it
    with plain:
        plain.generate(GenerationConfig(PROMPT, seed=3, steps=1, gag=plain.gag_params()))
        with pytest.raises(InvalidInputError, match="exported without GAG"):
            plain.generate(GenerationConfig(PROMPT, steps=1, gag=plain.gag_params(scale=3.0)))


# --------------------------------------------------------------------------------------------
# Output: timings, PNG metadata
# --------------------------------------------------------------------------------------------


def test_result_records_timings_per_stage(sdxl):
    result = sdxl.generate(GenerationConfig(PROMPT, seed=1, steps=3))
    assert len(result.timings.denoise) == 3 == result.steps
    rows = result.timings.rows(result.timesteps)
    assert [name for name, _ in rows][0] == "text encode" and rows[-2][0] == "vae decode"
    assert rows[1][0] == f"denoise step 1 (t={int(result.timesteps[0])})"
    assert all(seconds >= 0 for _, seconds in rows)
    assert rows[-1][1] == pytest.approx(sum(seconds for _, seconds in rows[:-1]))


def test_png_metadata_round_trips(sdxl, tmp_path):
    prompt = "un renard roux dans la neige, « hiver » ❄"
    result = sdxl.generate(GenerationConfig(prompt, seed=21, steps=4, gag=GAGParams(scale=7.5, eta=12.0, zeta=0.25)))
    path = result.save(tmp_path / "out" / "fox.png")
    meta = read_png_metadata(path)
    assert meta == result.metadata
    assert meta["prompt"] == prompt
    assert (meta["seed"], meta["steps"], meta["model"], meta["backend"]) == ("21", "4", "tiny-sdxl", "torch")
    assert (float(meta["gag_scale"]), float(meta["gag_eta"]), float(meta["gag_zeta"])) == (7.5, 12.0, 0.25)
    assert json.loads(meta["timesteps"]) == [999, 749, 499, 249]
    assert meta["gag_export_version"] == __version__
    from PIL import Image

    with Image.open(path) as reread:
        np.testing.assert_array_equal(pixels(reread.convert("RGB")), pixels(result.image))


def test_png_is_written_atomically(tmp_path, sdxl):
    from PIL import Image

    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    save_png(Image.new("RGB", (8, 8), (255, 0, 0)), path, {"prompt": "red"})
    assert read_png_metadata(path) == {"prompt": "red"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]  # no temp file left behind

    class Broken:
        def save(self, f, **kwargs):
            f.write(b"partial")
            raise OSError("disk went away")

    from gag_export.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="disk went away"):
        save_png(Broken(), path, {"prompt": "blue"})
    assert read_png_metadata(path) == {"prompt": "red"}  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
