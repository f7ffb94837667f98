"""A stand-in for Triton's Python backend (`triton_python_backend_utils`) that runs a generated
repository's Python models in this process, with the shape rules of Triton's core.

`FakeTriton(repo)` loads every Python model of a repository (`StandinModel`s, `SamplerModel`) the
way the backend does (`initialize(args)` with the model config as JSON), and serves BLS calls
(`pb_utils.InferenceRequest(...).exec()`) between them. Each request is checked against the
callee's config like Triton's core does: a model with `max_batch_size > 0` takes `[batch] + dims`
(batch <= max_batch_size), one without takes `dims`, -1 matches any size, and `reshape` replaces
the non-batch dims before the model sees the tensor. Ensembles are not modelled; `pipeline` is
checked structurally by test_triton_repo.py.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format

TRITON_NUMPY = {
    "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
    "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_, "TYPE_STRING": np.object_,
}


def load_config(path: Path):
    """A config.pbtxt parsed into tritonclient's `ModelConfig` (raises on any unknown field)."""
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def config_json(config) -> dict:
    """The config as the JSON the Python backend hands to `initialize` (`args["model_config"]`)."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


class TritonError(Exception):
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, msg, code=None):
        super().__init__(msg)
        self.msg = msg
        self.code = code

    def message(self):
        return self.msg


class Tensor:
    def __init__(self, name, array):
        self._name = name
        self._array = np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors = list(output_tensors)
        self._error = error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class Request:
    def __init__(self, inputs):
        self._inputs = list(inputs)

    def inputs(self):
        return self._inputs


def _matches(shape, dims) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


class FakeTriton:
    """The Python models of one repository, loaded in this process, calling each other through BLS."""

    def __init__(self, repo: Path, names=None):
        self.repo = Path(repo)
        self.configs = {p.parent.name: load_config(p) for p in sorted(self.repo.glob("*/config.pbtxt"))}
        self.calls: list[tuple[str, dict]] = []  # (model, {input: shape as sent})
        self.pb = self._module()
        self.models = {}
        for name, config in self.configs.items():
            if config.backend != "python" or (names is not None and name not in names):
                continue
            model = self._instantiate(name)
            model.initialize({
                "model_config": json.dumps(config_json(config)), "model_repository": str(self.repo / name),
                "model_version": "1", "model_name": name, "model_instance_kind": "CPU",
                "model_instance_name": f"{name}_0", "model_instance_device_id": "0",
            })
            self.models[name] = model

    def _instantiate(self, name):
        source = (self.repo / name / "1" / "model.py").read_text()
        cls = "SamplerModel" if "SamplerModel" in source else "StandinModel" if "StandinModel" in source else "EngineModel"
        from gag_export.serving import pymodels

        return type("TritonPythonModel", (getattr(pymodels, cls),), {"pb_utils": self.pb})()

    def _module(self):
        triton = self
        pb = types.SimpleNamespace(Tensor=Tensor, InferenceResponse=InferenceResponse, TritonError=TritonError)

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name = model_name
                self.requested = list(requested_output_names)
                self.inputs = list(inputs)

            def exec(self):
                return triton.call(self.model_name, self.inputs, self.requested)

        pb.InferenceRequest = InferenceRequest
        pb.get_input_tensor_by_name = lambda request, name: next((t for t in request.inputs() if t.name() == name), None)
        pb.get_output_tensor_by_name = lambda response, name: next(
            (t for t in response.output_tensors if t.name() == name), None)
        return pb

    def _check(self, config, tensor_config, array: np.ndarray, where: str) -> np.ndarray:
        """What Triton's core does to one tensor: check its shape against the config, apply reshape."""
        dims = list(tensor_config.dims)
        shape = list(array.shape)
        if config.max_batch_size > 0:
            if not shape or not 1 <= shape[0] <= config.max_batch_size or not _matches(shape[1:], dims):
                raise AssertionError(f"{where}: shape {shape} does not fit [1..{config.max_batch_size}] + {dims}")
            if tensor_config.HasField("reshape"):
                return array.reshape([shape[0], *tensor_config.reshape.shape])
            return array
        if not _matches(shape, dims):
            raise AssertionError(f"{where}: shape {shape} does not fit {dims}")
        if tensor_config.HasField("reshape"):
            return array.reshape(list(tensor_config.reshape.shape))
        return array

    def call(self, model_name: str, tensors, requested=None) -> InferenceResponse:
        config = self.configs[model_name]
        declared = {i.name: i for i in config.input}
        self.calls.append((model_name, {t.name(): tuple(t.as_numpy().shape) for t in tensors}))
        seen = set()
        checked = []
        for t in tensors:
            spec = declared.get(t.name())
            if spec is None:
                return InferenceResponse(error=TritonError(f"unexpected input {t.name()!r} for {model_name}"))
            expected = np.dtype(TRITON_NUMPY[_type_name(spec.data_type)])
            if t.as_numpy().dtype != expected:
                return InferenceResponse(error=TritonError(f"{model_name}.{t.name()}: dtype {t.as_numpy().dtype}, "
                                                           f"the config says {expected}"))
            checked.append(Tensor(t.name(), self._check(config, spec, t.as_numpy(), f"{model_name}.{t.name()}")))
            seen.add(t.name())
        missing = {name for name, spec in declared.items() if not spec.optional} - seen  # `optional: true` may be left out
        if missing:
            return InferenceResponse(error=TritonError(f"{model_name}: missing inputs {sorted(missing)}"))
        response = self.models[model_name].execute([Request(checked)])[0]
        if not response.has_error():
            outputs = {o.name: o for o in config.output}
            for t in response.output_tensors:
                self._check(config, outputs[t.name()], np.asarray(t.as_numpy()).reshape(
                    _unreshaped(config, outputs[t.name()], t.as_numpy())), f"{model_name} output {t.name()}")
        return response

    def pipeline(self, **values) -> InferenceResponse:
        """A `pipeline` request (what the ensemble forwards to `sampler`), values as in the client."""
        tensors = [Tensor(name, np.asarray(value)) for name, value in values.items()]
        return self.call("sampler", tensors)

    def finalize(self) -> None:
        for model in self.models.values():
            model.finalize()


def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def _unreshaped(config, output_config, array):
    """The shape a client would see for a model output (reshape undone)."""
    shape = list(np.asarray(array).shape)
    if not output_config.HasField("reshape"):
        return shape
    dims = list(output_config.dims)
    return [shape[0], *dims] if config.max_batch_size > 0 else dims


PROMPT = "a photo of a cat sitting on a wooden table"


def request_values(prompt=PROMPT, seed=1, steps=4, scale=10.0, eta=15.0, zeta=0.0):
    """Input arrays of one pipeline request, as a client sends them (Triton shape [1] each)."""
    return {
        "prompt": np.array([prompt.encode("utf-8") if isinstance(prompt, str) else prompt], dtype=np.object_),
        "seed": np.array([seed], dtype=np.int64),
        "steps": np.array([steps], dtype=np.int32),
        "gag_scale": np.array([scale], dtype=np.float32),
        "gag_eta": np.array([eta], dtype=np.float32),
        "gag_zeta": np.array([zeta], dtype=np.float32),
    }
