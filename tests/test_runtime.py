"""Backends (gag_export/runtime/*_backend.py), artifact handling and `gag-export generate`.

The tiny models are exported once per session (runtime_helpers.exported_graphs, GAG bisect, 64x64,
static) and shared by every test here and in test_sampler.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from runtime_helpers import ONE_THREAD, PROMPT, exported_graphs, max_pixel_diff, torch_threads

from gag_export.cli import cli
from gag_export.core.errors import ArtifactError, GagExportError, InvalidInputError, MissingDependencyError
from gag_export.models import ImageShape, get_entry, load_pipeline
from gag_export.runtime import IDENTITY_GAG, GAGParams, GenerationConfig, OrtComponent, Sampler, load_components, parse_backend, read_png_metadata
from gag_export.workflows.artifacts import ensure_artifacts

SAME_IMAGE = 2  # max abs pixel difference, in 8-bit levels


def tensorrt_available() -> str | None:
    """None when TensorRT engines can be built and run here, else the reason they cannot."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or missing CUDA libraries
        return f"tensorrt is not importable ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sdxl_graphs(tmp_path_factory):
    return exported_graphs(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="module")
def flux_graphs(tmp_path_factory):
    return exported_graphs(tmp_path_factory, "tiny-flux")


@pytest.fixture(scope="module")
def samplers(sdxl_graphs, flux_graphs):
    """{(model, backend): active Sampler}; torch reads the export's GAG config, so both compute one function."""
    roots = {"tiny-sdxl": sdxl_graphs, "tiny-flux": flux_graphs}
    opened = {}
    try:
        for model, root in roots.items():
            for backend in ("torch", "ort"):
                opened[model, backend] = Sampler.load(model, backend, graphs=root, options=ONE_THREAD).__enter__()
        yield opened
    finally:
        for sampler in opened.values():
            sampler.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# Same image on every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [("tiny-sdxl", (999, 749, 499, 249)), ("tiny-flux", (1000, 750, 500, 250))])
@pytest.mark.parametrize("gag", [GAGParams(scale=10.0, eta=15.0, zeta=0.5), IDENTITY_GAG], ids=["gag", "identity"])
def test_torch_and_ort_give_the_same_image(samplers, model, expected, gag):
    config = GenerationConfig(PROMPT, seed=5, gag=gag)
    on_torch = samplers[model, "torch"].generate(config)
    on_ort = samplers[model, "ort"].generate(config)
    assert on_torch.timesteps == on_ort.timesteps == expected
    assert max_pixel_diff(on_torch.image, on_ort.image) <= SAME_IMAGE
    np.testing.assert_allclose(on_ort.latents, on_torch.latents, atol=1e-3)
    assert (on_torch.metadata["backend"], on_ort.metadata["backend"]) == ("torch", "ort")


def test_ort_gag_identity_reproduces_the_unmodified_pipeline(samplers):
    """The exported GAG graph fed scale=-1, zeta=1, eta=1e9 == diffusers' pipeline that never had GAG."""
    result = samplers["tiny-sdxl", "ort"].generate(GenerationConfig(PROMPT, seed=8, gag=IDENTITY_GAG))
    reference = load_pipeline("tiny-sdxl")(
        PROMPT, num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0.0, height=64, width=64,
        generator=torch.Generator().manual_seed(8)).images[0]
    assert max_pixel_diff(result.image, reference) <= SAME_IMAGE
    guided = samplers["tiny-sdxl", "ort"].generate(GenerationConfig(PROMPT, seed=8, gag=GAGParams(scale=10.0)))
    assert max_pixel_diff(guided.image, reference) > SAME_IMAGE


def test_gag_parameters_are_graph_inputs_no_rebuild(samplers):
    sampler = samplers["tiny-sdxl", "ort"]
    session = sampler.components.denoiser.session
    results = [sampler.generate(GenerationConfig(PROMPT, seed=2, steps=1, gag=GAGParams(scale=s))) for s in (2.0, 10.0)]
    assert sampler.components.denoiser.session is session  # the same session served both strengths
    assert np.abs(results[0].latents - results[1].latents).max() > 1e-3
    assert sampler.gag_params() == GAGParams(10.0, 15.0, 0.0)  # the manifest's defaults
    assert sampler.gag_params(scale=3.0).scale == 3.0


