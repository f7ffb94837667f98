"""Fused GAG attention in Triton: scores once, softmax and 1.5-entmax in registers, one write.

One program per (batch * head, block of queries). It loads the block's queries and *all* the
keys and values of its (batch, head) once (text-length key counts: 77 for CLIP, up to 512 for
T5), computes the scores once, then in registers:

    dense  = softmax(z) @ v
    sparse = entmax15(z) @ v      # threshold: bisection + Newton bracket, then the exact
                                  # closed-form solve on the bracketed support (as gag/math.py)
    out    = sparse + scale * cap_eta(par + zeta * orth)

and writes only `out` (in the input dtype). With LATE_VALUES (the second of `KERNEL_FORMS`, for
GPUs whose shared memory cannot hold keys and values at once) v is loaded and both P @ V products
run after the entmax. The keys sit in a power-of-two main tile plus, where that saves columns, a
small power-of-two tail tile (77 keys: 64 + 16 instead of 128 padded), since every per-score step
costs per column, padding included; each step runs on both tiles and sums its row reductions
across them. Both branches multiply unnormalized weights (exp(z - max) and
(x - tau)_+^2, both in [0, 1]) by v and scale the [BLOCK_M, head_dim] products by 1 / row sum.

Math is fp32 throughout: scores from 16-bit inputs are exact fp32 products with fp32
accumulation; the probability-times-value products of 16-bit inputs use two 16-bit dots
(probabilities split into a high and a low 16-bit part) so that they stay at fp32-level accuracy
on tensor cores; fp32 inputs use IEEE fp32 dots.

The launcher is registered as the custom op `gag_export::gag_attention` (with a fake
implementation), so `torch.compile` sees one node. This module imports Triton: import it only
through `gag_export.gag.kernels`, which checks that Triton is there first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ...core.errors import InvalidInputError
from . import block_sizes

log = logging.getLogger(__name__)

_EPS = 1e-6
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _key_tile(
    q, k_base, v_base, m_rows, m_ok, offs_d, d_ok, start, Lk,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, sm_scale,
    BLOCK_N: tl.constexpr, FULL: tl.constexpr, MASK_MODE: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    UPCAST: tl.constexpr, LATE_VALUES: tl.constexpr,
):
    """Scores z [BLOCK_M, BLOCK_N] and values v [BLOCK_N, BLOCK_D] of keys start .. start + BLOCK_N - 1.

    Masked-out and padding keys score -inf (keys out by an additive per-query mask: -FLT_MAX x
    sm_scale). FULL: the launcher guarantees every key of the tile exists, so no bounds mask (a
    select per score element) is spent on it. MASK_PER_KEY: the
    mask is the same for every query (a text-padding mask), `m_rows` is one pointer and one row
    of it is loaded and broadcast. A mask that varies per query is loaded as a [queries, keys]
    tile and given to the score dot as its accumulator (bias / sm_scale; -inf where a boolean
    mask drops the key), so that it meets the scores in their layout once: applied after the
    dot, the compiler converted the scores' layout in every bisection and Newton step (seen in
    the TTGIR; 1.95x the instructions of no mask, 1.16x this way). LATE_VALUES: v is loaded
    after the entmax instead (`_value_tile`); the v returned is a placeholder, never used.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    if FULL:
        k_ok = d_ok[:, None]
    else:
        n_ok = offs_n < Lk
        k_ok = d_ok[:, None] & n_ok[None, :]
    kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn, mask=k_ok, other=0.0)  # K^T
    if LATE_VALUES:
        v = kt
    else:  # issued before the dot, so the load overlaps it
        v = _value_tile(v_base, offs_d, d_ok, start, Lk, stride_vn, stride_vd, BLOCK_N, FULL, UPCAST)
    if UPCAST:
        kt = kt.to(tl.float32)
    if MASK_MODE != 0 and not MASK_PER_KEY:  # the mask tile as the dot's accumulator (see above)
        m_ptrs = m_rows[:, None] + offs_n[None, :] * stride_mn
        if FULL:
            mm = m_ok[:, None]
        else:
            mm = m_ok[:, None] & n_ok[None, :]
        if MASK_MODE == 1:
            # clamped to -FLT_MAX: a finite bias below -FLT_MAX * sm_scale (torch.finfo(float32).min,
            # as some pipelines mask) would overflow to -inf here, and a row masked everywhere
            # with it give NaN where the PyTorch path, adding it unscaled, stays finite. -inf
            # becomes -FLT_MAX too, which scores a key out just the same (keeping -inf apart with a
            # select cost 1.3% more executed instructions at the SDXL tile on sm_90 with Triton 3.9;
            # this, 0.8% over no clamp)
            bias = tl.load(m_ptrs, mask=mm, other=0.0).to(tl.float32)
            acc = tl.maximum(bias / sm_scale, -3.4028234663852886e38)
        else:
            acc = tl.where(tl.load(m_ptrs, mask=mm, other=1) != 0, 0.0, float("-inf"))
        z = tl.dot(q, kt, acc, input_precision="ieee") * sm_scale
    else:
        z = tl.dot(q, kt, input_precision="ieee") * sm_scale  # fp32 accumulation; IEEE for fp32 inputs
    if MASK_MODE != 0 and MASK_PER_KEY:
        m_ptrs = m_rows + offs_n * stride_mn
        if MASK_MODE == 1:
            bias = tl.load(m_ptrs) if FULL else tl.load(m_ptrs, mask=n_ok, other=0.0)
            z = z + bias.to(tl.float32)[None, :]
        else:
            keep = tl.load(m_ptrs) if FULL else tl.load(m_ptrs, mask=n_ok, other=1)
            z = tl.where(keep[None, :] != 0, z, float("-inf"))
    if not FULL:
        z = tl.where(n_ok[None, :], z, float("-inf"))
    return z, v


