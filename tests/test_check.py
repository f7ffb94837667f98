"""check.py: the TensorRT lint on hand-made graphs, damaged artifacts and failed checks through the CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from export_helpers import exported, sha256_of, shared_root
from onnx import TensorProto, helper, numpy_helper

from gag_export.check import trt_ops
from gag_export.check import CheckReport, CheckResult, check_graphs, lint_graph, precision_findings
from gag_export.cli import cli
from gag_export.core.errors import ArtifactError, CheckFailedError
from gag_export.export import save_graph
from gag_export.artifacts.manifest import graph_sha256


@pytest.fixture(scope="session")
def graphs_root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


# --------------------------------------------------------------------------- lint on hand-made graphs

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5000])


def graph(nodes, inputs=(X,), outputs=None, initializers=(), opset=20):
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", list(inputs), outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def const_int64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def findings_for(model, op):
    return [f for f in lint_graph(model) if f.op == op]


def test_lint_passes_a_clean_graph_with_a_constant_small_topk():
    model = graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="topk77"),
                   helper.make_node("Relu", ["v"], ["y"], name="relu")],
                  initializers=[const_int64("k", [77])])
    assert lint_graph(model) == []


def test_lint_flags_topk_with_runtime_k():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "axis2"], ["k"], axis=0, name="gather"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="sort_keys"),
    ]
    model = graph(nodes, initializers=[const_int64("axis2", [2])],
                  outputs=[helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    (finding,) = findings_for(model, "TopK")
    assert finding.node == "sort_keys" and "run time" in finding.message
    assert "method='bisect'" in finding.hint and finding.versions == ("10", "11")
    assert "sort_keys" in str(finding) and "TensorRT 10.x/11.x" in str(finding)


def test_lint_flags_topk_with_k_above_3840():
    model = graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="sort_4096")],
                  initializers=[const_int64("k", [4096])],
                  outputs=[helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    (finding,) = findings_for(model, "TopK")
    assert finding.node == "sort_4096" and "4096" in finding.message and "3840" in finding.message
    assert "bisect" in finding.hint and finding.severity == "error"
    # a K within the limit passes, through a Constant node rather than an initializer
    ok = graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([3840], np.int64))),
                helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="sort_3840")],
               outputs=[helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    assert findings_for(ok, "TopK") == []


def test_lint_flags_double_tensors_and_casts():
    nodes = [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
             helper.make_node("Add", ["xd", "bias"], ["yd"], name="add_double"),
             helper.make_node("Cast", ["yd"], ["y"], to=TensorProto.FLOAT, name="back")]
    bias = numpy_helper.from_array(np.zeros((1,), np.float64), "bias")
    model = graph(nodes, initializers=[bias])
    found = lint_graph(model)
    cast = [f for f in found if f.node == "to_double"]
    assert cast and all("float64" in f.message or "double" in f.message.lower() for f in cast)
    assert any("rotary" in f.hint for f in cast)  # says what to do
    assert any(f.node == "add_double" for f in found)  # the double Add's output
    assert any(f.op == "initializer" and f.node == "bias" for f in found)


def test_lint_flags_unsupported_and_custom_ops():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
             helper.make_node("FancyAttention", ["x"], ["y"], domain="com.example", name="fancy")]
    model = graph(nodes, outputs=[helper.make_tensor_value_info("u", TensorProto.FLOAT, None),
                                  helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    (unique,) = findings_for(model, "Unique")
    assert unique.node == "uniq" and "unsupported" in unique.message and unique.hint
    (custom,) = findings_for(model, "FancyAttention")
    assert "com.example" in custom.message and "plugin" in custom.hint


def test_lint_knows_version_differences():
    # RMSNormalization arrived in TensorRT 10.15: not in a 10.0 parser, fine for 11.x
    model = graph([helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms")],
                  initializers=[numpy_helper.from_array(np.ones((5000,), np.float32), "scale")], opset=20)
    (finding,) = findings_for(model, "RMSNormalization")
    assert finding.versions == ("10",)
    # opset 23 is beyond TensorRT 10.0's 20 but within 11.x's 24
    (opset,) = findings_for(graph([helper.make_node("Relu", ["x"], ["y"])], opset=23), "opset")
    assert opset.versions == ("10",) and "--opset 20" in opset.hint
    assert trt_ops.SUPPORTED["11"][1] >= 24 and "Swish" in trt_ops.SUPPORTED["11"][2]


def test_lint_flags_an_op_on_an_unsupported_type():
    model = graph([helper.make_node("CumSum", ["i", "axis"], ["y"], name="cumsum_int")],
                  inputs=[helper.make_tensor_value_info("i", TensorProto.INT64, [4])],
                  initializers=[const_int64("axis", 0)],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    (finding,) = findings_for(model, "CumSum")
    assert "int64" in finding.message and finding.node == "cumsum_int"


def test_bisect_gag_unet_has_no_topk_and_lints_clean(graphs_root):
    """The default (bisect) GAG export has no TopK at all, so no K limit applies at any resolution."""
    manifest = exported("sdxl", graphs_root)
    model = onnx.load(str(manifest.graph_path("unet")), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "TopK"]  # bisect: no TopK at all
    assert [f for f in lint_graph(model) if f.severity == "error"] == []


# --------------------------------------------------------------------------- precision on hand-made graphs

GAG_LAYER = "blocks.0.attn"
H = helper.make_tensor_value_info("h", TensorProto.FLOAT16, [1, 4, 8])


def traced(node, module: str, aten_op: str):
    """`node` as dynamo exports it: its module's name scope and the aten op it was made from."""
    scopes = ["", "model", f"model.{module}", aten_op]
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
    node.metadata_props.add(key="pkg.torch.onnx.fx_node",
                            value=f"%{aten_op} : [num_users=1] = call_function[target=torch.ops.aten.{aten_op}.default](args = ())")
    return node


