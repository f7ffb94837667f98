"""torch -> ONNX, one graph per pipeline component, written atomically, plus `manifest.json`.

Layer 4. Reads the component descriptors of `models/` and never imports `check.py`, the engine
builder, the runtime or the CLI.

    config = ExportConfig("tiny-sdxl", Path("graphs"), ImageShape(64, 64), gag=GAGConfig(method="bisect"))
    manifest = export_model(pipe, entry, config)            # graphs/tiny-sdxl/{<component>/model.onnx, manifest.json}

What is written (DESIGN.md "Manifest"):

- `graphs/<model>/<component>/model.onnx`; when the weights exceed the 2 GB protobuf limit
  (a full-size SDXL UNet) they go to one external data file beside it, `model.onnx.data`.
- `graphs/<model>/manifest.json`. A component's `sha256` is the SHA-256 of the bytes of
  `model.onnx` followed by the bytes of its external data file, if it has one (so for a graph
  without external data it is the plain file digest); `size_bytes` is the sum of both files;
  `external_data` is null or `{"path", "sha256", "size_bytes"}` of the data file alone. Use
  `graph_sha256(path)` to recompute it. `inputs`/`outputs` are read back from the saved graph.
- `graphs/<model>/<component>/parity.npz` (fp32/fp16 components): the sample feed and torch's
  fp32 eager outputs for it, named in the manifest (`parity_reference`: path, sha256, seed), so
  that `check` compares ONNX Runtime with torch without loading the model (`parity.py`).

Atomicity: everything is written into a temp folder in the same parent (`graphs/.<model>.*.tmp`)
and moved into place with `os.replace` at the end; a failed or interrupted export (including
out-of-disk and out-of-memory, raised as `ResourceExhaustedError`) removes the temp folder and
leaves the previous export, if any, untouched. An export of some components (`components=`)
into a folder holding an export made with the same settings carries the others over into the
temp folder (hard links) and lists them in the new manifest; over an export made with other
settings it is refused (InvalidInputError) rather than deleting them.

Reduced precision (`fp16`/`bf16`): each component is copied and cast (weights cast while
copying, one component at a time: an fp16 SDXL export holds the fp32 pipeline plus one fp16
component, not a second pipeline), then exported as typed, so
the graph's types are exactly torch's: the GAG arithmetic (which `guidance.py` does in fp32 and
casts back) and diffusers' own upcasts stay fp32 inside an fp16 graph. One exporter defect is
repaired after export: `aten.cat` over mixed float types is emitted as a `Concat` without the
type promotion torch applies (SDXL's `text_embeds` fp16 + fp32 time-id embedding); we insert the
`Cast` torch's promotion implies (`promote_concat_inputs`).

Parity (ONNX Runtime vs torch eager on the descriptor's sample inputs) lives in `parity.py`;
the `--slim` gate compares with the module in memory, `check.py` with the recorded reference.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .arrays import to_numpy, to_torch
from .attention import apply_gag, is_gag_applied, remove_gag
from .core.atomic import as_if_created_plainly, swap_into_place
from .core.errors import (
    ArtifactError,
    GagExportError,
    InvalidInputError,
    ResourceExhaustedError,
)
from .core.names import DATA_SUFFIX, GRAPH_NAME, MANIFEST_NAME, PARITY_NAME
from .guidance import GAGConfig
from .models import FAMILIES, ImageShape, Precision, descriptors_for
from .parity import ParityError, compare_with_reference, load_reference, record_reference, tolerance_dict

log = logging.getLogger(__name__)

MANIFEST_FORMAT_VERSION = 1
EXPORTERS = ("dynamo", "legacy")
DEFAULT_OPSET = 20
OPSET_RANGE = (17, 20)  # what this exporter path was validated on; TensorRT 10.0 parses 9..20
LARGE_WEIGHTS_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole file
DEFAULT_EXPORT_GAG = GAGConfig(method="bisect")

_ONNX_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}
_FLOAT_RANK = {10: 1, 16: 1, 1: 2, 11: 3}  # fp16/bf16 < fp32 < fp64 (torch's promotion of float types)


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. `gag=None` exports the unmodified denoiser (the `--no-gag` baseline).

    `shape` is the static shape, or the opt shape of a dynamic export; `min_shape`/`max_shape`
    bound a dynamic export (default: `shape`). `opset` is always passed to the exporter explicitly.
    """

    model: str
    out_dir: Path
    shape: ImageShape
    dynamic: bool = False
    min_shape: ImageShape | None = None
    max_shape: ImageShape | None = None
    precision: Precision = Precision.FP32
    gag: GAGConfig | None = DEFAULT_EXPORT_GAG
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    slim: bool = False
    weights: str | None = None  # how the pipeline's weights were obtained (recorded in the manifest)
    seed: int = 0  # sample inputs for export tracing and parity
    components: tuple[str, ...] = ()  # only these components (default: all of the family's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.exporter not in EXPORTERS:
            raise InvalidInputError(f"ExportConfig.exporter: use one of {EXPORTERS}, got {self.exporter!r}")
        if not isinstance(self.opset, int) or not OPSET_RANGE[0] <= self.opset <= OPSET_RANGE[1]:
            raise InvalidInputError(
                f"ExportConfig.opset: {self.opset!r} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                "(TensorRT 10.0 parses up to opset 20)"
            )
        object.__setattr__(self, "components", tuple(self.components))
        if not self.dynamic and (self.min_shape is not None or self.max_shape is not None):
            raise InvalidInputError("min/max shapes need a dynamic export (--dynamic)")
        if self.dynamic:
            lo, hi = self.min_shape or self.shape, self.max_shape or self.shape
            for f in ("batch", "height", "width"):
                a, b, c = getattr(lo, f), getattr(self.shape, f), getattr(hi, f)
                if not a <= b <= c:
                    raise InvalidInputError(f"dynamic shape range: need min <= opt <= max for {f}, got {a}, {b}, {c}")

    @property
    def graphs_dir(self) -> Path:
        return self.out_dir / self.model

    @property
    def shape_range(self) -> tuple[ImageShape, ImageShape, ImageShape]:
        """(min, opt, max); all three equal for a static export."""
        if not self.dynamic:
            return self.shape, self.shape, self.shape
        return self.min_shape or self.shape, self.shape, self.max_shape or self.shape


