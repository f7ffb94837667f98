"""The fused kernel built for real NVIDIA GPUs, on this CPU-only machine.

Triton compiles and assembles (its bundled ptxas) without a GPU, so what a launch on an A100,
T4, RTX 3090/4090, L4 or H200 would compile can be built here and its resources read
(`gag_export/gag/kernels/aot.py`). These tests check the claims the dispatch and the docs make about
those GPUs: the SDXL tiles run everywhere, without register spills; every tile the dispatch
accepts runs on Hopper. What they cannot check is speed (benchmarks/bench_gpu.py, on a GPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gag_export.gag import kernels

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install 'gag-export[dev]')")


@pytest.fixture(scope="module")
def aot():
    from gag_export.gag.kernels import aot

    return aot


# CLIP's 77 keys at SDXL's head_dim 64: the shapes the fused kernel is for, on every GPU from
# the T4 to Blackwell, the Jetson AGX Orin among them.
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_120"])
@pytest.mark.parametrize("dtype, mask_mode, per_key", [
    (torch.float16, 0, False), (torch.float16, 2, False), (torch.float16, 2, True), (torch.bfloat16, 0, False),
])
def test_sdxl_tile_fits_every_gpu_without_spills(aot, arch, dtype, mask_mode, per_key):
    build = aot.compile_kernel(arch, dtype, lk=77, head_dim=64, mask_mode=mask_mode, mask_per_key=per_key)
    block_m, block_n, block_n2, _, num_warps = kernels.block_sizes(77, 64, dtype.itemsize)
    assert (build.block_m, build.block_n, build.block_n2, build.num_warps) == (block_m, block_n, block_n2, num_warps)
    assert build.shared_bytes <= aot.ARCHS[arch].shared_memory_per_block, build
    assert build.local_bytes == 0, f"registers spill: {build}"
    assert build.registers <= 255 and build.blocks_per_sm() >= 1


# The dispatch's envelope at its corners: head_dim up to 128, up to 512 keys, each dtype, under the
# 64 KiB key/value tile rule. The H200 gpu tests run these; here: that they build for Hopper,
# within its shared memory and without spills, so "auto" never falls back there.
ENVELOPE = [
    (torch.float16, 77, 128), (torch.float16, 512, 64), (torch.float16, 256, 128), (torch.float16, 300, 40),
    (torch.bfloat16, 512, 32), (torch.float32, 77, 64), (torch.float32, 77, 128), (torch.float32, 256, 64),
]


@pytest.mark.parametrize("dtype, lk, head_dim", ENVELOPE)
def test_every_accepted_tile_runs_on_hopper(aot, dtype, lk, head_dim):
    q = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="meta")
    kv = torch.empty(1, 1, lk, head_dim, dtype=dtype, device="meta")
    assert kernels.fused_shape_reason(q, kv, kv, 1.5, None, 1.0, 1.0, 0.0) is None  # inside the envelope
    build = aot.compile_kernel("sm_90", dtype, lk, head_dim)
    assert build.shared_bytes <= aot.ARCHS["sm_90"].shared_memory_per_block, build
    assert build.local_bytes == 0, f"registers spill: {build}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100"])
def test_flux_joint_tile_fits_datacenter_gpus(aot, arch):
    # FLUX.1-schnell's image queries x 256 T5 keys, 24 heads of 128, in the joint form (GAG - dense
    # in fp32), in the kernel's first form (values loaded with the keys).
    build = aot.compile_kernel(arch, torch.bfloat16, lk=256, head_dim=128, minus_dense=True)
    assert build.shared_bytes <= aot.ARCHS[arch].shared_memory_per_block, build
    assert build.local_bytes == 0, f"registers spill: {build}"


@pytest.mark.parametrize("arch", ["sm_86", "sm_89", "sm_120"])
@pytest.mark.parametrize("dtype, lk, head_dim, minus_dense", [
    (torch.bfloat16, 256, 128, True),   # FLUX.1-schnell's joint tile
    (torch.float16, 512, 64, False),    # T5's 512 keys
])
def test_t5_tiles_fit_the_99_kib_gpus_in_the_late_values_form(aot, arch, dtype, lk, head_dim, minus_dense):
    # RTX 3090/4090/5090, A10, L4, L40: the first form holds the key and value tiles at once and is
    # refused there; the op then launches the form that loads the values after the entmax.
    limit = aot.ARCHS[arch].shared_memory_per_block
    first = aot.compile_kernel(arch, dtype, lk, head_dim, minus_dense=minus_dense)
    late = aot.compile_kernel(arch, dtype, lk, head_dim, minus_dense=minus_dense, late_values=True)
    assert first.shared_bytes > limit, "the first form fits: the late form would never run here"
    assert late.shared_bytes <= limit, late
    assert late.local_bytes == 0, f"registers spill: {late}"
    assert late.executed_instructions(4, 3) <= 1.5 * first.executed_instructions(4, 3), (first, late)


@pytest.mark.parametrize("mask_mode", [1, 2])
@pytest.mark.parametrize("per_key", [True, False])
def test_a_mask_costs_little(aot, mask_mode, per_key):
    # A mask that is one row of keys for all queries (text padding) is loaded as that row; one that
    # varies per query enters the score dot as its accumulator. Applied to the scores after the
    # dot instead, a [queries, keys] mask tile made the compiler convert layouts in every bisection
    # and Newton step (1.95x the instructions at the SDXL tile, sm_90, Triton 3.6; now 1.03x with
    # the row, 1.16x with the tile).
    plain = aot.compile_kernel("sm_90", torch.float16, lk=77, head_dim=64)
    masked = aot.compile_kernel("sm_90", torch.float16, lk=77, head_dim=64, mask_mode=mask_mode, mask_per_key=per_key)
    assert masked.executed_instructions(4, 3) <= 1.25 * plain.executed_instructions(4, 3), (plain, masked)


@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
def test_the_build_reads_loops_and_resources(aot, arch):
    # The executed-instruction count the benchmark reports: each loop (bisection, Newton) counted
    # by its trip count, so more steps execute more instructions. At the SDXL tile ptxas keeps both
    # loops; on sm_100 (uniform-predicate branches, and spin-waits for the tensor memory and the
    # asynchronous MMAs, which are not the kernel's loops) the reading must find the same two.
    build = aot.compile_kernel(arch, torch.float16, lk=77, head_dim=64)
    assert build.sass_instructions > 1000 and build.registers > 32
    kinds = [kind for kind, _ in build.loops]
    assert kinds == ["bisect", "newton"], build.loops
    once = build.executed_instructions(1, 1)
    assert once == build.sass_instructions
    assert build.executed_instructions(2, 3) == once + sum(body * (1 if kind == "bisect" else 2) for kind, body in build.loops)


def test_unknown_arch_is_refused(aot):
    with pytest.raises(ValueError, match="sm_70"):
        aot.compile_kernel("sm_70", torch.float16, lk=77, head_dim=64)


def test_resource_report_shows_which_form_fits_a_99_kib_gpu(tmp_path):
    # kernels/__init__.py says T5's 512 keys overflow the 99 KiB of an RTX 4090 in the kernel's
    # first form (hence the op's second form) while CLIP's 77 fit it: the report must agree.
    import importlib.util as iu
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    spec = iu.spec_from_file_location("kernel_resources", path)
    report = iu.module_from_spec(spec)
    spec.loader.exec_module(report)
    out = tmp_path / "resources.json"
    assert report.main(["--archs", "sm_89", "--dtypes", "fp16", "--masks", "none", "--sweep-arch", "", "--json", str(out)]) == 0
    fits = {(r["shape"], r["form"]): r["fits"] for r in json.loads(out.read_text())["builds"]}
    assert fits["clip77-d64", "values-with-keys"] and fits["clip77-d128", "values-with-keys"]
    assert ("clip77-d64", "late-values") not in fits, "the second form is built only where the first does not fit"
    assert not fits["t5-512-d64", "values-with-keys"] and fits["t5-512-d64", "late-values"]
    with pytest.raises(SystemExit):
        report.parse_args(["--archs", "sm_70"])
