"""Checks of exported graphs: artifacts, ONNX checker, shape inference, TensorRT lint, parity.

Build side, after export. Reads `graphs/<model>/manifest.json` (`artifacts.manifest`) and the
graphs it lists. Modules: `structure` (artifact, checker, shape inference, control flow), `lint`
(+ `trt_ops`), `parser` (the real TensorRT(-RTX) parser), `precision`, `parity`, `report`.

    report = check_graphs(Path("graphs/tiny-sdxl"))          # parity: the references recorded at export
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

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError, InvalidInputError
from . import trt_ops
from .lint import lint_graph
from .parity import run_parity
from .parser import ParsedNetwork, ParserError, parse_onnx, parse_result
from .precision import (
    KEEPS_MODEL_ATTENTION,
    in_modules,
    node_module,
    precision_findings,
    traced_from,
)
from .report import CHECKS, TRT_VERSIONS, CheckReport, CheckResult, Finding
from .structure import (
    control_flow_nodes,
    run_onnx_checker,
    run_shape_inference,
    verify_artifact,
)

log = logging.getLogger(__name__)

PARSERS = ("auto", "tensorrt", "tensorrt-rtx", "none")  # which real ONNX parser `trt_parser` uses


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
        from ..core.tensorrt import get_flavor  # noqa: PLC0415

        get_flavor(parser).import_module()  # MissingDependencyError (exit 3) before any work
    manifest = Manifest.load(Path(graphs_dir))
    if manifest.graphs_dir.resolve().name != manifest.model:  # export writes <out>/<model>; the runtime finds it so
        raise ArtifactError(f"{manifest.path} is for model {manifest.model!r}, not {manifest.graphs_dir.resolve().name!r} "
                            "(the folder it lies in): re-export the model")
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
        parsed, parsed_by = parse_result(path, parser if checker_ok else "none", notify, name)
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
        run_parity(manifest, report, pipe, entry, gag_cfg, seed, notify)
    return report


__all__ = [
    "CHECKS", "PARSERS", "TRT_VERSIONS", "CheckReport", "CheckResult", "Finding", "ParsedNetwork", "ParserError",
    "check_graphs", "control_flow_nodes", "in_modules", "lint_graph", "node_module", "parse_onnx", "precision_findings",
    "run_onnx_checker", "run_shape_inference", "traced_from", "verify_artifact",
]
