"""A model's export as the runtime reads it: its manifest, its registry entry, its tensor specs, and
its graph files present at their recorded sizes, all checked before anything heavy is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..artifacts.integrity import verify_graphs
from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError
from .components import TensorSpec, spec_from_manifest


def _export_hint(model: str, graphs_root: Path) -> str:
    return f"`gag-export export --model {model} --out {graphs_root}`"


def model_entry(model: str, graphs_root: Path):
    """The registry entry of `model`, or, for graphs exported from a local folder, that folder's entry."""
    manifest = Manifest.load(Path(graphs_root) / model) if (Path(graphs_root) / model / "manifest.json").is_file() else None
    return entry_for(model, manifest)


def entry_for(model: str, manifest: Manifest | None):
    """`model_entry` with the manifest already read (None: there is no export)."""
    from ..models import manifest_entry, resolve_entry  # noqa: PLC0415

    return manifest_entry(manifest.data) if manifest is not None else resolve_entry(model)


def load_manifest_for(model: str, graphs_root: Path) -> Manifest:
    """`graphs_root/<model>/manifest.json`, or `ArtifactError` naming the command that makes it."""
    graphs_dir = Path(graphs_root) / model
    if not (graphs_dir / "manifest.json").is_file():
        raise ArtifactError(f"no exported graphs for {model} in {graphs_dir}: run {_export_hint(model, graphs_root)}")
    manifest = Manifest.load(graphs_dir)
    if manifest.model != model:
        raise ArtifactError(f"{graphs_dir}/manifest.json is for model {manifest.model!r}, not {model!r}: re-export it")
    return manifest


def check_graph_files(manifest: Manifest, graphs_root: Path) -> None:
    """Every component's graph is the one its manifest names: present, its size, its sha256
    (`artifacts.integrity`: hashed once per change of the file); else ArtifactError (exit 5)."""
    verify_graphs(manifest, hint=f"re-run {_export_hint(manifest.model, graphs_root)}")


def manifest_specs(entry: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return [spec_from_manifest(e) for e in entry["inputs"]], [spec_from_manifest(e) for e in entry["outputs"]]


__all__ = ["check_graph_files", "entry_for", "load_manifest_for", "manifest_specs", "model_entry"]
