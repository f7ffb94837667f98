"""The results written atomically as JSON, Markdown and a plot (`results.BenchResult` is their type)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ...core.atomic import atomic_path
from ..figures import pyplot, save_figure
from .config import BASELINE
from .results import MEASURES, BenchResult, ResultRow


def validate_result(doc: Mapping) -> BenchResult:
    """A JSON document read back as `BenchResult`; InvalidInputError naming the first key that does not fit."""
    return BenchResult.from_dict(doc)


def write_json(result: BenchResult, dest: Path) -> Path:
    with atomic_path(dest, make_parents=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return Path(dest)


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ms_digits(rows: Sequence[ResultRow], measure_name: str) -> int:
    values = [r.p50(measure_name) for r in rows if r.series(measure_name)]
    return 2 if values and min(values) < 10 else 1 if values and min(values) < 1000 else 0


def environment_line(result: BenchResult) -> str:
    env, cfg = result.environment, result.config
    gpu = env.get("gpu")
    where = (f"{env['cpu']['model']}, {env['cpu']['available_to_process']} CPUs, {env['memory_gib']:g} GiB"
             + (f", GPU {gpu['name']}" if gpu else ", no GPU"))
    versions = env["versions"]
    return (f"{cfg['model']} ({cfg['weights']} weights), {cfg['batch']}x{cfg['height']}x{cfg['width']}, "
            f"{cfg['steps']} steps, {env['precision']}; {cfg['warmup']} warm-up + {cfg['iters']} timed rounds, "
            f"{env['threads']['torch']} threads; {where}; torch {versions.get('torch')}, "
            f"onnxruntime {versions.get('onnxruntime')}")


def render_markdown(result: BenchResult) -> str:
    """Markdown: the run's line, a latency table (step and e2e), GAG overhead and speed-ups."""
    ok = result.measured
    speed = {(s.backend, s.gag, s.measure): s.ratio for s in result.speedup}
    sd, ed = _ms_digits(ok, "step"), _ms_digits(ok, "e2e")
    isolated = result.memory.get("method") == "child-peak-rss"
    mem_header = "peak RSS MiB" if isolated else "RSS + MiB"
    # torch's CUDA allocator peak (torch rows only: see the module doc) where any row has it
    cuda_mem = any(r.memory.gpu_peak_mib is not None for r in ok)
    lines = [f"_{environment_line(result)}_", "",
             f"| backend | GAG | device | step p50 ms | step mean ± std | p90 | p99 | min | vs eager | e2e p50 ms | e2e mean ± std "
             f"| e2e vs eager | first call ms | {mem_header} |" + (" torch CUDA peak MiB |" if cuda_mem else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda_mem else "")]
    for r in result.results:
        gag = "on" if r.gag else "off"
        if not r.ok:
            lines.append(f"| {r.backend} | {gag} | - | {r.status}: {r.reason} | | | | | | | | | | |" + (" |" if cuda_mem else ""))
            continue
        st = r.step.stats
        e2e = r.e2e.stats if r.e2e else None
        up = speed.get((r.backend, r.gag, "step"))
        eup = speed.get((r.backend, r.gag, "e2e"))
        mem = r.memory.peak_rss_mib if isolated else r.memory.rss_delta_mib
        lines.append(
            f"| {r.backend} | {gag} | {r.device or '-'} | {_fmt(st.p50_ms, sd)} | {_fmt(st.mean_ms, sd)} ± {_fmt(st.std_ms, sd)} "
            f"| {_fmt(st.p90_ms, sd)} | {_fmt(st.p99_ms, sd)} | {_fmt(st.min_ms, sd)} "
            f"| {'1.00x (baseline)' if r.backend == BASELINE else (f'{up:.2f}x' if up else '-')} "
            f"| {_fmt(e2e.p50_ms, ed) if e2e else '-'} "
            f"| {(_fmt(e2e.mean_ms, ed) + ' ± ' + _fmt(e2e.std_ms, ed)) if e2e else '-'} "
            f"| {'1.00x' if e2e and r.backend == BASELINE else (f'{eup:.2f}x' if eup else '-')} "
            f"| {_fmt(r.step.first_call_ms, 0)} | {_fmt(mem, 0)} |"
            + (f" {_fmt(r.memory.gpu_peak_mib, 0)} |" if cuda_mem else "")
        )
    i2i = [r for r in ok if r.img2img]
    if i2i:
        digits = _ms_digits(ok, "img2img")
        lines += ["", "| backend | GAG | img2img p50 ms | img2img mean ± std | steps run | vs eager |", "|---|---|---:|---:|---:|---:|"]
        for r in i2i:
            st, up = r.img2img.stats, speed.get((r.backend, r.gag, "img2img"))
            lines.append(f"| {r.backend} | {'on' if r.gag else 'off'} | {_fmt(st.p50_ms, digits)} | {_fmt(st.mean_ms, digits)} ± "
                         f"{_fmt(st.std_ms, digits)} | {r.img2img.steps} | "
                         f"{'1.00x' if r.backend == BASELINE else (f'{up:.2f}x' if up else '-')} |")
    if result.gag_overhead:
        lines += ["", "| backend | measure | GAG / plain (p50) | overhead | paired per-round median |",
                  "|---|---|---:|---:|---:|"]
        for o in result.gag_overhead:
            lines.append(f"| {o.backend} | {o.measure} | {o.ratio:.3f} | {o.percent:+.1f}% | {o.paired_p50:.3f} |")
    notes = []
    if result.e2e_skipped:
        notes.append(f"e2e not measured: {result.e2e_skipped}.")
    split = sorted({o.backend for o in result.gag_overhead if not o.interleaved})
    if isolated and result.config.get("isolate") == "variant":
        notes.append("Each backend and GAG setting ran in its own process (peak RSS is that process's); speed-ups and "
                     "GAG overheads compare processes run one after the other.")
    elif isolated:
        notes.append("Each backend ran in its own process (peak RSS is that process's); speed-ups compare processes "
                     "run one after the other, GAG on/off were interleaved inside each"
                     + (f" except for {', '.join(split)}, whose GAG and plain variants did not fit in memory together "
                        "and ran in processes of their own" if split else "") + ".")
    else:
        notes.append("All variants ran interleaved in one process; 'RSS +' is the RSS growth while loading a variant "
                     "and running it once (the torch pipeline's weights, loaded once for all torch variants, are not in it).")
    lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, dest: Path) -> Path:
    with atomic_path(dest, make_parents=True) as tmp:
        tmp.write_text(render_markdown(result))
    return Path(dest)


