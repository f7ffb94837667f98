"""gag-export calibrate: the observer, the streaming statistics, the rule, the JSON, plots, the CLI.

Tiny models, 2 prompts x 1-2 steps, one thread: each calibration is a few seconds.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import flux_inputs, tiny_flux_transformer, tiny_sdxl_unet, unet_inputs
from runtime_helpers import torch_threads

from gag_export.cli import cli
from gag_export.core.errors import ArtifactError, InvalidInputError
from gag_export.gag import GAGConfig, apply_gag, guidance_params
from gag_export.gag.math import dense_and_sparse, gag_combine, scores, update_norms
from gag_export.workflows import calibrate
from gag_export.workflows.calibrate.stats import RESOLUTION, NormStats, bin_index, histogram_quantile

MODELS = ("tiny-sdxl", "tiny-flux")
PROMPTS = ("a red fox in the snow", "a bowl of ramen, close-up")


def _calibrate(model: str, steps: int, **kwargs) -> calibrate.Calibration:
    with torch_threads(1):
        return calibrate.run_calibration(calibrate.CalibrationConfig(model, prompts=PROMPTS, steps=steps, **kwargs))


@pytest.fixture(scope="module", params=MODELS)
def two_steps(request):
    cal = _calibrate(request.param, steps=2)
    return cal, calibrate.calibration_document(cal)


# ------------------------------------------------------------------------------ the observer and the math


def test_update_norms_is_the_norm_the_cap_sees():
    """Rows whose update_norms exceed eta are exactly the rows the cap changes."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) * 2 for _ in range(3))
    norms = update_norms(q, k, v, 0.5, 1.5, "sort")
    ordered = norms.flatten().sort().values
    eta = float(ordered[15] + ordered[16]) / 2  # between two norms: no row sits at the cap
    dense, sparse = dense_and_sparse(scores(q, k, None), v, 1.5, "sort")
    capped = gag_combine(dense, sparse, 10.0, eta, 0.5)
    uncapped = gag_combine(dense, sparse, 10.0, math.inf, 0.5)
    changed = (capped - uncapped).abs().amax(dim=-1) > 1e-6
    assert torch.equal(changed, norms > eta)
    assert int(changed.sum()) == changed.numel() - 16


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_observer_changes_no_output_and_sees_every_layer(family):
    model = tiny_sdxl_unet() if family == "sdxl" else tiny_flux_transformer()
    inputs = unet_inputs() if family == "sdxl" else flux_inputs(text_len=7)
    names = apply_gag(model, GAGConfig(method="bisect"))
    with torch.no_grad():
        plain = model(**inputs).sample
        seen = []
        with guidance_params(model).observe(lambda attn, norms: seen.append((attn, norms.shape))):
            observed = model(**inputs).sample
        after = model(**inputs).sample
    assert torch.equal(plain, observed) and torch.equal(plain, after)
    modules = dict(model.named_modules())
    assert sorted(id(a) for a, _ in seen) == sorted(id(modules[n]) for n in names)
    assert guidance_params(model).observer is None
    if family == "flux":  # image queries x text keys only: [B, H, image tokens]
        assert {shape for _, shape in seen} == {(1, 2, 16)}


# ------------------------------------------------------------------------------ statistics


def test_histogram_quantiles_and_shares_hold_to_one_bin():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0, 3, 20000))  # norms spanning orders of magnitude
    stats = NormStats(1, 1, (0.1, 1.0, 10.0))
    for chunk in np.array_split(values, 7):
        stats.add(0, 0, chunk)
    assert stats.count[0, 0] == values.size and stats.maximum[0, 0] == values.max()
    assert stats.total[0, 0] == pytest.approx(values.sum())
    assert list(stats.above[0, 0]) == [int((values > g).sum()) for g in (0.1, 1.0, 10.0)]
    for q in (0.5, 0.9, 0.99):
        estimate = histogram_quantile(stats.hist[0, 0], q, float(values.max()))
        assert abs(estimate / np.quantile(values, q) - 1) <= RESOLUTION
        # the share above the estimate misses q by at most the tokens in its bin
        in_bin = int((bin_index(values) == bin_index(np.array([estimate]))[0]).sum())
        assert abs((values > estimate).mean() - (1 - q)) <= (in_bin + 1) / values.size


def test_non_finite_norms_are_counted_apart():
    stats = NormStats(1, 1, (1.0,))
    stats.add(0, 0, np.array([0.5, np.nan, 2.0, np.inf]))
    assert (stats.count[0, 0], stats.nonfinite, stats.maximum[0, 0]) == (2, 2, 2.0)


# ------------------------------------------------------------------------------ the run


def test_every_rewritten_layer_and_step_has_statistics(two_steps):
    cal, data = two_steps
    expected = apply_gag(tiny_sdxl_unet() if cal.family == "sdxl" else tiny_flux_transformer(), cal.config.gag)
    assert cal.layer_names == expected == data["recommended"]["layer_names"]
    assert calibrate.check_calibration(json.loads(json.dumps(data))) == data
    assert data["steps"] == 2 and data["prompts"] == 2
    for layer in data["layers"]:
        assert [s["step"] for s in layer["steps"]] == [0, 1]
        counts = {s["count"] for s in layer["steps"]}
        assert len(counts) == 1 and counts.pop() > 0  # same tokens each step
        for s in layer["steps"]:
            q = s["quantiles"]
            assert 0 < q["0.5"] <= q["0.9"] <= q["0.99"] <= s["max"] and s["mean"] <= s["max"]
            assert s["clipped_share"] == sorted(s["clipped_share"], reverse=True)


