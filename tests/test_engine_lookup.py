"""Engines meet the GPU that runs them, and TensorRT outputs belong to the caller.

- Lookup: an engine built on one GPU (sm, model) with one TensorRT version is not found on
  another; the component is reported missing and `generate`'s build step (`ensure_artifacts`)
  builds one instead of leaving the load to fail. On CPU, through the real code: only the GPU
  probe (`detect_gpu`), the installed TensorRT (`trt_features`) and the plan builder are played.
- Output ownership: `TensorRTComponent.infer` reuses its device buffers across calls, so what it
  hands back must be a copy. On CPU a stand-in engine really writes each run's outputs into the
  addresses bound on its context, and "device" memory reads back to the host only as a copy;
  marked `tensorrt`/`gpu`, the same contract on a real engine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_engine import (
    FakePlanBuilder,
    _tensorrt_importable,
    export_tiny_graphs,
    feed_from_manifest,
    run_ort,
    write_graphs,
)

from gag_export.artifacts import engines as engines_module
from gag_export.artifacts.engines import find_engine, load_engine_bytes, read_sidecar
from gag_export.core.errors import ArtifactError
from gag_export.core.gpu import GpuInfo
from gag_export.core.tensorrt import TensorRTCapabilities, get_flavor
from gag_export.engine import plans as engine_plans
from gag_export.runtime import load_components
from gag_export.runtime import tensorrt_backend
from gag_export.runtime.exports import load_manifest_for
from gag_export.workflows import artifacts as workflow_artifacts
from gag_export.workflows.artifacts import PrepareStep, engine_target, ensure_artifacts, missing_engines

MODEL = "tiny-test"  # write_graphs' model: one `unet`, sample [batch, 16, 4] (batch 1..2) and 0-d gag_scale
BUILT_WITH = "10.13.0.35"
H100_SXM = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), None)
RTX_4090, RTX_5090 = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9), None), GpuInfo("NVIDIA GeForce RTX 5090", (12, 0), None)
RTX_BUILT_WITH = "1.2.0.54"
ELSEWHERE = {  # backend, the machine that builds the engine, the one that looks it up: one thing differs
    "tensorrt: another sm": ("tensorrt", (H100_SXM, BUILT_WITH), (GpuInfo("NVIDIA L4", (8, 9), None), BUILT_WITH)),
    "tensorrt: another gpu model, same sm": ("tensorrt", (H100_SXM, BUILT_WITH),
                                             (GpuInfo("NVIDIA H100 PCIe", (9, 0), None), BUILT_WITH)),
    "tensorrt: another version": ("tensorrt", (H100_SXM, BUILT_WITH), (H100_SXM, "10.8.0.43")),
    # generate builds TensorRT-RTX engines for this GPU's compute capability only
    "tensorrt-rtx: another sm": ("tensorrt-rtx", (RTX_4090, RTX_BUILT_WITH), (RTX_5090, RTX_BUILT_WITH)),
    "tensorrt-rtx: another version": ("tensorrt-rtx", (RTX_4090, RTX_BUILT_WITH), (RTX_4090, "1.3.0.35")),
}


@dataclasses.dataclass
class Machine:
    """What gag-export sees of this machine: the GPU probe's answer, the installed TensorRT (or
    TensorRT-RTX), and the plan builder `gag-export engine` would use (a FakePlanBuilder: it counts)."""

    gpu: GpuInfo | None = None
    caps: TensorRTCapabilities | None = None
    builder: FakePlanBuilder = dataclasses.field(default_factory=FakePlanBuilder)

    def become(self, gpu: GpuInfo, version: str, backend: str = "tensorrt") -> None:
        self.gpu, self.caps = gpu, TensorRTCapabilities.from_version(version, flavor=backend)


@pytest.fixture
def machine(monkeypatch) -> Machine:
    """Every reader of the GPU and of TensorRT's version (build, `ensure_artifacts`, the runtime) asks `Machine`."""
    state = Machine()
    monkeypatch.setattr(engines_module, "detect_gpu", lambda device=0: state.gpu)  # RuntimeTarget.current's probe
    # TensorRT-RTX's compute capabilities, as its module's enum offers them
    offered = SimpleNamespace(ComputeCapability=SimpleNamespace(SM75=75, SM80=80, SM86=86, SM89=89, SM120=120))
    monkeypatch.setattr(engines_module, "import_tensorrt", lambda flavor="tensorrt": offered)
    for module in (workflow_artifacts, engine_plans, tensorrt_backend):
        monkeypatch.setattr(module, "trt_features", lambda flavor="tensorrt": state.caps)
    monkeypatch.setattr(engine_plans, "PolygraphyPlanBuilder", lambda caps, target=None: state.builder)
    return state


