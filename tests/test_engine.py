"""Engine layer: profiles, precision rules, cache keys, sidecars and their validation, the CLI's
no-TensorRT exit, and (marked `tensorrt`, skipped without it) real builds compared with ONNX Runtime.

On a GPU machine with TensorRT: `pytest -m tensorrt tests/test_engine.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from gag_export import engine as eng
from gag_export.artifacts.engines import runtime_cache_path
from gag_export.check.parser import parse_onnx
from gag_export.core.gpu import detect_gpu
from gag_export.core.tensorrt import import_tensorrt
from gag_export.engine import plans as engine_plans
from gag_export.runtime.tensorrt_backend import deserialize_engine
from gag_export.cli import cli
from gag_export.engine import EngineOptions, RuntimeTarget, ShapeMode, TensorRTCapabilities
from gag_export.core.precision import Precision
from gag_export.core.errors import ArtifactError, CheckFailedError, InvalidInputError, MissingDependencyError

TRT10 = TensorRTCapabilities.from_version("10.13.0.35")
TRT11 = TensorRTCapabilities.from_version("11.4.0.9")
H100 = RuntimeTarget("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))


def _tensorrt_importable() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


skip_without_tensorrt = pytest.mark.skipif(
    not _tensorrt_importable(),
    reason='tensorrt does not import here: needs an NVIDIA GPU and `pip install "gag-export[tensorrt]"`',
)


# --------------------------------------------------------------------------------------------
# helpers (shared by the pure tests and the TensorRT tests; an exported tiny-sdxl folder from
# `gag_export.export` has the same layout, so `build_and_compare` takes it as is)
# --------------------------------------------------------------------------------------------


def component_entry(path: str, data: bytes | None = None, *, dynamic: bool = True, dtype: str = "float32") -> dict:
    """A manifest component: `sample` [batch, 16, 4] (dynamic batch 1..2) and a 0-d `gag_scale`."""
    batch = "batch" if dynamic else 1
    return {
        "role": "denoiser",
        "path": path,
        "external_data": None,
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "size_bytes": len(data) if data is not None else None,
        "inputs": [
            {"name": "sample", "dtype": dtype, "shape": [batch, 16, 4]},
            {"name": "gag_scale", "dtype": "float32", "shape": []},
        ],
        "outputs": [{"name": "latent", "dtype": dtype, "shape": [batch, 16, 4]}],
        "profile": {
            "sample": {"min": [1, 16, 4], "opt": [1, 16, 4], "max": [2 if dynamic else 1, 16, 4]},
            "gag_scale": {"min": [], "opt": [], "max": []},
        },
        "tolerance": {"atol": 1e-4, "rtol": 1e-4},
    }


def write_graphs(root: Path, *, dtype: str = "fp16", dynamic: bool = True, data: bytes = b"stand-in onnx bytes",
                 rewritten: list[str] | None = None) -> Path:
    """A graphs folder with one component whose 'ONNX' is `data` (the engine layer only hashes it)."""
    graphs = root / "graphs" / "tiny-test"
    (graphs / "unet").mkdir(parents=True, exist_ok=True)
    (graphs / "unet" / "model.onnx").write_bytes(data)
    manifest = {
        "format_version": 1,
        "model": "tiny-test",
        "family": "sdxl",
        "dtype": dtype,
        "dynamic": dynamic,
        "opset": 20,
        "shape": {"batch": 1, "height": 64, "width": 64},
        "gag": {"enabled": True, "scale": 10.0, "eta": 15.0, "zeta": 0.0, "alpha": 1.5, "method": "bisect",
                "layers": "down,up", "rewritten": rewritten or []},
        "components": {"unet": component_entry("unet/model.onnx", data, dynamic=dynamic)},
        "versions": {"gag_export": "0.1.0"},
    }
    (graphs / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return graphs


class FakePlanBuilder:
    """A `PlanBuilder` that writes a deterministic stand-in plan and counts its builds."""

    def __init__(self):
        self.builds = 0

    def __call__(self, spec, dest: Path, timing_cache: Path) -> list[dict]:
        self.builds += 1
        dest.write_bytes(b"PLAN" + spec.onnx_sha256.encode() + spec.settings_hash().encode() * 100)
        return [{"name": r.name, "mode": "input", "dtype": "float32", "shape": list(r.opt)} for r in spec.profile.inputs]


def build_fake(graphs: Path, out: Path, builder: FakePlanBuilder, target=H100, caps=TRT10, **options):
    return eng.build_engines(graphs, out, EngineOptions(**options), target, builder, caps)


# --------------------------------------------------------------------------------------------
# TensorRT capabilities and precision
# --------------------------------------------------------------------------------------------


def test_capabilities_by_major_version():
    assert (TRT10.major, TRT10.weak_typing) == (10, True)
    assert (TRT11.major, TRT11.weak_typing) == (11, False)
    with pytest.raises(MissingDependencyError, match="8.6.1 is too old"):
        TensorRTCapabilities.from_version("8.6.1")


@pytest.mark.parametrize("caps", [TRT10, TRT11], ids=["trt10", "trt11"])
def test_precision_defaults_to_the_exported_dtype(caps):
    for dtype, expected in (("fp32", Precision.FP32), ("fp16", Precision.FP16), ("bf16", Precision.BF16)):
        plan = eng.resolve_precision(dtype, None, caps, weakly_typed=False, graphs_dir=Path("graphs/m"))
        assert plan == eng.PrecisionPlan(expected, strongly_typed=True)


def test_precision_mismatch_explains_strong_typing_and_suggests_reexport():
    with pytest.raises(InvalidInputError) as info:
        eng.resolve_precision("fp32", Precision.FP16, TRT11, weakly_typed=False, graphs_dir=Path("graphs/m"))
    message = str(info.value)
    assert "graphs/m was exported as fp32" in message
    assert "strongly typed" in message
    assert "gag-export export --dtype fp16" in message
    assert "--weakly-typed" not in message  # not offered on 11.x
    with pytest.raises(InvalidInputError, match=r"--precision fp16 --weakly-typed"):
        eng.resolve_precision("fp32", Precision.FP16, TRT10, weakly_typed=False, graphs_dir=Path("graphs/m"))
    with pytest.raises(InvalidInputError, match="an fp16 graph cannot become a fp32 engine"):
        eng.resolve_precision("fp16", Precision.FP32, TRT10, weakly_typed=False, graphs_dir=Path("graphs/m"))


def test_weakly_typed_only_on_trt10_from_fp32():
    plan = eng.resolve_precision("fp32", Precision.FP16, TRT10, weakly_typed=True, graphs_dir=Path("g"))
    assert plan == eng.PrecisionPlan(Precision.FP16, strongly_typed=False)
    with pytest.raises(InvalidInputError, match=r"needs TensorRT 10\.x; TensorRT 11\.4\.0\.9 removed BuilderFlag"):
        eng.resolve_precision("fp32", Precision.FP16, TRT11, weakly_typed=True, graphs_dir=Path("g"))
    with pytest.raises(InvalidInputError, match="starts from an fp32 graph"):
        eng.resolve_precision("fp16", Precision.FP16, TRT10, weakly_typed=True, graphs_dir=Path("g"))
    with pytest.raises(InvalidInputError, match="give --precision fp16 or bf16"):
        EngineOptions(weakly_typed=True)


def test_fp8_is_refused_with_the_reason():
    with pytest.raises(InvalidInputError, match=r"fp8 is not supported yet.*ModelOpt"):
        EngineOptions(precision="fp8")


@pytest.mark.parametrize("kwargs, match", [({"opt_level": 6}, "between 0 and 5"), ({"workspace_gb": 0}, "positive")])
def test_option_validation(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        EngineOptions(**kwargs)


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------


def _manifest(dynamic: bool) -> dict:
    return {"format_version": 1, "model": "m", "dtype": "fp32", "dynamic": dynamic,
            "components": {"unet": component_entry("unet/model.onnx", dynamic=dynamic)}}


def test_profile_from_dynamic_manifest_keeps_ranges_and_scalars():
    profile = eng.derive_profile(_manifest(True), "unet", ShapeMode.MANIFEST, graphs_dir=Path("g"))
    assert profile.to_dict() == {
        "sample": {"min": [1, 16, 4], "opt": [1, 16, 4], "max": [2, 16, 4]},
        "gag_scale": {"min": [], "opt": [], "max": []},
    }
    assert not profile.is_static
    assert eng.derive_profile(_manifest(True), "unet", ShapeMode.DYNAMIC, graphs_dir=Path("g")) == profile
    polygraphy_profile = profile.to_polygraphy()
    assert list(polygraphy_profile) == ["sample", "gag_scale"]
    assert tuple(polygraphy_profile["gag_scale"]) == ((), (), ())


def test_static_collapses_to_opt():
    profile = eng.derive_profile(_manifest(True), "unet", ShapeMode.STATIC, graphs_dir=Path("g"))
    assert profile.is_static
    assert profile.to_dict()["sample"] == {"min": [1, 16, 4], "opt": [1, 16, 4], "max": [1, 16, 4]}
    assert [r.name for r in profile.inputs] == ["sample", "gag_scale"]


def test_dynamic_refuses_a_static_graph():
    with pytest.raises(InvalidInputError, match=r"exported with static shapes.*gag-export export --dynamic"):
        eng.derive_profile(_manifest(False), "unet", ShapeMode.DYNAMIC, graphs_dir=Path("g"))
    assert eng.derive_profile(_manifest(False), "unet", ShapeMode.MANIFEST, graphs_dir=Path("g")).is_static


def test_profile_filled_for_static_inputs_without_one():
    manifest = _manifest(True)
    del manifest["components"]["unet"]["profile"]["gag_scale"]
    profile = eng.derive_profile(manifest, "unet", ShapeMode.MANIFEST, graphs_dir=Path("g"))
    assert profile.to_dict()["gag_scale"] == {"min": [], "opt": [], "max": []}


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.pop("sample"), "no min/opt/max for dynamic input 'sample'"),
        (lambda p: p["sample"].update(min=[2, 16, 4]), "min <= opt <= max"),
        (lambda p: p["sample"].update(max=[2, 16]), "has rank 2"),
        (lambda p: p["sample"].update(max=[2, 32, 4]), "axis 1 is static"),
    ],
)
def test_bad_profiles_are_artifact_errors(edit, match):
    manifest = _manifest(True)
    edit(manifest["components"]["unet"]["profile"])
    with pytest.raises(ArtifactError, match=match):
        eng.derive_profile(manifest, "unet", ShapeMode.MANIFEST, graphs_dir=Path("g"))


# --------------------------------------------------------------------------------------------
# cache keys, sidecars, builds and reuse (with a stand-in plan builder)
# --------------------------------------------------------------------------------------------


def test_cache_path_names_what_the_engine_was_built_from(tmp_path):
    graphs = write_graphs(tmp_path)
    builder = FakePlanBuilder()
    (record,) = build_fake(graphs, tmp_path / "engines", builder)
    sha = hashlib.sha256(b"stand-in onnx bytes").hexdigest()
    assert record.path.parent == tmp_path / "engines" / "tiny-test" / "unet"
    assert re.fullmatch(rf"{sha[:12]}-trt10\.13\.0\.35-sm90-fp16-[0-9a-f]{{10}}\.plan", record.path.name)
    assert record.status == "built" and builder.builds == 1
    # nothing half-written is left beside it
    assert sorted(p.name for p in record.path.parent.iterdir()) == sorted([record.path.name, record.path.with_suffix(".json").name])
    # and the plan has the mode open() would give it, not mkstemp's 0600
    from gag_export.core.atomic import umask

    assert record.path.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_settings_change_the_key(tmp_path):
    graphs = write_graphs(tmp_path)
    out = tmp_path / "engines"
    names = {
        build_fake(graphs, out, FakePlanBuilder(), **opts)[0].path.name
        for opts in ({}, {"shapes": "static"}, {"opt_level": 5}, {"workspace_gb": 2})
    }
    assert len(names) == 4


def test_sidecar_round_trip_and_content(tmp_path):
    graphs = write_graphs(tmp_path)
    (record,) = build_fake(graphs, tmp_path / "engines", FakePlanBuilder(), opt_level=4)
    text = record.path.with_suffix(".json").read_text()
    sidecar = eng.Sidecar.from_json(text)
    assert sidecar == record.sidecar
    assert eng.Sidecar.from_json(sidecar.to_json()) == sidecar
    data = json.loads(text)
    assert data["onnx_sha256"] == hashlib.sha256(b"stand-in onnx bytes").hexdigest()
    assert data["tensorrt_version"] == "10.13.0.35"
    assert data["gpu_name"] == "NVIDIA H100 80GB HBM3" and data["compute_capability"] == [9, 0]
    assert data["precision"] == "fp16"
    assert data["profile"]["sample"]["max"] == [2, 16, 4]
    assert data["builder_flags"]["typing"] == "strong" and data["builder_flags"]["builder_optimization_level"] == 4
    assert data["gag_export_version"] == "0.1.0"
    assert data["engine_size_bytes"] == record.path.stat().st_size
    assert data["engine_sha256"] == hashlib.sha256(record.path.read_bytes()).hexdigest()
    assert isinstance(data["build_seconds"], float) and data["built_at"]


def test_matching_engine_is_reused_not_rebuilt(tmp_path):
    graphs = write_graphs(tmp_path)
    out = tmp_path / "engines"
    builder = FakePlanBuilder()
    first = build_fake(graphs, out, builder)[0]
    second = build_fake(graphs, out, builder)[0]
    assert builder.builds == 1 and second.status == "reused" and second.path == first.path
    third = build_fake(graphs, out, builder, rebuild=True)[0]
    assert builder.builds == 2 and third.status == "built"


def test_a_truncated_cached_engine_is_rebuilt(tmp_path, caplog):
    graphs = write_graphs(tmp_path)
    out = tmp_path / "engines"
    builder = FakePlanBuilder()
    plan = build_fake(graphs, out, builder)[0].path
    plan.write_bytes(plan.read_bytes()[:10])
    record = build_fake(graphs, out, builder)[0]
    assert builder.builds == 2 and record.status == "built"
    assert "truncated" in caplog.text


def test_load_engine_bytes_returns_the_validated_plan(tmp_path):
    graphs = write_graphs(tmp_path)
    record = build_fake(graphs, tmp_path / "engines", FakePlanBuilder())[0]
    sha = record.sidecar.onnx_sha256
    assert eng.load_engine_bytes(record.path, H100, onnx_sha256=sha) == record.path.read_bytes()
    assert eng.find_engine(tmp_path / "engines", "tiny-test", "unet", H100, sha, Precision.FP16) == record.path
    assert eng.find_engine(tmp_path / "engines", "tiny-test", "unet", H100, sha, Precision.FP32) is None


def test_the_runtime_finds_the_weakly_typed_engines_of_an_fp32_graph(tmp_path):
    # an fp32 graph built with --weakly-typed --precision fp16 has an engine named fp16: the
    # runtime (and generate's "build what is missing") must take it, not look for fp32 only
    from gag_export.workflows.artifacts import missing_engines

    onnx_path = tmp_path / "m.onnx"
    attn = _onnx_with_scopes(onnx_path)
    graphs = write_graphs(tmp_path, dtype="fp32", data=onnx_path.read_bytes(), rewritten=[attn])
    out = tmp_path / "engines"
    (record,) = build_fake(graphs, out, FakePlanBuilder(), precision="fp16", weakly_typed=True)
    sha = record.sidecar.onnx_sha256
    assert "-fp16-" in record.path.name
    assert eng.find_engine(out, "tiny-test", "unet", H100, sha, Precision.FP32) is None
    assert eng.find_engine(out, "tiny-test", "unet", H100, sha) == record.path
    # with an engine of the graph's own precision beside it, that one comes first when preferred
    (fp32,) = build_fake(graphs, out, FakePlanBuilder(), precision="fp32")
    assert eng.find_engine(out, "tiny-test", "unet", H100, sha, prefer=Precision.FP32) == fp32.path
    record.path.touch()  # the weakly typed one is the newest, and is still passed over when preferring fp32
    assert eng.find_engine(out, "tiny-test", "unet", H100, sha, prefer=Precision.FP32) == fp32.path
    assert eng.find_engine(out, "tiny-test", "unet", H100, sha) == record.path
    manifest = SimpleNamespace(model="tiny-test", components={"unet": {"sha256": sha}})
    assert missing_engines(manifest, out, H100) == []
    assert missing_engines(manifest, tmp_path / "elsewhere", H100) == ["unet"]


def test_timing_caches_are_per_tensorrt_version_and_gpu_model(tmp_path):
    pcie = RuntimeTarget(H100.trt_version, "NVIDIA H100 PCIe", H100.sm)  # same sm as the SXM H100
    paths = {eng.default_timing_cache(tmp_path, t) for t in (H100, pcie, dataclasses.replace(H100, trt_version="11.4.0.9"))}
    assert len(paths) == 3
    assert eng.default_timing_cache(tmp_path, H100).name == "trt10.13.0.35-sm90-NVIDIA_H100_80GB_HBM3.cache"


@pytest.fixture
def built(tmp_path):
    graphs = write_graphs(tmp_path)
    return build_fake(graphs, tmp_path / "engines", FakePlanBuilder())[0]


def test_mismatch_tensorrt_version(built):
    other = RuntimeTarget("10.8.0.43", H100.gpu_name, H100.sm)
    with pytest.raises(ArtifactError) as info:
        eng.load_engine_bytes(built.path, other)
    assert "built with TensorRT 10.13.0.35, this machine runs TensorRT 10.8.0.43" in str(info.value)
    assert "--rebuild" in str(info.value)


def test_mismatch_gpu_sm(built):
    other = RuntimeTarget(H100.trt_version, "NVIDIA L4", (8, 9))
    with pytest.raises(ArtifactError) as info:
        eng.load_engine_bytes(built.path, other)
    assert "built for NVIDIA H100 80GB HBM3 (sm90), this GPU is NVIDIA L4 (sm89)" in str(info.value)
    assert "--rebuild" in str(info.value)


def test_mismatch_gpu_model_with_the_same_sm(built):
    other = RuntimeTarget(H100.trt_version, "NVIDIA H100 PCIe", (9, 0))
    with pytest.raises(ArtifactError, match="same sm90, different device model"):
        eng.load_engine_bytes(built.path, other)


def test_mismatch_onnx_sha(built):
    with pytest.raises(ArtifactError) as info:
        eng.load_engine_bytes(built.path, H100, onnx_sha256="f" * 64)
    assert "the graph was re-exported" in str(info.value) and "--rebuild" in str(info.value)


def test_truncated_engine(built):
    data = built.path.read_bytes()
    built.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as info:
        eng.load_engine_bytes(built.path, H100)
    assert f"is truncated: {len(data) // 2} bytes, its sidecar records {len(data)}" in str(info.value)
    assert "--rebuild" in str(info.value)


def test_corrupt_engine_same_size(built):
    data = bytearray(built.path.read_bytes())
    data[-1] ^= 0xFF
    built.path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is corrupt: sha256"):
        eng.load_engine_bytes(built.path, H100)


def test_missing_or_broken_sidecar(built):
    sidecar = built.path.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        eng.load_engine_bytes(built.path, H100)
    sidecar.unlink()
    with pytest.raises(ArtifactError, match="has no sidecar"):
        eng.load_engine_bytes(built.path, H100)


def test_onnx_changed_after_export(tmp_path):
    graphs = write_graphs(tmp_path)
    (graphs / "unet" / "model.onnx").write_bytes(b"edited by hand")
    with pytest.raises(ArtifactError, match="changed after export"):
        build_fake(graphs, tmp_path / "engines", FakePlanBuilder())


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(dtype="int3"), "dtype"),
        (lambda m: m.update(family="unet-ish"), "family"),
        (lambda m: m["shape"].update(height="abc"), "shape.height"),
        (lambda m: m["shape"].update(batch=0), "shape.batch"),
        (lambda m: m["gag"].update(scale=float("nan")), "gag"),
        (lambda m: m["gag"].pop("eta"), "gag"),
        (lambda m: m.update(components={}), "no components"),
    ],
)
def test_a_damaged_manifest_is_an_artifact_error_naming_the_field(tmp_path, edit, field):
    # read once where every command reads it: a hand-edited manifest failed deep inside commands,
    # as invalid input (exit 2), or passed `check`
    graphs = write_graphs(tmp_path)
    manifest = json.loads((graphs / "manifest.json").read_text())
    edit(manifest)
    (graphs / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(field)):
        eng.load_manifest(graphs)


def test_missing_manifest_and_unknown_component(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        build_fake(tmp_path, tmp_path / "engines", FakePlanBuilder())
    graphs = write_graphs(tmp_path)
    with pytest.raises(InvalidInputError, match="no component 'vae'.*it has unet"):
        build_fake(graphs, tmp_path / "engines", FakePlanBuilder(), components=("vae",))


# --------------------------------------------------------------------------------------------
# GAG layers for the 10.x weakly typed path
# --------------------------------------------------------------------------------------------


def _onnx_with_scopes(path: Path) -> str:
    """Nodes as dynamo names them (name scopes in metadata) and as the legacy exporter does."""
    import onnx
    from onnx import TensorProto, helper

    def node(op, inputs, output, name, scopes=None):
        n = helper.make_node(op, inputs, [output], name=name)
        if scopes is not None:
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
        return n

    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    nodes = [
        node("Relu", ["x"], "q", "node_linear", ["", attn, f"{attn}.to_q", "linear"]),  # a projection: child module
        node("Softmax", ["q"], "p", "node_softmax", ["", attn, "softmax"]),  # the attention core
        node("Mul", ["p", "s"], "m", "node_mul_3", ["", attn, "mul_3"]),
        node("Neg", ["m"], "n", "/down_blocks.1/attentions.0/transformer_blocks.0/attn2/Neg"),  # legacy exporter
        node("Identity", ["n"], "y", "/mid_block/Identity"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), str(path))
    return attn


def test_gag_nodes_are_the_attention_core_only(tmp_path):
    attn = _onnx_with_scopes(tmp_path / "m.onnx")
    names = eng.gag_node_names(tmp_path / "m.onnx", [attn])
    assert names == ("node_softmax", "node_mul_3", "/down_blocks.1/attentions.0/transformer_blocks.0/attn2/Neg")
    nodes = frozenset(names)
    assert eng.layer_from_nodes("node_mul_3", nodes) and eng.layer_from_nodes("node_softmax_1", nodes)
    assert not eng.layer_from_nodes("node_mul_30", nodes) and not eng.layer_from_nodes("node_linear", nodes)


def test_weakly_typed_spec_pins_gag_nodes(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    attn = _onnx_with_scopes(onnx_path)
    graphs = write_graphs(tmp_path, dtype="fp32", data=onnx_path.read_bytes(), rewritten=[attn])
    manifest = eng.load_manifest(graphs)
    (spec,) = eng.component_specs(graphs, manifest, EngineOptions(precision="fp16", weakly_typed=True), TRT10)
    assert not spec.precision.strongly_typed and len(spec.fp32_nodes) == 3
    assert spec.builder_flags()["precision_constraints"] == "obey"
    graphs = write_graphs(tmp_path, dtype="fp32", data=onnx_path.read_bytes(), rewritten=["up_blocks.0.attentions.0.attn1"])
    with pytest.raises(InvalidInputError, match="cannot be pinned to fp32"):
        eng.component_specs(graphs, eng.load_manifest(graphs), EngineOptions(precision="fp16", weakly_typed=True), TRT10)


def _spec(tmp_path, options: EngineOptions, caps, dtype: str = "fp16"):
    onnx_path = tmp_path / "m.onnx"
    attn = _onnx_with_scopes(onnx_path)
    graphs = write_graphs(tmp_path, dtype=dtype, data=onnx_path.read_bytes(), rewritten=[attn])
    return eng.component_specs(graphs, eng.load_manifest(graphs), options, caps)[0]


@pytest.mark.parametrize("caps, flag", [(TRT10, True), (dataclasses.replace(TRT11, strongly_typed_flag=False), False)])
def test_polygraphy_chain_strongly_typed(tmp_path, monkeypatch, caps, flag):
    """The loaders' settings (constructing Polygraphy loaders needs no tensorrt; calling them does)."""
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath

    monkeypatch.setattr(engine_plans, "import_tensorrt", lambda *flavor: SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="ws")))
    spec = _spec(tmp_path, EngineOptions(opt_level=2, workspace_gb=1.5), caps)
    builder = eng.PolygraphyPlanBuilder(caps)
    network = builder.network(spec)
    assert isinstance(network, NetworkFromOnnxPath) and network.path == str(spec.onnx_path)
    assert network.strongly_typed is flag  # 10.x: required; 11.x: always on, the flag only if the enum still has it
    config = builder.config(spec, tmp_path / "t.cache")
    assert isinstance(config, CreateConfig)
    assert (config.fp16, config.bf16, config.tf32, config.precision_constraints) == (False, False, False, None)
    assert config.builder_optimization_level == 2
    assert config.memory_pool_limits == {"ws": int(1.5 * (1 << 30))}
    assert config.timing_cache_path == str(tmp_path / "t.cache")
    assert tuple(config.profiles[0]["sample"]) == ((1, 16, 4), (1, 16, 4), (2, 16, 4))