@dataclass(frozen=True)
class ExportEvent:
    """Progress of one component, for the CLI's progress display (layers do not print).

    stage: "start" | "exported" | "slimmed" | "slim-rejected" | "done".
    """

    component: str
    stage: str
    index: int
    total: int
    nodes: int | None = None
    size_bytes: int | None = None
    seconds: float | None = None
    message: str = ""


@dataclass(frozen=True)
class ComponentStats:
    """Per-component figures of one export run (not written to the manifest)."""

    nodes: int
    size_bytes: int
    seconds: float
    nodes_before_slim: int | None = None
    slimmed: bool = False


@dataclass(frozen=True)
class Manifest:
    """`manifest.json` of one exported model: `data` is the JSON document as written."""

    graphs_dir: Path
    data: dict
    stats: dict[str, ComponentStats] = field(default_factory=dict, compare=False)

    @property
    def path(self) -> Path:
        return self.graphs_dir / MANIFEST_NAME

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def components(self) -> dict[str, dict]:
        return self.data["components"]

    @property
    def precision(self) -> Precision:
        return Precision.parse(self.data["dtype"])

    @property
    def gag(self) -> GAGConfig | None:
        gag = self.data.get("gag") or {}
        if not gag.get("enabled"):
            return None
        return GAGConfig(**{k: gag[k] for k in ("scale", "eta", "zeta", "alpha", "method", "layers")})

    def graph_path(self, component: str) -> Path:
        return self.graphs_dir / self.components[component]["path"]

    def shape(self) -> ImageShape:
        s = self.data["shape"]
        return ImageShape(batch=s["batch"], height=s["height"], width=s["width"])

    @classmethod
    def load(cls, graphs_dir: Path) -> Manifest:
        """Read `graphs_dir/manifest.json`; `ArtifactError` (one line) when missing or unreadable."""
        graphs_dir = Path(graphs_dir)
        path = graphs_dir / MANIFEST_NAME
        if not graphs_dir.is_dir():
            raise ArtifactError(f"{graphs_dir} does not exist: export the model first (`gag-export export --model NAME`)")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"no {MANIFEST_NAME} in {graphs_dir}: export the model first (`gag-export export`)") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ArtifactError(f"{path} is not a format-{MANIFEST_FORMAT_VERSION} gag-export manifest: re-export the model")
        for key in ("model", "dtype", "components", "shape"):
            if key not in data:
                raise ArtifactError(f"{path} has no {key!r}: re-export the model")
        if not isinstance(data["components"], dict) or not data["components"]:
            raise ArtifactError(f"{path} lists no components: re-export the model")
        for name, comp in data["components"].items():
            for key in ("role", "path", "sha256", "inputs", "outputs"):
                if not isinstance(comp, dict) or key not in comp:
                    raise ArtifactError(f"{path}: component {name!r} has no {key!r}: re-export the model")
        manifest = cls(graphs_dir, data)
        manifest._check_values()
        return manifest

    def _check_values(self) -> None:
        """The values every reader relies on, read once here: a manifest edited by hand (or damaged)
        is an ArtifactError naming the field, not an invalid-input error from deep in a command."""
        problems = []
        if self.data.get("family", "sdxl") not in FAMILIES:
            problems.append(f"family {self.data.get('family')!r} is not one of {FAMILIES}")
        try:
            self.precision
        except InvalidInputError as exc:
            problems.append(f"dtype: {exc}")
        shape = self.data["shape"]
        sizes = {key: shape.get(key) if isinstance(shape, dict) else None for key in ("batch", "height", "width")}
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"shape.{key} must be a positive integer, got {value!r}")
        try:
            self.gag
        except (InvalidInputError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"gag: {exc}")
        if problems:
            raise ArtifactError(f"{self.path}: {'; '.join(problems)}; re-export the model")


