"""GAG's cost per SDXL cross-attention layer in eager PyTorch and in ONNX Runtime, and what it adds to a step.

A full-size SDXL UNet cannot hold its GAG and plain ONNX Runtime sessions in 24 GiB at once, so
`gag-export bench` times them in separate processes, one after the other, where run-to-run
noise (a few percent) is as large as the effect. This measures the effect where it lives: one
diffusers `Attention` layer at each of SDXL's two GAG shapes, plain (`AttnProcessor2_0`) vs GAG
(`GAGAttnProcessor`, bisect), eager and exported (dynamo, opset 20, the guidance values as 0-d
inputs as in the real export), all four timed interleaved. The per-step estimate multiplies the
per-layer difference by the layer counts of SDXL's down+up blocks (10 layers at 4096 tokens x 10
heads, 50 at 1024 x 20). An ONNX Runtime profile of the GAG layer lists where its time goes.

    python benchmarks/bench_gag_layer_ort.py [--threads N] [--iters 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from gag_export.gag.attention import GAGAttnProcessor, GuidanceParams  # noqa: E402
from gag_export.gag import GAGConfig  # noqa: E402

# (tokens, channels, heads, layers in SDXL's down+up blocks)
SHAPES = {"4096 tokens x 10 heads": (4096, 640, 10, 10), "1024 tokens x 20 heads": (1024, 1280, 20, 50)}
GAG_VALUES = (10.0, 15.0, 0.0)


class Layer(torch.nn.Module):
    """One attention layer as a graph: (hidden, text, gag_scale, gag_eta, gag_zeta) -> hidden."""

    def __init__(self, attn: Attention, gag: bool):
        super().__init__()
        self.attn = attn
        self.params = GuidanceParams(GAGConfig(method="bisect")) if gag else None
        self.processor = GAGAttnProcessor(self.params) if gag else AttnProcessor2_0()

    def forward(self, hidden, text, gag_scale, gag_eta, gag_zeta):
        if self.params is None:
            return self.processor(self.attn, hidden, text)
        with self.params.bind(gag_scale, gag_eta, gag_zeta):
            return self.processor(self.attn, hidden, text)


def session(module: Layer, args: tuple, path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort  # noqa: PLC0415

    program = torch.onnx.export(module, args, dynamo=True, opset_version=20, verbose=False,
                                input_names=["hidden", "text", "gag_scale", "gag_eta", "gag_zeta"])
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess, feed


def profile_by_op(sess, feed, runs: int = 5) -> list[tuple[str, float]]:
    """ms per run per op type (nodes on score-sized [.., 77] tensors marked), from ORT's profiler."""
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            shapes = e["args"].get("input_type_shape") or []
            scores = any(len(v or []) == 4 and v[-1] == 77 for s in shapes for v in s.values())
            totals[e["args"]["op_name"] + (" [scores]" if scores else "")] += e["dur"] / 1e3
    calls = runs + 1  # profiling also saw the warm-up call in `session`'s caller
    return sorted(((op, ms / calls) for op, ms in totals.items()), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"threads": args.threads, "torch": torch.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (tokens, channels, heads, layers) in SHAPES.items():
            torch.manual_seed(0)
            attn = Attention(query_dim=channels, cross_attention_dim=2048, heads=heads, dim_head=64).eval()
            inputs = (torch.randn(1, tokens, channels), torch.randn(1, 77, 2048), *map(torch.tensor, GAG_VALUES))
            plain, gag = Layer(attn, gag=False), Layer(attn, gag=True)
            ort_plain, feed_plain = session(plain, inputs, Path(tmp) / "plain.onnx", args.threads)
            ort_gag, feed_gag = session(gag, inputs, Path(tmp) / "gag.onnx", args.threads)
            variants = {
                "eager plain": lambda: plain(*inputs), "eager gag": lambda: gag(*inputs),
                "ort plain": lambda: ort_plain.run(None, feed_plain), "ort gag": lambda: ort_gag.run(None, feed_gag),
            }
            times = {name: [] for name in variants}
            with torch.inference_mode():
                for r in range(args.warmup + args.iters):
                    order = list(variants.items())
                    for name, fn in order[r % 4:] + order[: r % 4]:
                        start = time.perf_counter()
                        fn()
                        if r >= args.warmup:
                            times[name].append(time.perf_counter() - start)
            p50 = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            prof_sess, prof_feed = session(gag, inputs, Path(tmp) / "gag_prof.onnx", args.threads, profile=True)
            prof_sess.run(None, prof_feed)
            result = {
                "layers_in_sdxl": layers, "p50_ms": p50,
                "gag_extra_ms": {"eager": p50["eager gag"] - p50["eager plain"], "ort": p50["ort gag"] - p50["ort plain"]},
                "ort_gag_profile_ms": profile_by_op(prof_sess, prof_feed)[:12],
            }
            results["shapes"][label] = result
            print(f"{label} ({layers} layers in SDXL): " + ", ".join(f"{n} {v:.1f} ms" for n, v in p50.items()))
            print("  ORT GAG layer, ms per run by op: "
                  + ", ".join(f"{op} {ms:.1f}" for op, ms in result["ort_gag_profile_ms"][:8]))
    for backend in ("eager", "ort"):
        extra = sum(s["gag_extra_ms"][backend] * s["layers_in_sdxl"] for s in results["shapes"].values()) / 1e3
        results[f"{backend}_gag_extra_s_per_step"] = extra
        print(f"{backend}: GAG adds ~{extra:.2f} s per SDXL UNet step (60 layers)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
