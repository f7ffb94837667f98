"""torch -> ONNX for every component of a model, written atomically, with its manifest (`export_model`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .. import __version__
from ..arrays import to_torch
from ..artifacts.manifest import (
    MANIFEST_FORMAT_VERSION,
    Manifest,
    data_path,
    graph_file_fields,
)
from ..core.atomic import make_temp_folder, remove_stale_temp_folders, swap_into_place
from ..core.errors import (
    ArtifactError,
    GagExportError,
    InvalidInputError,
    ResourceExhaustedError,
)
from ..core.names import GRAPH_NAME, IMG2IMG_COMPONENTS, MANIFEST_NAME, PARITY_NAME
from ..core.precision import Precision
from ..core.signals import raise_if_terminated
from ..models import descriptors_for
from ..models.lora import add_deltas, denoiser_shapes, lora_deltas, restore_parameters
from .config import ComponentStats, ExportConfig, ExportEvent
from .graphs import (
    LARGE_WEIGHTS_BYTES,
    graph_io,
    load_graph_structure,
    name_output_dims,
    promote_concat_inputs,
    save_graph,
    slim_graph,
)
from .incremental import (
    carry_over,
    components_to_keep,
    merged_components,
    previous_export,
)
from .parity import (
    ParityError,
    compare_with_reference,
    load_reference,
    record_reference,
    tolerance_dict,
)
from .pipeline import (
    denoiser_module,
    reduced_view,
    release_weights,
    sample_feed,
    set_gag,
    weights_bytes,
)
from .weight_map import parameter_digests, record_weight_map

log = logging.getLogger(__name__)


def resource_error(exc: BaseException) -> ResourceExhaustedError | None:
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
    external = weights_bytes(module) > LARGE_WEIGHTS_BYTES
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
    return {
        "role": descriptor.role,
        **graph_file_fields(onnx_path, root),
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


def manifest_head(entry, config: ExportConfig, rewritten: list[str]) -> dict:
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
        # layer_names: the order of the denoiser's per-layer gag_scale/gag_eta entries (apply_gag's)
        "gag": ({"enabled": True, **gag.to_dict(), "rewritten": rewritten, **({"layer_names": rewritten} if rewritten else {})}
                if gag is not None
                else {"enabled": False, "rewritten": []}),
        "loras": [spec.record() for spec in config.loras],
        "components": {},
        "versions": versions(),
    }


def _whole(descriptors, config: ExportConfig) -> list:
    """What an export of every component holds: the family's, and the img2img ones when asked."""
    return [d for d in descriptors if config.img2img or d.name not in IMG2IMG_COMPONENTS]


def _selected(descriptors, config: ExportConfig) -> list:
    """The descriptors to export, after checking the shapes against each (InvalidInputError early)."""
    descriptors = list(descriptors)
    names = [d.name for d in descriptors]
    unknown = [c for c in config.components if c not in names]
    if unknown:
        raise InvalidInputError(f"{config.model} has no component {', '.join(map(repr, unknown))}; it has {', '.join(names)}")
    chosen = [d for d in descriptors if d.name in config.components] if config.components else _whole(descriptors, config)
    for d in chosen:
        for s in config.shape_range:
            d.dim_values(s)
        if config.dynamic:
            d.profile(*config.shape_range)
    return chosen


