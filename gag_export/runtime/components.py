"""One small interface over three ways of running an exported component: torch, ONNX Runtime, TensorRT.

Run side. A `Component` runs one graph (text encoder, denoiser or VAE decoder) by name with
numpy or torch inputs and returns numpy outputs that the caller owns (copied out of any reused
buffer). Like a Polygraphy runner it is activated once (session, engine and context, buffers)
and then called many times, also as a context manager:

    components = load_components("tiny-sdxl", "ort", graphs=Path("graphs"))
    with components:
        out = components["unet"].infer({"sample": x, "timestep": t, ...})   # {"latent": ndarray}

Backends:
- `torch`: the GAG-rewritten eager component, through the descriptor's `export_module` so torch and
  the graphs share one I/O contract; optional `torch.compile`.
- `ort`: an `onnxruntime.InferenceSession` per graph, session options set once; the CUDA (or, when
  asked for, TensorRT) execution provider where onnxruntime-gpu offers it, else the CPU.
- `tensorrt`: a cached, validated engine (`artifacts.engines`), tensors bound by name, device buffers
  allocated once per input shape, `execute_async_v3` on a CUDA stream, optionally the denoiser
  step captured in a CUDA graph and replayed.
- `tensorrt-rtx`: the same for a TensorRT-RTX engine (built ahead of time, on any machine), whose
  JIT specialises it for this GPU on first use and keeps the result in a runtime cache beside the
  engine; CUDA graphs are TensorRT-RTX's own (`CudaGraphStrategy.WHOLE_GRAPH_CAPTURE`). It needs
  an NVIDIA RTX GPU (Ampere or newer) and driver.

Feeds are checked before they reach a backend: every input present, no unknown names, ranks and
static dims as declared; values are cast to the declared dtype.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..arrays import to_torch
from ..artifacts.manifest import Manifest
from ..core.errors import (
    ArtifactError,
    GagExportError,
    InvalidInputError,
    MissingDependencyError,
)
from ..models.base import TensorSpec

BACKENDS = ("torch", "ort", "tensorrt", "tensorrt-rtx")
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")  # the backends that run engines (core.tensorrt.FLAVORS)


def parse_backend(name: str) -> str:
    """The backend name, or `InvalidInputError` listing the known ones."""
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return value


@dataclass(frozen=True)
class BackendOptions:
    """How components are run; each field matters to one backend only.

    device: torch backend device ("auto": CUDA when available, else CPU).
    compile: torch backend, wrap each module in `torch.compile`.
    ort_providers: ONNX Runtime execution providers in order (empty: CUDA if present, else CPU).
    threads: ONNX Runtime intra-op threads (0: its default).
    cuda_graph: TensorRT backends, capture the denoiser's step in a CUDA graph and replay it.
    loras: torch backend, `models.lora.LoraSpec`s fused into the denoiser before GAG (the graphs
        of the other backends carry the LoRAs they were exported with).
    """

    device: str = "auto"
    compile: bool = False
    ort_providers: tuple[str, ...] = ()
    threads: int = 0
    cuda_graph: bool = False
    loras: tuple = ()

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidInputError(f"BackendOptions.device: use auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidInputError(f"BackendOptions.threads: must be an integer >= 0, got {self.threads!r}")
        object.__setattr__(self, "ort_providers", tuple(self.ort_providers))
        object.__setattr__(self, "loras", tuple(self.loras))

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError(f"device {self.device!r} asked for, but torch sees no CUDA GPU here")
        return torch.device(self.device)


def spec_from_manifest(entry: Mapping) -> TensorSpec:
    """A manifest I/O entry (`{"name", "dtype", "shape"}`) as a TensorSpec."""
    try:
        return TensorSpec(entry["name"], entry["dtype"], tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest I/O entry {entry!r} is unreadable ({exc}): re-export the model") from None


def as_tensor(value: Any) -> torch.Tensor:
    """A numpy array (bfloat16 included), torch tensor or Python number as a torch tensor (no copy if avoidable)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf" and value.flags.c_contiguous:
            return torch.from_numpy(value)  # 0-d stays 0-d (np.ascontiguousarray would make it 1-d)
        return to_torch(value)
    return torch.as_tensor(value)