def test_cfg_on_a_batch_1_graph_runs_two_calls_with_the_same_result(samplers, monkeypatch):
    """The `sdxl` entry (CFG) on static batch-1 graphs: uncond and cond in two calls, as torch does in one."""
    def with_sdxl_entry(sampler):
        entry = dataclasses.replace(get_entry("sdxl"), height=64, width=64)
        return Sampler(entry, sampler.components, sampler.assets, sampler.descriptors)

    on_ort, on_torch = with_sdxl_entry(samplers["tiny-sdxl", "ort"]), with_sdxl_entry(samplers["tiny-sdxl", "torch"])
    batches = []
    original = on_ort.components.denoiser.infer
    monkeypatch.setattr(on_ort.components.denoiser, "infer", lambda feed: batches.append(len(feed["sample"])) or original(feed))
    config = GenerationConfig(PROMPT, seed=1, steps=2, gag=GAGParams(scale=5.0))
    a, b = on_ort.generate(config), on_torch.generate(config)
    assert batches == [1, 1, 1, 1]
    assert max_pixel_diff(a.image, b.image) <= SAME_IMAGE


def test_static_graphs_refuse_other_sizes(samplers):
    with pytest.raises(InvalidInputError, match=r"static at 64x64, got 128x64; export at that size"):
        samplers["tiny-sdxl", "ort"].generate(GenerationConfig(PROMPT, height=128))


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def test_every_component_matches_across_backends(samplers):
    """Each graph in ORT against its eager GAG-rewritten module on the descriptor's sample inputs."""
    for model in ("tiny-sdxl", "tiny-flux"):
        torch_set, ort_set = samplers[model, "torch"].components, samplers[model, "ort"].components
        manifest = ort_set.manifest
        assert sorted(c.name for c in ort_set) == sorted(manifest.components)
        # torch has the VAE encoder besides (it is the pipeline's VAE: img2img needs no export there)
        assert sorted(c.name for c in torch_set) == sorted([*manifest.components, "vae_encoder"])
        for descriptor in (samplers[model, "ort"].descriptors[name] for name in manifest.components):
            feed = descriptor.sample_inputs(manifest.shape(), gag=descriptor.role == "denoiser")
            got, want = ort_set[descriptor.name].infer(feed), torch_set[descriptor.name].infer(feed)
            assert list(got) == ort_set[descriptor.name].output_names
            tolerance = manifest.components[descriptor.name]["tolerance"]
            for name in got:
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], atol=tolerance["atol"] * 10, rtol=tolerance["rtol"] * 10,
                                           err_msg=f"{model}/{descriptor.name}/{name}")


def test_component_set_from_the_manifest(samplers):
    components = samplers["tiny-sdxl", "ort"].components
    assert [c.role for c in components] == ["text_encoder", "text_encoder", "denoiser", "vae_decoder"]
    assert components.denoiser.name == "unet" and components.has_gag_inputs
    assert {"gag_scale", "gag_eta", "gag_zeta"} <= set(components.denoiser.input_names)
    assert all(isinstance(c, OrtComponent) and c.is_active for c in components)
    with pytest.raises(ArtifactError, match="no component 'transformer'"):
        components["transformer"]


def test_feeds_are_checked(samplers):
    encoder = samplers["tiny-sdxl", "ort"].components["text_encoder"]
    ids = np.full((1, 77), 999, dtype=np.int64)
    with pytest.raises(InvalidInputError, match=r"missing \['input_ids'\]"):
        encoder.infer({})
    with pytest.raises(InvalidInputError, match=r"unknown \['mask'\]"):
        encoder.infer({"input_ids": ids, "mask": ids})
    with pytest.raises(InvalidInputError, match=r"'input_ids' has shape \[1, 76\], the graph takes \[1, 77\]"):
        encoder.infer({"input_ids": ids[:, :76]})
    out = encoder.infer({"input_ids": torch.from_numpy(ids).to(torch.int32)})  # cast to the declared int64
    assert out["text_embeddings"].shape == (1, 77, 32) and out["text_embeddings"].dtype == np.float32
    out["text_embeddings"][:] = 0  # the caller owns the arrays: the next call is unaffected
    assert np.abs(encoder.infer({"input_ids": ids})["text_embeddings"]).max() > 0


