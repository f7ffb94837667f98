"""The VAE encoder img2img needs: exported only when asked (`img2img` / `--img2img`, or by name with
`--component vae_encoder`), with the contract's I/O, checked like the others (parity recorded at
export), equal to diffusers' `vae.encode(...).latent_dist`, and built into TensorRT-RTX engines."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_helpers import exported, pipeline, run, session, shared_root

from gag_export import engine
from gag_export.check import check_graphs
from gag_export.cli import cli
from gag_export.core.names import IMG2IMG_COMPONENTS
from gag_export.export import ExportConfig, export_model
from gag_export.models import ImageShape, Precision, descriptors_for, get_entry, load_pipeline

MODELS = {"sdxl": "tiny-sdxl", "flux": "tiny-flux"}
DEFAULT_COMPONENTS = {
    "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder"],
    "flux": ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"],
}


@pytest.fixture(scope="module")
def graphs_root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module", params=list(MODELS))
def img2img(request, graphs_root):
    """(family, manifest) of a whole tiny export made with `img2img=True` through the Python API."""
    return request.param, exported(f"{request.param}_img2img", graphs_root)


def _latent_channels(family: str) -> int:
    return int(pipeline(MODELS[family]).vae.config.latent_channels)


def test_the_default_component_lists_are_unchanged_and_img2img_adds_the_encoder_last():
    for family, model in MODELS.items():
        assert [d.name for d in descriptors_for(model)] == DEFAULT_COMPONENTS[family]
        assert [d.name for d in descriptors_for(model, img2img=True)] == DEFAULT_COMPONENTS[family] + ["vae_encoder"]
    assert IMG2IMG_COMPONENTS == ("vae_encoder",)


def test_the_encoder_follows_the_decoders_precision_and_tolerance_rules():
    for family in ("sdxl", "flux"):
        descs = {d.name: d for d in descriptors_for(family, img2img=True)}
        encoder, decoder = descs["vae_encoder"], descs["vae_decoder"]
        assert encoder.force_upcast  # both full-size configs say so
        for dtype in ("fp32", "fp16", "bf16"):
            assert encoder.export_dtype(dtype) is decoder.export_dtype(dtype)
            assert encoder.tolerance(dtype) == decoder.tolerance(dtype)
        assert encoder.export_dtype("fp16") is Precision.FP32
        assert dataclasses.replace(encoder, force_upcast=False).export_dtype("fp16") is Precision.FP16


def test_the_manifest_lists_the_encoder_with_the_contracts_io(img2img):
    family, manifest = img2img
    assert list(manifest.components) == DEFAULT_COMPONENTS[family] + ["vae_encoder"]
    comp = manifest.components["vae_encoder"]
    shape = manifest.shape()
    assert comp["role"] == "vae_encoder"
    assert comp["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 3, shape.height, shape.width]}]
    assert comp["outputs"] == [{"name": "moments", "dtype": "float32",
                                "shape": [1, 2 * _latent_channels(family), shape.height // 8, shape.width // 8]}]
    assert comp["tolerance"] == manifest.components["vae_decoder"]["tolerance"]
    assert comp["parity_reference"]  # recorded at export, like the others'


def test_check_passes_with_the_encoders_parity(img2img):
    _, manifest = img2img
    report = check_graphs(manifest.graphs_dir, parity=True, parser="none")
    assert report, [r for r in report.failures()]
    parity = [r for r in report.results if r.component == "vae_encoder" and r.check == "parity"]
    assert [r.status for r in parity] == ["passed"] and "recorded at export" in parity[0].details


def test_the_graph_computes_diffusers_latent_dist(img2img):
    """ORT's moments, split and clamped as the host does, are diffusers' mean and logvar."""
    family, manifest = img2img
    shape = manifest.shape()
    gen = torch.Generator().manual_seed(7)  # not the export's sample seed
    image = torch.rand(1, 3, shape.height, shape.width, generator=gen) * 2 - 1
    (moments,) = run(session(manifest.graph_path("vae_encoder")), {"image": image.numpy()})
    mean, logvar = np.split(moments, 2, axis=1)
    with torch.no_grad():
        dist = pipeline(MODELS[family]).vae.encode(image).latent_dist
    tolerance = manifest.components["vae_encoder"]["tolerance"]
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=tolerance["atol"], rtol=tolerance["rtol"])
    np.testing.assert_allclose(np.clip(logvar, -30.0, 20.0), dist.logvar.numpy(), atol=tolerance["atol"],
                               rtol=tolerance["rtol"])


def test_a_default_export_has_no_encoder_and_one_can_be_added_by_name(graphs_root, tmp_path):
    default = exported("flux", graphs_root)
    assert list(default.components) == DEFAULT_COMPONENTS["flux"]
    root = tmp_path / "graphs"
    shutil.copytree(default.graphs_dir, root / "tiny-flux")
    entry = get_entry("tiny-flux")
    config = ExportConfig("tiny-flux", root, default.shape(), gag=default.gag, components=("vae_encoder",))
    added = export_model(pipeline("tiny-flux"), entry, config)
    assert list(added.components) == DEFAULT_COMPONENTS["flux"] + ["vae_encoder"]
    for name in DEFAULT_COMPONENTS["flux"]:  # kept, not exported again
        assert added.components[name]["sha256"] == default.components[name]["sha256"]


def test_cli_img2img_with_a_named_component_exports_both_vae_halves_and_checks_them(tmp_path):
    """`--img2img` adds the encoder to what `--component` names; the export releases the VAE's
    weights only after the last of its two halves (both share the pipeline's `vae`); the CLI's check
    passes (exit 0), and so does parity against torch for a seed no reference was recorded for."""
    result = CliRunner().invoke(cli, ["export", "--model", "tiny-sdxl", "--out", str(tmp_path), "--img2img",
                                      "--component", "vae_decoder"], obj={})
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "tiny-sdxl" / "manifest.json").read_text())
    assert list(data["components"]) == ["vae_decoder", "vae_encoder"]
    assert data["components"]["vae_encoder"]["outputs"][0]["name"] == "moments"
    # another seed than the recorded one: parity against the pipeline loaded again (its VAE only)
    report = check_graphs(tmp_path / "tiny-sdxl", parity=True, seed=1, parser="none")
    parity = {r.component: r for r in report.results if r.check == "parity"}
    assert report and set(parity) == {"vae_decoder", "vae_encoder"}
    assert parity["vae_encoder"].status == "passed" and "recorded" not in parity["vae_encoder"].details


def test_fp16_keeps_the_sdxl_encoder_in_fp32(tmp_path):
    entry = get_entry("tiny-sdxl")
    config = ExportConfig("tiny-sdxl", tmp_path, ImageShape(entry.height, entry.width), precision="fp16",
                          components=("vae_encoder",))
    manifest = export_model(load_pipeline(entry, components=["vae_encoder"]), entry, config)
    comp = manifest.components["vae_encoder"]
    assert [t["dtype"] for t in comp["inputs"] + comp["outputs"]] == ["float32", "float32"]


def test_tensorrt_rtx_builds_static_and_dynamic_encoder_engines(graphs_root, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    static = exported("sdxl_img2img", graphs_root)
    options = engine.EngineOptions(backend="tensorrt-rtx", targets="sm86", components=("vae_encoder",))
    (record,) = engine.build(static.graphs_dir, tmp_path / "engines", options)
    assert record.component == "vae_encoder" and record.path.stat().st_size > 0
    assert record.sidecar.profile["image"]["min"] == record.sidecar.profile["image"]["max"] == [1, 3, 64, 64]

    entry = get_entry("tiny-flux")
    config = ExportConfig("tiny-flux", tmp_path / "dynamic", ImageShape(64, 64), dynamic=True, components=("vae_encoder",),
                          min_shape=ImageShape(32, 32, 1), max_shape=ImageShape(96, 128, 2))
    dynamic = export_model(pipeline("tiny-flux"), entry, config)
    assert dynamic.components["vae_encoder"]["outputs"][0]["shape"] == ["batch", 32, "latent_height", "latent_width"]
    options = dataclasses.replace(options, shapes=engine.ShapeMode.DYNAMIC)
    (record,) = engine.build(dynamic.graphs_dir, tmp_path / "engines", options)
    assert record.sidecar.profile["image"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [2, 3, 96, 128]}
    assert [(io["name"], io["shape"]) for io in record.sidecar.io] == [("image", [-1, 3, -1, -1]),
                                                                       ("moments", [-1, 32, -1, -1])]


def test_a_triton_repository_serves_the_encoder_as_one_more_batched_model(graphs_root, tmp_path):
    """Repository generation iterates over the manifest: the encoder becomes a model like the others
    (the txt2img sampler does not call it), batched since the descriptor says its axis 0 is the batch."""
    from gag_export.serving.repository import RepositoryOptions, build_repository
    from triton_helpers import load_config

    manifest = exported("flux_img2img", graphs_root)
    report = build_repository(manifest.graphs_dir, tmp_path / "repo", RepositoryOptions(cpu_standin=True))
    assert "vae_encoder" in [m.name for m in report.models]
    config = load_config(tmp_path / "repo" / "vae_encoder" / "config.pbtxt")
    assert config.max_batch_size == 8 and [o.name for o in config.output] == ["moments"]
