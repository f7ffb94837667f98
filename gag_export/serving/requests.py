"""What a `pipeline` request may contain, checked before any graph runs.

The served pipeline takes one value per input (Triton shape [1]): `prompt` (UTF-8 bytes), `seed`
(int64), `steps` (int32) and, for a GAG export, `gag_scale`, `gag_eta`, `gag_zeta` (fp32). A value
outside the limits below is refused with one line naming the input, the bound and the value; the
sampler model turns that into a Triton error response and goes on serving.

| input | accepted |
|-------|----------|
| prompt | valid UTF-8, at most `max_prompt_chars` characters (1000), no NUL; longer than the text encoder's token limit: truncated as `generate` does |
| seed | integer in [0, 2**63 - 1] |
| steps | the model's step range (`gag-export models`), e.g. 1..4 for DMD2 |
| gag_scale | finite, in [-1, 100] (-1 with zeta 1 and a huge eta is the unguided model); one value, or one per rewritten layer (manifest's `gag.layer_names` order) |
| gag_eta | in (0, inf] (inf: no norm cap, as `GAGConfig` and `generate` take it); one value or one per layer |
| gag_scale_steps, gag_eta_steps | optional: one value per denoising step (the last repeating), each as gag_scale / gag_eta; at most `steps` values |
| gag_zeta | finite, in [0, 10] |
| init_image | optional (img2img exports only): uint8 [height, width, 3], each side 1..`max_image_side` (2048; a dynamic export's encoder profile); sets the size unless the graphs are static (then resized), as `generate --image` |
| strength | optional, with `init_image` only: in (0, 1] (left out: diffusers' default, 0.3 SDXL / 0.6 FLUX) |

The limits travel in the sampler's `config.pbtxt` as parameters (`limit_*`), so a deployment can
narrow or widen them without code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from ..core.errors import InvalidInputError
from ..core.gag_config import MAX_ZETA, SCALE_LIMITS
from ..core.names import GAG_INPUTS
from ..core.shapes import check_prompt
from ..runtime.generation import GAGParams, GenerationConfig
from .protocol import IMAGE_INPUT, SCHEDULE_INPUTS, STRENGTH_INPUT

SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    """Bounds of one request; `min_steps`/`max_steps` come from the model's scheduler spec."""

    min_steps: int
    max_steps: int
    max_prompt_chars: int = 1000
    min_scale: float = SCALE_LIMITS[0]
    max_scale: float = SCALE_LIMITS[1]
    max_eta: float = math.inf  # GAGConfig's rule: any eta > 0, inf disabling the cap
    max_zeta: float = MAX_ZETA
    max_image_side: int = 2048  # the largest height or width of an img2img input image

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise InvalidInputError(f"steps limits: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_prompt_chars < 1:
            raise InvalidInputError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if not (math.isfinite(self.min_scale) and math.isfinite(self.max_scale) and self.min_scale <= self.max_scale):
            raise InvalidInputError(f"scale limits must be finite with min <= max, got {self.min_scale}, {self.max_scale}")
        if not self.max_eta > 0:  # also refuses NaN; inf: eta unbounded (no norm cap allowed)
            raise InvalidInputError(f"max_eta must be > 0 (inf: no bound), got {self.max_eta}")
        if not (math.isfinite(self.max_zeta) and self.max_zeta >= 0):
            raise InvalidInputError(f"max_zeta must be finite and >= 0, got {self.max_zeta}")
        if self.max_image_side < 1:
            raise InvalidInputError(f"max_image_side must be >= 1, got {self.max_image_side}")

    @classmethod
    def for_entry(cls, entry, **overrides) -> "RequestLimits":
        spec = entry.scheduler
        return cls(min_steps=spec.min_steps, max_steps=spec.max_steps, **overrides)

    def to_parameters(self) -> dict[str, str]:
        """`{"limit_<field>": "<value>"}`, as written into the sampler's config.pbtxt."""
        return {f"limit_{f.name}": repr(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "RequestLimits":
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"limit_{f.name}"
            if key in parameters:
                kind = int if f.type in ("int", int) else float
                try:
                    kwargs[f.name] = kind(parameters[key])
                except ValueError:
                    raise InvalidInputError(f"config parameter {key}: not a number: {parameters[key]!r}") from None
        return cls(**kwargs)

    def describe(self) -> str:
        return (f"prompt <= {self.max_prompt_chars} chars, seed 0..2**63-1, steps {self.min_steps}..{self.max_steps}, "
                f"gag_scale [{self.min_scale:g}, {self.max_scale:g}], gag_eta (0, {self.max_eta:g}], "
                f"gag_zeta [0, {self.max_zeta:g}], {IMAGE_INPUT} sides <= {self.max_image_side}, strength (0, 1]")


def _one(values: Mapping[str, np.ndarray], name: str) -> Any:
    if name not in values:
        raise InvalidInputError(f"{name}: missing from the request")
    array = np.asarray(values[name])
    if array.size != 1:
        raise InvalidInputError(f"{name}: send exactly one value (shape [1]), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _integer(values, name: str, dtype_kinds: str = "iu") -> int:
    value = _one(values, name)
    if np.asarray(value).dtype.kind not in dtype_kinds:
        raise InvalidInputError(f"{name}: must be an integer, got {np.asarray(value).dtype} value {value!r}")
    return int(value)


def _number(values, name: str, low: float, high: float, low_open: bool = False) -> float:
    raw = _one(values, name)
    if np.asarray(raw).dtype.kind not in "iuf":
        raise InvalidInputError(f"{name}: must be a number, got {np.asarray(raw).dtype} value {raw!r}")
    value = float(raw)
    # NaN fails every comparison; inf passes only where the bound itself is inf (gag_eta: no cap)
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:
        bracket = "(" if low_open else "["
        kind = "a finite number" if math.isfinite(high) else "a number"
        raise InvalidInputError(f"{name}: must be {kind} in {bracket}{low:g}, {high:g}], got {value!r}")
    return value


def _numbers(values, name: str, low: float, high: float, low_open: bool = False, listed: bool = False):
    """gag_scale/gag_eta: one number ([1]) or one per rewritten layer; a schedule (`listed`): one
    per step, as a tuple. Each within the bounds."""
    if name not in values or (np.asarray(values[name]).size == 1 and not listed):
        return _number(values, name, low, high, low_open)
    array = np.asarray(values[name]).reshape(-1)
    if array.size == 0:
        raise InvalidInputError(f"{name}: send at least one value")
    return tuple(_number({f"{name}[{i}]": entry}, f"{name}[{i}]", low, high, low_open) for i, entry in enumerate(array))


def _prompt(values, limits: RequestLimits) -> str:
    raw = _one(values, "prompt")
    if isinstance(raw, (bytes, np.bytes_)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"prompt: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise InvalidInputError(f"prompt: must be a string (Triton BYTES), got {type(raw).__name__}")
    return check_prompt(text, max_chars=limits.max_prompt_chars)


def _image(values, limits: RequestLimits) -> np.ndarray:
    """The img2img input: uint8 [height, width, 3] within `max_image_side`, checked before anything decodes it."""
    image = np.asarray(values[IMAGE_INPUT])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"{IMAGE_INPUT}: send the image as uint8 [height, width, 3] (RGB), "
                                f"got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if not (1 <= height <= limits.max_image_side and 1 <= width <= limits.max_image_side):
        raise InvalidInputError(f"{IMAGE_INPUT}: {width}x{height} is outside what this pipeline accepts (each side "
                                f"1..{limits.max_image_side} pixels); send a smaller image")
    return np.ascontiguousarray(image)


def parse_request(values: Mapping[str, np.ndarray], limits: RequestLimits, gag: bool,
                  img2img: bool = False, model: str = "") -> GenerationConfig:
    """A `GenerationConfig` from one request's input arrays, or `InvalidInputError` naming the first bad input.

    `gag`: whether the served denoiser takes GAG inputs (the request must then carry all three).
    `img2img`: whether the export has the VAE encoder (`init_image`/`strength` are refused otherwise);
    `model` names it in that refusal.
    """
    prompt = _prompt(values, limits)
    seed = _integer(values, "seed")
    if not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"seed: must be an integer in [0, 2**63 - 1], got {seed}")
    steps = _integer(values, "steps")
    if not limits.min_steps <= steps <= limits.max_steps:
        allowed = f"{limits.min_steps}" if limits.min_steps == limits.max_steps else f"{limits.min_steps}..{limits.max_steps}"
        raise InvalidInputError(f"steps: this model samples with {allowed} steps, got {steps}")
    params = None
    if gag:
        bounds = {"gag_scale": (limits.min_scale, limits.max_scale, False), "gag_eta": (0.0, limits.max_eta, True)}
        params = GAGParams(
            scale=_numbers(values, "gag_scale", *bounds["gag_scale"]),
            eta=_numbers(values, "gag_eta", *bounds["gag_eta"]),
            zeta=_number(values, "gag_zeta", 0.0, limits.max_zeta),
            **{name[4:]: tuple(_numbers(values, name, *bounds[of], listed=True)) for name, of in SCHEDULE_INPUTS.items()
               if name in values},
        )
    else:
        extra = [name for name in (*GAG_INPUTS, *SCHEDULE_INPUTS) if name in values]
        if extra:
            raise InvalidInputError(f"{', '.join(extra)}: this model was exported without GAG and takes no guidance inputs")
    image, strength = None, None
    if IMAGE_INPUT in values or STRENGTH_INPUT in values:
        if not img2img:
            given = ", ".join(n for n in (IMAGE_INPUT, STRENGTH_INPUT) if n in values)
            raise InvalidInputError(
                f"{given}: image-to-image needs the VAE encoder, and this model was exported without it: export with "
                f"`gag-export export --model {model or '<model>'} --img2img` and regenerate the repository (`gag-export triton`)")
        if IMAGE_INPUT not in values:
            raise InvalidInputError(f"{STRENGTH_INPUT}: given without {IMAGE_INPUT} (it sets how much of an input image is kept)")
        image = _image(values, limits)
        if STRENGTH_INPUT in values:
            strength = _number(values, STRENGTH_INPUT, 0.0, 1.0, low_open=True)
            # the decimal the client sent (0.7, not fp32's 0.699999988): steps x strength is rounded down
            strength = float(str(np.float32(strength)))
    return GenerationConfig(prompt, seed=seed, steps=steps, gag=params, image=image, strength=strength)