class Component(abc.ABC):
    """One graph of a model behind `infer(feed) -> {output name: ndarray}`.

    Subclasses implement `_activate`, `_deactivate` and `_infer` (which receives the checked
    feed as torch tensors of the declared dtypes, in `input_names` order).
    """

    backend: ClassVar[str] = ""

    def __init__(self, name: str, role: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.name = name
        self.role = role
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._specs = {spec.name: spec for spec in self.inputs}
        self.is_active = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, role={self.role!r}, active={self.is_active})"

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input_spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise InvalidInputError(f"{self.name} has no input {name!r}; its inputs are {self.input_names}") from None

    def activate(self) -> "Component":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Component":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
        """Run the component once; the returned arrays belong to the caller."""
        if not self.is_active:
            raise GagExportError(f"{self.backend} component {self.name!r} is not active: call activate() first")
        return self._infer(self.check_feed(feed))

    def check_feed(self, feed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The feed as torch tensors of the declared dtypes, or InvalidInputError naming the problem."""
        missing = [name for name in self.input_names if name not in feed]
        unknown = sorted(set(feed) - set(self.input_names))
        if missing or unknown:
            parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
            raise InvalidInputError(f"{self.name}: feed has {' and '.join(parts)} inputs; expected {self.input_names}")
        checked = {}
        for spec in self.inputs:
            tensor = as_tensor(feed[spec.name])
            if tensor.numel() == 1 and all(dim == 1 for dim in spec.shape) and tensor.dim() != len(spec.shape):
                tensor = tensor.reshape(spec.shape)  # a scalar fed to a 0-d or [1] input, either way round
            if tensor.dim() != len(spec.shape) or any(
                isinstance(dim, int) and dim != got for dim, got in zip(spec.shape, tensor.shape)
            ):
                raise InvalidInputError(
                    f"{self.name}: input {spec.name!r} has shape {list(tensor.shape)}, the graph takes {list(spec.shape)}"
                )
            checked[spec.name] = tensor.to(spec.torch_dtype)
        return checked

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...


class ComponentSet:
    """The components of one model on one backend, by name, activated and deactivated together.

    `manifest` is the export's manifest (None for a torch set built without graphs); `pipe` the
    diffusers pipeline a torch set runs (None otherwise).
    """

    def __init__(self, model: str, backend: str, components: Mapping[str, Component], manifest: Manifest | None = None,
                 pipe: Any = None, gag: Any = None):
        self.model = model
        self.backend = backend
        self.components = dict(components)
        self.manifest = manifest
        self.pipe = pipe
        self.gag = gag  # the GAGConfig the denoiser was rewritten with, or None

    def __getitem__(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            raise ArtifactError(
                f"{self.model} has no component {name!r} on {self.backend} (it has {sorted(self.components)}); re-export it"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.components

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components.values())

    def by_role(self, role: str) -> list[Component]:
        return [c for c in self.components.values() if c.role == role]

    @property
    def denoiser(self) -> Component:
        found = self.by_role("denoiser")
        if len(found) != 1:
            raise ArtifactError(f"{self.model}: expected one denoiser, found {[c.name for c in found]}; re-export it")
        return found[0]

    @property
    def has_gag_inputs(self) -> bool:
        return "gag_scale" in self.denoiser.input_names

    def activate(self) -> "ComponentSet":
        done = []
        try:
            for component in self.components.values():
                component.activate()
                done.append(component)
        except BaseException:
            for component in done:
                component.deactivate()
            raise
        return self

    def deactivate(self) -> None:
        for component in self.components.values():
            component.deactivate()

    def __enter__(self) -> "ComponentSet":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()


__all__ = ["BACKENDS", "ENGINE_BACKENDS", "BackendOptions", "Component", "ComponentSet", "as_tensor", "parse_backend",
           "spec_from_manifest"]
