"""Parity of an exported graph with the torch module it came from: ONNX Runtime (CPU) against torch.

Build side, beside the exporter: export records the reference and gates slimming with it, check compares.

The torch side can be run now (`compare_with_torch`, the module in memory) or recorded when the
graph is exported (`record_reference`: the sample feed and torch's outputs in `parity.npz` beside
the graph) and compared later without any model loaded (`compare_with_reference`). The recorded
form is what lets `check` (and `build` after its export) free the pipeline before ONNX Runtime
loads a graph: an fp32 SDXL pipeline (14 GB) and an ORT session of its fp16 UNet do not fit in
24 GB together.

    entry = record_reference(comp_dir / PARITY_NAME, module, feed, ["latent"], root)   # at export
    results = compare_with_reference(onnx_path, load_reference(graphs_dir, entry), tolerance)  # in check

polygraphy does the comparing: `OnnxrtRunner`, `Comparator.run` and its element-wise
`SimpleCompareFunc` (an element passes when within atol or within rtol).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from ..arrays import to_torch
from ..artifacts.integrity import read_checked_file
from ..core.errors import GagExportError
from ..core.names import GAG_INPUTS, PARITY_NAME

REFERENCE_SOURCE = "torch fp32 eager"


class ParityError(GagExportError):
    """A graph could not be run for a parity comparison (the check reports it as failed)."""


@dataclass(frozen=True)
class OutputParity:
    """One output's ONNX Runtime vs torch comparison (a polygraphy `OutputCompareResult` distilled)."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    atol: float
    rtol: float
    passed: bool

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
                f"(atol {self.atol:g}, rtol {self.rtol:g}) {verdict}")


class TorchRunner(BaseRunner):
    """A polygraphy runner for a torch module on the CPU (polygraphy's `PytRunner` moves inputs to CUDA).

    Inputs are fed in graph order; float arrays are cast to `dtype` (the reference precision,
    fp32 by default: an fp16 graph is compared against fp32 eager fed the same fp16-rounded
    values). Outputs come back as fp32 numpy arrays named by `output_names`.
    """

    def __init__(self, module: torch.nn.Module, feed: Mapping[str, np.ndarray], output_names: Sequence[str],
                 dtype: torch.dtype = torch.float32, name: str = "torch-eager"):
        super().__init__(name=name, prefix="torch-runner")
        self.module, self.output_names, self.dtype = module, list(output_names), dtype
        self.input_names = list(feed)
        self.input_metadata = TensorMetadata.from_feed_dict(feed)  # the graph's names, dtypes, shapes

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        args = [to_torch(feed_dict[name]) for name in self.input_names]
        args = [t.to(torch.float32 if n in GAG_INPUTS else self.dtype) if t.is_floating_point() else t
                for n, t in zip(self.input_names, args)]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(*args)
        self.inference_time = time.perf_counter() - start
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return OrderedDict((n, o.detach().float().cpu().numpy()) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self):
        pass


@dataclass(frozen=True)
class ParityReference:
    """A recorded torch run: the feed (graph order) and the outputs (fp32) of the module exported."""

    feed: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    seed: int
    source: str = REFERENCE_SOURCE


class RecordedRunner(BaseRunner):
    """A polygraphy runner that answers with a recorded reference's outputs (for its own feed only)."""

    def __init__(self, reference: ParityReference, name: str = "torch-recorded"):
        super().__init__(name=name, prefix="recorded-runner")
        self.reference = reference

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata.from_feed_dict(self.reference.feed)

    def infer_impl(self, feed_dict):
        self.inference_time = 0.0
        return OrderedDict((n, np.asarray(v)) for n, v in self.reference.outputs.items())

    def deactivate_impl(self):
        pass


