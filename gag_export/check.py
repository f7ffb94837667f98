"""Checks of exported graphs: artifacts, ONNX checker, shape inference, TensorRT lint, parity.

Layer 5. Reads `graphs/<model>/manifest.json` (written by `export.py`) and the graphs it lists.

    report = check_graphs(Path("graphs/tiny-sdxl"))          # parity reloads the pipeline
    print(report.summary())
    report.raise_for_failures()                             # CheckFailedError (exit 4)

A missing manifest, a missing/truncated/corrupt graph, a missing external data file or a graph
whose sha256 differs from the manifest is not a failed check but a bad artifact: it raises
`ArtifactError` (exit 5) with one line, before anything else runs. Everything else becomes a
`CheckResult` per component and check; results are truthy when passed or skipped, like
polygraphy's comparison results, and so is the `CheckReport` when all of them are.

Checks per component:
- `artifact`: files, external data, sha256 (`export.graph_sha256`), raising as above;
- `onnx_checker`: `onnx.checker.check_model` by path (external data is fine);
- `shape_inference`: `onnx.shape_inference.infer_shapes_path(..., strict_mode=True)`;
- `control_flow`: no Loop/If/Scan in the denoiser (the guidance must be static ops);
- `tensorrt_lint`: every node against TensorRT 10.x and 11.x (`trt_ops.py`): op and opset
  supported, tensor types supported by the op, TopK with a constant K <= 3840, no float64
  anywhere, constant CumSum/Reduce axes; one finding per node with a hint. Where a real parser
  accepted the graph (`trt_parser`), the table's op and type verdicts that hold for every
  version it knows give way to it (reported as warnings): the table then speaks only for the
  differences between versions and for what a parser does not decide (TopK's K, float64, axes);
- `trt_parser`: the graph through the real ONNX parser of TensorRT, else TensorRT-RTX (whichever
  imports here; `parser=`), into a strongly typed network: a refused node fails the check with
  its name, op type and the parser's message; skipped, saying how to get one, where neither is;
- `precision` (fp16/bf16 graphs): the GAG attention arithmetic computes in float32 (ops that
  cannot round, like negation and zero padding, may keep the model's type, and so may joint
  attention's own dense attention, which is the unmodified model's), the other Conv/MatMul/Gemm
  nodes in the graph's reduced type;
- `parity`: ONNX Runtime (CPU) vs torch eager on the descriptor's sample inputs, through
  polygraphy's comparator, against the manifest's tolerance (skipped for bf16: ONNX Runtime's
  CPU provider has no bfloat16 Conv/MatMul kernels).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import trt_ops
from .attention import apply_gag, remove_gag
from .core.errors import ArtifactError, CheckFailedError, InvalidInputError
from .core.names import GAG_INPUTS
from .export import (
    Manifest,
    denoiser_module,
    dtype_name,
    graph_sha256,
    load_graph_structure,
    sample_feed,
)
from .models import Precision
from .parity import OutputParity, ParityError, compare_with_reference, compare_with_torch, load_reference

log = logging.getLogger(__name__)

CHECKS = ("artifact", "onnx_checker", "shape_inference", "control_flow", "tensorrt_lint", "trt_parser", "precision", "parity")
PARSERS = ("auto", "tensorrt", "tensorrt-rtx", "none")  # which real ONNX parser `trt_parser` uses
CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})
TRT_VERSIONS = ("10", "11")
# Ops that only move or reinterpret data: they keep their input's type, so the precision check
# looks at the arithmetic around them.
_LAYOUT_OPS = frozenset({
    "Cast", "CastLike", "Reshape", "Transpose", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice",
    "Identity", "Constant", "ConstantOfShape", "Split", "Expand", "Flatten", "Size", "Range",
})
# Ops that cannot round: the result is an input's values with the sign changed or zeros put
# around them, exact in any float type, so a 16-bit one inside a GAG layer loses nothing (the
# rotary embedding's negation, joint attention's zero padding).
_EXACT_OPS = frozenset({"Neg", "Abs", "Pad", "Tile"})
# Families whose GAG layers keep the model's own dense attention: joint attention (FLUX) reads the
# plain attention over [text; image] keys, computed as the unmodified model computes it (SDPA in
# the model's precision), and adds GAG's fp32 update for image queries x text keys to it. That
# update is scaled by the text keys' share of the softmax mass, which comes out of the same
# attention call and so carries the model's precision too (bf16: about 3 significant digits).
KEEPS_MODEL_ATTENTION = frozenset({"flux"})
_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_PRECISION_OF = {"float32": Precision.FP32, "float16": Precision.FP16, "bfloat16": Precision.BF16}
_REDUCE_OPS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare",
})


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One lint problem at one node: what, where, for which TensorRT versions, and what to do."""

    op: str
    node: str
    message: str
    hint: str = ""
    versions: tuple[str, ...] = TRT_VERSIONS
    severity: str = "error"  # "error" fails the lint; "warning" is reported only

    def __str__(self) -> str:
        trt = "/".join(f"{v}.x" for v in self.versions)
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"[TensorRT {trt}] {self.op} node {self.node!r}: {self.message}{hint}"


