"""numpy <-> torch for every dtype the graphs use, bfloat16 included (numpy has none of its own).

Layer 0: imports torch and numpy only (ml_dtypes when a bfloat16 array is made).
"""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy; bfloat16 becomes `ml_dtypes.bfloat16` (numpy has none of its own; ONNX
    Runtime's `session.run` does not take it: the ort backend binds bf16 tensors by address)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # noqa: PLC0415

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    """The inverse of `to_numpy`."""
    a = np.asarray(a)
    if str(a.dtype) == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())  # C-contiguous, and 0-d stays 0-d (np.ascontiguousarray makes it 1-d)


__all__ = ["to_numpy", "to_torch"]
