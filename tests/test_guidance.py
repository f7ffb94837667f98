"""GAG math against the spec (shared/GAG.md) and the `entmax` package as oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from entmax import entmax15 as entmax15_reference

from gag_export.core.errors import InvalidInputError
from gag_export.gag import GAGConfig, entmax15, entmax_alpha, gag_attention, gag_combine, gag_joint_attention, parse_layer_spec
from gag_export.core.gag_config import layer_matches

METHODS = ("sort", "bisect")
NO_CAP = 1e9


def qkv(b=2, h=3, lq=16, lk=77, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))


def branches(q, k, v):
    """Reference D and S straight from the spec, with the entmax package for the sparse map."""
    z = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    dense = torch.softmax(z, -1) @ v.double()
    sparse = entmax15_reference(z, dim=-1) @ v.double()
    return dense, sparse


# ------------------------------------------------------------------ entmax15


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 1e3])
def test_entmax15_matches_reference(method, scale):
    z = torch.randn(4, 6, 77, generator=torch.Generator().manual_seed(1)) * scale
    p = entmax15(z, method=method)
    torch.testing.assert_close(p, entmax15_reference(z, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 6), atol=1e-5, rtol=0)
    assert (p >= 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_entmax15_ties_and_sparsity(method):
    z = torch.zeros(3, 10)
    z[:, :3] = 2.0
    p = entmax15(z, method=method)
    torch.testing.assert_close(p, entmax15_reference(z, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(p[:, :3], torch.full((3, 3), 1 / 3), atol=1e-6, rtol=0)
    assert (p[:, 3:] == 0).all(), "keys far below the threshold get exactly zero mass"


@pytest.mark.parametrize("method", METHODS)
def test_entmax15_masked_keys_get_zero_and_rest_matches(method):
    z = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    masked = z.clone()
    masked[:, 12:] = float("-inf")
    p = entmax15(masked, method=method)
    assert torch.isfinite(p).all()
    assert (p[:, 12:] == 0).all()
    torch.testing.assert_close(p[:, :12], entmax15_reference(z[:, :12], dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_entmax15_low_precision_inputs(dtype, method):
    z = (torch.randn(8, 77, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    p = entmax15(z, method=method)
    assert p.dtype == torch.float32, "entmax runs in fp32 whatever its input"
    torch.testing.assert_close(p, entmax15_reference(z.float(), dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 16, 77, 300, 4096])
def test_entmax15_bisect_on_adversarial_score_shapes(n):
    """Random, uniform, one-dominant and clustered-near-max rows, at small and large scales."""
    g = torch.Generator().manual_seed(n)
    rows = []
    for s in (0.5, 8.0, 50.0):
        dominant = torch.randn(64, n, generator=g)
        dominant[:, 0] += s
        rows += [
            torch.randn(64, n, generator=g) * s,
            torch.rand(64, n, generator=g) * s,
            dominant,
            -torch.rand(64, n, generator=g).pow(3) * s,
        ]
    z = torch.cat(rows)
    torch.testing.assert_close(entmax15(z, method="bisect"), entmax15_reference(z, dim=-1), atol=1e-5, rtol=0)


def test_entmax15_dim_argument_and_bisect_equals_sort():
    z = torch.randn(2, 77, 5, generator=torch.Generator().manual_seed(4)) * 3
    sort, bisect = entmax15(z, dim=1, method="sort"), entmax15(z, dim=1, method="bisect")
    torch.testing.assert_close(sort, entmax15_reference(z, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(bisect, sort, atol=1e-5, rtol=0)


def test_entmax15_rejects_unknown_method():
    with pytest.raises(InvalidInputError, match="method"):
        entmax15(torch.zeros(2, 3), method="heap")


def test_entmax_alpha_general_order():
    z = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(entmax_alpha(z, 1.5), entmax15_reference(z, dim=-1), atol=1e-5, rtol=0)
    near_softmax = entmax_alpha(z, 1.0001, iters=60)
    torch.testing.assert_close(near_softmax, torch.softmax(z, -1), atol=2e-3, rtol=0)


# ------------------------------------------------------------------ GAG identities


@pytest.mark.parametrize("method", METHODS)
def test_identity_unmodified_model(method):
    q, k, v = qkv()
    out = gag_attention(q, k, v, scale=-1.0, eta=NO_CAP, zeta=1.0, method=method)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    inf_cap = gag_attention(q, k, v, scale=-1.0, eta=math.inf, zeta=1.0, method=method)
    torch.testing.assert_close(inf_cap, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("w", [0.5, 2.0, 5.0])
def test_identity_pladis(w):
    q, k, v = qkv(seed=1)
    dense, sparse = branches(q, k, v)
    out = gag_attention(q, k, v, scale=w - 1, eta=NO_CAP, zeta=1.0)
    torch.testing.assert_close(out.double(), dense + w * (sparse - dense), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_identity_scale_zero_is_pure_sparse(method):
    q, k, v = qkv(seed=2)
    _, sparse = branches(q, k, v)
    out = gag_attention(q, k, v, scale=0.0, eta=15.0, zeta=0.0, method=method)
    torch.testing.assert_close(out.double(), sparse, atol=1e-5, rtol=0)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-2, "pure sparse is not the unmodified model"


def test_eta_to_zero_gives_sparse():
    q, k, v = qkv(seed=3)
    _, sparse = branches(q, k, v)
    out = gag_attention(q, k, v, scale=10.0, eta=1e-7, zeta=0.5)
    torch.testing.assert_close(out.double(), sparse, atol=1e-5, rtol=0)


def test_paper_defaults_change_output_and_respect_cap():
    q, k, v = qkv(seed=4)
    dense, sparse = branches(q, k, v)
    cfg = GAGConfig()
    out = gag_attention(q, k, v, cfg.scale, cfg.eta, cfg.zeta).double()
    assert (out - dense).abs().max() > 0.1
    update = (out - sparse) / cfg.scale
    assert update.norm(dim=-1).max() <= cfg.eta * (1 + 1e-5)
    small_cap = gag_attention(q, k, v, 10.0, 0.01, 0.0).double()
    assert ((small_cap - sparse) / 10.0).norm(dim=-1).max() <= 0.01 * (1 + 1e-4)


def test_gag_combine_projection_geometry():
    g = torch.Generator().manual_seed(5)
    dense, sparse = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    # zeta = 0 keeps only the part of delta parallel to S: the update is collinear with S.
    update = gag_combine(dense, sparse, 1.0, NO_CAP, 0.0) - sparse
    cos = F.cosine_similarity(update, sparse, dim=-1).abs()
    torch.testing.assert_close(cos, torch.ones(50), atol=1e-5, rtol=0)
    # zeta = 1 keeps all of delta.
    torch.testing.assert_close(gag_combine(dense, sparse, 1.0, NO_CAP, 1.0), 2 * sparse - dense, atol=1e-5, rtol=0)


def test_tensor_parameters_equal_float_parameters():
    q, k, v = qkv(seed=6)
    as_float = gag_attention(q, k, v, 3.0, 2.0, 0.25)
    as_tensor = gag_attention(q, k, v, torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0.25))
    torch.testing.assert_close(as_tensor, as_float, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_same_dtype_out(dtype):
    q, k, v = qkv(seed=7)
    ref = gag_attention(q, k, v, 10.0, 15.0, 0.0)
    out = gag_attention(q.to(dtype), k.to(dtype), v.to(dtype), 10.0, 15.0, 0.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_boolean_and_additive_masks_ignore_masked_keys():
    q, k, v = qkv(lk=20, seed=8)
    keep = torch.ones(20, dtype=torch.bool)
    keep[13:] = False
    bool_out = gag_attention(q, k, v, 10.0, 15.0, 0.3, attn_mask=keep)
    additive = torch.zeros(20).masked_fill(~keep, -10000.0)
    add_out = gag_attention(q, k, v, 10.0, 15.0, 0.3, attn_mask=additive)
    subset = gag_attention(q, k[:, :, :13], v[:, :, :13], 10.0, 15.0, 0.3)
    torch.testing.assert_close(bool_out, subset, atol=1e-5, rtol=0)
    torch.testing.assert_close(add_out, subset, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ joint (MMDiT) form


def joint_reference(q, k, v, text_len, scale, eta, zeta):
    """GAG.md's text-partition rule with full score matrices, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    z = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    joint = torch.softmax(z, -1) @ v
    z_txt = z[:, :, text_len:, :text_len]
    dense_txt = torch.softmax(z_txt, -1) @ v[:, :, :text_len]
    sparse_txt = entmax15_reference(z_txt, dim=-1) @ v[:, :, :text_len]
    mass = torch.exp(torch.logsumexp(z_txt, -1, keepdim=True) - torch.logsumexp(z[:, :, text_len:], -1, keepdim=True))
    guided = gag_combine(dense_txt, sparse_txt, scale, eta, zeta)
    out = joint.clone()
    out[:, :, text_len:] = joint[:, :, text_len:] + mass * (guided - dense_txt)
    return out