@dataclass(frozen=True)
class CheckResult:
    """One check of one component: status "passed" | "failed" | "skipped", and why."""

    component: str
    check: str
    status: str
    details: str = ""
    findings: tuple[Finding, ...] = ()
    parity: tuple[OutputParity, ...] = ()

    def __bool__(self) -> bool:
        return self.status != "failed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class CheckReport:
    """All results for one graphs folder; truthy when nothing failed."""

    graphs_dir: Path
    model: str
    results: list[CheckResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(self.results)

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r]

    def get(self, component: str, check: str) -> CheckResult | None:
        return next((r for r in self.results if r.component == component and r.check == check), None)

    def summary(self) -> str:
        lines = [f"{self.model} ({self.graphs_dir}): "
                 + ("all checks passed" if self else f"{len(self.failures())} check(s) failed")]
        for r in self.results:
            lines.append(f"  {r.component:16} {r.check:16} {r.status.upper():8} {r.details}")
            for finding in r.findings:
                lines.append(f"      {finding}")
            for p in r.parity:
                lines.append(f"      {p}")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """`CheckFailedError` (exit 4) naming every failed check, if any failed."""
        if not self:
            failed = ", ".join(f"{r.component}/{r.check}" for r in self.failures())
            raise CheckFailedError(f"{self.graphs_dir}: failed checks: {failed}\n{self.summary()}")


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------


def _external_locations(model) -> dict[str, int]:
    """{location: bytes needed} over the initializers stored as external data."""
    from onnx import TensorProto

    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            needed[info["location"]] = max(needed.get(info["location"], 0), end)
    return needed


def verify_artifact(manifest: Manifest, component: str):
    """The component's graph structure (no weights), after checking files and digests.

    Raises `ArtifactError` with one line for a missing, truncated or corrupt graph, a missing or
    short external data file, or a sha256 that differs from the manifest.
    """
    from google.protobuf.message import DecodeError

    entry = manifest.components[component]
    path = manifest.graph_path(component)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (listed in {manifest.path}): re-export the model")
    try:
        model = load_graph_structure(path)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"{path} is corrupt or truncated (cannot be parsed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                            "re-export the model") from None
    if not len(model.graph.node):
        raise ArtifactError(f"{path} is corrupt or truncated (it has no nodes): re-export the model")
    for location, needed in _external_locations(model).items():
        data = path.parent / location
        if not data.is_file():
            raise ArtifactError(f"{path}: its external data file {data} is missing: copy it beside the graph or re-export")
        if data.stat().st_size < needed:
            raise ArtifactError(f"{path}: its external data file {data} is truncated "
                                f"({data.stat().st_size} bytes, the graph needs {needed}): re-export the model")
    actual = graph_sha256(path)
    if actual != entry["sha256"]:
        raise ArtifactError(f"{path} does not match {manifest.path}: sha256 {actual[:12]}... but the manifest says "
                            f"{str(entry['sha256'])[:12]}...; the graph changed after export, re-export the model")
    return model


# --------------------------------------------------------------------------------------------
# ONNX checker, shape inference, control flow
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_onnx_checker(path: Path) -> tuple[bool, str]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001  (onnx raises ValidationError, InferenceError, RuntimeError...)
        return False, _first_line(exc)
    return True, "onnx.checker.check_model passed"


