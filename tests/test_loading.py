"""Loading through the real code paths: tiny, local folders, HF-cache layouts, single files, random."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from gag_export.core.errors import ArtifactError, InvalidInputError, ResourceExhaustedError, WeightsNotFoundError
from gag_export.models import (
    ModelEntry,
    WeightsSource,
    build_random_pipeline,
    descriptors_for,
    entry_configs,
    get_entry,
    load_pipeline,
    load_state_dict,
    manifest_entry,
    resolve_entry,
)
from gag_export.models import loading

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_sdxl():
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def other_unet_state():
    """A UNet state dict different from tiny-sdxl's (seed 1), as a fine-tuned checkpoint would be."""
    return {k: v.clone() for k, v in load_pipeline("tiny-sdxl", seed=1, components=("unet",)).unet.state_dict().items()}


def same_weights(module, state) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k].to(own[k].dtype)) for k in own)


def fake_hub_repo(cache_dir, repo_id):
    """A repo in the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<sha>/}."""
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    snapshot = root / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    return snapshot


def test_entry(source: WeightsSource) -> ModelEntry:
    return ModelEntry(name="test-model", family="sdxl", description="test", source=source, height=64, width=64,
                      scheduler=get_entry("dmd2").scheduler)


test_entry.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------------- tiny


