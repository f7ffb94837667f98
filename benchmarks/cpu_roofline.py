"""The arithmetic floor of one full-size SDXL UNet step on this CPU.

Counts the UNet's floating-point operations at a resolution with torch's FlopCounterMode on the
meta device (no weights, no memory, seconds), measures this machine's fp32 matrix-product rate
(a 4096^3 matmul through PyTorch, the fastest kernel either runtime has), and divides: no fp32
runtime, eager or ONNX Runtime, runs a step much under that time. Used in benchmarks/README.md to
judge the "ONNX Runtime >= 1.2x eager" goal.

    python benchmarks/cpu_roofline.py --threads 2 --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def unet_flops(resolution: int) -> dict[str, float]:
    """TFLOP per op of one SDXL UNet call (batch 1, 77 text tokens), counted on the meta device."""
    from diffusers import UNet2DConditionModel

    path = REPO / "gag_export" / "models" / "configs" / "sdxl" / "unet.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    latent = resolution // 8
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel(**cfg).eval()
        inputs = dict(sample=torch.randn(1, 4, latent, latent), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, 77, cfg["cross_attention_dim"]),
                      added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})
        with FlopCounterMode(display=False) as counter:
            unet(**inputs)
    return {str(op): n / 1e12 for op, n in counter.get_flop_counts()["Global"].items()}


def matmul_gflops(threads: int, n: int = 4096, reps: int = 12) -> tuple[float, float]:
    """(best, median) GFLOP/s of single n^3 fp32 products; the best is what the machine can do."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    rates.sort()
    return rates[-1], rates[len(rates) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    by_op = unet_flops(args.resolution)
    total = sum(by_op.values())
    best, median = matmul_gflops(args.threads)
    print(json.dumps({"resolution": args.resolution, "threads": args.threads, "unet_tflop": round(total, 3),
                      "tflop_by_op": {k: round(v, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
                      "matmul_gflops_best": round(best, 1), "matmul_gflops_median": round(median, 1),
                      "floor_s_at_best": round(total * 1e3 / best, 1), "floor_s_at_median": round(total * 1e3 / median, 1)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
