"""LoRA files fused into the denoiser's weights before GAG and export (`--lora PATH[:SCALE]`).

    specs = [LoraSpec.parse("style.safetensors:0.8"), LoraSpec.parse("dmd2_lora.safetensors")]
    records = fuse_loras(pipe.unet, specs, "sdxl")      # [{"name", "sha256", "scale"}] for the manifest
    deltas = lora_deltas(specs, "sdxl", {n: tuple(p.shape) for n, p in pipe.unet.named_parameters()})

Files are read with diffusers' own loaders (`StableDiffusionXLLoraLoaderMixin.lora_state_dict`,
`FluxLoraLoaderMixin.lora_state_dict`), which turn kohya/A1111, XLabs, BFL and diffusers' older
layouts into diffusers/PEFT keys, and `convert_unet_state_dict_to_peft`; safetensors only, never
pickle. PEFT itself is not needed: the delta of one layer is what PEFT's merge adds,
`scale * alpha / rank * B @ A` (conv layers: over the flattened kernel), with alpha as diffusers
decides it when it builds the LoraConfig: the file's PEFT metadata (`lora_alpha`, `alpha_pattern`,
`use_rslora`) when present, else the kohya `network_alphas` (a module without one takes the most
common), else alpha = rank (diffusers' convention for files without alphas). Kohya FLUX files
come with alpha already folded into the weights by diffusers' converter.
"""

from __future__ import annotations

import collections
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..artifacts.manifest import sha256_files
from ..core.errors import InvalidInputError
from ..core.names import FAMILIES

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"

# Where each family's denoiser LoRA weights sit in a diffusers LoRA state dict, and which
# prefixes belong to text encoders (not fused: only the denoiser is exported with its LoRA).
_DENOISER_PREFIX = {"sdxl": "unet", "flux": "transformer"}
_TEXT_ENCODER_PREFIXES = ("text_encoder", "te_", "lora_te")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the weight it is fused with (`--lora PATH[:SCALE]`); checked on construction."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise InvalidInputError(f"--lora {self.path}: the scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.path.suffix.lower() != LORA_SUFFIX:
            raise InvalidInputError(f"--lora {self.path}: only {LORA_SUFFIX} LoRA files are read (never pickle)")
        if not self.path.is_file():
            raise InvalidInputError(f"--lora {self.path}: no such file")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`PATH` or `PATH:SCALE` (the last colon splits, so `C:\\x.safetensors` is a path)."""
        text = str(text)
        path, scale = text, 1.0
        if ":" in text and not text.lower().endswith(LORA_SUFFIX):
            path, tail = text.rsplit(":", 1)
            try:
                scale = float(tail)
            except ValueError:
                raise InvalidInputError(f"--lora {text}: the scale after ':' must be a number, got {tail!r}") from None
        return cls(Path(path), scale)

    @cached_property
    def sha256(self) -> str:
        return sha256_files([self.path])

    def record(self) -> dict:
        """What the manifest keeps of this LoRA: file name, sha256, scale."""
        return {"name": self.path.name, "sha256": self.sha256, "scale": self.scale}


def _read_state_dict(spec: LoraSpec, family: str, config: Mapping | None):
    """(state dict in diffusers keys, network alphas or None, PEFT metadata or None) through diffusers' loader."""
    from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    where = {"pretrained_model_name_or_path_or_dict": str(spec.path.parent), "weight_name": spec.path.name,
             "use_safetensors": True, "local_files_only": True, "return_lora_metadata": True}
    try:
        if family == "sdxl":
            return StableDiffusionXLLoraLoaderMixin.lora_state_dict(**where, unet_config=config)
        return FluxLoraLoaderMixin.lora_state_dict(**where, return_alphas=True)
    except Exception as exc:  # diffusers' converters raise ValueError, KeyError, safetensors errors...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInputError(f"--lora {spec.path}: not a {family} LoRA diffusers can read ({first})") from None


