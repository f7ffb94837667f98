"""The weight map recorded at export, and LoRA variants of an export (`gag-export lora`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import exported, pipeline, shared_root
from onnx import TensorProto, helper, numpy_helper

from gag_export.artifacts.manifest import Manifest
from gag_export.core.errors import ArtifactError, InvalidInputError
from gag_export.export.weight_map import WeightMap, load_weight_map, match_weights, parameter_digests

ATTENTION = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@pytest.fixture(scope="session")
def graphs_root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


def _graph_with(tmp_path: Path, initializers: dict[str, np.ndarray]) -> Path:
    """A graph that adds up every initializer's sum: each is used, none is folded."""
    nodes, sums = [], []
    for name, value in initializers.items():
        cast = f"{name}_f32"
        nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("ReduceSum", [cast], [f"{name}_sum"], keepdims=0))
        sums.append(f"{name}_sum")
    nodes.append(helper.make_node("Sum", sums, ["total"]))
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(v, name) for name, v in initializers.items()])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


class _Params(torch.nn.Module):
    def __init__(self, **tensors):
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def test_weight_map_finds_each_layout_and_refuses_what_it_cannot_place(tmp_path):
    gen = torch.Generator().manual_seed(0)
    module = _Params(linear=torch.randn(3, 5, generator=gen), conv=torch.randn(4, 2, 3, 3, generator=gen),
                     scale=torch.randn(6, generator=gen), norm=torch.randn(8, generator=gen).half(),
                     twin_a=torch.full((4,), 0.5) + torch.arange(4), twin_b=torch.full((4,), 0.5) + torch.arange(4),
                     folded=torch.randn(7, generator=gen), ones=torch.ones(9))
    p = dict(module.named_parameters())
    path = _graph_with(tmp_path, {
        "val_1": p["linear"].numpy().T.copy(),  # a Linear weight folded into a MatMul's transposed operand
        "conv": p["conv"].numpy(),  # kept by name
        "val_2": p["scale"].numpy().reshape(6, 1, 1),  # a GroupNorm scale broadcast to [C, 1, 1]
        "val_3": p["norm"].float().numpy(),  # an fp16 parameter upcast to fp32 (FLUX's RMSNorm)
        "merged": p["twin_a"].numpy(),  # two parameters with the same values: one initializer
        "val_4": p["folded"].numpy() * 2,  # folded into a computed constant
        "val_5": np.ones(9, np.float32),
    })
    params = match_weights(parameter_digests(module), path)
    targets = {name: [(t["initializer"], t["layout"], t["dtype"]) for t in entry.get("targets", [])]
               for name, entry in params.items()}
    assert targets["linear"] == [("val_1", "transpose", "float32")]
    assert targets["conv"] == [("conv", "identity", "float32")]
    assert targets["scale"] == [("val_2", "reshape", "float32")]
    assert targets["norm"] == [("val_3", "identity", "float32")] and params["norm"]["dtype"] == "float16"
    assert "merged it with 1 other" in params["twin_a"]["unplaceable"] and "twin_a" in params["twin_b"]["unplaceable"]
    assert "folded" in params["folded"]["unplaceable"]
    assert "all its elements are equal" in params["ones"]["unplaceable"]
    weight_map = WeightMap("unet", params)
    assert weight_map.shapes()["conv"] == (4, 2, 3, 3)
    placed = weight_map.place(["linear", "scale"])
    stored = numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer if i.name == "val_1"))
    target = placed["linear"][0]
    assert np.array_equal(target.from_graph(stored, (3, 5)), p["linear"].numpy())
    assert np.array_equal(target.to_graph(p["linear"].numpy(), stored.shape), stored)
    with pytest.raises(InvalidInputError, match="2 weight.*twin_a: the exporter merged.*nothing: no such parameter"):
        weight_map.place(["linear", "twin_a", "nothing"])


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_export_records_where_every_attention_projection_is(graphs_root, name):
    """The weight map of a real export places every attention projection (the usual LoRA targets),
    and each placed initializer holds exactly the parameter's value in its recorded layout."""
    manifest = exported(name, graphs_root)
    comp = next(n for n, c in manifest.components.items() if c["role"] == "denoiser")
    entry = manifest.components[comp]["weight_map"]
    weight_map = load_weight_map(manifest.graphs_dir, entry)
    module = getattr(pipeline(manifest.model), comp)
    assert set(weight_map.parameters) == {n for n, _ in module.named_parameters()}
    attention = [n for n in weight_map.parameters if n.endswith(ATTENTION)]
    assert attention and entry["placed"] >= len(attention)
    graph = onnx.load(str(manifest.graph_path(comp))).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = dict(module.named_parameters())
    for name, targets in weight_map.place(attention + [n for n, p in weight_map.parameters.items() if "targets" in p]).items():
        for target in targets:
            value = target.from_graph(stored[target.initializer], tuple(state[name].shape))
            assert np.array_equal(value, state[name].detach().numpy()), name


