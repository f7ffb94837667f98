"""Geometry-Aware Attention Guidance: the math, its dispatch, the fused kernels, the attention rewrite.

- `math`: entmax, the GAG combination and the PyTorch paths (imports torch and `core` only).
- `kernels/`: the fused Triton kernel as a torch custom op (imports the math; Triton on use).
- `dispatch`: `gag_attention` / `gag_joint_attention`, choosing the kernel or the math.
- `attention`: diffusers attention processors calling the dispatch; `apply_gag`, `remove_gag`.
The settings type, `GAGConfig`, is `core.gag_config`'s (torch-free, for the manifest and the server).
"""

from ..core.gag_config import (
    ATTENTION_METHODS,
    BLOCK_KEYWORDS,
    DEFAULT_EXPORT_GAG,
    ENTMAX_METHODS,
    GAGConfig,
    parse_layer_spec,
)
from .attention import (
    GuidanceParams,
    apply_gag,
    gag_applied,
    guidance_params,
    is_gag_applied,
    remove_gag,
)
from .dispatch import gag_attention, gag_joint_attention
from .math import (
    JOINT_PAD,
    Scalar,
    entmax15,
    entmax_alpha,
    gag_combine,
    sparse_attention_probs,
)

__all__ = [
    "ATTENTION_METHODS", "BLOCK_KEYWORDS", "DEFAULT_EXPORT_GAG", "ENTMAX_METHODS", "GAGConfig", "GuidanceParams", "JOINT_PAD",
    "Scalar", "apply_gag", "entmax15", "entmax_alpha", "gag_applied", "gag_attention", "gag_combine", "gag_joint_attention",
    "guidance_params", "is_gag_applied", "parse_layer_spec", "remove_gag", "sparse_attention_probs",
]
