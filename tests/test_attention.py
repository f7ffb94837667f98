"""The attention rewrite on whole tiny models: GAG.md's identities hold end to end."""

from __future__ import annotations

import math

import pytest
import torch
from entmax import entmax15 as entmax15_reference

import gag_export.gag.attention as attention
from gag_export.gag.attention import apply_gag, gag_applied, guidance_params, is_gag_applied, remove_gag
from gag_export.core.errors import InvalidInputError
from gag_export.gag import GAGConfig

from conftest import flux_inputs, unet_inputs

IDENTITY = GAGConfig(scale=-1.0, eta=1e9, zeta=1.0)


def run_unet(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def run_flux(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def reference_attention(combine):
    """A `gag_attention` stand-in computing D and S independently (float64, entmax package)."""

    def attend(q, k, v, scale, eta, zeta, alpha=1.5, method="sort", attn_mask=None):
        z = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        dense = torch.softmax(z, -1) @ v.double()
        sparse = entmax15_reference(z, dim=-1) @ v.double()
        return combine(dense, sparse).to(q.dtype)

    return attend


# ------------------------------------------------------------------ UNet


def test_default_selection_is_down_and_up_cross_attention(unet):
    names = apply_gag(unet, GAGConfig())
    expected = sorted(
        n for n, m in unet.named_modules() if n.endswith("attn2") and not n.startswith("mid_block")
    )
    assert names == expected and len(names) == 6
    assert all(".attn2" in n for n in names)
    touched = {n for n, m in unet.named_modules() if isinstance(getattr(m, "processor", None), attention.GAGAttnProcessor)}
    assert touched == set(names), "self-attention (attn1) and the mid block keep their processors"


@pytest.mark.parametrize(
    "layers, count, prefix",
    [("mid", 2, "mid_block"), ("all", 8, None), ("down", 2, "down_blocks"), ("up_blocks.0.attentions.1.*", 2, "up_blocks.0.attentions.1")],
)
def test_layer_selection_options(unet, layers, count, prefix):
    names = apply_gag(unet, GAGConfig(layers=layers))
    assert len(names) == count
    assert prefix is None or all(n.startswith(prefix) for n in names)


def test_unet_identity_reproduces_unmodified_model(unet):
    inputs = unet_inputs(batch=2)
    baseline = run_unet(unet, inputs)
    apply_gag(unet, IDENTITY)
    torch.testing.assert_close(run_unet(unet, inputs), baseline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("w", [2.0, 4.0])
def test_unet_pladis_identity(unet, monkeypatch, w):
    inputs = unet_inputs()
    apply_gag(unet, GAGConfig(scale=w - 1, eta=1e9, zeta=1.0))
    ours = run_unet(unet, inputs)
    monkeypatch.setattr(attention, "gag_attention", reference_attention(lambda d, s: d + w * (s - d)))
    torch.testing.assert_close(ours, run_unet(unet, inputs), atol=1e-5, rtol=0)


def test_unet_scale_zero_is_pure_sparse_model(unet, monkeypatch):
    inputs = unet_inputs()
    baseline = run_unet(unet, inputs)
    apply_gag(unet, GAGConfig(scale=0.0))
    ours = run_unet(unet, inputs)
    monkeypatch.setattr(attention, "gag_attention", reference_attention(lambda d, s: s))
    torch.testing.assert_close(ours, run_unet(unet, inputs), atol=1e-5, rtol=0)
    assert (ours - baseline).abs().max() > 1e-3, "the pure-sparse model is not the unmodified one"


def test_unet_paper_defaults_change_output_and_params_bind_at_call_time(unet):
    inputs = unet_inputs()
    baseline = run_unet(unet, inputs)
    apply_gag(unet, GAGConfig())
    guided = run_unet(unet, inputs)
    assert (guided - baseline).abs().max() > 1e-2
    params = guidance_params(unet)
    with params.bind(torch.tensor(-1.0), torch.tensor(1e9), torch.tensor(1.0)):
        torch.testing.assert_close(run_unet(unet, inputs), baseline, atol=1e-5, rtol=0)
    assert params.scale == 10.0, "bind restores the configured values"
    torch.testing.assert_close(run_unet(unet, inputs), guided, atol=0, rtol=0)


def test_remove_gag_restores_bit_identical_outputs(unet):
    inputs = unet_inputs()
    baseline = run_unet(unet, inputs)
    processors = dict(unet.attn_processors)
    apply_gag(unet, GAGConfig())
    remove_gag(unet)
    assert not is_gag_applied(unet)
    assert dict(unet.attn_processors) == processors
    assert torch.equal(run_unet(unet, inputs), baseline)


def test_gag_applied_restores_on_error(unet):
    processors = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with gag_applied(unet, GAGConfig()) as names:
            assert is_gag_applied(unet) and names
            raise RuntimeError("boom")
    assert dict(unet.attn_processors) == processors


def test_reapplying_replaces_previous_rewrite(unet):
    apply_gag(unet, GAGConfig(layers="all"))
    names = apply_gag(unet, GAGConfig(layers="mid"))
    remove_gag(unet)
    assert len(names) == 2
    assert not any(isinstance(p, attention.GAGAttnProcessor) for p in unet.attn_processors.values())


def test_bad_targets_raise_clear_errors(unet):
    with pytest.raises(InvalidInputError, match="selects no attention layer"):
        apply_gag(unet, GAGConfig(layers="nothing_here.*"))
    with pytest.raises(InvalidInputError, match="cannot rewrite a Linear"):
        apply_gag(torch.nn.Linear(2, 2), GAGConfig())
    with pytest.raises(InvalidInputError, match="not applied"):
        guidance_params(unet)


# ------------------------------------------------------------------ FLUX


def test_flux_selects_every_joint_attention(flux):
    names = apply_gag(flux, GAGConfig())
    assert names == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
    assert apply_gag(flux, GAGConfig(layers="transformer_blocks.*")) == ["transformer_blocks.0.attn"]


def test_flux_identity_reproduces_unmodified_model(flux):
    inputs = flux_inputs(batch=2)
    baseline = run_flux(flux, inputs)
    apply_gag(flux, IDENTITY)
    torch.testing.assert_close(run_flux(flux, inputs), baseline, atol=1e-5, rtol=0)


def test_flux_pladis_identity_against_full_matrix_reference(flux, monkeypatch):
    w = 3.0
    inputs = flux_inputs()
    apply_gag(flux, GAGConfig(scale=w - 1, eta=1e9, zeta=1.0))
    ours = run_flux(flux, inputs)

    def reference(q, k, v, text_len, scale, eta, zeta, alpha=1.5, method="sort"):
        q, k, v = q.double(), k.double(), v.double()
        z = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        joint = torch.softmax(z, -1) @ v
        z_txt = z[:, :, text_len:, :text_len]
        dense = torch.softmax(z_txt, -1) @ v[:, :, :text_len]
        sparse = entmax15_reference(z_txt, dim=-1) @ v[:, :, :text_len]
        mass = torch.softmax(z[:, :, text_len:], -1)[..., :text_len].sum(-1, keepdim=True)
        joint[:, :, text_len:] += mass * (w * (sparse - dense))
        return joint.float()

    monkeypatch.setattr(attention, "gag_joint_attention", reference)
    torch.testing.assert_close(ours, run_flux(flux, inputs), atol=1e-5, rtol=0)


def test_flux_defaults_change_output_and_remove_restores(flux):
    inputs = flux_inputs()
    baseline = run_flux(flux, inputs)
    with gag_applied(flux, GAGConfig()):
        guided = run_flux(flux, inputs)
    assert (guided - baseline).abs().max() > 1e-3
    assert torch.equal(run_flux(flux, inputs), baseline)
    assert not flux._forward_pre_hooks, "the text-length hook is removed with the processors"
