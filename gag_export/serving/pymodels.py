"""The Python-backend models of a generated repository: the sampler and the CPU stand-ins.

Each `<model>/1/model.py` in the repository is a three-line shim that hands Triton's
`triton_python_backend_utils` module to a class here:

    import triton_python_backend_utils as pb_utils
    from gag_export.serving.pymodels import SamplerModel
    class TritonPythonModel(SamplerModel):
        pb_utils = pb_utils

so the logic lives in the package (tested without a server, through a fake `pb_utils`) and a
repository needs no code of its own.

- `SamplerModel` runs `gag_export.runtime.Sampler`, the same loop as `gag-export generate`, over a
  `ComponentSet` whose components are `TritonComponent`s: each `infer` is a business-logic-scripting
  call (`pb_utils.InferenceRequest(...).exec()`) to the component's own Triton model (a TensorRT
  plan, an ONNX model, or a stand-in). Requests are checked first (`requests.parse_request`); a bad
  one gets a Triton error response and the model goes on serving.
- `StandinModel` runs one exported ONNX graph with ONNX Runtime on the CPU (`OrtComponent`), with
  the graph's inputs and outputs: what `--cpu-standin` puts in place of each engine.

Everything the sampler needs besides the component models is in its version folder: the export's
`manifest.json`, the tokenizers and the scheduler config (`assets/`), written by `repository.py`.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..arrays import to_numpy
from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError, GagExportError, InvalidInputError
from ..core.names import PER_LAYER_GAG_INPUTS
from ..models.base import TensorSpec
from ..runtime.components import Component, ComponentSet, spec_from_manifest
from ..runtime.ort_backend import OrtComponent
from ..runtime.sampler import Sampler, SamplerAssets
from .protocol import IMAGE_OUTPUT
from .requests import RequestLimits, parse_request

log = logging.getLogger(__name__)

ASSETS_DIR = "assets"
TOKENIZERS_FILE = "tokenizers.json"
SCHEDULER_FILE = "scheduler_config.json"


def model_parameters(model_config: Mapping) -> dict[str, str]:
    """`parameters { key: ... value { string_value: ... } }` of a Triton model config (as JSON) as a dict."""
    return {key: value.get("string_value", "") for key, value in (model_config.get("parameters") or {}).items()}


# --------------------------------------------------------------------------------------------
# Sampler assets: tokenizers and scheduler config, saved beside the sampler model
# --------------------------------------------------------------------------------------------


def save_assets(assets: SamplerAssets, folder: Path) -> None:
    """Write tokenizers (`save_pretrained`) and the scheduler config (JSON) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = {}
    for component, tokenizer in assets.tokenizers.items():
        if tokenizer is None:
            continue
        tokenizer.save_pretrained(folder / "tokenizers" / component)
        classes[component] = type(tokenizer).__name__
    (folder / TOKENIZERS_FILE).write_text(json.dumps(classes, indent=2, sort_keys=True) + "\n")
    config = {key: value for key, value in dict(assets.scheduler_config).items()}
    (folder / SCHEDULER_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def load_saved_assets(folder: Path) -> SamplerAssets:
    """The `SamplerAssets` that `save_assets` wrote (tokenizer classes by name from transformers)."""
    import transformers  # noqa: PLC0415

    try:
        classes = json.loads((folder / TOKENIZERS_FILE).read_text())
        scheduler_config = json.loads((folder / SCHEDULER_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"sampler assets in {folder} are missing or unreadable ({exc}); regenerate the repository "
                            "(`gag-export triton`)") from None
    tokenizers = {}
    for component, class_name in classes.items():
        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ArtifactError(f"tokenizer class {class_name} (for {component}) is not in transformers "
                                f"{transformers.__version__}; regenerate the repository with this version")
        tokenizers[component] = cls.from_pretrained(str(folder / "tokenizers" / component))
    return SamplerAssets(tokenizers, scheduler_config)


# --------------------------------------------------------------------------------------------
# One component behind a Triton model, called through business-logic scripting
# --------------------------------------------------------------------------------------------


class TritonComponent(Component):
    """A component served as its own Triton model; `infer` is one BLS request to it.

    `max_batch_size` is the target model's: with batching, Triton counts the first dim of every
    tensor as the batch, so a 0-d graph input (`gag_scale`) travels as [1, 1] instead of [1].
    """

    backend = "triton"

    def __init__(self, name: str, role: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], pb_utils,
                 model_name: str | None = None, max_batch_size: int = 0):
        super().__init__(name, role, inputs, outputs)
        self.pb_utils = pb_utils
        self.model_name = model_name or name
        self.max_batch_size = int(max_batch_size)

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def _wire(self, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        """The request shape Triton expects for a graph input (see `repository.tensor_config`)."""
        if self.max_batch_size > 0 and spec.name in PER_LAYER_GAG_INPUTS and spec.shape:
            return np.ascontiguousarray(array.reshape(1, -1))  # [L] -> [batch 1, L]
        if self.max_batch_size > 0 and len(spec.shape) <= 1:
            return np.ascontiguousarray(array.reshape(-1, 1))  # [batch] or 0-d -> [batch, 1]
        if len(spec.shape) == 0:
            return array.reshape(1)
        return np.ascontiguousarray(array)

    @staticmethod
    def _unwire(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        """A response tensor back in the graph's rank ([1] -> 0-d, [batch, 1] -> [batch])."""
        if len(spec.shape) == 0:
            return array.reshape(())
        if array.ndim == len(spec.shape) + 1 and array.shape[-1] == 1:
            return array.reshape(array.shape[:-1])
        return array

    def _infer(self, feed):
        pb = self.pb_utils
        tensors = [pb.Tensor(name, self._wire(self.input_spec(name), to_numpy(feed[name]))) for name in self.input_names]
        request = pb.InferenceRequest(model_name=self.model_name, requested_output_names=self.output_names,
                                      inputs=tensors)
        response = request.exec()
        if response.has_error():
            raise GagExportError(f"Triton model {self.model_name!r} failed: {response.error().message()}")
        outputs = {}
        for spec in self.outputs:
            tensor = pb.get_output_tensor_by_name(response, spec.name)
            if tensor is None:
                raise ArtifactError(f"Triton model {self.model_name!r} returned no output {spec.name!r}")
            outputs[spec.name] = self._unwire(spec, _host_copy(tensor))
        return outputs


def _host_copy(tensor) -> np.ndarray:
    """A numpy copy of a pb_utils tensor (CPU or GPU memory); the response's buffer is not ours to keep."""
    if hasattr(tensor, "is_cpu") and not tensor.is_cpu():
        import torch  # noqa: PLC0415

        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu().numpy()
    return np.array(tensor.as_numpy(), copy=True)


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


ComponentFactory = Callable[[str, str, list, list, Mapping[str, Any]], Component]


class SamplerService:
    """A `Sampler` over served components plus the request limits: values in, uint8 HxWx3 image out."""

    def __init__(self, sampler: Sampler, limits: RequestLimits):
        self.sampler = sampler
        self.limits = limits
        self.gag = sampler.components.has_gag_inputs
        self.img2img = bool(sampler.components.by_role("vae_encoder"))  # an `--img2img` export

    @classmethod
    def load(cls, folder: Path, parameters: Mapping[str, str], make_component: ComponentFactory) -> "SamplerService":
        """From a sampler version folder (manifest.json + assets/) and its config parameters.

        `make_component(name, role, inputs, outputs, wiring)` builds each component; `wiring` is the
        parameter `components` entry for it (`{"model": ..., "max_batch_size": ...}`).
        """
        from ..models import descriptors_for, manifest_entry  # noqa: PLC0415

        folder = Path(folder)
        manifest = Manifest.load(folder)
        try:
            wiring = json.loads(parameters["components"])
        except (KeyError, ValueError) as exc:
            raise ArtifactError(f"sampler config has no readable 'components' parameter ({exc}); regenerate the repository")
        entry = manifest_entry(manifest.data)
        components = {}
        for name, item in manifest.components.items():
            if name not in wiring:
                raise ArtifactError(f"sampler config names no Triton model for component {name!r}; regenerate the repository")
            inputs = [spec_from_manifest(e) for e in item["inputs"]]
            outputs = [spec_from_manifest(e) for e in item["outputs"]]
            components[name] = make_component(name, item["role"], inputs, outputs, wiring[name])
        component_set = ComponentSet(manifest.model, "triton", components, manifest=manifest, gag=manifest.gag)
        assets = load_saved_assets(folder / ASSETS_DIR)
        descriptors = {d.name: d for d in descriptors_for(entry, img2img=True)}
        sampler = Sampler(entry, component_set, assets, descriptors)
        limits = RequestLimits.from_parameters(parameters) if "limit_min_steps" in parameters else RequestLimits.for_entry(entry)
        return cls(sampler.__enter__(), limits)

    def generate(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The image for one request's input arrays (InvalidInputError for a bad request)."""
        config = parse_request(values, self.limits, self.gag, self.img2img, self.sampler.entry.name)
        result = self.sampler.generate(config)  # img2img: the same path as `generate --image`
        return np.ascontiguousarray(np.asarray(result.image.convert("RGB"), dtype=np.uint8))

    def close(self) -> None:
        self.sampler.__exit__(None, None, None)


def _error_response(pb, exc: BaseException, invalid: bool):
    error_cls = pb.TritonError
    code = getattr(error_cls, "INVALID_ARG" if invalid else "INTERNAL", None)
    message = str(exc) if invalid or isinstance(exc, GagExportError) else f"internal error: {type(exc).__name__}: {exc}"
    error = error_cls(message, code) if code is not None else error_cls(message)
    return pb.InferenceResponse(output_tensors=[], error=error)


def _request_values(pb, request) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


class _PythonModel:
    pb_utils: Any = None  # the shim sets triton_python_backend_utils here

    def _log(self, level: str, message: str) -> None:
        logger = getattr(self.pb_utils, "Logger", None)
        if logger is not None:
            getattr(logger, f"log_{level}")(message)
        else:
            getattr(log, "warning" if level == "warn" else level)(message)

    def _respond(self, requests, run: Callable[[Any], Any]) -> list:
        pb = self.pb_utils
        responses = []
        for request in requests:
            try:
                responses.append(run(request))
            except InvalidInputError as exc:
                responses.append(_error_response(pb, exc, invalid=True))
            except Exception as exc:  # noqa: BLE001 - one failed request must not stop the model
                self._log("error", "".join(traceback.format_exception(exc)))
                responses.append(_error_response(pb, exc, invalid=False))
        return responses


class SamplerModel(_PythonModel):
    """Triton Python model `sampler`: request values -> `Sampler.generate` over BLS components -> image."""

    def initialize(self, args: Mapping[str, str]) -> None:
        import torch  # noqa: PLC0415

        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        torch.set_num_threads(max(1, int(parameters.get("torch_threads", "1"))))
        folder = Path(args["model_repository"]) / str(args["model_version"])
        pb = self.pb_utils

        def make(name, role, inputs, outputs, wiring):
            return TritonComponent(name, role, inputs, outputs, pb, model_name=wiring.get("model", name),
                                   max_batch_size=int(wiring.get("max_batch_size", 0)))

        self.service = SamplerService.load(folder, parameters, make)
        self._log("info", f"sampler for {self.service.sampler.entry.name} ready; limits: {self.service.limits.describe()}")

    def execute(self, requests):
        pb = self.pb_utils

        def run(request):
            image = self.service.generate(_request_values(pb, request))
            return pb.InferenceResponse(output_tensors=[pb.Tensor(IMAGE_OUTPUT, image)])

        return self._respond(requests, run)

    def finalize(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


class _GraphModel(_PythonModel):
    """A Python model running one exported graph: `_component(config, parameters, folder, args)` builds it."""

    def initialize(self, args: Mapping[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        folder = Path(args["model_repository"]) / str(args["model_version"])
        try:
            io = json.loads(parameters["graph_io"])
        except (KeyError, ValueError) as exc:
            raise ArtifactError(f"model {config.get('name')!r} has no readable 'graph_io' parameter ({exc})") from None
        inputs = [spec_from_manifest(e) for e in io["inputs"]]
        outputs = [spec_from_manifest(e) for e in io["outputs"]]
        self.component = self._component(config["name"], io, inputs, outputs, parameters, folder, args).activate()

    def _component(self, name, io, inputs, outputs, parameters, folder, args) -> Component:
        raise NotImplementedError

    def execute(self, requests):
        pb = self.pb_utils
        component = self.component

        def run(request):
            feed = {}
            for name in component.input_names:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise InvalidInputError(f"{component.name}: request has no input {name!r}")
                feed[name] = tensor.as_numpy()
                if name in PER_LAYER_GAG_INPUTS and feed[name].ndim == 2 and len(feed[name]) == 1:
                    feed[name] = feed[name][0]  # [1, L] from a batching config (TritonComponent._wire) -> [L]
            outputs = component.infer(feed)
            return pb.InferenceResponse(output_tensors=[
                pb.Tensor(spec.name, np.ascontiguousarray(outputs[spec.name])) for spec in component.outputs
            ])

        return self._respond(requests, run)

    def finalize(self) -> None:
        component = getattr(self, "component", None)
        if component is not None:
            component.deactivate()


class StandinModel(_GraphModel):
    """Triton Python model standing in for one engine: the exported ONNX graph on ONNX Runtime (CPU)."""

    def _component(self, name, io, inputs, outputs, parameters, folder, args):
        return OrtComponent(name, io["role"], inputs, outputs, path=folder / parameters.get("onnx_file", "model.onnx"),
                            providers=("CPUExecutionProvider",), threads=int(parameters.get("threads", "0")))


class EngineModel(_GraphModel):
    """Triton Python model running a plan with gag-export's runtime on the instance's GPU: a TensorRT
    plan whose I/O Triton's TensorRT backend cannot declare (0-d tensors), or a TensorRT-RTX plan,
    which that backend cannot load (the `flavor` parameter). The version folder holds one plan per
    GPU architecture, or per set of TensorRT-RTX targets (`model.sm<...>.plan` + sidecar); the one
    for this GPU is loaded and validated (builder version, GPU, graph sha256) like
    `gag-export generate --backend tensorrt` does."""

    def _component(self, name, io, inputs, outputs, parameters, folder, args):
        import torch  # noqa: PLC0415

        from ..artifacts.engines import RuntimeTarget  # noqa: PLC0415
        from ..core.tensorrt import (  # noqa: PLC0415
            get_flavor,
            parse_sm_tag,
            trt_features,  # noqa: PLC0415
        )
        from ..runtime.tensorrt_backend import TensorRTComponent, TensorRTRtxComponent  # noqa: PLC0415

        flavor = get_flavor(parameters.get("flavor", "tensorrt"))
        device = int(args.get("model_instance_device_id") or 0)
        if torch.cuda.is_available():
            torch.cuda.set_device(device)
        target = RuntimeTarget.current(trt_features(flavor), device)
        plans = [p for p in sorted(folder.glob("model.sm*.plan"))
                 if set(target.capabilities) <= set(parse_sm_tag(p.name.split(".")[1]))]
        if not plans:
            built = sorted(p.name for p in folder.glob("model.sm*.plan"))
            raise ArtifactError(f"{name}: no {flavor.label} plan for this GPU ({target.gpu_name}, {target.sm_tag}) in {folder}; "
                                f"it has {built}: build one for it (`gag-export engine`) and regenerate the repository")
        component = TensorRTRtxComponent if flavor.ahead_of_time else TensorRTComponent
        return component(name, io["role"], inputs, outputs, plan_path=plans[0], target=target,
                         onnx_sha256=io.get("sha256"), device=device)
