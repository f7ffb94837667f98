"""Fused GAG kernels and the rule that decides when `gag_attention` uses them.

Imports only torch at import time; Triton (and `triton_gag`, which registers the custom op
`gag_export::gag_attention`) is imported on first use.

When the fused kernel runs (`gag_attention(..., method=...)`, `GAGConfig.method`):

- `"auto"` resolves to `"fused"` when every check below passes, else to `"bisect"` (the
  PyTorch path, silently: it is the documented fallback, logged at debug level).
- `"fused"` runs the kernel or raises: `MissingDependencyError` when Triton cannot be imported,
  `InvalidInputError` for everything else (CPU tensors, shapes, dtypes, export). It never falls
  back silently, so a benchmark or a config asking for the kernel gets the kernel.

The checks:
1. q is a CUDA tensor. CPU tensors always get the PyTorch path under `"auto"`; under `"fused"`
   they are accepted only with `TRITON_INTERPRET=1` (Triton's CPU interpreter, for tests).
2. Not exporting: `torch.onnx.is_in_onnx_export()` and `torch.compiler.is_exporting()` are
   False. ONNX (TorchScript or dynamo exporter) and `torch.export` therefore always trace the
   static-op PyTorch form, so exported graphs never contain the custom op. (Exports of this
   project trace CPU modules anyway, which rule 1 already sends to the PyTorch path; rule 2
   covers a module exported from a GPU. `torch.compiler.is_compiling()` is not used: it is also
   True under plain `torch.compile`, where the custom op is wanted.)
3. Triton is importable.
4. alpha == 1.5; q, k, v are 4-D [B, H, L, d] on one device, one dtype of fp16/bf16/fp32,
   with matching B, H, d and k/v lengths.
5. head_dim <= 128, key count <= 512, and the key/value tile fits in shared memory
   (next_pow2(Lk) * next_pow2(d) * itemsize <= 64 KiB: fp16 d=64 takes 512 keys, d=128 256).
   The GPU's shared memory per block is checked by Triton at launch, against what the compiled
   kernel needs: 16-48 KiB for CLIP's 77 keys at head_dim 64, fitting every GPU from the T4
   on, but 130 KiB for T5's 512 keys, over the 99 KiB of an RTX 3090/4090/5090, A10 or L4/L40
   (`gag_export/gag/kernels/aot.py` builds the kernel for each architecture without a GPU and
   reads this). A refused launch moves on to the kernel's second form, which loads the values
   after the entmax, so that keys and values are never in shared memory at once (96 KiB for
   those 512 keys; see `triton_gag.KERNEL_FORMS`); what a GPU refused is remembered per shape.
   When every form is refused (a T4's 64 KiB, say), "auto" runs the PyTorch path for that call
   (warning once per shape) and "fused" raises InvalidInputError.
   Launch limits the interpreter cannot show: batch x heads <= 65535 (the grid's second axis,
   which CUDA caps), and q, k, v, the output and the mask each span < 2**31 elements (the
   kernel's offsets are 32-bit integers: FLUX at 2048x2048 reaches that from batch 43 on).
6. The mask, if any, is bool (True = attend) or floating (additive), on q's device, and
   broadcastable to [B, H, Lq, Lk].
7. scale, eta, zeta are numbers or 0-d tensors.
8. No autograd needed (no input, mask included, requires grad while grad is enabled): the
   kernel has no backward.

`gag_joint_attention` (FLUX) runs the kernel on its image-query x text-key part, with the same
checks on those shapes, asking it for GAG minus the dense output (the update it adds).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from ...core.errors import InvalidInputError, MissingDependencyError
from ..math import BISECT_ITERS, NEWTON_ITERS

log = logging.getLogger(__name__)

MAX_KEYS = 512
MAX_HEAD_DIM = 128
MAX_KV_TILE_BYTES = 64 * 1024
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, where the kernel puts batch x heads
MAX_SPAN = 2**31  # elements a tensor may span: the kernel computes its offsets in int32
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Whether Triton is installed, looked up once without importing it (importing torch._dynamo or
# Triton here would cost seconds on every `import gag_export`). A module constant, so that
# torch.compile reads it without tracing any import machinery. An install that is present but
# broken is found on first use and raises MissingDependencyError there.
_TRITON_OK: bool = importlib.util.find_spec("triton") is not None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def key_tiles(lk: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_N2): a main power-of-two key tile and a tail tile (0: none).

    The main tile is the largest power of two <= Lk (at least 16, the smallest dot); the tail
    takes the rest rounded up to a power of two >= 16, used only when the two hold fewer columns
    than one padded tile (77 keys: 64 + 16 instead of 128; 300: 256 + 64 instead of 512). The
    per-key work is per column, padding included. With a tail, the main tile is full.
    """
    padded = max(16, _next_pow2(lk))
    main = max(16, 1 << (lk.bit_length() - 1))
    if main >= lk:
        return main, 0
    tail = max(16, _next_pow2(lk - main))
    return (main, tail) if main + tail < padded else (padded, 0)


