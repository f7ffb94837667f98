"""Shared by test_build.py and test_cli.py: one real `gag-export build --model tiny-sdxl` per session.

The build runs as a subprocess (the console entry point end to end) in a folder under pytest's
session base temp, so both modules, and every test in them, reuse its graphs, manifest and PNG
without a conftest fixture. Tests that change graphs work on a copy (`graphs_copy`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL = "tiny-sdxl"


@dataclass(frozen=True)
class BuildRun:
    cwd: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def graphs_dir(self) -> Path:
        return self.cwd / "graphs" / MODEL

    @property
    def image(self) -> Path:
        return self.cwd / f"{MODEL}-0.png"


def built_tiny_sdxl(tmp_path_factory) -> BuildRun:
    """Run `python -m gag_export.cli build --model tiny-sdxl` once per session (cached by folder)."""
    cwd = tmp_path_factory.getbasetemp() / "cli-build"
    record = cwd / "run.json"
    if not record.is_file():
        cwd.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "gag_export.cli", "build", "--model", MODEL],
                              cwd=cwd, capture_output=True, text=True, timeout=1200)
        record.write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
    data = json.loads(record.read_text())
    return BuildRun(cwd, data["returncode"], data["stdout"], data["stderr"])


def graphs_copy(run: BuildRun, dest: Path) -> Path:
    """A private copy of the session's graphs root (`dest/graphs`); returns `dest/graphs/<model>`."""
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(run.cwd / "graphs", dest / "graphs")
    return dest / "graphs" / MODEL


def rewrite_component(graphs_dir: Path, component: str, edit) -> None:
    """Apply `edit(onnx.ModelProto)` to a component's graph and record its new sha256/size in the
    manifest, so the artifact check passes and the later checks see the edited graph."""
    import onnx

    from gag_export.artifacts.manifest import graph_sha256

    path = graphs_dir / component / "model.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save_model(model, str(path))
    manifest_path = graphs_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"][component]["sha256"] = graph_sha256(path)
    manifest["components"][component]["size_bytes"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest, indent=2))


def add_float64_cast(model) -> None:
    """A dangling Cast to float64: a valid graph that TensorRT's lint rejects (no float64 in TensorRT)."""
    from onnx import TensorProto, helper

    source = model.graph.node[-1].output[0]
    model.graph.node.append(helper.make_node("Cast", [source], ["tampered_f64"], to=TensorProto.DOUBLE,
                                             name="tampered_cast_f64"))
