"""Where each parameter of a denoiser lives in its exported graph: the weight map (`weight_map.json`).

torch's dynamo exporter (and onnxslim after it) keeps some weights under their parameter name
(`model.conv_in.weight`), folds others into new initializers (`Linear` weights become a
transposed `val_191` for a `MatMul`, GroupNorm scales a reshaped `[C, 1, 1]`), upcasts a few
(FLUX's RMSNorm scales: fp16 parameters, fp32 initializers), and merges initializers whose
values are equal (every LayerNorm scale of a freshly initialized model is one tensor of ones).
Names alone cannot place a weight, so the map is found by value at export time, while the
exported module is still in memory: each parameter's bytes (as is, and transposed for 2-D ones)
are hashed, every initializer of the final graph is hashed (and, where it holds exactly
representable values of a narrower parameter dtype, hashed after casting down to it), and the
digests are matched. A parameter is placed when its values are found in one or more
initializers that hold no other parameter; it is recorded as unplaceable, with the reason, when
its values are nowhere (folded into a computed constant), when another parameter has the same
values (merged: changing the initializer would change both), or when all its elements are equal
(constant-valued: nothing tells it from the graph's other constants). A LoRA that touches an
unplaceable weight is refused (`WeightMap.place`).

The file holds names, shapes, dtypes and layouts, no data (about 250 bytes a parameter: 72 KB
for tiny-sdxl's 292); the manifest names it with its sha256 (`components.<denoiser>.weight_map`) and
`load_weight_map` checks it. Hashing reads each weight once more: about 1 GB/s here.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arrays import to_numpy
from ..artifacts.integrity import read_checked_file
from ..core.atomic import write_atomic
from ..core.errors import ArtifactError, InvalidInputError
from ..core.names import WEIGHT_MAP_NAME
from ..core.precision import Precision
from .graphs import load_graph_structure

WEIGHT_MAP_FORMAT_VERSION = 1
LAYOUTS = ("identity", "transpose", "reshape")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _numpy_dtype(name: str) -> np.dtype:
    """numpy's dtype by name; bfloat16 (not numpy's own) through Precision's one probe of ml_dtypes."""
    return Precision.BF16.numpy_dtype if name == Precision.BF16.numpy_name else np.dtype(name)


@dataclass(frozen=True)
class ParameterDigest:
    """One parameter's shape, dtype and the digests of its bytes in each layout it could be stored in."""

    shape: tuple[int, ...]
    dtype: str  # numpy's name: float32, float16, bfloat16
    digests: dict[str, str]  # layout -> sha256 of the bytes ("identity" also finds reshaped copies)
    uniform: bool  # all elements equal


def parameter_digests(module: torch.nn.Module) -> dict[str, ParameterDigest]:
    """The digests of every floating-point parameter of `module`, by its name in `module`."""
    out = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.is_floating_point():
                continue
            array = to_numpy(param.detach().cpu())
            flat = array.reshape(-1)
            digests = {"identity": _digest(array)}
            if array.ndim == 2:
                digests["transpose"] = _digest(array.T)
            uniform = flat.size < 2 or bool(np.all(flat == flat[0]))
            out[name] = ParameterDigest(tuple(array.shape), array.dtype.name, digests, uniform)
    return out


