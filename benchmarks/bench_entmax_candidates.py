"""Cheaper forms of the bisect 1.5-entmax (gag_export/gag/math.py), measured for the lead to decide.

GAG's cost on a CPU is dominated by the sparse branch's threshold search: ~47 elementwise passes
over the [B, H, Lq, 77] score tensor (12.6 MB at SDXL's 4096-token cross-attention), each a
separate kernel in eager PyTorch and in ONNX Runtime. Candidates (all end with the same exact
solve on the found support, so they are exact when the support is right):

- current:   `gag/math.py's _entmax15_bisect` (4 bisection + 3 Newton steps, exact solve, normalize);
- lean:      the same steps and the same numbers of iterations with fewer passes: the sums of
             squares as one `linalg.vecdot`, `pow(2)` as a square, in-place clamps, the masked
             scores computed once;
- newton-K:  no bisection: K Newton steps from tau = -1 (the lower end of the bracket), then the
             exact solve;
- relu:      the same steps as `current`, written for ONNX Runtime: `relu(x - tau)` instead of
             `clamp(min=0)`, r * r instead of `pow(2)`, and the exact solve from the statistics of
             r = relu(x - tau) on the support (k = sum(sign r), sum x = sum r + k tau, sum x^2 =
             sum r^2 + 2 tau sum r + k tau^2) instead of `x * (x > tau)`, which the exporter turns
             into a `Where` with a broadcast scalar, ONNX Runtime's slowest op in the GAG layer.

Reported: the worst error against the `entmax` package (float64) over random, uniform,
clustered, one-dominant and flat scores, 2..4096 keys, scales 0.5..50; eager time at SDXL's two
cross-attention shapes; ONNX Runtime time of each candidate exported alone (dynamo, opset 20).
Candidates are timed interleaved (round-robin) so background load hits them alike.

    python benchmarks/bench_entmax_candidates.py [--threads N] [--iters 20] [--no-ort] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gag_export.gag import math as G  # noqa: E402

SHAPES = {"down/up 1 (4096 tokens, 10 heads)": (1, 10, 4096, 77), "down 2/up 0 (1024 tokens, 20 heads)": (1, 20, 1024, 77)}


def current(x: torch.Tensor) -> torch.Tensor:
    return G._entmax15_bisect(x)


def lean(x: torch.Tensor, bisect: int = G.BISECT_ITERS, newton: int = G.NEWTON_ITERS) -> torch.Tensor:
    """`_entmax15_bisect` step for step, with fewer passes over x."""
    n = x.shape[-1]
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.full_like(lo, -((1.0 / n) ** 0.5))
    for _ in range(bisect):
        mid = 0.5 * (lo + hi)
        r = (x - mid).clamp_(min=0.0)
        above = torch.linalg.vecdot(r, r).unsqueeze(-1) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    tau = lo
    for _ in range(newton):
        r = (x - tau).clamp_(min=0.0)
        tau = tau + (torch.linalg.vecdot(r, r).unsqueeze(-1) - 1.0) / (2.0 * r.sum(dim=-1, keepdim=True))
    mask = (x > tau).to(x.dtype)
    k = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    xm = x * mask
    mean = xm.sum(dim=-1, keepdim=True) / k
    mean_sq = torch.linalg.vecdot(xm, x).unsqueeze(-1) / k
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp(min=0.0).sqrt()
    p = (x - tau).clamp_(min=0.0).square_()
    return p / p.sum(dim=-1, keepdim=True)


def newton_only(x: torch.Tensor, iters: int) -> torch.Tensor:
    tau = torch.full_like(x[..., :1], -1.0)  # mass >= 1 here: Newton stays below the root
    for _ in range(iters):
        r = (x - tau).clamp_(min=0.0)
        tau = tau + (torch.linalg.vecdot(r, r).unsqueeze(-1) - 1.0) / (2.0 * r.sum(dim=-1, keepdim=True))
    tau = G._tau_from_support(x, x > tau)
    p = (x - tau).clamp_(min=0.0).square_()
    return p / p.sum(dim=-1, keepdim=True)


def relu_form(x: torch.Tensor, bisect: int = G.BISECT_ITERS, newton: int = G.NEWTON_ITERS) -> torch.Tensor:
    n = x.shape[-1]
    lo = torch.full_like(x[..., :1], -1.0)
    hi = torch.full_like(lo, -((1.0 / n) ** 0.5))
    for _ in range(bisect):
        mid = 0.5 * (lo + hi)
        r = torch.relu(x - mid)
        above = (r * r).sum(dim=-1, keepdim=True) >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    tau = lo
    for _ in range(newton):
        r = torch.relu(x - tau)
        tau = tau + ((r * r).sum(dim=-1, keepdim=True) - 1.0) / (2.0 * r.sum(dim=-1, keepdim=True))
    r = torch.relu(x - tau)  # support: r > 0, i.e. x > tau
    k = torch.sign(r).sum(dim=-1, keepdim=True).clamp(min=1.0)
    s1 = r.sum(dim=-1, keepdim=True)
    s2 = (r * r).sum(dim=-1, keepdim=True)
    mean = s1 / k + tau
    mean_sq = (s2 + 2.0 * tau * s1) / k + tau * tau
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    tau = mean - delta.clamp(min=0.0).sqrt()
    p = torch.relu(x - tau)
    p = p * p
    return p / p.sum(dim=-1, keepdim=True)


CANDIDATES = {
    "current": current,
    "lean": lean,
    "newton-6": lambda x: newton_only(x, 6),
    "newton-8": lambda x: newton_only(x, 8),
    "relu": relu_form,
}


def score_sets(n: int, rows: int = 256):
    g = torch.Generator().manual_seed(n)
    yield "random", torch.randn(rows, n, generator=g)
    yield "uniform", torch.rand(rows, n, generator=g)
    clustered = torch.randn(rows, n, generator=g) * 0.01
    clustered[:, : max(1, n // 4)] += 3
    yield "clustered", clustered
    dominant = torch.randn(rows, n, generator=g)
    dominant[:, 0] += 20
    yield "one-dominant", dominant
    yield "flat", torch.randn(rows, n, generator=g) * 1e-3


def accuracy() -> dict[str, dict]:
    from entmax import entmax15  # noqa: PLC0415  (the reference; in the dev extra)

    worst = {name: {"max_abs_err": 0.0, "where": ""} for name in CANDIDATES}
    for n in (2, 7, 77, 256, 1024, 4096):
        for label, z in score_sets(n):
            for scale in (0.5, 1.0, 5.0, 20.0, 50.0):
                scores = z * scale
                truth = entmax15(scores.double(), dim=-1)
                x = G._shifted(scores, 1.5)
                for name, fn in CANDIDATES.items():
                    err = (fn(x.clone()).double() - truth).abs().max().item()
                    if err > worst[name]["max_abs_err"]:
                        worst[name] = {"max_abs_err": err, "where": f"{n} keys, {label}, scale {scale:g}"}
    return worst


def sdxl_scores(shape, seed: int = 0) -> torch.Tensor:
    b, h, lq, lk = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, lq, 64, generator=g), torch.randn(b, h, lk, 64, generator=g)
    return G._shifted(q @ k.transpose(-1, -2) / 8.0, 1.5)


def interleaved(fns: dict, iters: int, warmup: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for r in range(warmup + iters):
        order = list(fns.items())
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


class _Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def ort_sessions(shape, threads: int, folder: Path) -> dict:
    import onnxruntime as ort  # noqa: PLC0415

    example = sdxl_scores(shape)
    sessions = {}
    for name, fn in CANDIDATES.items():
        path = folder / f"{name}.onnx"
        program = torch.onnx.export(_Module(fn), (example,), dynamo=True, opset_version=20, input_names=["x"],
                                    output_names=["p"], verbose=False)
        program.save(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {"threads": args.threads, "torch": torch.__version__, "accuracy": accuracy(), "eager_ms": {}, "ort_ms": {}}
    print(f"worst error vs the entmax package (float64), {args.threads} threads")
    for name, acc in results["accuracy"].items():
        print(f"  {name:<9} {acc['max_abs_err']:.1e}  ({acc['where']})")
    with torch.inference_mode():
        for label, shape in SHAPES.items():
            x = sdxl_scores(shape)
            results["eager_ms"][label] = interleaved({n: (lambda f=f: f(x.clone())) for n, f in CANDIDATES.items()},
                                                     args.iters, args.warmup)
    if not args.no_ort:
        with tempfile.TemporaryDirectory() as tmp:
            for label, shape in SHAPES.items():
                sessions = ort_sessions(shape, args.threads, Path(tmp))
                feed = {"x": sdxl_scores(shape).numpy()}
                results["ort_ms"][label] = interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                                                       args.iters, args.warmup)
    for kind in ("eager_ms", "ort_ms"):
        for label, times in results[kind].items():
            base = times["current"]
            print(f"{kind[:-3]} {label}: " + ", ".join(f"{n} {t:.1f} ms (x{t / base:.2f})" for n, t in times.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
