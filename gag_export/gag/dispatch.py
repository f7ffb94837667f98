"""Which GAG path runs: the fused Triton kernel where it can, else the PyTorch math.

`gag_attention` and `gag_joint_attention` are what the attention processors call. Method
"fused"/"auto" asks `kernels` (imported on use: Triton only when it runs); exports always trace
the PyTorch path; under `torch.compile` that path is one nested compile region.
"""

from __future__ import annotations

import torch

from .math import Scalar, joint_dense, joint_output, torch_gag, torch_joint_update


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
    if COMPILE_REGION and _torch_gag_region is not None and torch.compiler.is_dynamo_compiling():
        from .kernels import exporting

        if not exporting():
            return _torch_gag_region(q, k, v, scale, eta, zeta, alpha, method, attn_mask)
    return torch_gag(q, k, v, scale, eta, zeta, alpha, method, attn_mask)


# Under torch.compile (never under export) the PyTorch path is one nested compile region: the 60
# GAG layers of an SDXL UNet share two shapes, so dynamo traces and Inductor compiles the core once
# per shape instead of inlining its unrolled bisect/Newton steps 60 times. Measured: on an H200
# (torch 2.11) the inlined GAG UNet had not compiled after 170 s against 90 s for the plain one;
# on CPU (tiny UNet) the region brings GAG compile time to the plain level, same outputs
# (benchmarks/README.md, "Fused GAG kernel"). COMPILE_REGION = False inlines it again.
COMPILE_REGION = True
_torch_gag_region = (
    torch.compiler.nested_compile_region(torch_gag) if hasattr(torch.compiler, "nested_compile_region") else None
)


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
    text keys alone and m is the text keys' share of the dense softmax mass (`math.joint_dense`).
    Text queries and image keys are left as the plain joint attention. `method` as
    `gag_attention`'s: "fused"/"auto" run the fused kernel on the image-query x text-key part (it
    returns GAG_txt - D_txt directly, in fp32), with the same checks on those shapes.
    """
    dense_joint, text_mass = joint_dense(q, k, v, text_len)
    q_img, k_txt, v_txt = q[:, :, text_len:], k[:, :, :text_len], v[:, :, :text_len]
    update = None
    if method in ("fused", "auto"):
        from .kernels import run_fused_if_chosen  # lazy: Triton only when used

        method, update = run_fused_if_chosen(method, q_img, k_txt, v_txt, alpha, None, scale, eta, zeta, minus_dense=True)
    if update is None:
        update = torch_joint_update(q_img, k_txt, v_txt, scale, eta, zeta, alpha, method)
    return joint_output(dense_joint, text_mass, update, text_len, q.dtype)


__all__ = ["COMPILE_REGION", "gag_attention", "gag_joint_attention"]