def run_shape_inference(path: Path) -> tuple[bool, str]:
    import onnx

    with tempfile.TemporaryDirectory(prefix="gag-shape-inference-") as scratch:
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(scratch) / "inferred.onnx"), strict_mode=True)
        except Exception as exc:  # noqa: BLE001  (a failed check, reported with its first line)
            return False, _first_line(exc)
    return True, "infer_shapes_path (strict) passed"


def control_flow_nodes(model) -> list[str]:
    """Names of Loop/If/Scan nodes in the graph and its local functions."""
    found = [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in CONTROL_FLOW_OPS]
    for fn in model.functions:
        found += [f"{n.op_type}:{fn.name}/{n.name}" for n in fn.node if n.op_type in CONTROL_FLOW_OPS]
    return found


# --------------------------------------------------------------------------------------------
# TensorRT lint
# --------------------------------------------------------------------------------------------


def _tensor_types(model) -> dict[str, str]:
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


_BISECT_HINT = "export with GAGConfig(method='bisect') (no TopK), or use torch.topk with a Python-int k"


def lint_graph(model, versions: Sequence[str] = TRT_VERSIONS, parsed_by: str | None = None) -> list[Finding]:
    """TensorRT-compatibility findings for a graph (structure only; no GPU, no weights needed).

    `parsed_by`: the builder ("TensorRT-RTX 1.7.1.116") whose real parser accepted the graph; the
    table's op and type verdicts that hold for every version in `versions` then become warnings
    (the real parser decides those), while differences between versions and the checks a parser
    does not make (TopK's K, float64, constant axes) stay as they are."""
    types = _tensor_types(model)
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


# --------------------------------------------------------------------------------------------
# The real parser
# --------------------------------------------------------------------------------------------


def _parse(path: Path, parser: str, notify, component: str) -> tuple[CheckResult | None, str | None]:
    """The `trt_parser` result of one graph (None when asked for no parser), and the builder whose
    parser accepted it (None unless it did)."""
    if parser == "none":
        return None, None
    from .engine import parse_onnx  # noqa: PLC0415
    from .trt_flavors import TENSORRT_RTX, get_flavor, installed_flavor  # noqa: PLC0415

    flavor = installed_flavor() if parser == "auto" else get_flavor(parser)
    if flavor is None:
        return CheckResult(component, "trt_parser", "skipped",
                           f"neither TensorRT nor TensorRT-RTX is installed (`{TENSORRT_RTX.install}` runs its "
                           "real parser on any machine); the lint's op table stands in"), None
    notify(component, "trt_parser")
    parsed = parse_onnx(path, flavor)
    label = parsed.caps.label
    if parsed.ok:
        return CheckResult(component, "trt_parser", "passed", f"{label}: parsed into {parsed.num_layers} network layers"), label
    errors = [str(e) for e in parsed.errors]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return CheckResult(component, "trt_parser", "failed",
                       f"{label}'s ONNX parser refused {'; '.join(errors[:5])}{more}"), None


# --------------------------------------------------------------------------------------------
# Precision of reduced-precision graphs
# --------------------------------------------------------------------------------------------


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


