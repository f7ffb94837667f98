"""The benchmark's own graph cache (GAG and plain exports at the run's shape), reused when it matches."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import shutil
from pathlib import Path

from ...core.errors import GagExportError
from ...core.memory import ORT_SESSION_FACTOR, available_bytes
from .config import GRAPH_BACKENDS, BenchConfig, Plan, Skip

log = logging.getLogger(__name__)


def graphs_root(config: BenchConfig, gag: bool) -> Path:
    return config.graphs / ("gag" if gag else "no-gag")


def _manifest_mismatch(config: BenchConfig, p: Plan, gag: bool) -> str | None:
    """Why the cached export cannot serve this run (None when it can)."""
    from ...artifacts.integrity import verify_graphs  # noqa: PLC0415
    from ...artifacts.manifest import Manifest  # noqa: PLC0415
    from ...export import DEFAULT_EXPORT_GAG  # noqa: PLC0415

    graphs_dir = graphs_root(config, gag) / p.entry.name
    if not (graphs_dir / "manifest.json").is_file():
        return "no export yet"
    try:
        manifest = Manifest.load(graphs_dir)
    except GagExportError as exc:
        return f"cached export damaged: {exc}"
    data = manifest.data
    shape = data.get("shape", {})
    wanted_components = set(p.components) if p.components else {d.name for d in descriptors_of(p.entry, img2img=p.img2img)}
    checks = [
        (data.get("dynamic") is False, "dynamic graphs"),
        ((shape.get("batch"), shape.get("height"), shape.get("width")) == (p.shape.batch, p.shape.height, p.shape.width),
         f"shape {shape}"),
        (data.get("dtype") == "fp32", f"dtype {data.get('dtype')}"),
        (data.get("weights") == p.weights, f"weights {data.get('weights')}"),
        ((manifest.gag is not None) == gag, "GAG setting"),
        (not gag or manifest.gag == DEFAULT_EXPORT_GAG, f"GAG config {data.get('gag')}"),
        (wanted_components <= set(manifest.components), f"components {sorted(manifest.components)}"),
        (not manifest.loras, f"LoRAs {[lora['name'] for lora in manifest.loras]}"),  # the benchmark times the base model
    ]
    failed = [reason for ok, reason in checks if not ok]
    if failed:
        return f"cached export differs ({', '.join(failed)})"
    # One policy for damage, the manifest's or a graph's: the cache is the benchmark's own, so it
    # is exported again (and the run says why) rather than timed or failed.
    try:
        verify_graphs(manifest, sorted(wanted_components))
    except GagExportError as exc:
        return f"cached export damaged: {exc}"
    return None


def descriptors_of(entry, pipe=None, img2img: bool = False):
    from ...models import descriptors_for  # noqa: PLC0415

    return descriptors_for(entry, pipe, img2img=img2img)


def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine (None when it can), checked before exporting anything."""
    from ...core.errors import MissingDependencyError  # noqa: PLC0415

    try:
        if backend == "ort":
            import onnxruntime  # noqa: F401, PLC0415
        elif backend in ("tensorrt", "tensorrt-rtx"):
            from ...artifacts.engines import RuntimeTarget
            from ...core.tensorrt import trt_features  # noqa: PLC0415

            RuntimeTarget.current(trt_features(backend))
    except MissingDependencyError as exc:
        return str(exc)
    except ImportError as exc:
        return f"{backend} is not importable here: {exc}"
    return None


def needs_export(config: BenchConfig, p: Plan) -> dict[bool, str]:
    """{gag setting: reason} for every graph set the (available) graph backends need but the cache lacks."""
    if not any(b in GRAPH_BACKENDS and unavailable(b) is None for b in config.backends):
        return {}
    missing = {}
    for gag in config.gag_settings:
        reason = "--reexport" if config.reexport else _manifest_mismatch(config, p, gag)
        if reason is not None:
            missing[gag] = reason
    return missing


