"""benchmarks/bench_gpu.py: the parts that run without a GPU (arguments, refusal, dry run, tiny CPU run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_issue_measurement(bench):
    args = bench.parse_args([])
    assert (args.device, args.resolution, args.batch, args.dtype) == ("cuda", 1024, 1, "fp16")
    assert args.variants == ["plain", "gag-fused", "gag-bisect"] == args.compile_variants
    assert args.steps >= 20
    assert args.core_shapes == [(10, 4096), (20, 1024)] and (args.core_keys, args.core_head_dim) == (77, 64)
    assert args.joint_shapes == [(24, 4096, 256)]  # FLUX.1-schnell at 1024x1024


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--variants", "plain,gag-magic"], "unknown variant"),
        (["--steps", "5"], ">= 20"),
        (["--device", "cpu"], "--tiny"),
        (["--core-shapes", "10by4096"], "HEADSxLQ"),
        (["--joint-shapes", "24x4096"], "HEADSxIMAGExTEXT"),
        (["--resolution", "1001"], "multiple of 8"),
    ],
)
def test_bad_arguments_are_refused(bench, argv, match):
    with pytest.raises(bench.BenchError, match=match):
        bench.parse_args(argv)


def test_cpu_takes_the_full_size_unet_for_compile_times_only(bench):
    args = bench.parse_args(["--device", "cpu", "--variants", "none", "--core-shapes", "none", "--steps", "2",
                             "--compile-variants", "plain,gag-bisect,gag-bisect-inline"])
    assert (args.tiny, args.resolution, args.variants) == (False, 1024, [])
    assert args.compile_variants == ["plain", "gag-bisect", "gag-bisect-inline"]
    with pytest.raises(bench.BenchError, match="compile times"):
        bench.parse_args(["--device", "cpu", "--variants", "plain", "--core-shapes", "none"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_cuda(bench, capsys):
    assert bench.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "CUDA" in err and "--dry-run" in err


def test_sdxl_config_is_sdxl_base(bench):
    cfg, _ = bench.sdxl_unet_config()
    for key in ("block_out_channels", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim"):
        assert list(cfg[key]) == list(bench.SDXL_UNET_CONFIG[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key] == bench.SDXL_UNET_CONFIG[key]


@pytest.mark.slow
def test_dry_run_traces_full_sdxl_on_meta(bench, capsys):
    assert bench.main(["--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)["dry_run"]
    assert plan["gag_layers"] == 60 and plan["output_shape"] == [1, 4, 128, 128]
    shapes = {(tuple(s["q"]), tuple(s["k"])): (s["layers"], s["fused"]) for s in plan["gag_core_shapes"]}
    assert shapes == {
        ((1, 10, 4096, 64), (1, 10, 77, 64)): (10, "supported"),
        ((1, 20, 1024, 64), (1, 20, 77, 64)): (50, "supported"),
    }


def test_tiny_cpu_smoke_run(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "0", "--compile-variants", "none",
            "--core-shapes", "2x16", "--core-head-dim", "16", "--no-core-compile", "--joint-shapes", "2x16x8",
            "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    eager = result["eager"]
    assert eager["plain"]["n"] == 2 and eager["gag-bisect"]["gag_layers"] == 6
    assert "p50_vs_plain" in eager["gag-bisect"]
    assert eager["gag-fused"] == {"skipped": "the fused kernel needs CUDA"}
    core = result["core"]["B1 H2 Lq16 Lk77 d16 fp32"]
    assert {"sdpa", "gag-sort", "gag-bisect"} <= set(core)
    assert core["gag-fused"] == {"skipped": "the fused kernel needs CUDA"}
    joint = result["joint"]["B1 H2 image16 text8 d128 fp32"]
    assert joint["gag-bisect"]["n"] == 3 and "p50_vs_sdpa" in joint["gag-bisect"]
    assert "p50_vs_sdpa" in joint["sdpa-joint-padded"] and "p50_vs_sdpa" in joint["sdpa-v-one-wider"]
    assert joint["gag-fused"] == {"skipped": "the fused kernel needs CUDA"}
