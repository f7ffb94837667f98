"""benchmarks/bench_e2e_gpu.py: the parts that run without a GPU (arguments, refusal, tiny CPU run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e_gpu", REPO / "benchmarks" / "bench_e2e_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_defaults_are_the_issue_row_and_refuse_without_cuda(e2e, capsys):
    with pytest.raises(e2e.BenchError, match="GPU machine"):
        e2e.parse_args([])
    assert e2e.main([]) == 2
    assert "error:" in capsys.readouterr().err
    args = e2e.parse_args(["--device", "cpu"])
    assert (args.model, args.resolution, args.iters >= 20) == ("dmd2-1step", None, True)


def test_the_chain_refuses_a_scheduler_it_does_not_write_out(e2e):
    with pytest.raises(e2e.BenchError, match="LCM"):
        args = e2e.parse_args(["--device", "cpu", "--model", "tiny-flux", "--iters", "1", "--warmup", "0"])
        e2e.run(args)


def test_tiny_cpu_run_matches_the_sampler_and_times_every_variant(e2e, tmp_path):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--device", "cpu", "--model", "tiny-sdxl", "--iters", "2", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # the chain (the LCM step written out, tensors on the device) computes what the sampler does
    for key in ("plain", "gag"):
        assert result["check_chain_vs_sampler"][key]["latents_max_abs"] < 1e-5
        assert result["check_chain_vs_sampler"][key]["image_max_level_diff"] <= 1
    rows = {(r["form"], r["gag"]): r for r in result["rows"]}
    assert set(rows) == {(f, g) for f in ("sampler", "chain-eager") for g in (False, True)}  # no CUDA graph on CPU
    assert all(r["n"] == 2 and r["p50_ms"] > 0 and r["error"] is None for r in rows.values())
    assert rows[("sampler", True)]["gag_vs_plain_paired"] > 0
    assert set(rows[("sampler", False)]["stages_p50_ms"]) == {"text_encode", "denoise", "vae_decode"}
    assert result["settings"]["height"] == 64 and "gpu" not in result["environment"]