def _ort_session(onnx_path: Path):
    """An ONNX Runtime CPU session holding one copy of the weights: prepacking (a second, re-laid-out
    copy of every GEMM weight for speed) is off, which a full-size UNet needs to fit beside anything."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    return lambda: ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def compare(onnx_path: Path, reference: BaseRunner, feed: Mapping[str, np.ndarray], output_names: Sequence[str],
            tolerance: Mapping[str, float]) -> list[OutputParity]:
    """Run the graph in ONNX Runtime (CPU) and `reference` on `feed`; compare every output."""
    G_LOGGER.module_severity = G_LOGGER.ERROR
    ort_runner = OnnxrtRunner(_ort_session(onnx_path), name="onnxruntime")
    try:
        results = Comparator.run([ort_runner, reference], data_loader=[dict(feed)])
    except Exception as exc:  # a graph ORT cannot load or run is a parity failure, reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParityError(f"{onnx_path}: cannot run in ONNX Runtime: {first}") from exc
    atol, rtol = tolerance["atol"], tolerance["rtol"]
    per_output = SimpleCompareFunc(rtol=rtol, atol=atol, check_shapes=True)(results[0][1][0], results[1][1][0])
    out = []
    for name in output_names:
        r = per_output.get(name)
        if r is None:  # shape mismatch or missing output: polygraphy gives no statistics
            out.append(OutputParity(name, float("inf"), float("inf"), float("inf"), atol, rtol, False))
            continue
        out.append(OutputParity(name, r.max_absdiff, r.max_reldiff, r.mean_absdiff, atol, rtol, bool(r)))
    return out


def compare_with_torch(onnx_path: Path, module: torch.nn.Module, feed: Mapping[str, np.ndarray],
                       output_names: Sequence[str], tolerance: Mapping[str, float]) -> list[OutputParity]:
    """ONNX Runtime against `module` in torch eager, now."""
    return compare(onnx_path, TorchRunner(module, feed, output_names), feed, output_names, tolerance)


def compare_with_reference(onnx_path: Path, reference: ParityReference,
                           tolerance: Mapping[str, float]) -> list[OutputParity]:
    """ONNX Runtime against torch's outputs recorded at export, for the recorded feed."""
    return compare(onnx_path, RecordedRunner(reference), reference.feed, list(reference.outputs), tolerance)


def tolerance_dict(tolerance: Any) -> dict:
    """A descriptor's tolerance as `{"atol": float, "rtol": float}`."""
    if isinstance(tolerance, Mapping):
        return {"atol": float(tolerance["atol"]), "rtol": float(tolerance["rtol"])}
    if dataclasses.is_dataclass(tolerance):
        return {"atol": float(tolerance.atol), "rtol": float(tolerance.rtol)}
    if isinstance(tolerance, (tuple, list)) and len(tolerance) == 2:
        return {"atol": float(tolerance[0]), "rtol": float(tolerance[1])}
    if isinstance(tolerance, (int, float)):
        return {"atol": float(tolerance), "rtol": float(tolerance)}
    raise GagExportError(f"cannot read a tolerance from {tolerance!r}")


# --------------------------------------------------------------------------------------------
# The recorded reference on disk
# --------------------------------------------------------------------------------------------


def record_reference(dest: Path, module: torch.nn.Module, feed: Mapping[str, np.ndarray],
                     output_names: Sequence[str], root: Path, seed: int) -> dict:
    """Run `module` on `feed`, write the feed and its outputs to `dest` (.npz); return the manifest entry."""
    runner = TorchRunner(module, feed, output_names)
    with runner:
        outputs = runner.infer(dict(feed))
    arrays = {f"in.{k}": np.asarray(v) for k, v in feed.items()}
    arrays.update({f"out.{k}": np.asarray(v) for k, v in outputs.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: fast to write and to read, and a few MB at most
    data = buffer.getvalue()
    dest.write_bytes(data)
    return {"path": dest.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data), "seed": int(seed), "source": REFERENCE_SOURCE}


def load_reference(graphs_dir: Path, entry: Mapping) -> ParityReference:
    """The reference a manifest entry names, checked against its sha256 (`ArtifactError` otherwise)."""
    data = read_checked_file(graphs_dir, entry, "parity reference")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        feed = OrderedDict((k[3:], arrays[k]) for k in arrays.files if k.startswith("in."))
        outputs = OrderedDict((k[4:], arrays[k]) for k in arrays.files if k.startswith("out."))
    return ParityReference(feed, outputs, int(entry.get("seed", 0)), entry.get("source", REFERENCE_SOURCE))


__all__ = [
    "PARITY_NAME", "OutputParity", "ParityError", "ParityReference", "RecordedRunner", "TorchRunner", "compare",
    "compare_with_reference", "compare_with_torch", "load_reference", "record_reference", "tolerance_dict",
]
