"""The served pipeline's names, shared by the repository writer, the in-server models and the client.

Plain strings only: the client reads them without loading torch, ONNX or the runtime.
"""

from __future__ import annotations

from ..core.names import GAG_INPUTS

PIPELINE = "pipeline"  # the public model: an ensemble over the sampler
SAMPLER = "sampler"  # the BLS sampler (a Python model running the runtime's scheduler loop)
IMAGE_OUTPUT = "image"  # uint8 HxWx3
# The pipeline's inputs and their Triton types (each `dims: [1]`); the GAG values only for GAG exports.
REQUEST_INPUTS = {"prompt": "TYPE_STRING", "seed": "TYPE_INT64", "steps": "TYPE_INT32",
                  **{name: "TYPE_FP32" for name in GAG_INPUTS}}
# Image-to-image, only for exports with the VAE encoder, both optional (`optional: true`): the input
# image as the pipeline returns its output (uint8 [height, width, 3], RGB) and the strength (fp32 [1]).
# Not named "image": the ensemble's tensors share one namespace with its output.
IMAGE_INPUT = "init_image"
# gag_scale/gag_eta take one value for every layer or one per rewritten layer (`dims: [-1]`), and
# optional per-step schedules (one value per denoising step, the last repeating; GAGParams).
PER_LAYER_REQUEST_INPUTS = ("gag_scale", "gag_eta")
SCHEDULE_INPUTS = {"gag_scale_steps": "gag_scale", "gag_eta_steps": "gag_eta"}
STRENGTH_INPUT = "strength"
IMG2IMG_INPUTS = {IMAGE_INPUT: ("TYPE_UINT8", [-1, -1, 3]), STRENGTH_INPUT: ("TYPE_FP32", [1])}

__all__ = ["GAG_INPUTS", "IMAGE_INPUT", "IMAGE_OUTPUT", "IMG2IMG_INPUTS", "PER_LAYER_REQUEST_INPUTS", "PIPELINE",
           "REQUEST_INPUTS", "SAMPLER", "SCHEDULE_INPUTS",
           "STRENGTH_INPUT"]
