"""Full-size `gag-export calibrate` on random weights: wall time and peak resident memory.

What `gag-export calibrate --model sdxl --weights random --height 512 --width 512 --steps 1` does,
run in this process through `run_calibration`, with the first `--prompts` of the shipped set:

    python benchmarks/bench_calibrate.py --json calibrate-sdxl-512.json                 # 2 prompts x 1 step, 512^2
    python benchmarks/bench_calibrate.py --height 1024 --width 1024 --json out.json     # the model's own size

The SDXL base entry samples with classifier-free guidance, so each step is two UNet calls (on a
2-core CPU one 1024^2 fp32 UNet call takes about 40 s; 512^2 about a quarter of that); `--model
dmd2` measures the one-call distilled path. Peak RSS is the kernel's high-water mark (VmHWM, Linux),
read at the end: the pipeline's random fp32 weights (about 14 GB for SDXL) dominate it, the
statistics are about 5 KB per (layer, step). Nothing is written except `--json` and the calibration (`--out`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gag_export.workflows import calibrate  # noqa: E402
from gag_export.workflows.bench.probes import peak_rss_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--prompts", type=int, default=2, help="how many of the shipped prompts")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("calibration-full.json"), help="the calibration itself")
    parser.add_argument("--json", type=Path, default=None, help="the measurement")
    args = parser.parse_args()

    import torch

    config = calibrate.CalibrationConfig(args.model, prompts=calibrate.default_prompts()[: args.prompts],
                                         steps=args.steps, weights=args.weights, height=args.height, width=args.width)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] step {done}/{total}", file=sys.stderr, flush=True)

    cal = calibrate.run_calibration(config, progress=progress)
    total = time.perf_counter() - start
    data = calibrate.write_calibration(cal, args.out)
    result = {
        "model": args.model, "weights": args.weights, "height": args.height, "width": args.width,
        "prompts": args.prompts, "steps": cal.steps, "layers": len(cal.layer_names),
        "seconds_total": round(total, 1), "seconds_sampling": round(cal.seconds, 1),
        "seconds_imports_and_loading": round(total - cal.seconds, 1),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        "statistics_mib": round(sum(a.nbytes for a in (cal.stats.hist, cal.stats.above, cal.stats.count,
                                                         cal.stats.total, cal.stats.maximum)) / 2**20, 3),
        "recommended_eta_range": [min(data["recommended"]["eta"]), max(data["recommended"]["eta"])],
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
