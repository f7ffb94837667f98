"""Shared by test_runtime.py, test_sampler.py and test_nonsquare.py: tiny exports made once per session, thread limits.

Exports are cached under pytest's session base temp folder, so the two modules (and every test in
them) share one export of each tiny model without a conftest fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gag_export.workflows.bench.variants import torch_threads  # noqa: F401  (re-exported for the test modules)
from gag_export.runtime import BackendOptions

# One thread each: on a shared 2-core machine OpenMP spin-waiting makes multi-threaded tiny
# models ~100x slower when other processes compete for the cores.
ONE_THREAD = BackendOptions(threads=1)
PROMPT = "a photo of a cat sitting on a wooden table"


# The default-size exports are export_helpers' own (the same settings: GAG bisect, static, batch 1),
# so a session exports each tiny model once, whichever module asks first.
_SHARED_EXPORTS = {("tiny-sdxl", False): "sdxl", ("tiny-flux", False): "flux",
                   ("tiny-sdxl", True): "sdxl_img2img", ("tiny-flux", True): "flux_img2img"}


def torch_sampler(tmp_path_factory, model: str):
    """`model` on the torch backend with GAG applied (an empty graphs folder: the default bisect
    config), one thread; use as a context manager."""
    from gag_export.runtime import Sampler

    return Sampler.load(model, "torch", graphs=tmp_path_factory.mktemp("no-graphs"), options=ONE_THREAD)


def exported_graphs(tmp_path_factory, model: str, height: int | None = None, width: int | None = None,
                    img2img: bool = False) -> Path:
    """The graphs root holding `<root>/<model>/manifest.json` (exported once per session, GAG bisect),
    static at the entry's size or at `height` x `width`, with the VAE encoder when `img2img` (a root
    of its own per size and per img2img)."""
    from export_helpers import exported, shared_root

    from gag_export.export import DEFAULT_EXPORT_GAG, ExportConfig, export_model
    from gag_export.models import ImageShape, get_entry, load_pipeline

    entry = get_entry(model)
    shape = ImageShape(height or entry.height, width or entry.width)
    if (shape.height, shape.width) == (entry.height, entry.width) and (model, img2img) in _SHARED_EXPORTS:
        name = _SHARED_EXPORTS[model, img2img]
        with torch_threads(1):
            exported(name, shared_root(tmp_path_factory))
        return shared_root(tmp_path_factory) / name
    root = tmp_path_factory.getbasetemp() / (f"runtime-graphs-{shape.height}x{shape.width}" + ("-img2img" if img2img else ""))
    if not (root / model / "manifest.json").is_file():
        with torch_threads(1):
            export_model(load_pipeline(model), entry, ExportConfig(model, root, shape, gag=DEFAULT_EXPORT_GAG, img2img=img2img))
    return root


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_pixel_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())
