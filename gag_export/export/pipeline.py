"""The torch side of an export: the pipeline's denoiser with or without GAG, reduced-precision
copies of one component at a time, releasing weights once exported, sample feeds."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import torch

from ..arrays import to_numpy
from ..core.gag_config import GAGConfig
from ..core.precision import Precision
from ..core.shapes import ImageShape
from ..gag.attention import apply_gag, is_gag_applied, remove_gag
from ..models import denoiser_module


def sample_feed(descriptor, shape: ImageShape, precision: Precision, seed: int, gag: bool) -> OrderedDict[str, np.ndarray]:
    """The descriptor's sample inputs at `shape` as a name -> array feed, in graph order and types."""
    tensors = descriptor.sample_inputs(shape, precision, seed, gag=gag)
    return OrderedDict((spec.name, to_numpy(tensors[spec.name])) for spec in descriptor.inputs(precision, gag=gag))


def set_gag(pipe, gag: GAGConfig | None) -> list[str]:
    """Apply `gag` to the pipeline's denoiser (or remove GAG for None); the rewritten layers."""
    denoiser = denoiser_module(pipe)
    if denoiser is None:
        return []
    if gag is not None:
        return apply_gag(denoiser, gag)
    if is_gag_applied(denoiser):
        remove_gag(denoiser)
    return []


def weights_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` with its floating-point weights in `dtype`, cast while copying: no second
    full-precision copy is ever made (an fp32 SDXL UNet is 10 GB)."""
    memo = {}
    for p in module.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
    for b in module.buffers():
        memo.setdefault(id(b), b.detach().to(dtype) if b.is_floating_point() else b.detach().clone())
    return copy.deepcopy(module, memo)


def reduced_view(pipe, attr: str, dtype: torch.dtype, gag: GAGConfig | None):
    """A pipeline object whose `attr` component is a cast copy of `pipe`'s (GAG applied to it when
    it is the denoiser); every other component is `pipe`'s own. One component at a time: its copy
    goes when the view does, so a reduced export holds the fp32 pipeline plus one reduced part."""
    module = getattr(pipe, attr)
    denoiser = module is denoiser_module(pipe)
    if denoiser:
        set_gag(pipe, None)  # applied again below: a deep-copied forward hook would point back at pipe's module
    try:
        reduced = cast_copy(module, dtype)
    finally:
        if denoiser:
            set_gag(pipe, gag)
    if denoiser and gag is not None:
        apply_gag(reduced, gag)
    view = copy.copy(pipe)
    setattr(view, attr, reduced)
    return view


def release_weights(pipe, attr: str) -> None:
    """Drop a component's weights from a pipeline handed over to the export (`release=True`): its
    tensors move to the meta device (no storage), so the module and its config stay describable."""
    module = getattr(pipe, attr, None)
    if isinstance(module, torch.nn.Module):
        module.to("meta")


__all__ = ["cast_copy", "denoiser_module", "reduced_view", "release_weights", "sample_feed", "set_gag", "weights_bytes"]
