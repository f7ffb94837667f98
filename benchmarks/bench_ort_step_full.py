"""One denoiser step on ONNX Runtime's CPU provider, for several exports of the same model: the
GAG forms (bisect, sort) against the plain graph, at full size.

Each export's UNet runs as `generate --backend ort` runs it (the runtime's `OrtComponent`: graph
optimisation level ALL), on the sample feed recorded at export (`parity.npz`), so every variant
gets the same inputs. A full-size session does not fit in memory twice, so the variants are timed
one after the other, in rounds: each round loads every variant in turn, runs it once untimed
(first call) and `--iters` times timed, and frees it. Medians over the rounds are compared.

    python benchmarks/bench_ort_step_full.py /tmp/full/work/{no-gag,gag-bisect,gag-sort}/graphs/dmd2 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gag_export.artifacts.manifest import Manifest  # noqa: E402
from gag_export.export.parity import load_reference  # noqa: E402
from gag_export.runtime.exports import manifest_specs  # noqa: E402
from gag_export.runtime.ort_backend import OrtComponent  # noqa: E402


def denoiser(manifest: Manifest) -> str:
    return next(name for name, c in manifest.components.items() if c["role"] == "denoiser")


def time_once(graphs_dir: Path, iters: int, threads: int) -> tuple[float, list[float], int]:
    manifest = Manifest.load(graphs_dir)
    name = denoiser(manifest)
    entry = manifest.components[name]
    feed = dict(load_reference(graphs_dir, entry["parity_reference"]).feed)
    component = OrtComponent(name, entry["role"], *manifest_specs(entry), path=manifest.graph_path(name),
                             threads=threads, model=manifest.model)
    start = time.perf_counter()
    component.activate()
    component.infer(feed)
    first = time.perf_counter() - start
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        component.infer(feed)
        samples.append(time.perf_counter() - start)
    component.deactivate()
    del component
    gc.collect()
    return first, samples, entry["nodes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs_dirs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: its default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {str(d): {"first_s": [], "step_s": []} for d in args.graphs_dirs}
    for r in range(args.rounds):
        for d in args.graphs_dirs:
            first, samples, nodes = time_once(d, args.iters, args.threads)
            results[str(d)]["first_s"].append(first)
            results[str(d)]["step_s"] += samples
            results[str(d)]["nodes"] = nodes
            print(f"round {r + 1}: {d}: first call {first:.1f} s, steps {', '.join(f'{s:.1f}' for s in samples)} s",
                  flush=True)
    base = statistics.median(results[str(args.graphs_dirs[0])]["step_s"])
    print(f"\n| export | UNet nodes | step p50 s | vs {args.graphs_dirs[0].parent.parent.name} | first call s |")
    print("|---|---:|---:|---:|---:|")
    for d in args.graphs_dirs:
        res = results[str(d)]
        p50 = statistics.median(res["step_s"])
        print(f"| {d.parent.parent.name} | {res['nodes']} | {p50:.1f} | {p50 / base:.2f}x | "
              f"{statistics.median(res['first_s']):.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