def fp16_graph(*nodes):
    """h (fp16) -> nodes (each on the previous output) -> Cast to fp32 -> an fp32 GAG Mul, as a real layer ends."""
    chain, last = [], "h"
    for i, (op, module, aten_op, extra_inputs) in enumerate(nodes):
        out = f"t{i}"
        chain.append(traced(helper.make_node(op, [last, *extra_inputs], [out], name=f"node_{aten_op}_{i}"), module, aten_op))
        last = out
    chain.append(traced(helper.make_node("Cast", [last], ["f"], to=TensorProto.FLOAT, name="up"), GAG_LAYER, "_to_copy"))
    chain.append(traced(helper.make_node("Mul", ["f", "f"], ["y"], name="gag_mul"), GAG_LAYER, "mul"))
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 8], dtype=np.int64), "pads")
    return graph(chain, inputs=(H,), initializers=[pads])


def test_precision_fails_a_gag_add_that_rounds_in_16_bits():
    model = fp16_graph(("Add", GAG_LAYER, "add", ["h"]))
    problems, _ = precision_findings(model, "float16", [GAG_LAYER])
    assert problems == ["GAG node node_add_0 (Add) computes in float16, not float32"]
    # the same Add outside the GAG layers is the model's own business
    assert precision_findings(fp16_graph(("Add", "blocks.0.ff", "add", ["h"])), "float16", [GAG_LAYER])[0] == []


def test_precision_passes_ops_that_cannot_round_in_a_gag_layer():
    model = fp16_graph(("Neg", GAG_LAYER, "neg", []), ("Pad", GAG_LAYER, "pad", ["pads"]), ("Abs", GAG_LAYER, "abs", []))
    problems, summary = precision_findings(model, "float16", [GAG_LAYER])
    assert problems == [] and summary.startswith("1 GAG attention arithmetic nodes in float32")


def test_precision_takes_the_models_own_attention_in_16_bits_only_where_the_layer_keeps_it():
    model = fp16_graph(("Mul", GAG_LAYER, "scaled_dot_product_attention", ["h"]),
                       ("Softmax", GAG_LAYER, "scaled_dot_product_attention", []))
    problems, summary = precision_findings(model, "float16", [GAG_LAYER], keeps_model_attention=True)
    assert problems == [] and "2 nodes of the model's own joint attention" in summary
    # a UNet's GAG layer replaces the attention whole: there the same nodes are GAG arithmetic
    problems, _ = precision_findings(model, "float16", [GAG_LAYER])
    assert [p.split()[2] for p in problems] == ["node_scaled_dot_product_attention_0", "node_scaled_dot_product_attention_1"]
    # and an Add of GAG's own next to the kept attention still fails
    model = fp16_graph(("Softmax", GAG_LAYER, "scaled_dot_product_attention", []), ("Add", GAG_LAYER, "add", ["h"]))
    problems, _ = precision_findings(model, "float16", [GAG_LAYER], keeps_model_attention=True)
    assert problems == ["GAG node node_add_1 (Add) computes in float16, not float32"]


