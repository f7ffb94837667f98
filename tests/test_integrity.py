"""Never run on a damaged artifact, never leave a temp folder behind, one rule for values (issue 21).

Fault injection: each kind of damage to an export (graph bytes of the same size, a wrong digest,
manifest fields that disagree with the graph or point outside the export) is refused by every
command that reads it, with exit 5 and nothing written. SIGTERM during an export removes its temp
folder and exits 143; a folder left by a killed export is removed by the next one. Prompts and
guidance values follow one rule in the CLI, the Python API and the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_helpers import PROMPT, exported_graphs

from gag_export.artifacts import integrity
from gag_export.artifacts.manifest import Manifest
from gag_export.cli import cli
from gag_export.core.atomic import make_temp_folder, remove_stale_temp_folders
from gag_export.core.errors import ArtifactError, InvalidInputError
from gag_export.core.gag_config import MAX_ZETA, SCALE_LIMITS, GAGConfig
from gag_export.runtime import GAGParams, GenerationConfig

MODEL = "tiny-sdxl"


@pytest.fixture(scope="module")
def good_graphs(tmp_path_factory) -> Path:
    return exported_graphs(tmp_path_factory, MODEL)


@pytest.fixture
def graphs(good_graphs, tmp_path) -> Path:
    """A private copy of the session's tiny-sdxl export (`<root>/tiny-sdxl`), free to damage."""
    root = tmp_path / "graphs"
    shutil.copytree(good_graphs / MODEL, root / MODEL)
    return root


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


def _edit_manifest(graphs: Path, edit) -> None:
    path = graphs / MODEL / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _bad_digest(data):
    data["components"]["unet"]["sha256"] = "0" * 64


def _gag_null(data):
    data["gag"] = None


def _path_outside(data):
    data["components"]["vae_decoder"]["path"] = "../../../etc/passwd"


DAMAGE = {
    "graph bytes": lambda graphs: _flip_middle(graphs / MODEL / "unet" / "model.onnx"),
    "manifest sha256": lambda graphs: _edit_manifest(graphs, _bad_digest),
    "gag null": lambda graphs: _edit_manifest(graphs, _gag_null),
    "path outside": lambda graphs: _edit_manifest(graphs, _path_outside),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_generate_refuses_a_damaged_export_and_writes_nothing(damage, graphs, tmp_path):
    DAMAGE[damage](graphs)
    out = tmp_path / "out.png"
    result = invoke("generate", "--model", MODEL, "--prompt", PROMPT, "--backend", "ort", "--threads", "1", "--steps", "1",
                    "--graphs", str(graphs), "--no-build", "--out", str(out))
    assert result.exit_code == 5, result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_triton_refuses_a_damaged_export_and_writes_nothing(damage, graphs, tmp_path):
    DAMAGE[damage](graphs)
    out = tmp_path / "repo"
    result = invoke("triton", str(graphs / MODEL), "--out", str(out), "--cpu-standin")
    assert result.exit_code == 5, result.output
    assert not out.exists() and not list(tmp_path.glob(".repo.*"))


def test_damaged_external_data_is_refused(graphs, tmp_path):
    """The layout of a full-size graph (weights in `model.onnx.data`), made from the tiny UNet."""
    import onnx

    from gag_export.artifacts.manifest import data_path, graph_sha256, sha256_files

    unet = graphs / MODEL / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(unet)), str(unet), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_path(unet).name)  # 1 KiB threshold, as save_graph
    data = data_path(unet)

    def external(manifest):
        entry = manifest["components"]["unet"]
        entry["external_data"] = {"path": "unet/" + data.name, "sha256": sha256_files([data]),
                                  "size_bytes": data.stat().st_size}
        entry["sha256"], entry["size_bytes"] = graph_sha256(unet), unet.stat().st_size + data.stat().st_size
    _edit_manifest(graphs, external)
    args = ["generate", "--model", MODEL, "--prompt", PROMPT, "--backend", "ort", "--threads", "1", "--steps", "1",
            "--graphs", str(graphs), "--no-build"]
    assert invoke(*args, "--out", str(tmp_path / "a.png")).exit_code == 0  # the layout itself works
    _flip_middle(data)
    result = invoke(*args, "--out", str(tmp_path / "b.png"))
    assert result.exit_code == 5, result.output
    assert "does not match its manifest" in result.output and not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("damage", ["graph bytes", "manifest sha256", "path outside"])