def plans_in(engines):
    return sorted(engines.glob("**/*.plan"))


# --------------------------------------------------------------------------------------------
# (A) lookup: another GPU's engine is missing here, and generate builds one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("elsewhere", list(ELSEWHERE))
def test_an_engine_for_another_gpu_is_not_found_and_generate_builds_one(tmp_path, machine, elsewhere):
    """Built on GPU X, looked up on GPU Y: found, `generate` would skip the build and fail at load."""
    backend, built_on, looked_up_on = ELSEWHERE[elsewhere]
    graphs = write_graphs(tmp_path, dtype="fp32").parent
    engines = tmp_path / "engines"
    built_here = [PrepareStep("engine", engines / MODEL)]
    manifest = load_manifest_for(MODEL, graphs)
    sha = manifest.components["unet"]["sha256"]

    machine.become(*built_on, backend)
    assert ensure_artifacts(MODEL, backend, graphs=graphs, engines=engines) == built_here
    (x_plan,) = plans_in(engines)
    # the control: the GPU that built it finds it, and nothing is built again
    assert find_engine(engines, MODEL, "unet", engine_target(backend), sha) == x_plan
    assert ensure_artifacts(MODEL, backend, graphs=graphs, engines=engines) == []
    assert machine.builder.builds == 1

    machine.become(*looked_up_on, backend)
    here = engine_target(backend)
    built = read_sidecar(x_plan)
    assert find_engine(engines, MODEL, "unet", here, sha) is None, (
        f"{x_plan.name}, built for {built.gpu_name or 'any GPU'} ({built.sm_tag}) with {built.builder_label}, "
        f"was found for {here.gpu_name} ({here.sm_tag}) with {here.trt_version}")
    assert missing_engines(manifest, engines, here) == ["unet"]
    with pytest.raises(ArtifactError, match=f"no {get_flavor(backend).label} engine for {MODEL}/unet"):
        load_components(MODEL, backend, graphs=graphs, engines=engines)

    assert ensure_artifacts(MODEL, backend, graphs=graphs, engines=engines) == built_here
    assert machine.builder.builds == 2
    plan = find_engine(engines, MODEL, "unet", here, sha)
    assert plan is not None and read_sidecar(plan).tensorrt_version == here.trt_version
    assert load_engine_bytes(plan, here, onnx_sha256=sha) == plan.read_bytes()  # what activating checks first
    assert load_components(MODEL, backend, graphs=graphs, engines=engines)["unet"].plan_path == plan


# --------------------------------------------------------------------------------------------
# (B) output ownership, on CPU: a stand-in engine that really reuses its buffers
# --------------------------------------------------------------------------------------------


class DeviceMemory(torch.Tensor):
    """A tensor standing for GPU memory: reading it back to the host (`.to("cpu")`, `.cpu()`) gives a
    new host tensor, as a device-to-host copy does; the buffer itself is what the engine writes."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).clone()
        return super().__torch_function__(func, types, args, kwargs or {})


class _Stream:
    cuda_stream = 0x5EED

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostTorch:
    """`torch` as tensorrt_backend sees it, with CUDA played on the host: buffers are `DeviceMemory`;
    the stand-in engine runs synchronously, so its streams have nothing to wait for."""

    def __init__(self):
        self.cuda = SimpleNamespace(
            is_available=lambda: True, device=lambda device: nullcontext(), Stream=lambda device=None: _Stream(),
            current_stream=lambda device=None: _Stream(), stream=lambda stream: nullcontext(),
        )

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(shape, *, dtype, device):
        return torch.empty(shape, dtype=dtype).as_subclass(DeviceMemory)


def _at(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 memory at `address`, as TensorRT sees a bound tensor: no copy."""
    return np.ctypeslib.as_array((ctypes.c_float * max(1, math.prod(shape))).from_address(address)).reshape(shape)


