"""Shape profiles from a manifest, and the ONNX nodes of the GAG attention core (for the 10.x
weakly typed path's fp32 pinning)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError, InvalidInputError
from ..core.names import MANIFEST_NAME
from ..export.graphs import in_modules, node_module
from .options import ShapeMode

GAG_SCALAR_PREFIX = "gag_"


def load_manifest(graphs_dir: Path) -> dict:
    """`graphs_dir/manifest.json` as a dict, read and checked by the one reader (`artifacts.manifest`)."""
    return Manifest.load(Path(graphs_dir)).data


@dataclass(frozen=True)
class InputRange:
    """min/opt/max shapes of one engine input (`()` for a 0-d scalar such as `gag_scale`)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: an `InputRange` per engine input, in the manifest's order."""

    inputs: tuple[InputRange, ...]

    @property
    def is_static(self) -> bool:
        return all(r.is_static for r in self.inputs)

    def to_dict(self) -> dict:
        return {r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.inputs}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_polygraphy(self):
        """A `polygraphy.backend.trt.Profile` (constructing it does not need tensorrt)."""
        from polygraphy.backend.trt import Profile  # noqa: PLC0415

        profile = Profile()
        for r in self.inputs:
            profile.add(r.name, min=r.min, opt=r.opt, max=r.max)
        return profile


def _graph_is_static(manifest: Mapping, component: Mapping) -> bool:
    if manifest.get("dynamic") is False:
        return True
    return all(isinstance(d, int) for inp in component.get("inputs", []) for d in inp.get("shape", []))


def derive_profile(manifest: Mapping, component_name: str, mode: ShapeMode, *, graphs_dir: Path) -> ShapeProfile:
    """The optimization profile of one component, from `components.<name>.{inputs, profile}`.

    Every manifest input becomes an engine input, 0-d `gag_*` scalars included (shape `()`).
    `STATIC` collapses each range to its `opt` shape; `DYNAMIC` refuses a static graph.
    """
    component = manifest["components"][component_name]
    where = f"{Path(graphs_dir) / MANIFEST_NAME}: components.{component_name}"
    if mode is ShapeMode.DYNAMIC and _graph_is_static(manifest, component):
        raise InvalidInputError(
            f"{graphs_dir} was exported with static shapes (component {component_name!r} takes only the "
            f"exported shapes), so it cannot give a dynamic-shape engine. Re-export with "
            f"`gag-export export --dynamic`, or build without --dynamic."
        )
    ranges_in = component.get("profile") or {}
    inputs = component.get("inputs")
    if not inputs:
        raise ArtifactError(f"{where} lists no inputs: re-export the model")
    ranges = []
    for inp in inputs:
        name, shape = inp["name"], list(inp.get("shape", []))
        entry = ranges_in.get(name)
        if entry is None:
            if any(not isinstance(d, int) for d in shape):
                raise ArtifactError(f"{where}.profile has no min/opt/max for dynamic input {name!r} {shape}")
            entry = {"min": shape, "opt": shape, "max": shape}
        try:
            lo, opt, hi = (tuple(int(d) for d in entry[k]) for k in ("min", "opt", "max"))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}.profile.{name} needs integer lists 'min', 'opt' and 'max': {entry}") from None
        for label, dims in (("min", lo), ("opt", opt), ("max", hi)):
            if len(dims) != len(shape):
                raise ArtifactError(f"{where}.profile.{name}.{label} {list(dims)} has rank {len(dims)}; input {name!r} is {shape}")
        for axis, dim in enumerate(shape):
            if not lo[axis] <= opt[axis] <= hi[axis]:
                raise ArtifactError(
                    f"{where}.profile.{name}: axis {axis} needs min <= opt <= max, got {lo[axis]}, {opt[axis]}, {hi[axis]}"
                )
            if lo[axis] < 0:
                raise ArtifactError(f"{where}.profile.{name}: axis {axis} has a negative size {lo[axis]}")
            if isinstance(dim, int) and not dim == lo[axis] == hi[axis]:
                raise ArtifactError(
                    f"{where}.profile.{name}: axis {axis} is static ({dim}) in the graph but the profile says "
                    f"{lo[axis]}..{hi[axis]}"
                )
        if mode is ShapeMode.STATIC:
            lo = hi = opt
        ranges.append(InputRange(name, lo, opt, hi))
    return ShapeProfile(tuple(ranges))


def gag_node_names(onnx_path: Path, modules: Iterable[str]) -> tuple[str, ...]:
    """Names of the ONNX nodes computed directly by the given attention modules (not by their
    projections `to_q`/`to_out`/norms, which are child modules): the GAG attention core."""
    import onnx  # noqa: PLC0415

    wanted = tuple(modules)
    model = onnx.load(str(onnx_path), load_external_data=False)
    return tuple(n.name for n in model.graph.node if n.name and in_modules(node_module(n), wanted))


def layer_from_nodes(layer_name: str, node_names: frozenset[str]) -> bool:
    """Whether a TensorRT layer came from one of these ONNX nodes (the parser names a node's layers
    after the node, with `_<n>` suffixes for the extra ones)."""
    name = layer_name
    for _ in range(3):
        if name in node_names:
            return True
        stripped = re.sub(r"_\d+$", "", name)
        if stripped == name:
            return False
        name = stripped
    return False


__all__ = ["GAG_SCALAR_PREFIX", "InputRange", "ShapeProfile", "derive_profile", "gag_node_names", "layer_from_nodes", "load_manifest"]
