"""TensorRT and TensorRT-RTX: the two NVIDIA engine builders gag-export drives, what differs between
them, and what the installed version can do.

Every difference between them is a field of `TensorRTFlavor`, decided here; the engine builder,
the check, the runtime and the CLI ask a flavor instead of branching on its name.

- TensorRT (`tensorrt`, 10.x/11.x): data centre GPUs and Jetson. An engine is built on the GPU that
  runs it, with timed tactics, for that GPU model and TensorRT version only.
- TensorRT for RTX (`tensorrt_rtx`, 1.x): RTX PCs and workstations (Ampere and newer). The engine is
  built ahead of time (AOT), on any machine, CPU-only included, for a list of compute capabilities
  (sm80, sm86, sm89, sm120, ...; not sm90: Hopper is no TensorRT-RTX target), and specialised for
  the GPU at run time by a JIT whose results a runtime cache keeps between processes. Networks
  are always strongly typed; there are no precision flags and no timing cache.

Polygraphy drives both builds (`POLYGRAPHY_USE_TENSORRT_RTX`); `engine.plans.use_in_polygraphy`
points it at one flavor. This module imports neither Polygraphy nor a TensorRT module until asked.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
from dataclasses import dataclass

from .errors import InvalidInputError, MissingDependencyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRTFlavor:
    """One NVIDIA builder and runtime, as gag-export uses it."""

    name: str  # the CLI's --backend value
    label: str  # for messages
    module: str  # its Python import name
    file_tag: str  # engine file names: <sha12>-<file_tag><version>-sm..-<precision>-<settings>.plan
    install: str  # how to get it
    ahead_of_time: bool  # builds for named compute capabilities without a GPU (TensorRT-RTX)
    runtime_cache: bool  # JIT results kept in a runtime cache beside the engine (TensorRT-RTX)
    min_major: int  # oldest supported major version
    max_major: int  # newest supported major version
    gpus: str  # which GPUs run its engines (for errors)

    def import_module(self):
        """Import and return the builder's module, or raise `MissingDependencyError` saying how to get it."""
        try:
            return importlib.import_module(self.module)
        except Exception as exc:  # ImportError, or OSError/RuntimeError when its CUDA libraries are missing
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MissingDependencyError(
                f"{self.label} is not available here (`import {self.module}` failed: {reason}); "
                f"install it with `{self.install}`"
            ) from exc

    def is_installed(self) -> bool:
        try:
            self.import_module()
        except MissingDependencyError:
            return False
        return True

    def check_version(self, version: str) -> tuple[int, int]:
        """(major, minor) of an installed version, or `MissingDependencyError` when it is not supported."""
        match = re.match(r"^(\d+)\.(\d+)", version)
        if not match:
            raise InvalidInputError(f"cannot read a {self.label} version from {version!r}")
        major, minor = int(match.group(1)), int(match.group(2))
        if not self.min_major <= major <= self.max_major:
            supported = f"{self.min_major}.x" if self.min_major == self.max_major else f"{self.min_major}.x or {self.max_major}.x"
            age = "too old" if major < self.min_major else "newer than this gag-export knows"
            raise MissingDependencyError(
                f"{self.label} {version} is {age}: gag-export needs {self.label} {supported} (`{self.install}`)"
            )
        return major, minor

    def compute_capabilities(self, trt) -> tuple[tuple[int, int], ...]:
        """The compute capabilities an ahead-of-time build can target, from the module's own enum."""
        if not self.ahead_of_time:
            return ()
        found = []
        for name in dir(trt.ComputeCapability):
            match = re.fullmatch(r"SM(\d+)(\d)", name)
            if match:
                found.append((int(match.group(1)), int(match.group(2))))
        return tuple(sorted(found))

    def default_targets(self, trt) -> tuple[tuple[int, int], ...]:
        """Every target the module offers but Turing (sm75), which TensorRT-RTX makes opt-in (no bf16)."""
        return tuple(c for c in self.compute_capabilities(trt) if c >= (8, 0))


TENSORRT = TensorRTFlavor(
    name="tensorrt", label="TensorRT", module="tensorrt", file_tag="trt",
    install='pip install "gag-export[tensorrt]"  (on a machine with an NVIDIA GPU and CUDA)',
    ahead_of_time=False, runtime_cache=False, min_major=10, max_major=11,
    gpus="the NVIDIA GPU model it was built on",
)
TENSORRT_RTX = TensorRTFlavor(
    name="tensorrt-rtx", label="TensorRT-RTX", module="tensorrt_rtx", file_tag="rtx",
    install='pip install "gag-export[tensorrt-rtx]"',
    ahead_of_time=True, runtime_cache=True, min_major=1, max_major=1,
    gpus="an NVIDIA RTX GPU (Ampere or newer: sm80, sm86, sm89, sm120) with its driver",
)
FLAVORS: dict[str, TensorRTFlavor] = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}


def get_flavor(name: str | TensorRTFlavor) -> TensorRTFlavor:
    """The flavor named `name` ("tensorrt" or "tensorrt-rtx"), or `InvalidInputError` listing them."""
    if isinstance(name, TensorRTFlavor):
        return name
    try:
        return FLAVORS[str(name).strip().lower()]
    except KeyError:
        raise InvalidInputError(f"unknown TensorRT backend {name!r}: use one of {', '.join(FLAVORS)}") from None


