"""GAG on a GPU: full-size SDXL UNet step and the GAG attention core, plain vs GAG, in one run.

What it measures (issue 9), with random weights (the cost does not depend on them):
1. eager UNet step, batch 1, 1024x1024 (latent 128x128), fp16, GAG on the 60 down+up
   cross-attention layers: plain vs GAG (PyTorch "bisect" path, fused Triton kernel); p50/p90
   over >= 20 steps timed with CUDA events;
2. the same under torch.compile, each variant compiled in a fresh child process with empty
   Inductor and Triton caches (a cold compile, as a user sees it): compile time (first call),
   graph breaks, then p50/p90 of the compiled step; a compile that overruns its time is killed
   and reported as such;
3. the GAG attention core alone vs scaled_dot_product_attention at SDXL's cross-attention
   shapes (B=1, H=10/20, Lq=4096/1024, Lk=77, d=64), with the fused kernel's error against the
   fp32 sort path and a small sweep of its block size / warp count.

    python benchmarks/bench_gpu.py --json benchmarks/results/gpu.json    # CUDA machine
    python benchmarks/bench_gpu.py --device cpu --tiny                      # CPU smoke run, tiny UNet
    python benchmarks/bench_gpu.py --dry-run                                # plan + SDXL shapes on meta

Needs torch and diffusers (no transformers, no onnx): on a machine without diffusers, install
its wheels first (see benchmarks/README.md, "Fused GAG kernel"). Goals: GAG/plain per UNet step
<= 1.05x (eager and compiled), GAG core <= 2x SDPA, GAG compile time <= 1.5x plain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gag_export.gag import kernels  # noqa: E402
from gag_export.gag import JOINT_PAD, GAGConfig, gag_attention, gag_joint_attention  # noqa: E402

VARIANTS = {
    # name: GAGConfig.method, or None for the plain model
    "plain": None,
    "gag-bisect": "bisect",
    "gag-fused": "fused",
    "gag-sort": "sort",  # the original baseline (not run by default)
    "gag-bisect-inline": "bisect",  # bisect with gag.dispatch.COMPILE_REGION off: inlined in every layer (compile experiment)
}
DEFAULT_VARIANTS = "plain,gag-fused,gag-bisect"  # compiles run in this order: the cheap ones first

# SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): used when the
# package's own copy (gag_export/models/configs/sdxl/unet.json) is not there.
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class BenchError(Exception):
    """A condition that stops the benchmark with one clear line (exit code 2)."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu only with --tiny (a smoke run)")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL-architecture UNet of the tests at 64x64")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the SDXL GAG core shapes (meta device), run nothing")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; tiny: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=30, help="timed UNet steps per variant (>= 20 on cuda)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"eager variants, of {','.join(VARIANTS)}; 'none' to skip")
    p.add_argument("--compile-variants", default=None, help="torch.compile variants (default: --variants); 'none' to skip")
    p.add_argument("--compile-timeout", type=float, default=150.0, help="seconds per compiled variant (child killed after)")
    p.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget of the whole run; compiles get what is left")
    p.add_argument("--core-shapes", default="10x4096,20x1024", help="HEADSxLQ list for the attention-core section; 'none' to skip")
    p.add_argument("--core-keys", type=int, default=77)
    p.add_argument("--core-head-dim", type=int, default=64)
    p.add_argument("--joint-shapes", default=None,
                   help="HEADSxIMAGExTEXT list for FLUX joint attention, head_dim 128 (default on cuda: 24x4096x256, "
                        "FLUX.1-schnell at 1024x1024; on cpu: none); 'none' to skip")
    p.add_argument("--no-sweep", action="store_true", help="skip the fused kernel's block-size sweep")
    p.add_argument("--no-core-compile", action="store_true", help="skip the torch.compile'd bisect core")
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--eta", type=float, default=15.0)
    p.add_argument("--zeta", type=float, default=0.0)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.variants = _variant_list(args.variants)
    args.compile_variants = args.variants if args.compile_variants is None else _variant_list(args.compile_variants)
    args.core_shapes = _core_shapes(args.core_shapes)
    args.joint_shapes = _joint_shapes(args.joint_shapes or ("24x4096x256" if args.device == "cuda" else "none"))
    if args.resolution % 8:
        raise BenchError(f"--resolution must be a multiple of 8 (the VAE factor), got {args.resolution}")
    if args.device == "cuda" and not args.tiny and args.steps < 20 and not args.dry_run:
        raise BenchError(f"--steps must be >= 20 for p90 to mean something, got {args.steps}")
    if args.steps < 2 or args.warmup < 0 or args.batch < 1:
        raise BenchError("--steps >= 2, --warmup >= 0 and --batch >= 1 are required")
    compile_only = not args.variants and not args.core_shapes and not args.joint_shapes
    if args.device == "cpu" and not (args.tiny or args.dry_run or args.compile_child or compile_only):
        raise BenchError("--device cpu runs the full-size UNet only for compile times (--variants none --core-shapes none); "
                         "otherwise only the --tiny smoke model (30 full-size steps per variant on CPU would take hours)")
    return args


