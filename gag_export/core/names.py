"""Names every layer shares, defined once: the guidance inputs and the artifact file names."""

from __future__ import annotations

# The three 0-d float32 inputs of a GAG denoiser graph (and of the serving pipeline's requests).
GAG_INPUTS = ("gag_scale", "gag_eta", "gag_zeta")
# Of those, the ones an export declares as [L] vectors, one value per rewritten layer in the order
# of the manifest's gag.layer_names (exports made before per-layer guidance: 0-d, see docs/TUNING).
PER_LAYER_GAG_INPUTS = ("gag_scale", "gag_eta")

FAMILIES = ("sdxl", "flux")  # the model families: SDXL's UNet, FLUX's MMDiT transformer

# Components img2img needs beyond txt2img's: exported only when asked (`--img2img`, or by name with
# `--component`), so that a txt2img export stays as small as it is.
IMG2IMG_COMPONENTS = ("vae_encoder",)

MANIFEST_NAME = "manifest.json"  # graphs/<model>/manifest.json
GRAPH_NAME = "model.onnx"  # graphs/<model>/<component>/model.onnx
DATA_SUFFIX = ".data"  # its external data, when the weights exceed protobuf's 2 GB: model.onnx.data
PARITY_NAME = "parity.npz"  # beside model.onnx: the sample feed and torch's outputs recorded at export
WEIGHT_MAP_NAME = "weight_map.json"  # beside the denoiser's model.onnx: each parameter's initializer (export/weight_map.py)

__all__ = ["DATA_SUFFIX", "FAMILIES", "GAG_INPUTS", "GRAPH_NAME", "IMG2IMG_COMPONENTS", "MANIFEST_NAME", "PARITY_NAME",
           "PER_LAYER_GAG_INPUTS", "WEIGHT_MAP_NAME"]