@triton.jit
def _value_tile(v_base, offs_d, d_ok, start, Lk, stride_vn, stride_vd, BLOCK_N: tl.constexpr, FULL: tl.constexpr, UPCAST: tl.constexpr):
    """Values v [BLOCK_N, BLOCK_D] of keys start .. start + BLOCK_N - 1 (padding keys: 0)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if FULL:
        v_ok = d_ok[None, :]
    else:
        v_ok = (offs_n < Lk)[:, None] & d_ok[None, :]
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=v_ok, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _mass(x, tau):
    """Per row: sum((x - tau)_+^2) (the entmax mass) and sum((x - tau)_+) (half its slope)."""
    r = tl.maximum(x - tau[:, None], 0.0)
    return tl.sum(r * r, 1), tl.sum(r, 1)


@triton.jit
def _support_stats(x, tau):
    """Per row over the support x > tau: its size, sum(x) and sum(x^2)."""
    support = x > tau[:, None]
    xs = tl.where(support, x, 0.0)
    return tl.sum(support.to(tl.float32), 1), tl.sum(xs, 1), tl.sum(xs * xs, 1)


@triton.jit
def _pv(p, v, acc, SPLIT_PV: tl.constexpr):
    """acc + p @ v. 16-bit v: p as a high and a low 16-bit part, two dots, fp32-level accuracy.

    The unnormalized weights lie in [0, 1] as normalized ones would, so the split is as exact as
    before (in fp16 the low part of a weight below 2^-14 meets the same subnormal floor).
    """
    if SPLIT_PV:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot(p_lo, v, acc)
    else:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    return acc


@triton.jit
def gag_attention_kernel(
    Q, K, V, Out, Mask, Params,
    scale_f, eta_f, zeta_f,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, Lq, Lk, head_dim,
    sm_scale, tau_hi,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N2: tl.constexpr,  # keys in the tail tile after the main BLOCK_N (0: no tail)
    MASK_MODE: tl.constexpr,  # 0: none, 1: additive, 2: boolean (nonzero = attend)
    MASK_PER_KEY: tl.constexpr,  # the mask does not vary over queries (stride_mm == 0)
    PARAMS_FROM_PTR: tl.constexpr,  # scale/eta/zeta from Params[0..2] instead of the float args
    SPLIT_PV: tl.constexpr,  # 16-bit inputs: P @ V as hi + lo 16-bit dots
    UPCAST: tl.constexpr,  # dot fp32 copies of the inputs (Triton's CPU interpreter has no bf16 dot)
    BISECT_ITERS: tl.constexpr,
    NEWTON_ITERS: tl.constexpr,
    MINUS_DENSE: tl.constexpr,  # write out - dense: the update joint attention (FLUX) adds
    LATE_VALUES: tl.constexpr,  # load V after the entmax: K and V never in shared memory at once
):
    # The keys are a main tile of BLOCK_N plus, when BLOCK_N2 > 0, a tail tile of BLOCK_N2 (77
    # keys: 64 + 16 columns instead of 128). Every per-key step runs on both tiles and sums its
    # row reductions across them; with a tail the main tile is full (Lk > BLOCK_N, see `key_tiles`).
    TAIL: tl.constexpr = BLOCK_N2 > 0
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < head_dim

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if MASK_PER_KEY:
        m_rows = Mask + b * stride_mb + h * stride_mh
    else:
        m_rows = Mask + b * stride_mb + h * stride_mh + offs_m * stride_mm

    # ---- scores, once per tile
    z, v = _key_tile(q, k_base, v_base, m_rows, m_ok, offs_d, d_ok, 0, Lk,
                     stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, sm_scale,
                     BLOCK_N, TAIL, MASK_MODE, MASK_PER_KEY, UPCAST, LATE_VALUES)
    row_max = tl.max(z, 1)
    if TAIL:
        z2, v2 = _key_tile(q, k_base, v_base, m_rows, m_ok, offs_d, d_ok, BLOCK_N, Lk,
                           stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, sm_scale,
                           BLOCK_N2, False, MASK_MODE, MASK_PER_KEY, UPCAST, LATE_VALUES)
        row_max = tl.maximum(row_max, tl.max(z2, 1))

    # ---- dense branch: softmax, normalized after P @ V (a [BLOCK_M, BLOCK_D] scaling instead
    # of one per score element). exp2 compiles to one ex2.approx.ftz (tl.exp adds a fix-up
    # for results below 2^-126, which cannot matter next to the row's 1 = exp(0)).
    e = tl.exp2((z - row_max[:, None]) * _LOG2E)
    e_sum = tl.sum(e, 1)
    if TAIL:
        e2 = tl.exp2((z2 - row_max[:, None]) * _LOG2E)
        e_sum += tl.sum(e2, 1)
    if not LATE_VALUES:
        # the dense product now, so the weights e die before the entmax steps (fewer live registers)
        dense = _pv(e, v, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), SPLIT_PV)
        if TAIL:
            dense = _pv(e2, v2, dense, SPLIT_PV)

    # ---- sparse branch: 1.5-entmax on x = (z - max) / 2, clamped where it can never be in the support
    x = tl.maximum((z - row_max[:, None]) * 0.5, -1.5)
    if TAIL:
        x2 = tl.maximum((z2 - row_max[:, None]) * 0.5, -1.5)
    lo = tl.full([BLOCK_M], -1.0, tl.float32)  # mass >= 1 here
    hi = tl.zeros([BLOCK_M], dtype=tl.float32) + tau_hi  # -(1/Lk)^(1/2): mass <= 1 here
    for _ in range(BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        mass, _slope = _mass(x, mid)
        if TAIL:
            mass2, _slope2 = _mass(x2, mid)
            mass += mass2
        above = mass >= 1.0
        lo = tl.where(above, mid, lo)
        hi = tl.where(above, hi, mid)
    tau = lo
    for _ in range(NEWTON_ITERS):  # monotone from below: the mass is convex and decreasing in tau
        mass, r_sum = _mass(x, tau)
        if TAIL:
            mass2, r_sum2 = _mass(x2, tau)
            mass += mass2
            r_sum += r_sum2
        tau = tau + (mass - 1.0) / (2.0 * r_sum)
    count, x_sum, x_sq_sum = _support_stats(x, tau)
    if TAIL:
        count2, x_sum2, x_sq_sum2 = _support_stats(x2, tau)
        count += count2
        x_sum += x_sum2
        x_sq_sum += x_sq_sum2
    count = tl.maximum(count, 1.0)
    mean = x_sum / count
    mean_sq = x_sq_sum / count
    disc = (1.0 - count * (mean_sq - mean * mean)) / count
    tau = mean - tl.sqrt(tl.maximum(disc, 0.0))
    # unnormalized (x - tau)_+^2, normalized after P @ V as the dense branch
    r = tl.maximum(x - tau[:, None], 0.0)
    s = r * r
    s_sum = tl.sum(s, 1)
    if TAIL:
        r2 = tl.maximum(x2 - tau[:, None], 0.0)
        s2 = r2 * r2
        s_sum += tl.sum(s2, 1)

    # ---- both outputs
    if LATE_VALUES:
        # V only now, once the key tile's shared-memory copy for the score dot is dead: the two
        # never coexist (T5's 256 keys x 128 in fp16: 132 -> 80 KiB, under the 99 KiB of an
        # RTX 4090), at the cost of keeping e live through the entmax steps.
        v = _value_tile(v_base, offs_d, d_ok, 0, Lk, stride_vn, stride_vd, BLOCK_N, TAIL, UPCAST)
        dense = _pv(e, v, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), SPLIT_PV)
        if TAIL:
            v2 = _value_tile(v_base, offs_d, d_ok, BLOCK_N, Lk, stride_vn, stride_vd, BLOCK_N2, False, UPCAST)
            dense = _pv(e2, v2, dense, SPLIT_PV)
    sparse = _pv(s, v, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), SPLIT_PV)
    if TAIL:
        sparse = _pv(s2, v2, sparse, SPLIT_PV)
    dense = dense * (1.0 / e_sum)[:, None]
    sparse = sparse * (1.0 / s_sum)[:, None]

    # ---- GAG combination with the norm cap (per query row, over head_dim)
    if PARAMS_FROM_PTR:
        scale = tl.load(Params).to(tl.float32)
        eta = tl.load(Params + 1).to(tl.float32)
        zeta = tl.load(Params + 2).to(tl.float32)
    else:
        scale = scale_f
        eta = eta_f
        zeta = zeta_f
    delta = sparse - dense
    coeff = tl.sum(delta * sparse, 1) / (tl.sum(sparse * sparse, 1) + EPS)
    par = coeff[:, None] * sparse
    g = par + zeta * (delta - par)
    norm = tl.sqrt(tl.sum(g * g, 1))
    g = g * tl.minimum(eta / (norm + EPS), 1.0)[:, None]
    out = sparse + scale * g
    if MINUS_DENSE:
        out = out - dense

    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def kernel_constants(
    dtype: torch.dtype,
    lk: int,
    head_dim: int,
    mask_mode: int,
    params_from_ptr: bool,
    bisect_iters: int,
    newton_iters: int,
    block_m: int | None = None,
    num_warps: int | None = None,
    mask_per_key: bool = False,
    minus_dense: bool = False,
    maxnreg: int | None = None,
    late_values: bool = False,
) -> tuple[dict, dict]:
    """The kernel's compile-time constants and compile options for one call: (constexprs, options).

    One definition for `launch` and for the ahead-of-time builds of `gag_export.gag.kernels.aot`, so
    what the tests compile for a GPU architecture is what a launch would compile there.
    `mask_mode`: 0 none, 1 additive, 2 boolean; `mask_per_key`: the mask is one row of keys
    for all queries; `minus_dense`: write GAG - dense (see `launch`); `maxnreg`: a register cap
    per thread for ptxas (None: its choice), a tuning knob the benchmarks sweep.
    """
    bm, bn, bn2, bd, nw = block_sizes(lk, head_dim, dtype.itemsize)
    # Triton's CPU interpreter multiplies bf16 as raw bits: there, dot exact fp32 copies instead
    # (the same products: a bf16 x bf16 product is exact in fp32).
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    constants = dict(
        EPS=_EPS,
        BLOCK_M=block_m or bm, BLOCK_N=bn, BLOCK_N2=bn2, BLOCK_D=bd,
        MASK_MODE=mask_mode,
        MASK_PER_KEY=mask_mode != 0 and mask_per_key,
        PARAMS_FROM_PTR=params_from_ptr,
        SPLIT_PV=dtype != torch.float32 and not upcast,
        UPCAST=upcast,
        BISECT_ITERS=bisect_iters,
        NEWTON_ITERS=newton_iters,
        MINUS_DENSE=minus_dense,
        LATE_VALUES=late_values,
    )
    # FMA contraction pinned on: Triton 3.9 warns that its default turns off in 3.10, which would
    # change the kernel's rounding and speed from what was measured (with 3.6's default, on).
    options = dict(num_warps=num_warps or nw, enable_fp_fusion=True)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return constants, options


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: torch.Tensor | None,
    scale: float,
    eta: float,
    zeta: float,
    attn_mask: torch.Tensor | None,
    bisect_iters: int,
    newton_iters: int,
    block_m: int | None = None,
    num_warps: int | None = None,
    minus_dense: bool = False,
    maxnreg: int | None = None,
    late_values: bool = False,
) -> torch.Tensor:
    """Run the kernel. Inputs are already validated (see `gag_export.gag.kernels`).

    `params` is None (use the float `scale`, `eta`, `zeta`) or a [3] fp32 tensor on q's device.
    `attn_mask` is None or already broadcast to [B, H, Lq, Lk] (a strided view is fine):
    bool (True = attend) or floating (additive). `minus_dense`: return GAG - dense instead of
    GAG, in fp32: the update joint attention scales and adds to its dense output, an
    intermediate that a 16-bit rounding would cost a bf16 ulp of its own size. `late_values`: the
    kernel form that loads V after the entmax (less shared memory, see `KERNEL_FORMS`).
    """
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, d), dtype=torch.float32 if minus_dense else q.dtype, device=q.device)
    if attn_mask is None:
        mask_mode, mask, m_strides = 0, q, (0, 0, 0, 0)
    else:
        mask_mode = 2 if attn_mask.dtype == torch.bool else 1
        mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        m_strides = mask.stride()
    per_key = attn_mask is not None and (Lq == 1 or m_strides[2] == 0)
    constants, options = kernel_constants(
        q.dtype, Lk, d, mask_mode, params is not None, bisect_iters, newton_iters, block_m, num_warps, per_key,
        minus_dense, maxnreg, late_values,
    )
    grid = (triton.cdiv(Lq, constants["BLOCK_M"]), B * H)
    # Triton launches on the current CUDA device and its stream: make that q's device, or tensors
    # on cuda:1 would be read by a kernel running on cuda:0 (the interpreter runs on the CPU)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        gag_attention_kernel[grid](
            q, k, v, out, mask, params if params is not None else q,
            float(scale), float(eta), float(zeta),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *m_strides,
            H, Lq, Lk, d,
            d ** -0.5, -((1.0 / Lk) ** 0.5),
            **constants,
            **options,
        )
    return out


# --------------------------------------------------------------------------- custom op

# The kernel's forms, in the order a launch tries them (the `late_values` flag of `launch`):
# values loaded with the keys, the form tuned on an H200; then values loaded after the entmax,
# so that the key and value tiles are never in shared memory at once. At T5's tiles the second
# needs 26-40% less shared memory (130-132 -> 80-96 KiB) and executes 7-24% more instructions
# (builds in benchmarks/README.md): it lets them run on the 99 KiB GPUs (RTX 3090/4090/5090, A10,
# L4, L40).
KERNEL_FORMS = (False, True)
# What a GPU refused, so that a refused form costs one compile rather than one per call:
# launch key -> (forms refused, Triton's reason for the last).
_refusals: dict[tuple, tuple[int, str]] = {}


@torch.library.custom_op("gag_export::gag_attention", mutates_args=())
def gag_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: torch.Tensor | None,
    scale: float,
    eta: float,
    zeta: float,
    attn_mask: torch.Tensor | None,
    bisect_iters: int,
    newton_iters: int,
    fallback: bool,
    minus_dense: bool,
) -> torch.Tensor:
    """Fused GAG attention: q [B,H,Lq,d], k/v [B,H,Lk,d] -> [B,H,Lq,d] in q's dtype (see `launch`;
    with `minus_dense`, GAG - dense in fp32).

    Triton refuses the launch when the compiled kernel needs more shared memory than the GPU has.
    The check happens here, at run time, because only the compiled kernel knows its size (so it
    happens under torch.compile too): a refused form gives way to the next of `KERNEL_FORMS`, and
    when every form is refused, `fallback` (method "auto") runs the PyTorch bisect path instead,
    while without it (method "fused") the error is clear.
    """
    key = (q.device, q.dtype, k.shape[2], q.shape[3], None if attn_mask is None else (attn_mask.dtype, attn_mask.stride()),
           params is None, minus_dense)
    refused, why = _refusals.get(key, (0, ""))
    for late_values in KERNEL_FORMS[refused:]:
        try:
            return launch(q, k, v, params, scale, eta, zeta, attn_mask, bisect_iters, newton_iters,
                          minus_dense=minus_dense, late_values=late_values)
        except OutOfResources as exc:
            refused, why = refused + 1, str(exc)
            _refusals[key] = (refused, why)
    what = f"{k.shape[2]} keys x head_dim {q.shape[3]} in {q.dtype}"
    if not fallback:
        raise InvalidInputError(f"gag_attention(method='fused'): this GPU cannot run the kernel for {what}: {why}")
    _warn_fallback_once(what, why)
    from ..math import torch_gag  # noqa: PLC0415  (the math imports no kernel: no cycle)

    gag = (params[0], params[1], params[2]) if params is not None else (scale, eta, zeta)
    return torch_gag(q, k, v, *gag, 1.5, "bisect", attn_mask, minus_dense)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(what: str, why: str) -> None:
    log.warning("fused GAG kernel cannot launch for %s (%s); running the PyTorch path for these shapes", what, why)


@gag_attention_op.register_fake
def _gag_attention_fake(q, k, v, params, scale, eta, zeta, attn_mask, bisect_iters, newton_iters, fallback, minus_dense):
    return q.new_empty(q.shape, dtype=torch.float32 if minus_dense else q.dtype)
