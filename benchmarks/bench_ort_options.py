"""ONNX Runtime (CPU) levers on one exported denoiser: session options, IO binding, onnxslim.

`gag-export bench` runs graphs the way the runtime does (`runtime/ort_backend.py`: graph
optimization level ALL, intra-op threads, everything else ONNX Runtime's default). This script
times the same denoiser graph under other settings, to see which levers are worth putting into
the runtime:

- default:     what the runtime does (ORT_ENABLE_ALL, intra-op threads = --threads);
- extended:    ORT_ENABLE_EXTENDED (no NCHWc layout transformation of the convolutions);
- basic:       ORT_ENABLE_BASIC (constant folding and redundant-node removal only);
- no-spin:     default + `session.intra_op.allow_spinning = 0` (threads sleep between ops instead of
               spinning: cheaper for whatever else shares the cores, e.g. interleaved torch);
- no-mempat:   default with the memory pattern optimization off;
- no-prepack:  default + `session.disable_prepacking = 1` (GEMM weights not re-laid out at load:
               less memory, possibly slower MatMuls);
- iobinding:   default, run through IO binding with inputs bound once as OrtValues and the
               output pre-allocated (saves the per-call copies of the feed and output);
- slim:        default on the onnxslim-ed graph (export.slim_graph; loads the whole graph: for
               small graphs only).
- profile:     default with ONNX Runtime's profiler on: the result lists ms per step by op type
               (where an ORT step spends its time; the profiler's own cost inflates the total).
- mha:         default on the graph rewritten by onnxruntime's transformer optimizer for UNets
               (`optimize_model(model_type="unet")`) with only its CPU-capable fusions: attention
               into com.microsoft MultiHeadAttention, LayerNorm, Gelu, SkipLayerNorm (its GroupNorm,
               BiasSplitGelu, BiasAdd, NHWC and packed-QKV forms are CUDA-only and are turned off).
               Loads the whole graph (about 10 GB for SDXL).

Sessions are created one after the other (a full-size SDXL UNet session holds ~10 GB), each
timed for --warmup + --iters calls after its first call; `default` is run again at the end to
show drift. The feed is the descriptor's sample input at the graph's shape (GAG values of the
export).

    python benchmarks/bench_ort_options.py graphs/bench/gag/dmd2 --iters 3 --warmup 1
    python benchmarks/bench_ort_options.py graphs/bench/gag/tiny-sdxl --variants all --iters 30
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("default", "extended", "basic", "no-spin", "no-mempat", "no-prepack", "iobinding", "slim", "mha", "profile")
DEFAULT_VARIANTS = ("default", "extended", "no-spin", "no-prepack", "iobinding")


def denoiser_feed(graphs_dir: Path):
    """(onnx path, feed, output names) of the manifest's denoiser, fed as the runtime feeds it."""
    from gag_export.artifacts.manifest import Manifest
    from gag_export.models import descriptors_for, get_entry
    from gag_export.runtime.generation import GAGParams

    manifest = Manifest.load(graphs_dir)
    name, entry = next((n, c) for n, c in manifest.components.items() if c["role"] == "denoiser")
    descriptor = next(d for d in descriptors_for(get_entry(manifest.model)) if d.name == name)
    gag = manifest.gag
    feed = {k: v.numpy() for k, v in descriptor.sample_inputs(manifest.shape(), "fp32", 0, gag=gag is not None).items()}
    if gag is not None:
        feed.update(GAGParams(gag.scale, gag.eta, gag.zeta).feed())
    return manifest.graph_path(name), feed, [o["name"] for o in entry["outputs"]]


def session(path: Path, variant: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }.get(variant, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if variant == "no-spin":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if variant == "no-mempat":
        options.enable_mem_pattern = False
    if variant == "no-prepack":
        options.add_session_config_entry("session.disable_prepacking", "1")
    if variant == "profile":
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "ort-options-profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(sess, variant: str, feed: dict, outputs: list[str]):
    ranks = {i.name: len(i.shape) for i in sess.get_inputs()}
    feed = {k: (v.reshape([1] * ranks[k]) if v.size == 1 and v.ndim != ranks[k] else v) for k, v in feed.items()}
    if variant != "iobinding":
        return lambda: sess.run(outputs, feed)
    import onnxruntime as ort

    binding = sess.io_binding()
    kept = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in feed.values()]
    for name, value in zip(feed, kept):
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cpu")

    def run():
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    run.kept = kept  # keep the bound buffers alive
    return run


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_rss_gib() -> float:
    from gag_export.workflows.bench import peak_rss_bytes  # VmHWM: ru_maxrss carries a parent's peak into its children

    return peak_rss_bytes() / 2**30


