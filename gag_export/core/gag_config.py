"""GAG's settings (`GAGConfig`) and its layer selection: plain values, validated on construction.

torch-free, so the manifest, the runtime and the server read and check them without the math.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass

from .errors import InvalidInputError

ENTMAX_METHODS = ("sort", "bisect")
# gag_attention also takes "fused" (the Triton kernel, or an error) and "auto" (fused on CUDA
# when it can run, else "bisect"); the rule is in gag_export/gag/kernels/__init__.py.
ATTENTION_METHODS = ENTMAX_METHODS + ("fused", "auto")


BLOCK_KEYWORDS = ("all", "down", "mid", "up")
# One rule for guidance values, for the CLI, the Python API and the server (serving/requests.py).
# scale -1 with zeta 1 and a huge eta is the unguided model (the identity); the paper's useful
# scales are single digits to tens, and beyond 100 the guided term swamps the output (at 1e308 it
# overflows float32 into a black image). zeta weighs the orthogonal part: 0 to 1 in the paper.
SCALE_LIMITS = (-1.0, 100.0)
MAX_ZETA = 10.0


def parse_layer_spec(layers: str) -> tuple[str, ...]:
    """Split a layer spec into block keywords and module-name globs; reject anything else."""
    parts = tuple(p.strip() for p in layers.split(",") if p.strip())
    if not parts:
        raise InvalidInputError("GAGConfig.layers: empty layer spec (use 'down,up', 'all', 'mid' or module globs)")
    for part in parts:
        is_glob = any(c in part for c in ".*?[")
        if part not in BLOCK_KEYWORDS and not is_glob:
            raise InvalidInputError(
                f"GAGConfig.layers: unknown layer spec {part!r}; use {', '.join(BLOCK_KEYWORDS)} "
                "or module-name globs such as 'down_blocks.1.*.attn2'"
            )
    return parts


def layer_matches(module_name: str, parts: tuple[str, ...]) -> bool:
    """Whether a module name is selected by a parsed layer spec (UNet block keywords or globs)."""
    block = module_name.split(".", 1)[0]
    for part in parts:
        if part == "all" or (part in ("down", "up") and block == f"{part}_blocks") or (part == "mid" and block == "mid_block"):
            return True
        if part not in BLOCK_KEYWORDS and fnmatch.fnmatchcase(module_name, part):
            return True
    return False


@dataclass(frozen=True)
class GAGConfig:
    """Guidance parameters and where GAG is applied (validated on construction).

    scale: guidance strength (GAG.md's lambda); -1 with zeta=1 and eta=inf gives the plain model.
    eta:   cap on the update's norm per head and token (> 0; inf means no cap).
    zeta:  weight of the update's part orthogonal to the sparse output (>= 0).
    alpha: entmax order of the sparse branch (> 1).
    method: "sort" (exact, TopK) or "bisect" (exact to fp32 noise, no TopK: TensorRT-friendly),
            "fused" (Triton kernel on CUDA) or "auto" (fused where it can run, else bisect).
    layers: "down,up" (default, PLADIS set), "all", "mid", or module-name globs, comma-separated.
    """

    scale: float = 10.0
    eta: float = 15.0
    zeta: float = 0.0
    alpha: float = 1.5
    method: str = "sort"
    layers: str = "down,up"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"GAGConfig.{field}: {why}, got {getattr(self, field)!r}")

        for field in ("scale", "eta", "zeta", "alpha"):
            if not isinstance(getattr(self, field), (int, float)) or isinstance(getattr(self, field), bool):
                raise bad(field, "must be a number")
        if not math.isfinite(self.scale) or not SCALE_LIMITS[0] <= self.scale <= SCALE_LIMITS[1]:
            raise bad("scale", f"must be in [{SCALE_LIMITS[0]:g}, {SCALE_LIMITS[1]:g}]")
        if math.isnan(self.eta) or self.eta <= 0:
            raise bad("eta", "must be > 0 (inf disables the norm cap)")
        if not math.isfinite(self.zeta) or not 0 <= self.zeta <= MAX_ZETA:
            raise bad("zeta", f"must be in [0, {MAX_ZETA:g}]")
        if not math.isfinite(self.alpha) or self.alpha <= 1:
            raise bad("alpha", "must be finite and > 1")
        if self.method not in ATTENTION_METHODS:
            raise bad("method", f"must be one of {ATTENTION_METHODS}")
        parse_layer_spec(self.layers)

    @property
    def layer_parts(self) -> tuple[str, ...]:
        return parse_layer_spec(self.layers)

    def to_dict(self) -> dict:
        return asdict(self)



GuidanceValue = float | tuple[float, ...]  # one value for every layer, or one per rewritten layer


def guidance_value(field: str, value, layers: int | None = None) -> GuidanceValue:
    """A `scale` or `eta` as a user gives it: a number, or one number per rewritten layer.

    A sequence must hold exactly `layers` numbers (`layers` None: the export takes one value for
    all layers, made before per-layer guidance, and a sequence is refused). Every number follows
    GAGConfig's rule for `field`. Returns a float or a tuple of floats; InvalidInputError otherwise.
    """
    if field not in ("scale", "eta"):
        raise ValueError(f"per-layer guidance values are scale and eta, not {field!r}")
    if not isinstance(value, (list, tuple)):
        GAGConfig(**{field: value})  # InvalidInputError naming the field
        return float(value)
    if layers is None:
        raise InvalidInputError(f"{field}: per-layer values given, but this export takes one {field} for all layers "
                                "(exported before per-layer guidance): give one value, or re-export the model")
    if len(value) != layers:
        raise InvalidInputError(f"{field}: {len(value)} values given, the export rewrites {layers} layers "
                                "(one value per layer, in the manifest's gag.layer_names order, or one for all)")
    for index, entry in enumerate(value):
        try:
            GAGConfig(**{field: entry})
        except InvalidInputError as exc:
            raise InvalidInputError(f"{field}[{index}]: {exc}") from None
    return tuple(float(entry) for entry in value)


# What graphs are exported with unless asked otherwise: "bisect" needs no TopK (any key count in
# TensorRT); the torch backend runs the same values with method "auto".
DEFAULT_EXPORT_GAG = GAGConfig(method="bisect")


__all__ = ["ATTENTION_METHODS", "DEFAULT_EXPORT_GAG", "BLOCK_KEYWORDS", "ENTMAX_METHODS", "GAGConfig", "GuidanceValue",
           "guidance_value", "layer_matches", "parse_layer_spec"]
