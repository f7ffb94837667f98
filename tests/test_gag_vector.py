"""Per-layer guidance values (gag_scale/gag_eta as [L] inputs) and per-step schedules (issue 24 item 2).

Reuses the session's tiny exports (export_helpers) and pipelines; nothing is exported here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from export_helpers import BISECT, exported, pipeline, session, shared_root
from runtime_helpers import ONE_THREAD, PROMPT, torch_threads

from gag_export.artifacts.manifest import Manifest, apply_gag_defaults
from gag_export.cli import cli
from gag_export.core.errors import ArtifactError, InvalidInputError
from gag_export.export.parity import compare_with_torch
from gag_export.export.pipeline import denoiser_module, sample_feed
from gag_export.gag import gag_applied
from gag_export.models import descriptors_for, get_entry
from gag_export.runtime import GAGParams, GenerationConfig, Sampler

MODELS = {"sdxl": "tiny-sdxl", "flux": "tiny-flux"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def denoiser_descriptor(manifest: Manifest):
    """The export's denoiser descriptor, with the per-layer inputs the graph declares."""
    descriptor = next(d for d in descriptors_for(get_entry(manifest.model), pipeline(manifest.model)) if d.role == "denoiser")
    return dataclasses.replace(descriptor, gag_layers=len(manifest.gag_layer_names))


def torch_outputs(module, feed, **gag) -> torch.Tensor:
    args = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
    args.update(gag)
    with torch.no_grad():
        return module(*args.values())[0]


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_export_declares_one_value_per_rewritten_layer(name, tmp_path_factory):
    manifest = exported(name, shared_root(tmp_path_factory))
    layers = manifest.gag_layer_names
    assert layers == manifest.data["gag"]["rewritten"] and len(layers) > 1
    denoiser = next(c for c in manifest.components.values() if c["role"] == "denoiser")
    shapes = {i["name"]: i["shape"] for i in denoiser["inputs"]}
    assert shapes["gag_scale"] == shapes["gag_eta"] == [len(layers)] and shapes["gag_zeta"] == []
    assert denoiser["profile"]["gag_eta"] == {"min": [len(layers)], "opt": [len(layers)], "max": [len(layers)]}


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_vector_values_in_torch_and_on_ort(name, tmp_path_factory):
    """torch: a number and the same number in every entry give equal outputs; changing one layer's
    entry changes them. ORT runs the same per-layer values as torch (within the export's tolerance)."""
    manifest = exported(name, shared_root(tmp_path_factory))
    descriptor = denoiser_descriptor(manifest)
    layers = len(manifest.gag_layer_names)
    feed = sample_feed(descriptor, manifest.shape(), descriptor.export_dtype("fp32"), 0, True)
    pipe = pipeline(manifest.model)
    with gag_applied(denoiser_module(pipe), BISECT):
        module = descriptor.export_module(pipe).eval()
        eta = 0.05  # small enough that the cap binds in every layer
        scalar = torch_outputs(module, feed, gag_scale=torch.tensor(4.0), gag_eta=torch.tensor(eta))
        vector = torch_outputs(module, feed, gag_scale=torch.full((layers,), 4.0), gag_eta=torch.full((layers,), eta))
        assert torch.equal(scalar, vector)
        one_changed = torch.full((layers,), eta)
        one_changed[layers - 1] = 50.0
        changed = torch_outputs(module, feed, gag_scale=torch.full((layers,), 4.0), gag_eta=one_changed)
        assert not torch.equal(scalar, changed)

        per_layer = dict(feed, gag_scale=np.linspace(1, 8, layers, dtype=np.float32),
                         gag_eta=np.linspace(0.02, 2, layers, dtype=np.float32))
        path = manifest.graph_path(descriptor.name)
        results = compare_with_torch(path, module, per_layer, descriptor.output_names(), descriptor.tolerance("fp32"))
        assert all(results), results

    sess = session(path)
    broadcast = dict(feed, **GAGParams(scale=4.0, eta=eta, zeta=float(feed["gag_zeta"])).feed(
        {i.name: tuple(i.shape) for i in sess.get_inputs()}))
    explicit = dict(feed, gag_scale=np.full(layers, 4.0, np.float32), gag_eta=np.full(layers, eta, np.float32))
    a, b = (sess.run(None, f)[0] for f in (broadcast, explicit))
    assert np.array_equal(a, b)
    c = sess.run(None, dict(explicit, gag_eta=one_changed.numpy()))[0]
    assert not np.array_equal(a, c)