def test_engine_build_refuses_a_damaged_export(damage, graphs, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    DAMAGE[damage](graphs)
    out = tmp_path / "engines"
    result = invoke("engine", str(graphs / MODEL), "--backend", "tensorrt-rtx", "--out", str(out), "--component", "unet")
    assert result.exit_code == 5, result.output
    assert not list(out.rglob("*.plan"))


@pytest.mark.parametrize("damage, match", [
    ("gag null", "gag must be an object"),
    ("path outside", "not a file inside"),
])
def test_check_refuses_a_damaged_manifest(damage, match, graphs):
    DAMAGE[damage](graphs)
    result = invoke("check", str(graphs / MODEL), "--no-parity", "--parser", "none")
    assert result.exit_code == 5, result.output
    assert match in result.output


def test_check_refuses_a_manifest_whose_shapes_disagree_with_the_graph(graphs):
    def wrong_shape(data):
        data["components"]["unet"]["inputs"][0]["shape"] = [1, 4, 16, 16]
    _edit_manifest(graphs, wrong_shape)
    result = invoke("check", str(graphs / MODEL), "--no-parity", "--parser", "none")
    assert result.exit_code == 5, result.output
    assert "manifest.json: unet's inputs do not match its graph" in result.output


def test_check_refuses_a_manifest_of_another_model(graphs):
    _edit_manifest(graphs, lambda data: data.update(model="tiny-flux"))
    result = invoke("check", str(graphs / MODEL), "--no-parity", "--parser", "none")
    assert result.exit_code == 5, result.output
    assert "is for model 'tiny-flux'" in result.output


def test_a_verified_graph_is_hashed_once_until_it_changes(graphs, monkeypatch):
    hashed = []
    real = integrity.sha256_files
    monkeypatch.setattr(integrity, "sha256_files", lambda paths: hashed.append(list(paths)) or real(paths))
    manifest = Manifest.load(graphs / MODEL)
    integrity.verify_graph(manifest, "unet")
    integrity.verify_graph(manifest, "unet")
    assert len(hashed) == 1  # the second read trusted the record: same inode, size, mtime, ctime
    unet = manifest.graph_path("unet")
    os.utime(unet)  # touched: its times change, so it is hashed again (and still matches)
    integrity.verify_graph(manifest, "unet")
    assert len(hashed) == 2
    stat = unet.stat()
    _flip_middle(unet)
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime put back: ctime still moved
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        integrity.verify_graph(manifest, "unet")


def test_the_verified_record_is_optional(graphs, monkeypatch, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("GAG_EXPORT_CACHE", str(tmp_path / "not-a-folder" / "cache"))
    integrity.verify_graphs(Manifest.load(graphs / MODEL))  # verified, just not remembered


# --------------------------------------------------------------------------------------------- signals


def test_sigterm_during_export_removes_its_temp_folder_and_exits_143(tmp_path):
    out = tmp_path / "graphs"
    proc = subprocess.Popen([sys.executable, "-m", "gag_export.cli", "export", "--model", MODEL, "--out", str(out),
                             "--no-check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob(f".{MODEL}.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated by SIGTERM; nothing half-written was left"
    assert not list(out.glob(".*"))  # no temp folder
    # nothing, or (when the signal's exception was swallowed inside a C callback and the export ran
    # to its next checkpoint) a whole export: never half of one
    assert not (out / MODEL).exists() or Manifest.load(out / MODEL).components


def test_a_temp_folder_of_a_killed_export_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = make_temp_folder(tmp_path, MODEL)
    stale = Path(str(mine).replace(f"-{os.getpid()}.", f"-{dead.pid}."))
    stale.mkdir()
    (stale / "unet").mkdir()
    older = tmp_path / f".{MODEL}.abc123.tmp"  # an older gag-export's name: its writer is unknown
    older.mkdir()
    other = tmp_path / ".tiny-flux.somehost-1.abc.tmp"
    other.mkdir()
    removed, unknown = remove_stale_temp_folders(tmp_path, MODEL)
    assert removed == [stale] and not stale.exists()
    assert unknown == [older] and older.exists()
    assert mine.exists() and other.exists()  # a live export's (this process), another model's


# ----------------------------------------------------------------------------------- one rule for values


@pytest.mark.parametrize("args", [["--gag-scale", "1e308"], ["--gag-scale", "101"], ["--gag-zeta", "11"],
                                  ["--gag-scale", "nan"], ["--gag-eta", "0"]])
def test_out_of_range_guidance_is_refused_before_anything_runs(args, tmp_path):
    result = invoke("generate", "--model", MODEL, "--prompt", PROMPT, "--graphs", str(tmp_path / "none"), *args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "none").exists()


def test_the_server_and_the_api_share_the_guidance_bounds():
    from gag_export.serving.requests import RequestLimits

    limits = RequestLimits(min_steps=1, max_steps=4)
    assert (limits.min_scale, limits.max_scale, limits.max_zeta) == (*SCALE_LIMITS, MAX_ZETA)
    GAGParams(scale=SCALE_LIMITS[1], zeta=MAX_ZETA)  # the bounds themselves are allowed
    for bad in ({"scale": 1e308}, {"scale": SCALE_LIMITS[0] - 1}, {"zeta": MAX_ZETA * 2}):
        with pytest.raises(InvalidInputError):
            GAGParams(**bad)
        with pytest.raises(InvalidInputError):
            GAGConfig(**bad)


@pytest.mark.parametrize("prompt", ["a\udcff\udcfeb", "lone \ud800 surrogate", "nul\x00byte"])
def test_a_prompt_that_is_not_text_is_one_line_exit_2(prompt, tmp_path):
    with pytest.raises(InvalidInputError, match="prompt"):
        GenerationConfig(prompt)
    result = invoke("generate", "--model", MODEL, "--prompt", prompt, "--graphs", str(tmp_path / "none"))
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and result.output.count("\n") == 1


def test_an_image_name_that_is_not_png_is_refused_before_anything_runs(tmp_path):
    result = invoke("generate", "--model", MODEL, "--prompt", PROMPT, "--graphs", str(tmp_path / "none"),
                    "--out", str(tmp_path / "fox.jpg"))
    assert result.exit_code == 2, result.output
    assert "give a .png name" in result.output and not (tmp_path / "none").exists()


# ------------------------------------------------------------------ memory: exit 7 before, not 137 during


@pytest.fixture
def small_machine(monkeypatch):
    """A machine that can give this process at most 1 MiB: less than any tiny graph's ORT session."""
    from gag_export.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 512 * 1024)
    monkeypatch.setattr(memory, "process_bytes", lambda: 512 * 1024)


def test_parity_that_cannot_fit_is_exit_7_and_says_what_to_do(graphs, small_machine):
    result = invoke("check", str(graphs / MODEL), "--parser", "none")
    assert result.exit_code == 7, result.output
    line = " ".join(result.output.split())
    assert f"parity of {MODEL}/" in line and "GiB" in line and "--no-parity" in line
    assert invoke("check", str(graphs / MODEL), "--parser", "none", "--no-parity").exit_code == 0  # no session


def test_engine_build_that_cannot_fit_is_exit_7_with_nothing_written(graphs, tmp_path, small_machine):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "engines"
    result = invoke("engine", str(graphs / MODEL), "--backend", "tensorrt-rtx", "--out", str(out), "--component", "unet")
    assert result.exit_code == 7, result.output
    assert "engine build of tiny-sdxl/unet" in " ".join(result.output.split())
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_the_memory_guard_counts_what_the_process_holds(monkeypatch):
    # freed weights stay resident and are reused by the next stage: "available" alone would refuse
    # the full-size engine stage that fits (benchmarks/README.md); available + held is the bound
    from gag_export.core import memory
    from gag_export.core.errors import ResourceExhaustedError

    monkeypatch.setattr(memory, "available_bytes", lambda: 2 * memory.GIB)
    monkeypatch.setattr(memory, "process_bytes", lambda: 6 * memory.GIB)
    memory.ensure_memory(7.9 * memory.GIB, "a stage", "advice")
    with pytest.raises(ResourceExhaustedError, match=r"a stage needs ~8.1 GiB, this machine can give it at most 8.0 GiB"):
        memory.ensure_memory(8.1 * memory.GIB, "a stage", "advice")