def test_polygraphy_chain_weakly_typed_on_trt10(tmp_path, monkeypatch):
    from polygraphy.backend.trt import PostprocessNetwork

    monkeypatch.setattr(engine_plans, "import_tensorrt", lambda *flavor: SimpleNamespace())
    spec = _spec(tmp_path, EngineOptions(precision="bf16", weakly_typed=True), TRT10, dtype="fp32")
    builder = eng.PolygraphyPlanBuilder(TRT10)
    network = builder.network(spec)
    assert isinstance(network, PostprocessNetwork) and network.name == "PinGagLayersFp32"
    assert network._network.strongly_typed is False
    config = builder.config(spec, tmp_path / "t.cache")
    assert (config.fp16, config.bf16, config.precision_constraints) == (False, True, "obey")
    assert config.builder_optimization_level is None and config.memory_pool_limits is None


class _FakeLayer:
    def __init__(self, name, type_="ELEMENTWISE", dtype="f32"):
        self.name, self.type, self.num_outputs = name, type_, 1
        self._out = SimpleNamespace(dtype=dtype)
        self.precision, self.output_types = None, {}

    def get_output(self, index):
        return self._out

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


def test_fp32_pinning_step(monkeypatch):
    fake_trt = SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16", LayerType=SimpleNamespace(SHAPE="SHAPE"))
    monkeypatch.setattr(engine_plans, "import_tensorrt", lambda *flavor: fake_trt)
    layers = [_FakeLayer("node_softmax"), _FakeLayer("node_softmax_1"), _FakeLayer("node_mul_3", "SHAPE"),
              _FakeLayer("node_mul_3_2", dtype="i64"), _FakeLayer("node_linear")]
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    engine_plans._Fp32Pinning(frozenset({"node_softmax", "node_mul_3"}))(network=network)
    assert [layer.precision for layer in layers] == ["f32", "f32", None, None, None]
    assert layers[1].output_types == {0: "f32"}
    with pytest.raises(CheckFailedError, match="none could be pinned"):
        engine_plans._Fp32Pinning(frozenset({"node_other"}))(network=network)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_engine_without_tensorrt_exits_3(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, here or on a GPU box
    graphs = write_graphs(tmp_path)
    result = CliRunner().invoke(cli, ["engine", str(graphs), "--out", str(tmp_path / "engines")])
    assert result.exit_code == 3, result.output
    assert 'pip install "gag-export[tensorrt]"' in result.output
    assert "NVIDIA GPU and CUDA" in result.output
    assert "Traceback" not in result.output
    assert result.output.count("error:") == 1


def test_cli_engine_refuses_fp8_before_looking_for_tensorrt(tmp_path):
    result = CliRunner().invoke(cli, ["engine", str(write_graphs(tmp_path)), "--precision", "fp8"])
    assert result.exit_code == 2
    assert "ModelOpt" in result.output


def test_cli_engine_opt_level_range(tmp_path):
    result = CliRunner().invoke(cli, ["engine", str(write_graphs(tmp_path)), "--opt-level", "7"])
    assert result.exit_code == 2


# --------------------------------------------------------------------------------------------
# tiny real graphs (exported here; built and run where TensorRT is)
# --------------------------------------------------------------------------------------------


class TinyAttention:
    """Built lazily so collecting this file does not import torch's nn at module import."""

    @staticmethod
    def model(seed: int = 0):
        import torch

        class Core(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.to_q, self.to_k, self.to_v = (torch.nn.Linear(8, 8) for _ in range(3))

            def forward(self, x, gag_scale):
                q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
                dense = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1) @ v
                return dense + gag_scale.to(dense.dtype) * 0.01 * (dense - v)

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj_in, self.attn, self.proj_out = torch.nn.Linear(4, 8), Core(), torch.nn.Linear(8, 4)

            def forward(self, sample, gag_scale):
                return self.proj_out(self.attn(self.proj_in(sample), gag_scale))

        torch.manual_seed(seed)
        return Tiny().eval()


def export_tiny_graphs(root: Path, dtype: str) -> Path:
    """Export the tiny attention model (dynamic batch 1..2, 0-d gag_scale) and write its manifest."""
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    model = TinyAttention.model().to(torch_dtype)
    graphs = root / f"tiny-attn-{dtype}"
    (graphs / "unet").mkdir(parents=True, exist_ok=True)
    onnx_path = graphs / "unet" / "model.onnx"
    example = (torch.randn(2, 16, 4, dtype=torch_dtype), torch.tensor(10.0))
    torch.onnx.export(
        model, example, str(onnx_path), dynamo=True, opset_version=20, external_data=False,
        input_names=["sample", "gag_scale"], output_names=["latent"],
        dynamic_shapes={"sample": {0: "batch"}, "gag_scale": None},
    )
    onnx_dtype = "float32" if dtype == "fp32" else "float16"
    entry = component_entry("unet/model.onnx", onnx_path.read_bytes(), dynamic=True, dtype=onnx_dtype)
    manifest = {
        "format_version": 1, "model": f"tiny-attn-{dtype}", "family": "sdxl", "dtype": dtype, "dynamic": True,
        "opset": 20, "shape": {"batch": 1, "height": 64, "width": 64},
        "gag": {"enabled": True, "scale": 10.0, "eta": 15.0, "zeta": 0.0, "alpha": 1.5, "method": "bisect",
                "layers": "down,up", "rewritten": ["attn"]},
        "components": {"unet": entry},
    }
    (graphs / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return graphs


def feed_from_manifest(component: dict, shape: str = "opt", seed: int = 0, scalars: dict | None = None) -> dict:
    """Random inputs at the profile's `shape` for each manifest input; 0-d `gag_*` from `scalars`."""
    rng = np.random.default_rng(seed)
    scalars = {"gag_scale": 10.0, "gag_eta": 15.0, "gag_zeta": 0.0, **(scalars or {})}
    feed = {}
    for inp in component["inputs"]:
        dims = component["profile"][inp["name"]][shape] if inp["name"] in component["profile"] else inp["shape"]
        dtype = np.dtype(inp["dtype"])
        if not dims:
            feed[inp["name"]] = np.array(scalars.get(inp["name"], 1.0), dtype=dtype)
        elif dtype.kind == "f":
            feed[inp["name"]] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[inp["name"]] = rng.integers(0, 10, dims).astype(dtype)
    return feed


def run_ort(onnx_path: Path, feed: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |a - r| / max |r|: the tolerance the issue states for engines (fp32 1e-3, fp16 2e-2)."""
    reference = reference.astype(np.float64)
    return float(np.max(np.abs(actual.astype(np.float64) - reference)) / max(np.max(np.abs(reference)), 1e-12))


def test_tiny_graph_export_fits_the_engine_layer(tmp_path):
    """The helpers the TensorRT tests use, checked here: export, manifest, spec, ORT reference."""
    graphs = export_tiny_graphs(tmp_path, "fp32")
    manifest = eng.load_manifest(graphs)
    (spec,) = eng.component_specs(graphs, manifest, EngineOptions(), TRT11)
    assert spec.precision == eng.PrecisionPlan(Precision.FP32, strongly_typed=True)
    assert [r.name for r in spec.profile.inputs] == ["sample", "gag_scale"]
    (spec10,) = eng.component_specs(graphs, manifest, EngineOptions(precision="fp16", weakly_typed=True), TRT10)
    assert spec10.fp32_nodes  # the Core's own arithmetic (softmax, matmuls, the gag_scale mix)
    feed = feed_from_manifest(manifest["components"]["unet"], shape="max")
    out = run_ort(graphs / "unet" / "model.onnx", feed)["latent"]
    import torch

    with torch.no_grad():
        expected = TinyAttention.model()(torch.from_numpy(feed["sample"]), torch.tensor(10.0)).numpy()
    assert out.shape == (2, 16, 4)
    assert relative_error(out, expected) < 1e-5


# --------------------------------------------------------------------------------------------
# TensorRT (skipped here; `pytest -m tensorrt` on a GPU machine with TensorRT 10.x or 11.x)
# --------------------------------------------------------------------------------------------


class CountingBuilder:
    def __init__(self, inner):
        self.inner, self.builds = inner, 0

    def __call__(self, spec, dest, timing_cache):
        self.builds += 1
        return self.inner(spec, dest, timing_cache)


def run_engine(plan: bytes, feed: dict) -> dict:
    from polygraphy.backend.trt import TrtRunner

    engine = deserialize_engine(plan)
    with TrtRunner(engine) as runner:
        return {name: np.array(value, copy=True) for name, value in runner.infer(feed).items()}


def build_and_compare(graphs: Path, out: Path, options: EngineOptions, reference: dict[str, dict], rtol: float,
                      builder=None) -> list:
    """Build every component of `graphs`, run each engine at the profile's min/opt/max, compare with
    `reference[component]`'s ONNX (fp32 ORT), and return the records."""
    caps = eng.trt_features()
    target = RuntimeTarget.current(caps)
    builder = builder or eng.PolygraphyPlanBuilder(caps)
    records = eng.build_engines(graphs, out, options, target, builder, caps)
    manifest = eng.load_manifest(graphs)
    for record in records:
        component = manifest["components"][record.component]
        plan = eng.load_engine_bytes(record.path, target, onnx_sha256=component["sha256"])
        engine_inputs = {t["name"] for t in record.sidecar.io if t["mode"] == "input"}
        for shape in ("min", "opt", "max"):
            feed = feed_from_manifest(component, shape=shape)
            expected = run_ort(reference[record.component]["onnx"], {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feed.items()})
            actual = run_engine(plan, {k: v for k, v in feed.items() if k in engine_inputs})
            for name, ref in expected.items():
                err = relative_error(actual[name], ref)
                assert err <= rtol, f"{record.component}/{name} at {shape}: relative error {err:.2e} > {rtol}"
    return records


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return {dtype: export_tiny_graphs(root, dtype) for dtype in ("fp32", "fp16")}


@pytest.mark.parametrize("dtype, rtol", [("fp32", 1e-3), ("fp16", 2e-2)])
@pytest.mark.tensorrt
@skip_without_tensorrt
def test_tensorrt_engine_matches_onnxruntime(tiny_graphs, tmp_path, dtype, rtol):
    reference = {"unet": {"onnx": tiny_graphs["fp32"] / "unet" / "model.onnx"}}
    (record,) = build_and_compare(tiny_graphs[dtype], tmp_path / "engines", EngineOptions(), reference, rtol)
    assert record.sidecar.precision == dtype
    assert {"sample", "gag_scale"} <= {t["name"] for t in record.sidecar.io if t["mode"] == "input"}


@pytest.mark.tensorrt
@skip_without_tensorrt
def test_tensorrt_static_engine(tiny_graphs, tmp_path):
    reference = {"unet": {"onnx": tiny_graphs["fp32"] / "unet" / "model.onnx"}}
    (record,) = build_and_compare(tiny_graphs["fp32"], tmp_path / "engines", EngineOptions(shapes="static"), reference, 1e-3)
    assert record.sidecar.profile["sample"]["max"] == [1, 16, 4]


@pytest.mark.tensorrt
@skip_without_tensorrt
def test_tensorrt_cached_engine_is_reused(tiny_graphs, tmp_path):
    caps = eng.trt_features()
    builder = CountingBuilder(eng.PolygraphyPlanBuilder(caps))
    reference = {"unet": {"onnx": tiny_graphs["fp32"] / "unet" / "model.onnx"}}
    out = tmp_path / "engines"
    first = build_and_compare(tiny_graphs["fp16"], out, EngineOptions(), reference, 2e-2, builder)
    second = build_and_compare(tiny_graphs["fp16"], out, EngineOptions(), reference, 2e-2, builder)
    assert builder.builds == 1
    assert [r.status for r in first + second] == ["built", "reused"]
    assert first[0].path == second[0].path
    timing_caches = list((out / "timing").glob("*.cache"))
    assert len(timing_caches) == 1 and timing_caches[0].stat().st_size > 0


@pytest.mark.tensorrt
@skip_without_tensorrt
def test_tensorrt_weakly_typed_fp16_on_trt10(tiny_graphs, tmp_path):
    caps = eng.trt_features()
    if caps.weak_typing:
        reference = {"unet": {"onnx": tiny_graphs["fp32"] / "unet" / "model.onnx"}}
        options = EngineOptions(precision="fp16", weakly_typed=True)
        (record,) = build_and_compare(tiny_graphs["fp32"], tmp_path / "engines", options, reference, 2e-2)
        assert record.sidecar.builder_flags["typing"] == "weak"
    else:
        with pytest.raises(InvalidInputError, match="needs TensorRT 10.x"):
            eng.build(tiny_graphs["fp32"], tmp_path / "engines", EngineOptions(precision="fp16", weakly_typed=True))



def test_graph_with_external_data_matches_manifest_sha(tmp_path):
    """The manifest's sha256 covers model.onnx and model.onnx.data (export.graph_sha256)."""
    from gag_export.artifacts.manifest import graph_sha256

    graphs = write_graphs(tmp_path, dtype="fp32")
    onnx_path, data = graphs / "unet" / "model.onnx", graphs / "unet" / "model.onnx.data"
    data.write_bytes(b"weights" * 100)
    manifest = json.loads((graphs / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    unet["external_data"] = {"path": "unet/model.onnx.data", "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                             "size_bytes": 700}
    unet["sha256"], unet["size_bytes"] = graph_sha256(onnx_path), onnx_path.stat().st_size + 700
    (graphs / "manifest.json").write_text(json.dumps(manifest))
    (spec,) = eng.component_specs(graphs, eng.load_manifest(graphs), EngineOptions(), TRT10)
    assert spec.onnx_sha256 == unet["sha256"]
    data.write_bytes(b"others!" * 100)  # the same size: only the hash tells
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        eng.component_specs(graphs, eng.load_manifest(graphs), EngineOptions(), TRT10)


def test_gag_nodes_found_under_the_export_wrapper_prefix(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    """Dynamo scopes carry the wrapper's attribute (`model.down_blocks...`); names are relative."""
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    node = helper.make_node("Softmax", ["x"], ["y"], name="node_softmax")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", f"model.{attn}", "softmax"]))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert eng.gag_node_names(tmp_path / "m.onnx", [attn]) == ("node_softmax",)
    assert eng.gag_node_names(tmp_path / "m.onnx", ["up_blocks.0.attentions.0.transformer_blocks.0.attn2"]) == ()


# --------------------------------------------------------------------------------------------
# TensorRT-RTX: the real parser and ahead-of-time builder, here on the CPU (no GPU needed)
# --------------------------------------------------------------------------------------------

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason='tensorrt_rtx is not installed: `pip install "gag-export[tensorrt-rtx]"` (x86-64 Linux and Windows wheels)',
)
RTX_4090 = ("NVIDIA GeForce RTX 4090", (8, 9))


def rtx_runtime_target(version: str, gpu=RTX_4090) -> RuntimeTarget:
    """The target a TensorRT-RTX engine meets on an RTX GPU at run time."""
    return RuntimeTarget(version, gpu[0], gpu[1], flavor="tensorrt-rtx")


@needs_rtx
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_tensorrt_rtx_builds_and_parses_every_tiny_component(tmp_path_factory, model, dtype, shapes):
    """Every component of every tiny model, static and dynamic, fp32 and fp16: the real parser
    accepts it (`check`) and the real builder makes a plan for RTX GPUs, here without a GPU."""
    from export_helpers import exported, matrix_export, shared_root

    from gag_export.check import check_graphs

    manifest = exported(matrix_export(model, dtype, shapes), shared_root(tmp_path_factory))
    report = check_graphs(manifest.graphs_dir, parity=False, parser="tensorrt-rtx")
    assert report, report.summary()
    for name in manifest.components:
        parsed = report.get(name, "trt_parser")
        assert parsed.passed and parsed.details.startswith("TensorRT-RTX 1.") and "network layers" in parsed.details

    out = tmp_path_factory.mktemp("rtx-engines")
    records = eng.build(manifest.graphs_dir, out, EngineOptions(backend="tensorrt-rtx", targets="sm86,sm89"))
    assert [r.component for r in records] == list(manifest.components) and {r.status for r in records} == {"built"}
    for r in records:
        side, entry = r.sidecar, manifest.components[r.component]
        assert (side.flavor, side.targets, side.gpu_name) == ("tensorrt-rtx", ((8, 6), (8, 9)), "")
        assert re.fullmatch(rf"{entry['sha256'][:12]}-rtx1\.[0-9.]+-sm86_89-{dtype}-[0-9a-f]{{10}}\.plan", r.path.name)
        assert side.engine_size_bytes == r.path.stat().st_size > 0
        # the network's inputs are the manifest's, in its types (fp16 stays fp16, gag_* float32)
        io = {t["name"]: t for t in side.io if t["mode"] == "input"}
        for spec in entry["inputs"]:
            assert io[spec["name"]]["dtype"] == {"float32": "float", "float16": "half", "int64": "int64"}[spec["dtype"]]
        dims = {tuple(v["min"]) != tuple(v["max"]) for v in side.profile.values()}
        assert (True in dims) == (shapes == "dynamic")


@needs_rtx
def test_tensorrt_rtx_engine_found_and_validated_for_a_gpu_among_its_targets(tmp_path):
    graphs = export_tiny_graphs(tmp_path, "fp32")
    out = tmp_path / "engines"
    (record,) = eng.build(graphs, out, EngineOptions(backend="tensorrt-rtx", targets="sm89,sm86"))
    version = record.sidecar.tensorrt_version
    sha = record.sidecar.onnx_sha256
    ada = rtx_runtime_target(version)
    assert eng.find_engine(out, "tiny-attn-fp32", "unet", ada, sha) == record.path
    assert eng.load_engine_bytes(record.path, ada, onnx_sha256=sha) == record.path.read_bytes()
    blackwell = rtx_runtime_target(version, ("NVIDIA GeForce RTX 5090", (12, 0)))
    assert eng.find_engine(out, "tiny-attn-fp32", "unet", blackwell, sha) is None
    with pytest.raises(ArtifactError, match=r"built for sm86_89, not for NVIDIA GeForce RTX 5090 \(sm120\)"):
        eng.load_engine_bytes(record.path, blackwell)
    trt_on_ada = RuntimeTarget("10.13.0.35", RTX_4090[0], RTX_4090[1])  # TensorRT, same GPU: not its engine
    assert eng.find_engine(out, "tiny-attn-fp32", "unet", trt_on_ada, sha) is None
    with pytest.raises(ArtifactError, match=r"built with TensorRT-RTX 1\..*this machine runs TensorRT 10\.13.*--backend tensorrt-rtx"):
        eng.load_engine_bytes(record.path, trt_on_ada)
    # the same request reuses the plan; other targets make another
    (again,) = eng.build(graphs, out, EngineOptions(backend="tensorrt-rtx", targets="sm86,sm89"))
    assert again.status == "reused" and again.path == record.path
    (other,) = eng.build(graphs, out, EngineOptions(backend="tensorrt-rtx", targets="sm120"))
    assert other.status == "built" and "-sm120-" in other.path.name
    assert eng.find_engine(out, "tiny-attn-fp32", "unet", blackwell, sha) == other.path


@needs_rtx
def test_tensorrt_rtx_engine_runs_nothing_without_a_gpu_but_its_sidecar_round_trips(tmp_path):
    graphs = export_tiny_graphs(tmp_path, "fp16")
    (record,) = eng.build(graphs, tmp_path / "e", EngineOptions(backend="tensorrt-rtx", targets="sm89"))
    assert eng.read_sidecar(record.path) == record.sidecar
    assert runtime_cache_path(record.path).name == record.path.name.replace(".plan", ".runtime-cache")
    if detect_gpu() is None:
        with pytest.raises(MissingDependencyError, match="no NVIDIA GPU is visible.*RTX GPU"):
            RuntimeTarget.current(eng.trt_features("tensorrt-rtx"))


@pytest.mark.parametrize("options, match", [
    ({"backend": "tensorrt", "targets": "sm89"}, "--target is for TensorRT-RTX"),
    ({"backend": "tensorrt-rtx", "timing_cache": Path("t.cache")}, "times no tactics"),
    ({"backend": "onnxruntime"}, "unknown TensorRT backend"),
])
def test_engine_options_per_backend(options, match):
    with pytest.raises(InvalidInputError, match=match):
        EngineOptions(**options)


@needs_rtx
def test_cli_engine_tensorrt_rtx_on_a_machine_without_a_gpu(tmp_path):
    graphs = export_tiny_graphs(tmp_path, "fp32")
    out = tmp_path / "engines"
    result = CliRunner().invoke(cli, ["engine", str(graphs), "--out", str(out), "--backend", "tensorrt-rtx", "--target", "sm89"])
    assert result.exit_code == 0, result.output
    (plan,) = (out / "tiny-attn-fp32" / "unet").glob("*.plan")
    assert f"unet: {plan}" in result.output and "TensorRT-RTX 1." in result.output  # the path whole, the builder named
    result = CliRunner().invoke(cli, ["engine", str(graphs), "--out", str(out), "--backend", "tensorrt-rtx", "--target", "sm90"])
    assert result.exit_code == 2 and "Hopper" in result.output and "Traceback" not in result.output


@needs_rtx
def test_fp16_graph_keeps_gag_in_fp32_in_the_parsed_tensorrt_network(tmp_path_factory):
    """Strongly typed: the TensorRT network has the ONNX graph's types, so an fp16 export's GAG
    attention arithmetic is fp32 layers inside TensorRT too, and the convolutions around it fp16."""
    from export_helpers import exported, matrix_export, shared_root

    manifest = exported(matrix_export("tiny-sdxl", "fp16", "static"), shared_root(tmp_path_factory))
    onnx_path = manifest.graph_path("unet")
    gag_nodes = frozenset(eng.gag_node_names(onnx_path, manifest.data["gag"]["rewritten"]))
    parsed = parse_onnx(onnx_path, "tensorrt-rtx")
    assert parsed.ok
    trt = import_tensorrt("tensorrt-rtx")
    network = parsed.network
    # arithmetic rounds; moving data (shuffles for the heads, the casts in and out) does not
    arithmetic = {trt.LayerType.ELEMENTWISE, trt.LayerType.REDUCE, trt.LayerType.ACTIVATION, trt.LayerType.UNARY,
                  trt.LayerType.SOFTMAX, trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.SELECT}
    gag_types, moved, conv_types = [], set(), set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j).dtype for j in range(layer.num_outputs)]
        floats = [t for t in outputs if t in (trt.float32, trt.float16, trt.bfloat16)]
        if eng.layer_from_nodes(layer.name, gag_nodes):
            if layer.type in arithmetic:
                gag_types += floats
            elif floats and trt.float16 in floats:
                moved.add(layer.type)
        elif layer.type == trt.LayerType.CONVOLUTION:
            conv_types.update(floats)
    assert len(gag_types) > 100 and set(gag_types) == {trt.float32}
    assert moved <= {trt.LayerType.SHUFFLE, trt.LayerType.CAST, trt.LayerType.SLICE, trt.LayerType.CONCATENATION}
    assert conv_types == {trt.float16}


@needs_rtx
def test_generate_on_tensorrt_rtx_without_an_rtx_gpu_is_exit_3_in_one_line(tmp_path):
    if detect_gpu() is not None:
        pytest.skip("a GPU is visible here: the refusal is for machines without an RTX GPU")
    result = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", "a fox", "--backend", "tensorrt-rtx",
                                      "--graphs", str(tmp_path / "graphs"), "--engines", str(tmp_path / "engines")])
    assert result.exit_code == 3, result.output
    assert "RTX GPU (Ampere or newer" in result.output and "Traceback" not in result.output
    assert result.output.count("error:") == 1 and not (tmp_path / "graphs").exists()  # refused before exporting
