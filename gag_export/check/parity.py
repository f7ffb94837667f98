"""The `parity` check: ONNX Runtime against torch's outputs recorded at export, else against the
pipeline (given, or loaded again through the registry)."""

from __future__ import annotations

import dataclasses

from ..artifacts.manifest import Manifest
from ..core.memory import GIB, ORT_SESSION_FACTOR, ensure_memory
from ..core.names import GAG_INPUTS
from ..core.precision import Precision
from ..export.parity import (
    ParityError,
    compare_with_reference,
    compare_with_torch,
    load_reference,
)
from ..export.pipeline import denoiser_module, sample_feed
from ..gag.attention import apply_gag, remove_gag
from .precision import PRECISION_OF
from .report import CheckReport, CheckResult


def _reference_pipeline(manifest: Manifest):
    """The torch pipeline the graphs were exported from, loaded again through the registry
    (tiny and random weights are seeded, so this gives the same weights as at export)."""
    from ..models import load_pipeline, manifest_entry

    entry = manifest_entry(manifest.data)
    return entry, load_pipeline(entry, weights=manifest.data.get("weights"), components=list(manifest.components))


def _needs_torch(manifest: Manifest, seed: int) -> list[str]:
    """The components whose parity needs the torch pipeline: no reference recorded for this seed (bf16 ones never run)."""
    return [name for name, comp in manifest.components.items()
            if _component_precision(comp) is not Precision.BF16
            and (comp.get("parity_reference") or {}).get("seed", None) != seed]


def _component_precision(entry) -> Precision:
    floats = [o["dtype"] for o in entry["outputs"] if o["dtype"] in PRECISION_OF]
    return PRECISION_OF[floats[0]] if floats else Precision.FP32  # the component's own precision


_BF16_SKIP = "ONNX Runtime's CPU provider has no bfloat16 Conv/MatMul kernels; check on a GPU (TensorRT)"


def _parity_result(component: str, precision: Precision, run, source: str) -> CheckResult:
    try:
        results = run()
    except ParityError as exc:
        return CheckResult(component, "parity", "failed", str(exc))
    status = "passed" if all(results) else "failed"
    worst = max(results, key=lambda r: r.max_abs)
    graph = "" if precision is Precision.FP32 else f", {precision.value} graph"
    return CheckResult(component, "parity", status,
                       f"ORT vs {source}{graph}: max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} "
                       f"(atol {worst.atol:g}, rtol {worst.rtol:g})", parity=tuple(results))


def _recorded_parity(manifest: Manifest, component: str, reference_entry) -> CheckResult:
    entry = manifest.components[component]
    precision = _component_precision(entry)
    reference = load_reference(manifest.graphs_dir, reference_entry)  # ArtifactError when damaged
    return _parity_result(component, precision,
                          lambda: compare_with_reference(manifest.graph_path(component), reference, entry["tolerance"]),
                          f"{reference.source} (recorded at export)")


def _parity(manifest: Manifest, component: str, descriptor, reference_pipe, seed: int) -> CheckResult:
    entry = manifest.components[component]
    precision = _component_precision(entry)
    gag = any(i["name"] in GAG_INPUTS for i in entry["inputs"])
    layers = next((i["shape"] for i in entry["inputs"] if i["name"] == "gag_eta"), [])
    if layers:  # per-layer gag_scale/gag_eta, as the graph declares them
        descriptor = dataclasses.replace(descriptor, gag_layers=layers[0])
    feed = sample_feed(descriptor, manifest.shape(), precision, seed, gag)
    outputs = [o["name"] for o in entry["outputs"]]
    module = descriptor.export_module(reference_pipe)
    return _parity_result(component, precision,
                          lambda: compare_with_torch(manifest.graph_path(component), module, feed, outputs, entry["tolerance"]),
                          "torch fp32 eager")


def _ensure_session_fits(manifest: Manifest, component: str) -> None:
    """Exit 7 before an ONNX Runtime session that cannot fit (the graph itself is already whole)."""
    size = int(manifest.components[component].get("size_bytes") or 0)
    ensure_memory(ORT_SESSION_FACTOR * size, f"parity of {manifest.model}/{component} (an ONNX Runtime session of its "
                  f"{size / GIB:.1f} GiB graph)",
                  f"the graphs in {manifest.graphs_dir} are written and whole; check them with `gag-export check "
                  f"{manifest.graphs_dir} --no-parity` here, or with parity on a machine with more memory")


def run_parity(manifest: Manifest, report: CheckReport, pipe, entry, gag_cfg, seed: int, notify) -> None:
    """Parity of every component: against torch's outputs recorded at export where the manifest has
    them for this seed (no model loaded), else against the pipeline (`pipe`, or loaded again)."""
    from ..models import descriptors_for

    live = _needs_torch(manifest, seed)
    if manifest.loras:  # only their names are recorded: a pipeline loaded again would lack them
        for name in [n for n in live if manifest.components[n]["role"] == "denoiser"]:
            live.remove(name)
            report.results.append(CheckResult(name, "parity", "skipped", "exported with LoRAs: torch's outputs are "
                                              "recorded for the export's seed only (check with that --seed)"))
    for name, comp in manifest.components.items():
        if _component_precision(comp) is Precision.BF16:
            report.results.append(CheckResult(name, "parity", "skipped", _BF16_SKIP))
        elif name not in live:
            _ensure_session_fits(manifest, name)
            notify(name, "parity")
            report.results.append(_recorded_parity(manifest, name, comp["parity_reference"]))
    if not live:
        return
    if pipe is None:
        entry, pipe = _reference_pipeline(manifest)
    elif entry is None:
        from ..models import manifest_entry

        entry = manifest_entry(manifest.data)
    descriptors = {d.name: d for d in descriptors_for(entry, pipe, img2img=True)}  # whichever were exported
    denoiser = denoiser_module(pipe)
    if denoiser is not None:
        if gag_cfg is not None:
            apply_gag(denoiser, gag_cfg)
        else:
            remove_gag(denoiser)
    try:
        for name in live:
            _ensure_session_fits(manifest, name)
            notify(name, "parity")
            descriptor = descriptors.get(name)
            if descriptor is None:
                report.results.append(CheckResult(name, "parity", "failed", f"the registry has no component {name!r}"))
                continue
            report.results.append(_parity(manifest, name, descriptor, pipe, seed))
    finally:
        if denoiser is not None:
            remove_gag(denoiser)


__all__ = ["run_parity"]
