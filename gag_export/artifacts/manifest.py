"""`graphs/<model>/manifest.json`: read and checked once, the graph digests, the dtype names.

What export writes (docs/DESIGN.md, "Manifest"); every reader (check, engine, runtime, triton,
bench) goes through `Manifest.load`, which turns a missing, damaged or hand-edited manifest into
an `ArtifactError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.atomic import write_atomic
from ..core.errors import ArtifactError, InvalidInputError
from ..core.gag_config import GAGConfig, GuidanceValue, guidance_value
from ..core.names import DATA_SUFFIX, FAMILIES, GAG_INPUTS, MANIFEST_NAME, PER_LAYER_GAG_INPUTS
from ..core.precision import Precision
from ..core.shapes import ImageShape

MANIFEST_FORMAT_VERSION = 1

_ONNX_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


@dataclass(frozen=True)
class Manifest:
    """`manifest.json` of one exported model: `data` is the JSON document as written."""

    graphs_dir: Path
    data: dict
    stats: dict = field(default_factory=dict, compare=False)  # export.ComponentStats of the run that wrote it

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

    @property
    def loras(self) -> list[dict]:
        """The LoRAs fused into the denoiser at export (`{"name", "sha256", "scale"}`); [] for none or older exports."""
        return list(self.data.get("loras") or [])

    @property
    def gag_layer_names(self) -> list[str] | None:
        """The rewritten layers in the order of the denoiser's per-layer gag_scale/gag_eta entries;
        None for an export made before per-layer guidance (its inputs are 0-d)."""
        names = (self.data.get("gag") or {}).get("layer_names")
        return list(names) if isinstance(names, list) else None

    @property
    def gag_defaults(self) -> dict[str, GuidanceValue]:
        """{"scale", "eta"}: what a request without them runs; calibrated per-layer values
        (`apply_gag_defaults`) in place of the export's own where they were applied."""
        gag = self.data.get("gag") or {}
        applied = gag.get("defaults") or {}
        return {key: tuple(applied[key]) if isinstance(applied.get(key), list) else applied.get(key, gag.get(key))
                for key in ("scale", "eta")}

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
        gag = self.data.get("gag")
        if not isinstance(gag, dict) or not isinstance(gag.get("enabled"), bool):
            problems.append(f"gag must be an object with a boolean 'enabled', got {gag!r}")
        else:
            try:
                self.gag
            except (InvalidInputError, ValueError, KeyError, TypeError) as exc:
                problems.append(f"gag: {exc}")
            problems += self._gag_input_problems(gag["enabled"])
            if gag["enabled"]:
                problems += self._gag_default_problems()
        problems += self._path_problems()
        problems += _lora_problems(self.data.get("loras", []))
        if problems:
            raise ArtifactError(f"{self.path}: {'; '.join(problems)}; re-export the model")

    def _gag_input_problems(self, enabled: bool) -> list[str]:
        """A GAG export's denoiser takes the `gag_*` inputs, a plain one none of them (so a manifest
        that says otherwise, `"gag": null` over a GAG graph, is refused rather than fed wrongly)."""
        problems = []
        for name, comp in self.components.items():
            names = {i.get("name") for i in comp["inputs"] if isinstance(i, dict)} if isinstance(comp["inputs"], list) else set()
            has = set(GAG_INPUTS) & names
            if comp["role"] == "denoiser" and enabled and not has:
                problems.append(f"gag.enabled is true but {name} takes no {'/'.join(GAG_INPUTS)} input")
            elif has and not enabled:
                problems.append(f"gag.enabled is false but {name} takes {sorted(has)}")
        return problems

    def _gag_default_problems(self) -> list[str]:
        """layer_names is a list of names as long as the per-layer inputs; applied defaults follow
        the value rules, one value or one per layer."""
        names = (self.data.get("gag") or {}).get("layer_names")
        if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            return [f"gag.layer_names must be a list of module names, got {names!r}"]
        problems = []
        for comp in self.components.values():
            for spec in comp["inputs"] if isinstance(comp["inputs"], list) else []:
                shape = spec.get("shape") if isinstance(spec, dict) else None
                if spec.get("name") in PER_LAYER_GAG_INPUTS and isinstance(shape, list) and len(shape) == 1 \
                        and isinstance(shape[0], int) and shape[0] != len(names or []):
                    problems.append(f"{spec['name']} has shape {spec.get('shape')}, gag.layer_names holds "
                                    f"{len(names or [])} layers")
        applied = self.data["gag"].get("defaults")
        if applied is not None and not isinstance(applied, dict):
            problems.append(f"gag.defaults must be an object, got {applied!r}")
        elif applied:
            for key in ("scale", "eta"):
                if key in applied:
                    try:
                        guidance_value(key, applied[key], len(names) if names else None)
                    except InvalidInputError as exc:
                        problems.append(f"gag.defaults.{exc}")
        return problems

    def _path_problems(self) -> list[str]:
        """Every component's file lies inside the export folder: a manifest never makes a reader
        open, copy or serve a file elsewhere (`/etc/passwd`, `../../x`)."""
        root = self.graphs_dir.resolve()
        problems = []
        for name, comp in self.components.items():
            path = comp["path"]
            if not isinstance(path, str) or not path or Path(path).is_absolute() \
                    or not (root / path).resolve().is_relative_to(root):
                problems.append(f"components.{name}.path {path!r} is not a file inside {self.graphs_dir}")
        return problems