# --------------------------------------------------------------------------------------------
# Reading graphs back: digests, I/O, node counts
# --------------------------------------------------------------------------------------------


def data_path(onnx_path: Path) -> Path:
    """Where a graph's external data file lives (`model.onnx.data`)."""
    return Path(str(onnx_path) + DATA_SUFFIX)


def _sha256_files(paths: Iterable[Path], chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def graph_sha256(onnx_path: Path) -> str:
    """The manifest's `sha256` of a graph: SHA-256 over `model.onnx` then `model.onnx.data` (if present)."""
    onnx_path = Path(onnx_path)
    data = data_path(onnx_path)
    return _sha256_files([onnx_path, data] if data.exists() else [onnx_path])


def dtype_name(elem_type: int) -> str:
    return _ONNX_DTYPE_NAMES.get(elem_type) or f"onnx:{elem_type}"


def onnx_element_type(name: str) -> int:
    """The ONNX element type of a manifest dtype name (the inverse of `dtype_name`)."""
    return next(code for code, known in _ONNX_DTYPE_NAMES.items() if known == name)


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


# --------------------------------------------------------------------------------------------
# Sample inputs and parity (polygraphy's comparator)
# --------------------------------------------------------------------------------------------


def sample_feed(descriptor, shape: ImageShape, precision: Precision, seed: int, gag: bool) -> OrderedDict[str, np.ndarray]:
    """The descriptor's sample inputs at `shape` as a name -> array feed, in graph order and types."""
    tensors = descriptor.sample_inputs(shape, precision, seed, gag=gag)
    return OrderedDict((spec.name, to_numpy(tensors[spec.name])) for spec in descriptor.inputs(precision, gag=gag))


# --------------------------------------------------------------------------------------------
# Graph repairs and slimming
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _resource_error(exc: BaseException) -> ResourceExhaustedError | None:
    """A `ResourceExhaustedError` if `exc` (or what caused it) is out-of-disk or out-of-memory."""
    seen = exc
    while seen is not None:
        if isinstance(seen, MemoryError):
            return ResourceExhaustedError("out of memory while exporting; nothing half-written was left "
                                          "(export fewer/smaller components, or use a machine with more RAM)")
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhaustedError(f"out of disk space while writing graphs ({seen}); nothing half-written was left")
        seen = seen.__cause__ or seen.__context__
    return None


def denoiser_module(pipe) -> torch.nn.Module | None:
    """The pipeline's UNet or transformer, or None when it was loaded without one."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _set_gag(pipe, gag: GAGConfig | None) -> list[str]:
    """Apply `gag` to the pipeline's denoiser (or remove GAG for None); the rewritten layers."""
    denoiser = denoiser_module(pipe)
    if denoiser is None:
        return []
    if gag is not None:
        return apply_gag(denoiser, gag)
    if is_gag_applied(denoiser):
        remove_gag(denoiser)
    return []


def _weights_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _profile_dict(descriptor, config: ExportConfig, input_specs: list[dict]) -> dict:
    """`{input: {"min", "opt", "max"}}` for every graph input; static graphs: all three the shape."""
    lo, opt, hi = config.shape_range
    raw = descriptor.profile(lo, opt, hi) or {}
    profile = {}
    for spec in input_specs:
        name = spec["name"]
        entry = raw.get(name)
        if entry is None:
            if any(not isinstance(d, int) for d in spec["shape"]):
                raise GagExportError(f"{descriptor.name}: profile() gives no range for dynamic input {name!r}")
            entry = (spec["shape"],) * 3
        if isinstance(entry, Mapping):
            entry = (entry["min"], entry["opt"], entry["max"])
        mn, op, mx = ([int(d) for d in s] for s in entry)
        if not config.dynamic:
            mn = mx = op
        profile[name] = {"min": mn, "opt": op, "max": mx}
    return profile


def _dynamic_shapes(descriptor, input_names: list[str]) -> tuple:
    axes = descriptor.dynamic_axes() or {}
    return tuple(({int(a): str(n) for a, n in axes[name].items()} if axes.get(name) else None) for name in input_names)


def _check_exported_io(descriptor, model, specs: list, config: ExportConfig) -> None:
    """The saved graph's I/O must be the descriptor's: names, order, dtypes, ranks, symbolic axes."""
    inputs, outputs = graph_io(model)
    for got, want in ((inputs, specs[0]), (outputs, specs[1])):
        got_io = [(g["name"], g["dtype"], len(g["shape"])) for g in got]
        want_io = [(w.name, w.dtype, len(w.shape)) for w in want]
        if got_io != want_io:
            raise GagExportError(
                f"{descriptor.name}: the exported graph's I/O (name, dtype, rank) {got_io} differs from the "
                f"descriptor's {want_io}"
            )
    if config.dynamic:
        axes = descriptor.dynamic_axes() or {}
        for spec in inputs:
            for axis, symbol in (axes.get(spec["name"]) or {}).items():
                if isinstance(spec["shape"][int(axis)], int):
                    raise GagExportError(
                        f"{descriptor.name}: dynamic axis {axis} ({symbol}) of input {spec['name']!r} was "
                        f"specialized to {spec['shape'][int(axis)]} by the exporter"
                    )


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporters log every pass at INFO; keep them at WARNING while exporting."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trace(descriptor, module: torch.nn.Module, args: tuple, config: ExportConfig, input_names, output_names,
           dest: Path, external: bool):
    """Run the exporter; return the ModelProto, or None when it was saved straight to `dest` (large)."""
    import onnx

    if config.exporter == "dynamo":
        with _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=config.opset, input_names=input_names,
                output_names=output_names, optimize=True, verbose=False,
                dynamic_shapes=_dynamic_shapes(descriptor, input_names) if config.dynamic else None,
            )
        if external:  # weights straight from the exporter's IR to model.onnx.data, no 10 GB proto in memory
            program.save(str(dest), external_data=True)
            return None
        return program.model_proto
    # legacy (TorchScript) exporter: deprecated, kept for comparison; one scratch folder, loaded back
    axes = descriptor.dynamic_axes() if config.dynamic else {}
    scratch = dest.parent / ".legacy"
    scratch.mkdir()
    try:
        torch.onnx.export(
            module, args, str(scratch / GRAPH_NAME), dynamo=False, opset_version=config.opset,
            input_names=input_names, output_names=output_names, do_constant_folding=True,
            dynamic_axes={k: {int(a): str(n) for a, n in v.items()} for k, v in (axes or {}).items() if v} or None,
        )
        return onnx.load(str(scratch / GRAPH_NAME))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export_one(descriptor, module: torch.nn.Module, config: ExportConfig, precision: Precision, gag: bool,
                dest: Path) -> int:
    """Export one component to `dest` (model.onnx in the temp folder); return its node count."""
    import onnx

    specs = (descriptor.inputs(precision, gag=gag), descriptor.outputs(precision, gag=gag))
    input_names, output_names = [s.name for s in specs[0]], [s.name for s in specs[1]]
    # Dynamic exports trace from a batch-2 example (EXPORT-NOTES: batch 1 specializes or breaks).
    trace_shape = dataclasses.replace(config.shape, batch=2) if config.dynamic else config.shape
    args = tuple(to_torch(v) for v in sample_feed(descriptor, trace_shape, precision, config.seed, gag).values())
    external = _weights_bytes(module) > LARGE_WEIGHTS_BYTES
    module.eval()
    with torch.no_grad():
        model = _trace(descriptor, module, args, config, input_names, output_names, dest, external)
    if model is None:  # saved by the exporter; repair (if needed) without loading the weights
        model = load_graph_structure(dest)
        if promote_concat_inputs(model) + name_output_dims(model, specs[1]):
            onnx.save_model(model, str(dest))  # the initializers' external-data references are kept
    else:
        promote_concat_inputs(model)
        name_output_dims(model, specs[1])
        save_graph(model, dest, external=external)
    if external and not data_path(dest).exists():
        raise GagExportError(f"{descriptor.name}: expected the external data file {data_path(dest).name} beside {dest}")
    structure = load_graph_structure(dest)
    _check_exported_io(descriptor, structure, specs, config)
    return len(structure.graph.node)