# The (BLOCK_M, num_warps, register cap) tiles a block-size sweep compares at the SDXL shape: GPU
# times in benchmarks/bench_gpu.py, builds in benchmarks/kernel_resources.py. The two largest
# also capped at 128 registers per thread (None: ptxas's choice).
SWEEP_TILES = tuple((m, w, None) for m in (16, 32, 64, 128) for w in (4, 8)) + ((128, 8, 128), (64, 4, 128))


def block_sizes(lk: int, head_dim: int, itemsize: int = 2) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_D, num_warps) for a key count, head size and input item size.

    All keys live in registers: a main tile and maybe a tail tile (`key_tiles`). The query block
    and warps are chosen by the padded key count next_pow2(Lk), as measured before the split.
    For 16-bit inputs with up to 128 keys (CLIP's 77) and head_dim <= 64: 64 queries and 4 warps,
    the fastest of the (BLOCK_M in 16..128) x (4, 8 warps) sweep on an H200 at both SDXL
    cross-attention shapes with the split key tile, timed as replayed CUDA graphs (GPU time, not
    launch cost; benchmarks/README.md, "GPU figures, 2026-12-04"): 0.0159 ms against 0.0215 for
    128 x 8 warps at 10 heads x 4096 queries, 0.0103 against 0.0151 at 20 x 1024. Elsewhere (fp32,
    head_dim 128, T5's 512 keys: unmeasured) the query block shrinks as the key tile grows so the
    few [BLOCK_M, BLOCK_N] fp32 tiles stay in registers and the dot operands fit the shared memory
    of smaller GPUs than Hopper.
    """
    padded = max(16, _next_pow2(lk))
    block_n, block_n2 = key_tiles(lk)
    block_d = max(16, _next_pow2(head_dim))
    if padded <= 128 and block_d <= 64 and itemsize <= 2:
        return 64, block_n, block_n2, block_d, 4
    return max(16, min(64, 4096 // padded)), block_n, block_n2, block_d, 4 if padded <= 128 else 8


def triton_available() -> bool:
    """Whether Triton is installed here (checked once, at import)."""
    return _TRITON_OK


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_ok(q: torch.Tensor, explicit: bool) -> bool:
    """CUDA, or (only for an explicit "fused") CPU under Triton's interpreter."""
    return q.is_cuda or (explicit and q.device.type == "cpu" and _interpreter_on())


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# torch <= 2.11 answers torch.compiler.is_exporting() with True under plain torch.compile too
# (dynamo folds it to a constant: pytorch/pytorch#176347, fixed by #176499 for 2.12). Seen on an
# H200 with torch 2.11: the fused UNet compiled into the PyTorch path. On those versions, while
# dynamo traces, the flag is ignored and the custom op is kept. What that gives up: a *strict*
# torch.export of a CUDA module on torch <= 2.11 keeps the custom op (its fake kernel exports
# fine; ONNX conversion then names it). Non-strict export (the ONNX exporter's first strategy)
# runs outside dynamo and still sees the true flag; this project exports CPU modules anyway.
_IS_EXPORTING_FOLDED_UNDER_DYNAMO = _torch_version() < (2, 12)


def exporting() -> bool:
    if torch.onnx.is_in_onnx_export():
        return True
    if _IS_EXPORTING_FOLDED_UNDER_DYNAMO and torch.compiler.is_dynamo_compiling():
        return False
    return torch.compiler.is_exporting()


def fused_unsupported_reason(q, k, v, alpha, attn_mask, scale, eta, zeta, explicit: bool = False):
    """None if the fused kernel can run on these inputs, else (exception type, reason)."""
    if not _device_ok(q, explicit):
        return InvalidInputError, f"tensors are on {q.device.type}, the fused kernel needs CUDA"
    if exporting():
        return InvalidInputError, "exporting (ONNX / torch.export) traces the PyTorch path, never the custom op"
    if not triton_available():
        return MissingDependencyError, "Triton is not importable (pip install 'gag-export[gpu]')"
    reason = fused_shape_reason(q, k, v, alpha, attn_mask, scale, eta, zeta)
    return None if reason is None else (InvalidInputError, reason)


def fused_shape_reason(q, k, v, alpha, attn_mask, scale, eta, zeta) -> str | None:
    """Checks 4-8 alone (shapes, dtypes, mask, parameters, autograd): None if they pass, else why.

    Works on any device, meta tensors included (benchmarks use it to vet full-size shapes).
    """
    if alpha != 1.5:
        return f"the fused kernel computes 1.5-entmax only, got alpha={alpha}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D [batch, heads, tokens, head_dim]"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FUSED_DTYPES:
        return f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return "q, k, v must be on one device"
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    if k.shape != (B, H, Lk, d) or v.shape != (B, H, Lk, d):
        return f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}"
    if d > MAX_HEAD_DIM or Lk < 1 or Lk > MAX_KEYS:
        return f"fused kernel takes head_dim <= {MAX_HEAD_DIM} and 1..{MAX_KEYS} keys, got d={d}, Lk={Lk}"
    tile = _next_pow2(max(Lk, 16)) * _next_pow2(max(d, 16)) * q.element_size()
    if tile > MAX_KV_TILE_BYTES:
        return f"key/value tile of {Lk} keys x head_dim {d} in {q.dtype} exceeds {MAX_KV_TILE_BYTES} bytes"
    if B * H > MAX_GRID_Y:
        return f"batch x heads = {B * H} is over the kernel's grid limit of {MAX_GRID_Y}"
    spans = {"q": _span(q), "k": _span(k), "v": _span(v), "output": q.numel()}
    if attn_mask is not None:
        spans["attention mask"] = _span(attn_mask)
    too_long = [name for name, span in spans.items() if span >= MAX_SPAN]
    if too_long:
        return f"{', '.join(too_long)} span 2**31 elements or more, past the kernel's 32-bit offsets"
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attention mask must be bool or floating, got {attn_mask.dtype}"
        if attn_mask.device != q.device:
            return "attention mask must be on q's device"
        try:
            if tuple(torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk))) != (B, H, Lq, Lk):
                raise RuntimeError
        except RuntimeError:
            return f"attention mask {tuple(attn_mask.shape)} does not broadcast to {(B, H, Lq, Lk)}"
    for name, value in (("scale", scale), ("eta", eta), ("zeta", zeta)):
        if isinstance(value, torch.Tensor):
            if value.dim() != 0:
                return f"{name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}"
        elif not isinstance(value, (int, float)):
            return f"{name} must be a number or a 0-d tensor, got {type(value).__name__}"
    tensors = [q, k, v] + [p for p in (scale, eta, zeta, attn_mask) if isinstance(p, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "the fused kernel has no backward; inputs require grad (use torch.no_grad or 'bisect')"
    return None


def _span(t: torch.Tensor) -> int:
    """How many elements apart a tensor's first and last element lie, plus one (its strided extent)."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def resolve_method(method: str, q, k, v, alpha, attn_mask, scale, eta, zeta) -> str:
    """The entmax method `gag_attention` runs: "sort", "bisect" or "fused" (see the module doc)."""
    if method not in ("fused", "auto"):
        return method
    why = fused_unsupported_reason(q, k, v, alpha, attn_mask, scale, eta, zeta, explicit=method == "fused")
    if why is None:
        return "fused"
    if method == "auto":
        return "bisect"
    error, reason = why
    raise error(f"gag_attention(method='fused'): {reason}")


def run_fused_if_chosen(method: str, q, k, v, alpha, attn_mask, scale, eta, zeta, minus_dense: bool = False):
    """(method resolved, the fused kernel's output or None) for "fused" / "auto".

    The one place of the rule both GAG entry points follow: `resolve_method` picks the kernel or
    the PyTorch path; the kernel then falls back at launch (a GPU short of shared memory for
    every form) only when "auto" asked for it. None: run the returned PyTorch method instead.
    """
    resolved = resolve_method(method, q, k, v, alpha, attn_mask, scale, eta, zeta)
    if resolved != "fused":
        return resolved, None
    out = fused_gag_attention(q, k, v, scale, eta, zeta, attn_mask, fallback=method == "auto", minus_dense=minus_dense)
    return resolved, out


def guidance_schedule() -> tuple[int, int]:
    """(bisection steps, Newton steps) of the entmax threshold: the PyTorch math's, so both paths agree."""
    return BISECT_ITERS, NEWTON_ITERS


def _param_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def fused_gag_attention(
    q, k, v, scale, eta, zeta, attn_mask=None, fallback: bool = False, minus_dense: bool = False
) -> torch.Tensor:
    """GAG attention through the fused Triton kernel (inputs checked by `resolve_method`).

    `fallback`: if this GPU cannot launch the kernel (shared memory), run the PyTorch bisect
    path instead of raising ("auto" sets it, "fused" does not). `minus_dense`: return GAG minus
    the dense (softmax) output, the update `gag_joint_attention` adds.

    Float parameters are passed to the kernel as scalars; if any is a 0-d tensor, all three
    are stacked into one small device tensor the kernel loads (no host sync, no `.item()`).
    """
    try:
        from . import triton_gag  # noqa: F401  (registers torch.ops.gag_export.gag_attention)
    except ImportError as exc:
        raise MissingDependencyError(f"gag_attention(method='fused'): Triton is installed but does not import: {exc}") from exc

    bisect_iters, newton_iters = guidance_schedule()

    values = (scale, eta, zeta)
    if any(isinstance(p, torch.Tensor) for p in values):
        params = torch.stack([_param_tensor(p, q.device) for p in values])
        floats = (0.0, 0.0, 0.0)
    else:
        params, floats = None, tuple(float(p) for p in values)
    if attn_mask is not None:
        B, H, Lq, _ = q.shape
        attn_mask = torch.broadcast_to(attn_mask, (B, H, Lq, k.shape[2]))  # a stride-0 view, no copy
    return torch.ops.gag_export.gag_attention(
        q, k, v, params, *floats, attn_mask, bisect_iters, newton_iters, fallback, minus_dense
    )