def test_components_must_be_activated(sdxl_graphs):
    components = load_components("tiny-sdxl", "ort", graphs=sdxl_graphs, options=ONE_THREAD)
    encoder = components["text_encoder"]
    with pytest.raises(GagExportError, match="not active"):
        encoder.infer({"input_ids": np.zeros((1, 77), dtype=np.int64)})
    with encoder:
        assert encoder.is_active and encoder.session is not None
        encoder.infer({"input_ids": np.zeros((1, 77), dtype=np.int64)})
    assert not encoder.is_active and encoder.session is None


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime-gpu is installed here")
def test_an_unavailable_ort_provider_is_a_missing_dependency(sdxl_graphs):
    options = dataclasses.replace(ONE_THREAD, ort_providers=("CUDAExecutionProvider",))
    encoder = load_components("tiny-sdxl", "ort", graphs=sdxl_graphs, options=options)["text_encoder"]
    with pytest.raises(MissingDependencyError, match=r"not \['CUDAExecutionProvider'\].*onnxruntime-gpu"):
        encoder.activate()


def test_unknown_backend():
    assert parse_backend(" ORT ") == "ort"
    with pytest.raises(InvalidInputError, match=r"unknown backend 'onnx': use one of torch, ort, tensorrt"):
        parse_backend("onnx")


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------


@pytest.fixture
def graphs_copy(sdxl_graphs, tmp_path):
    root = tmp_path / "graphs"
    shutil.copytree(sdxl_graphs / "tiny-sdxl", root / "tiny-sdxl")
    return root


def test_graphs_of_a_local_folder_are_found_by_the_folder_name(sdxl_graphs, tmp_path):
    # what `gag-export export --model /ckpt/my-sdxl` writes: the folder's name and absolute path
    folder = tmp_path / "ckpt" / "my-sdxl"
    load_pipeline("tiny-sdxl").save_pretrained(folder)
    graphs = tmp_path / "graphs"
    shutil.copytree(sdxl_graphs / "tiny-sdxl", graphs / "my-sdxl")
    manifest_path = graphs / "my-sdxl" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(model="my-sdxl", source=str(folder.resolve()), weights="pretrained")
    manifest_path.write_text(json.dumps(manifest))
    config = GenerationConfig(PROMPT, seed=5, steps=4)
    images = {}
    for backend in ("ort", "torch"):  # the graphs, and the folder's own weights in PyTorch
        with Sampler.load("my-sdxl", backend, graphs=graphs, options=ONE_THREAD) as local:
            assert local.entry.name == "my-sdxl" and str(folder.resolve()) in local.entry.source.describe()
            images[backend] = local.generate(config)
    assert images["ort"].timesteps == images["torch"].timesteps  # the folder's own scheduler config
    assert max_pixel_diff(images["ort"].image, images["torch"].image) <= SAME_IMAGE
    shutil.rmtree(folder)
    with pytest.raises(ArtifactError, match="not there any more"):
        Sampler.load("my-sdxl", "ort", graphs=graphs, options=ONE_THREAD)


def test_missing_graphs_name_the_command_to_run(tmp_path):
    with pytest.raises(ArtifactError, match=r"no exported graphs for tiny-sdxl .*`gag-export export --model tiny-sdxl"):
        load_components("tiny-sdxl", "ort", graphs=tmp_path)


def test_missing_component_file(graphs_copy):
    (graphs_copy / "tiny-sdxl" / "unet" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"unet/model.onnx is missing .*gag-export export --model tiny-sdxl"):
        load_components("tiny-sdxl", "ort", graphs=graphs_copy)


def test_truncated_graph(graphs_copy):
    path = graphs_copy / "tiny-sdxl" / "vae_decoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"vae_decoder/model.onnx is 1000 bytes, its manifest records \d+"):
        load_components("tiny-sdxl", "ort", graphs=graphs_copy)