def test_params_broadcast_a_number_and_check_lengths_and_values():
    shapes = {"gag_scale": (3,), "gag_eta": (3,), "gag_zeta": ()}
    feed = GAGParams(scale=5.0, eta=(1.0, 2.0, 3.0)).feed(shapes)
    assert feed["gag_scale"].tolist() == [5.0] * 3 and feed["gag_eta"].tolist() == [1.0, 2.0, 3.0]
    assert feed["gag_zeta"].shape == ()
    old = GAGParams(scale=5.0, eta=7.0).feed({})  # an export made before per-layer values: 0-d inputs
    assert all(v.shape == () for v in old.values()) and float(old["gag_eta"]) == 7.0
    with pytest.raises(InvalidInputError, match="re-export"):
        GAGParams(eta=(1.0, 2.0, 3.0)).feed({})
    with pytest.raises(InvalidInputError, match="2 values given, the export rewrites 3"):
        GAGParams(eta=(1.0, 2.0)).feed(shapes)
    for bad in ({"eta": (1.0, -1.0)}, {"scale": (1.0, 1000.0)}, {"scale_steps": (float("nan"),)}, {"eta_steps": (0.0,)}):
        with pytest.raises(InvalidInputError):
            GAGParams(**bad)
    with pytest.raises(InvalidInputError, match="3 values for 2"):
        GAGParams(scale_steps=(1.0, 2.0, 3.0)).check_steps(2)
    schedule = GAGParams(scale=(1.0, 2.0, 3.0), eta=9.0, scale_steps=(15.0,), eta_steps=(4.0, 5.0))
    assert [(p.scale, p.eta) for p in map(schedule.at_step, range(3))] == [(15.0, 4.0), (15.0, 5.0), (15.0, 5.0)]


@pytest.fixture(scope="module")
def graphs_copy(tmp_path_factory):
    """A copy of the tiny-sdxl export whose manifest the tests may rewrite (the shared one stays as is)."""
    root = tmp_path_factory.mktemp("defaults")
    shutil.copytree(exported("sdxl", shared_root(tmp_path_factory)).graphs_dir, root / "tiny-sdxl")
    return root


def test_manifest_defaults_are_applied_checked_and_used(graphs_copy):
    graphs = graphs_copy / "tiny-sdxl"
    layers = len(Manifest.load(graphs).gag_layer_names)
    before = {n: c["sha256"] for n, c in Manifest.load(graphs).components.items()}
    eta = [0.5 + i for i in range(layers)]
    apply_gag_defaults(graphs, eta=eta, scale=6.0, source="calibrate cal.json")
    manifest = Manifest.load(graphs)
    assert manifest.gag_defaults == {"scale": 6.0, "eta": tuple(eta)}
    assert manifest.data["gag"]["defaults"]["source"] == "calibrate cal.json"
    assert {n: c["sha256"] for n, c in manifest.components.items()} == before
    text = manifest.path.read_text()
    for bad in ({"eta": eta[:-1]}, {"eta": [-1.0] * layers}, {"scale": 101.0}):
        with pytest.raises(InvalidInputError):
            apply_gag_defaults(graphs, source="test", **bad)
    assert manifest.path.read_text() == text  # nothing half-written
    hand_edited = json.loads(text)
    hand_edited["gag"]["defaults"]["eta"] = [1.0]
    (graphs_copy / "edited").mkdir()
    (graphs_copy / "edited" / "manifest.json").write_text(json.dumps(hand_edited))
    with pytest.raises(ArtifactError, match="gag.defaults.eta"):
        Manifest.load(graphs_copy / "edited")

    with Sampler.load("tiny-sdxl", "ort", graphs=graphs_copy, options=ONE_THREAD) as sampler:
        params = sampler.gag_params()
        assert (params.scale, params.eta) == (6.0, tuple(eta))
        assert sampler.gag_params(eta=3.0).eta == 3.0
        fed = []
        predict = sampler.family.predict
        sampler.family.predict = lambda latents, t, cond, gag: fed.append(gag) or predict(latents, t, cond, gag)
        request = GenerationConfig(PROMPT, steps=2, gag=dataclasses.replace(params, scale_steps=(15.0,)))
        first = sampler.generate(request)
        scheduled = sampler.generate(dataclasses.replace(request, gag=GAGParams(
            scale=6.0, eta=tuple(eta), scale_steps=(15.0, 6.0))))
        plain = sampler.generate(dataclasses.replace(request, gag=params))
    # the schedule changes only the steps it names: (15,) holds at every step, (15, 6) at the first only
    assert [float(g["gag_scale"][0]) for g in fed] == [15.0, 15.0, 15.0, 6.0, 6.0, 6.0]
    assert all(g["gag_eta"].tolist() == eta for g in fed)
    assert json.loads(scheduled.metadata["gag_scale_steps"]) == [15.0, 6.0]
    assert json.loads(plain.metadata["gag_eta"]) == eta
    assert not np.array_equal(first.latents, plain.latents) and not np.array_equal(scheduled.latents, plain.latents)