# --------------------------------------------------------------------------- reports


def test_report_truthiness_follows_results():
    ok = CheckResult("unet", "parity", "passed")
    skipped = CheckResult("unet", "parity", "skipped", "no bf16 kernels")
    failed = CheckResult("unet", "tensorrt_lint", "failed", "1 error")
    assert ok and skipped and not failed
    report = CheckReport(Path("g"), "m", [ok, skipped])
    assert report
    report.raise_for_failures()
    report.results.append(failed)
    assert not report and report.failures() == [failed]
    with pytest.raises(CheckFailedError, match="unet/tensorrt_lint"):
        report.raise_for_failures()


# --------------------------------------------------------------------------- damaged artifacts via the CLI


@pytest.fixture
def graphs_copy(graphs_root, tmp_path) -> Path:
    """A private copy of the tiny-sdxl export (the text encoder and UNet only), free to damage."""
    source = exported("sdxl", graphs_root).graphs_dir
    dest = tmp_path / "tiny-sdxl"
    shutil.copytree(source, dest)
    data = json.loads((dest / "manifest.json").read_text())
    data["components"] = {k: v for k, v in data["components"].items() if k in ("text_encoder", "unet")}
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest


def invoke_check(path: Path, *extra):
    return CliRunner().invoke(cli, ["check", str(path), *extra])


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_cli_check_passes_a_good_export_with_parity(graphs_copy):
    result = invoke_check(graphs_copy)  # parity reloads tiny-sdxl through the registry
    assert result.exit_code == 0, result.output
    assert "parity" in result.stdout and "failed" not in result.stdout


def test_cli_check_reports_corrupt_graph(graphs_copy):
    path = graphs_copy / "unet/model.onnx"
    blob = bytearray(path.read_bytes())
    blob[100:4100] = b"\xff" * 4000
    path.write_bytes(bytes(blob))
    assert_one_line_error(invoke_check(graphs_copy, "--no-parity"), 5, "unet/model.onnx", "corrupt or truncated")


def test_cli_check_reports_truncated_graph(graphs_copy):
    path = graphs_copy / "text_encoder/model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(invoke_check(graphs_copy, "--no-parity"), 5, "text_encoder/model.onnx")


def test_cli_check_reports_sha_mismatch(graphs_copy):
    data = json.loads((graphs_copy / "manifest.json").read_text())
    data["components"]["unet"]["sha256"] = "0" * 64
    (graphs_copy / "manifest.json").write_text(json.dumps(data))
    assert_one_line_error(invoke_check(graphs_copy, "--no-parity"), 5, "sha256", "re-export")


def test_cli_check_reports_missing_and_short_external_data(graphs_copy):
    graph_path = graphs_copy / "text_encoder/model.onnx"
    save_graph(onnx.load(str(graph_path)), graph_path, external=True)
    data_file = graph_path.with_name("model.onnx.data")
    assert data_file.exists()
    manifest = json.loads((graphs_copy / "manifest.json").read_text())
    manifest["components"]["text_encoder"]["sha256"] = graph_sha256(graph_path)
    (graphs_copy / "manifest.json").write_text(json.dumps(manifest))
    assert invoke_check(graphs_copy, "--no-parity").exit_code == 0  # external data is fine

    data_file.write_bytes(data_file.read_bytes()[:1000])
    assert_one_line_error(invoke_check(graphs_copy, "--no-parity"), 5, "truncated")
    data_file.unlink()
    assert_one_line_error(invoke_check(graphs_copy, "--no-parity"), 5, "model.onnx.data", "missing")


def test_cli_check_reports_missing_manifest(tmp_path):
    assert_one_line_error(invoke_check(tmp_path / "nothing-here"), 5, "export the model first")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke_check(tmp_path / "empty"), 5, "no manifest.json")