def test_corrupt_graph_of_the_right_size_is_refused_by_its_hash(graphs_copy):
    path = graphs_copy / "tiny-sdxl" / "text_encoder" / "model.onnx"
    path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(ArtifactError, match=r"text_encoder/model.onnx does not match its manifest"):
        load_components("tiny-sdxl", "ort", graphs=graphs_copy, options=ONE_THREAD).activate()


def test_graph_onnx_runtime_cannot_load_is_an_artifact_error(graphs_copy):
    # bytes that match their manifest (re-hashed by hand) yet are no graph: ONNX Runtime's own refusal
    from gag_export.artifacts.manifest import graph_sha256

    path = graphs_copy / "tiny-sdxl" / "text_encoder" / "model.onnx"
    path.write_bytes(b"\xff" * path.stat().st_size)
    manifest_path = graphs_copy / "tiny-sdxl" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["text_encoder"]["sha256"] = graph_sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    components = load_components("tiny-sdxl", "ort", graphs=graphs_copy, options=ONE_THREAD)
    with pytest.raises(ArtifactError, match=r"ONNX Runtime cannot load .*text_encoder/model.onnx"):
        components.activate()
    assert not any(c.is_active for c in components)  # nothing left half-activated


@pytest.mark.skipif(tensorrt_available() is None, reason="TensorRT and a GPU are available here")
def test_tensorrt_backend_without_tensorrt_is_a_missing_dependency(sdxl_graphs, tmp_path):
    with pytest.raises(MissingDependencyError) as info:
        load_components("tiny-sdxl", "tensorrt", graphs=sdxl_graphs, engines=tmp_path)
    assert info.value.exit_code == 3
    with pytest.raises(MissingDependencyError):  # checked before any export is attempted
        ensure_artifacts("tiny-sdxl", "tensorrt", graphs=tmp_path / "graphs", engines=tmp_path / "engines")
    assert not (tmp_path / "graphs").exists()


def test_ensure_artifacts_keeps_what_exists(sdxl_graphs, tmp_path):
    assert ensure_artifacts("tiny-sdxl", "torch", graphs=tmp_path) == []
    before = (sdxl_graphs / "tiny-sdxl" / "manifest.json").stat().st_mtime_ns
    assert ensure_artifacts("tiny-sdxl", "ort", graphs=sdxl_graphs) == []
    assert (sdxl_graphs / "tiny-sdxl" / "manifest.json").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------
# `gag-export generate`
# --------------------------------------------------------------------------------------------


def generate(*args):
    return CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "--threads", "1", *args],
                              obj={})


def test_cli_generate_from_existing_graphs(sdxl_graphs, tmp_path):
    out = tmp_path / "fox.png"
    result = generate("--graphs", str(sdxl_graphs), "--seed", "4", "--gag-scale", "6.5", "--out", str(out), "--no-build")
    assert result.exit_code == 0, result.output
    for stage in ("text encode", "denoise step 1 (t=999)", "denoise step 4 (t=249)", "vae decode", "total"):
        assert stage in result.output
    meta = read_png_metadata(out)
    assert (meta["model"], meta["backend"], meta["seed"], meta["steps"]) == ("tiny-sdxl", "ort", "4", "4")
    assert (meta["gag_scale"], meta["gag_eta"], meta["gag_zeta"]) == ("6.5", "15.0", "0.0")  # the rest: manifest defaults


