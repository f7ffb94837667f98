"""What to install for each optional part of gag-export, and one check that says so in one line.

The base install is the run side: sampling with torch, ONNX Runtime and built engines, and the
CLI. Building is an extra, so a runtime or a Triton server's environment (which installs the base
requirements only: serving/environment.py) carries no exporter:

    export        onnx, onnxscript (torch's ONNX exporter), onnxslim, Polygraphy: export, check, engine, build
    bench         export + matplotlib (plots)
    serve         tritonclient and the Triton server binary (nvidia-pytriton)
    tensorrt-rtx  TensorRT for RTX (parser and ahead-of-time builder, any machine); tensorrt, tensorrt-cu12
"""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError

# The modules each extra brings, by import name (what `require_extra` looks for).
EXTRA_MODULES = {
    "export": ("onnx", "onnxscript", "onnxslim", "polygraphy"),
    "bench": ("onnx", "onnxscript", "onnxslim", "polygraphy", "matplotlib"),
    "serve": ("tritonclient",),
}
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def install_hint(extra: str) -> str:
    return f'pip install "gag-export[{extra}]"'


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that this environment cannot import (found without importing them)."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, purpose: str) -> None:
    """Raise `MissingDependencyError` (exit 3) naming what `purpose` lacks and the command that installs it."""
    missing = missing_modules(extra)
    if missing:
        raise MissingDependencyError(f"{purpose} needs {', '.join(missing)}, which the base install leaves out: "
                                     f"{install_hint(extra)}")


__all__ = ["EXTRA_MODULES", "ORT_GPU_INSTALL", "install_hint", "missing_modules", "require_extra"]
