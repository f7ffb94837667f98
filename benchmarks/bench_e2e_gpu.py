"""DMD2 in one step, prompt to image, on a GPU: GAG against plain, eager and as a CUDA graph.

Issue 17's end-to-end row: `dmd2-1step` with random weights (the time does not depend on them),
1024x1024, batch 1, fp16 (the VAE decoder in fp32, as an fp16 export keeps it: SDXL's VAE config
says `force_upcast`), PyTorch with GAG "auto" (the fused Triton kernel wherever it can run), TF32
off as on every backend of the project.

Three forms of the same work, all six variants interleaved round by round
(`gag_export.workflows.bench.interleave`: background load hits every variant alike), p50/p90 over
`--iters` runs after `--warmup`:
- `sampler`: `Sampler.generate` on torch components, what `gag-export generate --backend torch`
  runs: tokenize, both text encoders, the UNet step and the LCM step, VAE decode, conversion to a
  PIL image. Each component hands back host arrays, as every backend does.
- `chain-eager`: the same modules with everything kept on the GPU: token ids in, both text
  encoders, the UNet, the LCM step (its formula; checked against the sampler below), VAE decode,
  a uint8 image copied out.
- `chain-graph`: that chain captured once as one CUDA graph and replayed (tokenizing, the seeded
  noise and the copies in and out stay outside the graph, and are timed). Where the text encoders
  cannot be captured, they run eagerly before the replay and the row says so.
Then each stage of the chain alone as a CUDA graph, and the VAE decode in fp16 and with TF32 on,
for scale (what users with an fp16-safe VAE, or torch's default for convolutions, would run).

Check: for the same seed, the chain's final latents and image against the sampler's.

    python benchmarks/bench_e2e_gpu.py --json out.json                      # CUDA machine
    python benchmarks/bench_e2e_gpu.py --device cpu --model tiny-sdxl        # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))

from gag_export.workflows import bench  # noqa: E402
from gag_export.models import descriptors_for  # noqa: E402
from gag_export.models.loading import build_random_pipeline, load_pipeline  # noqa: E402
from gag_export.runtime import GenerationConfig, Sampler, SamplerAssets  # noqa: E402
from gag_export.runtime.conditioning import tokenize  # noqa: E402

GOAL_MS = 100.0  # issue 17: prompt to image under 100 ms on an H100-class GPU ...
GOAL_GAG_RATIO = 1.05  # ... with GAG within 5% of plain


class BenchError(Exception):
    """A condition that stops the benchmark with one clear line (exit code 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dmd2-1step", help="an SDXL-family entry sampled in one LCM step (tiny-sdxl for a CPU smoke run)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prompt", default=bench.BENCH_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("torch.cuda.is_available() is False here: run it on a GPU machine, or with --device cpu --model tiny-sdxl")
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters >= 1 and --warmup >= 0 are required")
    return args


# --------------------------------------------------------------------------- the pipeline and its samplers


def build_pipeline(args, p: bench.Plan):
    """The run's pipeline on the device in args.dtype, the VAE in the precision an export gives it."""
    started = time.perf_counter()
    if p.weights == "random":
        try:
            with torch.device(args.device):  # random init on the GPU: seconds, not minutes
                pipe = build_random_pipeline(p.entry, args.dtype, seed=args.seed)
        except Exception as exc:  # a model whose init cannot run under a device context: build on the CPU
            _log(f"building on {args.device} failed ({type(exc).__name__}: {str(exc)[:200]}); building on the CPU")
            pipe = build_random_pipeline(p.entry, args.dtype, seed=args.seed)
    else:
        pipe = load_pipeline(p.entry, weights=p.weights, dtype=args.dtype, seed=args.seed)
    for descriptor in descriptors_for(p.entry, pipe):
        module = getattr(pipe, "vae" if descriptor.role == "vae_decoder" else descriptor.name)
        module.to(args.device, descriptor.export_dtype(args.dtype).torch_dtype).eval().requires_grad_(False)
    return pipe, time.perf_counter() - started


def make_sampler(args, p: bench.Plan, pipe, gag: bool) -> Sampler:
    components = bench.torch_components(p, pipe, gag, compile=False, device=args.device, dtype=args.dtype)
    sampler = Sampler(p.entry, components, SamplerAssets.from_pipeline(pipe),
                      {d.name: d for d in descriptors_for(p.entry, components.pipe)})
    return sampler.__enter__()


def request_for(args, p: bench.Plan, sampler: Sampler, gag: bool) -> GenerationConfig:
    return GenerationConfig(args.prompt, seed=args.seed, steps=1, height=p.shape.height, width=p.shape.width,
                            gag=sampler.gag_params() if gag else None)


# --------------------------------------------------------------------------- the chain: the same work kept on the GPU


class Chain:
    """Prompt -> uint8 image with a sampler's torch modules, every tensor on the device.

    One LCM step: the scheduler's last step returns its `denoised`, c_out * x0 + c_skip * x with
    x0 = (x - sqrt(1 - a) * eps) / sqrt(a); the check against the sampler covers the formula.
    """

    def __init__(self, sampler: Sampler, request: GenerationConfig, device: str):
        spec = sampler.entry.scheduler
        if spec.class_name != "LCMScheduler":
            raise BenchError(f"the chain writes out the LCM step; {sampler.entry.name} samples with {spec.class_name}")
        self.sampler, self.request, self.device = sampler, request, torch.device(device)
        self.shape = sampler.resolve_shape(request)
        components = sampler.components
        self.modules = {c.name: c for c in components}
        self.text_encoders = [c for c in components if c.role == "text_encoder"]
        self.unet, self.vae = components.denoiser, components.by_role("vae_decoder")[0]
        scheduler = spec.build(sampler.assets.scheduler_config)
        latents, _ = sampler.family.initial_latents(self.shape, torch.Generator("cpu").manual_seed(0))
        timesteps = sampler.family.set_timesteps(scheduler, 1, spec.timesteps_for(1), latents)
        t = int(timesteps[0])
        alpha = float(scheduler.alphas_cumprod[t])
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        self.lcm = (math.sqrt(1 - alpha), math.sqrt(alpha), float(c_out), float(c_skip))
        dev = self.device
        self.ids = {c.name: torch.zeros((1, self._text_len(c)), dtype=torch.int64, device=dev) for c in self.text_encoders}
        self.latents = torch.zeros(latents.shape, dtype=torch.float32, device=dev)
        h, w = self.shape.height, self.shape.width
        fixed = {"timestep": torch.full((1,), float(t)), "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)}
        fixed.update({k: torch.from_numpy(v) for k, v in sampler.gag_feed(request.gag).items()})
        self.fixed = {k: v.to(dev, self.unet.input_spec(k).torch_dtype) for k, v in fixed.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.whole, self.graph_note = False, ""
        self.hidden = self.pooled = self.final_latents = self.image = None
        self.graph_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (final latents, image) the graph writes

    def _text_len(self, encoder) -> int:
        length = encoder.input_spec("input_ids").shape[1]  # a name on a dynamic axis: the tokenizer's length
        return length if isinstance(length, int) else int(self.sampler.assets.tokenizers[encoder.name].model_max_length)

    # -- the work
    def host_inputs(self) -> None:
        """Tokenize and draw the seeded noise as the sampler does, and copy both in."""
        for c in self.text_encoders:
            ids = tokenize(self.sampler.assets.tokenizers[c.name], self.request.prompt, self.ids[c.name].shape[1], c.name)
            self.ids[c.name].copy_(torch.from_numpy(ids))
        noise, _ = self.sampler.family.initial_latents(self.shape, torch.Generator("cpu").manual_seed(self.request.seed))
        self.latents.copy_(noise)

    def encode(self) -> None:
        outs = [dict(zip(c.output_names, c.module(self.ids[c.name]))) for c in self.text_encoders]
        f = self.unet.input_spec("encoder_hidden_states").torch_dtype
        hidden = torch.cat([o["text_embeddings"] for o in outs], dim=-1).to(f)
        pooled = outs[-1]["pooled_embeds"].to(f)
        if self.hidden is None:  # the first call (before any capture) allocates them outside a graph's pool
            self.hidden, self.pooled = hidden, pooled
        else:  # later calls write into them: a graph of the UNet alone reads these addresses
            self.hidden.copy_(hidden)
            self.pooled.copy_(pooled)

    def denoise_and_decode(self) -> None:
        feed = {**self.fixed, "encoder_hidden_states": self.hidden, "text_embeds": self.pooled,
                "sample": self.latents.to(self.unet.input_spec("sample").torch_dtype)}
        eps = self.unet.module(*(feed[name] for name in self.unet.input_names))[0].float()
        sqrt_beta, sqrt_alpha, c_out, c_skip = self.lcm
        x = self.latents
        self.final_latents = c_out * ((x - sqrt_beta * eps) / sqrt_alpha) + c_skip * x
        vae_in = self.sampler.family.vae_input(self.final_latents, self.shape).to(self.vae.input_spec("latent").torch_dtype)
        images = self.vae.module(vae_in)[0]
        # diffusers' VaeImageProcessor: x / 2 + 0.5, clamp to [0, 1], * 255, round
        self.image = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)

    def forward(self) -> None:
        self.encode()
        self.denoise_and_decode()

    # -- the two ways of running it
    def run_eager(self) -> np.ndarray:
        with torch.inference_mode():
            self.host_inputs()
            self.forward()
            return self.image.cpu().numpy()

    def capture(self) -> None:
        """One CUDA graph of the whole chain; without the text encoders if they cannot be captured."""
        with torch.inference_mode():
            self.host_inputs()
            for whole in (True, False):
                body = self.forward if whole else self.denoise_and_decode
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                        for _ in range(2):
                            self.forward()
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        body()
                    graph.replay()
                    torch.cuda.synchronize()
                    # what the graph wrote: eager calls made later rebind self.image, not these
                    self.graph, self.whole, self.graph_outputs = graph, whole, (self.final_latents, self.image)
                    return
                except Exception as exc:
                    torch.cuda.synchronize()
                    self.graph_note = f"{'whole chain' if whole else 'UNet + VAE'} not capturable: {type(exc).__name__}: {str(exc)[:300]}"
                    _log(self.graph_note)
        raise RuntimeError(self.graph_note)

    def run_graph(self) -> np.ndarray:
        with torch.inference_mode():
            self.host_inputs()
            if not self.whole:
                self.encode()  # into the tensors the graph reads
            self.graph.replay()
            return self.graph_outputs[1].cpu().numpy()


@dataclass
class ChainVariant(bench.Variant):
    """A chain run in `bench.interleave` beside the sampler variants."""

    chain: Any = None
    graphed: bool = False

    def e2e(self) -> None:
        (self.chain.run_graph if self.graphed else self.chain.run_eager)()

    def record_stages(self) -> None:
        pass


# --------------------------------------------------------------------------- stages alone


def graph_ms(fn, inner: int = 5) -> dict:
    """p50/p90 ms of `fn` captured `inner` times in one CUDA graph and replayed (bench_gpu.py's timing)."""
    import bench_gpu  # noqa: PLC0415 (beside this file; imports torch and the kernels only)

    with torch.inference_mode():
        return bench_gpu.time_calls_as_graph(fn, bench_gpu.Timer("cuda"), n=20, inner=inner)


@contextlib.contextmanager
def tf32(on: bool):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def stage_section(chains: dict[bool, Chain], pipe) -> dict:
    """Each stage of the chain alone as a CUDA graph (GPU time without the host), plain and GAG."""
    out: dict[str, Any] = {}
    for gag, chain in chains.items():
        key = "gag" if gag else "plain"
        with torch.inference_mode():
            chain.host_inputs()
            chain.forward()
        out[f"text_encoders/{key}"] = graph_ms(chain.encode)
        out[f"unet+lcm+vae/{key}"] = graph_ms(chain.denoise_and_decode, inner=2)
    chain = chains[False]
    vae = pipe.vae
    latent = chain.final_latents.detach().clone()
    scaled = latent / float(vae.config.scaling_factor)
    out["vae_decode/fp32"] = graph_ms(lambda: vae.decode(scaled, return_dict=False), inner=2)
    with tf32(True):
        out["vae_decode/fp32-tf32"] = graph_ms(lambda: vae.decode(scaled, return_dict=False), inner=2)
    half = scaled.half()
    vae.half()
    try:
        out["vae_decode/fp16"] = graph_ms(lambda: vae.decode(half, return_dict=False), inner=2)
    finally:
        vae.float()
    return out


# --------------------------------------------------------------------------- the run


def _stats(samples_s) -> dict:
    s = bench.summarize(samples_s)
    return {"p50_ms": round(s.p50_ms, 3), "p90_ms": round(s.p90_ms, 3), "mean_ms": round(s.mean_ms, 3),
            "min_ms": round(s.min_ms, 3), "n": s.n}


def check(samplers: dict[bool, Sampler], chains: dict[bool, Chain]) -> dict:
    """The chain against the sampler, same seed: final latents (max abs) and image (max level)."""
    out = {}
    for gag, sampler in samplers.items():
        result = sampler.generate(chains[gag].request)
        image = chains[gag].run_eager()
        latents = chains[gag].final_latents.float().cpu().numpy()
        entry = out["gag" if gag else "plain"] = {
            "latents_max_abs": float(np.abs(latents - result.latents).max()),
            "image_max_level_diff": _level_diff(image, np.asarray(result.image)),
        }
        if chains[gag].graph is not None:  # the replayed graph against the eager chain
            entry["graph_vs_eager_image_max_level_diff"] = _level_diff(chains[gag].run_graph(), image)
    return out


def _level_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def run(args) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as TorchComponent runs
    config = bench.BenchConfig(args.model, backends=("torch",), height=args.resolution, width=args.resolution,
                               weights=None if args.model.startswith("tiny") else "random")
    p = bench.plan(config)
    result: dict[str, Any] = {"environment": environment(args), "settings": {
        "model": p.entry.name, "weights": p.weights, "height": p.shape.height, "width": p.shape.width, "batch": 1,
        "dtype": args.dtype, "vae_dtype": None, "gag": "DEFAULT_EXPORT_GAG with method auto", "iters": args.iters,
        "warmup": args.warmup, "prompt": args.prompt, "seed": args.seed}}
    pipe, build_s = build_pipeline(args, p)
    result["settings"]["vae_dtype"] = str(pipe.vae.dtype).replace("torch.", "")
    result["build_s"] = round(build_s, 1)
    _log(f"built {p.entry.name} ({p.weights}) in {build_s:.1f} s")
    timer = bench.timer_for(args.device)
    cuda = args.device == "cuda"

    samplers = {gag: make_sampler(args, p, pipe, gag) for gag in (False, True)}
    variants: list[bench.Variant] = []
    chains: dict[bool, Chain] = {}
    for gag, sampler in samplers.items():
        request = request_for(args, p, sampler, gag)
        variants.append(bench.Variant("sampler", gag, sampler, {}, request, timer, args.device))
        chains[gag] = Chain(sampler, request, args.device)
        variants.append(ChainVariant("chain-eager", gag, sampler, {}, request, timer, args.device, chain=chains[gag]))
    for gag, chain in chains.items():
        if not cuda:
            continue
        graphed = ChainVariant("chain-graph", gag, samplers[gag], {}, chain.request, timer, args.device, chain=chain, graphed=True)
        try:
            chain.capture()
        except Exception as exc:
            graphed.error = f"capture failed: {exc}"
        variants.append(graphed)
    for v in variants:  # first calls: Triton compiles the fused kernel, cuDNN picks its algorithms
        if not v.error:
            t0 = time.perf_counter()
            v.e2e()
            if cuda:
                torch.cuda.synchronize()
            v.first_e2e_s = time.perf_counter() - t0
    _log("first calls: " + ", ".join(f"{v.name} {v.first_e2e_s and v.first_e2e_s * 1e3:.0f} ms" for v in variants))

    result["check_chain_vs_sampler"] = check(samplers, chains)
    _log(f"check: {result['check_chain_vs_sampler']}")
    t0 = time.perf_counter()
    bench.interleave(variants, "e2e", args.warmup, args.iters)
    result["timed_s"] = round(time.perf_counter() - t0, 1)
    rows = []
    for v in variants:
        row = {"form": v.backend, "gag": v.gag, "error": v.error or None,
               "first_call_ms": None if v.first_e2e_s is None else round(v.first_e2e_s * 1e3, 1)}
        if v.e2e_s:
            row.update(_stats(v.e2e_s))
            if v.backend == "sampler":
                row["stages_p50_ms"] = {k: round(float(np.median(s)) * 1e3, 3) for k, s in v.stages_s.items() if s}
        if isinstance(v, ChainVariant) and v.graphed:
            row["graph"] = "whole chain" if getattr(v.chain, "whole", False) else "UNet + VAE (text encoders eager)"
            row["graph_note"] = v.chain.graph_note or None
        rows.append(row)
    by = {(v.backend, v.gag): v for v in variants}
    for row in rows:
        plain = by.get((row["form"], False))
        if row["gag"] and plain is not None and plain.e2e_s and by[(row["form"], True)].e2e_s:
            gag_v = by[(row["form"], True)]
            row["gag_vs_plain_p50"] = round(row["p50_ms"] / _stats(plain.e2e_s)["p50_ms"], 4)
            row["gag_vs_plain_paired"] = round(bench.paired_ratio(gag_v.e2e_s, plain.e2e_s), 4)
    result["rows"] = rows
    result["goals"] = goals(rows)
    if cuda:
        result["peak_cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["stages_as_cuda_graphs"] = stage_section(chains, pipe)
    return result


def goals(rows: list[dict]) -> dict:
    """Issue 17's goals against the best form measured: p50 under GOAL_MS, GAG/plain within GOAL_GAG_RATIO."""
    timed = [r for r in rows if "p50_ms" in r]
    out = {}
    for gag in (False, True):
        mine = [r for r in timed if r["gag"] == gag]
        if mine:
            best = min(mine, key=lambda r: r["p50_ms"])
            out[f"best_p50_ms_{'gag' if gag else 'plain'}"] = {"form": best["form"], "p50_ms": best["p50_ms"],
                                                              "under_goal": best["p50_ms"] < GOAL_MS}
    out["gag_vs_plain_within_goal"] = {r["form"]: r["gag_vs_plain_paired"] <= GOAL_GAG_RATIO for r in timed if "gag_vs_plain_paired" in r}
    return out


def environment(args) -> dict:
    import diffusers

    from gag_export.gag import kernels

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if kernels.triton_available():
        import triton

        env["triton"] = triton.__version__
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def markdown(result: dict) -> str:
    lines = ["| form | GAG | p50 ms | p90 ms | GAG/plain p50 (paired) | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['gag_vs_plain_p50']} ({r['gag_vs_plain_paired']})" if "gag_vs_plain_p50" in r else ""
        note = r.get("error") or r.get("graph") or ""
        lines.append(f"| {r['form']} | {'on' if r['gag'] else 'off'} | {r.get('p50_ms', '')} | {r.get('p90_ms', '')} | {ratio} | {note} |")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