def _component_entry(descriptor, config: ExportConfig, precision: Precision, comp_dir: Path, root: Path) -> dict:
    onnx_path = comp_dir / GRAPH_NAME
    structure = load_graph_structure(onnx_path)
    inputs, outputs = graph_io(structure)
    data = data_path(onnx_path)
    external = None
    size = onnx_path.stat().st_size
    if data.exists():
        external = {"path": data.relative_to(root).as_posix(), "sha256": _sha256_files([data]),
                    "size_bytes": data.stat().st_size}
        size += external["size_bytes"]
    return {
        "role": descriptor.role,
        "path": onnx_path.relative_to(root).as_posix(),
        "external_data": external,
        "sha256": graph_sha256(onnx_path),
        "size_bytes": size,
        "nodes": len(structure.graph.node),
        "inputs": inputs,
        "outputs": outputs,
        "profile": _profile_dict(descriptor, config, inputs),
        "tolerance": tolerance_dict(descriptor.tolerance(precision)),
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"gag_export": __version__, "torch": torch.__version__}
    for dist in ("diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxslim", "polygraphy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _manifest_head(entry, config: ExportConfig, rewritten: list[str]) -> dict:
    gag = config.gag
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "model": config.model,
        "family": entry.family,
        "source": entry.source.describe(),
        "revision": getattr(entry.source, "revision", None),
        "weights": config.weights or ("tiny" if entry.is_tiny else "pretrained"),
        "dtype": config.precision.value,
        "dynamic": config.dynamic,
        "opset": config.opset,
        "exporter": config.exporter,
        "shape": {"batch": config.shape.batch, "height": config.shape.height, "width": config.shape.width},
        "gag": ({"enabled": True, **gag.to_dict(), "rewritten": rewritten} if gag is not None
                else {"enabled": False, "rewritten": []}),
        "components": {},
        "versions": versions(),
    }