def _execution_first_layer(model: str, names: list[str]) -> int:
    module = tiny_sdxl_unet() if model == "tiny-sdxl" else tiny_flux_transformer()
    apply_gag(module, GAGConfig(method="bisect"))
    order = []
    with torch.no_grad(), guidance_params(module).observe(lambda attn, norms: order.append(attn)):
        module(**(unet_inputs() if model == "tiny-sdxl" else flux_inputs()))
    first = {id(m): n for n, m in module.named_modules()}[id(order[0])]
    return names.index(first)


@pytest.mark.parametrize("model", MODELS)
def test_the_recommended_eta_clips_the_stated_share_when_applied(model):
    """Run with the recommended eta of the layer that runs first (its norms depend on no other cap,
    with one step): the share of its tokens over the cap is the clip share, to one histogram bin."""
    cal = _calibrate(model, steps=1, clip_share=0.2)
    layer = _execution_first_layer(model, cal.layer_names)
    eta = calibrate.calibration_document(cal)["layers"][layer]["recommended_eta"]
    rerun = _calibrate(model, steps=1, gag=GAGConfig(method="bisect", eta=eta), eta_grid=(eta,))
    count = int(rerun.stats.count[layer, 0])
    share = rerun.stats.above[layer, 0, 0] / count
    in_bin = int(cal.stats.hist[layer, 0, bin_index(np.array([eta]))[0]])
    assert abs(share - 0.2) <= (in_bin + 1) / count, (share, in_bin, count)


def test_per_step_values_appear_only_beyond_the_tolerance(two_steps):
    cal, data = two_steps
    for i, layer in enumerate(data["layers"]):
        per_step = [cal.stats.quantile(i, s, 0.9) for s in range(2)]
        differs = any(abs(e / layer["recommended_eta"] - 1) > 0.25 for e in per_step)
        assert (layer["recommended_eta_per_step"] is not None) == differs


def test_outputs_are_written_and_read_back(two_steps, tmp_path):
    cal, _ = two_steps
    data = calibrate.write_calibration(cal, tmp_path / "cal.json")
    assert calibrate.read_calibration(tmp_path / "cal.json") == data
    from PIL import Image

    for path in calibrate.write_plots(cal, data, tmp_path / "cal.json"):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    broken = {**data, "layers": data["layers"][1:]}
    with pytest.raises(ArtifactError, match="layers\\[0\\]"):
        calibrate.check_calibration(broken)


def test_bad_settings_fail_before_any_model_loads():
    for kwargs in ({"clip_share": 1.0}, {"step_tolerance": 0.01}, {"eta_grid": (1.0, -2.0)}, {"prompts": ("a\x00b",)}):
        with pytest.raises(InvalidInputError):
            calibrate.CalibrationConfig("tiny-sdxl", **kwargs)
    with pytest.raises(InvalidInputError, match="steps"):
        calibrate.run_calibration(calibrate.CalibrationConfig("tiny-sdxl", steps=99))
    assert len(calibrate.default_prompts()) == 24


# ------------------------------------------------------------------------------ the command


def test_calibrate_command(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red fox\n\na blue car\n")
    out = tmp_path / "out" / "cal.json"
    with torch_threads(1):
        result = CliRunner().invoke(cli, ["calibrate", "--model", "tiny-sdxl", "--prompts", str(prompts), "--steps", "1",
                                          "--out", str(out), "--no-plot", "--clip-share", "0.05"])
    assert result.exit_code == 0, result.output
    data = calibrate.read_calibration(out)
    assert (data["prompts"], data["rule"]["clip_share"]) == (2, 0.05)
    assert not list(out.parent.glob("*.png"))
    bad = CliRunner().invoke(cli, ["calibrate", "--model", "tiny-sdxl", "--clip-share", "2", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        "error: --clip-share: must be in (0, 1), got 2.0"]
    assert not (tmp_path / "x.json").exists()


def test_calibrate_apply_records_the_per_layer_eta(tmp_path, tmp_path_factory):
    manifest_module = pytest.importorskip("gag_export.artifacts.manifest")
    if not hasattr(manifest_module, "apply_gag_defaults"):
        pytest.skip("apply_gag_defaults (issue 24 item 2, per-layer guidance) is not in this tree yet")
    from export_helpers import exported, shared_root

    with torch_threads(1):
        manifest = exported("sdxl", shared_root(tmp_path_factory))
    graphs = tmp_path / "tiny-sdxl"
    shutil.copytree(manifest.graphs_dir, graphs)  # --apply rewrites the manifest: not the session's shared one
    out = tmp_path / "cal.json"
    with torch_threads(1):
        result = CliRunner().invoke(cli, ["calibrate", "--model", "tiny-sdxl", "--steps", "1", "--no-plot",
                                          "--prompts", str(_write(tmp_path / "p.txt", "a red fox\n")),
                                          "--out", str(out), "--apply", str(graphs)])
    assert result.exit_code == 0, result.output
    written = json.loads((graphs / "manifest.json").read_text())["gag"]["defaults"]
    assert written["eta"] == calibrate.read_calibration(out)["recommended"]["eta"]
    assert str(out) in written["source"]


def _write(path, text):
    path.write_text(text)
    return path
