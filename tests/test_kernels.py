"""The fused Triton GAG kernel (gag_export/gag/kernels) against the PyTorch paths and GAG.md.

Two runs of the same cases:
- on CPU through Triton's interpreter: the kernel runs in a child process started with
  TRITON_INTERPRET=1 (Triton reads it at import, so it must not leak into this process or other
  tests); this process builds the inputs and checks the outputs;
- on CUDA, in this process (`pytest -m gpu`), skipped without a GPU.
Plus the dispatch rule ("fused" / "auto"), the custom op under torch.compile, and ONNX export of
a module using "auto" (no custom op may reach the graph).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from entmax import entmax15 as entmax15_reference

from gag_export.gag import kernels
from gag_export.core.errors import InvalidInputError, MissingDependencyError
from gag_export.gag import GAGConfig, gag_attention, gag_combine, gag_joint_attention

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'gag-export[dev]')")
NO_CAP = 1e9

# ------------------------------------------------------------------ cases


def _qkv(b, h, lq, lk, d, seed, dtype=torch.float32, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g) * spread
    k, v = torch.randn(b, h, lk, d, generator=g), torch.randn(b, h, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def build_cases() -> list[dict]:
    """Small shapes: Lq and Lk off the block sizes, head_dim below 16 and off powers of two."""
    cases = []

    def add(name, q, k, v, scale, eta, zeta, mask=None, check="sort"):
        cases.append(dict(name=name, q=q, k=k, v=v, scale=scale, eta=eta, zeta=zeta, mask=mask, check=check))

    q, k, v = _qkv(2, 2, 24, 77, 16, seed=0)
    add("identity_dense", q, k, v, -1.0, NO_CAP, 1.0, check="dense")
    add("identity_dense_inf_cap", q, k, v, -1.0, math.inf, 1.0, check="dense")
    for w in (0.5, 2.0, 5.0):
        add(f"pladis_w{w}", q, k, v, w - 1.0, NO_CAP, 1.0, check=f"pladis:{w}")
    add("scale0_sparse", q, k, v, 0.0, 15.0, 0.0, check="sparse")
    add("eta_to_zero_sparse", q, k, v, 10.0, 1e-7, 0.5, check="sparse")
    for lk in (1, 20, 77, 130, 300):
        add(f"random_fp32_lk{lk}", *_qkv(2, 2, 40, lk, 16, seed=lk), 10.0, 15.0, 0.0)
    add("random_fp32_params", *_qkv(1, 3, 33, 77, 16, seed=11, spread=3.0), 3.0, 0.5, 0.7)
    add("random_fp32_d8", *_qkv(1, 2, 17, 77, 8, seed=12), 10.0, 15.0, 0.0)
    add("random_fp32_d40", *_qkv(1, 2, 17, 50, 40, seed=13), 10.0, 15.0, 0.3)
    add("random_fp32_d64", *_qkv(1, 2, 70, 77, 64, seed=14), 10.0, 15.0, 0.0)
    for dtype in (torch.float16, torch.bfloat16):
        tag = str(dtype).split(".")[-1]
        add(f"random_{tag}", *_qkv(2, 2, 40, 77, 16, seed=15, dtype=dtype), 10.0, 15.0, 0.0)
        add(f"random_{tag}_lk130_d64", *_qkv(1, 2, 40, 130, 64, seed=16, dtype=dtype), 5.0, 2.0, 0.5)
        add(f"identity_dense_{tag}", *_qkv(1, 2, 24, 77, 16, seed=17, dtype=dtype), -1.0, NO_CAP, 1.0)
    # masks: key padding as bool [Lk], additive [Lk], diffusers' [B, H, 1, Lk], a full random bool mask
    q, k, v = _qkv(2, 2, 24, 45, 16, seed=18)
    keep = torch.ones(45, dtype=torch.bool)
    keep[30:] = False
    add("mask_bool_keys", q, k, v, 10.0, 15.0, 0.3, mask=keep, check="subset:30")
    add("mask_additive_keys", q, k, v, 10.0, 15.0, 0.3, mask=torch.zeros(45).masked_fill(~keep, -10000.0), check="subset:30")
    add("mask_additive_b_h_1_lk", q, k, v, 10.0, 15.0, 0.3, mask=torch.zeros(2, 2, 1, 45).masked_fill(~keep, float("-inf")), check="subset:30")
    full = torch.rand(2, 2, 24, 45, generator=torch.Generator().manual_seed(19)) > 0.4
    full[..., 0] = True  # every query keeps a key
    add("mask_bool_full", q, k, v, 10.0, 15.0, 0.0, mask=full)
    add("mask_fp16_additive", *(t.half() for t in (q, k, v)), 10.0, 15.0, 0.0, mask=torch.zeros(2, 1, 1, 45).masked_fill(~keep, -1e4).half())
    # masks that vary per query enter the kernel as the score dot's accumulator, divided by the
    # scale (1/sqrt(40) is not a power of two) and multiplied back; and one in fp16 at SDXL's tile
    g = torch.Generator().manual_seed(182)
    q, k, v = _qkv(1, 2, 17, 50, 40, seed=182)
    additive = (torch.randn(1, 2, 17, 50, generator=g) * 3).masked_fill(torch.rand(1, 2, 17, 50, generator=g) > 0.7, float("-inf"))
    additive[..., 0] = 0.0
    add("mask_additive_full_d40", q, k, v, 10.0, 15.0, 0.3, mask=additive)
    # torch.finfo(float32).min as "masked" (as some pipelines write it): divided by the scale it
    # must not overflow to -inf, or a row masked everywhere gives NaN where the PyTorch path does not
    finfo_min = torch.zeros(1, 2, 17, 50).masked_fill(torch.rand(1, 2, 17, 50, generator=g) > 0.6, torch.finfo(torch.float32).min)
    finfo_min[:, :, 3] = torch.finfo(torch.float32).min
    add("mask_additive_finfo_min_rows_d40", q, k, v, 10.0, 15.0, 0.3, mask=finfo_min)
    q, k, v = _qkv(1, 2, 20, 77, 64, seed=183, dtype=torch.float16)
    full = torch.rand(1, 2, 20, 77, generator=g) > 0.3
    full[..., 3] = True
    add("mask_bool_full_fp16_lk77_d64", q, k, v, 10.0, 15.0, 0.0, mask=full)
    # key tiles split into a main power of two and a tail (`triton_gag.key_tiles`): tails of 1 to
    # 44 keys, masked by bounds; 16, 17 and 64 keys take one tile
    for lk, d in ((33, 16), (65, 64), (70, 64), (77, 64), (130, 16), (300, 16), (16, 16), (17, 16), (64, 64)):
        add(f"split_fp32_lk{lk}_d{d}", *_qkv(1, 2, 20, lk, d, seed=100 + lk, spread=2.0), 5.0, 15.0, 0.3)
    add("split_fp16_lk77_d64", *_qkv(1, 2, 20, 77, 64, seed=177, dtype=torch.float16), 10.0, 15.0, 0.0)
    add("split_bf16_lk300_d40", *_qkv(1, 1, 20, 300, 40, seed=178, dtype=torch.bfloat16), 10.0, 15.0, 0.0)
    # masks across the split: keys 60.. masked (main tile's end and the whole tail), and a random
    # mask where some queries keep only tail keys (the row max and the support in the tail)
    q, k, v = _qkv(1, 2, 20, 77, 64, seed=179, spread=2.0)
    keep = torch.ones(77, dtype=torch.bool)
    keep[60:] = False
    add("split_mask_bool_keys_lk77", q, k, v, 10.0, 15.0, 0.3, mask=keep, check="subset:60")
    add("split_mask_additive_keys_lk77", q, k, v, 10.0, 15.0, 0.3, mask=torch.zeros(77).masked_fill(~keep, float("-inf")), check="subset:60")
    full = torch.rand(1, 2, 20, 77, generator=torch.Generator().manual_seed(180)) > 0.5
    full[..., 70] = True  # every query keeps a tail key
    full[:, :, :5, :64] = False  # these keep only tail keys
    add("split_mask_bool_full_lk77", q, k, v, 10.0, 15.0, 0.0, mask=full)
    additive = torch.randn(1, 2, 20, 77, generator=torch.Generator().manual_seed(181)).masked_fill(~full, float("-inf"))
    add("split_mask_additive_full_lk77", q, k, v, 10.0, 15.0, 0.3, mask=additive)
    # 0-d tensor parameters (all, and mixed with floats) must equal the float run
    q, k, v = _qkv(2, 2, 24, 77, 16, seed=20)
    add("params_float", q, k, v, 3.0, 2.0, 0.25)
    add("params_tensor", q, k, v, torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0.25), check="equals:params_float")
    add("params_mixed", q, k, v, torch.tensor(3.0), 2.0, torch.tensor(0.25, dtype=torch.float64), check="equals:params_float")
    # non-contiguous q/k/v, as the attention processor passes them ([B, L, H, d] transposed)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 3, 24, 77, 16, seed=21))
    assert not q.is_contiguous()
    add("strided_inputs", q, k, v, 10.0, 15.0, 0.0)
    # joint attention (FLUX): [text; image] tokens, the kernel on image queries x text keys,
    # returning GAG - dense; text counts on and off the key tiles
    for name, (text_len, image_len, d, dtype) in {
        "joint_fp32_t20": (20, 24, 16, torch.float32), "joint_fp32_t77": (77, 30, 16, torch.float32),
        "joint_fp16_t77_d64": (77, 40, 64, torch.float16), "joint_bf16_t33": (33, 20, 32, torch.bfloat16),
    }.items():
        q, k, v = _qkv(1, 2, text_len + image_len, text_len + image_len, d, seed=text_len + d, dtype=dtype)
        add(name, q, k, v, 5.0, 15.0, 0.25)
        cases[-1]["text_len"] = text_len
    return cases


def reference_branches(q, k, v):
    """D and S from the spec in float64, with the `entmax` package for the sparse map."""
    z = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(z, -1) @ v.double(), entmax15_reference(z, dim=-1) @ v.double()


def tolerance(dtype, interpreter: bool = False) -> dict:
    """fp32: 1e-5 (the PyTorch sort and bisect paths differ from each other by as much at scale 10).

    16-bit: one rounding of the output (fp32 math inside), against fp32 math on the same inputs.
    Triton's CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): one bf16 ulp there.
    """
    bf16_rtol = 2**-7 if interpreter else 2**-8
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
            torch.bfloat16: dict(atol=1e-3, rtol=bf16_rtol)}[dtype]


def assert_joint_as_close_as_torch(out: torch.Tensor, q, k, v, text_len: int) -> None:
    """16-bit joint attention: the fused output no further from fp32 math than the PyTorch path's.

    Both share the dense joint attention and the text-mass factor in the model's precision, which
    dominate the error in bf16 (measured on an H200 and on CPU alike: 0.0256 max abs at FLUX's shape,
    six bf16 ulps), so a one-rounding tolerance against fp32 cannot hold for either path; what the
    kernel must not do is add error of its own.
    """
    params = (text_len, 5.0, 15.0, 0.0)
    ref32 = gag_joint_attention(q.float(), k.float(), v.float(), *params, method="bisect")
    torch_path = gag_joint_attention(q, k, v, *params, method="bisect").float()
    fused_err, torch_err = (out.float() - ref32).abs(), (torch_path - ref32).abs()
    ulp = torch.finfo(q.dtype).eps * ref32.abs().max()
    assert fused_err.max() <= torch_err.max() + ulp, (fused_err.max().item(), torch_err.max().item())
    assert fused_err.mean() <= 1.25 * torch_err.mean(), (fused_err.mean().item(), torch_err.mean().item())


def check_case(case: dict, out: torch.Tensor, outputs: dict, interpreter: bool = False) -> None:
    q, k, v = case["q"], case["k"], case["v"]
    assert out.shape == q.shape and out.dtype == q.dtype, case["name"]
    assert torch.isfinite(out).all(), case["name"]
    out = out.cpu()
    tol = tolerance(q.dtype, interpreter)
    if "text_len" in case:  # joint attention: against its PyTorch path on the same inputs
        n = case["text_len"]
        bisect = outputs[f"{case['name']}/bisect"]
        torch.testing.assert_close(out.float(), bisect.float(), **tol, msg=lambda m: f"{case['name']} vs bisect: {m}")
        assert out[:, :, :n].equal(bisect[:, :, :n]), "text queries are plain joint attention, untouched"
        if q.dtype == torch.float32:
            torch.testing.assert_close(out, outputs[f"{case['name']}/sort"], **tol)
        return
    check = case["check"]
    qf, kf, vf = q.float(), k.float(), v.float()  # the same values, fp32 math in the reference
    mask = case["mask"].float() if case["mask"] is not None and case["mask"].is_floating_point() else case["mask"]
    sort = gag_attention(qf, kf, vf, case["scale"], case["eta"], case["zeta"], method="sort", attn_mask=mask)
    torch.testing.assert_close(out.float(), sort, **tol, msg=lambda m: f"{case['name']} vs sort: {m}")
    if check == "dense":
        torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(qf, kf, vf), **tol)
    elif check == "sparse":
        torch.testing.assert_close(out.double(), reference_branches(q, k, v)[1], **tol)
    elif check.startswith("pladis:"):
        w = float(check.split(":")[1])
        dense, sparse = reference_branches(q, k, v)
        torch.testing.assert_close(out.double(), dense + w * (sparse - dense), **tol)
    elif check.startswith("subset:"):
        n = int(check.split(":")[1])
        subset = gag_attention(qf, kf[:, :, :n], vf[:, :, :n], case["scale"], case["eta"], case["zeta"], method="sort")
        torch.testing.assert_close(out.float(), subset, **tol)
    elif check.startswith("equals:"):
        torch.testing.assert_close(out, outputs[check.split(":")[1]].cpu(), atol=0, rtol=0)
    if q.dtype == torch.float32 and check == "sort" and mask is None:  # and against float64 math
        dense, sparse = reference_branches(q, k, v)
        truth = gag_combine(dense, sparse, case["scale"], case["eta"], case["zeta"])
        torch.testing.assert_close(out.double(), truth, **tol)


CASE_NAMES = [c["name"] for c in build_cases()]
# also run on a simulated GPU that refuses the kernel's first form (too little shared memory), so
# the op moves on to the form that loads the values after the entmax: tails, masks, 16-bit, joint
LATE_VALUE_CASES = (
    "random_fp32_lk1", "random_fp32_lk300", "split_fp16_lk77_d64", "split_bf16_lk300_d40", "mask_bool_keys",
    "split_mask_additive_keys_lk77", "split_mask_bool_full_lk77", "params_tensor", "joint_fp16_t77_d64",
)
# also run compiled in the interpreter: plain, joint (fp32 GAG - dense from the op), 0-d tensor params
COMPILED_CASES = ("strided_inputs", "joint_fp16_t77_d64", "params_tensor")


def run_cases(cases: list[dict], device: str) -> dict:
    """Each case through gag_attention(method="fused") on `device`; outputs by name."""
    outputs = {}
    for c in cases:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        if "text_len" in c:
            args = (move(c["q"]), move(c["k"]), move(c["v"]), c["text_len"], c["scale"], c["eta"], c["zeta"])
            outputs[c["name"]] = gag_joint_attention(*args, method="fused").cpu()
            # The PyTorch paths on the same device: the joint output shares its dense attention with
            # them, and CUDA's SDPA rounds differently from the CPU's (on an H200 the text queries
            # matched the CPU's only to ~1e-7, and 16-bit outputs by more than an ulp)
            for method in ("bisect", "sort") if c["q"].dtype == torch.float32 else ("bisect",):  # sort: fp32's check
                outputs[f"{c['name']}/{method}"] = gag_joint_attention(*args, method=method).cpu()
            continue
        outputs[c["name"]] = gag_attention(
            move(c["q"]), move(c["k"]), move(c["v"]), move(c["scale"]), move(c["eta"]), move(c["zeta"]),
            method="fused", attn_mask=move(c["mask"]),
        ).cpu()
    return outputs


# ------------------------------------------------------------------ interpreter (CPU)


@pytest.fixture(scope="module")
def interpreter_outputs():
    """Run every case once in a child process under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'gag-export[dev]')")
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, out_path = Path(tmp, "cases.pt"), Path(tmp, "out.pt")
        torch.save(build_cases(), cases_path)
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, __file__, str(cases_path), str(out_path)], check=False,
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return torch.load(out_path)