def _variant_list(spec: str) -> list[str]:
    if spec.strip().lower() == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise BenchError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def _core_shapes(spec: str) -> list[tuple[int, int]]:
    if spec.strip().lower() == "none":
        return []
    try:
        return [tuple(int(x) for x in s.lower().split("x")) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--core-shapes takes HEADSxLQ pairs such as 10x4096,20x1024, got {spec!r}") from None


def _joint_shapes(spec: str) -> list[tuple[int, int, int]]:
    if spec == "none":
        return []
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in spec.split(",")]
    except ValueError:
        raise BenchError(f"--joint-shapes takes HEADSxIMAGExTEXT items like 24x4096x256, got {spec!r}") from None
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise BenchError(f"--joint-shapes takes HEADSxIMAGExTEXT items like 24x4096x256, got {spec!r}")
    return shapes


def require_device(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            "bench_gpu.py measures CUDA timings and torch.cuda.is_available() is False on this machine; "
            "run it on a GPU machine, or use --device cpu --tiny (smoke run) or --dry-run"
        )


# --------------------------------------------------------------------------- model and inputs


def sdxl_unet_config() -> tuple[dict, str]:
    path = REPO / "gag_export" / "models" / "configs" / "sdxl" / "unet.json"
    if path.is_file():
        cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return cfg, str(path.relative_to(REPO))
    return dict(SDXL_UNET_CONFIG), "embedded SDXL base config"


def build_unet(args: argparse.Namespace, device: str | torch.device):
    from diffusers import UNet2DConditionModel

    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import tiny_sdxl_unet

        with torch.device(device):
            unet = tiny_sdxl_unet()
        source = "tests/conftest.py tiny_sdxl_unet"
    else:
        cfg, source = sdxl_unet_config()
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device: seconds, not minutes
            unet = UNet2DConditionModel(**cfg)
    return unet.to(dtype=DTYPES[args.dtype]).eval().requires_grad_(False), source


def unet_inputs(unet, args: argparse.Namespace, device) -> dict:
    cfg = unet.config
    latent = args.resolution // 8
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(1)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    r = args.resolution
    return {
        "sample": torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.tensor([500.0] * args.batch, device=device),
        "encoder_hidden_states": torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(args.batch, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]] * args.batch, device=device, dtype=dtype),
        },
    }


@contextlib.contextmanager
def variant_applied(unet, variant: str, args: argparse.Namespace):
    """Apply the variant's GAG (if any) for the block; the -inline variant turns the compile region off."""
    from gag_export.gag import attention

    method = VARIANTS[variant]
    if method is None:
        yield []
        return
    from gag_export.gag import dispatch

    region = dispatch.COMPILE_REGION
    dispatch.COMPILE_REGION = not variant.endswith("-inline")
    try:
        with attention.gag_applied(unet, GAGConfig(scale=args.scale, eta=args.eta, zeta=args.zeta, method=method)) as names:
            yield names
    finally:
        dispatch.COMPILE_REGION = region


def variant_skip_reason(variant: str, args: argparse.Namespace) -> str | None:
    if VARIANTS[variant] == "fused":
        if args.device != "cuda":
            return "the fused kernel needs CUDA"
        if not kernels.triton_available():
            return "triton is not installed"
    return None


# --------------------------------------------------------------------------- timing


