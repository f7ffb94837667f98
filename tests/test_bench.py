"""bench.py: statistics, ratios, the JSON schema, Markdown/PNG output, and `gag-export bench` on tiny-sdxl.

Benchmark figures are never asserted: only that runs complete and their outputs are well formed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gag_export.workflows import bench
from gag_export.workflows.bench import probes, timing
from gag_export.cli import cli
from gag_export.core.errors import InvalidInputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- statistics


def test_summarize_known_samples():
    stats = bench.summarize([i / 1000 for i in range(1, 11)])  # 1..10 ms, given in seconds
    assert stats.n == 10
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.std_ms == pytest.approx(3.0276503540974917)  # sample std (ddof=1)
    assert stats.p50_ms == pytest.approx(5.5)
    assert stats.p90_ms == pytest.approx(9.1)  # linear interpolation between ranks
    assert stats.p99_ms == pytest.approx(9.91)
    assert (stats.min_ms, stats.max_ms) == (pytest.approx(1.0), pytest.approx(10.0))


def test_summarize_matches_numpy_on_unsorted_samples():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(-3, 0.5, size=37)
    stats = bench.summarize(samples)
    ms = samples * 1e3
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert stats.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert stats.std_ms == pytest.approx(ms.std(ddof=1))


def test_summarize_single_sample_and_errors():
    one = bench.summarize([0.25])
    assert (one.n, one.mean_ms, one.std_ms, one.p50_ms, one.p99_ms) == (1, 250.0, 0.0, 250.0, 250.0)
    with pytest.raises(InvalidInputError, match="no timed samples"):
        bench.summarize([])
    with pytest.raises(InvalidInputError, match="NaN"):
        bench.summarize([0.1, float("nan")])


def test_paired_ratio_is_the_median_of_per_round_ratios():
    assert bench.paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == pytest.approx(3.0)
    with pytest.raises(InvalidInputError):
        bench.paired_ratio([1.0], [1.0, 2.0])


def test_wall_timer_measures_the_call():
    calls = []
    seconds = bench.WallTimer().measure(lambda: calls.append(1))
    assert calls == [1] and 0 <= seconds < 1
    assert isinstance(bench.timer_for("cpu"), bench.WallTimer)


# ------------------------------------------------------------------------------- configuration


def test_a_child_reports_its_own_peak_rss_not_its_parents():
    # bench children measure their backend's peak; Linux's ru_maxrss carries the parent's over
    # fork and exec (a 28 MiB child read the parent's 613)
    import subprocess
    import sys

    ballast = bytearray(300 * 2**20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touched, so resident
    parent = bench.peak_rss_bytes()
    child = subprocess.run([sys.executable, "-c", "from gag_export.workflows.bench import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert 0 < int(child.stdout) < parent - 250 * 2**20, (int(child.stdout), parent)
    del ballast


def test_timer_for_cuda_needs_torch_cuda(monkeypatch):
    # onnxruntime-gpu beside a CPU build of torch: ort-cuda variants cannot use CUDA events
    monkeypatch.setattr(timing, "_torch_cuda_available", lambda: False)
    assert isinstance(bench.timer_for("cuda"), bench.WallTimer)
    assert isinstance(bench.timer_for("cpu"), bench.WallTimer)


def test_parse_backends_and_config_validation():
    assert bench.parse_backends("torch, ORT,torch") == ("torch", "ort")
    with pytest.raises(InvalidInputError, match="tensort"):
        bench.parse_backends("torch,tensort")
    with pytest.raises(InvalidInputError, match="gag"):
        bench.BenchConfig("tiny-sdxl", gag="sometimes")
    with pytest.raises(InvalidInputError, match="iters"):
        bench.BenchConfig("tiny-sdxl", iters=0)
    with pytest.raises(InvalidInputError, match="height"):  # through the API too, not only the CLI
        bench.BenchConfig("tiny-sdxl", height=0)
    config = bench.BenchConfig("tiny-sdxl", backends=("ort", "torch"), graphs="g")
    assert bench.BenchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_plan_checks_the_model_before_anything_heavy():
    with pytest.raises(InvalidInputError, match="weights tiny"):
        bench.plan(bench.BenchConfig("tiny-sdxl", weights="random"))
    with pytest.raises(InvalidInputError, match="multiple"):
        bench.plan(bench.BenchConfig("tiny-sdxl", height=60))
    with pytest.raises(InvalidInputError, match="steps"):
        bench.plan(bench.BenchConfig("tiny-sdxl", steps=9))
    p = bench.plan(bench.BenchConfig("tiny-sdxl", batch=2))
    assert not p.e2e and "batch 1" in p.e2e_skip
    assert bench.plan(bench.BenchConfig("tiny-flux", e2e=False)).components == ("transformer",)


# ------------------------------------------------------------------------------- ratios and schema


def _series(samples_ms):
    return bench.Series(9.0, bench.summarize([s / 1e3 for s in samples_ms]), tuple(samples_ms))


def _row(backend, gag, samples_ms, status="ok", reason=""):
    if status != "ok":
        return bench.ResultRow(backend, gag, status, reason)
    return bench.ResultRow(backend, gag, "ok", "", "cpu", "perf_counter", step=_series(samples_ms),
                           memory=bench.RowMemory(rss_delta_mib=1.0))


def _doc(rows):
    overhead, speedup = bench.ratios(rows, interleaved=True)
    return bench.BenchResult(
        created="2025-01-01T00:00:00Z",
        config={"model": "tiny-sdxl", "weights": "tiny", "batch": 1, "height": 64, "width": 64, "steps": 4,
                "warmup": 1, "iters": 3},
        e2e_skipped="not requested (--no-e2e)",
        environment={"cpu": {"model": "Test CPU", "available_to_process": 2}, "memory_gib": 8.0, "gpu": None,
                     "versions": {"torch": "x", "onnxruntime": "y"}, "precision": "fp32",
                     "threads": {"torch": 2, "ort": 2}},
        shapes={}, graphs={}, memory={"method": "rss-delta", "pipeline_rss_mib": 3.0, "peak_rss_mib": 100.0},
        results=tuple(rows), gag_overhead=overhead, speedup=speedup,
    )


def test_ratios_gag_overhead_and_speedup_over_eager():
    rows = [_row("torch", False, [10, 10, 10]), _row("torch", True, [11, 11, 11]),
            _row("ort", False, [5, 5, 5]), _row("ort", True, [6, 6, 6]),
            _row("tensorrt", False, [], status="skipped", reason="no TensorRT")]
    overhead, speedup = bench.ratios(rows, interleaved=True)
    by_backend = {o.backend: o for o in overhead}
    assert by_backend["torch"].ratio == pytest.approx(1.1) and by_backend["torch"].percent == pytest.approx(10.0)
    assert by_backend["ort"].paired_p50 == pytest.approx(1.2)
    assert {(s.backend, s.gag): s.ratio for s in speedup} == {
        ("ort", False): pytest.approx(2.0), ("ort", True): pytest.approx(11 / 6, rel=1e-3)}
    assert "tensorrt" not in by_backend


def test_results_round_trip_through_json_and_a_broken_document_names_its_key():
    result = _doc([_row("torch", False, [1, 2, 3]), _row("tensorrt", True, [], status="skipped", reason="none")])
    doc = json.loads(json.dumps(result.to_dict()))
    assert bench.validate_result(doc) == result  # typed all the way: tuples, floats, nested classes
    assert doc["results"][0]["step"]["stats"]["p50_ms"] == pytest.approx(2.0)
    for broken, match in (
        ({k: v for k, v in doc.items() if k != "environment"}, "document has no 'environment'"),
        ({**doc, "environment": {"cpu": {}}}, "environment has no 'versions'"),
        ({**doc, "schema_version": 99}, "v1"),
        ({**doc, "results": [{**doc["results"][0], "gag": "yes"}]}, r"results\[0\].gag is str"),
        ({**doc, "results": [{**doc["results"][0], "status": "great"}]}, r"results\[0\] status is 'great'"),
        ({**doc, "gag_overhead": [{"backend": "torch"}]}, r"gag_overhead\[0\] has no 'measure'"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            bench.validate_result(broken)
    stats = {k: v for k, v in doc["results"][0]["step"]["stats"].items() if k != "p99_ms"}
    broken_row = {**doc["results"][0], "step": {**doc["results"][0]["step"], "stats": stats}}
    with pytest.raises(InvalidInputError, match=r"results\[0\].step.stats has no 'p99_ms'"):
        bench.validate_result({**doc, "results": [broken_row]})
    with pytest.raises(InvalidInputError, match="n is float"):
        bench.validate_result({**doc, "results": [{**doc["results"][0], "step": {
            **doc["results"][0]["step"], "stats": {**doc["results"][0]["step"]["stats"], "n": 2.5}}}]})


def test_markdown_lists_measured_and_skipped_backends():
    doc = _doc([_row("torch", False, [10, 12, 11]), _row("torch", True, [11, 13, 12]),
                _row("tensorrt", False, [], status="skipped", reason="TensorRT is not available here")])
    text = bench.render_markdown(doc)
    assert "| backend | GAG | device | step p50 ms |" in text
    assert "| torch | off | cpu | 11.0 |" in text
    assert "skipped: TensorRT is not available here" in text
    assert "| torch | step | 1.091 |" in text  # GAG / plain of the medians 12 / 11
    assert "Test CPU" in text


def test_markdown_has_a_cuda_memory_column_only_where_measured():
    rows = [_row("torch", False, [10, 12, 11]), _row("torch", True, [11, 13, 12])]
    assert "CUDA peak MiB" not in bench.render_markdown(_doc(rows))
    rows[1] = dataclasses.replace(rows[1], memory=dataclasses.replace(rows[1].memory, gpu_peak_mib=40.0))
    text = bench.render_markdown(_doc(rows))
    header, rule, off, on = [line for line in text.splitlines() if line.startswith("| torch") or line.startswith("| backend | GAG") or line.startswith("|---|---|---|---:")][:4]
    assert header.endswith("| torch CUDA peak MiB |") and rule.count("|") == header.count("|")
    assert on.endswith("| 40 |") and off.endswith("| - |") and off.count("|") == header.count("|")



def test_torch_cuda_peak_is_reported_for_torch_rows_only(monkeypatch):
    # ONNX Runtime and TensorRT allocate outside torch's allocator: their rows would read ~0
    import torch

    monkeypatch.setattr(probes, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    assert probes.gpu_peak("torch") == probes.gpu_peak("torch-compile") == 3 * 2**30
    assert probes.gpu_peak("ort") is None and probes.gpu_peak("tensorrt") is None


# ------------------------------------------------------------------------------- output paths


def _fake_run(doc, then=lambda: None):
    """A stand-in for run_bench: `then()` (something that happens during the run), then `doc`."""
    def run_bench(config, progress=None):
        then()
        return doc
    return run_bench


def test_cli_bench_refuses_an_unwritable_output_before_running(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    ran = []
    monkeypatch.setattr(bench, "run_bench", _fake_run(None, then=lambda: ran.append(True)))
    result = CliRunner().invoke(cli, ["bench", "--model", "tiny-sdxl", "--json", str(tmp_path / "afile" / "b.json")],
                                obj={})
    assert result.exit_code == 5, result.output
    assert "cannot write" in result.stderr and "afile" in result.stderr and "internal error" not in result.stderr
    assert not ran  # refused before the benchmark, not after it


def test_cli_bench_prints_the_results_when_writing_fails_at_the_end(tmp_path, monkeypatch):
    out = tmp_path / "out"
    doc = _doc([_row("torch", False, [10, 12, 11]), _row("torch", True, [11, 13, 12])])
    # the output folder turns into a file while the benchmark runs: the preflight passed, the write fails
    monkeypatch.setattr(bench, "run_bench", _fake_run(doc, then=lambda: (out.rmdir(), out.write_text(""))))
    result = CliRunner().invoke(cli, ["bench", "--model", "tiny-sdxl", "--json", str(out / "b.json"),
                                      "--markdown", str(tmp_path / "b.md")], obj={})
    assert result.exit_code == 5, result.output
    assert "| torch | off | cpu |" in result.stdout  # the results are not lost
    assert "cannot write" in result.stderr and "b.json" in result.stderr and "internal error" not in result.stderr
    assert "| torch | off | cpu |" in (tmp_path / "b.md").read_text()  # the outputs that can be written still are


def test_cli_bench_exits_4_when_a_requested_variant_failed_and_still_writes_its_results(tmp_path, monkeypatch):
    doc = _doc([_row("torch", False, [10, 12, 11]), _row("ort", False, [], status="failed", reason="graph damaged"),
                _row("tensorrt", False, [], status="skipped", reason="not installed")])
    monkeypatch.setattr(bench, "run_bench", _fake_run(doc))
    result = CliRunner().invoke(cli, ["bench", "--model", "tiny-sdxl", "--json", str(tmp_path / "b.json")], obj={})
    assert result.exit_code == 4, result.output
    assert "bench: 1 of 3 variants failed: ort/no-gag: graph damaged" in result.stderr  # skipped is no failure
    assert json.loads((tmp_path / "b.json").read_text())["results"][1]["status"] == "failed"


def test_atomic_write_on_a_full_disk_is_resource_exhausted_and_leaves_nothing(tmp_path):
    import errno

    from gag_export.core.atomic import atomic_path
    from gag_export.core.errors import ResourceExhaustedError

    dest = tmp_path / "b.json"
    with pytest.raises(ResourceExhaustedError, match="b.json"), atomic_path(dest):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- end to end


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_bench_tiny_sdxl_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "bench", "--model", "tiny-sdxl", "--backends", "torch,tensorrt", "--warmup", "1", "--iters", "2", "--both",
        "--threads", "1", "--graphs", str(tmp_path / "graphs"), "--json", str(out / "bench.json"),
        "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png"),
    ], obj={})
    assert result.exit_code == 0, result.output

    doc = json.loads((out / "bench.json").read_text())
    bench.validate_result(doc)
    assert doc["config"]["iters"] == 2 and doc["config"]["warmup"] == 1 and doc["config"]["steps"] == 4
    assert doc["environment"]["cpu"]["model"] and doc["environment"]["versions"]["torch"]
    rows = {(r["backend"], r["gag"]): r for r in doc["results"]}
    assert set(rows) == {("torch", False), ("torch", True), ("tensorrt", False), ("tensorrt", True)}
    for gag in (False, True):
        torch_row = rows[("torch", gag)]
        assert torch_row["status"] == "ok", torch_row["reason"]
        assert torch_row["step"]["stats"]["n"] == 2 and len(torch_row["step"]["samples_ms"]) == 2
        assert torch_row["e2e"]["stats"]["n"] == 2 and set(torch_row["e2e"]["stages_ms"]) == set(bench.SAMPLER_STAGES)
        assert torch_row["step"]["first_call_ms"] is not None
        trt_row = rows[("tensorrt", gag)]  # not installed here: skipped, saying so; a failure would be a bug
        if importlib.util.find_spec("tensorrt") is None:
            assert trt_row["status"] == "skipped" and "tensorrt" in trt_row["reason"].lower(), trt_row
        else:
            assert trt_row["status"] in ("ok", "skipped"), trt_row
    assert {(o["backend"], o["measure"]) for o in doc["gag_overhead"]} == {("torch", "step"), ("torch", "e2e")}
    assert not (tmp_path / "graphs").exists()  # torch alone exports nothing
    assert doc["config"]["isolate"] == "backend" and doc["memory"]["method"] == "child-peak-rss"  # the default
    assert rows[("torch", True)]["memory"]["peak_rss_mib"] > 0 and rows[("torch", True)]["load_average_after"]

    markdown = (out / "bench.md").read_text()
    assert "| backend | GAG | device | step p50 ms | step mean ± std | p90 | p99 | min | vs eager |" in markdown
    assert "| torch | off |" in markdown and "| torch | on |" in markdown and "| tensorrt | off |" in markdown
    assert "| backend | measure | GAG / plain (p50) |" in markdown

    width, height = _png_size(out / "bench.png")
    assert width > 300 and height > 200
    assert "| backend | GAG |" in result.output  # the table is also printed


def test_bench_ort_exports_the_denoiser_once_and_reuses_it(tmp_path):
    config = bench.BenchConfig("tiny-sdxl", backends=("ort",), gag="gag", warmup=0, iters=2, e2e=False, threads=1,
                               isolate="none", graphs=tmp_path / "graphs")
    result = bench.run_bench(config)
    doc = json.loads(json.dumps(result.to_dict()))
    assert bench.validate_result(doc) == result
    manifest = tmp_path / "graphs" / "gag" / "tiny-sdxl" / "manifest.json"
    assert set(json.loads(manifest.read_text())["components"]) == {"unet"}  # step-only: the denoiser alone
    (row,) = doc["results"]
    assert row["status"] == "ok", row["reason"]
    assert doc["memory"]["method"] == "rss-delta" and row["memory"]["rss_delta_mib"] is not None
    assert row["backend"] == "ort" and row["gag"] and row["step"]["stats"]["n"] == 2 and row["e2e"] is None
    assert doc["e2e_skipped"]
    assert doc["graphs"]["gag"]["denoiser_sha256"] == json.loads(manifest.read_text())["components"]["unet"]["sha256"]
    stamp = manifest.stat().st_mtime_ns
    assert bench.needs_export(config, bench.plan(config)) == {}
    assert manifest.stat().st_mtime_ns == stamp
    # one policy for a damaged cache, whatever is damaged: it is exported again, saying why
    unet = manifest.parent / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    assert "cached export damaged" in bench.needs_export(config, bench.plan(config))[True]
    manifest.write_text("{")
    assert "cached export damaged" in bench.needs_export(config, bench.plan(config))[True]


def test_bench_img2img_rows_time_image_to_image_on_the_encoders_graphs(tmp_path):
    """`--img2img`: each row gains an img2img series (a fixed input image at strength 0.5: int(4 x 0.5) = 2 steps),
    the graphs are exported with the VAE encoder, and the document still validates; torch and ort side by side."""
    with pytest.raises(InvalidInputError, match="--img2img times whole generations"):
        bench.plan(bench.BenchConfig("tiny-sdxl", e2e=False, img2img=True))
    config = bench.BenchConfig("tiny-sdxl", backends=("torch", "ort"), gag="gag", warmup=0, iters=1, threads=1,
                               isolate="none", graphs=tmp_path / "graphs", img2img=True)
    result = bench.run_bench(config)
    doc = json.loads(json.dumps(result.to_dict()))
    assert bench.validate_result(doc) == result
    manifest = json.loads((tmp_path / "graphs" / "gag" / "tiny-sdxl" / "manifest.json").read_text())
    assert "vae_encoder" in manifest["components"]
    for row in doc["results"]:
        assert row["status"] == "ok", row["reason"]
        assert row["img2img"]["stats"]["n"] == 1 and row["img2img"]["steps"] == 2 and row["img2img"]["first_call_ms"] > 0
        assert row["e2e"]["stats"]["n"] == 1  # text-to-image still timed
    assert {s["measure"] for s in doc["speedup"]} >= {"img2img"}
    assert "| backend | GAG | img2img p50 ms |" in bench.render_markdown(result)
