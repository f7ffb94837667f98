"""Geometry-Aware Attention Guidance (GAG): the math, once, for every model and backend.

Spec: `shared/GAG.md`. Per attention layer the scores are computed once and shared by a
dense (softmax) and a sparse (1.5-entmax) branch; the update from dense to sparse is split
into the part parallel to the sparse output (kept) and the orthogonal part (weighted by
`zeta`), its norm is capped at `eta`, and `scale` extrapolates along it:

    out = S + scale * cap_eta(par + zeta * orth),   delta = S - D

Everything here is plain tensor arithmetic with no Python branching on the guidance values,
so `scale`, `eta` and `zeta` can be 0-d tensors that become ONNX graph inputs.
This module imports only torch and `core`; the fused kernels (`kernels/`) import it, and the
dispatch (`dispatch.py`) picks between them. No private name crosses a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import InvalidInputError
from ..core.gag_config import ENTMAX_METHODS

_EPS = 1e-6

# The bisect form: a few bisection steps bracket the threshold from below, a few Newton steps
# (monotone from below, since the mass is convex and decreasing in tau) close in on it, and the
# closed-form solve on the support found makes it exact. An element wrongly counted in that
# support lies within the Newton error of the threshold and moves the result only to second
# order. 4 + 3 steps matched the `entmax` package to 1.4e-6 on 2 to 4096 keys of random,
# uniform, clustered and one-dominant scores at scales 0.5 to 50 (16 plain bisection steps:
# the same error at twice the cost on a 4096x77 SDXL cross-attention map).
BISECT_ITERS = 4

NEWTON_ITERS = 3

# After the max-shift, 1.5-entmax's threshold lies in [-1, -n^-1/2]: no score below -1 can be in
# the support. Clamping there changes nothing yet keeps -inf (masked keys) and huge negative
# scores out of the squares and cumulative sums.
_NEVER_IN_SUPPORT = -1.5

Scalar = float | torch.Tensor


# --------------------------------------------------------------------------- entmax


def _shifted(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """(alpha - 1) * (z - max z) in fp32, with scores that can never be in the support clamped."""
    x = scores.float()
    x = (x - x.amax(dim=-1, keepdim=True)) * (alpha - 1.0)
    return x.clamp(min=_NEVER_IN_SUPPORT)


def _sum_of_squares(r: torch.Tensor) -> torch.Tensor:
    # One fused reduction (ReduceL2 in ONNX) instead of a square pass and a sum pass.
    return torch.linalg.vector_norm(r, dim=-1, keepdim=True).square()


def _tau_from_support(x: torch.Tensor, in_support: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax threshold given the support set (Peters et al. 2019, eq. for tau)."""
    k = in_support.sum(dim=-1, keepdim=True).to(x.dtype).clamp(min=1.0)  # float: TensorRT has no int64 Clip
    x_in = torch.where(in_support, x, 0.0)
    mean = x_in.sum(dim=-1, keepdim=True) / k
    mean_sq = _sum_of_squares(x_in) / k
    delta = (1.0 - k * (mean_sq - mean * mean)) / k
    return mean - delta.clamp(min=0.0).sqrt()


