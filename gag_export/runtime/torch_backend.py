"""The torch backend: the GAG-rewritten eager component, through the descriptor's `export_module`
(torch and the graphs share one I/O contract); optional `torch.compile`."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from ..arrays import to_numpy
from ..core.gag_config import DEFAULT_EXPORT_GAG
from .components import BackendOptions, Component, ComponentSet
from .exports import entry_for, load_manifest_for

log = logging.getLogger(__name__)


class TorchComponent(Component):
    """An eager (optionally compiled) module whose forward takes the graph inputs in order.

    On CUDA it runs with TF32 off for matmuls and cuDNN convolutions alike (torch's default
    leaves it on for convolutions): fp32 weights compute in fp32, as on the ONNX Runtime and
    TensorRT backends, so backends compared side by side do the same math.
    """

    backend = "torch"

    def __init__(self, name, role, inputs, outputs, module: torch.nn.Module, device: torch.device | str = "cpu",
                 compile: bool = False):
        super().__init__(name, role, inputs, outputs)
        self.module = module
        self.device = torch.device(device)
        self.compile = compile
        self._call = None

    def _activate(self) -> None:
        self.module.to(self.device).eval()
        self._call = torch.compile(self.module) if self.compile else self.module

    def _deactivate(self) -> None:
        self._call = None

    def _infer(self, feed):
        args = [feed[name].to(self.device) for name in self.input_names]
        with torch.inference_mode(), no_tf32(self.device.type == "cuda"):
            outputs = self._call(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        # .cpu() copies from a GPU; on the CPU the outputs are fresh tensors of this call.
        return {name: to_numpy(out) for name, out in zip(self.output_names, outputs)}


@contextlib.contextmanager
def no_tf32(active: bool) -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (the flags are global)."""
    if not active:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def torch_runtime_gag(config):
    """The GAG config the torch backend runs: the graph's values with method "auto".

    The manifest's method ("bisect" or "sort") describes the exported graph. Running the model in
    PyTorch, "auto" gives the same function (the methods agree to fp32 rounding) at the device's
    best speed: the fused Triton kernel on CUDA where it fits, else bisect.
    """
    return None if config is None else replace(config, method="auto")


def load_torch_components(model: str, graphs_root: Path, options: BackendOptions) -> ComponentSet:
    from ..models import denoiser_module, load_pipeline  # noqa: PLC0415
    from ..models.lora import fuse_loras  # noqa: PLC0415

    manifest = None
    if (graphs_root / model / "manifest.json").is_file():
        manifest = load_manifest_for(model, graphs_root)
    entry = entry_for(model, manifest)
    gag = torch_runtime_gag(manifest.gag if manifest is not None else DEFAULT_EXPORT_GAG)
    weights = manifest.data.get("weights") if manifest is not None else None
    pipe = load_pipeline(entry, weights=weights) if weights else load_pipeline(entry)
    records = fuse_loras(denoiser_module(pipe), options.loras, entry.family)  # before GAG, as at export
    exported = manifest.loras if manifest is not None else []
    if exported and [(r["sha256"], r["scale"]) for r in exported] != [(r["sha256"], r["scale"]) for r in records]:
        log.warning("%s was exported with LoRAs %s; the torch backend fuses only those given with --lora (%s)",
                    manifest.graphs_dir, ", ".join(f"{r['name']}:{r['scale']:g}" for r in exported),
                    ", ".join(f"{r['name']}:{r['scale']:g}" for r in records) or "none")
    return torch_component_set(entry, pipe, gag, options, manifest=manifest, name=model)


def torch_component_set(entry, pipe, gag, options: BackendOptions, manifest=None, name: str | None = None) -> ComponentSet:
    """Torch components over a loaded fp32 pipeline, its denoiser rewritten with the GAGConfig `gag`
    (None: left as it is, with no GAG inputs)."""
    from ..gag.attention import apply_gag  # noqa: PLC0415
    from ..models import denoiser_module, descriptors_for  # noqa: PLC0415

    layers = apply_gag(denoiser_module(pipe), gag) if gag is not None else []
    device = options.torch_device()
    components = {}
    for descriptor in descriptors_for(entry, pipe, img2img=True):  # the encoder is the pipeline's VAE: always at hand
        has_gag = gag is not None and descriptor.role == "denoiser"
        if has_gag:  # per-layer gag_scale/gag_eta, as a graph exported now takes them
            descriptor = replace(descriptor, gag_layers=len(layers))
        components[descriptor.name] = TorchComponent(
            descriptor.name, descriptor.role, descriptor.inputs("fp32", has_gag), descriptor.outputs("fp32", has_gag),
            module=descriptor.export_module(pipe), device=device, compile=options.compile,
        )
    return ComponentSet(name or entry.name, "torch", components, manifest=manifest, pipe=pipe, gag=gag)


__all__ = ["TorchComponent", "load_torch_components", "no_tf32", "torch_component_set", "torch_runtime_gag"]