def _selected(descriptors, config: ExportConfig) -> list:
    """The descriptors to export, after checking the shapes against each (InvalidInputError early)."""
    descriptors = list(descriptors)
    names = [d.name for d in descriptors]
    unknown = [c for c in config.components if c not in names]
    if unknown:
        raise InvalidInputError(f"{config.model} has no component {', '.join(map(repr, unknown))}; it has {', '.join(names)}")
    chosen = [d for d in descriptors if not config.components or d.name in config.components]
    for d in chosen:
        for s in config.shape_range:
            d.dim_values(s)
        if config.dynamic:
            d.profile(*config.shape_range)
    return chosen


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` with its floating-point weights in `dtype`, cast while copying: no second
    full-precision copy is ever made (an fp32 SDXL UNet is 10 GB)."""
    memo = {}
    for p in module.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
    for b in module.buffers():
        memo.setdefault(id(b), b.detach().to(dtype) if b.is_floating_point() else b.detach().clone())
    return copy.deepcopy(module, memo)


def _reduced_view(pipe, attr: str, dtype: torch.dtype, gag: GAGConfig | None):
    """A pipeline object whose `attr` component is a cast copy of `pipe`'s (GAG applied to it when
    it is the denoiser); every other component is `pipe`'s own. One component at a time: its copy
    goes when the view does, so a reduced export holds the fp32 pipeline plus one reduced part."""
    module = getattr(pipe, attr)
    denoiser = module is denoiser_module(pipe)
    if denoiser:
        _set_gag(pipe, None)  # applied again below: a deep-copied forward hook would point back at pipe's module
    try:
        reduced = _cast_copy(module, dtype)
    finally:
        if denoiser:
            _set_gag(pipe, gag)
    if denoiser and gag is not None:
        apply_gag(reduced, gag)
    view = copy.copy(pipe)
    setattr(view, attr, reduced)
    return view


def _release(pipe, attr: str) -> None:
    """Drop a component's weights from a pipeline handed over to the export (`release=True`): its
    tensors move to the meta device (no storage), so the module and its config stay describable."""
    module = getattr(pipe, attr, None)
    if isinstance(module, torch.nn.Module):
        module.to("meta")


# A partial export (`components=...`) adds to the export already in the folder: the whole folder
# is swapped into place, so the components it does not re-export are carried over, and only from
# an export whose settings (everything in the manifest head but the library versions) are the
# ones of this run; otherwise the manifest would describe graphs made some other way.
_PER_RUN_KEYS = ("components", "versions")


def _previous_export(config: ExportConfig, names: Sequence[str]) -> Manifest | None:
    """The export a partial export adds to, or None when this export replaces the whole folder."""
    if not config.components or set(names) <= set(config.components) or not config.graphs_dir.exists():
        return None
    try:
        return Manifest.load(config.graphs_dir)
    except ArtifactError as exc:
        raise ArtifactError(f"cannot add {', '.join(config.components)} to {config.graphs_dir} without deleting its "
                            f"other components ({exc}); export every component (no --component) or remove the "
                            "folder") from None


def _comparable_head(head: Mapping) -> dict:
    """The settings of a manifest head as JSON reads them back (tuples as lists, inf as Infinity)."""
    same = {k: v for k, v in head.items() if k not in _PER_RUN_KEYS}
    same["gag"] = {k: v for k, v in (head.get("gag") or {}).items() if k != "rewritten"}  # depends on what was loaded
    return json.loads(json.dumps(same))


def _range_differs(comp: Mapping, descriptor, config: ExportConfig) -> bool:
    """Whether a kept component's min/max profile is not the one `config` asks for (dynamic exports).

    Only symbolic axes are compared, against the descriptor's value of the symbol: the fixed
    dims are the graph's own and need no loaded weights to be right.
    """
    lo, _, hi = config.shape_range
    wanted = {"min": descriptor.dim_values(lo), "max": descriptor.dim_values(hi)}
    try:
        for spec in comp["inputs"]:
            recorded = comp["profile"][spec["name"]]
            for axis, dim in enumerate(spec["shape"]):
                if isinstance(dim, str) and any(recorded[b][axis] != wanted[b].get(dim) for b in wanted):
                    return True
    except (KeyError, IndexError, TypeError):
        return True  # no readable profile: nothing shows the range is the same
    return False


def _components_to_keep(previous: Manifest | None, entry, config: ExportConfig, chosen: Sequence[str]) -> dict[str, dict]:
    """{name: manifest entry} of the previous export's components this export carries over.

    InvalidInputError when the previous export was made with other settings (carrying its
    components over would mix two exports), ArtifactError when a kept component's files are gone.
    """
    if previous is None:
        return {}
    there, now = _comparable_head(previous.data), _comparable_head(_manifest_head(entry, config, []))
    differences = [f"{key} {there.get(key)!r} there, {now.get(key)!r} now"
                   for key in dict.fromkeys([*now, *there]) if there.get(key) != now.get(key)]
    kept = {name: comp for name, comp in previous.components.items() if name not in chosen}
    if config.dynamic and not differences:
        descriptors = {d.name: d for d in descriptors_for(entry)}
        differences += [f"{name}'s dynamic shape range" for name, comp in kept.items()
                        if name not in descriptors or _range_differs(comp, descriptors[name], config)]
    if differences:
        raise InvalidInputError(
            f"{config.graphs_dir} holds an export made with other settings ({'; '.join(differences)}): exporting only "
            f"{', '.join(chosen)} would mix the two; use that export's settings, or export every component (no --component)")
    for name, comp in kept.items():
        for path in _component_files(previous.graphs_dir, comp):
            if not path.is_file():
                raise ArtifactError(f"{path} is missing: cannot keep {name} in {previous.graphs_dir}; export it too "
                                    f"(--component {name}) or every component")
    return kept


def _component_files(graphs_dir: Path, comp: Mapping) -> list[Path]:
    graph = graphs_dir / comp["path"]
    return [graph, graphs_dir / comp["external_data"]["path"]] if comp.get("external_data") else [graph]


def _carry_over(previous: Manifest, kept: Mapping[str, dict], tmp: Path) -> None:
    """Put the kept components' folders into the temp folder: hard links where the file system
    allows (no second copy of a 10 GB UNet; nothing ever writes a graph in place), else copies."""
    for comp in kept.values():
        folder = Path(comp["path"]).parent
        shutil.copytree(previous.graphs_dir / folder, tmp / folder, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merged_components(manifest: dict, previous: Manifest, kept: Mapping[str, dict], order: Sequence[str]) -> None:
    """Add the kept entries to `manifest` in the family's order; a kept denoiser keeps its GAG layer list."""
    components = {**kept, **manifest["components"]}
    manifest["components"] = {name: components[name] for name in dict.fromkeys([*order, *components])
                              if name in components}
    if any(comp["role"] == "denoiser" for comp in kept.values()) and manifest["gag"]["enabled"]:
        manifest["gag"]["rewritten"] = previous.data["gag"].get("rewritten", [])


def export_model(pipe, entry, config: ExportConfig, progress: Callable[[ExportEvent], None] | None = None,
                 release: bool = False) -> Manifest:
    """Export every component of `entry` from `pipe` into `config.graphs_dir`; return the manifest.

    GAG (`config.gag`) is applied to the denoiser for the export and removed afterwards (also from
    `pipe`); the denoiser graph then takes `gag_scale`, `gag_eta`, `gag_zeta` as 0-d float32
    inputs. fp16/bf16 exports work on a cast copy of one component of `pipe` at a time. With
    `config.slim`, each graph goes through onnxslim and the slimmed graph is kept only if parity
    against torch eager (fp32) still holds. Torch's fp32 outputs for each component's sample feed
    are recorded beside its graph first (`parity.npz`, named in the manifest; not for bf16, which
    ONNX Runtime's CPU provider cannot run), so that `check` compares without loading the model.
    `release`: the caller hands `pipe` over; each component's weights are dropped from it (moved
    to the meta device) as soon as they are no longer needed (the fp32 module of a reduced export once its
    reference is recorded and its copy made), so that a 14 GB fp32 SDXL pipeline and the export
    of its fp16 UNet fit in 24 GB. On any failure nothing is left half-written (see the module
    docstring).
    """
    notify = progress or (lambda event: None)
    try:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = as_if_created_plainly(Path(tempfile.mkdtemp(prefix=f".{config.model}.", suffix=".tmp", dir=config.out_dir)))
    except OSError as exc:
        raise _resource_error(exc) or ArtifactError(f"cannot write to {config.out_dir}: {exc}") from None
    stats: dict[str, ComponentStats] = {}
    try:
        family_descriptors = descriptors_for(entry, pipe)
        descriptors = _selected(family_descriptors, config)
        order = [d.name for d in family_descriptors]
        previous = _previous_export(config, order)
        kept = _components_to_keep(previous, entry, config, [d.name for d in descriptors])  # before the slow part
        if any(d.role == "denoiser" for d in descriptors) and denoiser_module(pipe) is None:
            raise InvalidInputError(f"the {config.model} pipeline was loaded without its denoiser")
        rewritten = _set_gag(pipe, config.gag)
        manifest = _manifest_head(entry, config, rewritten)
        for index, descriptor in enumerate(descriptors):
            gag = config.gag is not None and descriptor.role == "denoiser"
            notify(ExportEvent(descriptor.name, "start", index, len(descriptors)))
            comp_dir = tmp / descriptor.name
            comp_dir.mkdir()
            dest = comp_dir / GRAPH_NAME
            start = time.perf_counter()
            precision = descriptor.export_dtype(config.precision)
            outputs = [spec.name for spec in descriptor.outputs(precision, gag=gag)]
            reference = None  # torch's fp32 outputs, recorded first: then the fp32 module may go
            if precision is not Precision.BF16:  # ORT's CPU provider runs no bf16: nothing to compare with
                feed = sample_feed(descriptor, config.shape, precision, config.seed, gag)
                reference = record_reference(comp_dir / PARITY_NAME, descriptor.export_module(pipe), feed, outputs,
                                             tmp, config.seed)
            if precision is Precision.FP32:
                work = pipe
            else:
                work = _reduced_view(pipe, descriptor.module_attr, precision.torch_dtype, config.gag)
                if release:  # the fp32 weights are needed no more: only the reduced copy is exported
                    _release(pipe, descriptor.module_attr)
            module = descriptor.export_module(work)
            try:
                nodes = _export_one(descriptor, module, config, precision, gag, dest)
            except (GagExportError, MemoryError, OSError):
                raise
            except Exception as exc:
                if (res := _resource_error(exc)) is not None:
                    raise res from exc
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise GagExportError(f"exporting {config.model}/{descriptor.name} failed: {type(exc).__name__}: {first}") from exc
            del module, work
            if release:
                _release(pipe, descriptor.module_attr)
            notify(ExportEvent(descriptor.name, "exported", index, len(descriptors), nodes=nodes,
                               seconds=time.perf_counter() - start))
            before, slimmed = None, False
            if config.slim:
                before, slimmed = _slim_component(descriptor, reference and load_reference(tmp, reference), config,
                                                  dest, notify, index, len(descriptors))
            entry_json = _component_entry(descriptor, config, precision, comp_dir, tmp)
            if reference is not None:
                entry_json["parity_reference"] = reference
            manifest["components"][descriptor.name] = entry_json
            stats[descriptor.name] = ComponentStats(entry_json["nodes"], entry_json["size_bytes"],
                                                    time.perf_counter() - start, before, slimmed)
            notify(ExportEvent(descriptor.name, "done", index, len(descriptors), nodes=entry_json["nodes"],
                               size_bytes=entry_json["size_bytes"], seconds=stats[descriptor.name].seconds))
        if kept:
            _carry_over(previous, kept, tmp)
            _merged_components(manifest, previous, kept, order)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_into_place(tmp, config.graphs_dir)
    except GagExportError:
        raise
    except BaseException as exc:  # KeyboardInterrupt included: the temp folder goes in `finally`
        if (res := _resource_error(exc)) is not None:
            raise res from exc
        if isinstance(exc, OSError):
            raise ArtifactError(f"cannot write graphs under {config.out_dir}: {exc}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _set_gag(pipe, None)
    log.info("exported %s (%d components) to %s", config.model, len(stats), config.graphs_dir)
    return Manifest(config.graphs_dir, manifest, stats)


def _slim_component(descriptor, reference, config: ExportConfig, dest: Path, notify, index: int,
                    total: int) -> tuple[int, bool]:
    """onnxslim one exported graph; keep the result only if parity against torch's recorded
    outputs still holds (`reference`: None for bf16, which ONNX Runtime's CPU provider cannot run)."""
    slim_dest = dest.with_name("slim.onnx")
    start = time.perf_counter()
    before, after = slim_graph(dest, slim_dest)
    if reference is None:
        ok, verdict = False, "cannot be verified: ONNX Runtime's CPU provider has no bfloat16 kernels"
    else:
        tolerance = tolerance_dict(descriptor.tolerance(config.precision))
        try:
            results = compare_with_reference(slim_dest, reference, tolerance)
            ok, verdict = all(results), "; ".join(map(str, results))
        except ParityError as exc:
            ok, verdict = False, str(exc)
    if ok:
        os.replace(slim_dest, dest)
        if data_path(slim_dest).exists():
            os.replace(data_path(slim_dest), data_path(dest))
        log.info("%s: onnxslim %d -> %d nodes, parity holds (%s)", descriptor.name, before, after, verdict)
        notify(ExportEvent(descriptor.name, "slimmed", index, total, nodes=after, seconds=time.perf_counter() - start,
                           message=f"{before} -> {after} nodes"))
    else:
        slim_dest.unlink(missing_ok=True)
        data_path(slim_dest).unlink(missing_ok=True)
        log.warning("%s: onnxslim result rejected (%d -> %d nodes; parity: %s); keeping the unslimmed graph",
                    descriptor.name, before, after, verdict)
        notify(ExportEvent(descriptor.name, "slim-rejected", index, total, nodes=before,
                           message=f"{before} -> {after} nodes rejected: {verdict}"))
    return before, ok
