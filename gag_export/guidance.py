"""Geometry-Aware Attention Guidance (GAG): the math, once, for every model and backend.

Spec: `shared/GAG.md`. Per attention layer the scores are computed once and shared by a
dense (softmax) and a sparse (1.5-entmax) branch; the update from dense to sparse is split
into the part parallel to the sparse output (kept) and the orthogonal part (weighted by
`zeta`), its norm is capped at `eta`, and `scale` extrapolates along it:

    out = S + scale * cap_eta(par + zeta * orth),   delta = S - D

Everything here is plain tensor arithmetic with no Python branching on the guidance values,
so `scale`, `eta` and `zeta` can be 0-d tensors that become ONNX graph inputs.
This module imports only torch (and the project's error types).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .core.errors import InvalidInputError

ENTMAX_METHODS = ("sort", "bisect")
# gag_attention also takes "fused" (the Triton kernel, or an error) and "auto" (fused on CUDA
# when it can run, else "bisect"); the rule is in gag_export/kernels/__init__.py.
ATTENTION_METHODS = ENTMAX_METHODS + ("fused", "auto")
_EPS = 1e-6
# The bisect form: a few bisection steps bracket the threshold from below, a few Newton steps
# (monotone from below, since the mass is convex and decreasing in tau) close in on it, and the
# closed-form solve on the support found makes it exact. An element wrongly counted in that
# support lies within the Newton error of the threshold and moves the result only to second
# order. 4 + 3 steps matched the `entmax` package to 1.4e-6 on 2 to 4096 keys of random,
# uniform, clustered and one-dominant scores at scales 0.5 to 50 (16 plain bisection steps:
# the same error at twice the cost on a 4096x77 SDXL cross-attention map).
_BISECT_ITERS = 4
_NEWTON_ITERS = 3
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
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = _sum_of_squares((x - mid).relu_()) >= 1.0  # in place: no second temporary
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    tau = lo
    for _ in range(_NEWTON_ITERS):  # Newton on sum((x - tau)_+^2) = 1, staying below the root
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


def gag_combine(dense: torch.Tensor, sparse: torch.Tensor, scale: Scalar, eta: Scalar, zeta: Scalar) -> torch.Tensor:
    """The GAG update on [..., head_dim] outputs: S + scale * cap_eta(par + zeta * orth).

    `par` is the projection of delta = S - D onto S, per row over head_dim. Works in the dtype
    of its inputs (callers pass fp32). `scale`, `eta`, `zeta` may be floats or 0-d tensors.
    """
    delta = sparse - dense
    coeff = (delta * sparse).sum(dim=-1, keepdim=True) / ((sparse * sparse).sum(dim=-1, keepdim=True) + _EPS)
    parallel = coeff * sparse
    guided = parallel + zeta * (delta - parallel)
    norm = torch.linalg.vector_norm(guided, dim=-1, keepdim=True)
    guided = guided * (eta / (norm + _EPS)).clamp(max=1.0)
    return sparse + scale * guided


# --------------------------------------------------------------------------- attention


def _masked_scores(scores: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a diffusers-style mask: boolean (True = attend) or additive."""
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask.float()