def installed_flavor(preferred: tuple[TensorRTFlavor, ...] = (TENSORRT, TENSORRT_RTX)) -> TensorRTFlavor | None:
    """The first of `preferred` that imports here (TensorRT before TensorRT-RTX), or None."""
    return next((f for f in preferred if f.is_installed()), None)


def parse_targets(text: str | None, flavor: TensorRTFlavor, trt) -> tuple[tuple[int, int], ...]:
    """`sm80,sm86` (or `8.0,86`) -> ((8, 0), (8, 6)), checked against what the installed module offers;
    None or "" -> the flavor's default targets. InvalidInputError for a target it cannot build."""
    offered = flavor.compute_capabilities(trt)
    if not text:
        return flavor.default_targets(trt)
    if not flavor.ahead_of_time:
        raise InvalidInputError(f"--target is for TensorRT-RTX; {flavor.label} builds for the GPU it runs on")
    targets = []
    for item in str(text).split(","):
        digits = re.sub(r"^sm_?", "", item.strip().lower()).replace(".", "")
        if not re.fullmatch(r"\d{2,3}", digits):
            raise InvalidInputError(f"--target: {item.strip()!r} is not a compute capability like sm86")
        cap = (int(digits[:-1]), int(digits[-1]))
        if cap not in offered:
            names = ", ".join(f"sm{a}{b}" for a, b in offered)
            hopper = " (Hopper, sm90, is no TensorRT-RTX target: use --backend tensorrt there)" if cap[0] == 9 else ""
            raise InvalidInputError(f"--target: {flavor.label} cannot build for sm{cap[0]}{cap[1]}{hopper}; it offers {names}")
        if cap not in targets:
            targets.append(cap)
    return tuple(sorted(targets))


def sm_tag(capabilities) -> str:
    """`sm89`, or `sm80_86_89_120` for several: the engine file name's GPU part (no dashes)."""
    return "sm" + "_".join(f"{a}{b}" for a, b in capabilities)


def parse_sm_tag(tag: str) -> tuple[tuple[int, int], ...]:
    """The inverse of `sm_tag` (an empty tuple for anything else)."""
    if not re.fullmatch(r"sm\d{2,3}(_\d{2,3})*", tag):
        return ()
    return tuple((int(p[:-1]), int(p[-1])) for p in tag[2:].split("_"))


def import_tensorrt(flavor: TensorRTFlavor | str = TENSORRT):
    """Import and return the `tensorrt` (or `tensorrt_rtx`) module, or raise `MissingDependencyError` saying how to get it."""
    return get_flavor(flavor).import_module()


@dataclass(frozen=True)
class TensorRTCapabilities:
    """What the installed builder can do, decided from its flavor and version in one place.

    TensorRT 10.x: strongly typed networks on request (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`),
          and the deprecated (since 10.12) weak-typing flags `BuilderFlag.FP16/BF16` with precision
          constraints.
    TensorRT 11.x: every network is strongly typed (the flag is accepted but ignored); weak-typing
          flags, precision constraints and implicit INT8/FP8 are removed.
    TensorRT-RTX 1.x: strongly typed only, no precision flags, builds ahead of time for named
          compute capabilities.
    """

    version: str
    major: int
    minor: int
    weak_typing: bool  # BuilderFlag.FP16/BF16 + OBEY_PRECISION_CONSTRAINTS exist
    strongly_typed_flag: bool  # pass STRONGLY_TYPED when creating the network
    flavor: str = TENSORRT.name

    @property
    def trt_flavor(self) -> TensorRTFlavor:
        return get_flavor(self.flavor)

    @property
    def label(self) -> str:
        return f"{self.trt_flavor.label} {self.version}"

    @classmethod
    def from_version(cls, version: str, *, strongly_typed_flag: bool = True,
                     flavor: TensorRTFlavor | str = TENSORRT) -> "TensorRTCapabilities":
        flavor = get_flavor(flavor)
        major, minor = flavor.check_version(version)
        return cls(
            version=version,
            major=major,
            minor=minor,
            weak_typing=flavor is TENSORRT and major < 11,
            strongly_typed_flag=strongly_typed_flag,
            flavor=flavor.name,
        )

    @classmethod
    def from_module(cls, trt, flavor: TensorRTFlavor | str = TENSORRT) -> "TensorRTCapabilities":
        caps = cls.from_version(
            trt.__version__,
            strongly_typed_flag=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
            flavor=flavor,
        )
        # Trust the module over the version number: a 10.x build without the flags is 11-like.
        return dataclasses.replace(caps, weak_typing=caps.weak_typing and hasattr(trt.BuilderFlag, "FP16"))


def trt_features(flavor: TensorRTFlavor | str = TENSORRT) -> TensorRTCapabilities:
    """The capabilities of the importable TensorRT or TensorRT-RTX (`MissingDependencyError` without it)."""
    return TensorRTCapabilities.from_module(import_tensorrt(flavor), flavor)


TENSORRT_INSTALL = 'pip install "gag-export[tensorrt]"'  # the command alone, for doctor's table

__all__ = [
    "FLAVORS", "TENSORRT", "TENSORRT_INSTALL", "TENSORRT_RTX", "TensorRTCapabilities", "TensorRTFlavor", "get_flavor",
    "import_tensorrt", "installed_flavor", "parse_sm_tag", "parse_targets", "sm_tag", "trt_features",
]