@pytest.mark.parametrize("minus_dense", [False, True])
def test_custom_op_passes_opcheck_in_interpreter(minus_dense, interpreter_outputs):
    # the fake implementation must give what the kernel gives (GAG - dense is fp32): torch.compile
    # plans with it, and a wrong dtype there would not show in the outputs of an aot_eager run
    assert interpreter_outputs["opcheck"][minus_dense] == "ok"


@pytest.mark.parametrize("name", COMPILED_CASES)
def test_compiled_fused_path_is_one_op_node_in_interpreter(name, interpreter_outputs):
    run = interpreter_outputs["compiled"][name]
    assert (run["graphs"], run["breaks"], run["op_nodes"]) == (1, 0, 1), run
    eager = interpreter_outputs[name]
    assert run["output"].dtype == eager.dtype
    torch.testing.assert_close(run["output"], eager, atol=0, rtol=0)
    # inductor writes its own code for the ops around the kernel: the joint path adds the kernel's
    # fp32 GAG - dense to the 16-bit dense output without eager's intermediate rounding, so
    # outputs may differ by one rounding of the output dtype, no more
    assert run["inductor_output"].dtype == eager.dtype
    eps = torch.finfo(eager.dtype).eps
    torch.testing.assert_close(run["inductor_output"], eager, atol=2 * eps, rtol=2 * eps)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fused_kernel_in_interpreter(name, interpreter_outputs):
    case = next(c for c in build_cases() if c["name"] == name)
    check_case(case, interpreter_outputs[name], interpreter_outputs, interpreter=True)


