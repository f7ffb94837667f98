"""What `gag-export engine` was asked for, and the engine precision it resolves to."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InvalidInputError
from ..core.precision import Precision
from ..core.tensorrt import TENSORRT, TensorRTCapabilities, get_flavor


class ShapeMode(str, enum.Enum):
    MANIFEST = "manifest"  # the manifest's profile as it is
    STATIC = "static"  # every input fixed at its `opt` shape
    DYNAMIC = "dynamic"  # the manifest's min/opt/max ranges; refused for a static graph


@dataclass(frozen=True)
class EngineOptions:
    """What `gag-export engine` was asked for. Validated on construction."""

    backend: str = TENSORRT.name  # "tensorrt" or "tensorrt-rtx" (core.tensorrt.FLAVORS)
    targets: str | None = None  # TensorRT-RTX: compute capabilities, "sm80,sm86"; None: every default one
    precision: Precision | None = None  # None: the exported graph's dtype
    shapes: ShapeMode = ShapeMode.MANIFEST
    weakly_typed: bool = False  # TensorRT 10.x only: fp32 graph + BuilderFlag.FP16/BF16
    opt_level: int | None = None  # builder optimization level 0-5; None: TensorRT's default (3)
    workspace_gb: float | None = None  # workspace memory pool limit; None: TensorRT's default
    timing_cache: Path | None = None  # None: <out>/timing/trt<version>-sm<XY>.cache
    rebuild: bool = False
    components: tuple[str, ...] = ()  # empty: every component in the manifest
    refittable: bool = False  # BuilderFlag.REFIT: `gag-export lora` refits a copy instead of rebuilding

    def __post_init__(self) -> None:
        flavor = get_flavor(self.backend)  # InvalidInputError for an unknown one
        object.__setattr__(self, "backend", flavor.name)
        if self.targets and not flavor.ahead_of_time:
            raise InvalidInputError(f"--target is for TensorRT-RTX; {flavor.label} builds for the GPU it runs on")
        if self.timing_cache is not None and flavor.ahead_of_time:
            raise InvalidInputError(f"--timing-cache: {flavor.label} builds ahead of time and times no tactics; drop it")
        # accept the CLI's strings; keep the enums inside
        if self.precision is not None:
            object.__setattr__(self, "precision", Precision.parse(self.precision, engine=True))
        if not isinstance(self.shapes, ShapeMode):
            object.__setattr__(self, "shapes", ShapeMode(self.shapes))
        object.__setattr__(self, "components", tuple(self.components))
        if self.precision is Precision.FP8:
            raise InvalidInputError(
                "--precision fp8 is not supported yet: FP8 engines need explicit quantization "
                "(Q/DQ nodes from NVIDIA ModelOpt, `nvidia-modelopt`), which gag-export does not insert yet. "
                "Build an fp16 or bf16 engine from an fp16/bf16 export instead."
            )
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise InvalidInputError(f"--opt-level must be between 0 and 5, not {self.opt_level}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise InvalidInputError(f"--workspace must be a positive number of GB, not {self.workspace_gb}")
        if self.weakly_typed and self.precision not in (Precision.FP16, Precision.BF16):
            raise InvalidInputError(
                "--weakly-typed builds an fp32 graph as an fp16 or bf16 engine: give --precision fp16 or bf16 with it"
            )

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * (1 << 30))


@dataclass(frozen=True)
class PrecisionPlan:
    """The engine precision and how TensorRT gets there."""

    precision: Precision
    strongly_typed: bool  # False only for the TensorRT 10.x FP16/BF16-flag path


def resolve_precision(
    graph_dtype: str, requested: Precision | None, caps: TensorRTCapabilities, *, weakly_typed: bool, graphs_dir: Path
) -> PrecisionPlan:
    """Check the requested engine precision against the exported graph's dtype."""
    graph = Precision.parse(graph_dtype)  # a graph's: fp32, fp16 or bf16
    wanted = graph if requested is None else requested
    if wanted is Precision.FP8:  # EngineOptions refuses it too; kept for direct callers
        raise InvalidInputError("fp8 engines are not supported yet (they need NVIDIA ModelOpt Q/DQ nodes)")
    if weakly_typed:
        if not caps.weak_typing:
            raise InvalidInputError(
                f"--weakly-typed needs TensorRT 10.x; TensorRT {caps.version} removed BuilderFlag.FP16/BF16 "
                f"and builds only strongly typed networks. Export the graph in {wanted.value} instead: "
                f"`gag-export export --dtype {wanted.value}`."
            )
        if graph is not Precision.FP32:
            raise InvalidInputError(
                f"--weakly-typed starts from an fp32 graph, but {graphs_dir} was exported as {graph.value}; "
                f"drop --weakly-typed to build it as {graph.value}"
            )
        return PrecisionPlan(wanted, strongly_typed=False)
    if wanted is not graph:
        hint = (
            f" On TensorRT 10.x, `--precision {wanted.value} --weakly-typed` builds the fp32 graph with "
            f"BuilderFlag.{wanted.name} and the GAG layers pinned to fp32 (deprecated by NVIDIA since 10.12)."
            if caps.weak_typing and graph is Precision.FP32 and wanted in (Precision.FP16, Precision.BF16)
            else ""
        )
        raise InvalidInputError(
            f"{graphs_dir} was exported as {graph.value}, so its engine is {graph.value}: TensorRT builds it "
            f"strongly typed (the ONNX types are the engine's types), and an {graph.value} graph cannot become "
            f"a {wanted.value} engine. Re-export with `gag-export export --dtype {wanted.value}`, or build "
            f"without --precision.{hint}"
        )
    return PrecisionPlan(graph, strongly_typed=True)


__all__ = ["EngineOptions", "PrecisionPlan", "ShapeMode", "resolve_precision"]