class Timer:
    """Per-call milliseconds: CUDA events on cuda, perf_counter on cpu."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def measure(self, fn, n: int, inner: int = 1) -> list[float]:
        times = []
        for _ in range(n):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / inner)
        return times

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summary(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"p50_ms": round(statistics.median(times_ms), 4), "p90_ms": round(q[8], 4), "n": len(times_ms)}


def time_unet(unet, inputs, args, timer: Timer) -> dict:
    def step():
        return unet(**inputs).sample

    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        timer.sync()
        return summary(timer.measure(step, args.steps))


def time_cuda_graph(unet, inputs, args, timer: Timer) -> dict:
    """The eager step captured once as a CUDA graph and replayed: eager without launch gaps."""
    try:
        with torch.inference_mode():
            return time_calls_as_graph(lambda: unet(**inputs), timer, n=args.steps, inner=1)
    finally:
        torch.cuda.empty_cache()


def time_calls_as_graph(fn, timer: Timer, n: int = 10, inner: int = 20) -> dict:
    """Per-call ms of `inner` calls captured once as a CUDA graph and replayed: the GPU's time alone.

    Timing back-to-back eager calls measures the host as well: a Triton launch costs tens of us of
    Python, as long as this kernel runs, so the GPU waits on the host. A graph replays without it.
    A call that cannot be captured (a host sync, an uncapturable op) is reported, not raised.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        timer.sync()
        times = [t / inner for t in timer.measure(graph.replay, n)]
        del graph
        return summary(times)
    except Exception as exc:  # a host sync or an uncapturable op in `fn`: report, go on
        return {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- sections


def eager_section(args, device, timer) -> dict:
    unet, source = build_unet(args, device)
    inputs = unet_inputs(unet, args, device)
    results = {"model": source}
    for variant in args.variants:
        why = variant_skip_reason(variant, args)
        if why:
            results[variant] = {"skipped": why}
            continue
        with variant_applied(unet, variant, args) as names:
            results[variant] = {**time_unet(unet, inputs, args, timer), "gag_layers": len(names)}
            if device == "cuda":
                results[variant]["cuda_graph"] = time_cuda_graph(unet, inputs, args, timer)
        _log(f"eager {variant}: {results[variant]}")
    _ratios(results)
    _ratios({v: r["cuda_graph"] for v, r in results.items() if isinstance(r, dict) and "cuda_graph" in r})
    del unet
    return results


def compile_child(args) -> dict:
    """Inside a fresh process: compile one variant cold, report compile time, breaks, step times."""
    import torch._dynamo

    device = args.device
    timer = Timer(device)
    unet, _ = build_unet(args, device)
    inputs = unet_inputs(unet, args, device)
    variant = args.compile_child
    with variant_applied(unet, variant, args) as names, torch.inference_mode():
        compiled = torch.compile(unet)
        timer.sync()
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        compiled(**inputs)
        timer.sync()
        compile_s, compile_cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0
        counters = torch._dynamo.utils.counters
        out = {
            "compile_s": round(compile_s, 2),
            "compile_cpu_s": round(compile_cpu_s, 2),  # this process + its reaped children (compilers)
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "gag_layers": len(names),
        }
        out.update(time_unet(compiled, inputs, args, timer))
    return out


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_section(args, t_start: float, save=lambda results: None) -> dict:
    results = {}
    for variant in args.compile_variants:
        why = variant_skip_reason(variant, args)
        if why:
            results[variant] = {"skipped": why}
            continue
        left = args.budget_s - (time.perf_counter() - t_start) - 15
        timeout = min(args.compile_timeout, left)
        if timeout < 20:
            results[variant] = {"skipped": f"no time left in --budget-s {args.budget_s}"}
            continue
        with tempfile.TemporaryDirectory(prefix="gag_bench_") as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp, "inductor")), TRITON_CACHE_DIR=str(Path(tmp, "triton")),
                       TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
            if args.device == "cpu":  # compile in-process so that compile_cpu_s counts it (shared 2-core CI boxes)
                env["TORCHINDUCTOR_COMPILE_THREADS"] = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1")
            out_path = Path(tmp, "out.json")
            cmd = [sys.executable, __file__, *_child_argv(args), "--compile-child", variant, "--child-out", str(out_path)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                results[variant] = {"timed_out_after_s": round(time.perf_counter() - t0, 1),
                                    "note": "compile + timed steps did not finish: compile time is at least this"}
                _log(f"compile {variant}: timed out after {timeout:.0f} s")
                continue
            if proc.returncode != 0 or not out_path.is_file():
                results[variant] = {"failed": (proc.stderr or proc.stdout)[-2000:]}
            else:
                results[variant] = json.loads(out_path.read_text())
            results[variant]["child_wall_s"] = round(time.perf_counter() - t0, 1)
        _log(f"compile {variant}: {results[variant]}")
        save(results)
    _ratios(results)
    if "compile_s" in results.get("plain", {}):
        for variant, r in results.items():
            if isinstance(r, dict) and "compile_s" in r and variant != "plain":
                r["compile_vs_plain"] = round(r["compile_s"] / results["plain"]["compile_s"], 3)
    return results


def _child_argv(args) -> list[str]:
    argv = ["--device", args.device, "--resolution", str(args.resolution), "--batch", str(args.batch), "--dtype", args.dtype,
            "--steps", str(args.steps), "--warmup", str(min(args.warmup, 3)),
            "--scale", str(args.scale), "--eta", str(args.eta), "--zeta", str(args.zeta)]
    return argv + (["--tiny"] if args.tiny else [])


def _ratios(results: dict) -> None:
    base = results.get("plain", {}).get("p50_ms")
    if not base:
        return
    for variant, r in results.items():
        if isinstance(r, dict) and "p50_ms" in r and variant != "plain":
            r["p50_vs_plain"] = round(r["p50_ms"] / base, 3)


def time_calls(fns: dict, timer: Timer, n: int, inner: int, graphed: tuple[str, ...] | None = None) -> dict:
    """Per-call p50/p90 of each function (after 3 warm-up calls), `n` samples of `inner` calls; on
    CUDA also replayed as a CUDA graph (`graph`, `inner` calls per capture) for the names in
    `graphed` (None: all)."""
    entry = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        timer.sync()
        entry[name] = summary(timer.measure(fn, n, inner=inner))
        if timer.cuda and (graphed is None or name in graphed):
            entry[name]["graph"] = time_calls_as_graph(fn, timer, inner=inner)
    return entry


def add_ratios_to_sdpa(entry: dict) -> None:
    """`p50_vs_sdpa` on every timed entry but SDPA's, eager and (where both have one) graph."""
    sdpa, sdpa_graph = entry["sdpa"]["p50_ms"], entry["sdpa"].get("graph", {}).get("p50_ms")
    for name, r in entry.items():
        if name != "sdpa" and isinstance(r, dict) and "p50_ms" in r:
            r["p50_vs_sdpa"] = round(r["p50_ms"] / sdpa, 3)
            if sdpa_graph and "p50_ms" in r.get("graph", {}):
                r["graph"]["p50_vs_sdpa"] = round(r["graph"]["p50_ms"] / sdpa_graph, 3)


def core_section(args, device, timer) -> dict:
    """GAG attention core vs SDPA at the UNet's cross-attention shapes."""
    dtype = DTYPES[args.dtype]
    d, lk = args.core_head_dim, args.core_keys
    p = (args.scale, args.eta, args.zeta)
    results = {}
    for heads, lq in args.core_shapes:
        g = torch.Generator(device="cpu").manual_seed(heads * lq)
        q, k, v = (torch.randn(args.batch, heads, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk))
        fns = {
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "gag-sort": lambda q=q, k=k, v=v: gag_attention(q, k, v, *p, method="sort"),
            "gag-bisect": lambda q=q, k=k, v=v: gag_attention(q, k, v, *p, method="bisect"),
        }
        if not args.no_core_compile:
            bisect_compiled = torch.compile(lambda q, k, v: gag_attention(q, k, v, *p, method="bisect"), fullgraph=True)
            fns["gag-bisect-compiled"] = lambda q=q, k=k, v=v, f=bisect_compiled: f(q, k, v)
        fused_why = variant_skip_reason("gag-fused", args) or kernels.fused_shape_reason(q, k, v, 1.5, None, *p)
        if fused_why is None:
            fns["gag-fused"] = lambda q=q, k=k, v=v: gag_attention(q, k, v, *p, method="fused")
        shape = f"B{args.batch} H{heads} Lq{lq} Lk{lk} d{d} {args.dtype}"
        cuda = device == "cuda"
        with torch.inference_mode():
            entry = time_calls(fns, timer, n=20 if cuda else 5, inner=20 if cuda else 2, graphed=("sdpa", "gag-fused"))
            if "gag-fused" in fns:
                ref = gag_attention(q.float(), k.float(), v.float(), *p, method="sort")
                entry["gag-fused"]["max_abs_err_vs_fp32_sort"] = (fns["gag-fused"]().float() - ref).abs().max().item()
                if not args.no_sweep:
                    entry["fused_sweep"] = fused_sweep(q, k, v, p, timer, sdpa_graph=entry["sdpa"].get("graph", {}).get("p50_ms"))
            else:
                entry["gag-fused"] = {"skipped": fused_why}
        add_ratios_to_sdpa(entry)
        results[shape] = entry
        _log(f"core {shape}: " + ", ".join(f"{n} {r.get('p50_ms')}" for n, r in entry.items() if isinstance(r, dict)))
    return results


def joint_section(args, device, timer) -> dict:
    """FLUX joint attention (head_dim 128): plain SDPA over [text; image] vs GAG bisect vs fused.

    Also SDPA alone in the padded layout GAG's dense call uses, and in the layout it used before
    (v one channel wider than q and k, which keeps SDPA off its flash kernels).

    Also the kernel alone on the image-query x text-key part in both of its forms
    (`triton_gag.KERNEL_FORMS`): values loaded with the keys, what this GPU runs, and after the
    entmax, what a 99 KiB GPU (RTX 4090, L4) runs for T5's tiles: the price of that form here.
    """
    dtype = DTYPES[args.dtype]
    p = (args.scale, args.eta, args.zeta)
    results = {}
    for heads, image, text in args.joint_shapes:
        g = torch.Generator(device="cpu").manual_seed(heads * image + text)
        q, k, v = (torch.randn(args.batch, heads, text + image, 128, generator=g).to(device, dtype) for _ in range(3))
        fns = {
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            # the dense call's layout in gag_joint_attention: q, k, v padded by JOINT_PAD channels
            # (v's first is the text indicator), and the layout before it, v alone one wider
            "sdpa-joint-padded": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                *(F.pad(t, (0, JOINT_PAD)) for t in (q, k, v)), scale=q.shape[-1] ** -0.5),
            "sdpa-v-one-wider": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, F.pad(v, (0, 1))),
            "gag-bisect": lambda q=q, k=k, v=v, n=text: gag_joint_attention(q, k, v, n, *p, method="bisect"),
        }
        q_img, k_txt = q[:, :, text:], k[:, :, :text]
        fused_why = variant_skip_reason("gag-fused", args) or kernels.fused_shape_reason(q_img, k_txt, k_txt, 1.5, None, *p)
        if fused_why is None:
            fns["gag-fused"] = lambda q=q, k=k, v=v, n=text: gag_joint_attention(q, k, v, n, *p, method="fused")
            fns.update(_joint_kernel_forms(q_img, k_txt, v[:, :, :text], p))
        cuda = device == "cuda"
        with torch.inference_mode():
            entry = time_calls(fns, timer, n=20 if cuda else 3, inner=10 if cuda else 1)
            if "gag-fused" in fns:
                ref = gag_joint_attention(q.float(), k.float(), v.float(), text, *p, method="sort")
                entry["gag-fused"]["max_abs_err_vs_fp32_sort"] = (fns["gag-fused"]().float() - ref).abs().max().item()
            else:
                entry["gag-fused"] = {"skipped": fused_why}
        add_ratios_to_sdpa(entry)
        shape = f"B{args.batch} H{heads} image{image} text{text} d128 {args.dtype}"
        results[shape] = entry
        _log(f"joint {shape}: " + ", ".join(f"{n} {r.get('p50_ms')}" for n, r in entry.items()))
    return results