@pytest.mark.parametrize("name", LATE_VALUE_CASES)
def test_late_values_form_in_interpreter(name, interpreter_outputs):
    # the form a 99 KiB GPU gets for T5's tiles: the same math, the values loaded later
    late = interpreter_outputs["late_values"]
    assert late["forms_tried"][name] == [False, True], late["forms_tried"][name]
    case = next(c for c in build_cases() if c["name"] == name)
    check_case(case, late["outputs"][name], interpreter_outputs, interpreter=True)
    torch.testing.assert_close(late["outputs"][name], interpreter_outputs[name], atol=0, rtol=0)


# ------------------------------------------------------------------ CUDA


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@needs_triton
def test_fused_kernel_on_cuda():
    cases = build_cases()
    outputs = run_cases(cases, "cuda")
    for case in cases:
        check_case(case, outputs[case["name"]], outputs)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, lq, lk, d", [(10, 4096, 77, 64), (20, 1024, 77, 64), (4, 256, 512, 64), (4, 256, 256, 128)])
def test_fused_kernel_on_cuda_realistic_shapes(dtype, heads, lq, lk, d):
    if kernels.fused_unsupported_reason(*(torch.empty(1, heads, n, d, device="cuda", dtype=dtype) for n in (lq, lk, lk)), 1.5, None, 1.0, 1.0, 0.0):
        pytest.skip(f"{dtype} {lk}x{d} is over the kernel's tile limit (falls back to bisect under 'auto')")
    q, k, v = (t.cuda() for t in _qkv(1, heads, lq, lk, d, seed=lk, dtype=dtype))
    out = gag_attention(q, k, v, 10.0, 15.0, 0.0, method="fused")
    ref = gag_attention(q.float(), k.float(), v.float(), 10.0, 15.0, 0.0, method="sort")
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype))
    assert gag_attention(q, k, v, 10.0, 15.0, 0.0, method="auto").equal(out)