def test_tiny_pipelines_have_the_entry_schedule_and_dtype():
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline

    pipe = load_pipeline("tiny-sdxl", dtype="fp16", components=("unet", "vae_decoder"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert isinstance(load_pipeline("tiny-flux", components=("denoiser",)).scheduler, FlowMatchEulerDiscreteScheduler)


def test_tiny_weights_are_deterministic(tiny_sdxl, other_unet_state):
    again = load_pipeline("tiny-sdxl", components=("unet",))
    assert same_weights(again.unet, tiny_sdxl.unet.state_dict())
    assert not same_weights(tiny_sdxl.unet, other_unet_state)


def test_tiny_sdxl_pipeline_samples_an_image(tiny_sdxl):
    entry = get_entry("tiny-sdxl")
    image = tiny_sdxl("a cat", num_inference_steps=4, timesteps=list(entry.scheduler.timesteps_for(4)),
                      guidance_scale=0.0, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_bad_weights_and_components_are_invalid_input():
    with pytest.raises(InvalidInputError, match="no pretrained weights"):
        load_pipeline("tiny-sdxl", weights="pretrained")
    with pytest.raises(InvalidInputError, match="weights: must be one of"):
        load_pipeline("tiny-sdxl", weights="downloaded")
    with pytest.raises(InvalidInputError, match="'transformer' is not a sdxl component"):
        load_pipeline("tiny-sdxl", components=("transformer",))


# --------------------------------------------------------------------------- local folders


def test_local_diffusers_folder_round_trip(tmp_path, tiny_sdxl):
    tiny_sdxl.save_pretrained(tmp_path / "my-sdxl")
    entry = resolve_entry(tmp_path / "my-sdxl")
    assert (entry.family, entry.height, entry.scheduler.class_name) == ("sdxl", 64, "LCMScheduler")
    pipe = load_pipeline(tmp_path / "my-sdxl")
    assert same_weights(pipe.unet, tiny_sdxl.unet.state_dict())
    assert same_weights(pipe.text_encoder_2, tiny_sdxl.text_encoder_2.state_dict())
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, tiny_sdxl.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids)
    names = [d.name for d in descriptors_for(tmp_path / "my-sdxl", pipe)]
    assert names == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]


@pytest.mark.parametrize("text", ["{", "[1]", "\xff"])
def test_a_damaged_model_index_is_an_artifact_error_naming_the_file(tmp_path, text):
    folder = tmp_path / "fakepipe"
    folder.mkdir()
    (folder / "model_index.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="model_index.json"):
        resolve_entry(folder)


def test_a_model_index_with_an_odd_scheduler_entry_falls_back_to_euler(tmp_path):
    folder = tmp_path / "oddpipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "scheduler": ["x"]}))
    assert resolve_entry(folder).scheduler.class_name == "EulerDiscreteScheduler"


def test_local_flux_folder_round_trip_keeps_the_t5_tokenizer(tmp_path):
    flux = load_pipeline("tiny-flux")
    flux.save_pretrained(tmp_path / "my-flux")
    pipe = load_pipeline(str(tmp_path / "my-flux"), components=("text_encoder_2",))
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer is None
    text = "a lighthouse in a storm"
    assert pipe.tokenizer_2(text).input_ids == flux.tokenizer_2(text).input_ids
    assert same_weights(pipe.text_encoder_2, flux.text_encoder_2.state_dict())


def test_manifest_entry_prefers_the_registry_then_the_recorded_folder(tmp_path, tiny_sdxl):
    assert manifest_entry({"model": "tiny-sdxl", "source": "built-in tiny config"}) is get_entry("tiny-sdxl")
    tiny_sdxl.save_pretrained(tmp_path / "my-sdxl")
    local = manifest_entry({"model": "my-sdxl", "source": str(tmp_path / "my-sdxl")})
    assert (local.name, local.family) == ("my-sdxl", "sdxl")
    with pytest.raises(InvalidInputError, match="unknown model 'my-sdxl'"):
        manifest_entry({"model": "my-sdxl", "source": "my-sdxl"})  # not a recorded absolute path
    with pytest.raises(ArtifactError, match="not there any more"):
        manifest_entry({"model": "gone", "source": str(tmp_path / "gone")})


def test_folder_without_model_index_is_invalid(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(InvalidInputError, match="'StableDiffusionPipeline' is not supported"):
        resolve_entry(tmp_path / "other")


# --------------------------------------------------------------------------- single files


def test_single_file_safetensors_denoiser(tmp_path, other_unet_state):
    from safetensors.torch import save_file

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in other_unet_state.items()}, str(path))
    pipe = load_pipeline("tiny-sdxl", denoiser_path=path, dtype="fp16")
    assert pipe.unet.dtype == torch.float16
    assert same_weights(pipe.unet, other_unet_state)
    assert not any(p.is_meta for p in pipe.unet.parameters())


def test_single_file_bin_is_read_with_weights_only(tmp_path, other_unet_state, monkeypatch):
    path = tmp_path / "unet_fp16.bin"
    torch.save({k: v.half() for k, v in other_unet_state.items()}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    pipe = load_pipeline("tiny-sdxl", denoiser_path=path)
    assert calls == [True]
    assert pipe.unet.dtype == torch.float32
    assert same_weights(pipe.unet, {k: v.half() for k, v in other_unet_state.items()})


class NotATensor:
    """Anything a plain state dict would not contain: weights_only must refuse to build it."""


def test_bin_with_arbitrary_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(ArtifactError, match="weights_only"):
        load_state_dict(path)


def test_checkpoint_with_other_keys_is_an_artifact_error(tmp_path, other_unet_state):
    from safetensors.torch import save_file

    path = tmp_path / "ldm.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in list(other_unet_state.items())[:4]}, str(path))
    with pytest.raises(ArtifactError, match="original/LDM-layout"):
        load_pipeline("tiny-sdxl", denoiser_path=path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_state_dict(tmp_path / "broken.safetensors")


# --------------------------------------------------------------------------- Hugging Face cache


def test_hub_cache_base_plus_single_file_unet(tmp_path, tiny_sdxl, other_unet_state):
    tiny_sdxl.save_pretrained(fake_hub_repo(tmp_path, "test-org/tiny-base"))
    torch.save(other_unet_state, fake_hub_repo(tmp_path, "test-org/tiny-unet") / "unet.bin")
    entry = test_entry(WeightsSource("test-org/tiny-base", "test-org/tiny-unet", "unet.bin"))
    pipe = load_pipeline(entry, cache_dir=tmp_path)
    assert same_weights(pipe.unet, other_unet_state)
    assert same_weights(pipe.vae, tiny_sdxl.vae.state_dict())
    assert type(pipe.scheduler).__name__ == "LCMScheduler"


def test_missing_weights_name_the_file_and_the_ways_out(tmp_path):
    import shutil

    download = loading.download_command()  # the installed Hub CLI's command, so the hint can be pasted
    assert shutil.which(download.split()[0]) is not None
    with pytest.raises(WeightsNotFoundError) as info:
        load_pipeline("dmd2", cache_dir=tmp_path)
    message = str(info.value)
    assert info.value.exit_code == 6
    for part in ("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", f"{download} tianweiy/DMD2",
                 "--weights random", "tiny-sdxl"):
        assert part in message
    with pytest.raises(WeightsNotFoundError, match=f"{download} black-forest-labs/FLUX.1-schnell.*tiny-flux"):
        load_pipeline("flux-schnell", cache_dir=tmp_path, components=("vae",))
    with pytest.raises(WeightsNotFoundError, match="checkpoint file not found"):
        load_pipeline("tiny-sdxl", denoiser_path=tmp_path / "nope.safetensors")


def test_weights_present_looks_at_the_cache_without_loading(tmp_path, tiny_sdxl):
    assert loading.weights_present("tiny-sdxl") is None
    assert loading.weights_present("dmd2", cache_dir=tmp_path) is False
    base = fake_hub_repo(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    (base / "model_index.json").write_text("{}")
    assert loading.weights_present("sdxl", cache_dir=tmp_path) is False  # no UNet weights yet
    (base / "unet").mkdir()
    (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    assert loading.weights_present("sdxl", cache_dir=tmp_path) is True
    assert loading.weights_present("dmd2", cache_dir=tmp_path) is False  # its UNet file is another repo's
    dmd2 = fake_hub_repo(tmp_path, "tianweiy/DMD2")
    (dmd2 / "dmd2_sdxl_4step_unet_fp16.bin").write_bytes(b"x")
    assert loading.weights_present("dmd2", cache_dir=tmp_path) is True
    folder = tmp_path / "local"
    tiny_sdxl.save_pretrained(folder)
    assert loading.weights_present(str(folder)) is True


# --------------------------------------------------------------------------- random weights


def test_random_pipeline_builds_the_entry_architecture():
    pipe = build_random_pipeline("tiny-flux", seed=3)
    tiny = load_pipeline("tiny-flux")
    assert pipe.transformer.config.num_layers == tiny.transformer.config.num_layers
    assert not same_weights(pipe.transformer, tiny.transformer.state_dict())
    assert same_weights(build_random_pipeline("tiny-flux", seed=3, components=("transformer",)).transformer,
                        pipe.transformer.state_dict())  # per-component seeds


def test_random_full_size_tokenizers_use_the_real_special_ids():
    pipe = load_pipeline("sdxl", weights="random", components=())
    ids = pipe.tokenizer_2("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert (ids[0].item(), ids[6].item()) == (49406, 49407)
    assert pipe.unet is None and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_full_size_configs_have_the_published_sizes():
    sdxl = entry_configs(get_entry("sdxl"))
    assert loading.parameter_count("sdxl", sdxl, ["unet"]) == pytest.approx(2.567e9, rel=1e-3)
    assert loading.parameter_count("sdxl", sdxl, ["text_encoder_2"]) == pytest.approx(694.7e6, rel=1e-3)
    flux = entry_configs(get_entry("flux-schnell"))
    assert loading.parameter_count("flux", flux, ["transformer"]) == pytest.approx(11.89e9, rel=1e-3)
    assert entry_configs(get_entry("lcm-sdxl"))["unet"]["time_cond_proj_dim"] == 256
    assert entry_configs(get_entry("sdxl-turbo"))["unet"]["sample_size"] == 64


def test_random_weights_that_do_not_fit_are_refused(monkeypatch):
    import psutil

    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**30))
    with pytest.raises(ResourceExhaustedError, match=r"needs ~9\.6 GiB in fp32.*components=\('unet',\)"):
        load_pipeline("sdxl", weights="random", components=("unet",))
