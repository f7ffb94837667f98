"""Requests to a served `pipeline` with `tritonclient`, over HTTP or gRPC.

    with PipelineClient("http://127.0.0.1:8000") as client:
        image = client.generate(PipelineRequest("a red fox", seed=1))     # uint8 HxWx3
        client.defaults                                                    # from the pipeline's config

Image-to-image (an export with the VAE encoder): `PipelineRequest(..., image=array, strength=0.5)`,
the image as uint8 [height, width, 3], the pipeline output's own layout (`read_image(path)` reads a file).

`url`: `http://host:port`, `grpc://host:port`, or `host:port` with `protocol`. Values a request
leaves out (steps, GAG parameters) come from the `pipeline` model's config parameters, which
`gag-export triton` writes from the export (default steps, the export's GAG values). A refused
request raises `InvalidInputError` with the server's message (exit code 2), and so does a URL where nothing
answers, or a `model` the server does not serve as a pipeline (a component such as `unet`, or no model of
that name: the error names the pipeline models it serves); any other server failure is a `GagExportError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..core.errors import GagExportError, InvalidInputError, MissingDependencyError
from ..core.shapes import check_prompt
from .protocol import GAG_INPUTS, IMAGE_INPUT, PIPELINE, SCHEDULE_INPUTS, STRENGTH_INPUT

PROTOCOLS = ("http", "grpc")
# A parameter every config that `gag-export triton` writes for requests carries (repository.client_defaults).
REQUEST_MODEL_PARAMETER = "default_steps"
CLIENT_INSTALL = "pip install 'tritonclient[http,grpc]'"


@dataclass(frozen=True)
class PipelineRequest:
    """One image request; None: the served model's default."""

    prompt: str
    seed: int = 0
    steps: int | None = None
    gag_scale: float | tuple[float, ...] | None = None  # one value, or one per rewritten layer
    gag_eta: float | tuple[float, ...] | None = None
    gag_zeta: float | None = None
    # per-step schedules: one value per denoising step, the last repeating (empty: none)
    gag_scale_steps: tuple[float, ...] = ()
    gag_eta_steps: tuple[float, ...] = ()
    # img2img (an export with the VAE encoder): uint8 [height, width, 3] RGB, and strength in (0, 1]
    # (None: the server's default, diffusers' for the family)
    image: Any = field(default=None, compare=False)
    strength: float | None = None

    def __post_init__(self) -> None:
        check_prompt(self.prompt)  # the server's rule, before anything is sent
        if self.image is not None:
            image = np.asarray(self.image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InvalidInputError(f"image: must be uint8 [height, width, 3] (RGB), got {image.dtype} {list(image.shape)}")
            object.__setattr__(self, "image", np.ascontiguousarray(image))
        if self.strength is not None:
            if self.image is None:
                raise InvalidInputError("strength: given without an image (it sets how much of an input image is kept)")
            if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                    or not 0 < float(self.strength) <= 1:
                raise InvalidInputError(f"strength: must be in (0, 1], got {self.strength!r}")


def read_image(path) -> np.ndarray:
    """An image file as the pipeline's `init_image` input (uint8 [height, width, 3] RGB); InvalidInputError
    when it cannot be read. PIL only: the client loads no torch."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as opened:
            return np.ascontiguousarray(np.asarray(opened.convert("RGB"), dtype=np.uint8))
    except FileNotFoundError:
        raise InvalidInputError(f"--image: {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInputError(f"--image: {path} is not an image this machine can read ({exc})") from None


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """(protocol, "host:port") from a URL with or without scheme."""
    text = url.strip()
    scheme = None
    if "://" in text:
        scheme, text = text.split("://", 1)
        scheme = {"https": "http"}.get(scheme.lower(), scheme.lower())
        if scheme not in PROTOCOLS:
            raise InvalidInputError(f"--url: use http://host:port or grpc://host:port, got {url!r}")
    text = text.rstrip("/")
    if not text or "/" in text:
        raise InvalidInputError(f"--url: expected host:port, got {url!r}")
    if protocol is not None and scheme is not None and protocol != scheme:
        raise InvalidInputError(f"--url says {scheme} but --protocol says {protocol}")
    chosen = protocol or scheme or "http"
    if chosen not in PROTOCOLS:
        raise InvalidInputError(f"protocol: use one of {', '.join(PROTOCOLS)}, got {chosen!r}")
    return chosen, text


def _module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module  # noqa: PLC0415
        else:
            import tritonclient.http as module  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(f"tritonclient ({protocol}) is not importable ({exc}): `{CLIENT_INSTALL}`") from None
    return module


class PipelineClient:
    """A connection to one server's `pipeline` model (close it, or use it as a context manager)."""

    def __init__(self, url: str, protocol: str | None = None, model: str = PIPELINE, timeout: float = 600.0):
        self.protocol, self.address = parse_url(url, protocol)
        self.model = model
        self.timeout = timeout
        self._tc = _module(self.protocol)
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        self._error = InferenceServerException
        if self.protocol == "http":
            self._client = self._tc.InferenceServerClient(self.address, connection_timeout=timeout,
                                                          network_timeout=timeout)
        else:
            self._client = self._tc.InferenceServerClient(self.address)
        self._defaults: dict[str, str] | None = None
        self._inputs: list[str] | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "PipelineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._error as exc:
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            status = str(exc.status() or "") if callable(getattr(exc, "status", None)) else ""
            if "INVALID_ARG" in status or status == "400" or "INVALID_ARGUMENT" in status:
                raise InvalidInputError(f"the server refused the request: {message}") from None
            if "UNAVAILABLE" in status or "failed to connect" in message:
                raise InvalidInputError(f"--url: cannot reach {self.protocol}://{self.address} ({message}); is the "
                                        "server running (`gag-export serve`) and is the URL right?") from None
            raise GagExportError(f"{what} failed at {self.protocol}://{self.address}: {message}") from None
        except OSError as exc:
            raise InvalidInputError(f"--url: cannot reach {self.protocol}://{self.address} ({exc}); is the server "
                                    "running (`gag-export serve`) and is the URL right?") from None

    def _config(self, model: str) -> dict:
        if self.protocol == "grpc":
            response = self._call("reading the model config", self._client.get_model_config, model, as_json=True)
            return response["config"]
        return self._call("reading the model config", self._client.get_model_config, model)

    def _served_models(self) -> list[str]:
        """The names in the server's model repository (loaded or not)."""
        if self.protocol == "grpc":
            index = self._call("listing the models", self._client.get_model_repository_index, as_json=True)
            index = index.get("models", [])
        else:
            index = self._call("listing the models", self._client.get_model_repository_index)
        return sorted({entry["name"] for entry in index})

    def pipeline_models(self) -> list[str]:
        """The served models a request can go to: the ensembles `gag-export triton` writes for clients
        (else any model carrying the client defaults, e.g. a sampler served alone)."""
        configs = {}
        for name in self._served_models():
            try:
                configs[name] = self._config(name)
            except GagExportError:  # e.g. a model that failed to load: not one to suggest
                continue
        takes_requests = [name for name, config in configs.items() if _takes_requests(config)]
        return [name for name in takes_requests if configs[name].get("platform") == "ensemble"] or takes_requests

    def _not_a_pipeline(self, why: str) -> InvalidInputError:
        url = f"{self.protocol}://{self.address}"
        served = self.pipeline_models()
        choice = (f"the pipeline models served at {url}: {', '.join(served)} (`--model` defaults to {PIPELINE})"
                  if served else f"the server at {url} serves no gag-export pipeline")
        return InvalidInputError(f"--model {self.model}: {why}; {choice}")

    @property
    def defaults(self) -> dict[str, str]:
        """The pipeline config's parameters (model, default/min/max steps, default GAG values)."""
        if self._defaults is None:
            # Checked first: a component (`unet`) or an unknown name has no defaults and would fail
            # further on with a KeyError or a bare server error instead of naming what to call.
            if self.model not in self._served_models():
                raise self._not_a_pipeline("the server has no model of that name")
            config = self._config(self.model)
            if not _takes_requests(config):
                raise self._not_a_pipeline("not a pipeline model: it takes no image requests (a component of one, or another model)")
            self._defaults = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
            self._inputs = [i["name"] for i in config.get("input", [])]
        return self._defaults

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model))
        except (self._error, OSError):
            return False

    def resolve(self, request: PipelineRequest) -> PipelineRequest:
        """`request` with every None replaced by the served model's default."""
        defaults = self.defaults
        filled: dict[str, Any] = {}
        if request.steps is None:
            filled["steps"] = int(defaults.get("default_steps", "1"))
        for name in GAG_INPUTS:
            if name not in self._inputs:
                if getattr(request, name) is not None:
                    raise InvalidInputError(f"{name}: the served model was exported without GAG")
            elif getattr(request, name) is None:
                text = defaults[f"default_{name}"]  # a number (repr: "inf" too), or calibrated per-layer values (JSON)
                filled[name] = tuple(json.loads(text)) if text.startswith("[") else float(text)
        schedules = [name for name in SCHEDULE_INPUTS if getattr(request, name)]
        if schedules and not set(schedules) <= set(self._inputs):
            raise InvalidInputError(f"{', '.join(schedules)}: the served model takes no per-step schedule (exported "
                                    "without GAG, or a repository written before schedules: regenerate it)")
        if request.image is not None and IMAGE_INPUT not in self._inputs:
            model = defaults.get("gag_export_model") or "<model>"
            raise InvalidInputError(f"image: the served model was exported without the VAE encoder, so it takes no input "
                                    f"image; export with `gag-export export --model {model} --img2img` and regenerate "
                                    "the repository (`gag-export triton`)")
        return replace(request, **filled)

    def _values(self, request: PipelineRequest) -> dict[str, np.ndarray]:
        values: dict[str, Any] = {
            "prompt": np.array([request.prompt.encode("utf-8")], dtype=np.object_),
            "seed": np.array([request.seed], dtype=np.int64),
            "steps": np.array([request.steps], dtype=np.int32),
        }
        for name in GAG_INPUTS:
            if name in self._inputs:
                values[name] = np.array(getattr(request, name), dtype=np.float32).reshape(-1)
        for name in SCHEDULE_INPUTS:
            if getattr(request, name):
                values[name] = np.array(getattr(request, name), dtype=np.float32)
        if request.image is not None:
            values[IMAGE_INPUT] = request.image
            if request.strength is not None:
                values[STRENGTH_INPUT] = np.array([request.strength], dtype=np.float32)
        return values

    def generate(self, request: PipelineRequest) -> np.ndarray:
        """The image (uint8 HxWx3) for one request."""
        if not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
            raise InvalidInputError(f"seed: must be an integer in [0, 2**63 - 1], got {request.seed!r}")
        values = self._values(self.resolve(request))
        inputs = []
        for name, array in values.items():
            datatype = "BYTES" if array.dtype == np.object_ else {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
                                                                 np.dtype(np.float32): "FP32",
                                                                 np.dtype(np.uint8): "UINT8"}[array.dtype]
            tensor = self._tc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self._tc.InferRequestedOutput("image")]
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._call("the request", self._client.infer, self.model, inputs, outputs=outputs, **kwargs)
        image = result.as_numpy("image")
        if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise GagExportError(f"the server returned no HxWx3 uint8 image (got {None if image is None else image.shape})")
        return image


def _takes_requests(config: dict) -> bool:
    """Whether a model config is one `gag-export triton` writes for image requests (pipeline, sampler)."""
    return REQUEST_MODEL_PARAMETER in (config.get("parameters") or {})
