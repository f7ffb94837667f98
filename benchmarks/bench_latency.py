"""The latency tables of benchmarks/README.md, rerun with one command per machine.

Each preset calls `gag-export bench` (gag_export/workflows/bench/) once per model and writes
benchmarks/results/latency-<preset>-<model>.{json,md,png}:

    python benchmarks/bench_latency.py tiny          # tiny-sdxl, tiny-flux: torch, torch-compile, ort; GAG on/off
    python benchmarks/bench_latency.py sdxl-full     # DMD2 (SDXL UNet, random weights), one 1024x1024 step, eager vs ORT
    python benchmarks/bench_latency.py gpu           # on a CUDA machine: torch, torch-compile, ort, tensorrt
    python benchmarks/bench_latency.py tiny --dry-run    # print the commands only

`sdxl-full` needs ~11 GiB for the eager UNet and ~13 GiB per ONNX Runtime session, plus two
exports of the UNet (10 GB each on disk, several minutes each): it runs each backend in its own
process (`--isolate backend`; the two ORT sessions do not fit together in 24 GiB, so each gets
its own process) and refuses to start while less than 14 GiB of memory is free or another
process holds more than 4 GiB (a second full-size job would run the machine out of memory);
`--force` skips that check. Each variant's first call is excluded from the statistics, then 3
timed steps.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

PRESETS: dict[str, list[tuple[str, list[str]]]] = {
    "tiny": [
        (model, ["--model", model, "--backends", "torch,torch-compile,ort", "--both", "--warmup", "3", "--iters", "30"])
        for model in ("tiny-sdxl", "tiny-flux")
    ],
    "sdxl-full": [
        ("dmd2", ["--model", "dmd2", "--weights", "random", "--height", "1024", "--width", "1024", "--no-e2e",
                  "--backends", "torch,ort", "--both", "--warmup", "0", "--iters", "3", "--isolate", "backend"]),
    ],
    "gpu": [
        (model, ["--model", model, "--backends", "torch,torch-compile,ort,tensorrt", "--both", "--warmup", "3",
                 "--iters", "30"] + extra)
        for model, extra in (("tiny-sdxl", []),
                             ("dmd2", ["--weights", "random", "--height", "1024", "--width", "1024", "--no-e2e",
                                       "--isolate", "backend"]))
    ],
}
HEAVY = {"sdxl-full"}
MIN_FREE_GIB = 14  # the largest child: one ORT session of the UNet (~13 GiB peak)
OTHER_HEAVY_GIB = 4


def heavy_job_blockers() -> list[str]:
    """Reasons not to start a full-size run now: too little free memory, or another big process."""
    import os

    import psutil

    reasons = []
    available = psutil.virtual_memory().available / 2**30
    if available < MIN_FREE_GIB:
        reasons.append(f"only {available:.1f} GiB of memory available (the run needs ~{MIN_FREE_GIB})")
    for proc in psutil.process_iter(["pid", "memory_info", "cmdline"]):
        try:
            rss = proc.info["memory_info"].rss / 2**30
        except (TypeError, AttributeError):
            continue
        if rss > OTHER_HEAVY_GIB and proc.info["pid"] != os.getpid():
            cmd = " ".join(proc.info["cmdline"] or [])[:120]
            reasons.append(f"process {proc.info['pid']} holds {rss:.1f} GiB: {cmd}")
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results folder [benchmarks/results].")
    parser.add_argument("--graphs", type=Path, default=REPO / "graphs" / "bench", help="Export cache [graphs/bench].")
    parser.add_argument("--threads", type=int, default=0, help="Intra-op threads (0: every CPU).")
    parser.add_argument("--force", action="store_true", help="Start a full-size run even if the machine looks busy.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands, run nothing.")
    args = parser.parse_args()

    if args.preset in HEAVY and not args.force and not args.dry_run:
        blockers = heavy_job_blockers()
        if blockers:
            print("not starting a full-size run:\n  " + "\n  ".join(blockers) + "\n(--force to start anyway)",
                  file=sys.stderr)
            return 2
    failed = 0
    for model, options in PRESETS[args.preset]:
        stem = args.out / f"latency-{args.preset}-{model}"
        cmd = [sys.executable, "-m", "gag_export.cli", "bench", *options, "--threads", str(args.threads),
               "--graphs", str(args.graphs), "--json", f"{stem}.json", "--markdown", f"{stem}.md", "--plot", f"{stem}.png"]
        print("$", shlex.join(cmd), flush=True)
        if not args.dry_run:
            failed += subprocess.run(cmd, cwd=REPO).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