@gpu
@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fused_kernel_runs_on_the_tensors_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    q, k, v = (t.to("cuda:1") for t in _qkv(1, 10, 1024, 77, 64, seed=5, dtype=torch.float16))
    out = gag_attention(q, k, v, 10.0, 15.0, 0.0, method="fused")
    assert out.device == q.device and torch.cuda.current_device() == 0
    ref = gag_attention(q.float(), k.float(), v.float(), 10.0, 15.0, 0.0, method="sort")
    torch.testing.assert_close(out.float(), ref, **tolerance(torch.float16))


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_joint_attention_on_cuda_flux_shapes(dtype):
    # FLUX.1-schnell: 24 heads of 128, 256 T5 tokens + 1024 image tokens (512x512)
    text_len = 256
    q, k, v = (t.cuda() for t in _qkv(1, 24, text_len + 1024, text_len + 1024, 128, seed=9, dtype=dtype))
    out = gag_joint_attention(q, k, v, text_len, 5.0, 15.0, 0.0, method="fused")
    assert_joint_as_close_as_torch(out, q, k, v, text_len)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_late_values_form_on_cuda_t5_shapes(monkeypatch, dtype):
    # What a 99 KiB GPU (RTX 3090/4090, A10, L4, L40) runs for T5's tiles, forced here by refusing
    # the first form: FLUX.1-schnell's joint shape and 512 keys at head_dim 64.
    tried = _refuse_launch(monkeypatch, forms_refused=1, run_others=True)
    text_len = 256
    q, k, v = (t.cuda() for t in _qkv(1, 24, text_len + 1024, text_len + 1024, 128, seed=9, dtype=dtype))
    out = gag_joint_attention(q, k, v, text_len, 5.0, 15.0, 0.0, method="fused")
    assert_joint_as_close_as_torch(out, q, k, v, text_len)
    q, k, v = (t.cuda() for t in _qkv(1, 4, 256, 512, 64, seed=10, dtype=dtype))
    out = gag_attention(q, k, v, 10.0, 15.0, 0.0, method="fused")
    ref = gag_attention(q.float(), k.float(), v.float(), 10.0, 15.0, 0.0, method="sort")
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype))
    assert tried == [False, True, False, True], tried


