"""The benchmark's results as typed classes: what `run_bench` returns and what the JSON file holds.

`to_dict()` is the JSON document (schema `gag-export.bench`, unchanged); `BenchResult.from_dict`
reads one back and is its validation: a missing key or a value of the wrong type is an
`InvalidInputError` naming where it is (`results[1].step.stats.p99_ms`), decided by the field
types below rather than by a second, hand-kept list of keys.

The run's surroundings (`config`, `environment`, `shapes`, `graphs`, `memory`) stay mappings: they
describe the machine and the files, are only printed, and vary with what was installed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from ...core.errors import InvalidInputError
from .config import SCHEMA, SCHEMA_VERSION
from .timing import LatencyStats

STATUSES = ("ok", "skipped", "failed")
MEASURES = ("step", "e2e", "img2img")  # img2img: whole image-to-image generations (`--img2img`)
# The environment keys the report prints.
ENVIRONMENT_KEYS = ("cpu", "versions", "precision", "threads")


@dataclass(frozen=True)
class Series:
    """One variant's timings of one measure: the first (untimed) call, the summary, every sample."""

    first_call_ms: float | None
    stats: LatencyStats
    samples_ms: tuple[float, ...]
    stages_ms: dict[str, float] | None = None  # e2e: median per stage (text encode, denoise, VAE decode)
    steps: int | None = None  # e2e: denoising steps per generation


@dataclass(frozen=True)
class RowMemory:
    rss_delta_mib: float | None = None  # growth while loading the variant and running it once (one process)
    peak_rss_mib: float | None = None  # the process's peak (a child process per backend or variant)
    gpu_peak_mib: float | None = None  # torch's CUDA allocator peak (torch rows only)
    gpu_used_mib: float | None = None  # the driver's used memory after the first call


@dataclass(frozen=True)
class ResultRow:
    """One backend with GAG on or off: measured ("ok"), or why not ("skipped", "failed")."""

    backend: str
    gag: bool
    status: str
    reason: str | None = None
    device: str | None = None
    timer: str | None = None
    step: Series | None = None
    e2e: Series | None = None
    memory: RowMemory = field(default_factory=RowMemory)
    load_average_after: tuple[float, ...] | None = None
    img2img: Series | None = None  # `--img2img`: e2e from a fixed input image (steps: those the strength leaves)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidInputError(f"status is {self.status!r}, not one of {', '.join(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def series(self, measure: str) -> Series | None:
        return {"step": self.step, "e2e": self.e2e, "img2img": self.img2img}[measure]

    def p50(self, measure: str) -> float | None:
        series = self.series(measure)
        return None if series is None else series.stats.p50_ms


@dataclass(frozen=True)
class GagOverhead:
    """GAG on / off of one backend and measure (p50s), and the median of per-round ratios."""

    backend: str
    measure: str
    ratio: float
    percent: float
    paired_p50: float
    interleaved: bool


@dataclass(frozen=True)
class Speedup:
    """The eager PyTorch baseline's p50 / a backend's p50, GAG setting and measure alike."""

    backend: str
    gag: bool
    measure: str
    baseline: str
    ratio: float
    interleaved: bool


@dataclass(frozen=True)
class BenchResult:
    created: str
    config: dict[str, Any]
    environment: dict[str, Any]
    shapes: dict[str, Any]
    graphs: dict[str, Any]
    memory: dict[str, Any]
    results: tuple[ResultRow, ...]
    gag_overhead: tuple[GagOverhead, ...]
    speedup: tuple[Speedup, ...]
    e2e_skipped: str | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema != SCHEMA or self.schema_version != SCHEMA_VERSION:
            raise InvalidInputError(f"not a {SCHEMA} v{SCHEMA_VERSION} document")
        missing = [key for key in ENVIRONMENT_KEYS if key not in self.environment]
        if missing:
            raise InvalidInputError(f"environment has no {missing[0]!r}")

    @property
    def measured(self) -> list[ResultRow]:
        return [row for row in self.results if row.ok]

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, doc: Mapping) -> "BenchResult":
        """Read a JSON document back; `InvalidInputError("bench result: <where> ...")` when it does not fit."""
        return _typed(cls, doc, "document")


@dataclass(frozen=True)
class RunPart:
    """What one process measured: its rows and its memory figures (a child process sends it as JSON)."""

    results: tuple[ResultRow, ...]
    memory: dict[str, Any]

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, doc: Mapping) -> "RunPart":
        return _typed(cls, doc, "part")


def _plain(value):
    """Dataclasses as dicts and tuples as lists, all the way down (the JSON document)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _fail(where: str, message: str) -> InvalidInputError:
    return InvalidInputError(f"bench result: {where} {message}")


def _typed(kind, value, where: str):
    """`value` (parsed JSON) as `kind`, a type hint of the classes above, checked on the way."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(inner, value, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise _fail(where, f"is {type(value).__name__}, not an object")
        hints = typing.get_type_hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                values[f.name] = _typed(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(where, f"has no {f.name!r}")
        try:
            return kind(**values)
        except InvalidInputError as exc:
            raise _fail(where, str(exc)) from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, f"is {type(value).__name__}, not a list")
        return tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise _fail(where, f"is {type(value).__name__}, not an object")
        return dict(value)
    if kind is Any:
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, f"is {type(value).__name__}, not a number")
        return float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _fail(where, f"is {type(value).__name__}, not {kind.__name__}")
    return value


__all__ = ["ENVIRONMENT_KEYS", "MEASURES", "STATUSES", "BenchResult", "GagOverhead", "ResultRow", "RowMemory", "RunPart",
           "Series", "Speedup"]
