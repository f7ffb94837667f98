"""A backend with or without GAG, loaded and ready to call; calling them interleaved, round by round."""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ...core.errors import GagExportError
from .config import IMG2IMG_STRENGTH, SAMPLER_STAGES, BenchConfig, Plan, Skip
from .graphs import (
    check_memory_for_graphs,
    descriptors_of,
    graphs_root,
    load_bench_pipeline,
    unavailable,
)
from .probes import rss_bytes
from .timing import Timer, timer_for

log = logging.getLogger(__name__)




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
    stages_s: dict = field(default_factory=lambda: {s: [] for s in SAMPLER_STAGES})
    error: str = ""
    _last_timings: Any = None
    img2img_request: Any = None  # runtime.GenerationConfig with the input image (`--img2img`)
    first_img2img_s: float | None = None
    img2img_s: list = field(default_factory=list)
    img2img_steps: int | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{'gag' if self.gag else 'no-gag'}"

    def step(self) -> None:
        self.sampler.components.denoiser.infer(self.step_feed)

    def e2e(self) -> None:
        result = self.sampler.generate(self.request)
        self._last_timings = result.timings

    def img2img(self) -> None:
        result = self.sampler.generate(self.img2img_request)
        self.img2img_steps = len(result.timings.denoise)

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
    from ...core.gag_config import DEFAULT_EXPORT_GAG  # noqa: PLC0415
    from ...gag.attention import apply_gag, is_gag_applied  # noqa: PLC0415
    from ...runtime.components import ComponentSet
    from ...runtime.torch_backend import TorchComponent, torch_runtime_gag  # noqa: PLC0415

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
    for descriptor in descriptors_of(p.entry, view, img2img=p.img2img):
        if p.components and descriptor.name not in p.components:
            continue
        has_gag = gag and descriptor.role == "denoiser"
        components[descriptor.name] = TorchComponent(
            descriptor.name, descriptor.role, descriptor.inputs(dtype, has_gag), descriptor.outputs(dtype, has_gag),
            module=descriptor.export_module(view), device=device, compile=compile,
        )
    return ComponentSet(p.entry.name, "torch", components, pipe=view, gag=torch_runtime_gag(DEFAULT_EXPORT_GAG) if gag else None)


def load_variant(config: BenchConfig, p: Plan, backend: str, gag: bool, pipe=None) -> Variant:
    """Load and activate one variant; `Skip` when its backend cannot run here."""
    from ...core.errors import MissingDependencyError  # noqa: PLC0415
    from ...runtime import BackendOptions, GenerationConfig, Sampler, SamplerAssets  # noqa: PLC0415
    from ..artifacts import ensure_engines  # noqa: PLC0415

    options = BackendOptions(threads=config.cpu_threads, compile=backend == "torch-compile")
    reason = unavailable(backend)
    if reason is not None:
        raise Skip(reason)
    try:
        if backend in ("torch", "torch-compile"):
            device = str(options.torch_device())
            components = torch_components(p, pipe, gag, options.compile, device)
            sampler = Sampler(p.entry, components, SamplerAssets.from_pipeline(pipe),
                              {d.name: d for d in descriptors_of(p.entry, components.pipe, img2img=p.img2img)})
        else:
            if backend == "ort":
                check_memory_for_graphs(config, p, gag)
            else:
                ensure_engines(p.entry.name, backend, graphs_root(config, gag), config.engines)  # the one copy
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
        feed.update(sampler.gag_feed(gag_values))  # shaped as the graph declares them (per-layer: [L])
    request = GenerationConfig(config.prompt, seed=config.seed, steps=p.steps, height=p.shape.height,
                               width=p.shape.width, gag=gag_values)
    variant = Variant(backend, gag, sampler, feed, request, timer_for(device), device)
    if p.img2img:
        variant.img2img_request = GenerationConfig(config.prompt, seed=config.seed, steps=p.steps, gag=gag_values,
                                                   image=input_image(p.shape), strength=IMG2IMG_STRENGTH)
    return variant


def input_image(shape):
    """The `--img2img` rows' fixed input: a uint8 [H, W, 3] gradient at the run's size (no file, no seed)."""
    import numpy as np  # noqa: PLC0415

    y, x = np.mgrid[0:shape.height, 0:shape.width]
    rgb = np.stack([x * 255 // max(1, shape.width - 1), y * 255 // max(1, shape.height - 1),
                    (x + y) * 127 // max(1, shape.height + shape.width - 2)], axis=-1)
    return rgb.astype(np.uint8)


def _ort_device(sampler) -> str:
    sessions = [c.session for c in sampler.components if getattr(c, "session", None) is not None]
    uses_cuda = any(s.get_providers()[0] != "CPUExecutionProvider" for s in sessions)
    return "cuda" if uses_cuda else "cpu"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
                getattr(variant, f"{call}_s").append(seconds)
                if call == "e2e":
                    variant.record_stages()
        if on_round is not None:
            on_round(r + 1, total)


def activate_and_first_call(variant: Variant, call: str) -> None:
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
    setattr(variant, f"first_{call}_s", seconds)


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