def _entmax15_sort(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    # topk with a Python-int k exports as TopK with a constant K (TensorRT requires that).
    xs = torch.topk(x, k=n, dim=-1).values
    ks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    mean = xs.cumsum(dim=-1) / ks
    mean_sq = (xs * xs).cumsum(dim=-1) / ks
    delta = (1.0 - ks * (mean_sq - mean * mean)) / ks
    tau_k = mean - delta.clamp(min=0.0).sqrt()
    support_size = (tau_k <= xs).sum(dim=-1, keepdim=True)
    tau = tau_k.gather(-1, support_size - 1)
    return (x - tau).clamp(min=0.0).square()


def _entmax_threshold_bisect(x: torch.Tensor, alpha: float, iters: int) -> torch.Tensor:
    """Lower end of a bisection bracket of the threshold: sum((x - tau)_+^(1/(alpha-1))) = 1."""
    n = x.shape[-1]
    power = 1.0 / (alpha - 1.0)
    lo = torch.full_like(x[..., :1], -1.0)  # p_max = 1 here: the mass is >= 1
    hi = torch.full_like(lo, -((1.0 / n) ** (alpha - 1.0)))  # every p <= 1/n: the mass is <= 1
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mass = (x - mid).clamp(min=0.0).pow(power).sum(dim=-1, keepdim=True)
        above = mass >= 1.0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return lo


def _entmax15_bisect(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    lo = torch.full_like(x[..., :1], -1.0)  # the bracket of `_entmax_threshold_bisect`, squares fused
    hi = torch.full_like(lo, -((1.0 / n) ** 0.5))
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = _sum_of_squares((x - mid).relu_()) >= 1.0  # in place: no second temporary
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    tau = lo
    for _ in range(NEWTON_ITERS):  # Newton on sum((x - tau)_+^2) = 1, staying below the root
        r = (x - tau).relu_()
        tau = tau + (_sum_of_squares(r) - 1.0) / (2.0 * r.sum(dim=-1, keepdim=True))
    tau = _tau_from_support(x, x > tau)
    p = (x - tau).relu_().square_()
    return p / p.sum(dim=-1, keepdim=True)


def entmax15(scores: torch.Tensor, dim: int = -1, method: str = "sort") -> torch.Tensor:
    """Exact 1.5-entmax of `scores` along `dim`, computed in fp32, returned in fp32.

    `method="sort"` is the sort-based form of GAG.md (TopK over the keys); `method="bisect"`
    brackets the threshold by a fixed number of bisection steps and then solves it exactly on
    the bracketed support, with no sort, so it exports without TopK (any key count in TensorRT).
    """
    if method not in ENTMAX_METHODS:
        raise InvalidInputError(f"entmax method must be one of {ENTMAX_METHODS}, got {method!r}")
    x = _shifted(scores.movedim(dim, -1), alpha=1.5)
    p = _entmax15_sort(x) if method == "sort" else _entmax15_bisect(x)
    return p.movedim(-1, dim)


def entmax_alpha(scores: torch.Tensor, alpha: float, dim: int = -1, iters: int = 40) -> torch.Tensor:
    """alpha-entmax for any alpha > 1 by bisection (1.5 uses the exact forms of `entmax15`)."""
    x = _shifted(scores.movedim(dim, -1), alpha=alpha)
    tau = _entmax_threshold_bisect(x, alpha, iters)
    p = (x - tau).clamp(min=0.0).pow(1.0 / (alpha - 1.0))
    return (p / p.sum(dim=-1, keepdim=True)).movedim(-1, dim)


def sparse_attention_probs(scores: torch.Tensor, alpha: float = 1.5, method: str = "sort") -> torch.Tensor:
    """The sparse branch's attention map over the last dim (fp32)."""
    if alpha == 1.5:
        return entmax15(scores, dim=-1, method=method)
    return entmax_alpha(scores, alpha, dim=-1)


# --------------------------------------------------------------------------- combination


def _uncapped_update(dense: torch.Tensor, sparse: torch.Tensor, zeta: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """(par + zeta * orth, its norm over head_dim, keepdim): the update before the cap, computed once
    for `gag_combine` and for `update_norms` (what calibration measures is what the cap sees)."""
    delta = sparse - dense
    coeff = (delta * sparse).sum(dim=-1, keepdim=True) / ((sparse * sparse).sum(dim=-1, keepdim=True) + _EPS)
    parallel = coeff * sparse
    guided = parallel + zeta * (delta - parallel)
    return guided, torch.linalg.vector_norm(guided, dim=-1, keepdim=True)


def gag_combine(dense: torch.Tensor, sparse: torch.Tensor, scale: Scalar, eta: Scalar, zeta: Scalar) -> torch.Tensor:
    """The GAG update on [..., head_dim] outputs: S + scale * cap_eta(par + zeta * orth).

    `par` is the projection of delta = S - D onto S, per row over head_dim. Works in the dtype
    of its inputs (callers pass fp32). `scale`, `eta`, `zeta` may be floats or 0-d tensors.
    """
    guided, norm = _uncapped_update(dense, sparse, zeta)
    guided = guided * (eta / (norm + _EPS)).clamp(max=1.0)
    return sparse + scale * guided


def update_norms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zeta: Scalar, alpha: float, method: str,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """||par + zeta * orth|| per (batch, head, query token), before the cap: [B, H, Lq] in fp32.

    For observers (calibration): the attention processors call it only when one is set, so
    sampling and exported graphs never compute it. `method` is an entmax method ("sort"/"bisect").
    """
    dense, sparse = dense_and_sparse(scores(q, k, attn_mask), v, alpha, method)
    return _uncapped_update(dense, sparse, zeta)[1].squeeze(-1)


# --------------------------------------------------------------------------- attention


def _masked_scores(scores: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a diffusers-style mask: boolean (True = attend) or additive."""
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask.float()


def scores(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    z = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return _masked_scores(z, attn_mask)


def dense_and_sparse(z: torch.Tensor, v: torch.Tensor, alpha: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches from one score tensor: softmax(z) @ v and entmax(z) @ v (fp32)."""
    vf = v.float()
    dense = torch.matmul(torch.softmax(z, dim=-1), vf)
    sparse = torch.matmul(sparse_attention_probs(z, alpha, method), vf)
    return dense, sparse


def torch_gag(q, k, v, scale, eta, zeta, alpha, method, attn_mask, minus_dense: bool = False) -> torch.Tensor:
    """The PyTorch path of `gag_attention` (sort or bisect entmax); `minus_dense`: GAG - dense, in fp32."""
    z = scores(q, k, attn_mask)
    dense, sparse = dense_and_sparse(z, v, alpha, method)
    guided = gag_combine(dense, sparse, scale, eta, zeta)
    return guided - dense if minus_dense else guided.to(q.dtype)


# --------------------------------------------------------------------------- joint attention (MMDiT)

JOINT_PAD = 8  # extra head channels of joint attention's q/k/v (see gag_joint_attention)


def joint_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the plain joint attention over [text; image] keys, the text keys' share m of its softmax mass),
    from one dense attention call: an extra value channel, 1 on text keys and 0 on image keys,
    averages to m."""
    d = q.shape[-1]
    key_is_text = (torch.arange(k.shape[2], device=k.device) < text_len).to(v.dtype)
    # broadcast by Expand, not by adding zeros: an Add in the graph, exact as it is, is arithmetic
    # in the model's 16-bit type inside a GAG layer (check's precision rule)
    indicator = key_is_text[:, None].expand(*v.shape[:-1], 1)
    # SDPA's flash kernels (CPU and CUDA) need q, k and v of one head size, a multiple of 8 on
    # CUDA: with v alone one channel wider, SDPA ran its math backend, which holds the whole
    # [L, L] score matrix (2.2x the plain attention's time on CPU at 4 heads x 2048 tokens x 128).
    # So all three get JOINT_PAD zero channels more: zeros in q and k leave every score as it
    # was (the scale stays 1/sqrt(d)); v's first extra channel is the indicator (1.10x there).
    values = F.pad(torch.cat([v, indicator], dim=-1), (0, JOINT_PAD - 1))
    joint = F.scaled_dot_product_attention(F.pad(q, (0, JOINT_PAD)), F.pad(k, (0, JOINT_PAD)), values, scale=d**-0.5)
    return joint[..., :d], joint[..., d : d + 1]


def torch_joint_update(q_img: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, scale: Scalar, eta: Scalar,
                       zeta: Scalar, alpha: float, method: str) -> torch.Tensor:
    """GAG_txt - D_txt for image queries over the text keys alone (fp32), the PyTorch way."""
    z_txt = scores(q_img, k_txt, None)
    dense_txt, sparse_txt = dense_and_sparse(z_txt, v_txt, alpha, method)
    return gag_combine(dense_txt, sparse_txt, scale, eta, zeta) - dense_txt


def joint_output(dense_joint: torch.Tensor, text_mass: torch.Tensor, update: torch.Tensor, text_len: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Image queries: joint_dense + m * update (fp32); text queries: the plain joint attention."""
    image_out = dense_joint[:, :, text_len:].float() + text_mass[:, :, text_len:].float() * update  # update: fp32 either way
    return torch.cat([dense_joint[:, :, :text_len], image_out.to(dense_joint.dtype)], dim=2).to(dtype)


__all__ = [
    "BISECT_ITERS", "JOINT_PAD", "NEWTON_ITERS", "Scalar", "dense_and_sparse", "entmax15", "entmax_alpha", "gag_combine",
    "joint_dense", "joint_output", "scores", "sparse_attention_probs", "torch_gag", "torch_joint_update",
    "update_norms",
]
