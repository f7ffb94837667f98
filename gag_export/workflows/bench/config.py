"""What a benchmark run is asked for (`BenchConfig`) and what it resolves to for its model (`Plan`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...core.errors import InvalidInputError
from ...core.shapes import check_prompt

SCHEMA = "gag-export-bench"


SCHEMA_VERSION = 1


BENCH_BACKENDS = ("torch", "torch-compile", "ort", "tensorrt", "tensorrt-rtx")


GRAPH_BACKENDS = ("ort", "tensorrt", "tensorrt-rtx")  # the backends that run exported graphs


GAG_MODES = {"gag": (True,), "no-gag": (False,), "both": (False, True)}


ISOLATE_MODES = ("none", "backend", "variant")


WEIGHTS = ("tiny", "random", "pretrained")


BASELINE = "torch"


BENCH_PROMPT = "a photo of a cat sitting on a wooden table"


DEFAULT_GRAPHS = Path("graphs") / "bench"


SAMPLER_STAGES = ("text_encode", "denoise", "vae_decode")


IMG2IMG_STRENGTH = 0.5  # `--img2img` rows: half the schedule on a fixed generated input image


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
    prompt: str = BENCH_PROMPT
    graphs: Path = DEFAULT_GRAPHS
    engines: Path = Path("engines")
    reexport: bool = False
    img2img: bool = False  # also time image-to-image generations (exports with the VAE encoder)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", parse_backends(self.backends))
        object.__setattr__(self, "graphs", Path(self.graphs))
        object.__setattr__(self, "engines", Path(self.engines))
        check_prompt(self.prompt)
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
        from ...core.shapes import require_positive_int  # noqa: PLC0415 (torch only once a config is made)

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
    img2img: bool = False  # img2img generations timed too (e2e only; the graphs carry the VAE encoder)

    @property
    def components(self) -> tuple[str, ...]:
        """Components to export/load: all for e2e, the denoiser alone for step-only runs."""
        return () if self.e2e else (("unet",) if self.entry.family == "sdxl" else ("transformer",))


def plan(config: BenchConfig) -> Plan:
    """Validate the config against its model before anything heavy (InvalidInputError)."""
    from ...models import ImageShape, descriptors_for, get_entry  # noqa: PLC0415

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
    if config.img2img and not e2e:
        raise InvalidInputError(f"--img2img times whole generations: it needs --e2e at --batch 1 ({skip})")
    if config.img2img and int(steps * IMG2IMG_STRENGTH) < 1 and entry.family == "sdxl":
        raise InvalidInputError(f"--img2img runs at strength {IMG2IMG_STRENGTH}: {steps} step(s) leave none; use more --steps")
    return Plan(entry, shape, steps, weights, e2e, skip, config.img2img)


class Skip(Exception):
    """A variant that cannot run here; its message is the reason reported."""