def export_model(pipe, entry, config: ExportConfig, progress: Callable[[ExportEvent], None] | None = None,
                 release: bool = False) -> Manifest:
    """Export every component of `entry` from `pipe` into `config.graphs_dir`; return the manifest.

    `config.loras` are fused into the denoiser first (read and checked before anything is written;
    taken out again afterwards unless `release`). GAG (`config.gag`) is applied to the denoiser for the export and removed afterwards (also from
    `pipe`); the denoiser graph then takes `gag_scale`, `gag_eta` as [L] float32 inputs (one value
    per rewritten layer, in the manifest's `gag.layer_names` order) and `gag_zeta` as a 0-d one. fp16/bf16 exports work on a cast copy of one component of `pipe` at a time. With
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
    denoiser = denoiser_module(pipe)
    lora = (lora_deltas(config.loras, entry.family, denoiser_shapes(denoiser), getattr(denoiser, "config", None))
            if config.loras and denoiser is not None else {})  # a LoRA that does not fit stops before any write
    try:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        removed, unknown = remove_stale_temp_folders(config.out_dir, config.model)
        tmp = make_temp_folder(config.out_dir, config.model)
    except OSError as exc:
        raise resource_error(exc) or ArtifactError(f"cannot write to {config.out_dir}: {exc}") from None
    for folder in removed:
        log.warning("removed %s, left by an export of %s that was killed", folder, config.model)
    for folder in unknown:
        log.warning("%s was left by an earlier export (another host, or an older gag-export): remove it when "
                    "no export is running", folder)
    stats: dict[str, ComponentStats] = {}
    originals = {}
    try:
        family_descriptors = descriptors_for(entry, pipe, img2img=True)  # any of them may be named
        descriptors = _selected(family_descriptors, config)
        order = [d.name for d in family_descriptors]
        previous = previous_export(config, [d.name for d in _whole(family_descriptors, config)])
        kept = components_to_keep(previous, entry, config, [d.name for d in descriptors],
                                  manifest_head(entry, config, []))  # before the slow part
        if any(d.role == "denoiser" for d in descriptors) and denoiser_module(pipe) is None:
            raise InvalidInputError(f"the {config.model} pipeline was loaded without its denoiser")
        originals = add_deltas(denoiser, lora, keep=not release) if lora else {}  # before GAG, as the issue asks
        rewritten = set_gag(pipe, config.gag)
        manifest = manifest_head(entry, config, rewritten)
        # the denoiser's gag_scale/gag_eta take one value per rewritten layer
        descriptors = [dataclasses.replace(d, gag_layers=len(rewritten)) if d.role == "denoiser" else d
                       for d in descriptors]
        for index, descriptor in enumerate(descriptors):
            raise_if_terminated()  # a SIGTERM whose exception a C callback swallowed stops here
            # The VAE's decoder and encoder share one module: its weights go after the last of them.
            release_now = release and descriptor.module_attr not in {d.module_attr for d in descriptors[index + 1:]}
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
                work = reduced_view(pipe, descriptor.module_attr, precision.torch_dtype, config.gag)
                if release_now:  # the fp32 weights are needed no more: only the reduced copy is exported
                    release_weights(pipe, descriptor.module_attr)
            module = descriptor.export_module(work)
            # the denoiser's parameters hashed while they are here, matched against the final graph below
            digests = parameter_digests(denoiser_module(work)) if descriptor.role == "denoiser" else None
            try:
                nodes = _export_one(descriptor, module, config, precision, gag, dest)
            except (GagExportError, MemoryError, OSError):
                raise
            except Exception as exc:
                if (res := resource_error(exc)) is not None:
                    raise res from exc
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise GagExportError(f"exporting {config.model}/{descriptor.name} failed: {type(exc).__name__}: {first}") from exc
            del module, work
            if release_now:
                release_weights(pipe, descriptor.module_attr)
            notify(ExportEvent(descriptor.name, "exported", index, len(descriptors), nodes=nodes,
                               seconds=time.perf_counter() - start))
            before, slimmed = None, False
            if config.slim:
                before, slimmed = _slim_component(descriptor, reference and load_reference(tmp, reference), config,
                                                  dest, notify, index, len(descriptors))
            entry_json = _component_entry(descriptor, config, precision, comp_dir, tmp)
            if reference is not None:
                entry_json["parity_reference"] = reference
            if digests is not None:
                entry_json["weight_map"] = record_weight_map(comp_dir, descriptor.name, digests, dest, tmp)
            manifest["components"][descriptor.name] = entry_json
            stats[descriptor.name] = ComponentStats(entry_json["nodes"], entry_json["size_bytes"],
                                                    time.perf_counter() - start, before, slimmed)
            notify(ExportEvent(descriptor.name, "done", index, len(descriptors), nodes=entry_json["nodes"],
                               size_bytes=entry_json["size_bytes"], seconds=stats[descriptor.name].seconds))
        if kept:
            carry_over(previous, kept, tmp)
            merged_components(manifest, previous, kept, order)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_into_place(tmp, config.graphs_dir)
    except GagExportError:
        raise
    except BaseException as exc:  # KeyboardInterrupt included: the temp folder goes in `finally`
        if (res := resource_error(exc)) is not None:
            raise res from exc
        if isinstance(exc, OSError):
            raise ArtifactError(f"cannot write graphs under {config.out_dir}: {exc}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        set_gag(pipe, None)
        restore_parameters(denoiser, originals)  # a pipeline not handed over comes back without the LoRA
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


__all__ = ["export_model", "manifest_head", "resource_error", "versions"]
