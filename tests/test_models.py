"""Descriptors, tiny pipelines, tokenizers and the registry (gag_export.models)."""

from __future__ import annotations

import inspect

import pytest
import torch

from gag_export.core.errors import InvalidInputError
from gag_export.models import (
    FluxTransformer,
    ImageShape,
    Precision,
    SchedulerSpec,
    SDXLUNet,
    TensorSpec,
    build_clip_tokenizer,
    build_t5_tokenizer,
    descriptors_for,
    float32_rotary,
    get_entry,
    latent_image_ids,
    list_entries,
    load_pipeline,
)


@pytest.fixture(scope="module")
def sdxl_pipe():
    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline("tiny-flux")


def by_name(descriptors):
    return {d.name: d for d in descriptors}


# --------------------------------------------------------------------------- shapes and profiles


def test_image_shape_rejects_non_positive_and_names_the_field():
    with pytest.raises(InvalidInputError, match="ImageShape.height"):
        ImageShape(0, 64)
    with pytest.raises(InvalidInputError, match="ImageShape.batch"):
        ImageShape(64, 64, batch=0)
    with pytest.raises(InvalidInputError, match="ImageShape.width"):
        ImageShape(64, 64.0)


def test_dim_values_check_the_family_multiple():
    unet = by_name(descriptors_for("sdxl"))["unet"]  # full size: VAE 8 x UNet 4
    with pytest.raises(InvalidInputError, match=r"ImageShape.height: 1000 is not a multiple of 32.*992 or 1024"):
        unet.dim_values(ImageShape(1000, 1024))
    with pytest.raises(InvalidInputError, match="ImageShape.width"):
        by_name(descriptors_for("flux"))["transformer"].dim_values(ImageShape(1024, 1032))
    assert unet.dim_values(ImageShape(1024, 768, batch=2)) == {
        "batch": 2, "image_height": 1024, "image_width": 768, "latent_height": 128, "latent_width": 96,
    }


