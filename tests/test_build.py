"""gag_export/workflows/build.py: the whole `gag-export build` once for real (a subprocess), its orchestration in-process."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from PIL import Image

from export_helpers import sha256_of
from build_helpers import MODEL, add_float64_cast, built_tiny_sdxl, graphs_copy, rewrite_component
from gag_export.workflows import build
from gag_export.workflows.build import BuildConfig, run_build
from gag_export.core.gpu import detect_gpu
from gag_export.core.errors import CheckFailedError, InvalidInputError, MissingDependencyError
from gag_export.artifacts.manifest import Manifest
from gag_export.gag import GAGConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return built_tiny_sdxl(tmp_path_factory)


def _rtx_importable() -> bool:
    return importlib.util.find_spec("tensorrt_rtx") is not None


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- the real thing


def test_build_subprocess_writes_graphs_manifest_and_a_png(run):
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((run.graphs_dir / "manifest.json").read_text())
    for key in ("format_version", "model", "family", "weights", "dtype", "dynamic", "opset", "shape", "gag",
                "components", "versions"):
        assert key in manifest
    assert manifest["model"] == MODEL and manifest["weights"] == "tiny" and manifest["dtype"] == "fp32"
    assert manifest["shape"] == {"batch": 1, "height": 64, "width": 64}
    assert manifest["gag"]["enabled"] and manifest["gag"]["method"] == "bisect" and manifest["gag"]["rewritten"]
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    for name, comp in manifest["components"].items():
        path = run.graphs_dir / comp["path"]
        assert path.is_file() and path.stat().st_size == comp["size_bytes"]
        assert sha256_of(path) == comp["sha256"], name
    unet_inputs = {i["name"] for i in manifest["components"]["unet"]["inputs"]}
    assert {"gag_scale", "gag_eta", "gag_zeta"} <= unet_inputs
    assert not list((run.cwd / "graphs").glob(".*")), "no temp folders left beside the export"

    with Image.open(run.image) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        meta = dict(image.text)
    assert meta["model"] == MODEL and meta["seed"] == "0" and meta["steps"] == "4" and meta["gag"] == "on"
    assert meta["backend"] == "ort" and meta["prompt"] == build.SMOKE_PROMPT
    assert float(meta["gag_scale"]) == 10.0


def test_build_summary_names_artifacts_parity_stages_and_the_image(run):
    out = run.stdout
    for part in ("artifacts", "manifest.json", "model.onnx", "parity", "load", "export", "check", "engine", "smoke",
                 "total", f"wrote {MODEL}-0.png"):
        assert part in out, part
    if not _tensorrt_importable() and not _rtx_importable():
        assert "skipped" in out and "TensorRT is not available" in out
    elif not _tensorrt_importable():  # TensorRT-RTX builds here without a GPU; its engines run on RTX GPUs only
        assert "engines: TensorRT-RTX 1." in out and "sm80_86_89_120_121" in out


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, field", [
    ({"weights": "downloaded"}, "weights"),
    ({"height": 0}, "height"),
    ({"batch": -1}, "batch"),
    ({"seed": -3}, "seed"),
    ({"gag": {"scale": 1}}, "gag"),
])
def test_build_config_rejects_bad_values(kwargs, field):
    with pytest.raises(InvalidInputError, match=field):
        BuildConfig(MODEL, **kwargs)


def test_bad_size_fails_before_loading(monkeypatch):
    monkeypatch.setattr(build, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    with pytest.raises(InvalidInputError, match="multiple of 16"):
        run_build(BuildConfig(MODEL, height=72))


def test_require_engine_fails_before_loading(monkeypatch):
    monkeypatch.setattr(build, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # neither builder imports
    with pytest.raises(MissingDependencyError, match=r"no engine builder here.*gag-export\[tensorrt-rtx\]"):
        run_build(BuildConfig(MODEL, require_engine=True))
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not available"):
        run_build(BuildConfig(MODEL, require_engine=True, engine_backend="tensorrt"))


@pytest.mark.skipif(not _rtx_importable(), reason="tensorrt_rtx is not installed")
def test_auto_takes_tensorrt_rtx_without_tensorrt_or_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert build.engine_flavor("auto").name == "tensorrt-rtx"
    assert build.engine_flavor("tensorrt").name == "tensorrt"  # asked for: no fallback


# --------------------------------------------------------------------------- orchestration, without exporting again


def _reuse_export(monkeypatch, graphs_dir, seen):
    """export_model returns the given (already exported) graphs: the stages after export run for real."""
    def fake_export(pipe, entry, config, progress=None, release=False):
        seen.append(config)
        return Manifest.load(graphs_dir)

    monkeypatch.setattr(build, "export_model", fake_export)


def test_stages_after_a_good_export(run, tmp_path, monkeypatch):
    graphs_dir = graphs_copy(run, tmp_path)
    seen, events = [], []
    _reuse_export(monkeypatch, graphs_dir, seen)
    config = BuildConfig(MODEL, graphs_root=tmp_path / "graphs", engines_root=tmp_path / "engines",
                         gag=GAGConfig(scale=4.0, method="bisect"), image=tmp_path / "out" / "fox.png", seed=3,
                         prompt="a fox")
    result = run_build(config, progress=events.append)
    assert result and [s.name for s in result.stages] == list(build.BUILD_STAGES)
    assert seen[0].gag.scale == 4.0 and seen[0].seed == 3 and seen[0].model == MODEL
    assert result.stage("check").status == "done"
    assert all(errors is not None and errors[0] < 1e-3 for errors in result.parity().values())
    if not _tensorrt_importable() and not _rtx_importable():
        assert result.stage("engine").status == "skipped" and "tensorrt" in result.engine_skip_reason.lower()
    elif not _tensorrt_importable():
        assert result.stage("engine").status == "done" and result.engine_builder.startswith("TensorRT-RTX 1.")
        assert [r.sidecar.flavor for r in result.engines] == ["tensorrt-rtx"] * 4
        if detect_gpu() is None:
            assert "TensorRT-RTX engines not run here" in result.stage("smoke").details
    assert result.stage("smoke").status == "done" and result.backend in ("ort", "ort-cuda", "tensorrt", "tensorrt-rtx")
    assert result.image_path == tmp_path / "out" / "fox.png"
    with Image.open(result.image_path) as image:
        assert image.text["prompt"] == "a fox" and image.text["seed"] == "3"
        # the smoke image uses the export's GAG values (the manifest's), here those of the session build
        assert float(image.text["gag_scale"]) == 10.0
    kinds = [a.kind for a in result.artifacts]
    assert kinds.count("graph") == 4 and "manifest" in kinds and "image" in kinds
    assert {e.stage for e in events} == set(build.BUILD_STAGES)
    assert any(e.stage == "check" and e.state == "update" for e in events)


def test_a_failed_check_stops_before_engines_and_smoke(run, tmp_path, monkeypatch):
    graphs_dir = graphs_copy(run, tmp_path)
    rewrite_component(graphs_dir, "text_encoder", add_float64_cast)
    _reuse_export(monkeypatch, graphs_dir, [])
    monkeypatch.setattr("gag_export.engine.build", lambda *a, **k: pytest.fail("built engines from failed graphs"))
    result = run_build(BuildConfig(MODEL, graphs_root=tmp_path / "graphs", engines_root=tmp_path / "engines", image=tmp_path / "x.png"))
    assert not result
    assert result.stage("check").status == "failed" and "text_encoder/tensorrt_lint" in result.stage("check").details
    assert [result.stage(s).status for s in ("engine", "smoke")] == ["skipped", "skipped"]
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(CheckFailedError, match="text_encoder/tensorrt_lint"):
        result.raise_for_failures()


def test_skip_smoke(run, tmp_path, monkeypatch):
    graphs_dir = graphs_copy(run, tmp_path)
    _reuse_export(monkeypatch, graphs_dir, [])
    monkeypatch.setattr(build, "check_graphs", lambda *a, **k: build.CheckReport(graphs_dir, MODEL))
    result = run_build(BuildConfig(MODEL, graphs_root=tmp_path / "graphs", engines_root=tmp_path / "engines", smoke=False,
                                   image=tmp_path / "x.png"))
    assert result.stage("smoke").status == "skipped" and result.image_path is None
    assert not (tmp_path / "x.png").exists()


def test_smoke_is_skipped_with_the_reason_for_a_static_batch_over_one(run, tmp_path, monkeypatch):
    # generation feeds batch 1: a `--batch 2` static export failed the build after exporting
    # everything ("input 'input_ids' has shape [1, 77], the graph takes [2, 77]")
    graphs_dir = graphs_copy(run, tmp_path)
    manifest_path = graphs_dir / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["shape"]["batch"] = 2
    manifest_path.write_text(json.dumps(data))
    _reuse_export(monkeypatch, graphs_dir, [])
    monkeypatch.setattr(build, "check_graphs", lambda *a, **k: build.CheckReport(graphs_dir, MODEL))
    result = run_build(BuildConfig(MODEL, graphs_root=tmp_path / "graphs", engines_root=tmp_path / "engines", image=tmp_path / "x.png"))
    assert result, [(s.name, s.status, s.details) for s in result.stages]
    smoke = result.stage("smoke")
    assert smoke.status == "skipped" and "static at batch 2" in smoke.details
    assert not (tmp_path / "x.png").exists()
    from gag_export.runtime import GenerationConfig, Sampler

    with pytest.raises(InvalidInputError, match="static at batch 2"):
        Sampler.load(MODEL, "ort", graphs=tmp_path / "graphs").resolve_shape(GenerationConfig("a fox"))