@gpu
@needs_cuda
@needs_triton
def test_fused_custom_op_compiles_as_one_node_on_cuda():
    q, k, v = (t.cuda().half() for t in _qkv(1, 4, 64, 77, 64, seed=3))
    f = lambda q, k, v: gag_attention(q, k, v, 10.0, 15.0, 0.0, method="auto")  # noqa: E731
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("gag_export.gag_attention" in t for t in targets), targets
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), atol=0, rtol=0)


# ------------------------------------------------------------------ dispatch rule (no kernel run)


def _export_flag_seen_by(run) -> list[bool]:
    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(kernels.exporting())
            return x + 1

    torch._dynamo.reset()
    run(Probe(), torch.ones(2))
    torch._dynamo.reset()
    return seen


def _compile_run(module, x):
    torch.compile(module, backend="eager", fullgraph=True)(x)


def test_compile_keeps_the_custom_op_and_export_traces_the_pytorch_path():
    assert _export_flag_seen_by(_compile_run) == [False]
    assert _export_flag_seen_by(lambda m, x: torch.export.export(m, (x,), strict=False)) == [True]
    assert kernels.exporting() is False


def test_compile_keeps_the_custom_op_on_torch_that_folds_is_exporting(monkeypatch):
    # torch <= 2.11 answers is_exporting() True under plain torch.compile (pytorch#176347): seen on
    # an H200, where the fused UNet compiled into the PyTorch path. Simulate that answer here.
    real = torch.compiler.is_exporting
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_dynamo_compiling() or real())
    monkeypatch.setattr(kernels, "_IS_EXPORTING_FOLDED_UNDER_DYNAMO", True)
    assert _export_flag_seen_by(_compile_run) == [False]
    monkeypatch.setattr(kernels, "_IS_EXPORTING_FOLDED_UNDER_DYNAMO", False)
    assert _export_flag_seen_by(_compile_run) == [True]  # what the H200 run hit without the workaround


@pytest.mark.parametrize("version, expected", [("2.11.0+cu130", (2, 11)), ("2.13.0+cpu", (2, 13)), ("2.12.0a0+git1234", (2, 12))])
def test_torch_version_parse(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert kernels._torch_version() == expected


def _small(dtype=torch.float32, lk=77, d=16):
    return _qkv(1, 2, 8, lk, d, seed=0, dtype=dtype)


def test_auto_on_cpu_is_the_bisect_path():
    q, k, v = _small()
    assert kernels.resolve_method("auto", q, k, v, 1.5, None, 10.0, 15.0, 0.0) == "bisect"
    torch.testing.assert_close(
        gag_attention(q, k, v, 10.0, 15.0, 0.0, method="auto"), gag_attention(q, k, v, 10.0, 15.0, 0.0, method="bisect"), atol=0, rtol=0
    )


def test_explicit_fused_on_cpu_raises_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidInputError, match="fused.*needs CUDA"):
        gag_attention(*_small(), 10.0, 15.0, 0.0, method="fused")


def test_explicit_fused_without_triton_raises_missing_dependency(monkeypatch):
    monkeypatch.setattr(kernels, "_device_ok", lambda q, explicit: True)
    monkeypatch.setattr(kernels, "_TRITON_OK", False)
    with pytest.raises(MissingDependencyError, match="Triton"):
        gag_attention(*_small(), 10.0, 15.0, 0.0, method="fused")
    assert kernels.resolve_method("auto", *_small(), 1.5, None, 10.0, 15.0, 0.0) == "bisect"


@pytest.mark.parametrize(
    "shapes, match",
    [
        # FLUX at 2048x2048 (24 heads x 16384 image tokens x 128) from batch 43 on: int32 offsets wrap
        (dict(q=(43, 24, 16384, 128), kv=(43, 24, 256, 128)), "q, output span 2"),
        (dict(q=(42, 24, 16384, 128), kv=(42, 24, 256, 128)), None),
        # a per-query mask spans far more than q: [B, H, Lq, Lk]
        (dict(q=(48, 24, 4096, 64), kv=(48, 24, 512, 64), mask=(48, 24, 4096, 512)), "attention mask span"),
        (dict(q=(48, 24, 4096, 64), kv=(48, 24, 512, 64), mask=(48, 1, 1, 512)), None),
        (dict(q=(3277, 20, 16, 64), kv=(3277, 20, 77, 64)), "grid limit"),
    ],
)
def test_fused_limits_of_the_launch(shapes, match):
    # what the interpreter cannot show (it computes offsets in int64 and has no grid limit),
    # checked on meta tensors: the shapes alone decide
    q = torch.empty(shapes["q"], dtype=torch.float16, device="meta")
    k = v = torch.empty(shapes["kv"], dtype=torch.float16, device="meta")
    mask = torch.empty(shapes["mask"], dtype=torch.float16, device="meta") if "mask" in shapes else None
    reason = kernels.fused_shape_reason(q, k, v, 1.5, mask, 10.0, 15.0, 0.0)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and match in reason, reason


