"""Run side: run exported graphs and engines; one sampling loop for every backend and family.

Reads artifacts through `artifacts/` and never imports the exporter, the checks, engine building,
workflows or Polygraphy (tests/test_layers.py holds it to that). Modules: `components` (the
interface, `ComponentSet`), one per backend (`torch_backend`, `ort_backend`, `tensorrt_backend`),
`exports` (a model's manifest and graph files, checked), `loading` (its components for a backend),
`generation` (requests and results), `conditioning` (what differs between families), `sampler`
(the loop; PNG files: `gag_export.images`).

    from gag_export.runtime import Sampler, GenerationConfig, GAGParams
    with Sampler.load("tiny-sdxl", "ort", graphs=Path("graphs")) as sampler:
        result = sampler.generate(GenerationConfig("a red fox", seed=1, gag=GAGParams(scale=10)))
    result.save("fox.png")
"""

from ..images import read_png_metadata, save_png
from .components import (
    BACKENDS,
    ENGINE_BACKENDS,
    BackendOptions,
    Component,
    ComponentSet,
    parse_backend,
)
from .generation import (
    IDENTITY_GAG,
    GAGParams,
    GenerationConfig,
    GenerationResult,
    StageTimings,
)
from .loading import load_components
from .ort_backend import OrtComponent
from .sampler import Sampler, SamplerAssets, check_request, load_assets, psnr
from .tensorrt_backend import TensorRTComponent, TensorRTRtxComponent
from .torch_backend import TorchComponent

__all__ = [
    "BACKENDS", "ENGINE_BACKENDS", "BackendOptions", "Component", "ComponentSet", "OrtComponent", "TensorRTComponent",
    "TensorRTRtxComponent", "TorchComponent", "load_components", "parse_backend", "read_png_metadata", "save_png",
    "IDENTITY_GAG", "GAGParams", "GenerationConfig", "GenerationResult", "Sampler", "SamplerAssets", "StageTimings",
    "check_request", "load_assets", "psnr",
]