@pytest.mark.parametrize("args, message", [
    (["--gag-scale-steps", "15,abc"], "--gag-scale-steps"),
    (["--gag-eta-steps", "5,-1"], "eta_steps[1]"),
    (["--gag-scale-steps", "15,10,5,5,5"], "5 values for"),
    (["--gag-eta", "5,abc"], "--gag-eta"),
])
def test_generate_refuses_bad_schedules(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", "x", "--steps", "2", "--no-build",
                                      "--graphs", str(tmp_path), "--out", str(tmp_path / "x.png"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and not (tmp_path / "x.png").exists()


def test_generate_takes_one_value_per_layer(graphs_copy, tmp_path):
    layers = len(Manifest.load(graphs_copy / "tiny-sdxl").gag_layer_names)
    eta = [str(2.0 + i) for i in range(layers)]
    args = ["generate", "--model", "tiny-sdxl", "--prompt", PROMPT, "--steps", "1", "--no-build", "--threads", "1",
            "--graphs", str(graphs_copy)]
    result = CliRunner().invoke(cli, [*args, "--gag-eta", ",".join(eta), "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(tmp_path / "a.png").text["gag_eta"]) == [float(e) for e in eta]
    result = CliRunner().invoke(cli, [*args, "--gag-eta", ",".join(eta[:-1]), "--out", str(tmp_path / "b.png")])
    assert result.exit_code == 2 and f"{layers - 1} values given" in result.output, result.output
    assert not (tmp_path / "b.png").exists()


def test_served_requests_take_per_layer_values_and_schedules(graphs_copy):
    from gag_export.serving.model_configs import client_defaults, request_inputs
    from gag_export.serving.requests import RequestLimits, parse_request

    inputs = {i["name"]: i for i in request_inputs(gag=True)}
    assert inputs["gag_eta"]["dims"] == [-1] and inputs["gag_zeta"]["dims"] == [1]
    assert inputs["gag_scale_steps"]["optional"] and "gag_scale_steps" not in {i["name"] for i in request_inputs(gag=False)}
    limits = RequestLimits.for_entry(get_entry("tiny-sdxl"))
    base = {"prompt": np.array([b"x"], dtype=object), "seed": np.array([1]), "steps": np.array([2], dtype=np.int32),
            "gag_scale": np.array([5.0], np.float32), "gag_eta": np.array([1.0, 2.0, 3.0], np.float32),
            "gag_zeta": np.array([0.0], np.float32)}
    request = parse_request(dict(base, gag_scale_steps=np.array([15.0], np.float32)), limits, gag=True)
    assert (request.gag.scale, request.gag.eta, request.gag.scale_steps) == (5.0, (1.0, 2.0, 3.0), (15.0,))
    for bad, message in ((dict(base, gag_eta=np.array([1.0, -2.0], np.float32)), r"gag_eta\[1\]"),
                         (dict(base, gag_scale_steps=np.array([15.0, 500.0], np.float32)), r"gag_scale_steps\[1\]")):
        with pytest.raises(InvalidInputError, match=message):
            parse_request(bad, limits, gag=True)
    with pytest.raises(InvalidInputError, match="without GAG"):
        parse_request({k: v for k, v in base.items() if not k.startswith("gag")} | {"gag_eta_steps": np.ones(1)},
                      limits, gag=False)
    apply_gag_defaults(graphs_copy / "tiny-sdxl", eta=[2.0] * len(Manifest.load(graphs_copy / "tiny-sdxl").gag_layer_names),
                       source="test")
    defaults = client_defaults(Manifest.load(graphs_copy / "tiny-sdxl"), get_entry("tiny-sdxl"))
    assert json.loads(defaults["default_gag_eta"]) == [2.0] * len(Manifest.load(graphs_copy / "tiny-sdxl").gag_layer_names)