def traced_from(node, aten_op: str) -> bool:
    """Whether the exporter made `node` from `torch.ops.aten.<aten_op>` (dynamo's fx_node record)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            return f"target=torch.ops.aten.{aten_op}." in prop.value
    return False


def precision_findings(model, reduced: str, gag_modules: Sequence[str],
                       keeps_model_attention: bool = False) -> tuple[list[str], str]:
    """(problems, summary): GAG attention arithmetic must be float32; Conv/MatMul/Gemm elsewhere `reduced`.

    Inside GAG layers, ops that cannot round (`_EXACT_OPS`, layout ops) may be in any type. With
    `keeps_model_attention` (joint attention), the model's own scaled_dot_product_attention there
    is the unmodified model's computation and runs in `reduced` like the rest of the model.
    """
    types = _tensor_types(model)
    problems, gag_ops, model_attention, heavy, heavy_reduced = [], 0, 0, 0, 0
    for node in model.graph.node:
        outs = [types.get(o) for o in node.output if o]
        float_outs = [t for t in outs if t in ("float32", "float16", "bfloat16")]
        if not float_outs:
            continue
        if gag_modules and in_modules(node_module(node), gag_modules):
            if node.op_type in _LAYOUT_OPS or node.op_type in _EXACT_OPS:
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


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def _reference_pipeline(manifest: Manifest):
    """The torch pipeline the graphs were exported from, loaded again through the registry
    (tiny and random weights are seeded, so this gives the same weights as at export)."""
    from .models import load_pipeline, manifest_entry

    entry = manifest_entry(manifest.data)
    return entry, load_pipeline(entry, weights=manifest.data.get("weights"), components=list(manifest.components))


def _needs_torch(manifest: Manifest, seed: int) -> list[str]:
    """The components whose parity needs the torch pipeline: no reference recorded for this seed (bf16 ones never run)."""
    return [name for name, comp in manifest.components.items()
            if _component_precision(comp) is not Precision.BF16
            and (comp.get("parity_reference") or {}).get("seed", None) != seed]


def _component_precision(entry) -> Precision:
    floats = [o["dtype"] for o in entry["outputs"] if o["dtype"] in _PRECISION_OF]
    return _PRECISION_OF[floats[0]] if floats else Precision.FP32  # the component's own precision


_BF16_SKIP = "ONNX Runtime's CPU provider has no bfloat16 Conv/MatMul kernels; check on a GPU (TensorRT)"


def _parity_result(component: str, precision: Precision, run, source: str) -> CheckResult:
    try:
        results = run()
    except ParityError as exc:
        return CheckResult(component, "parity", "failed", str(exc))
    status = "passed" if all(results) else "failed"
    worst = max(results, key=lambda r: r.max_abs)
    graph = "" if precision is Precision.FP32 else f", {precision.value} graph"
    return CheckResult(component, "parity", status,
                       f"ORT vs {source}{graph}: max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} "
                       f"(atol {worst.atol:g}, rtol {worst.rtol:g})", parity=tuple(results))


def _recorded_parity(manifest: Manifest, component: str, reference_entry) -> CheckResult:
    entry = manifest.components[component]
    precision = _component_precision(entry)
    reference = load_reference(manifest.graphs_dir, reference_entry)  # ArtifactError when damaged
    return _parity_result(component, precision,
                          lambda: compare_with_reference(manifest.graph_path(component), reference, entry["tolerance"]),
                          f"{reference.source} (recorded at export)")


def _parity(manifest: Manifest, component: str, descriptor, reference_pipe, seed: int) -> CheckResult:
    entry = manifest.components[component]
    precision = _component_precision(entry)
    gag = any(i["name"] in GAG_INPUTS for i in entry["inputs"])
    feed = sample_feed(descriptor, manifest.shape(), precision, seed, gag)
    outputs = [o["name"] for o in entry["outputs"]]
    module = descriptor.export_module(reference_pipe)
    return _parity_result(component, precision,
                          lambda: compare_with_torch(manifest.graph_path(component), module, feed, outputs, entry["tolerance"]),
                          "torch fp32 eager")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def check_graphs(graphs_dir: Path, parity: bool = True, *, pipe=None, entry=None, seed: int = 0,
                 trt_versions: Sequence[str] = TRT_VERSIONS, parser: str = "auto",
                 progress: Callable[[str, str], None] | None = None) -> CheckReport:
    """Run every check on `graphs_dir` (graphs/<model>); return the report (falsy if any failed).

    `parser`: the real ONNX parser of `trt_parser` ("auto": TensorRT, else TensorRT-RTX, whichever
    imports; "none" skips it). A parser named but not installed is `MissingDependencyError`.

    `pipe`/`entry`: the torch pipeline and registry entry the graphs came from (export passes
    them); otherwise parity loads the pipeline again through the registry from the manifest's
    model and weights. Raises `ArtifactError` for missing or damaged artifacts (see module doc).
    """
    if parser not in PARSERS:
        raise InvalidInputError(f"parser: use one of {', '.join(PARSERS)}, got {parser!r}")
    if parser not in ("auto", "none"):
        from .trt_flavors import get_flavor  # noqa: PLC0415

        get_flavor(parser).import_module()  # MissingDependencyError (exit 3) before any work
    manifest = Manifest.load(Path(graphs_dir))
    unknown = [v for v in trt_versions if v not in trt_ops.SUPPORTED]
    if unknown:
        raise InvalidInputError(f"unknown TensorRT version(s) {unknown}; the lint knows {list(trt_ops.SUPPORTED)}")
    notify = progress or (lambda component, check: None)
    report = CheckReport(manifest.graphs_dir, manifest.model)
    structures = {}
    for name in manifest.components:  # all artifacts first: a damaged one stops the check at once
        notify(name, "artifact")
        structures[name] = verify_artifact(manifest, name)
        sha = manifest.components[name]["sha256"]
        report.results.append(CheckResult(name, "artifact", "passed", f"files present, sha256 {sha[:12]}... matches"))

    gag_cfg = manifest.gag
    gag_modules = (manifest.data.get("gag") or {}).get("rewritten") or []
    for name, comp in manifest.components.items():
        path, model = manifest.graph_path(name), structures[name]
        notify(name, "onnx_checker")
        checker_ok, details = run_onnx_checker(path)
        report.results.append(CheckResult(name, "onnx_checker", "passed" if checker_ok else "failed", details))
        notify(name, "shape_inference")
        ok, details = run_shape_inference(path)
        report.results.append(CheckResult(name, "shape_inference", "passed" if ok else "failed", details))
        if comp["role"] == "denoiser":
            found = control_flow_nodes(model)
            report.results.append(CheckResult(
                name, "control_flow", "failed" if found else "passed",
                f"control flow in the denoiser: {', '.join(found[:10])}" if found else "no Loop/If/Scan"))
        # TensorRT's parser is native code: a graph the ONNX checker refused is not handed to it
        parsed, parsed_by = _parse(path, parser if checker_ok else "none", notify, name)
        if parsed is None and not checker_ok and parser != "none":
            parsed = CheckResult(name, "trt_parser", "skipped", "not parsed: the ONNX checker refused the graph")
        if parsed is not None:
            report.results.append(parsed)
        notify(name, "tensorrt_lint")
        findings = lint_graph(model, trt_versions, parsed_by=parsed_by)
        errors = [f for f in findings if f.severity == "error"]
        report.results.append(CheckResult(
            name, "tensorrt_lint", "failed" if errors else "passed",
            f"{len(model.graph.node)} nodes; {len(errors)} error(s), {len(findings) - len(errors)} warning(s) "
            f"for TensorRT {'/'.join(v + '.x' for v in trt_versions)}", tuple(findings)))
        reduced = next((o["dtype"] for o in comp["outputs"] if o["dtype"] in ("float16", "bfloat16")), None)
        if reduced:
            notify(name, "precision")
            modules = gag_modules if comp["role"] == "denoiser" and gag_cfg is not None else []
            keeps = manifest.data.get("family") in KEEPS_MODEL_ATTENTION
            problems, summary = precision_findings(model, reduced, modules, keeps_model_attention=keeps)
            report.results.append(CheckResult(name, "precision", "failed" if problems else "passed",
                                              "; ".join(problems[:5]) if problems else summary))

    if parity:
        _run_parity(manifest, report, pipe, entry, gag_cfg, seed, notify)
    return report


def _run_parity(manifest: Manifest, report: CheckReport, pipe, entry, gag_cfg, seed: int, notify) -> None:
    """Parity of every component: against torch's outputs recorded at export where the manifest has
    them for this seed (no model loaded), else against the pipeline (`pipe`, or loaded again)."""
    from .models import descriptors_for

    live = _needs_torch(manifest, seed)
    for name, comp in manifest.components.items():
        if _component_precision(comp) is Precision.BF16:
            report.results.append(CheckResult(name, "parity", "skipped", _BF16_SKIP))
        elif name not in live:
            notify(name, "parity")
            report.results.append(_recorded_parity(manifest, name, comp["parity_reference"]))
    if not live:
        return
    if pipe is None:
        entry, pipe = _reference_pipeline(manifest)
    elif entry is None:
        from .models import manifest_entry

        entry = manifest_entry(manifest.data)
    descriptors = {d.name: d for d in descriptors_for(entry, pipe)}
    denoiser = denoiser_module(pipe)
    if denoiser is not None:
        if gag_cfg is not None:
            apply_gag(denoiser, gag_cfg)
        else:
            remove_gag(denoiser)
    try:
        for name in live:
            notify(name, "parity")
            descriptor = descriptors.get(name)
            if descriptor is None:
                report.results.append(CheckResult(name, "parity", "failed", f"the registry has no component {name!r}"))
                continue
            report.results.append(_parity(manifest, name, descriptor, pipe, seed))
    finally:
        if denoiser is not None:
            remove_gag(denoiser)