def test_check_raises_artifact_error_in_the_api_too(graphs_copy):
    (graphs_copy / "unet/model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        check_graphs(graphs_copy, parity=False)


# --------------------------------------------------------------------------- failed checks via the CLI


def _one_component_export(root: Path, nodes, inputs, outputs, initializers=()) -> Path:
    """A graphs folder (`root/tiny-sdxl`, as export names it) whose one denoiser graph is `nodes`, with a
    manifest that matches it."""
    root = root / "tiny-sdxl"
    model = graph(nodes, inputs=inputs, outputs=outputs, initializers=initializers)
    onnx.checker.check_model(model)
    (root / "unet").mkdir(parents=True)
    onnx.save(model, str(root / "unet/model.onnx"))
    io = lambda values: [{"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                          "shape": [d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]  # noqa: E731
    manifest = {
        "format_version": 1, "model": "tiny-sdxl", "dtype": "fp32", "shape": {"batch": 1, "height": 64, "width": 64},
        "gag": {"enabled": False, "rewritten": []},
        "components": {"unet": {
            "role": "denoiser", "path": "unet/model.onnx", "external_data": None,
            "sha256": graph_sha256(root / "unet/model.onnx"), "size_bytes": 0, "nodes": len(nodes),
            "inputs": io(inputs), "outputs": io(outputs), "profile": {}, "tolerance": {"atol": 1e-4, "rtol": 1e-4}}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_cli_check_fails_with_a_per_check_report(tmp_path):
    """A denoiser graph with control flow, a runtime-K TopK and a double: exit 4, each check named."""
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then",
                             [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 5000])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=then, name="branchy"),
        helper.make_node("Shape", ["branch"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "axis2"], ["k"], axis=0, name="gather"),
        helper.make_node("TopK", ["branch", "k"], ["v", "i"], axis=-1, name="sort_keys"),
        helper.make_node("Cast", ["v"], ["latent"], to=TensorProto.DOUBLE, name="to_double"),
    ]
    root = _one_component_export(tmp_path / "bad", nodes, [X], [helper.make_tensor_value_info("latent", TensorProto.DOUBLE, [1, 4, 5000])],
                                 [const_int64("axis2", [2]), numpy_helper.from_array(np.float32(0), "zero")])
    result = invoke_check(root, "--no-parity")
    assert result.exit_code == 4, result.output
    assert "unet/control_flow" in result.stderr and "unet/tensorrt_lint" in result.stderr
    assert "branchy" in result.stderr and "sort_keys" in result.stderr and "to_double" in result.stderr
    report = check_graphs(root, parity=False)
    assert not report
    assert report.get("unet", "onnx_checker").passed  # a valid ONNX graph, just not a TensorRT one
    assert {r.check for r in report.failures()} == {"control_flow", "tensorrt_lint"}


def _control_flow_node(op: str):
    """One valid `op` node (Loop, If or Scan) that maps `x` [1, 4, 5000] to `y` through an Identity body."""
    shape = [1, 4, 5000]
    if op == "If":
        body = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)])
        return [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body, name="flow")], \
            [numpy_helper.from_array(np.array(True), "cond")]
    if op == "Loop":  # two trips of a loop-carried copy of x
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, shape)],
        )
        return [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body, name="flow")], \
            [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "cond")]
    body = helper.make_graph(  # Scan over the last axis of x, one state: y is the final state
        [helper.make_node("Identity", ["row"], ["s_out"])], "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 4])],
    )
    return [helper.make_node("Scan", ["s0", "x"], ["y"], body=body, num_scan_inputs=1, scan_input_axes=[2], name="flow")], \
        [numpy_helper.from_array(np.zeros((1, 4), np.float32), "s0")]


@pytest.mark.parametrize("op", ["Loop", "If", "Scan"])
def test_each_control_flow_op_in_the_denoiser_fails_check(op, tmp_path):
    nodes, initializers = _control_flow_node(op)
    y_shape = [1, 4] if op == "Scan" else [1, 4, 5000]
    root = _one_component_export(tmp_path / op, nodes, [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                                 initializers)
    report = check_graphs(root, parity=False)
    assert report.get("unet", "onnx_checker").passed  # valid ONNX: only the control flow is wrong
    flow = report.get("unet", "control_flow")
    assert not flow.passed and f"{op}:flow" in flow.details


# --------------------------------------------------------------------------- the real parser


needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason='tensorrt_rtx is not installed: `pip install "gag-export[tensorrt-rtx]"`')