def test_cli_generate_builds_missing_graphs(sdxl_graphs, tmp_path, monkeypatch):
    """Absent graphs are exported first (export itself is test_export.py's; here a copy of the session
    export stands in for it, and the call it received is checked)."""
    from gag_export import export
    from gag_export.artifacts.manifest import Manifest

    calls = []

    def fake_export(pipe, entry, config, progress=None, release=False):
        calls.append((config, release))
        shutil.copytree(sdxl_graphs / "tiny-sdxl", config.graphs_dir)
        return Manifest.load(config.graphs_dir)

    monkeypatch.setattr(export, "export_model", fake_export)
    graphs = tmp_path / "graphs"
    result = generate("--graphs", str(graphs), "--steps", "1", "--no-gag", "--out", str(tmp_path / "a.png"))
    assert result.exit_code == 0, result.output
    [(config, release)] = calls
    assert (config.model, config.out_dir, config.shape) == ("tiny-sdxl", graphs, ImageShape(64, 64))
    assert release  # the pipeline loaded only to export is handed over (its weights freed as it goes)
    assert config.gag is not None and config.gag.method == "bisect"  # one GAG graph serves GAG on and off
    assert read_png_metadata(tmp_path / "a.png")["gag"] == "off"
    again = generate("--graphs", str(graphs), "--steps", "1", "--out", str(tmp_path / "b.png"))
    assert again.exit_code == 0, again.output
    assert len(calls) == 1  # present now: not exported again


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--backend", "cuda"], 2, "error: unknown backend 'cuda': use one of torch, ort, tensorrt"),
        (["--steps", "9"], 2, "error: steps: this model samples with 1..4 steps, got 9"),
        (["--height", "72"], 2, "error: ImageShape.height: 72 is not a multiple of 16"),
        (["--width", "0"], 2, "error: width: must be a positive integer, got 0"),
        (["--no-gag", "--gag-scale", "3"], 2, "--no-gag cannot be combined with --gag-scale"),
        (["--gag-eta", "0"], 2, "error: GAGConfig.eta: must be > 0"),
        (["--no-build"], 5, "run `gag-export export --model tiny-sdxl --out"),
    ],
    ids=["backend", "steps", "height", "width", "no-gag-conflict", "gag-eta", "missing-artifacts"],
)
def test_cli_generate_bad_input(tmp_path, args, code, message):
    graphs = tmp_path / "empty"
    result = generate("--graphs", str(graphs), "--no-build", "--out", str(tmp_path / "x.png"), *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "x.png").exists() and not graphs.exists()  # nothing built, nothing written


@pytest.mark.skipif(tensorrt_available() is None, reason="TensorRT and a GPU are available here")
def test_cli_tensorrt_without_tensorrt_exits_3(sdxl_graphs, tmp_path):
    result = generate("--graphs", str(sdxl_graphs), "--engines", str(tmp_path), "--backend", "tensorrt")
    assert result.exit_code == 3, result.output
    assert "TensorRT" in result.output


# --------------------------------------------------------------------------------------------
# TensorRT (GPU machines only)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_samplers(sdxl_graphs, flux_graphs, tmp_path_factory):
    reason = tensorrt_available()
    if reason is not None:
        pytest.skip(f"TensorRT backend: {reason}")
    engines = tmp_path_factory.mktemp("engines")
    opened = {}
    for model, root in (("tiny-sdxl", sdxl_graphs), ("tiny-flux", flux_graphs)):
        ensure_artifacts(model, "tensorrt", graphs=root, engines=engines)
        for backend in ("tensorrt", "ort"):
            opened[model, backend] = Sampler.load(model, backend, graphs=root, engines=engines, options=ONE_THREAD)
    with_graph = Sampler.load("tiny-sdxl", "tensorrt", graphs=sdxl_graphs, engines=engines,
                              options=dataclasses.replace(ONE_THREAD, cuda_graph=True))
    opened["tiny-sdxl", "tensorrt-graph"] = with_graph
    for sampler in opened.values():
        sampler.__enter__()
    yield opened
    for sampler in opened.values():
        sampler.__exit__(None, None, None)


@pytest.mark.tensorrt
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
@pytest.mark.parametrize("gag", [GAGParams(scale=10.0, zeta=0.5), IDENTITY_GAG], ids=["gag", "identity"])
def test_tensorrt_matches_ort(trt_samplers, model, gag):
    config = GenerationConfig(PROMPT, seed=5, gag=gag)
    on_trt, on_ort = trt_samplers[model, "tensorrt"].generate(config), trt_samplers[model, "ort"].generate(config)
    assert on_trt.timesteps == on_ort.timesteps
    assert max_pixel_diff(on_trt.image, on_ort.image) <= SAME_IMAGE


@pytest.mark.tensorrt
def test_tensorrt_buffers_are_allocated_once_per_shape(trt_samplers):
    sampler = trt_samplers["tiny-sdxl", "tensorrt"]
    sampler.generate(GenerationConfig(PROMPT, seed=1, steps=1))
    denoiser = sampler.components.denoiser
    buffers = dict(denoiser._buffers)
    sampler.generate(GenerationConfig(PROMPT, seed=2, steps=2, gag=GAGParams(scale=3.0)))
    assert all(denoiser._buffers[name] is buffer for name, buffer in buffers.items())


