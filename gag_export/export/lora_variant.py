"""A LoRA variant of an existing export, without tracing the model again (`gag-export lora`).

    manifest = make_lora_variant(Path("graphs/tiny-sdxl"), Path("graphs-style"),  # -> graphs-style/tiny-sdxl
                                 [LoraSpec.parse("style.safetensors:0.8")])

The variant is a graphs root like export's `--out`: `<out>/<model>`, the model's name kept (the
runtime, `check` and the registry find an export by it), as `export --lora --out <out>` writes it.

The denoiser's weight map (`weight_map.py`, recorded at export) says which initializer holds each
parameter and how; the LoRA's deltas (`models.lora.lora_deltas`, fp32, in the parameters' shapes)
are added to those initializers' values (W + delta, computed in fp32 and stored in the
initializer's layout and dtype). Everything else is reused. A LoRA that touches a weight the map
cannot place is refused before anything is written.

How the variant's files relate to the original's (docs/DESIGN.md, "LoRA variants"):
- The original is never written: it is read, and its files are hard-linked or copied.
- The variant is self-contained: its manifest, graphs and data are all inside its own folder, so
  moving or deleting the original (or the variant) breaks nothing, and each folder's files are
  the ones its manifest's sha256 names (the integrity check every reader runs). A graph pointing
  at the original's external data would tie the variant to that folder's place and life, and
  its digest would cover a file outside it.
- Unchanged components are hard links (as an incremental export carries them over: nothing ever
  writes an artifact in place), so they cost no disk.
- The denoiser's external data (over 2 GB: SDXL's UNet) is cloned (`os.copy_file_range`: a
  reflink where the file system shares blocks, else a kernel-side copy) and the changed tensors
  are overwritten at their offsets in the clone, so the graph file itself is unchanged and the
  data keeps one file, as every reader (ONNX Runtime, TensorRT's parser, the Triton repository)
  expects. The cost is one sequential copy of the data; a graph without external data is
  rewritten whole (under 2 GB).
- The denoiser's recorded parity reference is dropped (it holds the outputs without the LoRA);
  `check` treats it as any LoRA export's (lora-fuse: its live parity is skipped).

The variant's manifest records every LoRA in it (the original's, then these) and where it came
from (`derived_from`: the original's folder and its manifest's sha256). fp16/bf16 graphs: the
delta is added to the stored (already rounded) weight, so a variant differs from a fresh
`export --lora` by one rounding step of the graph's dtype; fp32 graphs agree at fp32 rounding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..artifacts.integrity import verify_graphs
from ..artifacts.manifest import Manifest, data_path, graph_file_fields
from ..core.atomic import link_or_copy, make_temp_folder, remove_stale_temp_folders, swap_into_place, write_failure
from ..core.errors import ArtifactError, GagExportError, InvalidInputError
from ..core.names import MANIFEST_NAME
from ..models.lora import LoraSpec, lora_deltas
from .graphs import load_graph_structure
from .weight_map import WeightMap, WeightTarget, load_weight_map

log = logging.getLogger(__name__)


def denoiser_name(manifest: Manifest) -> str:
    names = [name for name, comp in manifest.components.items() if comp["role"] == "denoiser"]
    if not names:
        raise InvalidInputError(f"{manifest.graphs_dir} has no denoiser graph: a LoRA changes the denoiser; "
                                "export it (`gag-export export --component unet|transformer`)")
    return names[0]


def _denoiser_config(manifest: Manifest, component: str) -> Mapping | None:
    """The denoiser's config (diffusers places kohya SGM block names with it); None when unknown."""
    from ..models import manifest_entry
    from ..models.loading import entry_configs

    try:
        return entry_configs(manifest_entry(manifest.data)).get(component)
    except (GagExportError, OSError, KeyError):
        return None


def _clone(src: Path, dst: Path) -> None:
    """A copy of `src` the kernel makes (a reflink where the file system can), else a plain copy."""
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            remaining = os.fstat(fin.fileno()).st_size
            while remaining > 0:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        if remaining > 0:
            raise OSError("short copy")
    except (OSError, AttributeError):
        shutil.copyfile(src, dst)


def _external_location(init) -> dict | None:
    from onnx import TensorProto

    if init.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in init.external_data}


def _patched_values(structure, src: Path, placed: Mapping[str, tuple[WeightTarget, ...]],
                    deltas: Mapping, shapes: Mapping[str, tuple[int, ...]]):
    """(initializer proto, new value) for every initializer a delta changes."""
    from onnx import numpy_helper

    inits = {init.name: init for init in structure.graph.initializer}
    for name, targets in placed.items():
        delta = deltas[name].detach().cpu().float().numpy()
        for target in targets:
            init = inits.get(target.initializer)
            if init is None:
                raise ArtifactError(f"{src}: initializer {target.initializer!r} of the weight map is not in the graph; "
                                    "re-export the model")
            stored = numpy_helper.to_array(init, base_dir=str(src.parent))
            value = target.from_graph(stored, shapes[name]).astype(np.float32) + delta
            yield init, target.to_graph(value, stored.shape)


