"""core/tensorrt.py: TensorRT and TensorRT-RTX told apart in one place: names, targets, versions, Polygraphy's binding."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from gag_export.core.errors import InvalidInputError, MissingDependencyError
from gag_export.core.tensorrt import (
    TENSORRT,
    TENSORRT_RTX,
    get_flavor,
    installed_flavor,
    parse_sm_tag,
    parse_targets,
    sm_tag,
)

# what TensorRT-RTX 1.7's enum offers, as a stand-in module
RTX_MODULE = SimpleNamespace(ComputeCapability=SimpleNamespace(
    CURRENT=0, SM75=1, SM80=2, SM86=3, SM89=4, SM120=5, SM121=6))


def test_flavors_by_name():
    assert get_flavor("tensorrt") is TENSORRT and get_flavor(" TensorRT-RTX ") is TENSORRT_RTX
    assert get_flavor(TENSORRT_RTX) is TENSORRT_RTX
    with pytest.raises(InvalidInputError, match="use one of tensorrt, tensorrt-rtx"):
        get_flavor("trt-llm")


def test_what_differs_is_data():
    assert (TENSORRT.module, TENSORRT.file_tag, TENSORRT.ahead_of_time) == ("tensorrt", "trt", False)
    assert (TENSORRT_RTX.module, TENSORRT_RTX.file_tag, TENSORRT_RTX.ahead_of_time) == ("tensorrt_rtx", "rtx", True)
    assert TENSORRT_RTX.runtime_cache and not TENSORRT.runtime_cache


@pytest.mark.parametrize("flavor, version, ok", [
    (TENSORRT, "10.13.0.35", True), (TENSORRT, "11.4.0.9", True), (TENSORRT, "8.6.1", False), (TENSORRT, "12.0", False),
    (TENSORRT_RTX, "1.7.1.116", True), (TENSORRT_RTX, "2.0.0", False),
])
def test_versions(flavor, version, ok):
    if ok:
        assert flavor.check_version(version)[0] == int(version.split(".")[0])
    else:
        with pytest.raises(MissingDependencyError, match=flavor.label):
            flavor.check_version(version)


def test_targets_come_from_the_module_and_default_to_ampere_and_newer():
    assert TENSORRT_RTX.compute_capabilities(RTX_MODULE) == ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
    assert TENSORRT_RTX.default_targets(RTX_MODULE) == ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))  # sm75 is opt-in
    assert TENSORRT.compute_capabilities(RTX_MODULE) == ()
    assert parse_targets(None, TENSORRT_RTX, RTX_MODULE) == TENSORRT_RTX.default_targets(RTX_MODULE)
    assert parse_targets("sm89, SM86,8.9,sm_120", TENSORRT_RTX, RTX_MODULE) == ((8, 6), (8, 9), (12, 0))
    assert parse_targets("sm75", TENSORRT_RTX, RTX_MODULE) == ((7, 5),)


@pytest.mark.parametrize("text, match", [
    ("sm90", "Hopper"), ("sm100", "cannot build for sm100"), ("ampere", "not a compute capability"),
])
def test_targets_it_cannot_build_are_refused(text, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_targets(text, TENSORRT_RTX, RTX_MODULE)


def test_targets_are_for_tensorrt_rtx_only():
    with pytest.raises(InvalidInputError, match="for TensorRT-RTX"):
        parse_targets("sm89", TENSORRT, RTX_MODULE)


def test_sm_tags_round_trip():
    assert sm_tag(((8, 9),)) == "sm89" and sm_tag(((8, 0), (12, 1))) == "sm80_121"
    assert parse_sm_tag("sm80_86_120") == ((8, 0), (8, 6), (12, 0)) and parse_sm_tag("sm89") == ((8, 9),)
    assert parse_sm_tag("fp16") == () and parse_sm_tag("sm8") == ()


def test_a_missing_builder_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"gag-export\[tensorrt\]"):
        TENSORRT.import_module()
    assert not TENSORRT.is_installed()


def test_installed_flavor_prefers_tensorrt(monkeypatch):
    monkeypatch.setattr(type(TENSORRT), "is_installed", lambda self: self is TENSORRT_RTX)
    assert installed_flavor() is TENSORRT_RTX
    monkeypatch.setattr(type(TENSORRT), "is_installed", lambda self: True)
    assert installed_flavor() is TENSORRT
    monkeypatch.setattr(type(TENSORRT), "is_installed", lambda self: False)
    assert installed_flavor() is None


def test_polygraphy_follows_the_flavor_even_after_its_modules_were_bound():
    from polygraphy import config
    from gag_export.engine.plans import use_in_polygraphy
    from polygraphy.backend.trt import loader  # binds `trt` for whatever flavor was set when first imported

    try:
        use_in_polygraphy(TENSORRT)
        assert config.USE_TENSORRT_RTX is False
        if TENSORRT.is_installed():
            assert not loader.trt.__version__.startswith("1.")
        else:
            with pytest.raises(Exception):  # polygraphy's lazy `tensorrt`, which does not import here
                loader.trt.Builder  # noqa: B018
        use_in_polygraphy(TENSORRT_RTX)
        assert config.USE_TENSORRT_RTX is True
        pytest.importorskip("tensorrt_rtx")
        assert loader.trt.__version__.startswith("1.")  # rebound to tensorrt_rtx
    finally:
        use_in_polygraphy(TENSORRT_RTX) if TENSORRT_RTX.is_installed() else use_in_polygraphy(TENSORRT)