@pytest.mark.tensorrt
def test_tensorrt_cuda_graph_replay_matches_direct_execution(trt_samplers):
    config = GenerationConfig(PROMPT, seed=6, gag=GAGParams(scale=10.0, zeta=0.5))
    graphed = trt_samplers["tiny-sdxl", "tensorrt-graph"]
    first, second = graphed.generate(config), graphed.generate(config)  # captured during the first, replayed after
    assert graphed.components.denoiser._graph is not None
    direct = trt_samplers["tiny-sdxl", "tensorrt"].generate(config)
    np.testing.assert_array_equal(first.latents, second.latents)
    np.testing.assert_allclose(first.latents, direct.latents, atol=1e-5)
    changed = graphed.generate(dataclasses.replace(config, gag=GAGParams(scale=2.0)))  # new inputs, same graph
    assert np.abs(changed.latents - first.latents).max() > 1e-3


@pytest.mark.tensorrt
def test_tensorrt_component_io(trt_samplers):
    components = trt_samplers["tiny-sdxl", "tensorrt"].components
    shape = components.manifest.shape()
    assert shape == ImageShape(64, 64)
    out = components["text_encoder"].infer({"input_ids": np.full((1, 77), 999, dtype=np.int64)})
    assert out["text_embeddings"].shape == (1, 77, 32) and isinstance(out["text_embeddings"], np.ndarray)


def _rtx_gpu_reason() -> str | None:
    """Why TensorRT-RTX engines cannot run here (None where they can: an RTX GPU it targets)."""
    from gag_export.engine import RuntimeTarget, trt_features
    from gag_export.core.errors import MissingDependencyError

    try:
        RuntimeTarget.current(trt_features("tensorrt-rtx"))
    except MissingDependencyError as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_tensorrt_rtx_matches_ort_on_an_rtx_gpu(sdxl_graphs, flux_graphs, tmp_path, model):
    """Needs an NVIDIA RTX GPU (Ampere or newer) with its driver: engines built ahead of time,
    specialised by the JIT on first use (its runtime cache written beside them), the image that of ORT."""
    reason = _rtx_gpu_reason()
    if reason is not None:
        pytest.skip(f"TensorRT-RTX backend: {reason}")
    root = sdxl_graphs if model == "tiny-sdxl" else flux_graphs
    ensure_artifacts(model, "tensorrt-rtx", graphs=root, engines=tmp_path)
    config = GenerationConfig(PROMPT, seed=5, gag=GAGParams(scale=10.0, zeta=0.5))
    with Sampler.load(model, "tensorrt-rtx", graphs=root, engines=tmp_path, options=ONE_THREAD) as rtx, \
            Sampler.load(model, "ort", graphs=root, options=ONE_THREAD) as ort:
        on_rtx, on_ort = rtx.generate(config), ort.generate(config)
    assert max_pixel_diff(on_rtx.image, on_ort.image) <= SAME_IMAGE
    assert list(tmp_path.rglob("*.runtime-cache"))  # the JIT's results, kept for the next process


def _fake_engine(tensors: dict[str, tuple[str, str]]):
    """A stand-in for a TensorRT engine: name -> (mode, location); and the enums it answers with."""
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
                          TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"))
    engine = SimpleNamespace(get_tensor_location=lambda name: tensors[name][1])
    inputs = [n for n, (mode, _) in tensors.items() if mode == "in"]
    outputs = [n for n, (mode, _) in tensors.items() if mode == "out"]
    return engine, trt, inputs, outputs


