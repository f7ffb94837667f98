"""A partial export (`components=...`) adds to the export already in the folder.

The whole folder is swapped into place, so the components it does not re-export are carried over
(hard links), and only from an export whose settings (everything in the manifest head but the
library versions) are the ones of this run; otherwise the manifest would describe graphs made
some other way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..artifacts.manifest import Manifest
from ..core.atomic import link_or_copy
from ..core.errors import ArtifactError, InvalidInputError
from ..models import descriptors_for
from .config import ExportConfig

_PER_RUN_KEYS = ("components", "versions")


def previous_export(config: ExportConfig, names: Sequence[str]) -> Manifest | None:
    """The export a partial export adds to, or None when this export replaces the whole folder."""
    if not config.components or set(names) <= set(config.components) or not config.graphs_dir.exists():
        return None
    try:
        return Manifest.load(config.graphs_dir)
    except ArtifactError as exc:
        raise ArtifactError(f"cannot add {', '.join(config.components)} to {config.graphs_dir} without deleting its "
                            f"other components ({exc}); export every component (no --component) or remove the "
                            "folder") from None


# gag entries that describe the exported denoiser (what was loaded, its per-layer order and the
# calibrated defaults applied to it), not the export's settings: a kept denoiser keeps them
_DENOISER_GAG_KEYS = ("rewritten", "layer_names", "defaults")


def _comparable_head(head: Mapping) -> dict:
    """The settings of a manifest head as JSON reads them back (tuples as lists, inf as Infinity)."""
    same = {k: v for k, v in head.items() if k not in _PER_RUN_KEYS}
    same["gag"] = {k: v for k, v in (head.get("gag") or {}).items() if k not in _DENOISER_GAG_KEYS}
    same.setdefault("loras", [])  # exports older than LoRA support had none
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


def components_to_keep(previous: Manifest | None, entry, config: ExportConfig, chosen: Sequence[str],
                       head: Mapping) -> dict[str, dict]:
    """{name: manifest entry} of the previous export's components this export carries over.

    InvalidInputError when the previous export was made with other settings (carrying its
    components over would mix two exports), ArtifactError when a kept component's files are gone.
    """
    if previous is None:
        return {}
    there, now = _comparable_head(previous.data), _comparable_head(head)
    differences = [f"{key} {there.get(key)!r} there, {now.get(key)!r} now"
                   for key in dict.fromkeys([*now, *there]) if there.get(key) != now.get(key)]
    kept = {name: comp for name, comp in previous.components.items() if name not in chosen}
    if config.dynamic and not differences:
        descriptors = {d.name: d for d in descriptors_for(entry, img2img=True)}
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


def carry_over(previous: Manifest, kept: Mapping[str, dict], tmp: Path) -> None:
    """Put the kept components' folders into the temp folder: hard links where the file system
    allows (no second copy of a 10 GB UNet; nothing ever writes a graph in place), else copies."""
    for comp in kept.values():
        folder = Path(comp["path"]).parent
        shutil.copytree(previous.graphs_dir / folder, tmp / folder, copy_function=link_or_copy)


def merged_components(manifest: dict, previous: Manifest, kept: Mapping[str, dict], order: Sequence[str]) -> None:
    """Add the kept entries to `manifest` in the family's order; a kept denoiser keeps its GAG layer list."""
    components = {**kept, **manifest["components"]}
    manifest["components"] = {name: components[name] for name in dict.fromkeys([*order, *components])
                              if name in components}
    if any(comp["role"] == "denoiser" for comp in kept.values()) and manifest["gag"]["enabled"]:
        for key in _DENOISER_GAG_KEYS:  # an older denoiser (0-d inputs) has no layer_names
            manifest["gag"].pop(key, None)
            if key in previous.data["gag"]:
                manifest["gag"][key] = previous.data["gag"][key]
        manifest["gag"].setdefault("rewritten", [])


__all__ = ["carry_over", "components_to_keep", "merged_components", "previous_export"]