def _peft_layers(spec: LoraSpec, family: str, config: Mapping | None):
    """({module: (A, B)}, {module: alpha}, metadata, skipped text-encoder modules) of one file."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state_dict, network_alphas, metadata = _read_state_dict(spec, family, config)
    prefix = _DENOISER_PREFIX[family] + "."
    ours = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    others = [k for k in state_dict if not k.startswith(prefix)]
    text_encoder = {k.split(".lora")[0] for k in others if k.startswith(_TEXT_ENCODER_PREFIXES)}
    foreign = [k for k in others if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    if foreign or not ours:
        example = (foreign or others or ["(no keys)"])[0]
        raise InvalidInputError(f"--lora {spec.path}: keys like {example!r} match no parameter of the {family} "
                                "denoiser (a LoRA for another model family?)")
    if not any("lora_A" in k for k in ours):
        ours = convert_unet_state_dict_to_peft(ours)
    layers: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in ours.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise InvalidInputError(f"--lora {spec.path}: {key!r} is not a plain LoRA weight (DoRA, LoKr, LoRA biases "
                                    "and other adapters are not fused)")
        layers[match[1]][match[2]] = value
    incomplete = [m for m, ab in layers.items() if len(ab) != 2]
    if incomplete:
        raise InvalidInputError(f"--lora {spec.path}: {incomplete[0]!r} has lora_A or lora_B but not both")
    alphas = {k.removeprefix(prefix).removesuffix(".alpha"): float(v) for k, v in (network_alphas or {}).items()
              if k.startswith(prefix)}
    metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    return {m: (ab["A"], ab["B"]) for m, ab in layers.items()}, alphas, metadata, len(text_encoder)


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's rank/alpha pattern lookup (`peft.utils.other.get_pattern_key`): a key matches a module
    name ending in it at a dot boundary, regular expressions included."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(module: str, rank: int, alphas: Mapping[str, float], metadata: Mapping | None) -> float:
    """PEFT's `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) for one layer, alpha as diffusers derives it."""
    if metadata:
        alpha = _pattern_value(metadata.get("alpha_pattern"), module, metadata.get("lora_alpha", rank))
        return alpha / math.sqrt(rank) if metadata.get("use_rslora") else alpha / rank
    if alphas:
        default = collections.Counter(alphas.values()).most_common()[0][0]
        return alphas.get(module, default) / rank
    return 1.0  # alpha = rank


def lora_deltas(specs: Sequence[LoraSpec], family: str, shapes: Mapping[str, tuple[int, ...]],
                config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 delta summed over `specs`} for the denoiser whose `named_parameters()`
    shapes are `shapes`. `config`: the SDXL UNet's config, which diffusers needs to place kohya
    SGM block names (input_blocks.4.1...); InvalidInputError for a file meant for another model."""
    if family not in FAMILIES:
        raise InvalidInputError(f"LoRA: unknown model family {family!r}; use one of {FAMILIES}")
    deltas: dict[str, torch.Tensor] = {}
    skipped = 0
    for spec in specs:
        layers, alphas, metadata, text_encoder = _peft_layers(spec, family, config)
        skipped += text_encoder
        for module, (down, up) in layers.items():
            name = f"{module}.weight"
            want = tuple(shapes.get(name, ()))
            got = (up.shape[0], *down.shape[1:])
            if name not in shapes or got != want or up.shape[1] != down.shape[0]:
                seen = "no such parameter" if name not in shapes else f"the parameter is {list(want)}, the LoRA gives {list(got)}"
                raise InvalidInputError(f"--lora {spec.path}: {module!r} does not fit the {family} denoiser ({seen}; "
                                        "a LoRA for another model?)")
            rank = down.shape[0]
            weight = spec.scale * _scaling(module, rank, alphas, metadata)
            delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(want) * weight
            deltas[name] = deltas[name] + delta if name in deltas else delta
    if skipped:
        log.warning("LoRA: %d text-encoder layers skipped (only the denoiser is fused)", skipped)
    return deltas


def add_deltas(module: torch.nn.Module, deltas: Mapping[str, torch.Tensor], keep: bool = False) -> dict[str, torch.Tensor]:
    """Add `deltas` to `module`'s parameters in place (summed in fp32, stored in the parameter's
    dtype). `keep`: return copies of the parameters as they were, for `restore_parameters` (a
    round trip through `- delta` would not give the same bits back)."""
    params = dict(module.named_parameters())
    before = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            param = params[name]
            if keep:
                before[name] = param.detach().clone()
            param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
    return before


def restore_parameters(module: torch.nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    """Put back the parameters `add_deltas` changed (bit for bit; ones released to the meta device stay there)."""
    if not before:
        return
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in before.items():
            if params[name].device.type != "meta":
                params[name].copy_(value)


def denoiser_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def fuse_loras(module: torch.nn.Module, specs: Sequence[LoraSpec], family: str) -> list[dict]:
    """Fuse `specs` into the denoiser `module` in place; return their manifest records."""
    if specs:
        add_deltas(module, lora_deltas(specs, family, denoiser_shapes(module), getattr(module, "config", None)))
    return [spec.record() for spec in specs]


__all__ = ["LORA_SUFFIX", "LoraSpec", "add_deltas", "denoiser_shapes", "fuse_loras", "lora_deltas", "restore_parameters"]
