"""The whole run: every variant timed (in child processes as `isolate` says), rows, ratios."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...core.errors import GagExportError
from ...core.memory import ORT_SESSION_FACTOR, available_bytes
from .config import BASELINE, BenchConfig, Plan, plan
from .graphs import (
    graphs_root,
    graphs_used,
    needs_export,
    prepare,
    shape_summary,
    unavailable,
)
from .probes import (
    environment,
    gpu_peak,
    gpu_reset,
    load_average,
    nvml_used_bytes,
    peak_rss_bytes,
    rss_bytes,
    to_mib,
)
from .results import (
    MEASURES,
    BenchResult,
    GagOverhead,
    ResultRow,
    RowMemory,
    RunPart,
    Series,
    Speedup,
)
from .timing import LatencyStats, paired_ratio, summarize
from .variants import (
    Skip,
    Variant,
    activate_and_first_call,
    interleave,
    load_pipeline_measured,
    load_variant,
    torch_threads,
    uses_torch,
)

log = logging.getLogger(__name__)


def measure(config: BenchConfig, p: Plan, pipe=None, pipeline_rss: int | None = None,
            progress: Callable[[str], None] | None = None) -> RunPart:
    """Load every variant of `config` in this process, time them interleaved; its rows and memory.

    The pipeline is loaded here for torch variants when not given; graphs must already exist for
    ort/tensorrt (see `prepare`).
    """
    notify = progress or (lambda message: None)
    rows: list[ResultRow] = []
    variants: list[Variant] = []
    with torch_threads(config.cpu_threads):
        if pipe is None and uses_torch(config):
            notify(f"loading {p.entry.name} ({p.weights} weights)")
            pipe, pipeline_rss = load_pipeline_measured(config, p)
        for backend in config.backends:
            for gag in config.gag_settings:
                label = f"{backend}/{'gag' if gag else 'no-gag'}"
                notify(f"loading {label}")
                gc.collect()
                before = rss_bytes()
                gpu_reset()
                try:
                    variant = load_variant(config, p, backend, gag, pipe)
                except Skip as exc:
                    rows.append(_skipped_row(backend, gag, "skipped", str(exc)))
                    continue
                except GagExportError as exc:
                    rows.append(_skipped_row(backend, gag, "failed", str(exc)))
                    continue
                notify(f"first call: {label}")
                activate_and_first_call(variant, "step")
                if p.e2e and not variant.error:
                    activate_and_first_call(variant, "e2e")
                if p.img2img and not variant.error:
                    activate_and_first_call(variant, "img2img")
                variant.rss_delta = rss_bytes() - before
                variant.gpu_peak, variant.gpu_used = gpu_peak(backend), nvml_used_bytes()
                variants.append(variant)

        def on_round(measure_name):
            return lambda done, total: notify(f"{measure_name}: round {done}/{total}")

        interleave(variants, "step", config.warmup, config.iters, on_round("step"))
        if p.e2e:
            interleave(variants, "e2e", config.warmup, config.iters, on_round("e2e"))
        if p.img2img:
            interleave(variants, "img2img", config.warmup, config.iters, on_round("img2img"))
        for variant in variants:
            variant.sampler.components.deactivate()
    peak = peak_rss_bytes()
    load = tuple(load_average() or ()) or None
    rows += [_variant_row(v, p, peak if config.isolate != "none" else None) for v in variants]
    rows = [replace(row, load_average_after=load) for row in rows]
    order = {(b, g): i for i, (b, g) in enumerate((b, g) for b in config.backends for g in config.gag_settings)}
    rows.sort(key=lambda row: order[(row.backend, row.gag)])
    return RunPart(tuple(rows), {"pipeline_rss_mib": to_mib(pipeline_rss), "peak_rss_mib": to_mib(peak)})


def _skipped_row(backend: str, gag: bool, status: str, reason: str) -> ResultRow:
    return ResultRow(backend, gag, status, reason)


def _series(first_s: float | None, samples_s: list[float], **e2e) -> Series | None:
    if not samples_s:
        return None
    stats = summarize(samples_s)
    rounded = LatencyStats(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.to_dict().items()})
    return Series(None if first_s is None else round(first_s * 1e3, 3), rounded,
                  tuple(round(s * 1e3, 4) for s in samples_s), **e2e)


def _variant_row(v: Variant, p: Plan, peak: int | None) -> ResultRow:
    e2e = _series(v.first_e2e_s, v.e2e_s, steps=p.steps,
                  stages_ms={name: round(float(np.median(vals)) * 1e3, 4) for name, vals in v.stages_s.items() if vals})
    complete = len(v.step_s) > 0 and (not p.e2e or len(v.e2e_s) > 0) and (not p.img2img or len(v.img2img_s) > 0)
    return ResultRow(
        v.backend, v.gag, "ok" if complete and not v.error else "failed", v.error, v.device, v.timer.kind,
        step=_series(v.first_step_s, v.step_s), e2e=e2e,
        img2img=_series(v.first_img2img_s, v.img2img_s, steps=v.img2img_steps) if p.img2img else None,
        memory=RowMemory(to_mib(v.rss_delta), to_mib(peak), to_mib(v.gpu_peak), to_mib(v.gpu_used)),
    )


def ratios(rows: Sequence[ResultRow], interleaved: bool,
           gag_split: Sequence[str] = ()) -> tuple[tuple[GagOverhead, ...], tuple[Speedup, ...]]:
    """The GAG overheads and the speed-ups over eager PyTorch, from the rows of one run.

    `interleaved`: whether the backends were timed in the same rounds; `gag_split`: backends whose
    GAG and plain variants ran in separate processes (not interleaved).
    """
    by_key = {(r.backend, r.gag): r for r in rows if r.ok}
    overhead, speedup = [], []
    for measure_name in MEASURES:
        for backend in dict.fromkeys(r.backend for r in rows):
            on, off = by_key.get((backend, True)), by_key.get((backend, False))
            if on and off and on.p50(measure_name) and off.p50(measure_name):
                ratio = on.p50(measure_name) / off.p50(measure_name)
                paired = paired_ratio(on.series(measure_name).samples_ms, off.series(measure_name).samples_ms)
                overhead.append(GagOverhead(backend, measure_name, round(ratio, 4), round(100 * (ratio - 1), 2),
                                            round(paired, 4), backend not in gag_split))
        for (backend, gag), row in by_key.items():
            base = by_key.get((BASELINE, gag))
            if base is None or backend == BASELINE or not row.p50(measure_name) or not base.p50(measure_name):
                continue
            speedup.append(Speedup(backend, gag, measure_name, BASELINE,
                                   round(base.p50(measure_name) / row.p50(measure_name), 4), interleaved))
    return tuple(overhead), tuple(speedup)


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """The whole benchmark: validate, export what is missing, measure, and return the results."""
    notify = progress or (lambda message: None)
    p = plan(config)
    load_at_start = load_average()
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    gag_split: list[str] = []
    if config.isolate != "none":
        if needs_export(config, p):
            notify(f"exporting {p.entry.name}")
            prepare(config, p)  # the pipeline is dropped before any child starts
            gc.collect()
        children, skipped = [], []
        for backend in config.backends:
            reason = unavailable(backend)
            if reason is not None:  # no child process just to say so
                skipped += [_skipped_row(backend, gag, "skipped", reason) for gag in config.gag_settings]
            elif len(config.gag_settings) == 2 and (config.isolate == "variant" or not _variants_fit(config, p, backend)):
                gag_split.append(backend)
                children += [replace(config, backends=(backend,), gag="gag" if gag else "no-gag")
                             for gag in config.gag_settings]
            else:
                children.append(replace(config, backends=(backend,)))
        parts = [_run_child(child, notify) for child in children]
        rows = [row for part in parts for row in part.results] + skipped
        order = {b: i for i, b in enumerate(config.backends)}
        rows.sort(key=lambda row: (order[row.backend], row.gag))
        memory = {"method": "child-peak-rss", "pipeline_rss_mib": None,
                  "peak_rss_mib": max((part.memory.get("peak_rss_mib") or 0 for part in parts), default=None)}
        interleaved = len(children) == 1
    else:
        pipe, pipeline_rss = None, None
        if uses_torch(config):
            notify(f"loading {p.entry.name} ({p.weights} weights)")
            pipe, pipeline_rss = load_pipeline_measured(config, p)
        if needs_export(config, p):
            notify(f"exporting {p.entry.name}")
            prepare(config, p, pipe=pipe)  # a pipeline loaded only to export is dropped here
        part = measure(config, p, pipe=pipe, pipeline_rss=pipeline_rss, progress=notify)
        rows, memory = list(part.results), {"method": "rss-delta", **part.memory}
        interleaved = True
    overhead, speedup = ratios(rows, interleaved, gag_split)
    env = {**environment(config), "load_average_at_start": load_at_start}
    return BenchResult(
        created=created,
        config={**config.to_dict(), "steps": p.steps, "height": p.shape.height, "width": p.shape.width,
                "weights": p.weights, "e2e": p.e2e, "threads": config.cpu_threads},
        e2e_skipped=p.e2e_skip or None,
        environment=env,
        shapes=shape_summary(p),
        graphs=graphs_used(config, p),
        memory=memory,
        results=tuple(rows),
        gag_overhead=overhead,
        speedup=speedup,
    )


def _variants_fit(config: BenchConfig, p: Plan, backend: str) -> bool:
    """Whether the GAG and plain ONNX Runtime sessions of `backend` fit in memory together (always
    true for torch, whose two variants share the weights, and for TensorRT, on the GPU)."""
    from ...runtime.exports import load_manifest_for  # noqa: PLC0415

    if backend != "ort" or unavailable(backend) is not None:
        return True
    try:
        need = ORT_SESSION_FACTOR * sum(
            int(c.get("size_bytes") or 0)
            for gag in config.gag_settings
            for c in load_manifest_for(p.entry.name, graphs_root(config, gag)).components.values()
        )
    except GagExportError:
        return True  # the child reports the missing graphs
    fits = need <= available_bytes()
    if not fits:
        log.info("%s: GAG and plain sessions need ~%.1f GiB together: one process each", backend, need / 2**30)
    return fits


def _run_child(config: BenchConfig, notify: Callable[[str], None]) -> RunPart:
    """`measure` for one backend in a fresh Python process; its part of the document."""
    notify(f"{config.backends[0]} ({config.gag}): child process")
    with tempfile.TemporaryDirectory(prefix="gag-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(config.to_dict()))
        cmd = [sys.executable, "-m", "gag_export.workflows.bench", "--worker", str(config_path), str(out_path)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            reason = f"child process exited with {proc.returncode}: {tail}"
            rows = [_skipped_row(config.backends[0], gag, "failed", reason) for gag in config.gag_settings]
            return RunPart(tuple(rows), {"peak_rss_mib": None})
        return RunPart.from_dict(json.loads(out_path.read_text()))


def worker(config_path: Path, out_path: Path) -> None:
    config = BenchConfig.from_dict(json.loads(Path(config_path).read_text()))
    part = measure(config, plan(config), progress=lambda message: log.info("%s", message))
    Path(out_path).write_text(json.dumps(part.to_dict()))
