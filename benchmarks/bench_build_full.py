"""A full-size `gag-export build` measured stage by stage: time, peak RSS, graph and engine sizes, layers.

What `gag-export build --model dmd2 --weights random --dtype fp16 --engine-backend tensorrt-rtx
--skip-smoke` does, run in this process through `run_build`, with each stage's own peak resident
memory: the kernel's high-water mark (VmHWM) is reset when a stage starts (`/proc/self/clear_refs`,
"5") and read when it ends. Network layer counts are the real parser's (the check's `trt_parser`).

    python benchmarks/bench_build_full.py --model dmd2 --dtype fp16 --json out.json           # GAG
    python benchmarks/bench_build_full.py --model dmd2 --dtype fp16 --no-gag --json out.json  # the baseline

Run GAG and --no-gag in separate processes (one after the other), so that neither's memory is in
the other's figures. Linux only (the /proc files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gag_export.workflows.build import BuildConfig, run_build  # noqa: E402
from gag_export.export import DEFAULT_EXPORT_GAG  # noqa: E402
from gag_export.gag import GAGConfig  # noqa: E402


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class StagePeaks:
    """BuildEvent listener: each stage's wall time and peak RSS (GiB)."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self._start = {}

    def __call__(self, event) -> None:
        if event.state == "start":
            _reset_peak()
            self._start[event.stage] = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}] {event.stage}: {event.message}", file=sys.stderr, flush=True)
        elif event.state in ("done", "reused", "skipped", "failed"):
            self.stages[event.stage] = {
                "status": event.state, "seconds": round(time.perf_counter() - self._start.get(event.stage, time.perf_counter()), 1),
                "peak_rss_gib": round(_status_kib("VmHWM") / 2**20, 2), "details": event.message,
            }
            print(f"[{time.strftime('%H:%M:%S')}] {event.stage} {event.state}: {self.stages[event.stage]}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dmd2")
    p.add_argument("--weights", default="random")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--no-gag", action="store_true")
    p.add_argument("--gag-method", default=DEFAULT_EXPORT_GAG.method, choices=("bisect", "sort"))
    p.add_argument("--engine-backend", default="tensorrt-rtx")
    p.add_argument("--work", type=Path, default=Path("/tmp/gag_full_build"), help="graphs/ and engines/ go here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    gag = None if args.no_gag else GAGConfig(method=args.gag_method)
    tag = "no-gag" if args.no_gag else f"gag-{args.gag_method}"
    config = BuildConfig(args.model, weights=args.weights, precision=args.dtype, gag=gag, smoke=False,
                         graphs_root=args.work / tag / "graphs", engines_root=args.work / tag / "engines",
                         engine_backend=args.engine_backend)
    peaks = StagePeaks()
    started = time.perf_counter()
    result = run_build(config, progress=peaks)
    out = {
        "model": args.model, "weights": args.weights, "dtype": args.dtype, "gag": tag,
        "engine_builder": result.engine_builder, "total_seconds": round(time.perf_counter() - started, 1),
        "process_peak_rss_gib": max(s["peak_rss_gib"] for s in peaks.stages.values()),
        "stages": peaks.stages, "components": {},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    }
    engines = {r.component: r for r in result.engines}
    # `result.check` is falsy when any check failed, so compare with None: a failed VAE parity
    # must not hide the other components' layer counts and parity.
    checked = result.check is not None
    for name, comp in (result.manifest.components.items() if result.manifest else ()):
        parsed = result.check.get(name, "trt_parser") if checked else None
        parity = result.check.get(name, "parity") if checked else None
        layers = re.search(r"(\d+) network layers", parsed.details) if parsed is not None else None
        record = engines.get(name)
        out["components"][name] = {
            "nodes": comp["nodes"], "graph_bytes": comp["size_bytes"],
            "export_seconds": round(result.manifest.stats[name].seconds, 1) if name in result.manifest.stats else None,
            "network_layers": int(layers.group(1)) if layers else None,
            "engine_bytes": record.sidecar.engine_size_bytes if record else None,
            "engine_build_seconds": record.sidecar.build_seconds if record else None,
            "parity": parity.details if parity is not None else None,
        }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if result else 4


if __name__ == "__main__":
    sys.exit(main())
