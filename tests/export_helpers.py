"""Tiny exported graphs shared by test_export.py and test_check.py: each export runs once per session.

pytest registers a fixture once per module that defines (or imports) it, so a session-scoped
fixture imported into two test modules would run twice. The exports are cached here instead,
keyed by name, in one temp folder per session (`graphs_root`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gag_export.export import ExportConfig, export_model
from gag_export.artifacts.manifest import Manifest
from gag_export.gag import GAGConfig
from gag_export.models import ImageShape, get_entry, load_pipeline

BISECT = GAGConfig(method="bisect")
# The dynamic export rewrites one block's attention only: symbolic shapes make every GAG op
# cost several seconds of export time on 2 cores, and the shape handling is what it tests.
ONE_BLOCK = GAGConfig(method="bisect", layers="up_blocks.0.attentions.0.*")

EXPORTS = {
    # name: (model, ExportConfig keyword arguments)
    "sdxl": ("tiny-sdxl", {}),
    "sdxl_nogag_unet": ("tiny-sdxl", {"gag": None, "components": ("unet",)}),
    "flux": ("tiny-flux", {}),
    "sdxl_dynamic_unet": ("tiny-sdxl", {
        "dynamic": True, "gag": ONE_BLOCK, "components": ("unet",),
        "min_shape": ImageShape(32, 32, 1), "max_shape": ImageShape(96, 128, 3),
    }),
    "sdxl_fp16": ("tiny-sdxl", {"precision": "fp16"}),
    # with the VAE encoder (test_vae_encoder.py)
    "sdxl_img2img": ("tiny-sdxl", {"img2img": True}),
    "flux_img2img": ("tiny-flux", {"img2img": True}),
}

# Every tiny model x precision x static/dynamic, each exported whole with GAG (test_export.py's
# matrix). Three of them are the exports above, shared rather than made twice.
MATRIX_MODELS = ("tiny-sdxl", "tiny-flux")
MATRIX_DTYPES = ("fp32", "fp16", "bf16")
MATRIX_SHAPES = ("static", "dynamic")
_SHARED = {("tiny-sdxl", "fp32", "static"): "sdxl", ("tiny-flux", "fp32", "static"): "flux",
           ("tiny-sdxl", "fp16", "static"): "sdxl_fp16"}


def matrix_export(model: str, dtype: str, shapes: str) -> str:
    """The EXPORTS name of one matrix cell (added on first use)."""
    name = _SHARED.get((model, dtype, shapes), f"matrix_{model}_{dtype}_{shapes}")
    if name not in EXPORTS:
        kwargs = {"precision": dtype}
        if shapes == "dynamic":  # a real range: batch 1-2, 32 to 96 pixels (FLUX packs 16-pixel patches)
            kwargs.update(dynamic=True, min_shape=ImageShape(32, 32, 1), max_shape=ImageShape(96, 96, 2))
        EXPORTS[name] = (model, kwargs)
    return name


_ROOT: list[Path] = []


def shared_root(tmp_path_factory) -> Path:
    """One graphs folder for the whole session, whichever test module asks first."""
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("graphs"))
    return _ROOT[0]


@functools.cache
def pipeline(model: str):
    return load_pipeline(get_entry(model))


@functools.cache
def exported(name: str, root: Path) -> Manifest:
    """Export `EXPORTS[name]` under `root/name` (once per session) and return its manifest."""
    model, kwargs = EXPORTS[name]
    entry = get_entry(model)
    kwargs = {"gag": BISECT, **kwargs}
    config = ExportConfig(model, root / name, ImageShape(entry.height, entry.width, 1), **kwargs)
    return export_model(pipeline(model), entry, config)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feed: dict) -> list[np.ndarray]:
    return sess.run(None, {k: np.asarray(v) for k, v in feed.items()})


def sha256_of(*paths: Path) -> str:
    """SHA-256 of the files' bytes one after another, with hashlib alone: the manifest's `sha256`
    (the graph, then its external data) computed without the code under test."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
