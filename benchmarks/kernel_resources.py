"""What the fused GAG kernel costs on NVIDIA GPUs, read from its builds on a machine without one.

Builds the kernel ahead of time (`gag_export/gag/kernels/aot.py`: Triton + its bundled ptxas) for
each architecture and shape, as a launch would, and prints per build: the tile, registers and
local memory (spills) per thread, shared memory per block against the GPU's limit, resident
blocks per SM, and the SASS instructions one thread executes (loops counted by their trip
counts). Where the kernel's first form does not fit a GPU, the form a launch falls back to
(values loaded after the entmax, `triton_gag.KERNEL_FORMS`) is built too. For the SDXL shape it also totals the warp instructions of a whole call per tile, the
kernel's work; `--measured` puts an H200 block-size sweep from `bench_gpu.py` beside it.

These are static counts, not times. Use them to compare builds of the same kernel (a change to
the kernel, a tile, an architecture), then time the winner on a GPU.

    python benchmarks/kernel_resources.py --json benchmarks/results/kernel-resources.json \
        --measured benchmarks/results/gpu-h200-bench_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from gag_export.gag import kernels
from gag_export.gag.kernels import aot, guidance_schedule
from gag_export.gag.kernels.triton_gag import KERNEL_FORMS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# mask kind -> (mask_mode, per key): "-row" masks are one row of keys for all queries (text padding)
MASKS = {"none": (0, False), "additive": (1, False), "bool": (2, False), "additive-row": (1, True), "bool-row": (2, True)}
# (name, keys, head_dim): CLIP text at SDXL's and SD2's head sizes, T5 text (FLUX.1-schnell's 256
# tokens at its head_dim 128; 512 at 64), and a long odd one
SHAPES = [("clip77-d64", 77, 64), ("clip77-d128", 77, 128), ("t5-256-d128", 256, 128), ("t5-512-d64", 512, 64), ("300-d40", 300, 40)]
# the SDXL cross-attention calls of one UNet step at 1024x1024: (heads, queries, layers)
SDXL_CALLS = [(10, 4096, 10), (20, 1024, 50)]
FORM_NAMES = {False: "values-with-keys", True: "late-values"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(aot.ARCHS), help=f"of {sorted(aot.ARCHS)}")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--masks", default="none,bool,bool-row", help=f"of {sorted(MASKS)}")
    parser.add_argument("--sweep-arch", default="sm_90", help="architecture of the tile sweep at the SDXL shape ('' skips it)")
    parser.add_argument("--measured", type=Path, help="a bench_gpu.py JSON whose 'core' section has fused_sweep timings")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    for name, spec, allowed in (("--archs", args.archs, aot.ARCHS), ("--dtypes", args.dtypes, DTYPES), ("--masks", args.masks, MASKS)):
        unknown = [x for x in spec.split(",") if x not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {sorted(allowed)}")
    return args


def row(build: aot.KernelBuild, mask: str) -> dict:
    arch = aot.ARCHS[build.arch]
    executed = build.executed_instructions(*guidance_schedule())
    return {
        **asdict(build), "mask": mask,
        "fits": build.shared_bytes <= arch.shared_memory_per_block,
        "shared_limit": arch.shared_memory_per_block,
        "blocks_per_sm": build.blocks_per_sm(),
        "executed_per_thread": executed,
    }


def call_warp_instructions(r: dict, heads: int, queries: int) -> int:
    """Warp instructions of one call: programs x warps x instructions per thread."""
    programs = heads * -(-queries // r["block_m"])
    return programs * r["num_warps"] * r["executed_per_thread"]


def builds(args) -> list[dict]:
    rows = []
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            for name, lk, d in SHAPES:
                q = torch.empty(1, 1, 1, d, dtype=DTYPES[dtype], device="meta")
                kv = torch.empty(1, 1, lk, d, dtype=DTYPES[dtype], device="meta")
                if kernels.fused_shape_reason(q, kv, kv, 1.5, None, 1.0, 1.0, 0.0):
                    continue  # outside the dispatch's envelope: never built
                for mask in args.masks.split(","):
                    mode, per_key = MASKS[mask]
                    for late_values in KERNEL_FORMS:  # the next form only where the first does not fit
                        r = row(aot.compile_kernel(arch, DTYPES[dtype], lk, d, mask_mode=mode, mask_per_key=per_key, late_values=late_values), mask)
                        r.update(shape=name, form=FORM_NAMES[late_values])
                        rows.append(r)
                        _print_build(r)
                        if r["fits"]:
                            break
    return rows


def sweep(args, measured: dict | None) -> list[dict]:
    rows = []
    for block_m, warps, maxnreg in kernels.SWEEP_TILES:
        r = row(aot.compile_kernel(args.sweep_arch, torch.float16, 77, 64, block_m=block_m, num_warps=warps, maxnreg=maxnreg), "none")
        r.update(maxnreg=maxnreg, form=FORM_NAMES[False])
        per_call = [call_warp_instructions(r, h, lq) for h, lq, _ in SDXL_CALLS]
        r["call_warp_instructions"] = dict(zip((f"{h}x{lq}" for h, lq, _ in SDXL_CALLS), per_call))
        r["step_warp_instructions"] = sum(x * n for x, (_, _, n) in zip(per_call, SDXL_CALLS))
        r["measured_ms"] = _measured(measured, block_m, warps) if maxnreg is None else None
        rows.append(r)
    return rows


def _measured(measured: dict | None, block_m: int, warps: int) -> dict | None:
    if not measured:
        return None
    out = {}
    for shape, entry in measured.get("core", {}).items():
        value = entry.get("fused_sweep", {}).get(f"m{block_m}_w{warps}")
        if isinstance(value, float):
            out[shape] = value
    return out or None


def _short(measured: dict | None) -> str:
    if not measured:
        return "-"
    return ", ".join(f"{s.split()[1][1:]}x{s.split()[2][2:]}: {ms}" for s, ms in measured.items())


def _print_build(r: dict) -> None:
    spill = f"{r['local_bytes']} B SPILL" if r["local_bytes"] else "0"
    fit = "fits" if r["fits"] else "DOES NOT FIT"
    print(f"{r['arch']:6s} {r['dtype']:8s} {r['shape']:12s} {r['form']:16s} mask={r['mask']:8s} tile {r['block_m']:3d}x{r['block_n']:3d}+{r['block_n2']:<3d}/{r['num_warps']}w"
          f"  regs {r['registers']:3d}  local {spill:>5s}  shared {r['shared_bytes'] / 1024:6.1f} KiB of {r['shared_limit'] / 1024:.0f} ({fit})"
          f"  blocks/SM {r['blocks_per_sm']}  SASS {r['sass_instructions']:6d}  executed/thread {r['executed_per_thread']}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured else None
    import triton

    result = {"triton": triton.__version__, "torch": torch.__version__, "schedule": guidance_schedule(), "builds": builds(args)}
    if args.sweep_arch:
        print(f"\ntile sweep, fp16, 77 keys, head_dim 64, {args.sweep_arch}: warp instructions of one call and of one SDXL step's 60 calls")
        result["sweep"] = sweep(args, measured)
        base = next((r["step_warp_instructions"] for r in result["sweep"]
                     if (r["block_m"], r["num_warps"], r["maxnreg"]) == (128, 8, None)), None)
        for r in result["sweep"]:
            calls = r["call_warp_instructions"]
            ratio = f"{r['step_warp_instructions'] / base:.2f}x" if base else "-"
            cap = f" cap {r['maxnreg']}" if r["maxnreg"] else ""
            print(f"  {r['block_m']:3d}x{r['num_warps']}w{cap} regs {r['registers']:3d} local {r['local_bytes']} blocks/SM {r['blocks_per_sm']} "
                  + "  ".join(f"{s}: {n / 1e6:6.2f} M" for s, n in calls.items())
                  + f"  step vs 128x8: {ratio}  H200 ms (eager launches): {_short(r['measured_ms'])}")
    if args.json:  # whole or not at all: written beside, then renamed over
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
