"""The graph as a file: present and matching the manifest, valid ONNX, typed, free of control flow."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..artifacts.manifest import Manifest, graph_sha256
from ..core.errors import ArtifactError
from ..export.graphs import graph_io, load_graph_structure

CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})


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
    _check_declared_io(manifest, component, model)
    return model


def _check_declared_io(manifest: Manifest, component: str, model) -> None:
    """The manifest's inputs and outputs are the graph's (names, types, shapes): every reader feeds
    and shapes by the manifest, so a manifest that disagrees is a damaged artifact, not bad input."""
    inputs, outputs = graph_io(model)
    entry = manifest.components[component]
    for kind, declared, actual in (("inputs", entry["inputs"], inputs), ("outputs", entry["outputs"], outputs)):
        if declared != actual:
            wrong = next(((d, a) for d, a in zip(declared, actual) if d != a), (declared, actual))
            raise ArtifactError(f"{manifest.path}: {component}'s {kind} do not match its graph (manifest "
                                f"{wrong[0]}, graph {wrong[1]}): re-export the model")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_onnx_checker(path: Path) -> tuple[bool, str]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001  (onnx raises ValidationError, InferenceError, RuntimeError...)
        return False, first_line(exc)
    return True, "onnx.checker.check_model passed"


def run_shape_inference(path: Path) -> tuple[bool, str]:
    import onnx

    with tempfile.TemporaryDirectory(prefix="gag-shape-inference-") as scratch:
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(scratch) / "inferred.onnx"), strict_mode=True)
        except Exception as exc:  # noqa: BLE001  (a failed check, reported with its first line)
            return False, first_line(exc)
    return True, "infer_shapes_path (strict) passed"


def control_flow_nodes(model) -> list[str]:
    """Names of Loop/If/Scan nodes in the graph and its local functions."""
    found = [f"{n.op_type}:{n.name}" for n in model.graph.node if n.op_type in CONTROL_FLOW_OPS]
    for fn in model.functions:
        found += [f"{n.op_type}:{fn.name}/{n.name}" for n in fn.node if n.op_type in CONTROL_FLOW_OPS]
    return found


__all__ = ["CONTROL_FLOW_OPS", "control_flow_nodes", "first_line", "run_onnx_checker", "run_shape_inference", "verify_artifact"]