def test_tensorrt_component_accepts_inputs_the_builder_dropped_and_refuses_other_io():
    from gag_export.models.base import TensorSpec
    from gag_export.runtime.tensorrt_backend import TensorRTComponent

    specs = [TensorSpec("sample", "float32", (1, 4, 8, 8)), TensorSpec("gag_zeta", "float32", ())]
    component = TensorRTComponent("unet", "denoiser", specs, [TensorSpec("noise_pred", "float32", (1, 4, 8, 8))],
                                  plan_path="unet.plan", target=None)
    # TensorRT drops inputs no output depends on (gag_zeta when the graph folded it away): fine
    component._check_io(*_fake_engine({"sample": ("in", "device"), "noise_pred": ("out", "device")}))
    with pytest.raises(ArtifactError, match="the manifest says"):  # an input the manifest lacks
        component._check_io(*_fake_engine({"sample": ("in", "device"), "extra": ("in", "device"), "noise_pred": ("out", "device")}))
    with pytest.raises(ArtifactError, match="the manifest says"):  # a missing output
        component._check_io(*_fake_engine({"sample": ("in", "device")}))
    with pytest.raises(ArtifactError, match="host"):
        component._check_io(*_fake_engine({"sample": ("in", "host"), "noise_pred": ("out", "device")}))


def test_ort_component_runs_bf16_inputs_and_outputs(tmp_path):
    # ONNX Runtime's session.run takes no bfloat16 numpy array ("Numpy_type 256 can't be
    # converted") and OrtValue.numpy() returns none: the component binds them by address
    import onnx
    from onnx import TensorProto, helper

    from gag_export.models.base import TensorSpec

    graph = helper.make_graph(
        [helper.make_node("Identity", ["sample"], ["same"]), helper.make_node("Cast", ["sample"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["as_float", "gag_scale"], ["shifted"])],
        "bf16_io",
        [helper.make_tensor_value_info("sample", TensorProto.BFLOAT16, [2, 3]), helper.make_tensor_value_info("gag_scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("same", TensorProto.BFLOAT16, [2, 3]), helper.make_tensor_value_info("shifted", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    component = OrtComponent(
        "unet", "denoiser", [TensorSpec("sample", "bfloat16", (2, 3)), TensorSpec("gag_scale", "float32", ())],
        [TensorSpec("same", "bfloat16", (2, 3)), TensorSpec("shifted", "float32", (2, 3))], path=tmp_path / "model.onnx",
        providers=("CPUExecutionProvider",),
    )
    sample = torch.tensor([[1.5, -2.0, 3.25], [0.0, 1e3, -7.5]], dtype=torch.bfloat16)
    with component:
        out = component.infer({"sample": sample, "gag_scale": np.float32(0.5)})
    assert str(out["same"].dtype) == "bfloat16" and out["same"].shape == (2, 3)
    from gag_export.arrays import to_torch

    assert torch.equal(to_torch(out["same"]), sample)
    np.testing.assert_array_equal(out["shifted"], sample.float().numpy() + 0.5)


def test_ort_component_without_a_kernel_for_the_graph_says_so(tmp_path):
    # ONNX Runtime's CPU provider has no bfloat16 Softmax: a sound graph, a runtime that cannot run it
    import onnx
    from onnx import TensorProto, helper

    from gag_export.core.errors import MissingDependencyError
    from gag_export.models.base import TensorSpec

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "bf16_softmax",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    component = OrtComponent("unet", "denoiser", [TensorSpec("x", "bfloat16", (2, 3))], [TensorSpec("y", "bfloat16", (2, 3))],
                             path=tmp_path / "model.onnx", providers=("CPUExecutionProvider",))
    with pytest.raises(MissingDependencyError, match="no kernel"):
        component.activate()


def test_ort_gpu_providers_get_their_options(tmp_path, monkeypatch):
    # TensorRT's engines cached beside the graph (else every session rebuilds them), CUDA after
    # TensorRT for the nodes it does not take, and TF32 off so "fp32" means fp32 on every backend
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    component = OrtComponent("unet", "denoiser", [], [], path=tmp_path / "unet" / "model.onnx")
    providers = component._with_options(["TensorrtExecutionProvider"])
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt_options, cuda_options = providers[0][1], providers[1][1]
    assert trt_options["trt_engine_cache_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "unet" / "ort-tensorrt-cache")
    assert cuda_options == {"use_tf32": "0"}
    assert component._with_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_torch_on_cuda_runs_without_tf32_and_restores_the_flags():
    from gag_export.runtime.torch_backend import no_tf32 as _no_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        with _no_tf32(True):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert torch.backends.cudnn.allow_tf32 is True
        with _no_tf32(False):  # CPU: untouched
            assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
