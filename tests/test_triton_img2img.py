"""Image-to-image through the served pipeline (issue 23): the optional `init_image` (uint8 [H, W, 3])
and `strength` inputs of an `--img2img` export's repository, run in-process by the fake Python
backend of tests/triton_helpers.py, give the local ORT Sampler's image; bad values are refused with
the request's error, and a repository without the VAE encoder refuses an image clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gag_export.core.errors import InvalidInputError
from gag_export.serving.repository import RepositoryOptions, build_repository
from gag_export.serving.requests import RequestLimits, parse_request

from runtime_helpers import ONE_THREAD, exported_graphs, max_pixel_diff, torch_threads
from triton_helpers import PROMPT, FakeTriton, config_json, request_values
from test_triton_repo import _check_ensemble, _check_layout, _configs, _edited_export

MODEL = "tiny-sdxl"


def _picture(height=72, width=80) -> np.ndarray:
    """An RGB test image (gradients plus seeded noise), not the export's 64x64: the static graphs resize it."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 40, (height, width, 3))
    return np.clip(np.stack([x * 3, y * 3, (x + y) * 2], axis=-1) + noise, 0, 255).astype(np.uint8)


def _img2img(image=None, strength=None, **change) -> dict:
    values = request_values(**change)
    if image is not None:
        values["init_image"] = image
    if strength is not None:
        values["strength"] = np.array([strength], dtype=np.float32)
    return values


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    return exported_graphs(tmp_path_factory, MODEL, img2img=True) / MODEL


@pytest.fixture(scope="module")
def triton(graphs, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-img2img") / MODEL
    build_repository(graphs, out, RepositoryOptions(cpu_standin=True, sampler_instances=1))
    with torch_threads(1):
        fake = FakeTriton(out)
        yield fake
        fake.finalize()


def _client_values(repo: Path, monkeypatch, request):
    """What `PipelineClient.generate` would send for `request`, its defaults read from the repository."""
    from gag_export.serving.client import PipelineClient

    served = {name: config_json(config) for name, config in _configs(repo).items()}
    monkeypatch.setattr(PipelineClient, "_served_models", lambda self: sorted(served))
    monkeypatch.setattr(PipelineClient, "_config", lambda self, model: served[model])
    with PipelineClient("http://127.0.0.1:1") as client:
        return client._values(client.resolve(request))


def test_img2img_over_bls_equals_the_local_runtime(triton, graphs, monkeypatch):
    from gag_export.runtime import GAGParams, GenerationConfig, Sampler
    from gag_export.serving.client import PipelineRequest

    configs = _check_layout(triton.repo)
    _check_ensemble(configs)
    for name in ("pipeline", "sampler"):
        inputs = {t.name: t for t in configs[name].input}
        assert inputs["init_image"].optional and list(inputs["init_image"].dims) == [-1, -1, 3]
        assert inputs["strength"].optional and list(inputs["strength"].dims) == [1]
        assert not inputs["prompt"].optional
    picture = _picture()
    # the client's wire format: uint8 [H, W, 3] and fp32 [1]
    values = _client_values(triton.repo, monkeypatch, PipelineRequest(PROMPT, seed=4, steps=4, image=picture, strength=0.7))
    assert values["init_image"].dtype == np.uint8 and values["strength"].dtype == np.float32
    triton.calls.clear()
    with torch_threads(1):
        response = triton.pipeline(**values)
        assert not response.has_error(), response.error().message()
        with Sampler.load(MODEL, "ort", graphs=graphs.parent, options=ONE_THREAD) as sampler:
            defaults = GAGParams(*(float(values[n][0]) for n in ("gag_scale", "gag_eta", "gag_zeta")))
            local = sampler.generate(GenerationConfig(PROMPT, seed=4, steps=4, gag=defaults, image=picture, strength=0.7))
    image = response.output_tensors[0].as_numpy()
    assert image.shape == (64, 64, 3)  # static graphs: the image was resized to the export's size
    assert max_pixel_diff(image, local.image) == 0
    called = [name for name, _ in triton.calls]
    assert called.count("vae_encoder") == 1 and called.count("unet") == 2  # int(4 x 0.7): SDXL's rounding
    # no strength: diffusers' default (0.3 for SDXL: 1 of 4 steps); no image at all: text-to-image
    triton.calls.clear()
    with torch_threads(1):
        assert not triton.pipeline(**_img2img(picture, seed=4)).has_error()
        assert [n for n, _ in triton.calls].count("unet") == 1
        triton.calls.clear()
        assert not triton.pipeline(**_img2img(steps=1)).has_error()
    assert "vae_encoder" not in [n for n, _ in triton.calls]


@pytest.mark.parametrize("image, strength, message", [
    ("picture", 0.0, "strength: must be a finite number in (0, 1], got 0.0"),
    ("picture", 1.5, "strength: must be a finite number in (0, 1], got 1.5"),
    ("picture", float("nan"), "strength: must be a finite number in (0, 1], got nan"),
    (None, 0.5, "strength: given without init_image"),
    ("picture", 0.1, "leaves no step to run"),  # int(4 x 0.1) = 0: the sampler's own check
    ("huge", 0.5, "init_image: 8x2049 is outside what this pipeline accepts (each side 1..2048 pixels)"),
    ("empty", 0.5, "init_image: 0x0 is outside"),
])
def test_bad_img2img_requests_are_refused_and_the_model_keeps_serving(triton, image, strength, message):
    arrays = {"picture": _picture(), "huge": np.zeros((2049, 8, 3), np.uint8), "empty": np.zeros((0, 0, 3), np.uint8)}
    response = triton.pipeline(**_img2img(arrays.get(image), strength))
    assert response.has_error()
    assert message in response.error().message()
    assert response.error().code == "INVALID_ARG"
    with torch_threads(1):
        assert not triton.pipeline(**_img2img(_picture(), 0.5, steps=2)).has_error()


def test_parse_request_checks_the_image_before_decoding_it():
    """What Triton's dims/dtype checks refuse before the sampler, refused by the sampler's parser too."""
    limits = RequestLimits(1, 4, max_image_side=100)
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), np.uint8)):
        with pytest.raises(InvalidInputError, match=r"init_image: send the image as uint8 \[height, width, 3\]"):
            parse_request(_img2img(bad), limits, gag=True, img2img=True)
    with pytest.raises(InvalidInputError, match="101x8 is outside .* 1..100 pixels"):
        parse_request(_img2img(np.zeros((8, 101, 3), np.uint8)), limits, gag=True, img2img=True)
    config = parse_request(_img2img(_picture(), 0.7), limits, gag=True, img2img=True)
    assert config.strength == 0.7 and config.image.size == (80, 72)  # the decimal sent, not fp32's 0.699999988
    assert RequestLimits.from_parameters(limits.to_parameters()) == limits