def _joint_kernel_forms(q_img, k_txt, v_txt, p) -> dict:
    """The raw kernel launch of joint attention's GAG - dense update in each kernel form."""
    from gag_export.gag.kernels import triton_gag

    iters = kernels.guidance_schedule()
    return {
        "kernel-late-values" if late else "kernel-values-with-keys":
            lambda late=late: triton_gag.launch(q_img, k_txt, v_txt, None, *p, None, *iters, minus_dense=True, late_values=late)
        for late in triton_gag.KERNEL_FORMS
    }


def fused_sweep(q, k, v, p, timer, sdpa_graph: float | None = None) -> dict:
    """p50 of the raw kernel launch per (BLOCK_M, num_warps); the default is `block_sizes`.

    Each tile twice: eager launches back to back (host cost included), and replayed as a CUDA
    graph (`graph_<tile>`: GPU time alone, with its ratio to SDPA's graph time). The two largest
    tiles also with ptxas capped at 128 registers (`_r128`): no spills and twice the resident
    warps in the sm_90 builds (benchmarks/kernel_resources.py), for 6-8% more instructions.
    """
    from gag_export.gag.kernels import triton_gag

    iters = kernels.guidance_schedule()
    default = kernels.block_sizes(k.shape[2], q.shape[3], q.element_size())
    out = {"default": {"block_m": default[0], "num_warps": default[-1]}}
    for block_m, warps, maxnreg in kernels.SWEEP_TILES:
        name = f"m{block_m}_w{warps}" + (f"_r{maxnreg}" if maxnreg else "")

        def fn(block_m=block_m, warps=warps, maxnreg=maxnreg):
            return triton_gag.launch(q, k, v, None, *p, None, *iters, block_m=block_m, num_warps=warps, maxnreg=maxnreg)

        try:
            fn()
            timer.sync()
            out[name] = summary(timer.measure(fn, 10, inner=20))["p50_ms"]
            graph = time_calls_as_graph(fn, timer)
            out["graph_" + name] = graph.get("p50_ms", graph.get("failed"))
        except Exception as exc:  # out of resources for that tile: report and go on
            out[name] = f"failed: {type(exc).__name__}"
    for prefix in ("", "graph_"):
        timed = {k_: v_ for k_, v_ in out.items() if isinstance(v_, float) and k_.startswith(prefix + "m")}
        if timed:
            out[prefix + "best"] = min(timed, key=timed.get)
            if prefix and sdpa_graph:
                out["graph_best_vs_sdpa"] = round(timed[out["graph_best"]] / sdpa_graph, 3)
    return out


