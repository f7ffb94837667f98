"""`gag-export doctor`: the probes on this machine, the backend rules on made-up machines, the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from gag_export import doctor
from gag_export.cli import cli
from gag_export.core.gpu import GpuInfo

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 80 * (1 << 30))
RTX4090 = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9), 24 * (1 << 30))
RTX_TARGETS = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


def _backends(env: doctor.Environment) -> dict[str, doctor.Backend]:
    return {b.name: b for b in doctor.assess_backends(env)}


def _env(**kwargs) -> doctor.Environment:
    base = {"python": "3.11", "platform": "Linux", "torch": "2.13.0", "onnxruntime": "1.32.0",
            "ort_providers": ("CPUExecutionProvider",), "polygraphy": "0.53.6"}
    return doctor.Environment(**{**base, **kwargs})


@pytest.fixture(scope="module")
def report():
    return doctor.diagnose()


def test_report_names_every_backend(report):
    assert [b.name for b in report.backends] == ["torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "tensorrt-rtx-build",
                                                  "tensorrt-rtx", "triton-kernels"]
    for b in report.backends:
        assert b.usable or b.install, f"{b.name} is unusable without an install step"


def test_onnxruntime_and_its_providers_are_reported(report):
    import onnxruntime

    assert report.environment.onnxruntime == onnxruntime.__version__
    assert "CPUExecutionProvider" in report.environment.ort_providers
    backends = {b.name: b for b in report.backends}
    assert backends["ort-cpu"].usable


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_unusable_here_with_the_install_step(report):
    tensorrt = {b.name: b for b in report.backends}["tensorrt"]
    assert not tensorrt.usable
    assert tensorrt.install == 'pip install "gag-export[tensorrt]"'
    assert "import tensorrt" in tensorrt.detail
    assert report.environment.tensorrt is None


def test_no_gpu_rules():
    backends = _backends(_env(tensorrt="10.13.0.35"))
    assert backends["torch"].usable and "CPU" in backends["torch"].detail
    assert not backends["ort-cuda"].usable and "no" in backends["ort-cuda"].detail
    assert backends["ort-cuda"].install == "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
    assert not backends["tensorrt"].usable and "none is visible" in backends["tensorrt"].detail


def test_gpu_machine_with_tensorrt_10():
    env = _env(torch_cuda="12.8", torch_sees_gpu=True, gpu=H100, tensorrt="10.13.0.35", triton="3.4.0",
               ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    backends = _backends(env)
    assert all(b.usable for n, b in backends.items() if not n.startswith("tensorrt-rtx")), backends
    assert "--weakly-typed available" in backends["tensorrt"].detail
    assert "sm90" in backends["tensorrt"].detail
    assert backends["tensorrt-rtx"].install == 'pip install "gag-export[tensorrt-rtx]"'  # not installed in this made-up machine


def test_tensorrt_rtx_builds_anywhere_and_runs_on_its_targets_only():
    rtx = {"tensorrt_rtx": "1.7.1.116", "tensorrt_rtx_targets": RTX_TARGETS}
    no_gpu = _backends(_env(**rtx))
    assert no_gpu["tensorrt-rtx-build"].usable and "no GPU needed" in no_gpu["tensorrt-rtx-build"].detail
    assert not no_gpu["tensorrt-rtx"].usable and "RTX" in no_gpu["tensorrt-rtx"].detail
    hopper = _backends(_env(gpu=H100, **rtx))["tensorrt-rtx"]
    assert not hopper.usable and "sm90" in hopper.detail and "tensorrt backend" in hopper.install
    ada = _backends(_env(gpu=RTX4090, **rtx))["tensorrt-rtx"]
    assert ada.usable and "RTX 4090" in ada.detail


def test_a_gpu_that_torch_cannot_use_is_not_reported_as_torch_on_the_gpu():
    # NVML finds the GPU, torch.cuda.is_available() is False (a driver older than torch's CUDA):
    # "auto" runs on the CPU, and doctor must say so, not "torch on H100"
    backends = _backends(_env(torch_cuda="13.0", torch_sees_gpu=False, gpu=H100, triton="3.6.0"))
    assert backends["torch"].usable and "on CPU" in backends["torch"].detail and "driver" in backends["torch"].detail
    assert not backends["triton-kernels"].usable and "cannot use" in backends["triton-kernels"].detail


def test_tensorrt_11_needs_a_recent_onnxruntime_for_its_ep():
    env = _env(torch_cuda="12.8", gpu=H100, tensorrt="11.4.0.9", onnxruntime="1.26.0",
               ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    backends = _backends(env)
    assert backends["tensorrt"].usable and "strongly typed only" in backends["tensorrt"].detail
    assert not backends["ort-trt"].usable and "1.27" in backends["ort-trt"].detail
    assert backends["ort-trt"].install == "pip install -U onnxruntime-gpu"


def test_cpu_onnxruntime_on_a_gpu_machine():
    backends = _backends(_env(torch_cuda="12.8", gpu=H100))
    assert not backends["ort-cuda"].usable and "CUDAExecutionProvider" in backends["ort-cuda"].detail
    assert not backends["tensorrt"].usable and backends["tensorrt"].install == 'pip install "gag-export[tensorrt]"'


def test_json_output():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert "CPUExecutionProvider" in data["environment"]["ort_providers"]
    assert {b["name"] for b in data["backends"]} >= {"torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "triton-kernels"}
    assert all(set(b) == {"name", "usable", "detail", "install"} for b in data["backends"])


def test_table_output(report):
    console = Console(record=True, width=200)
    console.print(doctor.render(report))
    text = console.export_text()
    for needle in ("Python", "torch", "GPU", "TensorRT", "Polygraphy", "onnxruntime", "diffusers",
                   "CPUExecutionProvider", "ort-trt", "triton-kernels"):
        assert needle in text
    if importlib.util.find_spec("tensorrt") is None:
        assert 'pip install "gag-export[tensorrt]"' in text  # not eaten as rich markup


def test_cli_doctor_table():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "backends" in result.output and "ort-cpu" in result.output