def _lora_problems(loras) -> list[str]:
    """`loras`: a list of {"name": str, "sha256": 64 hex digits, "scale": finite number}."""
    if not isinstance(loras, list):
        return [f"loras must be a list, got {loras!r}"]
    problems = []
    for i, lora in enumerate(loras):
        ok = (isinstance(lora, dict) and isinstance(lora.get("name"), str) and isinstance(lora.get("sha256"), str)
              and re.fullmatch(r"[0-9a-f]{64}", lora["sha256"]) is not None
              and isinstance(lora.get("scale"), (int, float)) and not isinstance(lora["scale"], bool)
              and math.isfinite(lora["scale"]))
        if not ok:
            problems.append(f"loras[{i}] must be {{name, sha256 (hex), scale (finite)}}, got {lora!r}")
    return problems


def apply_gag_defaults(graphs_dir: Path, *, eta: GuidanceValue | list[float] | None = None,
                       scale: GuidanceValue | list[float] | None = None, source: str) -> None:
    """Record guidance defaults (calibrated ones, say) in an export's manifest: what `generate`, the
    API and the Triton pipeline run when a request gives no eta/scale.

    `eta`, `scale`: one number for every layer, or a list with one per rewritten layer in the
    order of the manifest's `gag.layer_names` (exports made before per-layer guidance take one
    number only). Values follow GAGConfig's rules (InvalidInputError). `source` says where they
    come from (`calibrate cal.json`). The manifest is rewritten atomically; the graphs, and so
    their digests and engines built from them, are untouched. None leaves a value as it was.
    """
    manifest = Manifest.load(graphs_dir)
    gag = manifest.data.get("gag") or {}
    if not gag.get("enabled"):
        raise InvalidInputError(f"{graphs_dir} was exported without GAG (--no-gag): it has no guidance to set defaults for")
    if not isinstance(source, str) or not source.strip():
        raise InvalidInputError("source: say where the defaults come from (a calibration file, a command)")
    names = manifest.gag_layer_names
    applied = dict(gag.get("defaults") or {})
    for key, value in (("eta", eta), ("scale", scale)):
        if value is not None:
            checked = guidance_value(key, list(value) if isinstance(value, tuple) else value, len(names) if names else None)
            applied[key] = list(checked) if isinstance(checked, tuple) else checked
    applied["source"] = source
    data = {**manifest.data, "gag": {**gag, "defaults": applied}}
    write_atomic(manifest.path, json.dumps(data, indent=2) + "\n")
    Manifest.load(graphs_dir)  # reads back what every reader will see


def data_path(onnx_path: Path) -> Path:
    """Where a graph's external data file lives (`model.onnx.data`)."""
    return Path(str(onnx_path) + DATA_SUFFIX)


def sha256_files(paths: Iterable[Path], chunk: int = 1 << 24) -> str:
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
    return sha256_files([onnx_path, data] if data.exists() else [onnx_path])


def graph_file_fields(onnx_path: Path, root: Path) -> dict:
    """A component entry's file fields for the graph at `onnx_path`: `path` (relative to `root`),
    `sha256` (graph_sha256), `size_bytes` (graph + data) and `external_data` (its own path, sha256
    and size; None without). The data file, gigabytes at full size, is read once for both digests."""
    onnx_path, root = Path(onnx_path), Path(root)
    data = data_path(onnx_path)
    whole = hashlib.sha256(onnx_path.read_bytes())
    external = None
    if data.exists():
        alone = hashlib.sha256()
        with open(data, "rb") as f:
            while block := f.read(1 << 24):
                whole.update(block)
                alone.update(block)
        external = {"path": data.relative_to(root).as_posix(), "sha256": alone.hexdigest(),
                    "size_bytes": data.stat().st_size}
    size = onnx_path.stat().st_size + (external["size_bytes"] if external else 0)
    return {"path": onnx_path.relative_to(root).as_posix(), "external_data": external,
            "sha256": whole.hexdigest(), "size_bytes": size}


def dtype_name(elem_type: int) -> str:
    return _ONNX_DTYPE_NAMES.get(elem_type) or f"onnx:{elem_type}"


def onnx_element_type(name: str) -> int:
    """The ONNX element type of a manifest dtype name (the inverse of `dtype_name`)."""
    return next(code for code, known in _ONNX_DTYPE_NAMES.items() if known == name)


__all__ = [
    "MANIFEST_FORMAT_VERSION", "Manifest", "apply_gag_defaults", "data_path", "dtype_name", "graph_file_fields", "graph_sha256", "onnx_element_type", "sha256_files",
]