class StandInContext:
    """An execution context: shapes and addresses set by name; each run reads the inputs at their
    addresses and writes `latent = sample * gag_scale + 1` into the output's address."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.written: list[int] = []  # the output address of every run

    def set_input_shape(self, name, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return name != "sample" or 1 <= shape[0] <= 2

    def get_tensor_shape(self, name):
        return self.shapes.get("sample", (-1, 16, 4)) if name == "latent" else self.shapes[name]

    def set_tensor_address(self, name, address) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle) -> bool:
        shape = self.shapes["sample"]
        sample, scale = _at(self.addresses["sample"], shape), _at(self.addresses["gag_scale"], ())
        _at(self.addresses["latent"], shape)[...] = sample * scale + 1
        self.written.append(self.addresses["latent"])
        return True


def stand_in_tensorrt(contexts: list) -> SimpleNamespace:
    """The `tensorrt` module as far as TensorRTComponent uses it, deserializing gag-export's stand-in plans."""
    io = {"sample": ("input", (-1, 16, 4)), "gag_scale": ("input", ()), "latent": ("output", (-1, 16, 4))}

    def make_context():
        contexts.append(StandInContext())
        return contexts[-1]

    engine = SimpleNamespace(
        num_io_tensors=len(io), get_tensor_name=lambda i: list(io)[i], get_tensor_mode=lambda n: io[n][0],
        get_tensor_location=lambda n: "device", get_tensor_dtype=lambda n: "float", get_tensor_shape=lambda n: io[n][1],
        create_execution_context=make_context,
    )

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            return engine if plan.startswith(b"PLAN") else None  # FakePlanBuilder's plans, validated first

    return SimpleNamespace(
        Runtime=Runtime, Logger=Logger,
        TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"),
        TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"), DataType=SimpleNamespace(FLOAT="float"),
    )


def test_tensorrt_component_outputs_survive_the_next_call(tmp_path, machine, monkeypatch):
    """Outputs handed back as the reused buffers (no copy) change under the caller at the next call."""
    contexts: list[StandInContext] = []
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda flavor="tensorrt": stand_in_tensorrt(contexts))
    monkeypatch.setattr(tensorrt_backend, "torch", HostTorch())
    graphs = write_graphs(tmp_path, dtype="fp32").parent
    machine.become(H100_SXM, BUILT_WITH)
    ensure_artifacts(MODEL, "tensorrt", graphs=graphs, engines=tmp_path / "engines")
    rng = np.random.default_rng(0)
    feeds = [{"sample": rng.standard_normal((batch, 16, 4)).astype(np.float32), "gag_scale": np.float32(scale)}
             for batch, scale in ((1, 2.0), (1, -3.0), (2, 5.0))]
    expected = [feed["sample"] * feed["gag_scale"] + 1 for feed in feeds]

    with load_components(MODEL, "tensorrt", graphs=graphs, engines=tmp_path / "engines")["unet"] as unet:
        results = [unet.infer(feeds[0]), unet.infer(feeds[1])]
        (context,) = contexts
        assert context.written[0] == context.written[1], "the stand-in must see its output buffer reused"
        np.testing.assert_array_equal(np.asarray(results[1]["latent"]), expected[1])
        np.testing.assert_array_equal(np.asarray(results[0]["latent"]), expected[0],
                                      err_msg="the first call's output changed when the component ran again")
        results.append(unet.infer(feeds[2]))  # another batch: buffers allocated again, earlier outputs still the caller's
        for result, want in zip(results, expected):
            np.testing.assert_array_equal(np.asarray(result["latent"]), want)
            assert type(result["latent"]) is np.ndarray


# --------------------------------------------------------------------------------------------
# (B) the same on a real engine (GPU machines with TensorRT: `pytest -m tensorrt`)
# --------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_importable() or not torch.cuda.is_available(),
                    reason="needs tensorrt importable and a CUDA GPU (pip install \"gag-export[tensorrt]\")")
def test_tensorrt_component_outputs_survive_the_next_call_on_a_real_engine(tmp_path):
    graphs = export_tiny_graphs(tmp_path / "graphs", "fp32")
    model, engines = graphs.name, tmp_path / "engines"
    assert ensure_artifacts(model, "tensorrt", graphs=graphs.parent, engines=engines) == [
        PrepareStep("engine", engines / model)]
    manifest = load_manifest_for(model, graphs.parent)
    entry = manifest.components["unet"]
    feeds = [feed_from_manifest(entry, shape="opt", seed=seed, scalars={"gag_scale": scale})
             for seed, scale in ((0, 10.0), (1, 3.0))]
    with load_components(model, "tensorrt", graphs=graphs.parent, engines=engines)["unet"] as unet:
        first = unet.infer(feeds[0])
        kept = {name: np.array(value, copy=True) for name, value in first.items()}
        buffer = unet._buffers["latent"].data_ptr()
        second = unet.infer(feeds[1])
        assert unet._buffers["latent"].data_ptr() == buffer  # the same device buffer served both calls
    assert type(first["latent"]) is np.ndarray
    np.testing.assert_array_equal(first["latent"], kept["latent"],
                                  err_msg="the first call's output changed when the component ran again")
    assert np.abs(second["latent"] - first["latent"]).max() > 1e-3
    reference = run_ort(graphs / entry["path"], feeds[0])["latent"]
    np.testing.assert_allclose(first["latent"], reference, rtol=1e-3, atol=1e-3)