@pytest.mark.parametrize("params", [(10.0, 15.0, 0.0), (3.0, 0.5, 0.7), (0.0, 15.0, 0.0)])
def test_joint_attention_matches_spec(params):
    q, k, v = qkv(lq=24, lk=24, seed=9)
    out = gag_joint_attention(q, k, v, 7, *params)
    torch.testing.assert_close(out.double(), joint_reference(q, k, v, 7, *params), atol=1e-5, rtol=0)


def test_joint_attention_identity_and_text_queries_untouched():
    q, k, v = qkv(lq=24, lk=24, seed=10)
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(gag_joint_attention(q, k, v, 7, -1.0, NO_CAP, 1.0), plain, atol=1e-5, rtol=0)
    guided = gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0)
    torch.testing.assert_close(guided[:, :, :7], plain[:, :, :7], atol=1e-6, rtol=0)
    assert (guided[:, :, 7:] - plain[:, :, 7:]).abs().max() > 1e-2


def test_joint_attention_dense_call_runs_on_the_flash_backend():
    # one head size for q, k and v (a multiple of 8): with v alone a channel wider, SDPA could only
    # run its math backend, which holds the whole score matrix (2.2x the time on CPU)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(lq=40, lk=40, d=16, seed=11)
    with sdpa_kernel(SDPBackend.MATH):
        expected = gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"zeta": -0.1}, "zeta"),
        ({"zeta": float("nan")}, "zeta"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 0.5}, "alpha"),
        ({"method": "heap"}, "method"),
        ({"layers": "middle"}, "layers"),
        ({"layers": ""}, "layers"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GAGConfig.{field}"):
        GAGConfig(**kwargs)


def test_config_accepts_identity_values_and_round_trips():
    cfg = GAGConfig(scale=-1.0, eta=math.inf, zeta=1.0, layers="mid, down_blocks.1.*")
    assert GAGConfig(**cfg.to_dict()) == cfg
    assert cfg.layer_parts == ("mid", "down_blocks.1.*")


def test_layer_matching():
    parts = parse_layer_spec("down,up")
    assert layer_matches("down_blocks.1.attentions.0.transformer_blocks.0.attn2", parts)
    assert layer_matches("up_blocks.0.attentions.1.transformer_blocks.0.attn2", parts)
    assert not layer_matches("mid_block.attentions.0.transformer_blocks.0.attn2", parts)
    assert layer_matches("mid_block.attentions.0.transformer_blocks.0.attn2", parse_layer_spec("mid"))
    assert not layer_matches("up_blocks.0.x.attn2", parse_layer_spec("down_blocks.*"))