def load_bench_pipeline(config: BenchConfig, p: Plan):
    """The fp32 pipeline of the run: every component for e2e, the denoiser alone otherwise."""
    from ...models import load_pipeline  # noqa: PLC0415

    return load_pipeline(p.entry, weights=p.weights, components=p.components or None, seed=config.seed)


def export_graphs(config: BenchConfig, p: Plan, pipe, gag: bool) -> Path:
    """Export the run's graphs with (DEFAULT_EXPORT_GAG) or without GAG into the cache."""
    from ...export import DEFAULT_EXPORT_GAG, ExportConfig, export_model  # noqa: PLC0415

    root = graphs_root(config, gag)
    log.info("exporting %s (%s) at %dx%d to %s", p.entry.name, "GAG" if gag else "no GAG", p.shape.height,
             p.shape.width, root / p.entry.name)
    # the bench's own cache, exported again because it did not fit this run: replaced whole (an
    # export of the denoiser alone over one with other settings is otherwise refused)
    shutil.rmtree(root / p.entry.name, ignore_errors=True)
    export_model(pipe, p.entry, ExportConfig(
        p.entry.name, root, p.shape, gag=DEFAULT_EXPORT_GAG if gag else None, weights=p.weights,
        seed=config.seed, components=p.components, img2img=p.img2img,
    ))
    return root / p.entry.name


def prepare(config: BenchConfig, p: Plan, pipe=None):
    """Export the graph sets the cache lacks; return the pipeline (loaded here if needed and not given)."""
    missing = needs_export(config, p)
    for gag, reason in missing.items():
        (log.warning if "damaged" in reason else log.info)("%s graphs for %s: %s; exporting them",
                                                            "GAG" if gag else "plain", p.entry.name, reason)
        if pipe is None:
            pipe = load_bench_pipeline(config, p)
        export_graphs(config, p, pipe, gag)
    return pipe


def graphs_used(config: BenchConfig, p: Plan) -> dict:
    """{"gag"/"no-gag": {"path", "sha256" of the denoiser graph, "exported" time}} of the cached graphs used."""
    from ...artifacts.manifest import Manifest  # noqa: PLC0415

    if not any(b in GRAPH_BACKENDS for b in config.backends):
        return {}
    used = {}
    for gag in config.gag_settings:
        graphs_dir = graphs_root(config, gag) / p.entry.name
        with contextlib.suppress(GagExportError, StopIteration):
            manifest = Manifest.load(graphs_dir)
            denoiser = next(c for c in manifest.components.values() if c["role"] == "denoiser")
            stamp = _dt.datetime.fromtimestamp(manifest.path.stat().st_mtime, _dt.timezone.utc)
            used["gag" if gag else "no-gag"] = {
                "path": str(graphs_dir), "denoiser_sha256": denoiser["sha256"], "nodes": denoiser.get("nodes"),
                "exported": stamp.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            }
    return used


def shape_summary(p: Plan) -> dict:
    descriptor = next(d for d in descriptors_of(p.entry) if d.role == "denoiser")
    return {
        "batch": p.shape.batch, "height": p.shape.height, "width": p.shape.width, "steps": p.steps,
        "denoiser": {name: list(dims) for name, dims in descriptor.shapes(p.shape, gag=True).items()},
    }


def check_memory_for_graphs(config: BenchConfig, p: Plan, gag: bool) -> None:
    """`Skip` instead of running the machine out of memory when an ORT session will not fit."""
    from ...runtime.exports import load_manifest_for  # noqa: PLC0415

    manifest = load_manifest_for(p.entry.name, graphs_root(config, gag))
    need = ORT_SESSION_FACTOR * sum(int(c.get("size_bytes") or 0) for c in manifest.components.values())
    available = available_bytes()
    if need > available:
        raise Skip(f"not enough memory: the ONNX Runtime session needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB "
                   "is available; run each variant in its own process (--isolate variant) or free memory")