def dry_run(args) -> dict:
    """The plan, and the GAG core shapes of one full-size forward traced on the meta device."""
    from gag_export.gag import attention

    _, source = sdxl_unet_config()
    plan = {"model": "tiny" if args.tiny else source, "resolution": args.resolution, "latent": args.resolution // 8,
            "batch": args.batch, "dtype": args.dtype, "eager_variants": args.variants,
            "compile_variants": args.compile_variants, "core_shapes": args.core_shapes, "steps": args.steps,
            "compile_timeout_s": args.compile_timeout, "budget_s": args.budget_s}
    unet, _ = build_unet(args, "meta")
    inputs = unet_inputs(unet, args, "meta")
    seen: dict[tuple, int] = {}
    original = attention.gag_attention

    def recording(q, k, v, *rest, **kw):
        key = (tuple(q.shape), tuple(k.shape), str(q.dtype))
        seen[key] = seen.get(key, 0) + 1
        return original(q, k, v, *rest, **kw)

    attention.gag_attention = recording
    try:
        with attention.gag_applied(unet, GAGConfig(method="bisect")) as names, torch.inference_mode():
            out = unet(**inputs).sample
    finally:
        attention.gag_attention = original
    p = (args.scale, args.eta, args.zeta)
    plan["gag_layers"] = len(names)
    plan["output_shape"] = list(out.shape)
    plan["gag_core_shapes"] = [
        {"q": list(qs), "k": list(ks), "dtype": dt, "layers": n,
         "fused": kernels.fused_shape_reason(*(torch.empty(s, device="meta", dtype=DTYPES[args.dtype]) for s in (qs, ks, ks)), 1.5, None, *p) or "supported"}
        for (qs, ks, dt), n in seen.items()
    ]
    return plan


