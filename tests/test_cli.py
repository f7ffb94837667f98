"""The `gag-export` CLI through click's CliRunner: help texts, the models table, and every documented
exit code with a real trigger (README "Exit codes", gag_export.core.errors.EXIT_CODES)."""

from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from export_helpers import sha256_of
from build_helpers import MODEL, add_float64_cast, built_tiny_sdxl, graphs_copy, rewrite_component
from gag_export.export import convert as export
from gag_export.cli import cli
from gag_export.core.errors import EXIT_CODES
from gag_export.artifacts.manifest import Manifest
from gag_export.models import list_entries

COMMANDS = ("build", "export", "check", "engine", "generate", "doctor", "models")


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


needs_no_tensorrt = pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is importable here")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return built_tiny_sdxl(tmp_path_factory)


# --------------------------------------------------------------------------- help and tables


def test_main_help_lists_commands_examples_and_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in result.output, command
    assert "gag-export build --model tiny-sdxl" in result.output
    for code, text in EXIT_CODES.items():
        assert f"{code}  {text}" in result.output


@pytest.mark.parametrize("command", [c for c in cli.commands])
def test_every_command_help_has_a_description_and_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    description = result.output.split("\n\n")[1].strip()
    assert description and not description.startswith("Options"), result.output
    text = re.sub(r"-\s+", "-", re.sub(r"\s+", " ", result.output))  # undo click's line wrapping
    assert f"gag-export {command} " in text, f"{command} --help has no example"


def test_version_and_global_flags():
    assert invoke("--version").output.startswith("gag-export, version ")
    assert invoke("-q", "models", "--json").exit_code == 0
    assert invoke("--verbose", "models", "--json").exit_code == 0


def test_models_table_lists_every_entry_with_its_schedule_and_local_weights(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    result = invoke("models")
    assert result.exit_code == 0
    for column in ("model", "family", "size", "steps", "scheduler", "weights", "local"):
        assert column in result.output
    rows = json.loads(invoke("models", "--json").output)
    assert [r["name"] for r in rows] == [e.name for e in list_entries()]
    by_name = {r["name"]: r for r in rows}
    assert by_name["dmd2"]["steps"] == 4 and by_name["dmd2"]["cfg_scale"] is None
    assert by_name["sdxl"]["cfg_scale"] == 5.0 and by_name["sdxl-turbo"]["height"] == 512
    assert by_name["tiny-sdxl"]["weights_present"] is None and by_name["dmd2"]["weights_present"] is False
    assert "tianweiy/DMD2" in by_name["dmd2"]["source"]


def test_models_piped_prints_one_plain_line_per_model_with_its_whole_name(tmp_path, monkeypatch):
    # CliRunner's stdout is not a terminal, as in `gag-export models | grep turbo`
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    lines = invoke("models").output.splitlines()
    assert lines[0].split() == ["model", "family", "size", "steps", "scheduler", "weights", "local"]
    assert [line.split()[0] for line in lines[1:]] == [e.name for e in list_entries()]
    assert not any(ch in invoke("models").output for ch in "│┃…")
    turbo = [line for line in lines if "turbo" in line]
    assert len(turbo) == 1 and turbo[0].startswith("sdxl-turbo ") and "stabilityai/sdxl-turbo" in turbo[0]


@pytest.mark.parametrize("width", [40, 60, 80, 100, 200])
def test_models_table_never_cuts_a_name_whatever_the_terminal_width(width):
    import io

    from rich.console import Console

    from gag_export.cli.run_commands import models_table

    rows = [(e.name, e.family, f"{e.width}x{e.height}", "4 (1-4)", e.scheduler.class_name, e.source.describe(), "no")
            for e in list_entries()]
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, color_system=None).print(models_table(rows, width))
    cells = {cell.strip() for line in out.getvalue().splitlines() for cell in line.split("│")}
    assert {e.name for e in list_entries()} <= cells, out.getvalue()
    assert ("left out" in out.getvalue()) == (width <= 100)  # the full table needs about 125 columns


