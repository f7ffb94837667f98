"""Layer 7: run exported graphs and engines; one sampling loop for every backend and family.

    from gag_export.runtime import Sampler, GenerationConfig, GAGParams
    with Sampler.load("tiny-sdxl", "ort", graphs=Path("graphs")) as sampler:
        result = sampler.generate(GenerationConfig("a red fox", seed=1, gag=GAGParams(scale=10)))
    result.save("fox.png")
"""

from .backends import (
    BACKENDS,
    BackendOptions,
    Component,
    ComponentSet,
    OrtComponent,
    TensorRTComponent,
    TorchComponent,
    load_components,
    parse_backend,
)
from .png import read_png_metadata, save_png
from .prepare import PrepareStep, ensure_artifacts
from .sampler import (
    IDENTITY_GAG,
    GAGParams,
    GenerationConfig,
    GenerationResult,
    Sampler,
    SamplerAssets,
    StageTimings,
    check_request,
    load_assets,
    psnr,
)

__all__ = [
    "BACKENDS", "BackendOptions", "Component", "ComponentSet", "OrtComponent", "TensorRTComponent", "TorchComponent",
    "load_components", "parse_backend", "read_png_metadata", "save_png", "PrepareStep", "ensure_artifacts",
    "IDENTITY_GAG", "GAGParams", "GenerationConfig", "GenerationResult", "Sampler", "SamplerAssets", "StageTimings",
    "check_request", "load_assets", "psnr",
]