def ms_by_op(profile_path: str, calls: int) -> dict[str, float]:
    """ms per call by op type from an ONNX Runtime profile (kernel time only), largest first."""
    events = json.loads(Path(profile_path).read_text())
    Path(profile_path).unlink()
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / calls
    return {op: round(ms, 1) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def fuse_for_cpu(src: Path, dest: Path) -> dict:
    """onnxruntime's UNet fusions that have CPU kernels; returns {op type: count} of the fused ops."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for cuda_only in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                      "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        setattr(options, cuda_only, False)
    model = optimize_model(str(src), model_type="unet", optimization_options=options, opt_level=0, use_gpu=False)
    counts: dict[str, int] = {}
    for node in model.model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    model.save_model_to_file(str(dest), use_external_data_format=True)
    return counts


def time_variant(path: Path, variant: str, feed: dict, outputs: list[str], threads: int, warmup: int, iters: int,
                 scratch: Path) -> dict:
    graph = path
    if variant == "slim":
        from gag_export.export import slim_graph

        graph = scratch / "slim" / "model.onnx"
        graph.parent.mkdir(exist_ok=True)
        slim_graph(path, graph)
    fused = None
    if variant == "mha":
        graph = scratch / "mha" / "model.onnx"
        graph.parent.mkdir(exist_ok=True)
        fused = fuse_for_cpu(path, graph)
        gc.collect()
    before = rss_gib()
    start = time.perf_counter()
    sess = session(graph, variant, threads)
    create_s = time.perf_counter() - start
    run = runner(sess, variant, feed, outputs)
    start = time.perf_counter()
    reference = run()
    first_s = time.perf_counter() - start
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result = {
        "variant": variant, "session_s": round(create_s, 2), "first_call_s": round(first_s, 3),
        "p50_ms": round(float(np.median(times)) * 1e3, 2), "min_ms": round(min(times) * 1e3, 2),
        "samples_ms": [round(t * 1e3, 2) for t in times], "rss_gib": round(rss_gib() - before, 2),
        "process_peak_rss_gib": round(peak_rss_gib(), 2),
        "output_checksum": float(np.abs(reference[0]).mean()),
    }
    if fused is not None:
        result["fused_ops"] = fused
    if variant == "profile":
        result["ms_per_step_by_op"] = ms_by_op(sess.end_profiling(), calls=1 + warmup + iters)
    del run, sess
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs_dir", type=Path, help="An exported model folder (with manifest.json).")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"Comma-separated of {', '.join(VARIANTS)}, or all.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = VARIANTS if args.variants == "all" else tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; use {', '.join(VARIANTS)}")
    variants = tuple(dict.fromkeys(variants)) + (("default",) if "default" in variants else ())

    path, feed, outputs = denoiser_feed(args.graphs_dir)
    results = []
    with tempfile.TemporaryDirectory(prefix="ort-options-") as scratch:
        for variant in variants:
            result = time_variant(path, variant, feed, outputs, args.threads, args.warmup, args.iters, Path(scratch))
            results.append(result)
            print(f"{variant:<10} p50 {result['p50_ms']:10.1f} ms  min {result['min_ms']:10.1f} ms  session "
                  f"{result['session_s']:6.1f} s  first call {result['first_call_s']:7.2f} s  RSS +{result['rss_gib']:.2f} GiB",
                  flush=True)
    base = results[0]["p50_ms"]
    for r in results:
        r["vs_default"] = round(base / r["p50_ms"], 3)
    if args.json:
        args.json.write_text(json.dumps({"graph": str(path), "threads": args.threads, "warmup": args.warmup,
                                         "iters": args.iters, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