def _scores(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    z = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return _masked_scores(z, attn_mask)


def _dense_and_sparse(z: torch.Tensor, v: torch.Tensor, alpha: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches from one score tensor: softmax(z) @ v and entmax(z) @ v (fp32)."""
    vf = v.float()
    dense = torch.matmul(torch.softmax(z, dim=-1), vf)
    sparse = torch.matmul(sparse_attention_probs(z, alpha, method), vf)
    return dense, sparse


def gag_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Scalar,
    eta: Scalar,
    zeta: Scalar,
    alpha: float = 1.5,
    method: str = "sort",
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GAG attention: q [B,H,Lq,d], k/v [B,H,Lk,d] -> [B,H,Lq,d] in q's dtype, fp32 inside.

    method: "sort" / "bisect" (PyTorch), "fused" (Triton kernel; raises where it cannot run),
    "auto" (fused on CUDA where it can run, else bisect; exports always get the PyTorch path).
    """
    if method in ("fused", "auto"):
        from .kernels import run_fused_if_chosen  # lazy: Triton only when used

        method, fused = run_fused_if_chosen(method, q, k, v, alpha, attn_mask, scale, eta, zeta)
        if fused is not None:
            return fused
    if COMPILE_REGION and _pytorch_gag_region is not None and torch.compiler.is_dynamo_compiling():
        from .kernels import _exporting

        if not _exporting():
            return _pytorch_gag_region(q, k, v, scale, eta, zeta, alpha, method, attn_mask)
    return _pytorch_gag(q, k, v, scale, eta, zeta, alpha, method, attn_mask)


def _pytorch_gag(q, k, v, scale, eta, zeta, alpha, method, attn_mask, minus_dense: bool = False) -> torch.Tensor:
    """The PyTorch path of `gag_attention` (sort or bisect entmax); `minus_dense`: GAG - dense, in fp32."""
    z = _scores(q, k, attn_mask)
    dense, sparse = _dense_and_sparse(z, v, alpha, method)
    guided = gag_combine(dense, sparse, scale, eta, zeta)
    return guided - dense if minus_dense else guided.to(q.dtype)


# Under torch.compile (never under export) the PyTorch path is one nested compile region: the 60
# GAG layers of an SDXL UNet share two shapes, so dynamo traces and Inductor compiles the core once
# per shape instead of inlining its unrolled bisect/Newton steps 60 times. Measured: on an H200
# (torch 2.11) the inlined GAG UNet had not compiled after 170 s against 90 s for the plain one;
# on CPU (tiny UNet) the region brings GAG compile time to the plain level, same outputs
# (benchmarks/README.md, "Fused GAG kernel"). COMPILE_REGION = False inlines it again.
COMPILE_REGION = True
_pytorch_gag_region = (
    torch.compiler.nested_compile_region(_pytorch_gag) if hasattr(torch.compiler, "nested_compile_region") else None
)


JOINT_PAD = 8  # extra head channels of joint attention's q/k/v (see gag_joint_attention)


def gag_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_len: int,
    scale: Scalar,
    eta: Scalar,
    zeta: Scalar,
    alpha: float = 1.5,
    method: str = "sort",
) -> torch.Tensor:
    """MMDiT joint attention over [text; image] tokens with GAG on image-query x text-key only.

    Image queries get  joint_dense + m * (GAG_txt - D_txt), where D_txt/S_txt attend over the
    text keys alone and m is the text keys' share of the dense softmax mass. Text queries and
    image keys are left as the plain joint attention. m comes out of the same dense attention
    call: an extra value channel that is 1 on text keys and 0 on image keys averages to m.
    `method` as `gag_attention`'s: "fused"/"auto" run the fused kernel on the image-query x
    text-key part (it returns GAG_txt - D_txt directly, in fp32), with the same checks on those
    shapes.
    """
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
    dense_joint, text_mass = joint[..., :d], joint[..., d : d + 1]

    q_img, k_txt, v_txt = q[:, :, text_len:], k[:, :, :text_len], v[:, :, :text_len]
    update = None
    if method in ("fused", "auto"):
        from .kernels import run_fused_if_chosen  # lazy: Triton only when used

        method, update = run_fused_if_chosen(method, q_img, k_txt, v_txt, alpha, None, scale, eta, zeta, minus_dense=True)
    if update is None:
        z_txt = _scores(q_img, k_txt, None)
        dense_txt, sparse_txt = _dense_and_sparse(z_txt, v_txt, alpha, method)
        update = gag_combine(dense_txt, sparse_txt, scale, eta, zeta) - dense_txt
    image_out = dense_joint[:, :, text_len:].float() + text_mass[:, :, text_len:].float() * update  # update: fp32 either way
    return torch.cat([dense_joint[:, :, :text_len], image_out.to(dense_joint.dtype)], dim=2).to(q.dtype)


# --------------------------------------------------------------------------- configuration

BLOCK_KEYWORDS = ("all", "down", "mid", "up")


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
        if not math.isfinite(self.scale):
            raise bad("scale", "must be finite")
        if math.isnan(self.eta) or self.eta <= 0:
            raise bad("eta", "must be > 0 (inf disables the norm cap)")
        if not math.isfinite(self.zeta) or self.zeta < 0:
            raise bad("zeta", "must be finite and >= 0")
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
