"""Side-by-side latency: backends against PyTorch eager, and GAG against the plain graph, in one run.

Layer 8: uses the runtime's components and sampler (no second loop), `export.py` for the graphs
(no second exporter) and `engine.py` for TensorRT plans; only the CLI imports it.

    config = BenchConfig("tiny-sdxl", backends=("torch", "ort"), gag="both", warmup=2, iters=20)
    result = run_bench(config)                 # a dict in the JSON schema below
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

JSON schema (`schema_version` 1; times in milliseconds, memory in MiB, null when not measured):

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
                  "load_average_after": [1, 5, 15-minute load] when its process finished timing}],
     "gag_overhead": [{"backend", "measure": "step|e2e", "ratio", "percent", "paired_p50", "interleaved"}],
     "speedup": [{"backend", "gag", "measure", "baseline": "torch", "ratio", "interleaved"}]}
    STATS = {"n", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms"}
"""

from __future__ import annotations

import abc
import contextlib
import copy
import datetime as _dt
import errno
import gc
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .core.atomic import as_if_created_plainly, write_failure
from .core.errors import GagExportError, InvalidInputError

log = logging.getLogger(__name__)

SCHEMA = "gag-export-bench"
SCHEMA_VERSION = 1
BENCH_BACKENDS = ("torch", "torch-compile", "ort", "tensorrt", "tensorrt-rtx")
GRAPH_BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")  # the backends that run exported graphs
GAG_MODES = {"gag": (True,), "no-gag": (False,), "both": (False, True)}
ISOLATE_MODES = ("none", "backend", "variant")
WEIGHTS = ("tiny", "random", "pretrained")
BASELINE = "torch"
DEFAULT_PROMPT = "a photo of a cat sitting on a wooden table"
DEFAULT_GRAPHS = Path("graphs") / "bench"
STAGES = ("text_encode", "denoise", "vae_decode")
MIB = float(1 << 20)
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed samples, in milliseconds.

    Percentiles are numpy's default (linear interpolation between the closest ranks); `std` is
    the sample standard deviation (ddof=1), 0 for a single sample.
    """

    n: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_s: Sequence[float]) -> LatencyStats:
    """Statistics of latencies given in seconds (InvalidInputError when empty or not finite)."""
    ms = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if ms.size == 0:
        raise InvalidInputError("no timed samples to summarize (iters must be >= 1)")
    if not np.all(np.isfinite(ms)):
        raise InvalidInputError("timed samples contain NaN or inf")
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    std = float(ms.std(ddof=1)) if ms.size > 1 else 0.0
    return LatencyStats(int(ms.size), float(ms.mean()), std, p50, p90, p99, float(ms.min()), float(ms.max()))


def paired_ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> float:
    """Median of per-round ratios of two interleaved series (same length)."""
    a, b = np.asarray(numerator_s, dtype=np.float64), np.asarray(denominator_s, dtype=np.float64)
    if a.size == 0 or a.size != b.size:
        raise InvalidInputError(f"paired_ratio needs two series of the same non-zero length, got {a.size} and {b.size}")
    return float(np.median(a / b))


# --------------------------------------------------------------------------------------------
# Timers and memory
# --------------------------------------------------------------------------------------------


class Timer(abc.ABC):
    """Times one call of `fn` in seconds, the call being complete when the time is read."""

    kind = ""

    @abc.abstractmethod
    def measure(self, fn: Callable[[], Any]) -> float: ...


class WallTimer(Timer):
    """`time.perf_counter` around the call (CPU backends; every backend returns host arrays)."""

    kind = "perf_counter"

    def measure(self, fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaEventTimer(Timer):
    """CUDA events recorded before and after the call on the current stream, then synchronized."""

    kind = "cuda-events"

    def __init__(self, device: Any = None):
        import torch  # noqa: PLC0415

        self._torch = torch
        self.device = torch.device(device or "cuda")
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def measure(self, fn):
        cuda = self._torch.cuda
        cuda.synchronize(self.device)
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        cuda.synchronize(self.device)
        return self._start.elapsed_time(self._end) / 1e3


def timer_for(device: str) -> Timer:
    """The timer for a variant running on `device` ("cpu", "cuda", "cuda:N").

    CUDA events need torch's CUDA: with onnxruntime-gpu beside a CPU build of torch, ort-cuda
    variants get the wall clock, which is exact for them (every call returns host arrays, so it
    ends synchronized).
    """
    if str(device).startswith("cuda") and _torch_cuda_available():
        return CudaEventTimer(device)
    return WallTimer()


def _torch_cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def rss_bytes() -> int:
    import psutil  # noqa: PLC0415

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark: Linux's VmHWM, else `ru_maxrss` (KiB on Linux, bytes on macOS).

    Not `ru_maxrss` on Linux: the kernel carries it over fork and exec, so a bench child would
    report its parent's peak when that was higher (seen: a child of 13 MiB read 813).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def nvml_used_bytes() -> int | None:
    """GPU memory this process uses according to NVML (None without nvidia-ml-py or a GPU)."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no library, no driver, no permission: not measured
        log.debug("NVML: %s", exc)
    return None


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_backends(text: str | Sequence[str]) -> tuple[str, ...]:
    """"torch,ort" -> ("torch", "ort"); InvalidInputError naming an unknown backend."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [name for name in names if name not in BENCH_BACKENDS]
    if unknown or not names:
        raise InvalidInputError(f"--backends: unknown {unknown or 'empty list'}; use some of {', '.join(BENCH_BACKENDS)}")
    return names


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. None means the model's default (size, steps, weights).

    backends: any of BENCH_BACKENDS ("torch-compile" is the torch backend under torch.compile).
    gag: "gag" (GAG graphs), "no-gag" (plain graphs) or "both" (both, interleaved: the overhead).
    e2e: also time whole generations (batch 1 only); False times the denoiser step alone, and
        then only the denoiser is loaded and exported (what a full-size CPU run can afford).
    threads: torch intra-op threads and ONNX Runtime intra-op threads (0: every CPU available).
    graphs: cache of the exported graphs: `<graphs>/gag/<model>` and `<graphs>/no-gag/<model>`;
        reused when their manifest matches the run (shape, weights, GAG, components), else exported;
        `reexport` exports them again regardless (e.g. after a change to the GAG code).
    isolate: "none" (one process), "backend" (a child process per backend) or "variant" (per backend
        and GAG setting); see the module docstring.
    """

    model: str
    backends: tuple[str, ...] = ("torch", "ort")
    gag: str = "both"
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    warmup: int = 2
    iters: int = 10
    weights: str | None = None
    e2e: bool = True
    threads: int = 0
    isolate: str = "backend"
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    graphs: Path = DEFAULT_GRAPHS
    engines: Path = Path("engines")
    reexport: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", parse_backends(self.backends))
        object.__setattr__(self, "graphs", Path(self.graphs))
        object.__setattr__(self, "engines", Path(self.engines))
        if self.gag not in GAG_MODES:
            raise InvalidInputError(f"gag: use one of {', '.join(GAG_MODES)}, got {self.gag!r}")
        if self.isolate not in ISOLATE_MODES:
            raise InvalidInputError(f"isolate: use one of {', '.join(ISOLATE_MODES)}, got {self.isolate!r}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise InvalidInputError(f"weights: use one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        for name, low in (("warmup", 0), ("iters", 1), ("batch", 1), ("threads", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name}: must be an integer >= {low}, got {value!r}")
        from .models.base import require_positive_int  # noqa: PLC0415 (torch only once a config is made)

        for name in ("height", "width"):  # None: the model's size; 0 is an error, not that default
            if getattr(self, name) is not None:
                require_positive_int(name, getattr(self, name))

    @property
    def gag_settings(self) -> tuple[bool, ...]:
        return GAG_MODES[self.gag]

    @property
    def cpu_threads(self) -> int:
        return self.threads or default_threads()

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(backends=list(self.backends), graphs=str(self.graphs), engines=str(self.engines))
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "BenchConfig":
        return cls(**{**data, "backends": tuple(data["backends"])})


@dataclass(frozen=True)
class Plan:
    """What a config resolves to for its model: entry, image shape, steps, weights, components."""

    entry: Any
    shape: Any  # models.ImageShape
    steps: int
    weights: str
    e2e: bool
    e2e_skip: str  # why e2e is not measured ("" when it is)

    @property
    def components(self) -> tuple[str, ...]:
        """Components to export/load: all for e2e, the denoiser alone for step-only runs."""
        return () if self.e2e else (("unet",) if self.entry.family == "sdxl" else ("transformer",))


def plan(config: BenchConfig) -> Plan:
    """Validate the config against its model before anything heavy (InvalidInputError)."""
    from .models import ImageShape, descriptors_for, get_entry  # noqa: PLC0415

    entry = get_entry(config.model)
    weights = config.weights or ("tiny" if entry.is_tiny else "pretrained")
    if entry.is_tiny and weights != "tiny":
        raise InvalidInputError(f"{entry.name} is built in code: use --weights tiny (or leave it out)")
    if not entry.is_tiny and weights == "tiny":
        raise InvalidInputError(f"{entry.name}: --weights tiny is for tiny-* models; use random or pretrained")
    shape = ImageShape(config.height or entry.height, config.width or entry.width, config.batch)
    denoiser = next(d for d in descriptors_for(entry) if d.role == "denoiser")
    shape.require_multiple(int(denoiser.pixel_multiple), f"{entry.family} ({entry.name})")
    spec = entry.scheduler
    steps = spec.check_steps(spec.default_steps if config.steps is None else config.steps)
    e2e, skip = config.e2e, ""
    if e2e and config.batch != 1:
        e2e, skip = False, "the sampler generates one image per call: e2e is measured at --batch 1 only"
    if not config.e2e:
        skip = "not requested (--no-e2e)"
    return Plan(entry, shape, steps, weights, e2e, skip)


# --------------------------------------------------------------------------------------------
# Artifacts: exported graphs (and engines) per GAG setting, reused when they match
# --------------------------------------------------------------------------------------------


def graphs_root(config: BenchConfig, gag: bool) -> Path:
    return config.graphs / ("gag" if gag else "no-gag")


def _manifest_mismatch(config: BenchConfig, p: Plan, gag: bool) -> str | None:
    """Why the cached export cannot serve this run (None when it can)."""
    from .export import DEFAULT_EXPORT_GAG, Manifest  # noqa: PLC0415

    graphs_dir = graphs_root(config, gag) / p.entry.name
    if not (graphs_dir / "manifest.json").is_file():
        return "no export yet"
    try:
        manifest = Manifest.load(graphs_dir)
    except GagExportError as exc:
        return str(exc)
    data = manifest.data
    shape = data.get("shape", {})
    wanted_components = set(p.components) if p.components else {d.name for d in _descriptors(p.entry)}
    checks = [
        (data.get("dynamic") is False, "dynamic graphs"),
        ((shape.get("batch"), shape.get("height"), shape.get("width")) == (p.shape.batch, p.shape.height, p.shape.width),
         f"shape {shape}"),
        (data.get("dtype") == "fp32", f"dtype {data.get('dtype')}"),
        (data.get("weights") == p.weights, f"weights {data.get('weights')}"),
        ((manifest.gag is not None) == gag, "GAG setting"),
        (not gag or manifest.gag == DEFAULT_EXPORT_GAG, f"GAG config {data.get('gag')}"),
        (wanted_components <= set(manifest.components), f"components {sorted(manifest.components)}"),
    ]
    failed = [reason for ok, reason in checks if not ok]
    return f"cached export differs ({', '.join(failed)})" if failed else None


def _descriptors(entry, pipe=None):
    from .models import descriptors_for  # noqa: PLC0415

    return descriptors_for(entry, pipe)


def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine (None when it can), checked before exporting anything."""
    from .core.errors import MissingDependencyError  # noqa: PLC0415

    try:
        if backend == "ort":
            import onnxruntime  # noqa: F401, PLC0415
        elif backend in ("tensorrt", "tensorrt-rtx"):
            from .engine import RuntimeTarget, trt_features  # noqa: PLC0415

            RuntimeTarget.current(trt_features(backend))
    except MissingDependencyError as exc:
        return str(exc)
    except ImportError as exc:
        return f"{backend} is not importable here: {exc}"
    return None


def needs_export(config: BenchConfig, p: Plan) -> dict[bool, str]:
    """{gag setting: reason} for every graph set the (available) graph backends need but the cache lacks."""
    if not any(b in GRAPH_BACKENDS and unavailable(b) is None for b in config.backends):
        return {}
    missing = {}
    for gag in config.gag_settings:
        reason = "--reexport" if config.reexport else _manifest_mismatch(config, p, gag)
        if reason is not None:
            missing[gag] = reason
    return missing


def load_bench_pipeline(config: BenchConfig, p: Plan):
    """The fp32 pipeline of the run: every component for e2e, the denoiser alone otherwise."""
    from .models import load_pipeline  # noqa: PLC0415

    return load_pipeline(p.entry, weights=p.weights, components=p.components or None, seed=config.seed)


def export_graphs(config: BenchConfig, p: Plan, pipe, gag: bool) -> Path:
    """Export the run's graphs with (DEFAULT_EXPORT_GAG) or without GAG into the cache."""
    from .export import DEFAULT_EXPORT_GAG, ExportConfig, export_model  # noqa: PLC0415

    root = graphs_root(config, gag)
    log.info("exporting %s (%s) at %dx%d to %s", p.entry.name, "GAG" if gag else "no GAG", p.shape.height,
             p.shape.width, root / p.entry.name)
    # the bench's own cache, exported again because it did not fit this run: replaced whole (an
    # export of the denoiser alone over one with other settings is otherwise refused)
    shutil.rmtree(root / p.entry.name, ignore_errors=True)
    export_model(pipe, p.entry, ExportConfig(
        p.entry.name, root, p.shape, gag=DEFAULT_EXPORT_GAG if gag else None, weights=p.weights,
        seed=config.seed, components=p.components,
    ))
    return root / p.entry.name


def prepare(config: BenchConfig, p: Plan, pipe=None):
    """Export the graph sets the cache lacks; return the pipeline (loaded here if needed and not given)."""
    missing = needs_export(config, p)
    for gag, reason in missing.items():
        log.info("%s graphs for %s: %s", "GAG" if gag else "plain", p.entry.name, reason)
        if pipe is None:
            pipe = load_bench_pipeline(config, p)
        export_graphs(config, p, pipe, gag)
    return pipe


# --------------------------------------------------------------------------------------------
# Variants: one backend with or without GAG, ready to call
# --------------------------------------------------------------------------------------------


class Skip(Exception):
    """A variant that cannot run here; its message is the reason reported."""


@dataclass
class Variant:
    """A loaded backend/GAG combination: its components, sampler, step feed and timer."""

    backend: str
    gag: bool
    sampler: Any  # runtime.Sampler
    step_feed: dict
    request: Any  # runtime.GenerationConfig for e2e
    timer: Timer
    device: str
    first_step_s: float | None = None
    first_e2e_s: float | None = None
    rss_delta: int | None = None
    gpu_peak: int | None = None
    gpu_used: int | None = None
    step_s: list = field(default_factory=list)
    e2e_s: list = field(default_factory=list)
    stages_s: dict = field(default_factory=lambda: {s: [] for s in STAGES})
    error: str = ""
    _last_timings: Any = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{'gag' if self.gag else 'no-gag'}"

    def step(self) -> None:
        self.sampler.components.denoiser.infer(self.step_feed)

    def e2e(self) -> None:
        result = self.sampler.generate(self.request)
        self._last_timings = result.timings

    def record_stages(self) -> None:
        timings = self._last_timings
        self.stages_s["text_encode"].append(timings.text_encode)
        self.stages_s["denoise"].append(sum(timings.denoise))
        self.stages_s["vae_decode"].append(timings.vae_decode)


def _shared_weights_copy(module):
    """A copy of a torch module that shares every parameter and buffer (only the structure is new),
    so a GAG twin of a 10 GB UNet costs no weight memory."""
    import torch  # noqa: PLC0415

    tensors = [*module.parameters(), *module.buffers()]
    memo = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
    return copy.deepcopy(module, memo)


def torch_components(p: Plan, pipe, gag: bool, compile: bool, device: str, dtype: str = "fp32"):
    """A torch ComponentSet over `pipe` with (DEFAULT_EXPORT_GAG) or without GAG.

    Like the runtime's torch loader, but on a pipeline loaded once for every variant: the GAG
    variant gets a denoiser twin sharing the weights, so plain and GAG run the same tensors.
    `dtype`: the precision `pipe` is in; each component declares (and is fed) the types an export
    at that precision gives it (an fp16 SDXL VAE stays fp32: `pipe` must hold it so).
    """
    from .attention import apply_gag, is_gag_applied  # noqa: PLC0415
    from .export import DEFAULT_EXPORT_GAG  # noqa: PLC0415
    from .runtime.backends import ComponentSet, TorchComponent, torch_runtime_gag  # noqa: PLC0415

    attr = "unet" if p.entry.family == "sdxl" else "transformer"
    base = getattr(pipe, attr)
    if is_gag_applied(base):
        raise GagExportError(f"the benchmark pipeline's {attr} already has GAG applied")
    view = pipe
    if gag:
        view = copy.copy(pipe)  # a new pipeline object holding the same components but the twin denoiser
        twin = _shared_weights_copy(base)
        apply_gag(twin, torch_runtime_gag(DEFAULT_EXPORT_GAG))
        setattr(view, attr, twin)
    components = {}
    for descriptor in _descriptors(p.entry, view):
        if p.components and descriptor.name not in p.components:
            continue
        has_gag = gag and descriptor.role == "denoiser"
        components[descriptor.name] = TorchComponent(
            descriptor.name, descriptor.role, descriptor.inputs(dtype, has_gag), descriptor.outputs(dtype, has_gag),
            module=descriptor.export_module(view), device=device, compile=compile,
        )
    return ComponentSet(p.entry.name, "torch", components, pipe=view, gag=torch_runtime_gag(DEFAULT_EXPORT_GAG) if gag else None)


def _ensure_engines(config: BenchConfig, p: Plan, gag: bool, backend: str) -> None:
    """Build the engines of a graph set when the cache lacks them (after the builder and the GPU are checked)."""
    from .engine import EngineOptions, RuntimeTarget, build, trt_features  # noqa: PLC0415
    from .runtime.backends import load_manifest_for  # noqa: PLC0415
    from .runtime.prepare import _missing_engines  # noqa: PLC0415

    target = RuntimeTarget.current(trt_features(backend))  # MissingDependencyError without the builder or a GPU
    root = graphs_root(config, gag)
    manifest = load_manifest_for(p.entry.name, root)
    missing = _missing_engines(manifest, config.engines, target)
    if missing:
        log.info("building %s engines for %s (%s): %s", backend, p.entry.name, "GAG" if gag else "plain", ", ".join(missing))
        targets = target.sm_tag if backend == "tensorrt-rtx" else None
        build(root / p.entry.name, config.engines, EngineOptions(backend=backend, targets=targets, components=tuple(missing)))


def load_variant(config: BenchConfig, p: Plan, backend: str, gag: bool, pipe=None) -> Variant:
    """Load and activate one variant; `Skip` when its backend cannot run here."""
    from .core.errors import MissingDependencyError  # noqa: PLC0415
    from .runtime import BackendOptions, GenerationConfig, Sampler, SamplerAssets  # noqa: PLC0415

    options = BackendOptions(threads=config.cpu_threads, compile=backend == "torch-compile")
    reason = unavailable(backend)
    if reason is not None:
        raise Skip(reason)
    try:
        if backend in ("torch", "torch-compile"):
            device = str(options.torch_device())
            components = torch_components(p, pipe, gag, options.compile, device)
            sampler = Sampler(p.entry, components, SamplerAssets.from_pipeline(pipe),
                              {d.name: d for d in _descriptors(p.entry, components.pipe)})
        else:
            if backend == "ort":
                _check_memory_for_graphs(config, p, gag)
            else:
                _ensure_engines(config, p, gag, backend)
            sampler = Sampler.load(p.entry.name, backend, graphs=graphs_root(config, gag), engines=config.engines,
                                   options=options)
            device = "cpu" if backend == "ort" else "cuda"  # ort: settled once its sessions exist
    except MissingDependencyError as exc:
        raise Skip(str(exc)) from None
    except ImportError as exc:
        raise Skip(f"{backend}: {exc}") from None
    denoiser = sampler.components.denoiser
    descriptor = sampler.descriptors[denoiser.name]
    gag_values = sampler.gag_params() if gag else None
    feed = {name: value.numpy() for name, value in descriptor.sample_inputs(p.shape, "fp32", config.seed, gag=gag).items()}
    if gag_values is not None:
        feed.update(gag_values.feed())
    request = GenerationConfig(config.prompt, seed=config.seed, steps=p.steps, height=p.shape.height,
                               width=p.shape.width, gag=gag_values)
    return Variant(backend, gag, sampler, feed, request, timer_for(device), device)


# Peak RSS of a process running an ONNX Runtime CPU session, per byte of graph: measured 1.40 on the
# SDXL UNet at 1024x1024 (9.6 GiB graph, 13.4 GiB peak: weights, prepacked GEMM weights being swapped
# in, activations, Python and torch). A guard against running the machine out of memory, not a model.
ORT_MEMORY_FACTOR = 1.4


def _check_memory_for_graphs(config: BenchConfig, p: Plan, gag: bool) -> None:
    """`Skip` instead of running the machine out of memory when an ORT session will not fit."""
    import psutil  # noqa: PLC0415

    from .runtime.backends import load_manifest_for  # noqa: PLC0415

    manifest = load_manifest_for(p.entry.name, graphs_root(config, gag))
    need = ORT_MEMORY_FACTOR * sum(int(c.get("size_bytes") or 0) for c in manifest.components.values())
    available = psutil.virtual_memory().available
    if need > available:
        raise Skip(f"not enough memory: the ONNX Runtime session needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB "
                   "is available; run each variant in its own process (--isolate variant) or free memory")


def _ort_device(sampler) -> str:
    sessions = [c.session for c in sampler.components if getattr(c, "session", None) is not None]
    uses_cuda = any(s.get_providers()[0] != "CPUExecutionProvider" for s in sessions)
    return "cuda" if uses_cuda else "cpu"


def _cuda_in_use() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------


def interleave(variants: Sequence[Variant], call: str, warmup: int, iters: int,
               on_round: Callable[[int, int], None] | None = None) -> None:
    """`warmup` then `iters` rounds, each calling every live variant once, the first rotated per round.

    Timed samples land in `variant.step_s` / `variant.e2e_s`; a variant whose call raises is
    marked failed (its `error`) and left out of the later rounds.
    """
    total = warmup + iters
    for r in range(total):
        live = [v for v in variants if not v.error]
        if not live:
            return
        shift = r % len(live)
        for variant in live[shift:] + live[:shift]:
            try:
                seconds = variant.timer.measure(getattr(variant, call))
            except Exception as exc:  # a backend failing mid-run is reported, not fatal to the others
                variant.error = f"{call} failed: {_first_line(exc)}"
                log.warning("%s: %s", variant.name, variant.error)
                continue
            if r >= warmup:
                if call == "step":
                    variant.step_s.append(seconds)
                else:
                    variant.e2e_s.append(seconds)
                    variant.record_stages()
        if on_round is not None:
            on_round(r + 1, total)


def _activate_and_first_call(variant: Variant, call: str) -> None:
    """Activate (if needed) and call once, recording the cold time; errors mark the variant failed."""
    try:
        variant.sampler.components.activate()
        if variant.backend == "ort" and variant.first_step_s is None:
            variant.device = _ort_device(variant.sampler)
            variant.timer = timer_for(variant.device)
        seconds = variant.timer.measure(getattr(variant, call))
    except Exception as exc:
        variant.error = f"first {call} failed: {_first_line(exc)}"
        log.warning("%s: %s", variant.name, variant.error)
        return
    if call == "step":
        variant.first_step_s = seconds
    else:
        variant.first_e2e_s = seconds


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch  # noqa: PLC0415

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def uses_torch(config: BenchConfig) -> bool:
    return any(b.startswith("torch") for b in config.backends)


def load_pipeline_measured(config: BenchConfig, p: Plan) -> tuple[Any, int]:
    """The run's pipeline and the RSS growth its loading caused."""
    before = rss_bytes()
    pipe = load_bench_pipeline(config, p)
    return pipe, rss_bytes() - before


def measure(config: BenchConfig, p: Plan, pipe=None, pipeline_rss: int | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Load every variant of `config` in this process, time them interleaved; the `results` part.

    Returns {"results": [...], "memory": {...}}. The pipeline is loaded here for torch
    variants when not given; graphs must already exist for ort/tensorrt (see `prepare`).
    """
    notify = progress or (lambda message: None)
    rows: list[dict] = []
    variants: list[Variant] = []
    with torch_threads(config.cpu_threads):
        if pipe is None and uses_torch(config):
            notify(f"loading {p.entry.name} ({p.weights} weights)")
            pipe, pipeline_rss = load_pipeline_measured(config, p)
        for backend in config.backends:
            for gag in config.gag_settings:
                label = f"{backend}/{'gag' if gag else 'no-gag'}"
                notify(f"loading {label}")
                gc.collect()
                before = rss_bytes()
                _gpu_reset()
                try:
                    variant = load_variant(config, p, backend, gag, pipe)
                except Skip as exc:
                    rows.append(_skipped_row(backend, gag, "skipped", str(exc)))
                    continue
                except GagExportError as exc:
                    rows.append(_skipped_row(backend, gag, "failed", str(exc)))
                    continue
                notify(f"first call: {label}")
                _activate_and_first_call(variant, "step")
                if p.e2e and not variant.error:
                    _activate_and_first_call(variant, "e2e")
                variant.rss_delta = rss_bytes() - before
                variant.gpu_peak, variant.gpu_used = _gpu_peak(backend), nvml_used_bytes()
                variants.append(variant)

        def on_round(measure_name):
            return lambda done, total: notify(f"{measure_name}: round {done}/{total}")

        interleave(variants, "step", config.warmup, config.iters, on_round("step"))
        if p.e2e:
            interleave(variants, "e2e", config.warmup, config.iters, on_round("e2e"))
        for variant in variants:
            variant.sampler.components.deactivate()
    peak = peak_rss_bytes()
    load = load_average()
    rows += [_variant_row(v, p, peak if config.isolate != "none" else None) for v in variants]
    for row in rows:
        row["load_average_after"] = load
    order = {(b, g): i for i, (b, g) in enumerate((b, g) for b in config.backends for g in config.gag_settings)}
    rows.sort(key=lambda row: order[(row["backend"], row["gag"])])
    return {"results": rows, "memory": {"pipeline_rss_mib": _mib(pipeline_rss), "peak_rss_mib": _mib(peak)}}


def _gpu_reset() -> None:
    """Start a variant's peak (not yet initialized, CUDA's counters start at zero anyway)."""
    if _cuda_in_use():
        import torch  # noqa: PLC0415

        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(backend: str) -> int | None:
    """torch's CUDA allocator peak since `_gpu_reset`, for torch variants only: it holds everything
    they allocate, and nothing of ONNX Runtime's or TensorRT's (whose rows would read ~0)."""
    if not backend.startswith("torch") or not _cuda_in_use():
        return None
    import torch  # noqa: PLC0415

    return torch.cuda.max_memory_allocated()


def _skipped_row(backend: str, gag: bool, status: str, reason: str) -> dict:
    return {"backend": backend, "gag": gag, "status": status, "reason": reason, "device": None, "timer": None,
            "step": None, "e2e": None,
            "memory": {"rss_delta_mib": None, "peak_rss_mib": None, "gpu_peak_mib": None, "gpu_used_mib": None}}


def _series(first_s: float | None, samples_s: list[float]) -> dict | None:
    if not samples_s:
        return None
    return {
        "first_call_ms": None if first_s is None else round(first_s * 1e3, 3),
        "stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summarize(samples_s).to_dict().items()},
        "samples_ms": [round(s * 1e3, 4) for s in samples_s],
    }


def _variant_row(v: Variant, p: Plan, peak: int | None) -> dict:
    e2e = _series(v.first_e2e_s, v.e2e_s)
    if e2e is not None:
        e2e["stages_ms"] = {name: round(float(np.median(vals)) * 1e3, 4) for name, vals in v.stages_s.items() if vals}
        e2e["steps"] = p.steps
    complete = len(v.step_s) > 0 and (not p.e2e or len(v.e2e_s) > 0)
    return {
        "backend": v.backend, "gag": v.gag, "status": "ok" if complete and not v.error else "failed",
        "reason": v.error, "device": v.device, "timer": v.timer.kind,
        "step": _series(v.first_step_s, v.step_s), "e2e": e2e,
        "memory": {"rss_delta_mib": _mib(v.rss_delta), "peak_rss_mib": _mib(peak),
                   "gpu_peak_mib": _mib(v.gpu_peak), "gpu_used_mib": _mib(v.gpu_used)},
    }


# --------------------------------------------------------------------------------------------
# Ratios, environment, the whole run
# --------------------------------------------------------------------------------------------


def _p50(row: dict, measure_name: str) -> float | None:
    series = row.get(measure_name)
    return None if series is None else series["stats"]["p50_ms"]


def ratios(rows: Sequence[dict], interleaved: bool, gag_split: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """(gag_overhead, speedup) rows from the result rows of one run (see the schema).

    `interleaved`: whether the backends were timed in the same rounds; `gag_split`: backends whose
    GAG and plain variants ran in separate processes (not interleaved).
    """
    by_key = {(r["backend"], r["gag"]): r for r in rows if r["status"] == "ok"}
    overhead, speedup = [], []
    for measure_name in ("step", "e2e"):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            on, off = by_key.get((backend, True)), by_key.get((backend, False))
            if on and off and _p50(on, measure_name) and _p50(off, measure_name):
                ratio = _p50(on, measure_name) / _p50(off, measure_name)
                overhead.append({
                    "backend": backend, "measure": measure_name, "ratio": round(ratio, 4),
                    "percent": round(100 * (ratio - 1), 2),
                    "paired_p50": round(paired_ratio(on[measure_name]["samples_ms"], off[measure_name]["samples_ms"]), 4),
                    "interleaved": backend not in gag_split,
                })
        for (backend, gag), row in by_key.items():
            base = by_key.get((BASELINE, gag))
            if base is None or backend == BASELINE or not _p50(row, measure_name) or not _p50(base, measure_name):
                continue
            speedup.append({
                "backend": backend, "gag": gag, "measure": measure_name, "baseline": BASELINE,
                "ratio": round(_p50(base, measure_name) / _p50(row, measure_name), 4), "interleaved": interleaved,
            })
    return overhead, speedup


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ("model name"), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(config: BenchConfig) -> dict:
    """Where the figures were measured: CPU, memory, GPU, versions, precision, threads."""
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from .engine import detect_gpu  # noqa: PLC0415
    from .export import versions  # noqa: PLC0415

    gpu = detect_gpu()
    found = versions()
    for dist in ("numpy", "psutil", "matplotlib"):
        with contextlib.suppress(Exception):
            import importlib.metadata as md  # noqa: PLC0415

            found[dist] = md.version(dist)
    from .trt_flavors import FLAVORS  # noqa: PLC0415

    for flavor in FLAVORS.values():
        with contextlib.suppress(Exception):
            found[flavor.module] = flavor.import_module().__version__
    return {
        "cpu": {"model": cpu_model(), "physical_cores": psutil.cpu_count(logical=False),
                "logical_cores": psutil.cpu_count(logical=True), "available_to_process": default_threads()},
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None if gpu is None else {"name": gpu.name, "sm": f"{gpu.sm[0]}.{gpu.sm[1]}",
                                         "memory_gib": None if gpu.memory_bytes is None else round(gpu.memory_bytes / 2**30, 1)},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": found,
        "precision": "fp32",
        "tf32": False,  # off on every backend: torch (matmuls and convolutions), ort-cuda, TensorRT's builder
        "threads": {"torch": config.cpu_threads, "ort": config.cpu_threads},
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV if os.environ.get(name) is not None},
        "load_average": load_average(),
        "torch_cuda": torch.version.cuda,
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes competing for the CPUs), where the OS has them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def graphs_used(config: BenchConfig, p: Plan) -> dict:
    """{"gag"/"no-gag": {"path", "sha256" of the denoiser graph, "exported" time}} of the cached graphs used."""
    from .export import Manifest  # noqa: PLC0415

    if not any(b in GRAPH_BACKENDS for b in config.backends):
        return {}
    used = {}
    for gag in config.gag_settings:
        graphs_dir = graphs_root(config, gag) / p.entry.name
        with contextlib.suppress(GagExportError, StopIteration):
            manifest = Manifest.load(graphs_dir)
            denoiser = next(c for c in manifest.components.values() if c["role"] == "denoiser")
            stamp = _dt.datetime.fromtimestamp(manifest.path.stat().st_mtime, _dt.timezone.utc)
            used["gag" if gag else "no-gag"] = {
                "path": str(graphs_dir), "denoiser_sha256": denoiser["sha256"], "nodes": denoiser.get("nodes"),
                "exported": stamp.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            }
    return used


def _shapes(p: Plan) -> dict:
    descriptor = next(d for d in _descriptors(p.entry) if d.role == "denoiser")
    return {
        "batch": p.shape.batch, "height": p.shape.height, "width": p.shape.width, "steps": p.steps,
        "denoiser": {name: list(dims) for name, dims in descriptor.shapes(p.shape, gag=True).items()},
    }


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """The whole benchmark: validate, export what is missing, measure, and return the JSON document."""
    notify = progress or (lambda message: None)
    p = plan(config)
    load_at_start = load_average()
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    gag_split: list[str] = []
    if config.isolate != "none":
        if needs_export(config, p):
            notify(f"exporting {p.entry.name}")
            prepare(config, p)  # the pipeline is dropped before any child starts
            gc.collect()
        children, skipped = [], []
        for backend in config.backends:
            reason = unavailable(backend)
            if reason is not None:  # no child process just to say so
                skipped += [_skipped_row(backend, gag, "skipped", reason) for gag in config.gag_settings]
            elif len(config.gag_settings) == 2 and (config.isolate == "variant" or not _variants_fit(config, p, backend)):
                gag_split.append(backend)
                children += [replace(config, backends=(backend,), gag="gag" if gag else "no-gag")
                             for gag in config.gag_settings]
            else:
                children.append(replace(config, backends=(backend,)))
        parts = [_run_child(child, notify) for child in children]
        rows = [row for part in parts for row in part["results"]] + skipped
        order = {b: i for i, b in enumerate(config.backends)}
        rows.sort(key=lambda row: (order[row["backend"]], row["gag"]))
        memory = {"method": "child-peak-rss", "pipeline_rss_mib": None,
                  "peak_rss_mib": max((part["memory"]["peak_rss_mib"] or 0 for part in parts), default=None)}
        interleaved = len(children) == 1
    else:
        pipe, pipeline_rss = None, None
        if uses_torch(config):
            notify(f"loading {p.entry.name} ({p.weights} weights)")
            pipe, pipeline_rss = load_pipeline_measured(config, p)
        if needs_export(config, p):
            notify(f"exporting {p.entry.name}")
            prepare(config, p, pipe=pipe)  # a pipeline loaded only to export is dropped here
        part = measure(config, p, pipe=pipe, pipeline_rss=pipeline_rss, progress=notify)
        rows, memory = part["results"], {"method": "rss-delta", **part["memory"]}
        interleaved = True
    overhead, speedup = ratios(rows, interleaved, gag_split)
    env = {**environment(config), "load_average_at_start": load_at_start}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": created,
        "config": {**config.to_dict(), "steps": p.steps, "height": p.shape.height, "width": p.shape.width,
                   "weights": p.weights, "e2e": p.e2e, "threads": config.cpu_threads},
        "e2e_skipped": p.e2e_skip or None,
        "environment": env,
        "shapes": _shapes(p),
        "graphs": graphs_used(config, p),
        "memory": memory,
        "results": rows,
        "gag_overhead": overhead,
        "speedup": speedup,
    }


def _variants_fit(config: BenchConfig, p: Plan, backend: str) -> bool:
    """Whether the GAG and plain ONNX Runtime sessions of `backend` fit in memory together (always
    true for torch, whose two variants share the weights, and for TensorRT, on the GPU)."""
    import psutil  # noqa: PLC0415

    from .runtime.backends import load_manifest_for  # noqa: PLC0415

    if backend != "ort" or unavailable(backend) is not None:
        return True
    try:
        need = ORT_MEMORY_FACTOR * sum(
            int(c.get("size_bytes") or 0)
            for gag in config.gag_settings
            for c in load_manifest_for(p.entry.name, graphs_root(config, gag)).components.values()
        )
    except GagExportError:
        return True  # the child reports the missing graphs
    fits = need <= psutil.virtual_memory().available
    if not fits:
        log.info("%s: GAG and plain sessions need ~%.1f GiB together: one process each", backend, need / 2**30)
    return fits


def _run_child(config: BenchConfig, notify: Callable[[str], None]) -> dict:
    """`measure` for one backend in a fresh Python process; its part of the document."""
    notify(f"{config.backends[0]} ({config.gag}): child process")
    with tempfile.TemporaryDirectory(prefix="gag-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(config.to_dict()))
        cmd = [sys.executable, "-m", "gag_export.bench", "--worker", str(config_path), str(out_path)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
            reason = f"child process exited with {proc.returncode}: {tail}"
            rows = [_skipped_row(config.backends[0], gag, "failed", reason) for gag in config.gag_settings]
            return {"results": rows, "memory": {"peak_rss_mib": None}}
        return json.loads(out_path.read_text())


def _worker(config_path: Path, out_path: Path) -> None:
    config = BenchConfig.from_dict(json.loads(Path(config_path).read_text()))
    part = measure(config, plan(config), progress=lambda message: log.info("%s", message))
    Path(out_path).write_text(json.dumps(part))


# --------------------------------------------------------------------------------------------
# Validation and output: JSON, Markdown, plot (each written atomically)
# --------------------------------------------------------------------------------------------

_REQUIRED = {
    "schema": str, "schema_version": int, "created": str, "config": dict, "environment": dict, "shapes": dict,
    "graphs": dict, "memory": dict, "results": list, "gag_overhead": list, "speedup": list,
}
_ROW_REQUIRED = {"backend": str, "gag": bool, "status": str, "reason": (str, type(None)), "step": (dict, type(None)),
                 "e2e": (dict, type(None)), "memory": dict}
_STATS_KEYS = ("n", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms")


def validate_result(doc: Mapping) -> None:
    """Raise InvalidInputError naming the first key that does not follow the schema."""
    def need(mapping, key, kinds, where):
        if key not in mapping:
            raise InvalidInputError(f"bench result: {where} has no {key!r}")
        if not isinstance(mapping[key], kinds) or (kinds is int and isinstance(mapping[key], bool)):
            raise InvalidInputError(f"bench result: {where}.{key} is {type(mapping[key]).__name__}")

    for key, kinds in _REQUIRED.items():
        need(doc, key, kinds, "document")
    if doc["schema"] != SCHEMA or doc["schema_version"] != SCHEMA_VERSION:
        raise InvalidInputError(f"bench result: not a {SCHEMA} v{SCHEMA_VERSION} document")
    for key in ("cpu", "versions", "precision", "threads"):
        need(doc["environment"], key, (dict, str), "environment")
    for i, row in enumerate(doc["results"]):
        for key, kinds in _ROW_REQUIRED.items():
            need(row, key, kinds, f"results[{i}]")
        if row["status"] not in ("ok", "skipped", "failed"):
            raise InvalidInputError(f"bench result: results[{i}].status is {row['status']!r}")
        for measure_name in ("step", "e2e"):
            series = row[measure_name]
            if series is None:
                continue
            need(series, "stats", dict, f"results[{i}].{measure_name}")
            need(series, "samples_ms", list, f"results[{i}].{measure_name}")
            for key in _STATS_KEYS:
                need(series["stats"], key, int if key == "n" else (int, float), f"results[{i}].{measure_name}.stats")
    for name in ("gag_overhead", "speedup"):
        for i, row in enumerate(doc[name]):
            for key, kinds in (("backend", str), ("measure", str), ("ratio", (int, float)), ("interleaved", bool)):
                need(row, key, kinds, f"{name}[{i}]")


@contextlib.contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    """A temp file beside `dest`, moved onto it when the block succeeds (removed otherwise).

    A path that cannot be written (its folder is a file, no permission, a read-only or full disk)
    is an ArtifactError or ResourceExhaustedError naming `dest`, not an internal error.
    """
    dest = Path(dest)
    with _writing(dest):
        tmp = _temp_beside(dest)
    try:
        with _writing(dest):
            yield tmp
            os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_writable(dest: Path) -> None:
    """Fail now, not after a long run, when `dest` cannot be written (its folder is created)."""
    dest = Path(dest)
    with _writing(dest):
        if dest.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(dest))
        _temp_beside(dest).unlink()


def _temp_beside(dest: Path) -> Path:
    """An empty temp file in `dest`'s folder (created if missing): same file system, so os.replace is atomic."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return as_if_created_plainly(Path(tmp))


@contextlib.contextmanager
def _writing(dest: Path) -> Iterator[None]:
    """OSError while writing `dest` as the documented errors: out of disk 7, anything else 5."""
    try:
        yield
    except OSError as exc:
        raise write_failure(exc, dest) from exc


def write_json(doc: Mapping, dest: Path) -> Path:
    validate_result(doc)
    with _atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return Path(dest)


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ms_digits(rows: Sequence[dict], measure_name: str) -> int:
    values = [r[measure_name]["stats"]["p50_ms"] for r in rows if r.get(measure_name)]
    return 2 if values and min(values) < 10 else 1 if values and min(values) < 1000 else 0


def environment_line(doc: Mapping) -> str:
    env, cfg = doc["environment"], doc["config"]
    gpu = env.get("gpu")
    where = (f"{env['cpu']['model']}, {env['cpu']['available_to_process']} CPUs, {env['memory_gib']:g} GiB"
             + (f", GPU {gpu['name']}" if gpu else ", no GPU"))
    versions = env["versions"]
    return (f"{cfg['model']} ({cfg['weights']} weights), {cfg['batch']}x{cfg['height']}x{cfg['width']}, "
            f"{cfg['steps']} steps, {env['precision']}; {cfg['warmup']} warm-up + {cfg['iters']} timed rounds, "
            f"{env['threads']['torch']} threads; {where}; torch {versions.get('torch')}, "
            f"onnxruntime {versions.get('onnxruntime')}")


def render_markdown(doc: Mapping) -> str:
    """Markdown: the run's line, a latency table (step and e2e), GAG overhead and speed-ups."""
    rows = doc["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    speed = {(s["backend"], s["gag"], s["measure"]): s["ratio"] for s in doc["speedup"]}
    sd, ed = _ms_digits(ok, "step"), _ms_digits(ok, "e2e")
    isolated = doc["memory"].get("method") == "child-peak-rss"
    mem_header = "peak RSS MiB" if isolated else "RSS + MiB"
    # torch's CUDA allocator peak (torch rows only: see the module doc) where any row has it
    cuda_mem = any(r["memory"].get("gpu_peak_mib") is not None for r in ok)
    lines = [f"_{environment_line(doc)}_", "",
             f"| backend | GAG | device | step p50 ms | step mean ± std | p90 | p99 | min | vs eager | e2e p50 ms | e2e mean ± std "
             f"| e2e vs eager | first call ms | {mem_header} |" + (" torch CUDA peak MiB |" if cuda_mem else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda_mem else "")]
    for r in rows:
        gag = "on" if r["gag"] else "off"
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {gag} | - | {r['status']}: {r['reason']} | | | | | | | | | | |" + (" |" if cuda_mem else ""))
            continue
        st = r["step"]["stats"]
        e2e = r["e2e"]["stats"] if r["e2e"] else None
        up = speed.get((r["backend"], r["gag"], "step"))
        eup = speed.get((r["backend"], r["gag"], "e2e"))
        mem = r["memory"]["peak_rss_mib"] if isolated else r["memory"]["rss_delta_mib"]
        lines.append(
            f"| {r['backend']} | {gag} | {r.get('device') or '-'} | {_fmt(st['p50_ms'], sd)} | {_fmt(st['mean_ms'], sd)} ± {_fmt(st['std_ms'], sd)} "
            f"| {_fmt(st['p90_ms'], sd)} | {_fmt(st['p99_ms'], sd)} | {_fmt(st['min_ms'], sd)} "
            f"| {'1.00x (baseline)' if r['backend'] == BASELINE else (f'{up:.2f}x' if up else '-')} "
            f"| {_fmt(e2e['p50_ms'], ed) if e2e else '-'} "
            f"| {(_fmt(e2e['mean_ms'], ed) + ' ± ' + _fmt(e2e['std_ms'], ed)) if e2e else '-'} "
            f"| {'1.00x' if e2e and r['backend'] == BASELINE else (f'{eup:.2f}x' if eup else '-')} "
            f"| {_fmt(r['step']['first_call_ms'], 0)} | {_fmt(mem, 0)} |"
            + (f" {_fmt(r['memory'].get('gpu_peak_mib'), 0)} |" if cuda_mem else "")
        )
    if doc["gag_overhead"]:
        lines += ["", "| backend | measure | GAG / plain (p50) | overhead | paired per-round median |",
                  "|---|---|---:|---:|---:|"]
        for o in doc["gag_overhead"]:
            lines.append(f"| {o['backend']} | {o['measure']} | {o['ratio']:.3f} | {o['percent']:+.1f}% | {o['paired_p50']:.3f} |")
    notes = []
    if doc.get("e2e_skipped"):
        notes.append(f"e2e not measured: {doc['e2e_skipped']}.")
    split = sorted({o["backend"] for o in doc["gag_overhead"] if not o["interleaved"]})
    if isolated and doc["config"].get("isolate") == "variant":
        notes.append("Each backend and GAG setting ran in its own process (peak RSS is that process's); speed-ups and "
                     "GAG overheads compare processes run one after the other.")
    elif isolated:
        notes.append("Each backend ran in its own process (peak RSS is that process's); speed-ups compare processes "
                     "run one after the other, GAG on/off were interleaved inside each"
                     + (f" except for {', '.join(split)}, whose GAG and plain variants did not fit in memory together "
                        "and ran in processes of their own" if split else "") + ".")
    else:
        notes.append("All variants ran interleaved in one process; 'RSS +' is the RSS growth while loading a variant "
                     "and running it once (the torch pipeline's weights, loaded once for all torch variants, are not in it).")
    lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_markdown(doc: Mapping, dest: Path) -> Path:
    with _atomic_path(dest) as tmp:
        tmp.write_text(render_markdown(doc))
    return Path(dest)


def write_plot(doc: Mapping, dest: Path) -> Path:
    """A PNG: p50 latency per backend (bars: GAG off / on; whiskers: p10..p90 of the samples)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in doc["results"] if r["status"] == "ok"]
    measures = [m for m in ("step", "e2e") if any(r[m] for r in rows)]
    backends = list(dict.fromkeys(r["backend"] for r in doc["results"]))
    fig, axes = plt.subplots(1, max(1, len(measures)), figsize=(5.5 * max(1, len(measures)), 4.2), squeeze=False)
    width = 0.38
    for ax, measure_name in zip(axes[0], measures or ["step"]):
        for j, gag in enumerate((False, True)):
            xs, heights, lo, hi = [], [], [], []
            for i, backend in enumerate(backends):
                row = next((r for r in rows if r["backend"] == backend and r["gag"] == gag and r[measure_name]), None)
                if row is None:
                    continue
                samples = np.asarray(row[measure_name]["samples_ms"])
                p50 = row[measure_name]["stats"]["p50_ms"]
                xs.append(i + (j - 0.5) * width)
                heights.append(p50)
                lo.append(p50 - np.percentile(samples, 10))
                hi.append(np.percentile(samples, 90) - p50)
            if xs:
                ax.bar(xs, heights, width, yerr=[lo, hi], capsize=3, label=f"GAG {'on' if gag else 'off'}",
                       color="#d95f02" if gag else "#7570b3")
        plotted = [r[measure_name]["stats"]["p50_ms"] for r in rows if r[measure_name]]
        if plotted and max(plotted) > 30 * min(plotted):
            ax.set_yscale("log")
        for i, backend in enumerate(backends):
            if not any(r["backend"] == backend and r[measure_name] for r in rows):
                status = next(r["status"] for r in doc["results"] if r["backend"] == backend)
                ax.text(i, 0.5, "not measured" if status == "ok" else status, transform=ax.get_xaxis_transform(),
                        ha="center", va="center", color="grey", rotation=90)
        ax.set_xticks(range(len(backends)), backends)
        ax.set_xlim(-0.6, len(backends) - 0.4)
        ax.set_ylabel(f"{measure_name} latency, p50 (ms)")
        ax.set_title("denoiser step" if measure_name == "step" else f"end to end ({doc['config']['steps']} steps)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    cfg, env = doc["config"], doc["environment"]
    fig.suptitle(f"{cfg['model']} {cfg['height']}x{cfg['width']} - {env['cpu']['model']}, "
                 f"{env['cpu']['available_to_process']} CPUs" + (f", {env['gpu']['name']}" if env.get("gpu") else ""),
                 fontsize=10)
    fig.tight_layout()
    with _atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(dest)


if __name__ == "__main__":  # the child process of isolate="backend"/"variant"
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        _worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python -m gag_export.bench --worker CONFIG.json OUT.json (use `gag-export bench`)")