@needs_rtx
def test_an_op_tensorrt_cannot_take_fails_the_real_parser_with_its_node(tmp_path):
    square = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])
    root = _one_component_export(tmp_path / "det", [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Det", ["r"], ["latent"], name="volume_of_keys"),
    ], [square], [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [2])])
    result = invoke_check(root, "--no-parity", "--parser", "tensorrt-rtx")
    assert result.exit_code == 4, result.output
    assert "unet/trt_parser" in result.stderr and "Traceback" not in result.output
    report = check_graphs(root, parity=False, parser="tensorrt-rtx")
    parsed = report.get("unet", "trt_parser")
    assert not parsed.passed
    assert "TensorRT-RTX 1." in parsed.details and "node volume_of_keys (Det): UNSUPPORTED_NODE" in parsed.details


@needs_rtx
def test_a_graph_the_parser_takes_passes_and_says_how_many_layers(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    root = _one_component_export(tmp_path / "ok", [helper.make_node("Relu", ["x"], ["latent"], name="relu")],
                                 [x], [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [1, 4, 8])])
    report = check_graphs(root, parity=False, parser="tensorrt-rtx")
    assert report.get("unet", "trt_parser").passed and "parsed into 1 network layers" in report.get("unet", "trt_parser").details
    assert check_graphs(root, parity=False, parser="none").get("unet", "trt_parser") is None


@needs_rtx
def test_the_topk_bound_of_the_lint_is_the_builders(tmp_path):
    """The lint's K limit against a real build (TensorRT-RTX's, ahead of time, no GPU needed): the
    largest K it lets through builds, one more fails to build, and the lint flags exactly that one."""
    from gag_export.check.parser import parse_onnx

    built = {}
    for k in (trt_ops.TOPK_MAX_K, trt_ops.TOPK_MAX_K + 1):
        model = graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name=f"sort_{k}")],
                      initializers=[const_int64("k", [k])],
                      outputs=[helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4, k])])
        onnx.save(model, str(tmp_path / f"topk{k}.onnx"))
        parsed = parse_onnx(tmp_path / f"topk{k}.onnx", "tensorrt-rtx")
        assert parsed.ok, parsed.errors  # the parser takes any K: the limit is the builder's
        builder = parsed._keep[0]
        built[k] = builder.build_serialized_network(parsed.network, builder.create_builder_config()) is not None
        assert bool(findings_for(model, "TopK")) == (not built[k])
    assert built == {trt_ops.TOPK_MAX_K: True, trt_ops.TOPK_MAX_K + 1: False}


def test_without_a_parser_the_check_is_skipped_saying_how_to_get_one(tmp_path, monkeypatch):
    from gag_export.core import tensorrt as trt_flavors

    monkeypatch.setattr(trt_flavors, "installed_flavor", lambda *a: None)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    root = _one_component_export(tmp_path / "ok", [helper.make_node("Relu", ["x"], ["latent"], name="relu")],
                                 [x], [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [1, 4, 8])])
    skipped = check_graphs(root, parity=False).get("unet", "trt_parser")
    assert skipped.status == "skipped" and 'gag-export[tensorrt-rtx]' in skipped.details


def test_the_op_table_gives_way_to_a_parser_that_accepted_the_graph_except_where_versions_differ():
    det = graph([helper.make_node("Det", ["x"], ["y"], name="det")], opset=22)
    plain = {(f.op, f.severity) for f in lint_graph(det)}
    assert ("Det", "error") in plain and ("opset", "error") in plain
    parsed = lint_graph(det, parsed_by="TensorRT-RTX 1.7.1.116")
    by_op = {f.op: f for f in parsed}
    assert by_op["Det"].severity == "warning" and "TensorRT-RTX 1.7.1.116's parser accepted" in by_op["Det"].hint
    # opset 22 is outside 10.x's range only: a difference between versions, which the table keeps deciding
    assert by_op["opset"].severity == "error" and by_op["opset"].versions == ("10",)


# --------------------------------------------------------------------------- parity against the reference recorded at export