# --------------------------------------------------------------------------- main


def environment(args) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if kernels.triton_available():
        import triton

        env["triton"] = triton.__version__
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.compile_child:
            require_device(args)
            result = compile_child(args)
            args.child_out.write_text(json.dumps(result))
            return 0
        if args.dry_run:
            result = {"dry_run": dry_run(args)}
        else:
            require_device(args)
            try:
                import diffusers  # noqa: F401
            except ImportError:
                raise BenchError("diffusers is not installed: install its wheels first (benchmarks/README.md)") from None
            t_start = time.perf_counter()
            device = args.device
            timer = Timer(device)
            result = {"environment": environment(args), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
            # Each section's results are written as soon as it ends: a run cut off by its time
            # limit on a lent machine still leaves what it measured.
            result["core"] = core_section(args, device, timer) if args.core_shapes else {}
            write_json(args.json, result)
            result["joint"] = joint_section(args, device, timer) if args.joint_shapes else {}
            write_json(args.json, result)
            result["eager"] = eager_section(args, device, timer) if args.variants else {}
            write_json(args.json, result)
            if device == "cuda":
                torch.cuda.empty_cache()
            def save_compiled(partial: dict) -> None:
                write_json(args.json, {**result, "compiled": partial})

            result["compiled"] = compile_section(args, t_start, save_compiled) if args.compile_variants else {}
            result["wall_s"] = round(time.perf_counter() - t_start, 1)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return 0


def write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