# --------------------------------------------------------------------------- exit 2: invalid input


@pytest.mark.parametrize("args, message", [
    (["build", "--model", MODEL, "--height", "abc"], "is not a valid integer"),
    (["build", "--model", MODEL, "--heigth", "64"], "No such option"),
    (["build"], "Missing option '--model'"),
    (["build", "--model", MODEL, "--dtype", "fp64"], "Invalid value for '--dtype'"),
    (["frobnicate"], "No such command"),
])
def test_click_usage_errors_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("args, message", [
    (["build", "--model", "dmd3"], "unknown model 'dmd3'; known models: dmd2, dmd2-1step"),
    (["export", "--model", "dmd3"], "known models:"),
    (["build", "--model", MODEL, "--gag-scale", "nan"], "scale: must be in [-1, 100]"),
    (["build", "--model", MODEL, "--gag-eta", "-1"], "eta: must be > 0"),
    (["build", "--model", MODEL, "--gag-eta", "nan"], "eta: must be > 0"),
    (["build", "--model", MODEL, "--gag-zeta", "-0.5"], "zeta: must be in [0, 10]"),
    (["export", "--model", MODEL, "--gag-zeta", "-0.5"], "zeta: must be in [0, 10]"),
    (["build", "--model", MODEL, "--height", "72"], "not a multiple of 16"),
    (["build", "--model", MODEL, "--no-gag", "--gag-scale", "3"], "--no-gag cannot be combined"),
])
def test_invalid_values_exit_2_before_anything_is_loaded(args, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # build first: resolving its target imports gag_export.workflows.build, which must bind the real
    # models.load_pipeline (imported after the models patch, it would keep the fake for good)
    monkeypatch.setattr("gag_export.workflows.build.load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    monkeypatch.setattr("gag_export.models.load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("args, option", [
    (["export", "--model", MODEL, "--height", "0"], "--height"),
    (["export", "--model", MODEL, "--width", "0"], "--width"),
    (["export", "--model", MODEL, "--batch", "0"], "--batch"),
    (["export", "--model", MODEL, "--dynamic", "--min-batch", "0"], "--min-batch"),
    (["export", "--model", MODEL, "--dynamic", "--min-height", "0"], "--min-height"),
    (["export", "--model", MODEL, "--dynamic", "--max-width", "0"], "--max-width"),
    (["bench", "--model", MODEL, "--height", "0"], "--height"),
    (["bench", "--model", MODEL, "--batch", "0"], "--batch"),
])
def test_zero_sizes_exit_2_naming_the_option(args, option, monkeypatch, tmp_path):
    """0 is not "the default": it was silently replaced by the model's size (or batch 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gag_export.models.load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert not list(tmp_path.iterdir()), "nothing written"


def test_shape_keeps_a_zero_for_validation():
    from gag_export.cli.build_commands import _shape
    from gag_export.core.errors import InvalidInputError
    from gag_export.models import ImageShape

    default = ImageShape(64, 64, 1)
    assert _shape(ImageShape, None, None, None, default) == default
    for sizes in ((0, None, None), (None, 0, None), (None, None, 0)):
        with pytest.raises(InvalidInputError, match="positive integer"):
            _shape(ImageShape, *sizes, default)


def test_unknown_model_lists_every_known_one():
    line = error_line(invoke("build", "--model", "nope"))
    for entry in list_entries():
        assert entry.name in line


# --------------------------------------------------------------------------- exit 3: missing optional dependency


@needs_no_tensorrt
def test_engine_without_tensorrt_exits_3(tmp_path):
    result = invoke("engine", tmp_path / "graphs" / MODEL)
    assert result.exit_code == 3
    assert 'pip install "gag-export[tensorrt]"' in error_line(result)


@needs_no_tensorrt
def test_build_require_engine_without_tensorrt_exits_3_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("gag_export.workflows.build.load_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # neither builder imports, whatever is installed
    result = invoke("build", "--model", MODEL, "--require-engine", "--out", tmp_path / "graphs")
    assert result.exit_code == 3 and "TensorRT is not available" in error_line(result)
    assert "TensorRT-RTX builds on any machine" in error_line(result)
    assert not (tmp_path / "graphs").exists()


# --------------------------------------------------------------------------- exit 4: a check failed


def test_check_of_a_graph_failing_the_tensorrt_lint_exits_4(run, tmp_path):
    graphs_dir = graphs_copy(run, tmp_path)
    rewrite_component(graphs_dir, "text_encoder", add_float64_cast)
    result = invoke("check", graphs_dir, "--no-parity")
    assert result.exit_code == 4
    assert "text_encoder/tensorrt_lint" in error_line(result)
    assert "float64" in result.output


def test_build_with_a_failing_check_exits_4_and_prints_the_report(run, tmp_path, monkeypatch):
    graphs_dir = graphs_copy(run, tmp_path)
    rewrite_component(graphs_dir, "text_encoder", add_float64_cast)
    monkeypatch.setattr("gag_export.workflows.build.export_model", lambda *a, **k: Manifest.load(graphs_dir))
    monkeypatch.chdir(tmp_path)
    result = invoke("build", "--model", MODEL, "--out", tmp_path / "graphs")
    assert result.exit_code == 4, result.output
    assert "text_encoder/tensorrt_lint" in error_line(result)
    assert "tensorrt_lint" in result.stdout and "stages" in result.stdout
    assert not list(tmp_path.glob("*.png")), "no smoke image from failed graphs"


# --------------------------------------------------------------------------- exit 5: bad or missing artifact


def test_check_of_a_missing_folder_exits_5(tmp_path):
    result = invoke("check", tmp_path / "graphs" / MODEL, "--no-parity")
    assert result.exit_code == 5 and "export the model first" in error_line(result)


def test_check_of_a_truncated_graph_exits_5(run, tmp_path):
    graphs_dir = graphs_copy(run, tmp_path)
    unet = graphs_dir / "unet" / "model.onnx"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 3])
    result = invoke("check", graphs_dir, "--no-parity")
    assert result.exit_code == 5
    assert "unet/model.onnx" in error_line(result) and "re-export" in error_line(result)


def test_check_of_an_edited_graph_exits_5(run, tmp_path):
    graphs_dir = graphs_copy(run, tmp_path)
    manifest = json.loads((graphs_dir / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["sha256"] = "0" * 64
    (graphs_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("check", graphs_dir, "--no-parity")
    assert result.exit_code == 5 and "sha256" in error_line(result)


@pytest.mark.parametrize("text", ["{", "[1]"])
def test_export_from_a_folder_with_a_damaged_model_index_exits_5(tmp_path, text):
    (tmp_path / "fakepipe").mkdir()
    (tmp_path / "fakepipe" / "model_index.json").write_text(text)
    result = invoke("export", "--model", tmp_path / "fakepipe", "--out", tmp_path / "graphs")
    assert result.exit_code == 5, result.output
    assert "fakepipe/model_index.json" in error_line(result) and "internal error" not in result.output


# --------------------------------------------------------------------------- export --component


def _files(graphs_dir: Path) -> dict:
    return {p.relative_to(graphs_dir): p.read_bytes() for p in graphs_dir.rglob("*") if p.is_file()}


def test_export_of_one_component_keeps_the_others(run, tmp_path):
    graphs_dir = graphs_copy(run, tmp_path)
    before = json.loads((graphs_dir / "manifest.json").read_text())
    kept = {path: data for path, data in _files(graphs_dir).items() if path.parts[0] != "text_encoder"}
    result = invoke("export", "--model", MODEL, "--out", graphs_dir.parent, "--component", "text_encoder")
    assert result.exit_code == 0, result.output  # the check (parity of every component) passed too
    manifest = Manifest.load(graphs_dir)
    assert list(manifest.components) == list(before["components"])
    for name in ("text_encoder_2", "unet", "vae_decoder"):
        assert manifest.components[name] == before["components"][name]
    assert manifest.data["gag"] == before["gag"]  # the UNet's rewritten layers are still listed
    after = _files(graphs_dir)
    assert all(after[path] == data for path, data in kept.items() if path.name != "manifest.json")
    assert sha256_of(manifest.graph_path("text_encoder")) == manifest.components["text_encoder"]["sha256"]
    assert sorted(p.name for p in graphs_dir.parent.iterdir()) == [MODEL]  # no temp folder left


@pytest.mark.parametrize("args, difference", [
    (["--dtype", "fp16"], "dtype"),
    (["--no-gag"], "gag"),
    (["--height", "128"], "shape"),
])
def test_export_of_one_component_over_an_export_with_other_settings_is_refused(run, tmp_path, args, difference):
    graphs_dir = graphs_copy(run, tmp_path)
    before = _files(graphs_dir)
    result = invoke("export", "--model", MODEL, "--out", graphs_dir.parent, "--component", "text_encoder", *args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert difference in line and "other settings" in line and "--component" in line
    assert _files(graphs_dir) == before  # nothing deleted, nothing replaced


# --------------------------------------------------------------------------- generate on --no-gag graphs


def _without_gag(run, tmp_path) -> Path:
    """A copy of the build whose manifest says --no-gag (the torch backend reads only that of it):
    GAG off, and no gag_* inputs declared (a manifest that says one and declares the other is refused)."""
    graphs_dir = graphs_copy(run, tmp_path)
    manifest = json.loads((graphs_dir / "manifest.json").read_text())
    manifest["gag"] = {"enabled": False, "rewritten": []}
    for component in manifest["components"].values():
        component["inputs"] = [i for i in component["inputs"] if not i["name"].startswith("gag_")]
    (graphs_dir / "manifest.json").write_text(json.dumps(manifest))
    return graphs_dir


def test_generate_on_a_no_gag_export_samples_plainly(run, tmp_path):
    graphs_dir = _without_gag(run, tmp_path)
    out = tmp_path / "plain.png"
    result = invoke("generate", "--model", MODEL, "--graphs", graphs_dir.parent, "--backend", "torch", "--prompt", "x",
                    "--steps", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_generate_with_gag_values_on_a_no_gag_export_exits_2(run, tmp_path):
    graphs_dir = _without_gag(run, tmp_path)
    result = invoke("generate", "--model", MODEL, "--graphs", graphs_dir.parent, "--backend", "torch", "--prompt", "x",
                    "--steps", "1", "--gag-scale", "3", "--out", tmp_path / "gag.png")
    assert result.exit_code == 2 and "exported without GAG" in error_line(result)


# --------------------------------------------------------------------------- exit 6: weights not available


def test_pretrained_weights_missing_offline_exit_6(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    result = invoke("build", "--model", "dmd2", "--out", tmp_path / "graphs")
    assert result.exit_code == 6, result.output
    line = error_line(result)
    from gag_export.models.loading import download_command

    for part in ("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", f"{download_command()} tianweiy/DMD2",
                 "--weights random", "tiny-sdxl"):
        assert part in line
    assert not list((tmp_path / "graphs").rglob("*")) if (tmp_path / "graphs").exists() else True
    assert not list(cache.rglob("*.bin")), "nothing downloaded"


# --------------------------------------------------------------------------- exit 7: out of disk or memory


def _disk_full(written):
    def fake_export_one(descriptor, module, config, precision, gag, dest):
        dest.write_bytes(b"\x08\x01" * 1024)  # a partial graph, then the disk is full
        written.append(dest)
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    return fake_export_one


def test_out_of_disk_during_export_exits_7_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(export, "_export_one", _disk_full(written))
    monkeypatch.chdir(tmp_path)
    result = invoke("build", "--model", MODEL, "--out", tmp_path / "graphs")
    assert result.exit_code == 7, result.output
    assert "out of disk space" in error_line(result)
    assert written and not written[0].exists()
    assert list((tmp_path / "graphs").iterdir()) == []  # no model folder, no temp folder
    assert not list(tmp_path.glob("*.png"))


def test_out_of_disk_keeps_the_previous_export_intact(run, tmp_path, monkeypatch):
    graphs_dir = graphs_copy(run, tmp_path)
    before = {p.relative_to(graphs_dir): p.read_bytes() for p in graphs_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(export, "_export_one", _disk_full([]))
    result = invoke("export", "--model", MODEL, "--out", tmp_path / "graphs", "--no-check")
    assert result.exit_code == 7, result.output
    after = {p.relative_to(graphs_dir): p.read_bytes() for p in graphs_dir.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == [MODEL]
    manifest = Manifest.load(graphs_dir)
    assert all(sha256_of(manifest.graph_path(n)) == c["sha256"] for n, c in manifest.components.items())


def test_out_of_memory_anywhere_exits_7(monkeypatch, tmp_path):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("gag_export.workflows.build.load_pipeline", no_memory)
    result = invoke("build", "--model", MODEL, "--out", tmp_path / "graphs")
    assert result.exit_code == 7 and "out of memory" in error_line(result)


# --------------------------------------------------------------------------- exit 1: a bug


def test_unexpected_exceptions_exit_1_with_one_line_and_a_traceback_under_verbose(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("gag_export.workflows.build.load_pipeline", bug)
    result = invoke("build", "--model", MODEL, "--out", tmp_path / "graphs")
    assert result.exit_code == 1
    line = error_line(result)
    assert "internal error: KeyError" in line and "--verbose" in line
    assert "Traceback" not in result.output
    verbose = invoke("--verbose", "build", "--model", MODEL, "--out", tmp_path / "graphs")
    assert verbose.exit_code == 1 and "Traceback" in verbose.output


# --------------------------------------------------------------------------- README and CI stay in sync


ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set up on a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_setup_commands_and_ci():
    build_cmd, test_cmd = readme_setup_commands()
    assert build_cmd == ('python -m pip install torch==2.13.0 && python -m pip install -e ".[export,tensorrt-rtx]" && '
                         "gag-export build --model tiny-sdxl")
    assert test_cmd == 'python -m pip install torch==2.13.0 && python -m pip install -e ".[dev]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), ".ci/run must run README's command 2 exactly"
    assert "-eq 5" in ci, ".ci/run must fail when pytest collects no tests (exit 5)"


def test_readme_tables_match_the_registry_and_exit_codes():
    readme = (ROOT / "README.md").read_text()
    table = invoke("models", "--markdown").output.strip()
    assert table in readme, "README's supported-models table is stale: paste `gag-export models --markdown`"
    for code, text in EXIT_CODES.items():
        assert f"| {code} | {text} |" in readme


def test_every_documented_exit_code_is_asserted_here():
    """Guards the README table: if a code is added to EXIT_CODES, a test above must trigger it."""
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 5, 6, 7, 130, 143}  # 143: tests/test_integrity.py (SIGTERM)


def test_ctrl_c_exits_130_with_one_line(monkeypatch):
    # click alone prints "Aborted!" and exits 1, the code README keeps for bugs
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gag_export.models.list_entries", interrupted)
    result = invoke("models")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output


def test_export_refuses_no_gag_with_gag_values(monkeypatch):
    # they were silently dropped (build and generate refuse the same combination)
    monkeypatch.setattr("gag_export.models.load_pipeline", lambda *a, **k: pytest.fail("loaded before refusing"))
    result = invoke("export", "--model", "tiny-sdxl", "--no-gag", "--gag-scale", "1")
    assert result.exit_code == 2 and "--no-gag cannot be combined with --gag-scale" in result.output, result.output
