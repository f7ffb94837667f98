"""Reduced-precision graphs: GAG's arithmetic stays fp32, the model's heavy ops take the graph's type."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.precision import Precision
from ..export.graphs import in_modules, node_module
from .lint import tensor_types

# Ops that only move or reinterpret data: they keep their input's type, so the precision check
# looks at the arithmetic around them.
LAYOUT_OPS = frozenset({
    "Cast", "CastLike", "Reshape", "Transpose", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice",
    "Identity", "Constant", "ConstantOfShape", "Split", "Expand", "Flatten", "Size", "Range",
})

# Ops that cannot round: the result is an input's values with the sign changed or zeros put
# around them, exact in any float type, so a 16-bit one inside a GAG layer loses nothing (the
# rotary embedding's negation, joint attention's zero padding).
EXACT_OPS = frozenset({"Neg", "Abs", "Pad", "Tile"})

# Families whose GAG layers keep the model's own dense attention: joint attention (FLUX) reads the
# plain attention over [text; image] keys, computed as the unmodified model computes it (SDPA in
# the model's precision), and adds GAG's fp32 update for image queries x text keys to it. That
# update is scaled by the text keys' share of the softmax mass, which comes out of the same
# attention call and so carries the model's precision too (bf16: about 3 significant digits).
KEEPS_MODEL_ATTENTION = frozenset({"flux"})

_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})

PRECISION_OF = {"float32": Precision.FP32, "float16": Precision.FP16, "bfloat16": Precision.BF16}






def traced_from(node, aten_op: str) -> bool:
    """Whether the exporter made `node` from `torch.ops.aten.<aten_op>` (dynamo's fx_node record)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            return f"target=torch.ops.aten.{aten_op}." in prop.value
    return False


def precision_findings(model, reduced: str, gag_modules: Sequence[str],
                       keeps_model_attention: bool = False) -> tuple[list[str], str]:
    """(problems, summary): GAG attention arithmetic must be float32; Conv/MatMul/Gemm elsewhere `reduced`.

    Inside GAG layers, ops that cannot round (`EXACT_OPS`, layout ops) may be in any type. With
    `keeps_model_attention` (joint attention), the model's own scaled_dot_product_attention there
    is the unmodified model's computation and runs in `reduced` like the rest of the model.
    """
    types = tensor_types(model)
    problems, gag_ops, model_attention, heavy, heavy_reduced = [], 0, 0, 0, 0
    for node in model.graph.node:
        outs = [types.get(o) for o in node.output if o]
        float_outs = [t for t in outs if t in ("float32", "float16", "bfloat16")]
        if not float_outs:
            continue
        if gag_modules and in_modules(node_module(node), gag_modules):
            if node.op_type in LAYOUT_OPS or node.op_type in EXACT_OPS:
                continue
            if keeps_model_attention and traced_from(node, "scaled_dot_product_attention"):
                model_attention += 1
                continue
            gag_ops += 1
            if any(t != "float32" for t in float_outs):
                problems.append(f"GAG node {node.name} ({node.op_type}) computes in {float_outs[0]}, not float32")
        elif node.op_type in _HEAVY_OPS:
            heavy += 1
            if all(t == reduced for t in float_outs):
                heavy_reduced += 1
            else:
                problems.append(f"{node.op_type} node {node.name} computes in {float_outs[0]}, not {reduced}")
    if gag_modules and gag_ops == 0:
        problems.append("no GAG attention nodes found in the graph (name scopes missing?)")
    summary = f"{heavy_reduced}/{heavy} Conv/MatMul/Gemm nodes in {reduced}"
    if gag_modules:
        kept = f"; {model_attention} nodes of the model's own joint attention as the model computes it" if model_attention else ""
        summary = f"{gag_ops} GAG attention arithmetic nodes in float32{kept}; {summary} outside them"
    return problems, summary


__all__ = ["EXACT_OPS", "KEEPS_MODEL_ATTENTION", "LAYOUT_OPS", "PRECISION_OF", "in_modules", "node_module", "precision_findings",
           "traced_from"]
