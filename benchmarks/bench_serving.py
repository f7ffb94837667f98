"""Serving throughput and latency: tiny-sdxl through Triton with the CPU stand-in repository.

    python benchmarks/bench_serving.py                       # graphs/tiny-sdxl (exported if missing)
    python benchmarks/bench_serving.py --requests-per-client 8 --concurrency 1,4,8 --rounds 3 --json out.json

Two servers run side by side on 127.0.0.1 (free ports, the bundled server and the serving
environment of `gag-export serve --setup`), one per scheduling variant of the same stand-in
repository: Triton's dynamic batcher on the component models, or not. After 2 warm-up requests
each, the measurements are interleaved (round by round, level by level, variant by variant) so
that load from other processes on a shared machine hits both alike. A level with C clients runs C
threads over HTTP, each sending a fixed number of requests (bounded: C x requests-per-client),
and records requests/s (requests / wall time) and every request's latency. Reported: the median
requests/s over the rounds, and p50/p99 over all latencies of a (variant, level). Every response
is checked to be a 64x64x3 image. Both servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MODEL = "tiny-sdxl"
PROMPT = "a photo of a cat sitting on a wooden table"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q, method="linear"))


def run_level(url: str, concurrency: int, per_client: int, seed0: int) -> dict:
    from gag_export.serving.client import PipelineClient, PipelineRequest

    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with PipelineClient(url, timeout=600) as c:
            for k in range(per_client):
                seed = seed0 + index * per_client + k
                start = time.perf_counter()
                image = c.generate(PipelineRequest(PROMPT, seed=seed))
                elapsed = time.perf_counter() - start
                if image.shape != (64, 64, 3):
                    raise RuntimeError(f"unexpected image shape {image.shape}")
                with lock:
                    latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - start
    return {"requests_per_s": len(latencies) / wall, "latencies": latencies}


def start_variant(graphs: Path, work: Path, dynamic_batching: bool, args, stack) -> dict:
    from gag_export.serving.repository import RepositoryOptions, build_repository
    from gag_export.serving.client import PipelineClient, PipelineRequest
    from gag_export.serving.server import ServerConfig, TritonServer

    tag = "dyn" if dynamic_batching else "nodyn"
    repo = work / tag / MODEL
    options = RepositoryOptions(cpu_standin=True, dynamic_batching=dynamic_batching, max_batch=8,
                                sampler_instances=args.sampler_instances, instances=args.instances,
                                standin_threads=args.threads)
    build_repository(graphs, repo, options)
    log_file = stack.enter_context(open(work / f"server-{tag}.log", "w"))
    start = time.perf_counter()
    server = stack.enter_context(TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0,
                                                           ready_timeout=600), log_file=log_file))
    startup = time.perf_counter() - start
    url = f"http://{server.urls.http}"
    with PipelineClient(url, timeout=600) as warm:
        for seed in range(2):
            warm.generate(PipelineRequest(PROMPT, seed=seed))
    return {"variant": "dynamic batching" if dynamic_batching else "no dynamic batching",
            "dynamic_batching": dynamic_batching, "url": url, "startup_s": startup, "server": server}


def summarize(variant: dict, runs: dict) -> list[dict]:
    levels = []
    for concurrency, results in sorted(runs.items()):
        latencies = [x for r in results for x in r["latencies"]]
        levels.append({
            "concurrency": concurrency, "rounds": len(results), "requests": len(latencies),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "requests_per_s_rounds": [round(r["requests_per_s"], 2) for r in results],
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        })
    return levels


def markdown(doc: dict) -> str:
    rows = ["| scheduling | clients | requests | requests/s (median of rounds) | p50 latency (ms) | p99 latency (ms) |",
            "|---|---|---|---|---|---|"]
    for variant in doc["variants"]:
        for level in variant["levels"]:
            rows.append(f"| {variant['variant']} | {level['concurrency']} | {level['requests']} | "
                        f"{level['requests_per_s']:.1f} ({', '.join(map(str, level['requests_per_s_rounds']))}) | "
                        f"{level['p50_ms']:.0f} | {level['p99_ms']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=Path, default=Path("graphs"), help="graphs root (tiny-sdxl exported if missing)")
    parser.add_argument("--concurrency", default="1,4,8", help="client counts, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--sampler-instances", type=int, default=2)
    parser.add_argument("--instances", type=int, default=1, help="instances of each stand-in")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per stand-in instance")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every level")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from gag_export.workflows.artifacts import ensure_artifacts

    ensure_artifacts(MODEL, "ort", graphs=args.graphs)
    doc = {
        "model": MODEL, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "requests_per_client": args.requests_per_client, "rounds": args.rounds, "sampler_instances": args.sampler_instances,
        "standin_instances": args.instances, "standin_threads": args.threads, "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, contextlib.ExitStack() as stack:
        variants = [start_variant(args.graphs / MODEL, Path(tmp), dynamic, args, stack) for dynamic in (False, True)]
        runs = {v["variant"]: {c: [] for c in args.concurrency} for v in variants}
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for v in variants:
                    result = run_level(v["url"], concurrency, args.requests_per_client,
                                       seed0=100_000 * round_index + 1000 * concurrency)
                    runs[v["variant"]][concurrency].append(result)
                    print(f"round {round_index + 1} {v['variant']:20s} C={concurrency}: "
                          f"{result['requests_per_s']:.1f} req/s", file=sys.stderr)
        for v in variants:
            start = time.perf_counter()
            v.pop("server").stop()
            doc["variants"].append({**{k: v[k] for k in ("variant", "dynamic_batching", "startup_s")},
                                    "shutdown_s": time.perf_counter() - start,
                                    "levels": summarize(v, runs[v["variant"]])})
    print(markdown(doc))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
