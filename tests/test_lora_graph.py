"""The weight map recorded at export, and LoRA variants of an export (`gag-export lora`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import exported, pipeline, shared_root
from onnx import TensorProto, helper, numpy_helper

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
