"""LoRA without re-tracing: `gag-export lora` against `gag-export export --lora` (issue 22, item 4).

    python benchmarks/bench_lora.py --model sdxl --weights random --rank 64 --out /data/bench-lora \
        --json benchmarks/results/lora_sdxl_fp32.json            # full size: ~16 min export, ~11 GiB
    python benchmarks/bench_lora.py --model tiny-sdxl --rank 4 --out /tmp/bench-lora --compare   # seconds

Phases, each `gag-export` in its own process (so each peak RSS, Linux's VmHWM, is that command's):
  1. base:    `export --component <denoiser>` (the export a LoRA variant starts from);
  2. a random rank-R LoRA on every attention projection (to_q, to_k, to_v, to_out.0 and FLUX's
     add_*_proj / to_add_out) in diffusers/PEFT keys, its shapes read from the base export's weight
     map (no model loaded);
  3. lora:    `lora <base> --lora <file> --out <root>` (time, peak RSS);
  4. fresh:   `export --component <denoiser> --lora <file>` (time, peak RSS);
  5. sizes: the variant's bytes on disk, apart from what it shares with the base by hard links, and
     with `--compare` the largest difference between the two graphs' outputs on ONNX Runtime.
Not a test: at full size minutes and 10+ GiB of RAM (each export loads the fp32 UNet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs one gag-export command in this child and prints its peak RSS last (VmHWM: ru_maxrss carries
# the parent's peak into a child).
CHILD = r"""
import json, sys
from gag_export.cli import cli
from gag_export.workflows.bench import peak_rss_bytes
code = 0
try:
    cli.main(sys.argv[1:], standalone_mode=False, obj={})
except SystemExit as exc:
    code = exc.code or 0
print("PEAK " + json.dumps({"peak_rss_bytes": peak_rss_bytes(), "exit": code}))
"""
PROJECTIONS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", ".add_q_proj.weight",
               ".add_k_proj.weight", ".add_v_proj.weight", ".to_add_out.weight")


def run_command(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    marker = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode or not marker or json.loads(marker[-1][5:])["exit"]:
        raise SystemExit(f"gag-export {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(json.loads(marker[-1][5:])["peak_rss_bytes"] / 2**30, 3)}


def write_random_lora(weight_map, prefix: str, rank: int, path: Path, seed: int = 0) -> int:
    """A rank-`rank` LoRA on every attention projection the weight map knows; returns how many layers."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in weight_map.shapes().items():
        if name.endswith(PROJECTIONS) and len(shape) == 2:
            module = name.removesuffix(".weight")
            state[f"{prefix}.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5
            state[f"{prefix}.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=gen) * 1e-3
    save_file(state, str(path))
    return len(state) // 2


def disk_bytes(folder: Path, shared_with: Path) -> dict:
    """Apparent size of `folder`, and what it newly takes on disk (files hard-linked to `shared_with` excluded)."""
    shared = {(s.st_dev, s.st_ino) for s in (p.stat() for p in shared_with.rglob("*") if p.is_file())}
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    return {"apparent_bytes": sum(s.st_size for s in files),
            "new_bytes_on_disk": sum(s.st_blocks * 512 for s in files if (s.st_dev, s.st_ino) not in shared)}


def max_output_difference(base, a: Path, b: Path, component: str) -> float:
    """The largest difference of two graphs' first outputs on the base export's recorded sample feed."""
    import numpy as np
    import onnxruntime as ort

    from gag_export.export.parity import load_reference

    feed = load_reference(base.graphs_dir, base.components[component]["parity_reference"]).feed
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, dict(feed))[0] for p in (a, b)]
    return float(np.abs(outs[0] - outs[1]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--weights", default=None, help="random (full size, no download), tiny, pretrained")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (graphs of three exports)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compare", action="store_true", help="ONNX Runtime outputs of lora vs export --lora")
    parser.add_argument("--keep", action="store_true", help="keep the graphs")
    args = parser.parse_args()

    from gag_export.artifacts.manifest import Manifest
    from gag_export.export.lora_variant import denoiser_name
    from gag_export.export.weight_map import load_weight_map
    from gag_export.models import get_entry

    entry = get_entry(args.model)
    component = "unet" if entry.family == "sdxl" else "transformer"
    common = ["--model", args.model, "--dtype", args.dtype, "--component", component]
    if args.weights:
        common += ["--weights", args.weights]
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = {"model": args.model, "weights": args.weights, "dtype": args.dtype, "rank": args.rank,
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs"}
    result["base_export"] = run_command(["export", *common, "--out", str(out / "base")])
    base = Manifest.load(out / "base" / args.model)
    weight_map = load_weight_map(base.graphs_dir, base.components[denoiser_name(base)]["weight_map"])
    lora = out / "lora.safetensors"
    result["lora_layers"] = write_random_lora(weight_map, component, args.rank, lora)
    result["lora_file_bytes"] = lora.stat().st_size
    result["lora"] = run_command(["lora", str(base.graphs_dir), "--lora", str(lora), "--out", str(out / "variant"),
                                  "--no-refit"])
    result["export_lora"] = run_command(["export", *common, "--lora", str(lora), "--out", str(out / "fresh")])
    variant = out / "variant" / args.model
    result["variant_disk"] = disk_bytes(variant, base.graphs_dir)
    result["changed_initializers"] = Manifest.load(variant).data["derived_from"]["changed_initializers"]
    if args.compare:
        result["max_abs_difference"] = max_output_difference(base, variant / component / "model.onnx",
                                                             out / "fresh" / args.model / component / "model.onnx",
                                                             component)
    print(json.dumps(result, indent=2))
    print(f"| {args.model} {args.dtype} rank {args.rank} ({result['lora_layers']} layers) | lora "
          f"{result['lora']['seconds']:.1f} s, {result['lora']['peak_rss_gib']:.2f} GiB | export --lora "
          f"{result['export_lora']['seconds']:.1f} s, {result['export_lora']['peak_rss_gib']:.2f} GiB | variant "
          f"{result['variant_disk']['new_bytes_on_disk'] / 2**30:.2f} GiB new on disk "
          f"({result['variant_disk']['apparent_bytes'] / 2**30:.2f} GiB apparent) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