def _initializers(onnx_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every initializer of the graph as an array, one at a time (external data read per tensor)."""
    from onnx import numpy_helper

    for init in load_graph_structure(onnx_path).graph.initializer:
        yield init.name, numpy_helper.to_array(init, base_dir=str(Path(onnx_path).parent))


def _initializer_index(onnx_path: Path, param_dtypes: set[str]) -> dict[str, list[tuple[str, tuple, str, str]]]:
    """digest -> [(initializer, its shape, its dtype, the dtype hashed)]: each float initializer
    as stored, and cast down to each narrower parameter dtype whose values it holds exactly."""
    index: dict[str, list] = defaultdict(list)
    for name, array in _initializers(onnx_path):
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            continue
        entry = (name, tuple(array.shape), array.dtype.name)
        index[_digest(array)].append((*entry, array.dtype.name))
        for dtype in param_dtypes - {array.dtype.name}:
            narrow = array.astype(_numpy_dtype(dtype))
            if narrow.dtype.itemsize < array.dtype.itemsize and np.array_equal(narrow.astype(array.dtype), array):
                index[_digest(narrow)].append((*entry, dtype))
    return index


def _layout(digest_layout: str, param_shape: tuple, init_shape: tuple) -> str | None:
    if digest_layout == "transpose":
        return "transpose" if init_shape == param_shape[::-1] else None
    return "identity" if init_shape == param_shape else "reshape"


def match_weights(digests: Mapping[str, ParameterDigest], onnx_path: Path) -> dict[str, dict]:
    """The weight map's `parameters`: for each parameter its shape, dtype, and either `targets`
    (initializer, layout, the initializer's dtype) or `unplaceable` (why)."""
    index = _initializer_index(onnx_path, {d.dtype for d in digests.values()})
    found: dict[str, list[dict]] = {}
    holders: dict[str, set[str]] = defaultdict(set)  # initializer -> the parameters whose values it holds
    for name, digest in digests.items():
        targets = {}
        for digest_layout, value in digest.digests.items():
            for init, init_shape, init_dtype, hashed_as in index.get(value, ()):
                layout = _layout(digest_layout, digest.shape, init_shape)
                if layout is not None and hashed_as == digest.dtype:
                    targets.setdefault(init, {"initializer": init, "layout": layout, "dtype": init_dtype})
        found[name] = list(targets.values())
        for init in targets:
            holders[init].add(name)
    parameters = {}
    for name, digest in digests.items():
        entry = {"shape": list(digest.shape), "dtype": digest.dtype}
        shared = sorted({other for t in found[name] for other in holders[t["initializer"]]} - {name})
        if digest.uniform:
            entry["unplaceable"] = "all its elements are equal, so its values cannot be told from the graph's other constants"
        elif not found[name]:
            entry["unplaceable"] = "its values are in no initializer (the exporter folded it into a computed constant)"
        elif shared:
            entry["unplaceable"] = (f"the exporter merged it with {len(shared)} other parameter(s) of the same values "
                                    f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''})")
        else:
            entry["targets"] = found[name]
        parameters[name] = entry
    return parameters


@dataclass(frozen=True)
class WeightTarget:
    """One initializer holding a parameter: `layout` says how (identity, transpose, reshape)."""

    initializer: str
    layout: str
    dtype: str

    def to_graph(self, value: np.ndarray, init_shape: tuple[int, ...]) -> np.ndarray:
        """A value in the parameter's shape, in this initializer's layout, shape and dtype."""
        laid = value.T if self.layout == "transpose" else value
        return np.ascontiguousarray(laid).reshape(init_shape).astype(_numpy_dtype(self.dtype))

    def from_graph(self, stored: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        """The initializer's value back in the parameter's shape (its dtype kept)."""
        if self.layout == "transpose":
            return stored.reshape(param_shape[::-1]).T
        return stored.reshape(param_shape)


@dataclass(frozen=True)
class WeightMap:
    """A component's weight map: `parameters` as `match_weights` gives them."""

    component: str
    parameters: dict[str, dict]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p["shape"]) for name, p in self.parameters.items()}

    def place(self, names) -> dict[str, tuple[WeightTarget, ...]]:
        """The initializers holding each named parameter; InvalidInputError naming every one that
        is unknown or unplaceable (nothing can be written for a LoRA that touches it)."""
        problems = []
        for name in names:
            entry = self.parameters.get(name)
            if entry is None:
                problems.append(f"{name}: no such parameter in {self.component}")
            elif "targets" not in entry:
                problems.append(f"{name}: {entry['unplaceable']}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise InvalidInputError(
                f"the LoRA changes {len(problems)} weight(s) of {self.component} that its exported graph cannot take "
                f"in place: {'; '.join(problems[:3])}{more}; export with the LoRA instead (`gag-export export --lora`)")
        return {name: tuple(WeightTarget(**t) for t in self.parameters[name]["targets"]) for name in names}

    def to_json(self) -> str:
        return json.dumps({"format_version": WEIGHT_MAP_FORMAT_VERSION, "component": self.component,
                           "parameters": self.parameters}, indent=1) + "\n"


def record_weight_map(comp_dir: Path, component: str, digests: Mapping[str, ParameterDigest], onnx_path: Path,
                      root: Path) -> dict:
    """Match `digests` against the graph at `onnx_path`, write `comp_dir/weight_map.json`; return its
    manifest entry (path relative to `root`, sha256, size, and how many parameters were placed)."""
    weight_map = WeightMap(component, match_weights(digests, onnx_path))
    path = Path(comp_dir) / WEIGHT_MAP_NAME
    text = weight_map.to_json().encode()
    write_atomic(path, text)
    placed = sum("targets" in p for p in weight_map.parameters.values())
    return {"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(text).hexdigest(),
            "size_bytes": len(text), "placed": placed, "unplaceable": len(weight_map.parameters) - placed}


def load_weight_map(graphs_dir: Path, entry: Mapping) -> WeightMap:
    """The weight map a manifest entry names, checked against its sha256 (`ArtifactError` otherwise)."""
    path = Path(graphs_dir) / entry["path"]
    data = read_checked_file(graphs_dir, entry, "weight map")
    try:
        doc = json.loads(data)
        if doc.get("format_version") != WEIGHT_MAP_FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}")
        return WeightMap(doc["component"], doc["parameters"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"weight map {path} is not a format-{WEIGHT_MAP_FORMAT_VERSION} weight map ({exc}); "
                            "re-export the model") from None


__all__ = ["LAYOUTS", "WEIGHT_MAP_FORMAT_VERSION", "ParameterDigest", "WeightMap", "WeightTarget", "load_weight_map",
           "match_weights", "parameter_digests", "record_weight_map"]
