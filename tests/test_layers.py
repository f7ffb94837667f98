"""The package's layering (docs/DESIGN.md), held by tests rather than hoped for.

- pyproject's import-linter contracts: the layer order, no import cycle at any level, the GAG math's
  own order, the run side (runtime, serving) never importing the build side, the build side never
  importing the runtime, the Triton client loading no torch. Imports inside functions count.
- core/ and artifacts/ import, at module level, only the standard library, numpy and core; the few
  probes that reach for torch, a GPU library or ml_dtypes do so inside the function that needs them
  (listed here, so a new one is a decision), and importing them loads none of those.
- Fresh interpreters: what `import gag_export.runtime`, `.serving` and `.serving.client` load.
- No module over 600 lines; each public name defined once; the extras split the build side off.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gag_export"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = PYPROJECT["tool"]["importlinter"]["contracts"]
MAX_LINES = 600

# Libraries the build side brings (the `export` and `bench` extras), which the run side never loads.
BUILD_LIBRARIES = ("onnx", "onnxscript", "onnxslim", "polygraphy", "matplotlib")
BUILD_LAYERS = ("gag_export.export", "gag_export.check", "gag_export.engine", "gag_export.workflows")

# The only imports in core/ and artifacts/ beyond the standard library and numpy, each inside the
# function that needs it: (module, imported top-level package).
LAZY_PROBES = {
    ("gag_export.core.precision", "torch"),  # Precision.torch_dtype
    ("gag_export.core.precision", "ml_dtypes"),  # Precision.numpy_dtype for bf16/fp8
    ("gag_export.core.gpu", "torch"),  # detect_gpu: the CUDA device torch sees
    ("gag_export.core.gpu", "pynvml"),  # detect_gpu: the driver's view, without torch
    ("gag_export.core.gpu", "cuda"),  # detect_gpu: cuda-python, for the compute capability
    ("gag_export.core.memory", "psutil"),  # ensure_memory: what the OS and this process hold
}


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """(imported top-level name, at module level?) for every import; relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for stmt in tree.body:  # `if`/`try` blocks at module level run at import time too
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level |= {id(node) for node in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            if name != "__future__":
                yield name, id(node) in top_level


def _fresh_import(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


LOADED = """
import importlib, json, sys
for name in {names!r}:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


# --------------------------------------------------------------------------------------------- contracts


@pytest.fixture
def logging_left_as_found():
    """importlinter's CLI configures logging with `dictConfig`, which disables every logger that
    already exists (`disable_existing_loggers`): gag_export's loggers would stay silent for every
    later test in the process (CI's test_sampler caplog saw nothing after this file ran)."""
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = [lg.disabled for lg in loggers]
    yield
    for lg, was_disabled in zip(loggers, disabled):
        lg.disabled = was_disabled


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_import_contract_is_kept(contract, tmp_path, capsys, logging_left_as_found):
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), limit_to_contracts=(contract,),
                        cache_dir=str(tmp_path), no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_the_contracts_name_every_layer_of_the_package():
    layers = next(c for c in CONTRACTS if c["id"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert named == present, "a new top-level module needs its place in the layers contract"


# ----------------------------------------------------------------------------------- core and artifacts


def test_core_and_artifacts_import_the_standard_library_numpy_and_core_only():
    stdlib = set(sys.stdlib_module_names)
    lazy = set()
    for folder in (PACKAGE / "core", PACKAGE / "artifacts"):
        for module, path in _modules(folder):
            for name, at_import in _imports(module, path):
                root = name.split(".")[0]
                if root == "gag_export":
                    assert name == "gag_export" or name.startswith(("gag_export.core", "gag_export.artifacts")), \
                        f"{module} imports {name}"
                elif root in stdlib or root == "numpy":
                    continue
                else:
                    assert not at_import, f"{module} imports {name} when it is imported"
                    lazy.add((module, root))
    assert lazy == LAZY_PROBES


def test_importing_core_and_artifacts_loads_no_heavy_library():
    names = [m for folder in ("core", "artifacts") for m, _ in _modules(PACKAGE / folder)]
    loaded = set(_fresh_import(LOADED.format(names=names)))
    heavy = {"torch", "onnx", "onnxruntime", "polygraphy", "tensorrt", "tensorrt_rtx", "pynvml", "ml_dtypes",
             "diffusers", "transformers"}
    assert not loaded & heavy


# ----------------------------------------------------------------------------------- run side, fresh


def test_the_runtime_loads_no_build_side():
    loaded = _fresh_import(LOADED.format(names=["gag_export.runtime"]))
    assert "gag_export.runtime.sampler" in loaded  # it did load
    assert not [m for m in loaded if m.startswith(BUILD_LAYERS) or m.split(".")[0] in BUILD_LIBRARIES]


def test_the_serving_client_loads_no_torch_and_serving_re_exports_nothing_heavy():
    loaded = set(_fresh_import(LOADED.format(names=["gag_export.serving.client"])))
    assert "gag_export.serving.client" in loaded
    assert not loaded & {"torch", "diffusers", "transformers", "onnxruntime", "gag_export.runtime", "gag_export.models"}
    bare = set(_fresh_import(LOADED.format(names=["gag_export.serving"])))
    assert not {m for m in bare if m.startswith("gag_export.")} - {"gag_export.serving"}
    assert "numpy" not in bare and "torch" not in bare


# --------------------------------------------------------------------------------------------- size, names


def test_no_module_is_over_600_lines():
    long = {str(path.relative_to(ROOT)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_each_public_name_is_defined_once():
    defined: dict[str, list[str]] = {}
    for module, path in _modules(PACKAGE):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for name in names:
                if not name.startswith("_") and name != "log":
                    defined.setdefault(name, []).append(module)
    assert not {name: modules for name, modules in defined.items() if len(modules) > 1}


# ------------------------------------------------------------------------------------------------ extras


def _distribution(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower()


def test_the_base_install_is_the_run_side_and_the_export_extra_the_build_side():
    from gag_export.core.extras import EXTRA_MODULES

    base = {_distribution(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not base & set(BUILD_LIBRARIES)
    assert {_distribution(r) for r in extras["export"]} == set(EXTRA_MODULES["export"])
    assert {_distribution(r) for r in extras["bench"]} - {"gag-export"} == set(EXTRA_MODULES["bench"]) - set(EXTRA_MODULES["export"])
    # every library the build side imports at all is in the export extra (or the base)
    build_imports = {name.split(".")[0] for layer in ("export", "check", "engine")
                     for module, path in _modules(PACKAGE / layer) for name, _ in _imports(module, path)}
    third_party = build_imports - set(sys.stdlib_module_names) - {"gag_export"}
    assert third_party - {"torch", "numpy", "onnxruntime", "google", "ml_dtypes"} <= set(EXTRA_MODULES["export"])


@pytest.mark.parametrize("command", [["export", "--model", "tiny-sdxl"], ["check", "graphs/x"], ["engine", "graphs/x"],
                                     ["build", "--model", "tiny-sdxl"], ["bench", "--model", "tiny-sdxl"]])
def test_a_build_command_without_its_extra_stops_in_one_line(command, monkeypatch):
    from click.testing import CliRunner

    from gag_export.cli import cli
    from gag_export.core import extras

    absent = "gag_export_test_absent_module"  # looked up for real, and not there
    for extra in ("export", "bench"):
        monkeypatch.setitem(extras.EXTRA_MODULES, extra, (*extras.EXTRA_MODULES[extra], absent))
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 3, result.output
    extra = "bench" if command[0] == "bench" else "export"
    assert result.output.strip().splitlines() == [
        f'error: gag-export {command[0]} needs {absent}, which the base install leaves out: pip install "gag-export[{extra}]"'
    ]


def test_every_import_the_docs_show_resolves():
    """README's and the docs' `from gag_export... import ...` lines name modules and names that exist."""
    import importlib
    import re

    pattern = re.compile(r"^\s*from (gag_export[\w.]*) import ([\w, ]+)$", re.M)
    shown = [(m.group(1), name.strip()) for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for m in pattern.finditer(doc.read_text()) for name in m.group(2).split(",") if name.strip()]
    assert len(shown) > 10
    missing = [f"{module}.{name}" for module, name in shown if not hasattr(importlib.import_module(module), name)]
    assert not missing
