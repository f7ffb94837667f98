"""The generated Triton model repository, without a server: configs parse as Triton's `ModelConfig`,
the layout is what Triton loads, the ensemble is wired consistently, and the Python models (sampler
and stand-ins) produce the local runtime's image when run in-process through a fake Python backend
that applies Triton's shape rules to every BLS call (tests/triton_helpers.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gag_export.engine import Sidecar
from gag_export.artifacts.engines import sidecar_path
from gag_export.core.errors import ArtifactError, GagExportError, InvalidInputError, MissingDependencyError
from gag_export.artifacts.manifest import Manifest
from gag_export.models import get_entry
from gag_export.serving import pbtxt
from gag_export.serving.repository import RepositoryOptions, build_repository
from gag_export.serving.requests import RequestLimits, parse_request
from gag_export.serving import repository as repo_module
from gag_export.serving.client import parse_url

from runtime_helpers import ONE_THREAD, exported_graphs, max_pixel_diff, torch_threads
from triton_helpers import PROMPT, FakeTriton, config_json, load_config, request_values

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is in the [dev] extra")

MODEL = "tiny-sdxl"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    return exported_graphs(tmp_path_factory, MODEL) / MODEL


@pytest.fixture(scope="module")
def standin_repo(graphs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / MODEL
    build_repository(graphs, out, RepositoryOptions(cpu_standin=True, sampler_instances=1))
    return out


def _fake_engines(graphs: Path, root: Path, ccs=((8, 6), (9, 0))) -> Path:
    """engines/<model>/<component>/*.plan with sidecars, as `gag-export engine` lays them out (fake bytes)."""
    manifest = Manifest.load(graphs)
    for name, entry in manifest.components.items():
        folder = root / name
        folder.mkdir(parents=True)
        for cc in ccs:
            plan = folder / f"{entry['sha256'][:12]}-trt10.8-sm{cc[0]}{cc[1]}-fp32-abc.plan"
            plan.write_bytes(os.urandom(64))
            sidecar = Sidecar(MODEL, name, str(graphs), str(manifest.graph_path(name)), entry["sha256"], "x", 64,
                              "10.8.0", "GPU", cc, "fp32", {}, {}, 1.0, "now")
            sidecar_path(plan).write_text(sidecar.to_json())
        stale = folder / "000000000000-trt10.8-sm86-fp32-old.plan"  # another graph's engine: ignored
        stale.write_bytes(b"x")
        sidecar_path(stale).write_text(Sidecar(MODEL, name, "", "", "0" * 64, "x", 1, "10.8.0", "GPU", (8, 6), "fp32",
                                               {}, {}, 1.0, "then").to_json())
    return root


def _edited_export(graphs: Path, folder: Path, edit) -> Path:
    """A copy of the export (files hard-linked) whose manifest `edit(data)` changed in place.

    The manifest is unlinked before it is rewritten: written through the hard link, the edit would
    land in the shared export every other test reads.
    """
    shutil.copytree(graphs, folder, copy_function=os.link)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def _configs(repo: Path) -> dict:
    return {p.parent.name: load_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def _check_layout(repo: Path) -> dict:
    """Every model folder: config name = folder, version folder 1, the file its platform/backend loads."""
    configs = _configs(repo)
    assert set(configs) == {p.name for p in repo.iterdir() if p.is_dir()}
    for name, config in configs.items():
        assert config.name == name
        version = repo / name / "1"
        assert version.is_dir(), name
        if config.platform == "tensorrt_plan":
            assert (version / "model.plan").is_file()
            for file in config.cc_model_filenames.values():
                assert (version / file).is_file()
        elif config.platform == "onnxruntime_onnx":
            assert (version / "model.onnx").is_file()
        elif config.backend == "python":
            assert (version / "model.py").is_file()
        else:
            assert config.platform == "ensemble", name
        for tensor in [*config.input, *config.output]:
            assert list(tensor.dims), f"{name}.{tensor.name}: Triton refuses empty dims"
            assert all(d == -1 or d >= 1 for d in tensor.dims)
            if tensor.HasField("reshape") and not list(tensor.reshape.shape):
                assert config.max_batch_size > 0, f"{name}.{tensor.name}: empty reshape needs batching"
        if config.HasField("dynamic_batching"):
            assert config.max_batch_size > 0
    return configs


def _check_ensemble(configs: dict, name: str = "pipeline") -> None:
    """Ensemble wiring: every step's model exists; mapped names, types and shapes agree on both sides."""
    ensemble = configs[name]
    tensors = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    produced = set()
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        model_outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        assert set(step.input_map) == set(model_inputs), "every input of the step's model is fed"
        for key, value in step.input_map.items():
            assert value in tensors, f"{value} is neither an ensemble input nor an earlier output"
            assert tensors[value] == model_inputs[key], key
        for key, value in step.output_map.items():
            assert key in model_outputs
            tensors[value] = model_outputs[key]
            produced.add(value)
    for out in ensemble.output:
        assert out.name in produced
        assert tensors[out.name] == (out.data_type, list(out.dims))
    used = {v for step in ensemble.ensemble_scheduling.step for v in step.input_map.values()}
    assert {t.name for t in ensemble.input} <= used, "every ensemble input reaches a step"


# ------------------------------------------------------------------ configs and layout


def test_standin_repository_layout_and_configs(standin_repo, graphs):
    configs = _check_layout(standin_repo)
    _check_ensemble(configs)
    manifest = Manifest.load(graphs)
    assert set(configs) == {*manifest.components, "sampler", "pipeline"}
    for name, entry in manifest.components.items():
        config = configs[name]
        assert config.backend == "python" and config.instance_group[0].kind == config.instance_group[0].KIND_CPU
        assert [t.name for t in config.input] == [e["name"] for e in entry["inputs"]]
        assert [t.name for t in config.output] == [e["name"] for e in entry["outputs"]]
        assert (standin_repo / name / "1" / "model.onnx").read_bytes() == manifest.graph_path(name).read_bytes()
        assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    unet = {t.name: t for t in configs["unet"].input}
    # per-layer gag_scale [L] keeps its dims (never batched); gag_zeta, 0-d, is [1] reshaped to the batch
    assert list(unet["gag_scale"].dims) == [6] and list(unet["gag_zeta"].dims) == [1]
    assert list(unet["sample"].dims) == [4, 8, 8]
    assert list(unet["timestep"].dims) == [1] and list(unet["timestep"].reshape.shape) == []
    sampler = configs["sampler"]
    assert sampler.instance_group[0].count == 1
    wiring = json.loads(sampler.parameters["components"].string_value)
    assert {k: v["max_batch_size"] for k, v in wiring.items()} == {n: configs[n].max_batch_size for n in manifest.components}
    pipeline = configs["pipeline"]
    assert [t.name for t in pipeline.input] == ["prompt", "seed", "steps", "gag_scale", "gag_eta", "gag_zeta",
                                              "gag_scale_steps", "gag_eta_steps"]  # the schedules: optional
    assert list(pipeline.output[0].dims) == [64, 64, 3]
    assert pipeline.parameters["default_steps"].string_value == "4"
    assert (standin_repo / "sampler" / "1" / "manifest.json").is_file()


def test_onnx_repository_with_symbolic_dims(graphs, tmp_path):
    """-1 for symbolic dims; a component batches only with a symbolic batch dim and no 0-d tensors."""
    def make_dynamic(data):
        for entry in data["components"].values():
            for tensor in [*entry["inputs"], *entry["outputs"]]:
                if tensor["shape"]:
                    tensor["shape"][0] = "batch"
            for name, spec in entry.get("profile", {}).items():
                if spec["max"]:
                    spec["max"][0] = 4
        data["dynamic"] = True

    dynamic = _edited_export(graphs, tmp_path / "graphs" / MODEL, make_dynamic)
    out = tmp_path / "repo"
    report = build_repository(dynamic, out, RepositoryOptions(backend="onnx", instances=2, gpus=(0, 1), max_batch=16))
    configs = _check_layout(out)
    _check_ensemble(configs)
    te = configs["text_encoder"]
    assert te.platform == "onnxruntime_onnx" and te.max_batch_size == 4  # capped by the profile's max batch
    assert list(te.input[0].dims) == [77] and te.HasField("dynamic_batching")
    group = te.instance_group[0]
    assert group.kind == group.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
    unet = configs["unet"]
    assert unet.max_batch_size == 0 and not unet.HasField("dynamic_batching")  # 0-d gag inputs
    assert list({t.name: t for t in unet.input}["sample"].dims) == [-1, 4, 8, 8]
    assert list(configs["pipeline"].output[0].dims) == [-1, -1, 3]
    assert any("unet: not batched" in note for note in report.notes)


def test_plan_repository_from_engine_cache(graphs, tmp_path):
    engines = _fake_engines(graphs, tmp_path / "engines" / MODEL)
    out = tmp_path / "repo"
    build_repository(graphs, out, RepositoryOptions(backend="plan"), engines_dir=engines)
    configs = _check_layout(out)
    _check_ensemble(configs)
    vae = configs["vae_decoder"]
    assert vae.platform == "tensorrt_plan"
    assert dict(vae.cc_model_filenames) == {"8.6": "model.sm86.plan", "9.0": "model.sm90.plan"}
    assert (out / "vae_decoder" / "1" / "model.plan").read_bytes() == (out / "vae_decoder" / "1" / "model.sm90.plan").read_bytes()
    unet = configs["unet"]  # a plan with 0-d inputs: Triton's TensorRT backend cannot declare them
    assert unet.backend == "python" and unet.instance_group[0].kind == unet.instance_group[0].KIND_GPU
    assert "EngineModel" in (out / "unet" / "1" / "model.py").read_text()
    for cc in ("sm86", "sm90"):
        assert (out / "unet" / "1" / f"model.{cc}.plan").is_file() and (out / "unet" / "1" / f"model.{cc}.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx is not installed")
def test_tensorrt_rtx_repository_serves_every_component_as_a_python_model(graphs, tmp_path):
    """Real TensorRT-RTX plans (built here without a GPU); Triton's TensorRT backend cannot load them,
    so every component is an EngineModel told the flavor, holding the plan for its targets."""
    from gag_export.engine import EngineOptions, build

    engines = tmp_path / "engines"
    build(graphs, engines, EngineOptions(backend="tensorrt-rtx", targets="sm86,sm89"))
    _fake_engines(graphs, tmp_path / "trt-engines" / MODEL)  # TensorRT plans: not taken for a TensorRT-RTX repository
    for trt_plan in (tmp_path / "trt-engines" / MODEL).rglob("*"):
        if trt_plan.is_file():
            (engines / MODEL / trt_plan.relative_to(tmp_path / "trt-engines" / MODEL)).write_bytes(trt_plan.read_bytes())
    out = tmp_path / "repo"
    report = build_repository(graphs, out, RepositoryOptions(backend="tensorrt-rtx"), engines_dir=engines / MODEL)
    configs = _check_layout(out)
    _check_ensemble(configs)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        config = configs[name]
        assert config.backend == "python" and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert config.parameters["flavor"].string_value == "tensorrt-rtx"
        files = sorted(p.name for p in (out / name / "1").iterdir())
        assert files == ["model.py", "model.sm86_89.json", "model.sm86_89.plan"]
    assert {m.kind for m in report.models if m.name != "sampler" and m.name != "pipeline"} == {"python (TensorRT-RTX plan)"}
    with pytest.raises(InvalidInputError, match="--backend tensorrt-rtx needs the engines folder"):
        build_repository(graphs, tmp_path / "r2", RepositoryOptions(backend="tensorrt-rtx"))


def test_plan_backend_needs_engines(graphs, tmp_path):
    with pytest.raises(InvalidInputError, match="--engines"):
        build_repository(graphs, tmp_path / "r", RepositoryOptions(backend="plan"))
    with pytest.raises(ArtifactError, match="no TensorRT engine for tiny-sdxl/text_encoder"):
        build_repository(graphs, tmp_path / "r", RepositoryOptions(backend="plan"), engines_dir=tmp_path / "none")
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


def test_failed_write_keeps_the_previous_repository(graphs, standin_repo, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    shutil.copytree(standin_repo, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repo_module, "save_assets", broken)
    with pytest.raises(Exception, match="out of disk space"):
        build_repository(graphs, out, RepositoryOptions(cpu_standin=True))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"], "no temp folder left behind"


def test_missing_graph_is_refused_before_writing(graphs, tmp_path):
    broken = tmp_path / "graphs" / MODEL
    shutil.copytree(graphs, broken, copy_function=os.link)
    (broken / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="vae_decoder/model.onnx is missing"):
        build_repository(broken, tmp_path / "out", RepositoryOptions(cpu_standin=True))
    assert not (tmp_path / "out").exists()


def test_an_export_missing_a_component_is_refused_before_writing(graphs, tmp_path):
    # a `--component` export (or an edited manifest): a repository without a denoiser was written
    partial = _edited_export(graphs, tmp_path / "graphs" / MODEL, lambda data: data["components"].pop("unet"))
    with pytest.raises(ArtifactError, match="has no unet"):
        build_repository(partial, tmp_path / "out", RepositoryOptions(cpu_standin=True))
    assert not (tmp_path / "out").exists()


def _tree(folder: Path) -> dict:
    """Every path under `folder` with its bytes (None for folders): what a refused write must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_out_that_is_not_a_previous_repository_is_refused_untouched(graphs, tmp_path):
    """--out at the export, the graphs root holding it, inside the export, or a folder of the user's:
    refused with exit 2 before anything is written (it used to be replaced by the repository)."""
    from gag_export.cli import cli

    root = tmp_path / "graphs"
    export = _edited_export(graphs, root / MODEL, lambda data: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cases = [(export, "is the graphs folder"), (root, "holds the graphs folder"),
             (export / "triton", "is inside the graphs folder"), (mine, "is not a repository written by `gag-export triton`")]
    for out, message in cases:
        before = _tree(tmp_path)
        with pytest.raises(InvalidInputError, match=message):
            build_repository(export, out, RepositoryOptions(cpu_standin=True))
        assert _tree(tmp_path) == before, out
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["triton", str(export), "--out", str(root), "--cpu-standin"], obj={})
    assert result.exit_code == 2 and "holds the graphs folder" in result.output, result.output
    assert _tree(tmp_path) == before


def test_a_previous_repository_is_replaced(graphs, standin_repo, tmp_path):
    """What the tool wrote (marker, or from before the marker: its generated sampler), or an empty folder."""
    out = tmp_path / "repo"
    shutil.copytree(standin_repo, out)
    (out / "unet" / "stale.txt").write_text("from an older run")
    build_repository(graphs, out, RepositoryOptions(cpu_standin=True, sampler_instances=3))
    assert not (out / "unet" / "stale.txt").exists() and (out / repo_module.MARKER).is_file()
    assert _configs(out)["sampler"].instance_group[0].count == 3
    (out / repo_module.MARKER).unlink()
    assert repo_module.is_generated_repository(out)
    build_repository(graphs, out, RepositoryOptions(cpu_standin=True))
    assert _configs(out)["sampler"].instance_group[0].count == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    build_repository(graphs, empty, RepositoryOptions(cpu_standin=True))
    _check_layout(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "repo"], "no temp folder left behind"


def test_cpu_standin_refuses_a_bf16_export(graphs, tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: refused up front, not at serve time."""
    from gag_export.cli import cli

    bf16 = _edited_export(graphs, tmp_path / "graphs" / MODEL, lambda data: data.update(dtype="bf16"))
    with pytest.raises(InvalidInputError, match="--cpu-standin cannot serve tiny-sdxl's bf16 export"):
        build_repository(bf16, tmp_path / "repo", RepositoryOptions(cpu_standin=True))
    result = CliRunner().invoke(cli, ["triton", str(bf16), "--out", str(tmp_path / "repo"), "--cpu-standin"], obj={})
    assert result.exit_code == 2 and "bfloat16" in result.output, result.output
    assert not (tmp_path / "repo").exists()
    build_repository(bf16, tmp_path / "onnx", RepositoryOptions(backend="onnx"))  # for a GPU: written


def test_options_are_validated():
    with pytest.raises(InvalidInputError, match="backend"):
        RepositoryOptions(backend="torch")
    with pytest.raises(InvalidInputError, match="instances"):
        RepositoryOptions(instances=0)
    with pytest.raises(InvalidInputError, match="gpus"):
        RepositoryOptions(gpus=(0, 0))


def test_pbtxt_writer_round_trips_through_protobuf():
    from tritonclient.grpc import model_config_pb2
    from google.protobuf import text_format

    text = pbtxt.dumps({
        "name": 'with "quotes" \\ and ünicode', "max_batch_size": 2, "platform": None,
        "input": [{"name": "x", "data_type": pbtxt.Token("TYPE_FP32"), "dims": [-1, 3], "reshape": {"shape": []}}],
        "parameters": [{"key": "k", "value": {"string_value": "v"}}],
        "dynamic_batching": {"max_queue_delay_microseconds": 10},
    })
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == 'with "quotes" \\ and ünicode' and config.max_batch_size == 2 and config.platform == ""
    assert list(config.input[0].dims) == [-1, 3] and config.input[0].HasField("reshape")
    assert config.parameters["k"].string_value == "v"
    with pytest.raises(ValueError):
        pbtxt.dumps({"x": float("nan")})


# ------------------------------------------------------------------ the Python models, in-process


@pytest.fixture(scope="module")
def fake_triton(standin_repo):
    with torch_threads(1):
        triton = FakeTriton(standin_repo)
        yield triton
        triton.finalize()


def _local_image(graphs: Path, seed: int, scale=10.0, eta=15.0, zeta=0.0, steps=4):
    from gag_export.runtime import GAGParams, GenerationConfig, Sampler

    with torch_threads(1), Sampler.load(MODEL, "ort", graphs=graphs.parent, options=ONE_THREAD) as sampler:
        return sampler.generate(GenerationConfig(PROMPT, seed=seed, steps=steps,
                                                 gag=GAGParams(scale, eta, zeta))).image


def test_sampler_over_bls_equals_the_local_runtime(fake_triton, graphs):
    with torch_threads(1):
        response = fake_triton.pipeline(**request_values(seed=3, scale=5.0, zeta=0.5))
    assert not response.has_error(), response.error() and response.error().message()
    image = response.output_tensors[0].as_numpy()
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert max_pixel_diff(image, _local_image(graphs, 3, scale=5.0, zeta=0.5)) == 0
    called = [name for name, _ in fake_triton.calls]
    assert called.count("unet") == 4 and called.count("vae_decoder") == 1  # one BLS call per step
    unet_shapes = next(shapes for name, shapes in fake_triton.calls if name == "unet")
    assert unet_shapes["gag_zeta"] == (1, 1) and unet_shapes["timestep"] == (1, 1)  # batched model: [batch, 1]
    assert unet_shapes["gag_scale"] == (1, 6)  # per-layer values: [batch 1, L]


@pytest.mark.parametrize("change, message", [
    ({"steps": 9}, "steps: this model samples with 1..4 steps, got 9"),
    ({"steps": 0}, "steps: this model samples with 1..4 steps, got 0"),
    ({"scale": float("nan")}, "gag_scale: must be a finite number in [-1, 100], got nan"),
    ({"scale": 1e6}, "gag_scale: must be a finite number in [-1, 100]"),
    ({"eta": 0.0}, "gag_eta: must be a number in (0, inf], got 0.0"),
    ({"eta": float("nan")}, "gag_eta: must be a number in (0, inf], got nan"),
    ({"zeta": float("inf")}, "gag_zeta: must be a finite number in [0, 10]"),
    ({"seed": -1}, "seed: must be an integer in [0, 2**63 - 1], got -1"),
    ({"prompt": "x" * 1001}, "prompt: 1001 characters, at most 1000 are accepted"),
    ({"prompt": b"\xff\xfe"}, "prompt: not valid UTF-8"),
])
def test_bad_requests_get_an_error_response_and_the_model_keeps_serving(fake_triton, change, message):
    response = fake_triton.pipeline(**request_values(**change))
    assert response.has_error()
    assert message in response.error().message()
    assert response.error().code == "INVALID_ARG"
    with torch_threads(1):
        good = fake_triton.pipeline(**request_values(steps=1))
    assert not good.has_error()


def test_parse_request_shapes_and_types():
    limits = RequestLimits(min_steps=1, max_steps=4)
    values = request_values()
    config = parse_request(values, limits, gag=True)
    assert (config.seed, config.steps, config.gag.scale) == (1, 4, 10.0)
    with pytest.raises(InvalidInputError, match="send exactly one value"):
        parse_request({**values, "seed": np.array([1, 2], dtype=np.int64)}, limits, gag=True)
    with pytest.raises(InvalidInputError, match="steps: must be an integer"):
        parse_request({**values, "steps": np.array([2.5], dtype=np.float32)}, limits, gag=True)
    with pytest.raises(InvalidInputError, match="gag_eta: missing"):
        parse_request({k: v for k, v in values.items() if k != "gag_eta"}, limits, gag=True)
    with pytest.raises(InvalidInputError, match="exported without GAG"):
        parse_request(values, limits, gag=False)
    assert RequestLimits.from_parameters(RequestLimits(2, 3, max_prompt_chars=5).to_parameters()) == \
        RequestLimits(2, 3, max_prompt_chars=5)
    assert RequestLimits.for_entry(get_entry("dmd2")).max_steps == 4


def test_gag_eta_inf_is_no_cap_and_accepted():
    """As GAGConfig and `generate` take it: eta in (0, inf]; a deployment may still narrow the bound."""
    limits = RequestLimits(min_steps=1, max_steps=4)
    assert parse_request(request_values(eta=float("inf")), limits, gag=True).gag.eta == float("inf")
    assert RequestLimits.from_parameters(limits.to_parameters()) == limits  # "inf" travels through config.pbtxt
    narrowed = RequestLimits(1, 4, max_eta=100.0)
    with pytest.raises(InvalidInputError, match=r"gag_eta: must be a finite number in \(0, 100\], got inf"):
        parse_request(request_values(eta=float("inf")), narrowed, gag=True)
    with pytest.raises(InvalidInputError, match="max_eta"):
        RequestLimits(1, 4, max_eta=float("nan"))


def test_export_without_norm_cap_is_served_with_its_defaults(graphs, tmp_path):
    """`export --gag-eta inf`: the pipeline's default eta is inf and the sampler serves it."""
    uncapped = _edited_export(graphs, tmp_path / "graphs" / MODEL, lambda data: data["gag"].update(eta=float("inf")))
    out = tmp_path / "repo"
    build_repository(uncapped, out, RepositoryOptions(cpu_standin=True, sampler_instances=1))
    eta = float(_configs(out)["pipeline"].parameters["default_gag_eta"].string_value)
    assert eta == float("inf")
    with torch_threads(1):
        triton = FakeTriton(out)
        try:
            response = triton.pipeline(**request_values(seed=2, steps=1, eta=eta))
        finally:
            triton.finalize()
    assert not response.has_error(), response.error().message()
    assert max_pixel_diff(response.output_tensors[0].as_numpy(), _local_image(graphs, 2, eta=eta, steps=1)) == 0


def test_standin_model_config_json_is_what_the_backend_reads(standin_repo):
    """The stand-in reads its graph I/O from the config's parameters (JSON), as the backend passes it."""
    config = config_json(load_config(standin_repo / "unet" / "config.pbtxt"))
    io = json.loads(config["parameters"]["graph_io"]["string_value"])
    assert [e["name"] for e in io["inputs"]][-3:] == ["gag_scale", "gag_eta", "gag_zeta"]


# ------------------------------------------------------------------ CLI and small pieces


def test_cli_triton_writes_a_repository(graphs, tmp_path):
    from gag_export.cli import cli

    out = tmp_path / "triton" / MODEL
    result = CliRunner().invoke(cli, ["triton", str(graphs), "--out", str(out), "--cpu-standin", "--instances", "2",
                                      "--no-dynamic-batching", "--max-batch", "4"], obj={})
    assert result.exit_code == 0, result.output
    assert f"gag-export serve --repo {out}" in result.output
    configs = _check_layout(out)
    assert configs["unet"].max_batch_size == 4 and not configs["unet"].HasField("dynamic_batching")
    assert configs["unet"].instance_group[0].count == 2
    bad = CliRunner().invoke(cli, ["triton", str(graphs), "--out", str(tmp_path / "x"), "--backend", "plan"], obj={})
    assert bad.exit_code == 2 and "--engines" in bad.output
    bad = CliRunner().invoke(cli, ["triton", str(graphs), "--out", str(tmp_path / "x"), "--gpus", "a,b"], obj={})
    assert bad.exit_code == 2


def test_cli_serve_and_client_errors(tmp_path, monkeypatch):
    from gag_export.cli import cli

    assert CliRunner().invoke(cli, ["serve"], obj={}).exit_code == 2
    result = CliRunner().invoke(cli, ["serve", "--repo", str(tmp_path)], obj={})
    assert result.exit_code == 5 and "not a gag-export Triton repository" in result.output
    result = CliRunner().invoke(cli, ["client", "--url", "ftp://x:1", "--prompt", "p"], obj={})
    assert result.exit_code == 2 and "http://host:port" in result.output
    from gag_export.serving.server import free_port

    port = free_port()
    result = CliRunner().invoke(cli, ["client", "--url", f"http://127.0.0.1:{port}", "--prompt", "p", "--timeout", "5"],
                                obj={})
    assert result.exit_code == 2 and "cannot reach" in result.output
    result = CliRunner().invoke(cli, ["client", "--url", f"grpc://127.0.0.1:{port}", "--prompt", "p", "--timeout", "5"],
                                obj={})
    assert result.exit_code == 2 and "cannot reach" in result.output


def test_client_model_must_be_a_served_pipeline(standin_repo, monkeypatch):
    """`client --model unet` (a component) or an unknown name: exit 2 naming the pipeline models (it was
    exit 1, a KeyError for the component's missing defaults). The server's answers come from the repository."""
    from gag_export.cli import cli
    from gag_export.serving.client import PipelineClient

    served = {name: config_json(config) for name, config in _configs(standin_repo).items()}

    def config(self, model):
        if model not in served:
            raise GagExportError(f"reading the model config failed: Request for unknown model: '{model}' is not found")
        return served[model]

    monkeypatch.setattr(PipelineClient, "_served_models", lambda self: sorted(served))
    monkeypatch.setattr(PipelineClient, "_config", config)
    for model, why in (("unet", "not a pipeline model"), ("nosuch", "the server has no model of that name")):
        result = CliRunner().invoke(cli, ["client", "--url", "http://127.0.0.1:1", "--model", model, "--prompt", "p"],
                                    obj={})
        assert result.exit_code == 2, result.output
        assert f"--model {model}: {why}" in result.output, result.output
        assert "the pipeline models served at http://127.0.0.1:1: pipeline (" in result.output
    with PipelineClient("http://127.0.0.1:1", model="sampler") as client:  # the model behind the pipeline
        assert client.defaults["gag_export_model"] == MODEL
        assert client.pipeline_models() == ["pipeline"]


def test_no_server_found_names_the_setup_command(standin_repo, tmp_path, monkeypatch):
    from gag_export.serving import server

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("GAG_EXPORT_TRITON_ENV", str(tmp_path / "none"))
    monkeypatch.setattr(server, "CONTAINER_SERVER", tmp_path / "none" / "tritonserver")
    monkeypatch.setattr(server, "describe", lambda python: server.PythonEnvironment(Path(python), "3.11", None, "2.4", None))
    with pytest.raises(MissingDependencyError, match="gag-export serve --setup"):
        server.resolve_launch(server.ServerConfig(standin_repo))


def test_serving_environment_requirements_pin_the_runtime():
    from gag_export.serving.environment import requirements

    reqs = requirements()
    assert "numpy<2" in reqs and any(r.startswith("nvidia-pytriton==") for r in reqs)
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in reqs
    from packaging.requirements import Requirement

    names = {Requirement(r).name.lower() for r in reqs}
    assert {"onnxruntime", "diffusers", "transformers"} <= names
    assert not names & {"onnx", "onnxscript", "onnxslim", "polygraphy", "matplotlib"}  # the build side stays out


@pytest.mark.parametrize("url, protocol, expected", [
    ("http://127.0.0.1:8000", None, ("http", "127.0.0.1:8000")),
    ("grpc://host:8001/", None, ("grpc", "host:8001")),
    ("localhost:8001", "grpc", ("grpc", "localhost:8001")),
    ("localhost:8000", None, ("http", "localhost:8000")),
])
def test_parse_url(url, protocol, expected):
    assert parse_url(url, protocol) == expected


def test_parse_url_refuses_conflicts():
    with pytest.raises(InvalidInputError):
        parse_url("http://a:1", "grpc")
    with pytest.raises(InvalidInputError):
        parse_url("http://a:1/v2/models")


def test_flux_standin_over_bls_equals_the_local_runtime(tmp_path_factory, tmp_path):
    """FLUX: the transformer's id grids have no batch dim, so Triton may not batch it; same image."""
    from gag_export.runtime import GAGParams, GenerationConfig, Sampler

    root = exported_graphs(tmp_path_factory, "tiny-flux")
    out = tmp_path / "tiny-flux"
    build_repository(root / "tiny-flux", out, RepositoryOptions(cpu_standin=True))
    configs = _check_layout(out)
    _check_ensemble(configs)
    assert configs["transformer"].max_batch_size == 0 and configs["vae_decoder"].max_batch_size == 8
    with torch_threads(1):
        triton = FakeTriton(out)
        try:
            response = triton.pipeline(**request_values(seed=5, steps=2))
        finally:
            triton.finalize()
        with Sampler.load("tiny-flux", "ort", graphs=root, options=ONE_THREAD) as sampler:
            local = sampler.generate(GenerationConfig(PROMPT, seed=5, steps=2, gag=GAGParams(10.0, 15.0, 0.0))).image
    assert not response.has_error(), response.error() and response.error().message()
    assert max_pixel_diff(response.output_tensors[0].as_numpy(), local) == 0


def test_bundled_server_refuses_a_repository_needing_other_backends(standin_repo, graphs, tmp_path):
    """The nvidia-pytriton server has only the Python backend: an ONNX repository is refused up front."""
    from gag_export.serving.server import check_backends, required_backends

    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    assert set(required_backends(standin_repo).values()) == {"python"}
    check_backends(standin_repo, backends)
    onnx_repo = tmp_path / "onnx"
    build_repository(graphs, onnx_repo, RepositoryOptions(backend="onnx"))
    assert required_backends(onnx_repo)["unet"] == "onnxruntime" and "pipeline" not in required_backends(onnx_repo)
    with pytest.raises(MissingDependencyError, match="text_encoder \\(onnxruntime\\).*--cpu-standin"):
        check_backends(onnx_repo, backends)