def test_a_mask_that_needs_grad_takes_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(kernels, "_device_ok", lambda q, explicit: True)
    monkeypatch.setattr(kernels, "_TRITON_OK", True)
    q, k, v = _small()
    bias = torch.zeros(k.shape[2], requires_grad=True)  # a learned additive bias
    with pytest.raises(InvalidInputError, match="backward"):
        kernels.resolve_method("fused", q, k, v, 1.5, bias, 10.0, 15.0, 0.0)
    assert kernels.resolve_method("auto", q, k, v, 1.5, bias, 10.0, 15.0, 0.0) == "bisect"
    with torch.no_grad():
        assert kernels.resolve_method("auto", q, k, v, 1.5, bias, 10.0, 15.0, 0.0) == "fused"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(lk=513), "keys"),
        (dict(d=256), "head_dim"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(lk=512, d=128), "tile"),
        (dict(alpha=2.0), "1.5-entmax"),
        (dict(mask=torch.zeros(3, dtype=torch.int64)), "mask"),
        (dict(mask=torch.zeros(5)), "broadcast"),
        (dict(scale=torch.ones(2)), "0-d"),
        (dict(grad=True), "backward"),
    ],
)
def test_fused_limits_raise_and_auto_falls_back(monkeypatch, change, match):
    monkeypatch.setattr(kernels, "_device_ok", lambda q, explicit: True)
    monkeypatch.setattr(kernels, "_TRITON_OK", True)
    q, k, v = _small(change.get("dtype", torch.float32), change.get("lk", 77), change.get("d", 16))
    if change.get("grad"):
        q.requires_grad_(True)
    args = (q, k, v, change.get("alpha", 1.5), change.get("mask"), change.get("scale", 10.0), 15.0, 0.0)
    assert kernels.fused_unsupported_reason(*_small(), 1.5, None, 10.0, 15.0, 0.0) is None
    with pytest.raises(InvalidInputError, match=match):
        kernels.resolve_method("fused", *args)
    assert kernels.resolve_method("auto", *args) == "bisect"


def test_export_forces_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(kernels, "_device_ok", lambda q, explicit: True)
    monkeypatch.setattr(kernels, "_TRITON_OK", True)
    assert kernels.resolve_method("auto", *_small(), 1.5, None, 10.0, 15.0, 0.0) == "fused"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert kernels.resolve_method("auto", *_small(), 1.5, None, 10.0, 15.0, 0.0) == "bisect"
    with pytest.raises(InvalidInputError, match="export"):
        kernels.resolve_method("fused", *_small(), 1.5, None, 10.0, 15.0, 0.0)


def test_config_and_joint_attention_accept_fused_and_auto():
    for method in ("fused", "auto"):
        assert GAGConfig(method=method).method == method
    with pytest.raises(InvalidInputError, match="GAGConfig.method"):
        GAGConfig(method="triton")
    q, k, v = _qkv(1, 2, 24, 24, 8, seed=1)
    bisect = gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0, method="bisect")
    assert gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0, method="auto").equal(bisect)  # CPU: the PyTorch path
    with pytest.raises(InvalidInputError, match="fused.*cpu"):
        gag_joint_attention(q, k, v, 7, 10.0, 15.0, 0.0, method="fused")


def test_importing_guidance_and_kernels_does_not_import_triton():
    code = "import sys, gag_export.gag, gag_export.gag.kernels, gag_export.gag.attention; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------ torch.compile of the GAG UNet


@pytest.mark.parametrize("method", [pytest.param("sort", marks=pytest.mark.slow), "auto"])
def test_tiny_gag_unet_traces_as_one_graph(method):
    """torch.compile sees the whole GAG UNet as one graph: no graph break from the entmax loop,
    TopK or the method dispatch (CPU: "auto" is the bisect path)."""
    from conftest import tiny_sdxl_unet, unet_inputs

    from gag_export.gag.attention import apply_gag

    unet = tiny_sdxl_unet()
    apply_gag(unet, GAGConfig(method=method))
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda kw: unet(**kw).sample)(unet_inputs())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ------------------------------------------------------------------ export: no custom op in the graph


class _AutoGAG(torch.nn.Module):
    """An attention core with GAG method="auto" and the guidance values as graph inputs."""

    def forward(self, q, k, v, scale, eta, zeta):
        return gag_attention(q, k, v, scale, eta, zeta, method="auto")


