"""What an export is asked for (`ExportConfig`) and what it reports (`ExportEvent`, `ComponentStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InvalidInputError
from ..core.gag_config import DEFAULT_EXPORT_GAG, GAGConfig
from ..core.names import IMG2IMG_COMPONENTS
from ..core.precision import Precision
from ..core.shapes import ImageShape
from ..models.lora import LoraSpec

EXPORTERS = ("dynamo", "legacy")

DEFAULT_OPSET = 20

OPSET_RANGE = (17, 20)  # what this exporter path was validated on; TensorRT 10.0 parses 9..20



@dataclass(frozen=True)
class ExportConfig:
    """What to export and how. `gag=None` exports the unmodified denoiser (the `--no-gag` baseline).

    `shape` is the static shape, or the opt shape of a dynamic export; `min_shape`/`max_shape`
    bound a dynamic export (default: `shape`). `opset` is always passed to the exporter explicitly.
    `img2img` adds IMG2IMG_COMPONENTS (the VAE encoder) to what is exported: to the family's
    components, or to `components` when some are named. Without it they are exported only when
    named in `components`, so a txt2img export stays as small as it was.
    """

    model: str
    out_dir: Path
    shape: ImageShape
    dynamic: bool = False
    min_shape: ImageShape | None = None
    max_shape: ImageShape | None = None
    precision: Precision = Precision.FP32
    gag: GAGConfig | None = DEFAULT_EXPORT_GAG
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    slim: bool = False
    weights: str | None = None  # how the pipeline's weights were obtained (recorded in the manifest)
    seed: int = 0  # sample inputs for export tracing and parity
    components: tuple[str, ...] = ()  # only these components (default: all of the family's)
    img2img: bool = False  # also the components img2img needs (vae_encoder)
    loras: tuple[LoraSpec, ...] = ()  # fused into the denoiser, in order, before GAG and export

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "loras", tuple(self.loras))
        if not all(isinstance(spec, LoraSpec) for spec in self.loras):
            raise InvalidInputError("ExportConfig.loras: LoraSpec values (LoraSpec.parse('PATH[:SCALE]'))")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.exporter not in EXPORTERS:
            raise InvalidInputError(f"ExportConfig.exporter: use one of {EXPORTERS}, got {self.exporter!r}")
        if not isinstance(self.opset, int) or not OPSET_RANGE[0] <= self.opset <= OPSET_RANGE[1]:
            raise InvalidInputError(
                f"ExportConfig.opset: {self.opset!r} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]} "
                "(TensorRT 10.0 parses up to opset 20)"
            )
        components = tuple(self.components)
        if self.img2img and components:  # named here, so that the pipeline is loaded with its VAE
            components += tuple(c for c in IMG2IMG_COMPONENTS if c not in components)
        object.__setattr__(self, "components", components)
        if not self.dynamic and (self.min_shape is not None or self.max_shape is not None):
            raise InvalidInputError("min/max shapes need a dynamic export (--dynamic)")
        if self.dynamic:
            lo, hi = self.min_shape or self.shape, self.max_shape or self.shape
            for f in ("batch", "height", "width"):
                a, b, c = getattr(lo, f), getattr(self.shape, f), getattr(hi, f)
                if not a <= b <= c:
                    raise InvalidInputError(f"dynamic shape range: need min <= opt <= max for {f}, got {a}, {b}, {c}")

    @property
    def graphs_dir(self) -> Path:
        return self.out_dir / self.model

    @property
    def shape_range(self) -> tuple[ImageShape, ImageShape, ImageShape]:
        """(min, opt, max); all three equal for a static export."""
        if not self.dynamic:
            return self.shape, self.shape, self.shape
        return self.min_shape or self.shape, self.shape, self.max_shape or self.shape


@dataclass(frozen=True)
class ExportEvent:
    """Progress of one component, for the CLI's progress display (layers do not print).

    stage: "start" | "exported" | "slimmed" | "slim-rejected" | "done".
    """

    component: str
    stage: str
    index: int
    total: int
    nodes: int | None = None
    size_bytes: int | None = None
    seconds: float | None = None
    message: str = ""


@dataclass(frozen=True)
class ComponentStats:
    """Per-component figures of one export run (not written to the manifest)."""

    nodes: int
    size_bytes: int
    seconds: float
    nodes_before_slim: int | None = None
    slimmed: bool = False


__all__ = ["DEFAULT_EXPORT_GAG", "DEFAULT_OPSET", "EXPORTERS", "OPSET_RANGE", "ComponentStats", "ExportConfig", "ExportEvent"]