def test_weight_map_is_checked_against_the_manifest(graphs_root, tmp_path):
    manifest = exported("sdxl", graphs_root)
    entry = manifest.components["unet"]["weight_map"]
    (tmp_path / "unet").mkdir()
    text = (manifest.graphs_dir / entry["path"]).read_text()
    (tmp_path / entry["path"]).write_text(text.replace('"transpose"', '"identity"', 1))
    with pytest.raises(ArtifactError, match="does not match its manifest's sha256"):
        load_weight_map(tmp_path, entry)
    assert json.loads(text)["component"] == "unet"


# --------------------------------------------------------------------------- `gag-export lora`

RANK = 4


def write_lora(path: Path, denoiser, prefix: str, targets, seed: int) -> Path:
    """A random rank-RANK LoRA in diffusers/PEFT keys (`unet.<module>.lora_A.weight`, `lora_B`)."""
    from safetensors.torch import save_file

    modules = dict(denoiser.named_modules())
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for target in targets:
        linear = modules[target]
        state[f"{prefix}.{target}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=gen) * 0.1
        state[f"{prefix}.{target}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=gen) * 0.1
    save_file(state, str(path))
    return path


def _attention_modules(weight_map: WeightMap, limit: int) -> list[str]:
    return [n.removesuffix(".weight") for n in weight_map.parameters if n.endswith(ATTENTION)][:limit]


def _tree_digest(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _denoiser_outputs(manifest, feed) -> np.ndarray:
    from export_helpers import run, session

    comp = next(n for n, c in manifest.components.items() if c["role"] == "denoiser")
    return run(session(manifest.graph_path(comp)), feed)[0]


def _variant_against_fresh_export(original, variant, model: str, specs, weight_map, tmp_path):
    """ONNX Runtime outputs of the variant, of a fresh export of the denoiser with the LoRAs fused
    (the same fp32 deltas, added to the shared pipeline and taken out again) and of the original."""
    from export_helpers import BISECT

    from gag_export.export import ExportConfig, export_model
    from gag_export.export.parity import load_reference
    from gag_export.models import ImageShape, get_entry
    from gag_export.models.lora import add_deltas, lora_deltas, restore_parameters

    entry = get_entry(model)
    comp = next(n for n, c in original.components.items() if c["role"] == "denoiser")
    denoiser = getattr(pipeline(model), comp)
    saved = add_deltas(denoiser, lora_deltas(specs, entry.family, weight_map.shapes()), keep=True)
    try:
        fresh = export_model(pipeline(model), entry, ExportConfig(
            model, tmp_path / "fresh", ImageShape(entry.height, entry.width, 1), gag=BISECT, components=(comp,)))
    finally:
        restore_parameters(denoiser, saved)
    feed = load_reference(original.graphs_dir, original.components[comp]["parity_reference"]).feed
    return tuple(_denoiser_outputs(m, feed) for m in (variant, fresh, original))


def test_lora_variant_equals_a_fresh_export_with_the_lora(graphs_root, tmp_path):
    """Two LoRAs with scales: the variant written without tracing gives ONNX Runtime the outputs a
    fresh export of the fused UNet gives (fp32 rounding), passes `check`, and leaves the original
    byte-identical."""
    from click.testing import CliRunner

    from gag_export.cli import cli
    from gag_export.models.lora import LoraSpec

    original = exported("sdxl", graphs_root)
    before = _tree_digest(original.graphs_dir)
    unet = pipeline("tiny-sdxl").unet
    weight_map = load_weight_map(original.graphs_dir, original.components["unet"]["weight_map"])
    targets = _attention_modules(weight_map, 6)
    files = [write_lora(tmp_path / "a.safetensors", unet, "unet", targets[:4], 1),
             write_lora(tmp_path / "b.safetensors", unet, "unet", targets[2:], 2)]
    out = tmp_path / "variant"
    args = ["lora", str(original.graphs_dir), "--lora", f"{files[0]}:0.8", "--lora", f"{files[1]}:0.5", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert _tree_digest(original.graphs_dir) == before
    variant = Manifest.load(out / "tiny-sdxl")
    assert [r["scale"] for r in variant.data["loras"]] == [0.8, 0.5]
    assert variant.data["derived_from"]["manifest_sha256"] == hashlib.sha256(before["manifest.json"]).hexdigest()
    assert variant.components["unet"]["sha256"] != original.components["unet"]["sha256"]
    assert variant.components["vae_decoder"] == original.components["vae_decoder"]

    specs = [LoraSpec(files[0], 0.8), LoraSpec(files[1], 0.5)]
    got, want, base = _variant_against_fresh_export(original, variant, "tiny-sdxl", specs, weight_map, tmp_path)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(base - want).max() > 1e-3 * scale  # the LoRA changes the output

    # parity is what the comparison above did (a LoRA denoiser has no torch reference recorded)
    checked = CliRunner().invoke(cli, ["check", str(variant.graphs_dir), "--no-parity"])
    assert checked.exit_code == 0, checked.output


def test_lora_variant_of_flux_changes_only_what_the_lora_touches(graphs_root, tmp_path):
    original = exported("flux", graphs_root)
    before = _tree_digest(original.graphs_dir)
    weight_map = load_weight_map(original.graphs_dir, original.components["transformer"]["weight_map"])
    from gag_export.export.lora_variant import make_lora_variant
    from gag_export.models.lora import LoraSpec

    path = write_lora(tmp_path / "f.safetensors", pipeline("tiny-flux").transformer, "transformer",
                      _attention_modules(weight_map, 2), 3)
    variant = make_lora_variant(original.graphs_dir, tmp_path / "v", [LoraSpec(path)])
    assert _tree_digest(original.graphs_dir) == before
    old = {i.name: i.raw_data for i in onnx.load(str(original.graph_path("transformer"))).graph.initializer}
    new = {i.name: i.raw_data for i in onnx.load(str(variant.graph_path("transformer"))).graph.initializer}
    changed = {n for n in old if old[n] != new[n]}
    placed = weight_map.place([f"{m}.weight" for m in _attention_modules(weight_map, 2)])
    assert changed == {t.initializer for targets in placed.values() for t in targets}
    assert variant.data["derived_from"]["changed_initializers"] == len(changed)

    # and it runs as a fresh export of the fused transformer does, on ONNX Runtime
    got, want, base = _variant_against_fresh_export(original, variant, "tiny-flux", [LoraSpec(path)], weight_map,
                                                    tmp_path)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(base - want).max() > 1e-4 * scale  # the LoRA changes the output


def test_lora_variant_of_a_graph_with_external_data_patches_the_data_file(graphs_root, tmp_path, monkeypatch):
    """Full-size denoisers keep their weights in model.onnx.data: the variant clones that file and
    overwrites the changed tensors at their offsets; it runs as the variant of the same export with
    its weights inside the graph does, and every digest in its manifest holds."""
    import gag_export.export.convert as export_mod
    from export_helpers import BISECT

    from gag_export.artifacts.integrity import verify_graphs
    from gag_export.artifacts.manifest import data_path
    from gag_export.export import ExportConfig, export_model
    from gag_export.export.lora_variant import make_lora_variant
    from gag_export.export.parity import load_reference
    from gag_export.models import ImageShape, get_entry
    from gag_export.models.lora import LoraSpec

    inline = exported("sdxl", graphs_root)
    entry = get_entry("tiny-sdxl")
    monkeypatch.setattr(export_mod, "LARGE_WEIGHTS_BYTES", 0)  # as if it were a > 2 GB UNet
    external = export_model(pipeline("tiny-sdxl"), entry, ExportConfig(
        "tiny-sdxl", tmp_path / "external", ImageShape(entry.height, entry.width, 1), gag=BISECT, components=("unet",)))
    assert data_path(external.graph_path("unet")).exists()
    weight_map = load_weight_map(external.graphs_dir, external.components["unet"]["weight_map"])
    path = write_lora(tmp_path / "a.safetensors", pipeline("tiny-sdxl").unet, "unet", _attention_modules(weight_map, 6), 4)
    before = _tree_digest(external.graphs_dir)
    variant = make_lora_variant(external.graphs_dir, tmp_path / "v-external", [LoraSpec(path, 0.7)])
    reference = make_lora_variant(inline.graphs_dir, tmp_path / "v-inline", [LoraSpec(path, 0.7)])
    assert _tree_digest(external.graphs_dir) == before
    graph = variant.graph_path("unet")
    assert graph.read_bytes() == external.graph_path("unet").read_bytes()  # only the data file changed
    assert variant.components["unet"]["external_data"]["sha256"] != external.components["unet"]["external_data"]["sha256"]
    verify_graphs(variant)  # ArtifactError if a digest or size in the manifest were stale
    feed = load_reference(inline.graphs_dir, inline.components["unet"]["parity_reference"]).feed
    got, want = (_denoiser_outputs(m, feed) for m in (variant, reference))
    assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max())
    assert not np.array_equal(got, _denoiser_outputs(external, feed))


def test_lora_on_an_unplaceable_weight_is_refused_and_nothing_is_written(graphs_root, tmp_path):
    """A LoRA on a weight the map cannot place (here marked so in a copy of the export): exit 2 in
    one line, no output folder, no temp folder left."""
    import shutil

    from click.testing import CliRunner

    from gag_export.cli import cli

    original = exported("sdxl_nogag_unet", graphs_root)
    copy = tmp_path / "graphs"
    shutil.copytree(original.graphs_dir, copy / "tiny-sdxl")
    copy = copy / "tiny-sdxl"
    entry = original.components["unet"]["weight_map"]
    doc = json.loads((copy / entry["path"]).read_text())
    target = _attention_modules(WeightMap("unet", doc["parameters"]), 1)[0]
    param = doc["parameters"][f"{target}.weight"]
    param["unplaceable"] = "the exporter merged it (test)"
    del param["targets"]
    text = json.dumps(doc)
    (copy / entry["path"]).write_text(text)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["unet"]["weight_map"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lora = write_lora(tmp_path / "a.safetensors", pipeline("tiny-sdxl").unet, "unet", [target], 1)
    result = CliRunner().invoke(cli, ["lora", str(copy), "--lora", str(lora), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "cannot take in place" in result.output and target in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "graphs"]
    assert not (tmp_path / "out").exists()
    again = CliRunner().invoke(cli, ["lora", str(copy), "--lora", str(lora), "--out", str(copy.parent)])
    assert again.exit_code == 2 and "would replace the export" in again.output


# --------------------------------------------------------------------------- refittable engines

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx is not installed (`pip install \"gag-export[tensorrt-rtx]\"`)")


@needs_rtx
def test_refittable_engines_set_builder_flag_refit_and_have_their_own_cache_name(graphs_root):
    from gag_export.artifacts.engines import RuntimeTarget
    from gag_export.core.tensorrt import import_tensorrt, trt_features
    from gag_export.engine import EngineOptions, PolygraphyPlanBuilder, component_specs

    manifest = exported("sdxl_nogag_unet", graphs_root)
    caps = trt_features("tensorrt-rtx")
    target = RuntimeTarget.ahead_of_time(caps, "sm86")
    specs = {refit: component_specs(manifest.graphs_dir, manifest.data, EngineOptions(
        backend="tensorrt-rtx", refittable=refit), caps)[0] for refit in (False, True)}
    assert specs[True].builder_flags()["refittable"] is True and "refittable" not in specs[False].builder_flags()
    assert specs[True].filename(target) != specs[False].filename(target)
    trt = import_tensorrt("tensorrt-rtx")
    for refit, spec in specs.items():
        plan_builder = PolygraphyPlanBuilder(caps, target)
        builder, network, _parser = plan_builder.network(spec)()
        config = plan_builder.config(spec, None)(builder, network)
        assert config.get_flag(trt.BuilderFlag.REFIT) is refit


def _fake_engine(folder: Path, sha: str, refittable: bool, name: str) -> Path:
    from gag_export.artifacts.engines import Sidecar, sidecar_path

    plan = folder / f"{sha[:12]}-rtx1.7.1.116-sm86-fp32-{name}.plan"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"plan")
    sidecar = Sidecar(model="tiny-sdxl", component="unet", graphs_dir="g", onnx_path="g/unet/model.onnx",
                      onnx_sha256=sha, engine_sha256=hashlib.sha256(b"plan").hexdigest(), engine_size_bytes=4,
                      tensorrt_version="1.7.1.116", gpu_name="", compute_capability=(8, 6), precision="fp32",
                      profile={}, builder_flags={"refittable": True} if refittable else {}, build_seconds=1.0,
                      built_at="now", flavor="tensorrt-rtx", targets=((8, 6),))
    sidecar_path(plan).write_text(sidecar.to_json())
    return plan


def test_the_engine_cache_tells_a_refit_copy_from_its_original(graphs_root, tmp_path):
    """Only refittable engines of the original graph are refit; the copy is named after the variant's
    graph and its sidecar records the LoRAs and the engine it was refit from."""
    from gag_export.artifacts.engines import Sidecar, read_sidecar
    from gag_export.engine.refit import refit_path, refit_sidecar, refittable_engines

    original = exported("sdxl_nogag_unet", graphs_root)
    sha = original.components["unet"]["sha256"]
    folder = tmp_path / "engines" / "tiny-sdxl" / "unet"
    refittable = _fake_engine(folder, sha, True, "aaaaaaaaaa")
    _fake_engine(folder, sha, False, "bbbbbbbbbb")
    _fake_engine(folder, "f" * 64, True, "cccccccccc")  # another graph's
    assert refittable_engines(tmp_path / "engines", original, "unet") == [refittable]

    data = json.loads(json.dumps(original.data))
    data["components"]["unet"]["sha256"] = "e" * 64
    data["loras"] = [{"name": "a.safetensors", "sha256": "1" * 64, "scale": 0.8}]
    variant = Manifest(tmp_path / "variant" / "tiny-sdxl", data)
    dest = refit_path(refittable, variant, "unet")
    assert dest.parent == folder and dest.name == refittable.name.replace(sha[:12], "e" * 12)
    copy = Sidecar.from_json(refit_sidecar(read_sidecar(refittable), variant, "unet", b"refit", 0.5).to_json())
    assert copy.onnx_sha256 == "e" * 64 and copy.loras == tuple(data["loras"])
    assert copy.refit_from == hashlib.sha256(b"plan").hexdigest() != copy.engine_sha256
    assert read_sidecar(refittable).loras == () and read_sidecar(refittable).refit_from is None


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_refit_engine_runs_the_variant_weights(graphs_root, tmp_path):
    """Refitting deserializes the engine: it needs the GPU the engine runs on (TensorRT, or an RTX GPU
    for TensorRT-RTX), so here it is skipped. Build a refittable engine of the original, make a
    variant, refit: the refit copy is found for the variant's graph and records its LoRAs."""
    from gag_export.core.gpu import detect_gpu

    if detect_gpu(0) is None:
        pytest.skip("refitting deserializes the engine: needs an NVIDIA GPU")
    from gag_export.engine import EngineOptions, build
    from gag_export.engine.refit import refit_engines
    from gag_export.export.lora_variant import make_lora_variant
    from gag_export.models.lora import LoraSpec

    original = exported("sdxl_nogag_unet", graphs_root)
    backend = "tensorrt" if importlib.util.find_spec("tensorrt") else "tensorrt-rtx"
    records = build(original.graphs_dir, tmp_path / "engines", EngineOptions(backend=backend, refittable=True))
    weight_map = load_weight_map(original.graphs_dir, original.components["unet"]["weight_map"])
    lora = write_lora(tmp_path / "a.safetensors", pipeline("tiny-sdxl").unet, "unet", _attention_modules(weight_map, 2), 1)
    variant = make_lora_variant(original.graphs_dir, tmp_path / "v", [LoraSpec(lora)])
    refits = refit_engines(tmp_path / "engines", original, variant, "unet")
    assert len(refits) == 1 and refits[0].source == records[0].path and refits[0].path.is_file()
