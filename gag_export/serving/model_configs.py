"""The config.pbtxt of every model of a generated Triton repository, as plain dicts (`pbtxt` writes them).

What a repository holds is decided here: each component's kind (plan, ONNX, a Python model running an
engine, or a CPU stand-in), its tensors, batching and instance groups, and the sampler and pipeline
models' signatures. `repository` writes the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from ..artifacts.manifest import Manifest
from ..core.errors import ArtifactError, InvalidInputError
from ..core.names import GAG_INPUTS, PER_LAYER_GAG_INPUTS
from .pbtxt import Token
from .protocol import (IMAGE_OUTPUT, IMG2IMG_INPUTS, PER_LAYER_REQUEST_INPUTS, PIPELINE, REQUEST_INPUTS, SAMPLER,
                       SCHEDULE_INPUTS)
from .requests import RequestLimits

TRITON_BACKENDS = ("plan", "onnx", "tensorrt-rtx")
PLATFORMS = {"plan": "tensorrt_plan", "onnx": "onnxruntime_onnx"}
MODEL_FILES = {"plan": "model.plan", "onnx": "model.onnx"}
TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING",
}


@dataclass(frozen=True)
class RepositoryOptions:
    """How the repository is laid out and scheduled.

    backend: component models as TensorRT plans ("plan", needs engines), ONNX ("onnx"), or TensorRT-RTX
        plans run by gag-export's runtime in Python models ("tensorrt-rtx", needs engines).
    cpu_standin: every component a Python model running its ONNX graph with ONNX Runtime on the
        CPU (KIND_CPU): the repository then loads on a machine without a GPU; `backend` is ignored.
    instances: instances of each component model per GPU (per machine for stand-ins).
    gpus: GPU ids for the component instance groups (empty: every GPU Triton sees).
    max_batch: the largest batch Triton may form for a batchable model (0: no batching anywhere).
    dynamic_batching: write `dynamic_batching` for models with max_batch_size > 0.
    max_queue_delay_us: how long the dynamic batcher waits for more requests.
    sampler_instances: sampler model instances (CPU processes running scheduler loops concurrently).
    standin_threads: ONNX Runtime intra-op threads per stand-in instance (0: ORT's default).
    torch_threads: torch threads per sampler instance (the scheduler math; tiny).
    max_prompt_chars: the longest prompt the pipeline accepts.
    """

    backend: str = "onnx"
    cpu_standin: bool = False
    instances: int = 1
    gpus: tuple[int, ...] = ()
    max_batch: int = 8
    dynamic_batching: bool = True
    max_queue_delay_us: int = 500
    sampler_instances: int = 2
    standin_threads: int = 1
    torch_threads: int = 1
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        if self.backend not in TRITON_BACKENDS:
            raise InvalidInputError(f"backend: use one of {', '.join(TRITON_BACKENDS)}, got {self.backend!r}")
        object.__setattr__(self, "gpus", tuple(self.gpus))
        for name, low in (("instances", 1), ("sampler_instances", 1), ("max_batch", 0), ("max_queue_delay_us", 0),
                          ("standin_threads", 0), ("torch_threads", 1), ("max_prompt_chars", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name}: must be an integer >= {low}, got {value!r}")
        if any(not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in self.gpus):
            raise InvalidInputError(f"gpus: GPU ids are integers >= 0, got {list(self.gpus)}")
        if len(set(self.gpus)) != len(self.gpus):
            raise InvalidInputError(f"gpus: each GPU once, got {list(self.gpus)}")

    @property
    def kind(self) -> str:
        return "standin" if self.cpu_standin else self.backend

    @property
    def flavor(self) -> str:
        """The builder whose plans the repository serves: TensorRT-RTX for backend tensorrt-rtx, else TensorRT."""
        return "tensorrt-rtx" if self.backend == "tensorrt-rtx" else "tensorrt"


# --------------------------------------------------------------------------------------------
# Config pieces
# --------------------------------------------------------------------------------------------


def triton_dtype(dtype: str) -> str:
    try:
        return TRITON_DTYPES[dtype]
    except KeyError:
        raise ArtifactError(f"no Triton data type for {dtype!r}") from None


def _dims(shape: list) -> list[int]:
    return [dim if isinstance(dim, int) else -1 for dim in shape]


def tensor_config(entry: Mapping, max_batch_size: int) -> dict:
    """One `input`/`output` block from a manifest I/O entry.

    Triton wants at least one dim: a 0-d tensor is `dims: [1]`; with batching, a tensor that is only
    the batch dim (`timestep` [batch]) is `dims: [1]` reshaped to `[]`, so the model sees [batch].
    """
    shape = list(entry["shape"])
    block: dict[str, Any] = {"name": entry["name"], "data_type": Token(triton_dtype(entry["dtype"]))}
    if entry["name"] in PER_LAYER_GAG_INPUTS and shape:  # [L], never batched: travels as [1, L] with batching
        block["dims"] = _dims(shape)
    elif max_batch_size > 0 and len(shape) <= 1:
        block.update(dims=[1], reshape={"shape": []})
    elif not shape:
        block["dims"] = [1]
    else:
        block["dims"] = _dims(shape[1:] if max_batch_size > 0 else shape)
    return block


def _parameters(values: Mapping[str, str]) -> list[dict]:
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]


def has_scalars(entry: Mapping) -> bool:
    return any(not t["shape"] for t in [*entry["inputs"], *entry["outputs"]])


def component_kind(entry: Mapping, options: RepositoryOptions) -> str:
    """How one component is served: "standin", "onnx", "plan", or "engine" (a plan with 0-d tensors,
    run by a Python model; see the module docstring)."""
    if options.cpu_standin:
        return "standin"
    if options.backend == "onnx":
        return "onnx"
    if options.backend == "tensorrt-rtx":
        return "engine"
    return "engine" if has_scalars(entry) else "plan"


def component_max_batch(entry: Mapping, kind: str, options: RepositoryOptions,
                        descriptor_shapes: Mapping[str, list]) -> int:
    """Triton's max_batch_size for one component (see the module docstring for the rules)."""
    if options.max_batch == 0 or kind == "engine":
        return 0
    tensors = [*entry["inputs"], *entry["outputs"]]
    if kind == "standin":
        # the descriptor says which axis is the batch, also in a static graph
        shaped = [t for t in tensors if t["shape"] and t["name"] not in PER_LAYER_REQUEST_INPUTS]
        if shaped and all(list(descriptor_shapes.get(t["name"], [None]))[:1] == ["batch"] for t in shaped):
            return options.max_batch
        return 0
    if has_scalars(entry) or not all(t["shape"][0] == "batch" for t in tensors):
        return 0
    profile_max = min((spec["max"][0] for spec in entry.get("profile", {}).values() if spec["max"]),
                      default=options.max_batch)
    return max(0, min(options.max_batch, int(profile_max)))


def _instance_group(options: RepositoryOptions, cpu: bool, count: int) -> list[dict]:
    group: dict[str, Any] = {"count": count, "kind": Token("KIND_CPU" if cpu else "KIND_GPU")}
    if not cpu and options.gpus:
        group["gpus"] = list(options.gpus)
    return [group]


def _scheduling(max_batch_size: int, options: RepositoryOptions) -> dict:
    if max_batch_size > 0 and options.dynamic_batching:
        return {"dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us}}
    return {}


def component_config(name: str, entry: Mapping, kind: str, options: RepositoryOptions, max_batch_size: int,
                     plan_files: Mapping[str, str] | None = None) -> dict:
    """The config of one component model."""
    config: dict[str, Any] = {"name": name}
    if kind in ("standin", "engine"):
        config["backend"] = "python"
    else:
        config["platform"] = PLATFORMS[kind]
    config["max_batch_size"] = max_batch_size
    config["input"] = [tensor_config(e, max_batch_size) for e in entry["inputs"]]
    config["output"] = [tensor_config(e, max_batch_size) for e in entry["outputs"]]
    config["instance_group"] = _instance_group(options, kind == "standin", options.instances)
    config.update(_scheduling(max_batch_size, options))
    if kind == "plan" and plan_files and len(plan_files) > 1:
        config["cc_model_filenames"] = [{"key": cc, "value": file} for cc, file in sorted(plan_files.items())]
    if kind in ("standin", "engine"):
        io = {"role": entry["role"], "sha256": entry["sha256"], "inputs": entry["inputs"], "outputs": entry["outputs"]}
        parameters = {"graph_io": json.dumps(io, separators=(",", ":"))}
        if kind == "engine":
            parameters["flavor"] = options.flavor
        if kind == "standin":
            parameters.update(onnx_file=MODEL_FILES["onnx"], threads=options.standin_threads)
        config["parameters"] = _parameters(parameters)
    return config


def request_inputs(gag: bool, img2img: bool = False) -> list[dict]:
    names = [n for n in REQUEST_INPUTS if gag or n not in GAG_INPUTS]
    inputs = [{"name": n, "data_type": Token(REQUEST_INPUTS[n]), "dims": [-1 if n in PER_LAYER_REQUEST_INPUTS else 1]}
              for n in names]
    if gag:  # optional: a request without them runs the same values at every step
        inputs += [{"name": n, "data_type": Token("TYPE_FP32"), "dims": [-1], "optional": True} for n in SCHEDULE_INPUTS]
    if img2img:  # optional: a request without them is text-to-image
        inputs += [{"name": n, "data_type": Token(kind), "dims": list(dims), "optional": True}
                   for n, (kind, dims) in IMG2IMG_INPUTS.items()]
    return inputs


def has_encoder(manifest: Manifest) -> bool:
    """Whether the export has the VAE encoder (`--img2img`), so the pipeline takes an input image."""
    return any(item.get("role") == "vae_encoder" for item in manifest.components.values())


def max_image_side(manifest: Manifest, default: int = 2048) -> int:
    """The largest side of an img2img input image: `default`, or for a dynamic export the largest
    height/width its encoder's profile covers (the image sets the size there; static graphs resize it)."""
    if not manifest.data.get("dynamic"):
        return default
    for item in manifest.components.values():
        if item.get("role") == "vae_encoder":
            top = (item.get("profile") or {}).get("image", {}).get("max")
            if top and len(top) == 4 and all(isinstance(d, int) for d in top[2:]):
                return max(1, min(int(top[2]), int(top[3])))
    return default


def image_output(manifest: Manifest) -> dict:
    if manifest.data.get("dynamic"):
        dims = [-1, -1, 3]
    else:
        shape = manifest.shape()
        dims = [shape.height, shape.width, 3]
    return {"name": IMAGE_OUTPUT, "data_type": Token("TYPE_UINT8"), "dims": dims}


def client_defaults(manifest: Manifest, entry) -> dict[str, str]:
    """What a client needs to fill a request: the model, its step range and default, GAG defaults."""
    gag = manifest.gag
    values = {
        "gag_export_model": manifest.model,
        "default_steps": str(entry.scheduler.default_steps),
        "min_steps": str(entry.scheduler.min_steps),
        "max_steps": str(entry.scheduler.max_steps),
    }
    if gag is not None:
        defaults = manifest.gag_defaults  # calibrated per-layer values: a JSON list
        values.update({f"default_gag_{key}": json.dumps(list(value)) if isinstance(value, tuple) else repr(float(value))
                       for key, value in defaults.items()}, default_gag_zeta=repr(float(gag.zeta)))
    return values


def sampler_config(manifest: Manifest, entry, options: RepositoryOptions, wiring: Mapping[str, dict]) -> dict:
    gag = manifest.gag is not None
    limits = RequestLimits.for_entry(entry, max_prompt_chars=options.max_prompt_chars,
                                     max_image_side=max_image_side(manifest))
    return {
        "name": SAMPLER,
        "backend": "python",
        "max_batch_size": 0,
        "input": request_inputs(gag, has_encoder(manifest)),
        "output": [image_output(manifest)],
        "instance_group": _instance_group(options, True, options.sampler_instances),
        "parameters": _parameters({
            "components": json.dumps(wiring, sort_keys=True, separators=(",", ":")),
            "torch_threads": options.torch_threads,
            **limits.to_parameters(),
            **client_defaults(manifest, entry),
        }),
    }


def pipeline_config(manifest: Manifest, entry) -> dict:
    gag = manifest.gag is not None
    inputs = request_inputs(gag, has_encoder(manifest))
    return {
        "name": PIPELINE,
        "platform": "ensemble",
        "max_batch_size": 0,
        "input": inputs,
        "output": [image_output(manifest)],
        "ensemble_scheduling": {"step": [{
            "model_name": SAMPLER,
            "model_version": -1,
            "input_map": [{"key": i["name"], "value": i["name"]} for i in inputs],
            "output_map": [{"key": IMAGE_OUTPUT, "value": IMAGE_OUTPUT}],
        }]},
        "parameters": _parameters(client_defaults(manifest, entry)),
    }