def write_plot(result: BenchResult, dest: Path) -> Path:
    """A PNG: p50 latency per backend (bars: GAG off / on; whiskers: p10..p90 of the samples)."""
    plt = pyplot()

    rows = result.measured
    measures = [m for m in MEASURES if any(r.series(m) for r in rows)]
    backends = list(dict.fromkeys(r.backend for r in result.results))
    fig, axes = plt.subplots(1, max(1, len(measures)), figsize=(5.5 * max(1, len(measures)), 4.2), squeeze=False)
    width = 0.38
    for ax, measure_name in zip(axes[0], measures or ["step"]):
        for j, gag in enumerate((False, True)):
            xs, heights, lo, hi = [], [], [], []
            for i, backend in enumerate(backends):
                row = next((r for r in rows if r.backend == backend and r.gag == gag and r.series(measure_name)), None)
                if row is None:
                    continue
                samples = np.asarray(row.series(measure_name).samples_ms)
                p50 = row.p50(measure_name)
                xs.append(i + (j - 0.5) * width)
                heights.append(p50)
                lo.append(p50 - np.percentile(samples, 10))
                hi.append(np.percentile(samples, 90) - p50)
            if xs:
                ax.bar(xs, heights, width, yerr=[lo, hi], capsize=3, label=f"GAG {'on' if gag else 'off'}",
                       color="#d95f02" if gag else "#7570b3")
        plotted = [r.p50(measure_name) for r in rows if r.series(measure_name)]
        if plotted and max(plotted) > 30 * min(plotted):
            ax.set_yscale("log")
        for i, backend in enumerate(backends):
            if not any(r.backend == backend and r.series(measure_name) for r in rows):
                status = next(r.status for r in result.results if r.backend == backend)
                ax.text(i, 0.5, "not measured" if status == "ok" else status, transform=ax.get_xaxis_transform(),
                        ha="center", va="center", color="grey", rotation=90)
        ax.set_xticks(range(len(backends)), backends)
        ax.set_xlim(-0.6, len(backends) - 0.4)
        ax.set_ylabel(f"{measure_name} latency, p50 (ms)")
        ax.set_title({"step": "denoiser step", "img2img": "image to image, end to end"}.get(
            measure_name, f"end to end ({result.config['steps']} steps)"))
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    cfg, env = result.config, result.environment
    fig.suptitle(f"{cfg['model']} {cfg['height']}x{cfg['width']} - {env['cpu']['model']}, "
                 f"{env['cpu']['available_to_process']} CPUs" + (f", {env['gpu']['name']}" if env.get("gpu") else ""),
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, dest)