def test_a_repository_without_the_encoder_refuses_an_image(graphs, tmp_path, monkeypatch):
    """No vae_encoder: the configs declare no image input, and a request carrying one is refused naming
    the export command, by the client before sending, by Triton's input check, and by the sampler."""
    from gag_export.cli import cli
    from gag_export.serving.client import PipelineRequest

    plain = _edited_export(graphs, tmp_path / "graphs" / MODEL, lambda data: data["components"].pop("vae_encoder"))
    (plain / "vae_encoder.onnx").unlink(missing_ok=True)
    out = tmp_path / "repo"
    build_repository(plain, out, RepositoryOptions(cpu_standin=True, sampler_instances=1))
    configs = _configs(out)
    assert "vae_encoder" not in configs
    assert not {"init_image", "strength"} & {t.name for t in configs["pipeline"].input}
    with pytest.raises(InvalidInputError, match=f"exported without the VAE encoder.*--model {MODEL} --img2img"):
        _client_values(out, monkeypatch, PipelineRequest(PROMPT, image=_picture(), strength=0.5))
    with torch_threads(1):
        fake = FakeTriton(out)
        try:
            response = fake.pipeline(**_img2img(_picture(), 0.5))
            assert response.has_error() and "unexpected input 'init_image'" in response.error().message()
            with pytest.raises(InvalidInputError, match=f"init_image, strength: image-to-image needs the VAE encoder.*"
                                                        f"--model {MODEL} --img2img"):
                fake.models["sampler"].service.generate(_img2img(_picture(), 0.5))
        finally:
            fake.finalize()
    # the CLI: a bad --image or a lone --strength exits 2 before any connection
    result = CliRunner().invoke(cli, ["client", "--prompt", "p", "--image", str(tmp_path / "none.png")], obj={})
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    result = CliRunner().invoke(cli, ["client", "--prompt", "p", "--strength", "0.5"], obj={})
    assert result.exit_code == 2 and "strength: given without an image" in result.output, result.output