@pytest.mark.parametrize("kernel_looks_available", [False, True])
def test_onnx_export_of_auto_has_no_custom_ops(monkeypatch, tmp_path, kernel_looks_available):
    import onnx
    import onnxruntime as ort

    if kernel_looks_available:  # as on a GPU with Triton: export itself must pick the PyTorch path
        monkeypatch.setattr(kernels, "_device_ok", lambda q, explicit: True)
        monkeypatch.setattr(kernels, "_TRITON_OK", True)
    q, k, v = _qkv(1, 2, 8, 77, 16, seed=2)
    params = (torch.tensor(10.0), torch.tensor(15.0), torch.tensor(0.0))
    path = tmp_path / "gag.onnx"
    torch.onnx.export(_AutoGAG(), (q, k, v, *params), str(path), dynamo=True,
                      input_names=["q", "k", "v", "gag_scale", "gag_eta", "gag_zeta"])
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"custom-domain ops in the exported graph: {domains}"
    assert not [n.op_type for n in model.graph.node if "gag" in n.op_type.lower()]
    assert not [f.domain for f in model.functions if f.domain not in ("", "ai.onnx")]
    monkeypatch.undo()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(zip(["q", "k", "v", "gag_scale", "gag_eta", "gag_zeta"], (t.numpy() for t in (q, k, v, *params))))
    got = torch.from_numpy(session.run(None, feed)[0])
    torch.testing.assert_close(got, gag_attention(q, k, v, *params, method="bisect"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lk, d, itemsize, expected", [
    (77, 64, 2, (64, 64, 16, 64, 4)),    # SDXL cross-attention in fp16/bf16: the H200 sweep's choice
    (77, 64, 4, (32, 64, 16, 64, 4)),    # fp32: unmeasured, the register-sized block
    (77, 128, 2, (32, 64, 16, 128, 4)),  # head_dim 128: operands of 128 x 128 stay small
    (512, 64, 2, (16, 512, 0, 64, 8)),   # T5's 512 keys: one tile
    (300, 40, 2, (16, 256, 64, 64, 8)),  # 256 + 64 keys instead of 512
    (100, 64, 2, (64, 128, 0, 64, 4)),   # 64 + 64 would save nothing: one tile
    (17, 16, 2, (64, 32, 0, 16, 4)),     # 16 + 16 likewise
    (16, 16, 2, (64, 16, 0, 16, 4)),
])
def test_block_sizes_use_the_measured_tile_only_where_it_was_measured(lk, d, itemsize, expected):
    assert kernels.block_sizes(lk, d, itemsize) == expected


def _refuse_launch(monkeypatch, forms_refused: int = 2, run_others: bool = False) -> list:
    """Make kernel launches fail as Triton does when the GPU lacks the shared memory: the first
    `forms_refused` of the kernel's forms (`triton_gag.KERNEL_FORMS`); the others run the kernel
    (`run_others`) or return zeros. Returns the `late_values` flag of every launch tried."""
    from triton.runtime.errors import OutOfResources

    from gag_export.gag.kernels import triton_gag

    real_launch, tried = triton_gag.launch, []

    def launch(q, *args, late_values=False, minus_dense=False, **kwargs):
        tried.append(late_values)
        if triton_gag.KERNEL_FORMS.index(late_values) < forms_refused:
            raise OutOfResources(133120, 101376, "shared memory")
        if run_others:
            return real_launch(q, *args, late_values=late_values, minus_dense=minus_dense, **kwargs)
        return torch.zeros(q.shape, dtype=torch.float32 if minus_dense else q.dtype)

    monkeypatch.setattr(triton_gag, "launch", launch)
    monkeypatch.setattr(triton_gag, "_refusals", {})  # what earlier tests' GPUs refused
    return tried


@needs_triton
def test_a_refused_kernel_form_gives_way_to_the_next_once_per_shape(monkeypatch):
    tried = _refuse_launch(monkeypatch, forms_refused=1)
    q, k, v = _qkv(1, 2, 8, 256, 32, seed=8, dtype=torch.float16)
    for _ in range(3):  # "fused" as well as "auto": the second form is the fused kernel still
        out = kernels.fused_gag_attention(q, k, v, 10.0, 15.0, 0.0, fallback=False)
        assert out.dtype == torch.float16 and not out.any()  # what the fake second form returns
    assert tried == [False, True, True, True], "the refused form is tried once per shape, not per call"
    kernels.fused_gag_attention(q[..., :16], k[..., :16], v[..., :16], 10.0, 15.0, 0.0, fallback=False)
    assert tried[4:] == [False, True], "another shape tries the first form again"


@needs_triton
@pytest.mark.parametrize("params_as_tensors", [False, True])
@pytest.mark.parametrize("minus_dense", [False, True])
def test_auto_runs_the_pytorch_path_where_the_gpu_refuses_the_launch(monkeypatch, params_as_tensors, minus_dense):
    _refuse_launch(monkeypatch)
    q, k, v = _qkv(1, 2, 8, 77, 16, seed=6)  # fp32: GAG - dense is fp32 for every input dtype
    mask = torch.rand(1, 1, 1, 77, generator=torch.Generator().manual_seed(6)) > 0.2
    params = tuple(torch.tensor(p) for p in (10.0, 15.0, 0.5)) if params_as_tensors else (10.0, 15.0, 0.5)
    expected = gag_attention(q, k, v, 10.0, 15.0, 0.5, method="bisect", attn_mask=mask)
    if minus_dense:  # what joint attention asks for: GAG - softmax attention
        expected = expected - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fused(q, k, v):
        return kernels.fused_gag_attention(q, k, v, *params, attn_mask=mask, fallback=True, minus_dense=minus_dense)

    got = fused(q, k, v)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # inside a compiled graph the op is one opaque node, so the fallback happens there too
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fused(q, k, v), atol=0, rtol=0)
    torch._dynamo.reset()


@needs_triton
@pytest.mark.parametrize("joint", [False, True])
def test_only_auto_falls_back_when_every_kernel_form_is_refused(monkeypatch, joint):
    # the rule both entry points share (`kernels.run_fused_if_chosen`): "auto" runs the PyTorch
    # path when the GPU refuses every form, "fused" says why; the dispatch is made to pick the
    # kernel here, on CPU, so that the launch is reached
    _refuse_launch(monkeypatch)
    monkeypatch.setattr(kernels, "resolve_method", lambda method, *args: "fused")
    q, k, v = _qkv(1, 2, 28, 28 if joint else 77, 16, seed=12)

    def run(method):
        if joint:
            return gag_joint_attention(q, k, v, 20, 10.0, 15.0, 0.0, method=method)
        return gag_attention(q, k, v, 10.0, 15.0, 0.0, method=method)

    torch.testing.assert_close(run("auto"), run("bisect"), atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInputError, match="cannot run the kernel"):
        run("fused")


