"""Side-by-side latency: backends against PyTorch eager, and GAG against the plain graph, in one run.

A workflow: uses the runtime's components and sampler (no second loop), the exporter for the graphs
(no second exporter) and `workflows.artifacts` for engines; only the CLI imports it. Modules: `config`,
`timing`, `probes`, `graphs` (its graph cache), `variants`, `run`, `results` (typed results), `report`.

    config = BenchConfig("tiny-sdxl", backends=("torch", "ort"), gag="both", warmup=2, iters=20)
    result = run_bench(config)                 # a BenchResult; result.to_dict() is the JSON below
    write_json(result, Path("out.json")); write_markdown(result, Path("out.md")); write_plot(result, Path("out.png"))

What is measured, per variant (a backend with the GAG graph or with the plain, `--no-gag` graph):

- step: one denoiser call (`ComponentSet.denoiser.infer`) on the descriptor's sample inputs at
  the benchmark shape, GAG values from the export (scale 10, eta 15, zeta 0);
- e2e: one `Sampler.generate` (text encoders + every denoiser step with its scheduler step +
  VAE decode + conversion to an image) with the model's step count, batch 1.

Order: each variant is loaded, activated and called once (`first_call_ms`: compilation,
allocation; never part of the statistics); then `warmup` rounds and `iters` timed rounds in
which every variant is called once per round, round-robin, with the starting variant rotated
each round, so that background load hits all variants alike. GAG overhead (`gag` p50 / `no-gag`
p50 of one backend) and the speed-up over eager (`torch` p50 / backend p50, same GAG setting)
are ratios of figures from the same run; `paired_p50` is the median of the per-round ratios.

Timing: `perf_counter` around the call on the CPU; on a GPU, CUDA events recorded around it
with a synchronize before reading them (`Timer`). Every backend returns host arrays, so each
call is complete when timed.

Memory, per variant, in bytes converted to MiB:
- `isolate="none"`: all variants share one process. `rss_delta_mib` is the growth of
  the process RSS (psutil) across the variant's loading, activation and first call (for torch:
  the pipeline's weights are loaded once and counted in `pipeline_rss_mib`, not per variant);
  `peak_rss_mib` is the process's high-water mark (VmHWM on Linux) at the end, shared by all.
- `isolate="backend"` (default): each backend runs in its own child process (its GAG and plain variants
  still interleaved inside it, unless their ONNX Runtime sessions would not fit in memory
  together: then one child each); `peak_rss_mib` is that child's own high-water mark, so it
  holds everything the backend needed (Python and libraries included). Speed-ups then compare
  children that ran one after the other (`interleaved: false`). This is the default because
  runtimes sharing a process disturb each other: ONNX Runtime's intra-op threads spin between
  calls and steal the cores from PyTorch's OpenMP threads (tiny-sdxl on 2 cores: torch eager
  step p50 6.6 ms in its own process, 28 ms interleaved with ORT in one process).
- `isolate="variant"`: a child process per backend and GAG setting, for when even one
  backend's two variants do not fit in memory together; GAG overheads then compare children
  that ran one after the other too (`interleaved: false`).
- GPU: for torch variants, the peak of `torch.cuda.max_memory_allocated` over the variant's
  loading and first call, absolute (weights resident on the GPU included, so a GAG variant that
  shares its twin's weights reads the same kind of figure); ONNX Runtime and TensorRT allocate
  outside torch's allocator, so their rows have none. For every backend, the process's used GPU
  memory from NVML when nvidia-ml-py is installed (cumulative within one child process).

JSON schema (`schema_version` 1; times in milliseconds, memory in MiB, null when not measured;
`BenchResult.from_dict` reads it back and validates it by the classes' field types):

    {"schema": "gag-export-bench", "schema_version": 1, "created": "2025-01-01T00:00:00Z",
     "config": {"model", "backends": [...], "gag": "gag|no-gag|both", "steps", "height", "width",
                "batch", "warmup", "iters", "weights", "e2e", "threads", "isolate", "seed", "prompt",
                "graphs", "engines", "reexport"},
     "e2e_skipped": null | "why e2e was not measured",
     "environment": {"cpu": {"model", "physical_cores", "logical_cores"}, "memory_gib", "gpu": null |
                     {"name", "sm", "memory_gib"}, "platform", "python", "versions": {...},
                     "precision": "fp32", "threads": {"torch", "ort"}, "thread_env", "load_average",
                     "load_average_at_start"},
     "shapes": {"batch", "height", "width", "steps", "denoiser": {input: [dims]}},
     "graphs": {"gag"|"no-gag": {"path", "denoiser_sha256", "nodes", "exported"}},  (graph backends only)
     "memory": {"method", "pipeline_rss_mib", "peak_rss_mib"},
     "results": [{"backend", "gag": bool, "status": "ok|skipped|failed", "reason", "device", "timer",
                  "step": null | {"first_call_ms", "stats": STATS, "samples_ms": [...]},
                  "e2e": null | {"first_call_ms", "stats": STATS, "samples_ms": [...],
                                 "stages_ms": {"text_encode", "denoise", "vae_decode"}},
                  "memory": {"rss_delta_mib", "peak_rss_mib", "gpu_peak_mib", "gpu_used_mib"},
                  "load_average_after": [1, 5, 15-minute load] when its process finished timing,
                  "img2img": null | {"first_call_ms", "stats": STATS, "samples_ms": [...], "steps"}  (--img2img)}],
     "gag_overhead": [{"backend", "measure": "step|e2e|img2img", "ratio", "percent", "paired_p50", "interleaved"}],
     "speedup": [{"backend", "gag", "measure", "baseline": "torch", "ratio", "interleaved"}]}
    STATS = {"n", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms"}
"""

