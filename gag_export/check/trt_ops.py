"""ONNX operators that TensorRT's ONNX parser accepts, per TensorRT major version (data, no logic).

Source: onnx-tensorrt `docs/operators.md` ("Operator Support Matrix"), TensorRT 10.15 edition
(opset 9 to 24), and its `CHANGELOG.md` for what each 10.x minor added; TensorRT 11.x from the
11.0-11.5 release notes (11.0: `Swish`; 11.2: `DFT`; 11.5: opset 25). No 11.x operators.md was
available, so 11.x is the 10.15 matrix plus those additions. Used by `check/lint.py`, which
needs no GPU; the lint reports what a TensorRT build would refuse, it does not replace one.

Per version: the opset range the parser accepts, and op -> the tensor types it supports.
Restrictions that matter for our graphs are checked in code (`check/lint.py`): TopK's K must be a
build-time constant and at most 3840 (the docs say "`K` input must be less than 3840"; measured with
TensorRT-RTX 1.7's builder: K = 3840 builds, 3841 does not, tests/test_check.py); CumSum's `axis`, the
Reduce* ops' `axes` must be constants; DOUBLE is only "limited" (cast down to FLOAT, clamped),
which a strongly typed build (TensorRT 11) does not do silently, so we reject it everywhere;
INT64 is native since TensorRT 9.0 (no more cast-down to INT32), so INT64 shape arithmetic and
int64 `input_ids` are fine, while INT64 on float-only ops is not.
"""

from __future__ import annotations

F = ("float32", "float16", "bfloat16")
FI = F + ("int32", "int64")
FIB = FI + ("bool",)
B = ("bool",)

# TensorRT 10.15 (onnx-tensorrt docs/operators.md): op -> supported types. Ops marked "N" are in
# UNSUPPORTED below. Quantized types (INT8/INT4/FP8/FP4) only appear through Q/DQ.
_TRT10_15: dict[str, tuple[str, ...]] = {
    "Abs": FI, "Acos": F, "Acosh": F, "Add": FI, "And": B, "ArgMax": FI, "ArgMin": FI, "Asin": F, "Asinh": F,
    "Atan": F, "Atanh": F, "Attention": F, "AveragePool": F, "BatchNormalization": F, "BlackmanWindow": F,
    "Cast": FIB + ("uint8",), "CastLike": FIB + ("uint8",), "Ceil": F, "Celu": F, "Clip": F, "Concat": FIB,
    "Constant": FIB, "ConstantOfShape": FIB, "Conv": F, "ConvTranspose": F, "Cos": F, "Cosh": F, "CumSum": F,
    "DeformConv": F, "DepthToSpace": FI, "DequantizeLinear": F + ("int8", "uint8"), "Div": FI, "Dropout": F,
    "Einsum": F, "Elu": F, "Equal": FI, "Erf": F, "Exp": F, "Expand": FIB, "EyeLike": FIB, "Flatten": FIB,
    "Floor": F, "Gather": FIB, "GatherElements": FIB, "GatherND": FIB, "Gelu": FI, "Gemm": F,
    "GlobalAveragePool": F, "GlobalLpPool": F, "GlobalMaxPool": F, "Greater": FI, "GreaterOrEqual": FI,
    "GridSample": F, "GroupNormalization": F, "GRU": F, "HammingWindow": F, "HannWindow": F, "HardSigmoid": F,
    "HardSwish": F, "Hardmax": F, "Identity": FIB, "If": FIB, "ImageScaler": F, "InstanceNormalization": F,
    "IsInf": F, "IsNaN": FI, "LayerNormalization": F, "LeakyRelu": F, "Less": FI, "LessOrEqual": FI, "Log": F,
    "LogSoftmax": F, "Loop": FIB, "LRN": F, "LSTM": F, "LpNormalization": F, "LpPool": F, "MatMul": F, "Max": FI,
    "MaxPool": F, "Mean": FI, "MeanVarianceNormalization": F, "Min": FI, "Mish": F, "Mod": FI, "Mul": FI,
    "Neg": FI, "NonMaxSuppression": F, "NonZero": F, "Not": B, "OneHot": FIB, "Or": B, "Pad": FI,
    "ParametricSoftplus": F, "Pow": FI, "PRelu": F, "QuantizeLinear": F, "RandomNormal": F,
    "RandomNormalLike": F, "RandomUniform": F, "RandomUniformLike": F, "Range": FI, "Reciprocal": F,
    "ReduceL1": FI, "ReduceL2": FI, "ReduceLogSum": FI, "ReduceLogSumExp": FI, "ReduceMax": FI, "ReduceMean": FI,
    "ReduceMin": FI, "ReduceProd": FI, "ReduceSum": FI, "ReduceSumSquare": FI, "Relu": FI, "Reshape": FIB,
    "Resize": F, "ReverseSequence": FIB, "RMSNormalization": F, "RNN": F, "RoiAlign": F, "RotaryEmbedding": F,
    "Round": F, "STFT": ("float32",), "ScaledTanh": F, "Scan": F, "Scatter": FI, "ScatterElements": FI,
    "ScatterND": FI, "Selu": F, "Shape": FIB, "Shrink": FI, "Sigmoid": F, "Sign": FI, "Sin": F, "Sinh": F,
    "Size": FIB, "Slice": FIB, "Softmax": F, "Softplus": F, "Softsign": F, "SpaceToDepth": FI, "Split": FIB,
    "Sqrt": F, "Squeeze": FIB, "Sub": FI, "Sum": FI, "Tan": F, "Tanh": F, "TensorScatter": F + ("int32",),
    "ThresholdedRelu": F, "Tile": FIB, "TopK": FI, "Transpose": FIB, "Trilu": FIB, "Unsqueeze": FIB,
    "Upsample": F, "Where": FIB, "Xor": B,
}

# Added after 10.0 (onnx-tensorrt CHANGELOG): absent from a TensorRT 10.0 parser.
_ADDED_AFTER_10_0 = {
    "DeformConv": "10.1", "BlackmanWindow": "10.4", "HammingWindow": "10.4", "HannWindow": "10.4", "STFT": "10.5",
    "Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15", "TensorScatter": "10.15",
}

# Marked "N" in operators.md: the lint names them explicitly rather than as merely unknown.
UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

TOPK_MAX_K = 3840  # the largest K a TensorRT build takes (measured: 3840 builds, 3841 does not); the lint flags K > 3840

# TensorRT major version -> (min opset, max opset, {op: types}). 10.x is the oldest 10 release
# (10.0, opset 9-20): a graph that passes it builds on every 10.x.
SUPPORTED: dict[str, tuple[int, int, dict[str, tuple[str, ...]]]] = {
    "10": (9, 20, {op: t for op, t in _TRT10_15.items() if op not in _ADDED_AFTER_10_0}),
    "11": (9, 24, {**_TRT10_15, "Swish": F, "DFT": F}),
}

TENSOR_TYPES_REJECTED = {
    "float64": "TensorRT has no float64: keep rotary tables and constants float32 and avoid torch.isfinite "
               "in graph code (it casts to double)",
    "uint16": "TensorRT has no uint16 tensors", "int16": "TensorRT has no int16 tensors",
    "uint32": "TensorRT has no uint32 tensors", "uint64": "TensorRT has no uint64 tensors",
    "string": "TensorRT has no string tensors",
}