def _write_patched_graph(src: Path, dest: Path, placed, deltas, shapes) -> int:
    """The denoiser's graph with its changed initializers written into `dest`; return how many."""
    from onnx import numpy_helper, save_model

    structure = load_graph_structure(src)
    external = data_path(src).exists()
    if external:
        _clone(data_path(src), data_path(dest))
    changed, inline_changed = 0, False
    with open(data_path(dest), "r+b") if external else open(os.devnull, "rb") as data:
        for init, value in _patched_values(structure, src, placed, deltas, shapes):
            location = _external_location(init)
            raw = np.ascontiguousarray(value).tobytes()
            if location is None:
                init.CopyFrom(numpy_helper.from_array(value, init.name))
                inline_changed = True
            else:
                if location.get("location") != data_path(src).name or int(location.get("length", len(raw))) != len(raw):
                    raise ArtifactError(f"{src}: initializer {init.name} is not where the export puts its weights; "
                                        "re-export the model")
                data.seek(int(location.get("offset", 0)))
                data.write(raw)
            changed += 1
    if external and not inline_changed:
        shutil.copyfile(src, dest)  # the graph file is the original's: only the data changed
    else:  # without external data the structure holds every weight; with it, its references are kept
        save_model(structure, str(dest))
    return changed


def _check_out(graphs_dir: Path, out: Path) -> None:
    if out.resolve() == graphs_dir.resolve() or graphs_dir.resolve().is_relative_to(out.resolve()):
        raise InvalidInputError(f"--out: {out} would replace the export it is made from; name another graphs root")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise InvalidInputError(f"--out: {out} exists and holds no export; name another graphs root or remove it")


def make_lora_variant(graphs_dir: Path, out_root: Path, specs: Sequence[LoraSpec]) -> Manifest:
    """Write the export at `graphs_dir` with `specs` fused into its denoiser to `out_root/<model>` (atomically)."""
    graphs_dir = Path(graphs_dir)
    if not specs:
        raise InvalidInputError("give at least one --lora PATH[:SCALE]")
    original = Manifest.load(graphs_dir)
    out = Path(out_root) / original.model
    _check_out(graphs_dir, out)
    component = denoiser_name(original)
    entry = original.components[component]
    if not entry.get("weight_map"):
        raise InvalidInputError(f"{graphs_dir} was exported without a weight map (an older gag-export): re-export it, "
                                "or export with the LoRA (`gag-export export --lora`)")
    verify_graphs(original)
    weight_map: WeightMap = load_weight_map(graphs_dir, entry["weight_map"])
    shapes = weight_map.shapes()
    deltas = lora_deltas(specs, original.data.get("family", "sdxl"), shapes, _denoiser_config(original, component))
    placed = weight_map.place(list(deltas))  # InvalidInputError before anything is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_folders(out.parent, out.name)
        tmp = make_temp_folder(out.parent, out.name)
    except OSError as exc:
        raise write_failure(exc, out) from None
    try:
        data = copy.deepcopy(original.data)
        for name, comp in original.components.items():
            folder = Path(comp["path"]).parent
            if name != component:
                shutil.copytree(graphs_dir / folder, tmp / folder, copy_function=link_or_copy)
        (tmp / Path(entry["path"]).parent).mkdir(parents=True)
        src, dest = original.graph_path(component), tmp / entry["path"]
        changed = _write_patched_graph(src, dest, placed, deltas, shapes)
        link_or_copy(graphs_dir / entry["weight_map"]["path"], tmp / entry["weight_map"]["path"])  # same layout
        comp = data["components"][component]
        comp.pop("parity_reference", None)  # torch's outputs without this LoRA
        comp.update(graph_file_fields(dest, tmp))
        data["loras"] = [*original.data.get("loras", []), *(spec.record() for spec in specs)]
        data["derived_from"] = {"graphs_dir": str(graphs_dir.resolve()),
                                "manifest_sha256": hashlib.sha256(original.path.read_bytes()).hexdigest(),
                                "changed_initializers": changed}
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        swap_into_place(tmp, out)
    except OSError as exc:
        raise write_failure(exc, out) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s with %d LoRA(s), %d initializers changed", out, original.model, len(specs), changed)
    return Manifest.load(out)


__all__ = ["denoiser_name", "make_lora_variant"]