from ...core.atomic import check_writable
from .config import (
    BASELINE,
    BENCH_BACKENDS,
    BENCH_PROMPT,
    DEFAULT_GRAPHS,
    GAG_MODES,
    GRAPH_BACKENDS,
    ISOLATE_MODES,
    SAMPLER_STAGES,
    SCHEMA,
    SCHEMA_VERSION,
    BenchConfig,
    Plan,
    Skip,
    default_threads,
    parse_backends,
    plan,
)
from .graphs import graphs_root, needs_export, prepare
from .probes import environment, peak_rss_bytes, rss_bytes
from .report import (
    render_markdown,
    validate_result,
    write_json,
    write_markdown,
    write_plot,
)
from .results import (
    BenchResult,
    GagOverhead,
    ResultRow,
    RowMemory,
    RunPart,
    Series,
    Speedup,
)
from .run import measure, ratios, run_bench
from .timing import (
    CudaEventTimer,
    LatencyStats,
    Timer,
    WallTimer,
    paired_ratio,
    summarize,
    timer_for,
)
from .variants import Variant, interleave, load_variant, torch_components

__all__ = [
    "BASELINE", "BENCH_BACKENDS", "DEFAULT_GRAPHS", "BENCH_PROMPT", "GAG_MODES", "GRAPH_BACKENDS", "ISOLATE_MODES", "SCHEMA",
    "SCHEMA_VERSION", "SAMPLER_STAGES", "BenchConfig", "BenchResult", "GagOverhead", "ResultRow", "RowMemory", "RunPart",
    "Series", "Speedup", "CudaEventTimer", "LatencyStats", "Plan", "Skip", "Timer", "Variant",
    "WallTimer", "check_writable", "default_threads", "environment", "graphs_root", "interleave", "load_variant", "measure",
    "needs_export", "paired_ratio", "parse_backends", "peak_rss_bytes", "plan", "prepare", "ratios", "render_markdown",
    "rss_bytes", "run_bench", "summarize", "timer_for", "torch_components", "validate_result", "write_json",
    "write_markdown", "write_plot",
]