def _scale_an_initializer(graphs_dir: Path, component: str, factor: float) -> str:
    """Multiply the component's largest float initializer by `factor` (a graph that is valid, lints
    clean and parses, but computes something else); record the new sha256. Returns its name."""
    path = graphs_dir / component / "model.onnx"
    model = onnx.load(str(path))
    target = max((t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT),
                 key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save_model(model, str(path))
    manifest = json.loads((graphs_dir / "manifest.json").read_text())
    manifest["components"][component]["sha256"] = sha256_of(path)
    manifest["components"][component]["size_bytes"] = path.stat().st_size
    (graphs_dir / "manifest.json").write_text(json.dumps(manifest))
    return target.name


def _no_pipeline(monkeypatch):
    import gag_export.models as models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline for parity"))


def test_parity_uses_the_recorded_reference_without_loading_the_model(graphs_copy, monkeypatch):
    _no_pipeline(monkeypatch)
    report = check_graphs(graphs_copy, parity=True)
    for name in ("text_encoder", "unet"):
        parity = report.get(name, "parity")
        assert parity.passed and "recorded at export" in parity.details and parity.parity
        assert max(p.max_abs for p in parity.parity) < 1e-4


def test_parity_fails_for_a_graph_that_computes_something_else(graphs_copy, monkeypatch):
    """Not a stub: ONNX Runtime runs a graph whose weight was scaled by 1.05, against torch's recorded outputs."""
    _no_pipeline(monkeypatch)
    _scale_an_initializer(graphs_copy, "text_encoder", 1.05)
    report = check_graphs(graphs_copy, parity=True)
    parity = report.get("text_encoder", "parity")
    assert not parity.passed and any(not p.passed and p.max_abs > 1e-3 for p in parity.parity)
    assert report.get("text_encoder", "onnx_checker").passed and report.get("unet", "parity").passed
    result = invoke_check(graphs_copy)
    assert result.exit_code == 4 and "text_encoder/parity" in result.stderr


def test_parity_at_the_tolerances_edge(graphs_copy, monkeypatch):
    """The comparison honours the recorded tolerance: 10x looser passes the same wrong graph."""
    _no_pipeline(monkeypatch)
    _scale_an_initializer(graphs_copy, "unet", 1.001)
    failed = check_graphs(graphs_copy, parity=True).get("unet", "parity")
    assert not failed.passed
    manifest = json.loads((graphs_copy / "manifest.json").read_text())
    worst = max(p.max_abs for p in failed.parity)
    manifest["components"]["unet"]["tolerance"] = {"atol": worst * 1.01, "rtol": 0.0}
    (graphs_copy / "manifest.json").write_text(json.dumps(manifest))
    assert check_graphs(graphs_copy, parity=True).get("unet", "parity").passed


@pytest.mark.parametrize("relative, exit_code", [(1e-2, 4), (1e-6, 0)])
def test_check_of_a_unet_weight_off_by(relative, exit_code, graphs_copy, monkeypatch):
    """One UNet weight off by 1% fails the CLI's parity (exit 4, the UNet named); off by 1e-6, inside
    the recorded tolerance, it passes: the comparison is neither a stub nor looser than recorded."""
    _no_pipeline(monkeypatch)
    _scale_an_initializer(graphs_copy, "unet", 1 + relative)
    result = invoke_check(graphs_copy)
    assert result.exit_code == exit_code, result.output
    assert ("unet/parity" in result.stderr) == (exit_code == 4)


def test_a_damaged_parity_reference_is_an_artifact_error(graphs_copy):
    reference = graphs_copy / "unet" / "parity.npz"
    data = bytearray(reference.read_bytes())
    data[len(data) // 2] ^= 0xFF
    reference.write_bytes(bytes(data))
    result = invoke_check(graphs_copy)
    assert_one_line_error(result, 5, "parity reference", "re-export")


def test_an_export_without_references_is_checked_against_torch(graphs_copy):
    manifest = json.loads((graphs_copy / "manifest.json").read_text())
    for comp in manifest["components"].values():
        comp.pop("parity_reference")
    (graphs_copy / "manifest.json").write_text(json.dumps(manifest))
    parity = check_graphs(graphs_copy, parity=True).get("unet", "parity")
    assert parity.passed and "ORT vs torch fp32 eager:" in parity.details  # the pipeline, loaded again