def test_flux_dim_values_count_packed_tokens():
    transformer = by_name(descriptors_for("flux-schnell"))["transformer"]
    dims = transformer.dim_values(ImageShape(1024, 768))
    assert dims["image_tokens"] == (1024 // 16) * (768 // 16)
    assert transformer.shapes(ImageShape(1024, 768))["img_ids"] == (dims["image_tokens"], 3)


def test_static_profile_has_equal_min_opt_max_and_empty_scalars():
    unet = by_name(descriptors_for("tiny-sdxl"))["unet"]
    shape = ImageShape(64, 64)
    profile = unet.profile(shape, shape, shape)
    assert list(profile) == unet.input_names()
    assert profile["sample"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [1, 4, 8, 8]}
    assert profile["encoder_hidden_states"]["opt"] == [1, 77, 64]
    assert profile["gag_scale"] == {"min": [], "opt": [], "max": []}


def test_dynamic_profile_and_its_validation():
    transformer = by_name(descriptors_for("flux-schnell"))["transformer"]
    profile = transformer.profile(ImageShape(512, 512), ImageShape(1024, 1024), ImageShape(1024, 1536, batch=4))
    assert profile["hidden_states"] == {"min": [1, 1024, 64], "opt": [1, 4096, 64], "max": [4, 6144, 64]}
    assert profile["txt_ids"] == {"min": [256, 3], "opt": [256, 3], "max": [256, 3]}
    with pytest.raises(InvalidInputError, match="min <= opt <= max"):
        transformer.profile(ImageShape(1024, 1024), ImageShape(512, 512), ImageShape(1024, 1024))


def test_dynamic_axes_follow_the_symbolic_dims():
    unet = by_name(descriptors_for("sdxl"))["unet"]
    axes = unet.dynamic_axes()
    assert axes["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert axes["encoder_hidden_states"] == {0: "batch"}
    assert axes["gag_eta"] == {}
    assert "gag_eta" not in unet.dynamic_axes(gag=False)
    assert unet.dynamic_axes(outputs=True)["latent"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    flux = by_name(descriptors_for("flux"))["transformer"]
    assert flux.dynamic_axes()["img_ids"] == {0: "image_tokens"}


def test_inputs_dtypes_and_gag_flag():
    unet = by_name(descriptors_for("sdxl"))["unet"]
    specs = {s.name: s for s in unet.inputs("fp16")}
    assert specs["sample"] == TensorSpec("sample", "float16", ("batch", 4, "latent_height", "latent_width"))
    assert specs["timestep"].dtype == "float32"  # kept float32 at any precision
    assert [specs[n].shape for n in ("gag_scale", "gag_eta", "gag_zeta")] == [(), (), ()]
    assert all(specs[n].dtype == "float32" for n in ("gag_scale", "gag_eta", "gag_zeta"))
    assert unet.input_names(gag=False) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.outputs("bf16")[0].to_dict() == {
        "name": "latent", "dtype": "bfloat16", "shape": ["batch", 4, "latent_height", "latent_width"],
    }


def test_output_names_never_clash_with_input_names():
    for family in ("sdxl", "flux", "tiny-sdxl", "lcm-sdxl"):
        for desc in descriptors_for(family):
            assert not set(desc.input_names()) & set(desc.output_names()), desc.name


def test_vae_fp16_upcasts_and_tolerances_are_stated():
    vae = by_name(descriptors_for("sdxl"))["vae_decoder"]
    assert vae.export_dtype("fp16") is Precision.FP32
    assert vae.export_dtype("bf16") is Precision.BF16
    assert vae.inputs("fp16")[0].dtype == "float32"
    unet = by_name(descriptors_for("sdxl"))["unet"]
    assert unet.tolerance("fp32") == {"atol": 1e-4, "rtol": 1e-4}
    assert unet.tolerance("fp16")["atol"] > unet.tolerance("fp32")["atol"]
    assert unet.tolerance("bf16")["rtol"] > unet.tolerance("fp16")["rtol"]
    # The decoder's absolute tolerance is an eighth of one 8-bit level of its [-1, 1] output, and
    # its fp16 export is an fp32 graph, so it is held to that.
    assert vae.tolerance("fp32") == {"atol": pytest.approx(2 / 255 / 8), "rtol": 1e-4} == vae.tolerance("fp16")
    assert 4.4e-4 < vae.tolerance("fp32")["atol"] < 1e-3  # above the full-size decoder's measured noise
    assert vae.tolerance("bf16") == unet.tolerance("bf16")
    with pytest.raises(InvalidInputError, match="dtype"):
        Precision.parse("int8")


def test_full_size_descriptors_follow_the_configs():
    sdxl = by_name(descriptors_for("sdxl"))
    assert (sdxl["unet"].text_dim, sdxl["unet"].pooled_dim) == (2048, 1280)
    assert sdxl["text_encoder"].hidden_size + sdxl["text_encoder_2"].hidden_size == sdxl["unet"].text_dim
    assert sdxl["text_encoder_2"].pooled_dim == sdxl["unet"].pooled_dim
    assert sdxl["vae_decoder"].scaling_factor == pytest.approx(0.13025)
    lcm = by_name(descriptors_for("lcm-sdxl"))["unet"]
    assert lcm.input_names(gag=False)[-1] == "timestep_cond"
    flux = by_name(descriptors_for("flux"))
    assert "guidance" not in flux["transformer"].input_names()
    dev_like = FluxTransformer.from_configs({"transformer": {
        "in_channels": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    }})
    assert "guidance" in dev_like.input_names(gag=False)
    assert flux["vae_decoder"].shift_factor == pytest.approx(0.1159)


def test_sample_inputs_are_realistic_and_deterministic():
    descs = by_name(descriptors_for("tiny-flux"))
    shape = ImageShape(64, 96, batch=2)
    feed = descs["transformer"].sample_inputs(shape, seed=3)
    assert list(feed) == descs["transformer"].input_names()
    assert torch.equal(feed["img_ids"], latent_image_ids(4, 6))
    assert ((feed["timestep"] >= 0) & (feed["timestep"] <= 1)).all()
    assert torch.equal(feed["hidden_states"], descs["transformer"].sample_inputs(shape, seed=3)["hidden_states"])
    assert not torch.equal(feed["hidden_states"], descs["transformer"].sample_inputs(shape, seed=4)["hidden_states"])

    ids = descs["text_encoder"].sample_inputs(shape)["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (2, 77)
    assert (ids[:, 0] == 998).all() and ((ids >= 0) & (ids < 1000)).all()
    assert ((ids == 999).sum(dim=1) >= 1).all()

    unet = by_name(descriptors_for("tiny-sdxl"))["unet"]
    half = unet.sample_inputs(ImageShape(64, 64), dtype="fp16")
    assert half["sample"].dtype == torch.float16 and half["timestep"].dtype == torch.float32
    assert half["gag_scale"].dtype == torch.float32 and half["gag_scale"].ndim == 0
    assert 0 <= half["timestep"].item() < 1000
    assert half["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]


def test_latent_image_ids_match_the_pipeline(flux_pipe):
    expected = flux_pipe._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(3, 5), expected)


# --------------------------------------------------------------------------- export modules


def test_export_module_signature_is_the_input_list(sdxl_pipe):
    for desc in descriptors_for("tiny-sdxl", sdxl_pipe):
        module = desc.export_module(sdxl_pipe)
        params = list(inspect.signature(module.forward).parameters)
        assert params == desc.input_names(gag=False), desc.name


def test_descriptor_for_another_model_is_refused(sdxl_pipe):
    full_size_unet = by_name(descriptors_for("sdxl"))["unet"]
    with pytest.raises(InvalidInputError, match="text_dim 2048 != 64"):
        full_size_unet.export_module(sdxl_pipe)


@torch.no_grad()
def test_sdxl_text_encoders_match_encode_prompt(sdxl_pipe):
    descs = by_name(descriptors_for("tiny-sdxl", sdxl_pipe))
    prompt = "a photo of a cat on a wooden table"
    ids = sdxl_pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_2 = sdxl_pipe.tokenizer_2(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden_1, _ = descs["text_encoder"].export_module(sdxl_pipe)(ids)
    hidden_2, pooled_2 = descs["text_encoder_2"].export_module(sdxl_pipe)(ids_2)
    prompt_embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(torch.cat([hidden_1, hidden_2], dim=-1), prompt_embeds)
    torch.testing.assert_close(pooled_2, pooled)


@torch.no_grad()
def test_sdxl_unet_and_vae_match_the_components(sdxl_pipe):
    descs = by_name(descriptors_for("tiny-sdxl", sdxl_pipe))
    shape = ImageShape(64, 64, batch=2)
    feed = descs["unet"].sample_inputs(shape, gag=False)
    (latent,) = descs["unet"].export_module(sdxl_pipe)(*feed.values())
    expected = sdxl_pipe.unet(
        feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]},
    ).sample
    torch.testing.assert_close(latent, expected)

    z = descs["vae_decoder"].sample_inputs(shape)["latent"]
    (images,) = descs["vae_decoder"].export_module(sdxl_pipe)(z)
    expected = sdxl_pipe.vae.decode(z / sdxl_pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, expected)


@torch.no_grad()
def test_gag_denoiser_binds_its_scalar_inputs(sdxl_pipe):
    from gag_export.gag.attention import apply_gag, guidance_params, remove_gag
    from gag_export.gag import GAGConfig

    desc = by_name(descriptors_for("tiny-sdxl", sdxl_pipe))["unet"]
    feed = desc.sample_inputs(ImageShape(64, 64))
    plain = desc.export_module(sdxl_pipe)(*list(feed.values())[:-3])[0]
    apply_gag(sdxl_pipe.unet, GAGConfig(scale=1.0, method="bisect"))
    try:
        module = desc.export_module(sdxl_pipe)
        assert module.input_names[-3:] == ("gag_scale", "gag_eta", "gag_zeta")
        guided = module(*feed.values())[0]
        args = {k: v for k, v in feed.items() if not k.startswith("gag_")}
        with guidance_params(sdxl_pipe.unet).bind(feed["gag_scale"], feed["gag_eta"], feed["gag_zeta"]):
            expected = sdxl_pipe.unet(
                args["sample"], args["timestep"], encoder_hidden_states=args["encoder_hidden_states"],
                added_cond_kwargs={"text_embeds": args["text_embeds"], "time_ids": args["time_ids"]},
            ).sample
        torch.testing.assert_close(guided, expected)
        assert not torch.allclose(guided, plain, atol=1e-4)  # the inputs reach the processors
        feed["gag_scale"] = torch.tensor(0.0)
        assert not torch.allclose(module(*feed.values())[0], guided, atol=1e-4)
        assert guidance_params(sdxl_pipe.unet).scale == 1.0  # binding restored afterwards
    finally:
        remove_gag(sdxl_pipe.unet)


@torch.no_grad()
def test_flux_components_match_the_pipeline(flux_pipe):
    descs = by_name(descriptors_for("tiny-flux", flux_pipe))
    prompt = "a red fox in the forest"
    text_len = descs["text_encoder_2"].text_len
    prompt_embeds, pooled, _ = flux_pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=text_len)
    clip_ids = flux_pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    t5_ids = flux_pipe.tokenizer_2(prompt, padding="max_length", max_length=text_len, return_tensors="pt").input_ids
    torch.testing.assert_close(descs["text_encoder"].export_module(flux_pipe)(clip_ids)[0], pooled)
    torch.testing.assert_close(descs["text_encoder_2"].export_module(flux_pipe)(t5_ids)[0], prompt_embeds)

    shape = ImageShape(64, 64, batch=2)
    feed = descs["transformer"].sample_inputs(shape, gag=False)
    (latent,) = descs["transformer"].export_module(flux_pipe)(*feed.values())
    expected = flux_pipe.transformer(**feed, return_dict=False)[0]  # float64 rotary tables
    torch.testing.assert_close(latent, expected, atol=1e-4, rtol=1e-4)

    z = descs["vae_decoder"].sample_inputs(shape)["latent"]
    (images,) = descs["vae_decoder"].export_module(flux_pipe)(z)
    config = flux_pipe.vae.config
    torch.testing.assert_close(images, flux_pipe.vae.decode(z / config.scaling_factor + config.shift_factor).sample)


def test_float32_rotary_is_float32_and_restored(flux_pipe):
    transformer = flux_pipe.transformer
    original = transformer.pos_embed
    ids = latent_image_ids(4, 4)
    with float32_rotary(transformer):
        assert transformer.pos_embed is not original
        cos, sin = transformer.pos_embed(ids)
    assert transformer.pos_embed is original
    ref_cos, ref_sin = original(ids)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin.float(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- tokenizers


def test_clip_tokenizer_gives_77_tokens_in_vocab():
    tokenizer = build_clip_tokenizer()
    batch = tokenizer(["a photo of a cat", "A Dragon flying above the clouds!"], padding="max_length",
                      max_length=77, truncation=True, return_tensors="pt").input_ids
    assert batch.shape == (2, 77)
    assert (batch[:, 0] == 998).all() and (batch < 1000).all()
    assert batch[0, 6] == 999 and (batch[0, 7:] == 999).all()  # bos, 5 words, eos, pad = eos
    assert not torch.equal(batch[0], batch[1])
    assert tokenizer.decode(batch[1], skip_special_tokens=True) == "a dragon flying above the clouds !"
    assert torch.equal(batch, build_clip_tokenizer()(["a photo of a cat", "A Dragon flying above the clouds!"],
                                                     padding="max_length", max_length=77, return_tensors="pt").input_ids)
    real_size = build_clip_tokenizer(49408)
    assert (real_size.bos_token_id, real_size.eos_token_id) == (49406, 49407)


def test_t5_tokenizer_ends_with_eos_and_pads_with_zero():
    tokenizer = build_t5_tokenizer()
    ids = tokenizer("a photo of a Zebra", padding="max_length", max_length=16, return_tensors="pt").input_ids[0]
    assert ids.shape == (16,)
    n = int((ids != 0).sum())
    assert ids[n - 1] == 1 and (ids[n:] == 0).all()
    assert 2 not in ids.tolist()  # no <unk>: letters and digits are in the vocabulary
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a Zebra"


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    names = [entry.name for entry in list_entries()]
    for name in ("dmd2", "dmd2-1step", "sdxl-turbo", "hyper-sdxl-1step", "sdxl-lightning-4step", "lcm-sdxl",
                 "sdxl", "flux-schnell", "tiny-sdxl", "tiny-flux"):
        assert name in names
    with pytest.raises(InvalidInputError, match=r"unknown model 'dmd3'.*dmd2, dmd2-1step") as info:
        get_entry("dmd3")
    assert info.value.exit_code == 2


def test_schedules_follow_the_model_cards():
    dmd2 = get_entry("dmd2")
    assert dmd2.source.denoiser_file == "dmd2_sdxl_4step_unet_fp16.bin" and dmd2.cfg_scale is None
    assert dmd2.scheduler.timesteps_for(4) == (999, 749, 499, 249)
    assert dmd2.scheduler.timesteps_for(2) is None
    assert get_entry("dmd2-1step").scheduler.timesteps_for(1) == (399,)
    hyper = get_entry("hyper-sdxl-1step").scheduler
    assert (hyper.class_name, hyper.timesteps_for(1), dict(hyper.call_kwargs)) == ("TCDScheduler", (800,), {"eta": 1.0})
    assert get_entry("sdxl").cfg_scale == 5.0
    assert get_entry("tiny-sdxl").scheduler == dmd2.scheduler
    assert get_entry("tiny-flux").scheduler == get_entry("flux-schnell").scheduler
    with pytest.raises(InvalidInputError, match="steps: this model samples with 1..4 steps, got 5"):
        get_entry("sdxl-turbo").scheduler.check_steps(5)
    with pytest.raises(InvalidInputError, match="with 1 steps"):
        get_entry("dmd2-1step").scheduler.timesteps_for(4)
    assert len({entry for entry in list_entries()}) == len(list_entries())  # hashable, distinct


def test_scheduler_spec_builds_the_class_with_its_options():
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = get_entry("sdxl-turbo").scheduler.build({"num_train_timesteps": 1000, "timestep_spacing": "leading"})
    assert isinstance(scheduler, EulerAncestralDiscreteScheduler)
    assert scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError):
        SchedulerSpec("LCMScheduler", default_steps=4, timesteps={4: (999, 499)})


def test_descriptors_are_frozen_values():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        SDXLUNet().text_dim = 3
    assert SDXLUNet() == by_name(descriptors_for("sdxl"))["unet"]
