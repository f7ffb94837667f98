"""GAG cost at the attention layer: one realistic SDXL cross-attention layer and the tiny UNet.

Plain (diffusers' AttnProcessor2_0) vs GAG (sort and bisect entmax), eager, on this machine.
Variants are timed interleaved (plain, gag-sort, gag-bisect, plain, ...) so that load from
other processes hits them alike; the ratio is of medians over the same run.

    python benchmarks/bench_attention.py [--iters 30] [--warmup 5] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gag_export.gag.attention import GAGAttnProcessor, GuidanceParams, apply_gag  # noqa: E402
from gag_export.gag import GAGConfig  # noqa: E402


def sdxl_cross_attention_layer() -> tuple[Attention, dict]:
    """down_blocks.1 of SDXL: 640 channels, 10 heads of 64, 77 text tokens of 2048 channels."""
    torch.manual_seed(0)
    attn = Attention(query_dim=640, cross_attention_dim=2048, heads=10, dim_head=64).eval()
    inputs = {"hidden_states": torch.randn(1, 4096, 640), "encoder_hidden_states": torch.randn(1, 77, 2048)}
    return attn, inputs


def time_interleaved(variants: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Run each variant's callable `iters` times, round-robin, after `warmup` rounds."""
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt)
    return times


def layer_variants() -> dict:
    attn, inputs = sdxl_cross_attention_layer()
    processors = {
        "plain": AttnProcessor2_0(),
        "gag-sort": GAGAttnProcessor(GuidanceParams(GAGConfig(method="sort"))),
        "gag-bisect": GAGAttnProcessor(GuidanceParams(GAGConfig(method="bisect"))),
    }

    def runner(processor):
        return lambda: processor(attn, **inputs)

    return {name: runner(p) for name, p in processors.items()}


def tiny_unet_variants() -> dict:
    from conftest import tiny_sdxl_unet, unet_inputs

    models = {"plain": tiny_sdxl_unet()}
    for method in ("sort", "bisect"):
        model = tiny_sdxl_unet()
        apply_gag(model, GAGConfig(method=method))
        models[f"gag-{method}"] = model
    inputs = unet_inputs()
    return {name: (lambda m=m: m(**inputs)) for name, m in models.items()}


def summarize(times: dict[str, list[float]]) -> dict:
    plain = statistics.median(times["plain"])
    return {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "ratio_vs_plain": statistics.median(t) / plain,
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__},
        "sdxl_cross_attention_layer": summarize(time_interleaved(layer_variants(), args.iters, args.warmup)),
        "tiny_unet": summarize(time_interleaved(tiny_unet_variants(), args.iters, args.warmup)),
    }
    for section in ("sdxl_cross_attention_layer", "tiny_unet"):
        print(f"\n{section} (median of {args.iters}, {args.threads} threads)")
        for name, r in results[section].items():
            print(f"  {name:<11} {r['median_ms']:8.2f} ms   x{r['ratio_vs_plain']:.2f} vs plain")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
