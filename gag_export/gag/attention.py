"""Attention rewrite: diffusers processors that compute GAG inside the attention layer.

A processor is a small callable using the module's own weights (diffusers' design), so
swapping it changes the math, not the state dict. All processors of one model share one
`GuidanceParams`; an export wrapper binds its `gag_*` graph inputs there, so one ONNX graph
serves any guidance strength.

    names = apply_gag(unet, GAGConfig(scale=10))     # rewritten module names
    with guidance_params(unet).bind(5.0, 15.0, 0.0):
        out = unet(...)
    remove_gag(unet)                                 # original processors back
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..core.errors import InvalidInputError
from ..core.gag_config import ENTMAX_METHODS, GAGConfig, layer_matches
from .dispatch import gag_attention, gag_joint_attention
from .math import Scalar, update_norms

log = logging.getLogger(__name__)

_STATE_ATTR = "_gag_state"


class GuidanceParams:
    """The guidance values every GAG processor of one model reads at call time.

    Values are floats or 0-d tensors; during ONNX export they are the graph's `gag_*` inputs.
    `scale` and `eta` may also be per-layer: a 1-D tensor (or a sequence of floats) with one entry
    per rewritten layer, in the order `apply_gag` returns the names; each processor reads its own
    entry (`layer_value`), which exports as a Gather with a constant index.
    `text_len` is the text-token count of the current FLUX forward (single-stream blocks see
    [text; image] concatenated and are not told where the text ends).
    """

    def __init__(self, config: GAGConfig):
        self.scale: Scalar = config.scale
        self.eta: Scalar = config.eta
        self.zeta: Scalar = config.zeta
        self.alpha = config.alpha
        self.method = config.method
        self.text_len: int | None = None
        # Called as observer(attention module, pre-cap update norms [B, H, Lq]) by every GAG layer
        # when set (calibration); None costs one attribute check and adds nothing to a graph.
        self.observer: Callable[[torch.nn.Module, torch.Tensor], None] | None = None

    @contextmanager
    def bind(self, scale: Scalar, eta: Scalar, zeta: Scalar) -> Iterator["GuidanceParams"]:
        """Use these guidance values for the calls inside the block, then restore the previous ones."""
        previous = (self.scale, self.eta, self.zeta)
        self.scale, self.eta, self.zeta = scale, eta, zeta
        try:
            yield self
        finally:
            self.scale, self.eta, self.zeta = previous

    @contextmanager
    def observe(self, observer: Callable[[torch.nn.Module, torch.Tensor], None]) -> Iterator["GuidanceParams"]:
        """Call `observer` with each GAG layer's pre-cap update norms inside the block (method sort/bisect)."""
        previous, self.observer = self.observer, observer
        try:
            yield self
        finally:
            self.observer = previous

    def report(self, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> None:
        """Give the observer this layer's pre-cap update norms (the fused kernel's are bisect's, to fp32 noise)."""
        method = self.method if self.method in ENTMAX_METHODS else "bisect"
        self.observer(attn, update_norms(q, k, v, self.zeta, self.alpha, method, attn_mask))


def layer_value(value, index: int):
    """The entry of one layer in a guidance value: a scalar (float, 0-d tensor) serves every layer;
    a 1-D tensor or a sequence holds one entry per rewritten layer."""
    if isinstance(value, torch.Tensor):
        return value if value.dim() == 0 else value[index]
    if isinstance(value, (list, tuple)):
        return value[index]
    return value


class _LayerProcessor:
    """A processor of one rewritten layer: its index in the layer order picks its guidance entries."""

    def __init__(self, params: GuidanceParams, index: int = 0):
        self.params = params
        self.index = index

    def values(self):
        p = self.params
        return layer_value(p.scale, self.index), layer_value(p.eta, self.index), p.zeta


class GAGAttnProcessor(_LayerProcessor):
    """diffusers' `AttnProcessor2_0` with `gag_attention` in place of scaled_dot_product_attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.params.observer is not None:
            self.params.report(attn, query, key, value, attention_mask)

        p = self.params
        hidden_states = gag_attention(query, key, value, *self.values(), p.alpha, p.method, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class GAGFluxAttnProcessor(_LayerProcessor):
    """diffusers' `FluxAttnProcessor` with GAG on image-query x text-key attention.

    Projections, QK norms, rotary embeddings and output projections are diffusers' own; only
    the attention core is `gag_joint_attention`.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise InvalidInputError("GAG for FLUX does not support attention masks (FLUX pipelines pass none)")
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)

        if encoder_hidden_states is not None:  # double-stream block: prepend the text stream
            enc_query, enc_key, enc_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (enc_query, enc_key, enc_value))
            enc_query, enc_key = attn.norm_added_q(enc_query), attn.norm_added_k(enc_key)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((enc_query, query), (enc_key, key), (enc_value, value)))
            text_len = encoder_hidden_states.shape[1]
        else:  # single-stream block: [text; image] already, length recorded by the model hook
            text_len = self.params.text_len
            if text_len is None:
                raise RuntimeError("GAG FLUX processor called outside a FluxTransformer2DModel forward")

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, d]
        if self.params.observer is not None:  # GAG's part only: image queries x text keys
            self.params.report(attn, q[:, :, text_len:], k[:, :, :text_len], v[:, :, :text_len])

        p = self.params
        out = gag_joint_attention(q, k, v, text_len, *self.values(), p.alpha, p.method)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        enc_out, hidden_states = hidden_states.split_with_sizes([text_len, hidden_states.shape[1] - text_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(enc_out.contiguous())


# --------------------------------------------------------------------------- model rewrite


@dataclass
class _GAGState:
    config: GAGConfig
    params: GuidanceParams
    originals: dict[str, object] = field(default_factory=dict)
    hook: object | None = None


def _is_unet(model) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def _is_flux(model) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(model, FluxTransformer2DModel)


def _select_unet_layers(model, parts: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Cross-attention modules (attn2) of the selected blocks; self-attention is never touched."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith(".attn2") and getattr(module, "is_cross_attention", False) and layer_matches(name, parts)
    }


def _select_flux_layers(model, parts: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Joint attention of the double- and single-stream blocks; UNet block keywords mean all."""
    globs = tuple(p for p in parts if p not in ("all", "down", "up", "mid"))
    everything = any(p in ("all", "down", "up") for p in parts)
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith(".attn")
        and name.split(".", 1)[0] in ("transformer_blocks", "single_transformer_blocks")
        and (everything or layer_matches(name, globs))
    }


def _record_text_len(params: GuidanceParams):
    def hook(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        params.text_len = context.shape[1]

    return hook


def apply_gag(model: torch.nn.Module, config: GAGConfig) -> list[str]:
    """Install GAG processors on the selected attention layers; return their module names.

    Works on `UNet2DConditionModel` (cross-attention of the selected blocks) and
    `FluxTransformer2DModel` (joint attention, image queries x text keys). Applying again
    replaces the previous rewrite.
    """
    if is_gag_applied(model):
        remove_gag(model)
    if _is_unet(model):
        selected, processor_cls = _select_unet_layers(model, config.layer_parts), GAGAttnProcessor
    elif _is_flux(model):
        selected, processor_cls = _select_flux_layers(model, config.layer_parts), GAGFluxAttnProcessor
    else:
        raise InvalidInputError(
            f"GAG cannot rewrite a {type(model).__name__}: supported models are UNet2DConditionModel "
            "(SDXL family) and FluxTransformer2DModel"
        )
    if not selected:
        raise InvalidInputError(f"GAGConfig.layers: {config.layers!r} selects no attention layer of {type(model).__name__}")

    state = _GAGState(config=config, params=GuidanceParams(config))
    names = sorted(selected)  # the layer order of per-layer guidance values (the manifest's gag.layer_names)
    for index, name in enumerate(names):
        module = selected[name]
        state.originals[name] = module.processor
        module.set_processor(processor_cls(state.params, index))
    if _is_flux(model):
        state.hook = model.register_forward_pre_hook(_record_text_len(state.params), with_kwargs=True)
    setattr(model, _STATE_ATTR, state)
    log.debug("GAG applied to %d layers of %s", len(selected), type(model).__name__)
    return names


def remove_gag(model: torch.nn.Module) -> None:
    """Restore the processors that `apply_gag` replaced (no-op if GAG is not applied)."""
    state: _GAGState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return
    modules = dict(model.named_modules())
    for name, original in state.originals.items():
        modules[name].set_processor(original)
    if state.hook is not None:
        state.hook.remove()
    delattr(model, _STATE_ATTR)


def is_gag_applied(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def guidance_params(model: torch.nn.Module) -> GuidanceParams:
    """The `GuidanceParams` shared by a model's GAG processors."""
    state: _GAGState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise InvalidInputError(f"GAG is not applied to this {type(model).__name__}; call apply_gag first")
    return state.params


def gag_layer_names(model: torch.nn.Module) -> list[str]:
    """The rewritten layers' module names in the order `apply_gag` returned them ([] without GAG):
    the order of per-layer guidance values."""
    state: _GAGState | None = getattr(model, _STATE_ATTR, None)
    return [] if state is None else sorted(state.originals)


def gag_config(model: torch.nn.Module) -> GAGConfig | None:
    """The config GAG was applied with, or None."""
    state: _GAGState | None = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.config


@contextmanager
def gag_applied(model: torch.nn.Module, config: GAGConfig) -> Iterator[list[str]]:
    """Apply GAG for the duration of a block; the originals come back even on error."""
    names = apply_gag(model, config)
    try:
        yield names
    finally:
        remove_gag(model)
