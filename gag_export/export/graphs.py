"""Exported graphs on disk: read back without weights, their I/O, the repairs applied after export, slimming.

Works on ONNX `ModelProto`s (onnx imported on use); never on torch modules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ..artifacts.manifest import data_path, dtype_name

log = logging.getLogger(__name__)

LARGE_WEIGHTS_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole file

_FLOAT_RANK = {10: 1, 16: 1, 1: 2, 11: 3}  # fp16/bf16 < fp32 < fp64 (torch's promotion of float types)


def _value_info_spec(vi) -> dict:
    tt = vi.type.tensor_type
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return {"name": vi.name, "dtype": dtype_name(tt.elem_type), "shape": dims}


def graph_io(model) -> tuple[list[dict], list[dict]]:
    """Inputs (initializers excluded) and outputs of a ModelProto as manifest entries."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_value_info_spec(vi) for vi in model.graph.input if vi.name not in inits]
    outputs = [_value_info_spec(vi) for vi in model.graph.output]
    return inputs, outputs


def load_graph_structure(onnx_path: Path):
    """The graph without its weights (cheap even for a 10 GB UNet)."""
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def _tensor_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def promote_concat_inputs(model) -> int:
    """Insert the `Cast`s torch's type promotion implies in front of mixed-float `Concat`s.

    `aten.cat` promotes (fp16 + fp32 -> fp32); the dynamo exporter emits a plain `Concat`, which
    ONNX rejects. Returns how many casts were inserted (the model is edited in place).
    """
    from onnx import helper

    types = _tensor_types(model)
    added, nodes = 0, []
    for node in model.graph.node:
        if node.op_type == "Concat":
            kinds = [types.get(i) for i in node.input]
            floats = [k for k in kinds if k in _FLOAT_RANK]
            if len(set(floats)) > 1:
                top = max(floats, key=lambda k: _FLOAT_RANK[k])
                if _FLOAT_RANK[top] == 1:  # fp16 with bf16: torch promotes to fp32
                    top = 1
                for j, (name, kind) in enumerate(zip(list(node.input), kinds)):
                    if kind != top:
                        cast_out = f"{name}__promoted_{node.name or 'concat'}_{j}"
                        nodes.append(helper.make_node("Cast", [name], [cast_out], to=top, name=f"{node.name}_promote_{j}"))
                        node.input[j] = cast_out
                        added += 1
        nodes.append(node)
    if added:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return added


def name_output_dims(model, output_specs) -> int:
    """Give symbolic output dims the descriptor's names; return how many were renamed.

    The exporter names an output dim by the expression it derived, e.g. the UNet's
    `2*(((latent_height - 1)//2)) + 2` (it cannot know that the height is even); for every shape
    the descriptor accepts (`dim_values` enforces the pixel multiple) that is `latent_height`.
    Only dims that are symbolic in the graph and declared symbolic are renamed.
    """
    renamed = 0
    for vi, spec in zip(model.graph.output, output_specs):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            continue
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str) and not dim.HasField("dim_value") and dim.dim_param != want:
                log.debug("output %s: dim %r named %r", vi.name, dim.dim_param, want)
                dim.dim_param = want
                renamed += 1
    return renamed


def save_graph(model, onnx_path: Path, external: bool) -> None:
    """Save a ModelProto, weights to `model.onnx.data` when `external`."""
    import onnx

    if external:
        onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path(onnx_path).name, size_threshold=1024)
    else:
        onnx.save_model(model, str(onnx_path))


def slim_graph(onnx_path: Path, dest: Path) -> tuple[int, int]:
    """onnxslim `onnx_path` into `dest` (same external-data layout); return (nodes before, after)."""
    import onnxslim

    before = len(load_graph_structure(onnx_path).graph.node)
    slimmed = onnxslim.slim(str(onnx_path))
    save_graph(slimmed, dest, external=data_path(onnx_path).exists())
    return before, len(slimmed.graph.node)


def node_module(node) -> str | None:
    """The module path a node was traced in: dynamo's name scopes, or a legacy `/a/b/Op` name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = json.loads(prop.value.replace("'", '"'))
            except ValueError:
                return None
            return scopes[-2] if len(scopes) >= 2 else None  # the last scope is the op itself
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1]) or None
    return None


def in_modules(module: str | None, names: Iterable[str]) -> bool:
    """Whether a traced module path is one of `names` (module names relative to the denoiser;
    the graph's scopes carry the export wrapper's prefix, e.g. `model.`)."""
    if not module:
        return False
    return any(module == n or module.endswith("." + n) for n in names)


__all__ = ["LARGE_WEIGHTS_BYTES", "in_modules", "node_module", "graph_io", "load_graph_structure", "name_output_dims", "promote_concat_inputs",
           "save_graph", "slim_graph"]
