"""The TensorRT lint: every node against the op table of TensorRT 10.x and 11.x (`trt_ops.py`),
and the limits a parser does not check (TopK's K, float64, constant axes). No GPU, no weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..artifacts.manifest import dtype_name
from . import trt_ops
from .report import TRT_VERSIONS, Finding

_REDUCE_OPS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare",
})

_BISECT_HINT = "export with GAGConfig(method='bisect') (no TopK), or use torch.topk with a Python-int k"


def tensor_types(model) -> dict[str, str]:
    """Tensor name -> numpy dtype name, from shape inference over the graph without its weights."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  (lint what can be typed; the shape-inference check reports the failure)
        inferred = model
    g = inferred.graph
    types = {vi.name: dtype_name(vi.type.tensor_type.elem_type)
             for vi in list(g.value_info) + list(g.input) + list(g.output) if vi.type.tensor_type.elem_type}
    types.update({t.name: dtype_name(t.data_type) for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = dtype_name(a.t.data_type)
    return types


class _Constants:
    """Values of tensors known at build time: initializers, Constant nodes, and simple chains of them."""

    _PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"})

    def __init__(self, model):
        from onnx import TensorProto, numpy_helper

        self._values: dict[str, np.ndarray | None] = {}
        self._known: set[str] = set()
        for t in model.graph.initializer:
            self._known.add(t.name)
            self._values[t.name] = None if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)
        self._producers = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self._known.add(node.output[0])
                value = next((a for a in node.attribute if a.name == "value"), None)
                self._values[node.output[0]] = numpy_helper.to_array(value.t) if value is not None else None

    def is_constant(self, name: str, depth: int = 8) -> bool:
        if name in self._known:
            return True
        node = self._producers.get(name)
        if node is None or depth == 0 or node.op_type not in self._PASS_THROUGH:
            return False
        return self.is_constant(node.input[0], depth - 1)

    def value(self, name: str, depth: int = 8) -> np.ndarray | None:
        if name in self._values:
            return self._values[name]
        node = self._producers.get(name)
        if node is None or depth == 0 or node.op_type not in self._PASS_THROUGH:
            return None
        return self.value(node.input[0], depth - 1)


def _main_type_input(node) -> str | None:
    if node.op_type == "Where":
        return node.input[1] if len(node.input) > 1 else None
    if node.op_type in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "EyeLike"):
        return node.output[0] if node.output else None
    return next((i for i in node.input if i), None)


def lint_graph(model, versions: Sequence[str] = TRT_VERSIONS, parsed_by: str | None = None) -> list[Finding]:
    """TensorRT-compatibility findings for a graph (structure only; no GPU, no weights needed).

    `parsed_by`: the builder ("TensorRT-RTX 1.7.1.116") whose real parser accepted the graph; the
    table's op and type verdicts that hold for every version in `versions` then become warnings
    (the real parser decides those), while differences between versions and the checks a parser
    does not make (TopK's K, float64, constant axes) stay as they are."""
    types = tensor_types(model)
    constants = _Constants(model)
    found: dict[tuple[str, str, str], dict] = {}

    def add(node_op: str, node_name: str, message: str, hint: str = "", version: str | None = None,
            severity: str = "error", parser_decides: bool = False) -> None:
        key = (node_name, node_op, message)
        slot = found.setdefault(key, {"hint": hint, "versions": [], "severity": severity, "parser_decides": parser_decides})
        for v in [version] if version else versions:
            if v not in slot["versions"]:
                slot["versions"].append(v)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    for v in versions:
        lo, hi, _ = trt_ops.SUPPORTED[v]
        if opset is not None and not lo <= opset <= hi:
            add("opset", "<model>", f"opset {opset} is outside TensorRT {v}.x's {lo}..{hi}",
                f"export with --opset {min(hi, 20)}", v)

    # tensors of a type TensorRT lacks: graph I/O, initializers, every typed intermediate
    producers = {out: node for node in model.graph.node for out in node.output}
    for name, kind in types.items():
        if kind in trt_ops.TENSOR_TYPES_REJECTED:
            node = producers.get(name)
            where = node.name if node is not None else name
            op = node.op_type if node is not None else ("initializer" if name not in {i.name for i in model.graph.input} else "input")
            add(op, where, f"tensor {name!r} is {kind}", trt_ops.TENSOR_TYPES_REJECTED[kind])

    for node in model.graph.node:
        name = node.name or (node.output[0] if node.output else "?")
        if node.domain not in ("", "ai.onnx"):
            add(node.op_type, name, f"custom-domain op {node.domain}::{node.op_type}",
                "TensorRT needs a plugin registered for it", parser_decides=True)
            continue
        for v in versions:
            table = trt_ops.SUPPORTED[v][2]
            if node.op_type not in table:
                reason = ("is marked unsupported in the operator list" if node.op_type in trt_ops.UNSUPPORTED
                          else "is not in the operator list")
                add(node.op_type, name, f"{node.op_type} {reason} of TensorRT's ONNX parser",
                    "rewrite the model code so that the exporter emits supported ops", v, parser_decides=True)
                continue
            main = _main_type_input(node)
            kind = types.get(main) if main else None
            if kind and kind not in table[node.op_type] and kind not in trt_ops.TENSOR_TYPES_REJECTED:
                add(node.op_type, name, f"{node.op_type} on {kind} is not supported "
                    f"(supported: {', '.join(table[node.op_type])})", "cast to a supported type before this op", v,
                    parser_decides=True)
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and dtype_name(to) in trt_ops.TENSOR_TYPES_REJECTED:
                add("Cast", name, f"casts to {dtype_name(to)}", trt_ops.TENSOR_TYPES_REJECTED[dtype_name(to)])
        if node.op_type == "TopK":
            k_name = node.input[1] if len(node.input) > 1 else ""
            if not constants.is_constant(k_name):
                add("TopK", name, "K is computed at run time; TensorRT needs K to be a build-time constant", _BISECT_HINT)
            else:
                k = constants.value(k_name)
                if k is not None and int(np.asarray(k).max()) > trt_ops.TOPK_MAX_K:
                    add("TopK", name, f"K = {int(np.asarray(k).max())} exceeds TensorRT's TopK limit of {trt_ops.TOPK_MAX_K}",
                        "use GAGConfig(method='bisect'): a sort over more keys than that (self-attention at "
                        "64x64 latents) cannot be a TensorRT TopK")
            if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
                add("TopK", name, "sorted=0 is not supported", "export with sorted outputs")
        if node.op_type == "CumSum" and len(node.input) > 1 and not constants.is_constant(node.input[1]):
            add("CumSum", name, "the axis is not a build-time constant", "use a Python-int dim")
        if node.op_type in _REDUCE_OPS and len(node.input) > 1 and node.input[1] and not constants.is_constant(node.input[1]):
            add(node.op_type, name, "axes are not an initializer", "use Python-int dims; onnxslim (--slim) "
                "folds computed constants", severity="warning")
    findings = []
    for (node, op, msg), slot in found.items():
        severity, hint = slot["severity"], slot["hint"]
        if parsed_by and slot["parser_decides"] and set(slot["versions"]) >= set(versions):
            severity, hint = "warning", f"the op table's verdict; {parsed_by}'s parser accepted this node"
        findings.append(Finding(op, node, msg, hint, tuple(slot["versions"]), severity))
    return findings


__all__ = ["lint_graph", "tensor_types"]
