"""Export benchmark: a full-size SDXL UNet to ONNX, and ONNX Runtime vs torch eager per step.

    python benchmarks/bench_export.py --model sdxl --weights random [--size 1024] [--steps 2]

Measures, on this machine's CPU:
- export time and peak RSS of `export_model` for the UNet alone (GAG on, then --no-gag), and the
  graph size (model.onnx + model.onnx.data);
- per-step time of one UNet call at the given size (batch 1) in torch eager and in ONNX Runtime
  (CPU provider), GAG on and off, and the ORT/eager ratio.

Each phase runs in its own process, so each peak RSS is that phase's alone and memory is given
back between phases (a full-size fp32 UNet is 10.3 GB of weights):
  1. export-gag:   build the random UNet, export with GAG (bisect), then time eager GAG and eager plain;
  2. export-plain: build it again (same seed, same weights), export without GAG;
  3. ort:          time both graphs in ONNX Runtime.
Results go to stdout as a table and to --json. Graphs are deleted at the end unless --keep-graphs.
Not a test: minutes and 10+ GiB of RAM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gib() -> float:
    from gag_export.workflows.bench import peak_rss_bytes  # VmHWM: ru_maxrss carries a parent's peak into its children

    return peak_rss_bytes() / 2**30


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _unet_setup(args):
    import torch

    from gag_export.models import ImageShape, descriptors_for, get_entry, load_pipeline

    torch.set_num_threads(args.threads)
    entry = get_entry(args.model)
    start = time.perf_counter()
    pipe = load_pipeline(entry, weights=args.weights, components=["unet"])
    load_s = time.perf_counter() - start
    unet = next(d for d in descriptors_for(entry, pipe) if d.role == "denoiser")
    return entry, pipe, unet, ImageShape(args.size, args.size, 1), load_s


def _time_steps(call, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def phase_export(args, gag: bool) -> dict:
    import torch

    from gag_export.gag.attention import apply_gag, remove_gag
    from gag_export.export import ExportConfig, export_model, sample_feed
    from gag_export.arrays import to_torch
    from gag_export.gag import GAGConfig
    from gag_export.models import Precision

    entry, pipe, unet, shape, load_s = _unet_setup(args)
    out = {"load_s": load_s, "rss_after_load_gib": rss_gib(), "params": sum(p.numel() for p in pipe.unet.parameters())}
    cfg = GAGConfig(method="bisect") if gag else None
    config = ExportConfig(args.model, Path(args.out) / ("gag" if gag else "plain"), shape, gag=cfg,
                          components=(unet.name,), weights=args.weights)
    start = time.perf_counter()
    manifest = export_model(pipe, entry, config)
    out["export_s"] = time.perf_counter() - start
    out["export_peak_rss_gib"] = peak_rss_gib()
    comp = manifest.components[unet.name]
    out.update(graph_bytes=comp["size_bytes"], nodes=comp["nodes"], graphs_dir=str(manifest.graphs_dir),
               external_data=comp["external_data"] is not None)
    if gag and args.steps:
        gc.collect()
        for label, with_gag in (("eager_gag", True), ("eager_plain", False)):
            if with_gag:
                apply_gag(pipe.unet, cfg)
            else:
                remove_gag(pipe.unet)
            module = unet.export_module(pipe)
            feed = sample_feed(unet, shape, Precision.FP32, 0, with_gag)
            inputs = [to_torch(v) for v in feed.values()]
            with torch.no_grad():
                out[label + "_s"] = _time_steps(lambda m=module, x=inputs: m(*x), args.steps, args.warmup)
        out["eager_peak_rss_gib"] = peak_rss_gib()
    return out


def phase_ort(args, graphs: dict[str, str]) -> dict:
    import onnxruntime as ort

    from gag_export.export import sample_feed
    from gag_export.artifacts.manifest import Manifest
    from gag_export.models import ImageShape, Precision, descriptors_for, get_entry

    entry = get_entry(args.model)
    unet = next(d for d in descriptors_for(entry) if d.role == "denoiser")
    shape = ImageShape(args.size, args.size, 1)
    out = {}
    for label, graphs_dir in graphs.items():
        manifest = Manifest.load(Path(graphs_dir))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if not args.ort_prepack:  # pre-packed GEMM weights would be a second 10 GB copy
            options.add_session_config_entry("session.disable_prepacking", "1")
        start = time.perf_counter()
        sess = ort.InferenceSession(str(manifest.graph_path(unet.name)), options, providers=["CPUExecutionProvider"])
        out[f"ort_{label}_session_s"] = time.perf_counter() - start
        gag = label == "gag"
        feed = dict(sample_feed(unet, shape, Precision.FP32, 0, gag))
        out[f"ort_{label}_s"] = _time_steps(lambda s=sess, f=feed: s.run(None, f), args.steps, args.warmup)
        del sess
        gc.collect()
    out["ort_peak_rss_gib"] = peak_rss_gib()
    return out


def run_phase(args, phase: str, extra: dict | None = None) -> dict:
    result_file = Path(args.out) / f"{phase}.json"
    cmd = [sys.executable, __file__, "--phase", phase, "--phase-result", str(result_file), *args.forward]
    if extra:
        cmd += ["--phase-extra", json.dumps(extra)]
    print(f"[bench_export] {phase}: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}", "wall_s": time.perf_counter() - start}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - start
    print(f"[bench_export] {phase}: {json.dumps(result)}", flush=True)
    return result


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def summarize(results: dict, args) -> str:
    a, b, o = results.get("export-gag", {}), results.get("export-plain", {}), results.get("ort", {})
    rows = [
        ("UNet parameters", f"{a.get('params', 0) / 1e9:.3f} B"),
        ("random weights build (s)", f"{a.get('load_s', float('nan')):.0f}"),
        ("export GAG: time (s) / peak RSS (GiB)", f"{a.get('export_s', float('nan')):.0f} / {a.get('export_peak_rss_gib', float('nan')):.1f}"),
        ("export plain: time (s) / peak RSS (GiB)", f"{b.get('export_s', float('nan')):.0f} / {b.get('export_peak_rss_gib', float('nan')):.1f}"),
        ("graph size GAG / plain (GB)", f"{a.get('graph_bytes', 0) / 1e9:.2f} / {b.get('graph_bytes', 0) / 1e9:.2f}"),
        ("nodes GAG / plain", f"{a.get('nodes', '?')} / {b.get('nodes', '?')}"),
    ]
    for label in ("gag", "plain"):
        eager, ortt = _median(a.get(f"eager_{label}_s", [])), _median(o.get(f"ort_{label}_s", []))
        rows.append((f"step {args.size}x{args.size} {label}: eager / ORT (s)", f"{eager:.3g} / {ortt:.3g}"))
        rows.append((f"ORT/eager ratio {label}", f"{ortt / eager:.2f}" if not (math.isnan(eager) or math.isnan(ortt)) else "n/a"))
    rows.append(("ORT session create GAG / plain (s)",
                 f"{o.get('ort_gag_session_s', float('nan')):.0f} / {o.get('ort_plain_session_s', float('nan')):.0f}"))
    rows.append(("ORT peak RSS (GiB)", f"{o.get('ort_peak_rss_gib', float('nan')):.1f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", help="an SDXL-family registry entry")
    parser.add_argument("--weights", default="random", choices=["random", "pretrained", "tiny"])
    parser.add_argument("--size", type=int, default=1024, help="image height = width in pixels")
    parser.add_argument("--steps", type=int, default=2, help="timed UNet calls per variant (0: skip timing)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ort-prepack", action="store_true", help="let ORT pre-pack GEMM weights (more memory)")
    parser.add_argument("--out", default="/tmp/bench_export", help="scratch folder for the graphs")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--keep-graphs", action="store_true")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase-result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase-extra", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        extra = json.loads(args.phase_extra) if args.phase_extra else {}
        result = {"export-gag": lambda: phase_export(args, True), "export-plain": lambda: phase_export(args, False),
                  "ort": lambda: phase_ort(args, extra)}[args.phase]()
        Path(args.phase_result).write_text(json.dumps(result))
        return

    args.forward = ["--model", args.model, "--weights", args.weights, "--size", str(args.size), "--steps",
                    str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--out", args.out]
    if args.ort_prepack:
        args.forward.append("--ort-prepack")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import psutil
    import torch

    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__, "threads": args.threads},
               "settings": {k: v for k, v in vars(args).items() if k not in ("forward", "phase", "phase_result", "phase_extra")}}
    start = time.perf_counter()
    results["export-gag"] = run_phase(args, "export-gag")
    results["export-plain"] = run_phase(args, "export-plain")
    graphs = {k: results[f"export-{k}"]["graphs_dir"] for k in ("gag", "plain") if "graphs_dir" in results[f"export-{k}"]}
    if args.steps and graphs:
        results["ort"] = run_phase(args, "ort", graphs)
    results["total_s"] = time.perf_counter() - start
    print(summarize(results, args), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep_graphs:
        for d in graphs.values():
            shutil.rmtree(Path(d).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
