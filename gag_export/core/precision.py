"""The one precision type: of an exported graph (fp32, fp16, bf16), or asked of an engine (also fp8).

torch and ml_dtypes are imported only when a torch or bfloat16 numpy dtype is asked for.
"""

from __future__ import annotations

import enum

from .errors import InvalidInputError

_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
_NUMPY_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"  # engines only (explicit quantization), refused for now where asked

    @classmethod
    def parse(cls, value: "Precision | str", *, engine: bool = False) -> "Precision":
        """A graph precision (fp32, fp16, bf16; also as float32, half, ...), or with `engine` any
        precision an engine may be asked for; `InvalidInputError` naming the allowed ones otherwise."""
        allowed = tuple(cls) if engine else GRAPH_PRECISIONS
        if isinstance(value, Precision):
            found = value
        else:
            text = str(value).strip().lower()
            found = cls._value2member_map_.get(_ALIASES.get(text, text))
        if found not in allowed:
            raise InvalidInputError(
                f"{'precision' if engine else 'dtype'}: must be one of {[p.value for p in allowed]}, got {value!r}"
            )
        return found

    @property
    def numpy_name(self) -> str:
        """The dtype's numpy name as written in TensorSpec and the manifest ("bfloat16" for bf16)."""
        try:
            return _NUMPY_NAMES[self.value]
        except KeyError:
            raise InvalidInputError(f"{self.value} is no graph precision") from None

    @property
    def numpy_dtype(self):
        """A numpy dtype (bf16 via `ml_dtypes`, which onnx depends on)."""
        import numpy as np  # noqa: PLC0415

        if self is Precision.BF16:
            import ml_dtypes  # noqa: PLC0415

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.numpy_name)

    @property
    def torch_dtype(self):
        import torch  # noqa: PLC0415  (this module stays torch-free until a torch dtype is asked for)

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


GRAPH_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)

__all__ = ["GRAPH_PRECISIONS", "Precision"]
