"""Serving on NVIDIA Triton Inference Server: a generated model repository, a server launcher, a client.

    report = build_repository(Path("graphs/tiny-sdxl"), Path("triton/tiny-sdxl"),
                              RepositoryOptions(cpu_standin=True))

- `repository.py`: the model repository (one model per component, the BLS sampler, the
  `pipeline` ensemble), from an export's manifest.
- `pymodels.py`: the Python-backend models (sampler, ONNX Runtime stand-ins, TensorRT runner).
- `requests.py`: what a request may contain.
- `server.py`: starting and stopping `tritonserver` (system or the `nvidia-pytriton` wheel's).
- `environment.py`: the Python environment the server's Python models run in.
- `client.py`: requests over HTTP or gRPC with `tritonclient`.

Above the runtime (layer 7): imports errors, export, engine, models and runtime; never bench or the CLI.
"""

from .repository import RepositoryOptions, RepositoryReport, build_repository
from .requests import RequestLimits, parse_request

__all__ = ["RepositoryOptions", "RepositoryReport", "build_repository", "RequestLimits", "parse_request"]