@needs_triton
def test_fused_says_why_the_gpu_refuses_the_launch(monkeypatch):
    _refuse_launch(monkeypatch)
    q, k, v = _qkv(1, 2, 8, 512, 64, seed=7)
    with pytest.raises(InvalidInputError, match=r"cannot run the kernel for 512 keys x head_dim 64.*shared memory"):
        kernels.fused_gag_attention(q, k, v, 10.0, 15.0, 0.0, fallback=False)


def _two_gag_layers(q, k, v):
    # two GAG layers of one shape, as the 60 of an SDXL UNet share two shapes
    first = gag_attention(q, k, v, 10.0, 15.0, 0.0, method="bisect")
    return first + gag_attention(q.flip(2), k, v, 10.0, 15.0, 0.0, method="bisect")


@pytest.mark.parametrize("region", [True, False])
def test_compile_runs_the_pytorch_core_as_a_nested_region(monkeypatch, region):
    from gag_export.gag import dispatch

    if dispatch._torch_gag_region is None:
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.nested_compile_region")
    monkeypatch.setattr(dispatch, "COMPILE_REGION", region)
    q, k, v = _qkv(1, 2, 8, 77, 16, seed=4)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_two_gag_layers)(q, k, v)
    assert explained.graph_break_count == 0
    calls = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("invoke_subgraph" in t for t in calls) == (2 if region else 0), calls
    torch._dynamo.reset()
    compiled = torch.compile(_two_gag_layers, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), _two_gag_layers(q, k, v), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("strict", [False, True])
def test_export_inlines_the_pytorch_core(strict):
    q, k, v = _qkv(1, 2, 8, 77, 16, seed=5)

    class TwoLayers(torch.nn.Module):
        def forward(self, q, k, v):
            return _two_gag_layers(q, k, v)

    program = torch.export.export(TwoLayers(), (q, k, v), strict=strict)
    assert not [n for n in program.graph.nodes if "invoke_subgraph" in str(n.target)]


# ------------------------------------------------------------------ child process entry


def _compiled_runs(cases: list[dict]) -> dict:
    """COMPILED_CASES under torch.compile(fullgraph=True): the custom op as a graph node (its fake
    implementation included) running the interpreted kernel, under aot_eager and under inductor
    (which generates the code around the op and plans its buffers from the fake implementation)."""
    out = {}
    for c in (c for c in cases if c["name"] in COMPILED_CASES):
        params = (c["scale"], c["eta"], c["zeta"])
        if "text_len" in c:
            def f(q, k, v, n=c["text_len"], params=params):
                return gag_joint_attention(q, k, v, n, *params, method="fused")
        else:
            def f(q, k, v, params=params):
                return gag_attention(q, k, v, *params, method="fused")
        torch._dynamo.reset()
        explained = torch._dynamo.explain(f)(c["q"], c["k"], c["v"])
        ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
        torch._dynamo.reset()
        out[c["name"]] = {
            "graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "op_nodes": sum("gag_export.gag_attention" in t for t in ops),
            "output": torch.compile(f, backend="aot_eager", fullgraph=True)(c["q"], c["k"], c["v"]),
            "inductor_output": torch.compile(f, backend="inductor", fullgraph=True)(c["q"], c["k"], c["v"]),
        }
    return out


def _opchecks() -> dict:
    """torch.library.opcheck of the custom op (schema, fake implementation against the real one,
    aot dispatch) in both output forms; failures as their messages."""
    from gag_export.gag.kernels import triton_gag  # noqa: F401  (registers the op)

    q, k, v = _qkv(1, 2, 8, 20, 16, seed=30, dtype=torch.float16)
    results = {}
    for minus_dense in (False, True):
        args = (q, k, v, None, 5.0, 15.0, 0.0, None, 4, 3, False, minus_dense)
        try:
            torch.library.opcheck(torch.ops.gag_export.gag_attention.default, args)
            results[minus_dense] = "ok"
        except Exception as exc:  # reported to the parent test, which shows it
            results[minus_dense] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return results


def _late_value_runs(cases: list[dict]) -> dict:
    """LATE_VALUE_CASES through `gag_attention(method="fused")` on a simulated GPU that refuses the
    kernel's first form: the op must run its second (values loaded after the entmax)."""
    from gag_export.gag.kernels import triton_gag

    outputs, forms_tried = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        tried = _refuse_launch(mp, forms_refused=1, run_others=True)
        for c in (c for c in cases if c["name"] in LATE_VALUE_CASES):
            triton_gag._refusals.clear()  # each case on a fresh GPU, so each tries both forms
            tried.clear()
            outputs[c["name"]] = run_cases([c], "cpu")[c["name"]]
            forms_tried[c["name"]] = list(tried)
    return {"outputs": outputs, "forms_tried": forms_tried}


def _child(cases_path: str, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cases = torch.load(cases_path)
    outputs = run_cases(cases, "cpu")
    outputs["late_values"] = _late_value_runs(cases)
    outputs["compiled"] = _compiled_runs(cases)
    outputs["opcheck"] = _opchecks()
    torch.save(outputs, out_path)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
