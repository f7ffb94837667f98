"""Serving on NVIDIA Triton Inference Server: a generated model repository, a server launcher, a client.

    report = build_repository(Path("graphs/tiny-sdxl"), Path("triton/tiny-sdxl"),
                              RepositoryOptions(cpu_standin=True))

- `protocol.py`: the pipeline's names (model, inputs, output), shared by all of the below.
- `repository.py`: the model repository (one model per component, the BLS sampler, the
  `pipeline` ensemble), from an export's manifest.
- `pymodels.py`: the Python-backend models (sampler, ONNX Runtime stand-ins, TensorRT runner).
- `requests.py`: what a request may contain.
- `server.py`: starting and stopping `tritonserver` (system or the `nvidia-pytriton` wheel's).
- `environment.py`: the Python environment the server's Python models run in.
- `client.py`: requests over HTTP or gRPC with `tritonclient`.

Run side: imports `core`, `artifacts`, `models` and the runtime, never the exporter, engine
building, workflows or the CLI. This package re-exports nothing, so `import gag_export.serving.client`
loads no torch (tests/test_layers.py): import from its modules.
"""
