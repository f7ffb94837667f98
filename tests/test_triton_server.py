"""A real Triton Inference Server on the CPU stand-in repository of tiny-sdxl (marked `integration`).

`gag-export serve` runs as a subprocess on 127.0.0.1 with free ports: the server bundled in the
nvidia-pytriton wheel (Triton 2.51), its Python models in the serving environment that
`gag-export serve --setup` builds (~/.cache/gag-export/triton-venv, or $GAG_EXPORT_TRITON_ENV;
built here on first use: 2-4 minutes, then reused). Images over HTTP and gRPC must equal the local
ONNX Runtime sampler's for the same seed; 8 concurrent clients with 2 requests each must all
succeed; bad requests are refused and the next good one served; after SIGINT, no process,
/dev/shm region or temp folder of the server may remain.

Skipped, with the reason, only where the server cannot run at all: not Linux x86_64, no
/dev/shm, or the serving environment cannot be installed (no network and no cache).
Deselect with `-m "not integration"`.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from gag_export.core.errors import InvalidInputError, MissingDependencyError
from gag_export.serving.repository import RepositoryOptions, build_repository
from gag_export.serving.client import PipelineClient, PipelineRequest
from gag_export.serving.server import SHM_DIR, SHM_PREFIX, free_port
from runtime_helpers import ONE_THREAD, exported_graphs, max_pixel_diff, torch_threads
from triton_helpers import PROMPT

pytestmark = pytest.mark.integration

MODEL = "tiny-sdxl"
CLIENTS = 8
REQUESTS_PER_CLIENT = 2
TOLERANCE = 2  # out of 255


@pytest.fixture(scope="module")
def serving_env():
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip(f"the Triton server in nvidia-pytriton is built for Linux x86_64, this is {sys.platform} {platform.machine()}")
    if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
        pytest.skip("Triton's Python backend needs a writable /dev/shm")
    from gag_export.serving.environment import ensure_environment

    try:
        return ensure_environment()
    except MissingDependencyError as exc:
        pytest.skip(f"the serving environment (nvidia-pytriton, numpy<2) cannot be installed here: {exc}")


@pytest.fixture(scope="module")
def graphs_root(tmp_path_factory) -> Path:
    return exported_graphs(tmp_path_factory, MODEL)


@pytest.fixture(scope="module")
def server(serving_env, graphs_root, tmp_path_factory):
    """`gag-export serve` on the stand-in repository; yields (process, urls, temp folder, log path)."""
    work = tmp_path_factory.mktemp("triton-serve")
    repo = work / "triton" / MODEL
    build_repository(graphs_root / MODEL, repo, RepositoryOptions(cpu_standin=True, sampler_instances=2))
    tmp = work / "tmp"
    tmp.mkdir()
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    log = work / "server.log"
    out = open(work / "serve.out", "w")
    command = [sys.executable, "-m", "gag_export.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1",
               "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
               "--metrics-port", str(ports["metrics"]), "--python-env", str(serving_env.python.parent.parent),
               "--log-file", str(log), "--ready-timeout", "400"]
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp)},
                               start_new_session=True)
    urls = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    try:
        deadline = time.monotonic() + 420
        while not _ready(urls["http"]):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`gag-export serve` did not become ready (exit {process.poll()}):\n"
                            f"{(work / 'serve.out').read_text()[-3000:]}\n{log.read_text()[-3000:] if log.exists() else ''}")
            time.sleep(1)
        yield {"process": process, "urls": urls, "tmp": tmp, "log": log}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        out.close()


def _ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(graphs_root):
    """The local ONNX Runtime sampler's images, by (seed, scale, eta)."""
    from gag_export.runtime import GAGParams, GenerationConfig, Sampler

    cache = {}

    def image(seed: int, scale: float = 10.0, eta: float = 15.0):
        if (seed, scale, eta) not in cache:
            with torch_threads(1), Sampler.load(MODEL, "ort", graphs=graphs_root, options=ONE_THREAD) as sampler:
                cache[seed, scale, eta] = np.asarray(sampler.generate(
                    GenerationConfig(PROMPT, seed=seed, steps=4, gag=GAGParams(scale, eta, 0.0))).image)
        return cache[seed, scale, eta]

    return image


def test_http_image_equals_the_local_runtime(server, reference):
    with PipelineClient(f"http://{server['urls']['http']}", timeout=300) as client:
        assert client.defaults["gag_export_model"] == MODEL
        image = client.generate(PipelineRequest(PROMPT, seed=7, steps=4, gag_scale=10.0))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert max_pixel_diff(image, reference(7)) <= TOLERANCE


def test_grpc_image_equals_the_local_runtime(server, reference):
    with PipelineClient(f"grpc://{server['urls']['grpc']}", timeout=300) as client:
        image = client.generate(PipelineRequest(PROMPT, seed=7, steps=4, gag_scale=10.0))
        other = client.generate(PipelineRequest(PROMPT, seed=8, steps=4, gag_scale=3.0))
    assert max_pixel_diff(image, reference(7)) <= TOLERANCE
    assert max_pixel_diff(other, reference(8, 3.0)) <= TOLERANCE  # guidance per request


def test_concurrent_clients_all_succeed(server, reference):
    def client_run(index: int) -> list[tuple[int, np.ndarray]]:
        url = f"http://{server['urls']['http']}" if index % 2 == 0 else f"grpc://{server['urls']['grpc']}"
        done = []
        with PipelineClient(url, timeout=300) as client:
            for k in range(REQUESTS_PER_CLIENT):  # bounded: 2 requests per client
                seed = 100 + index * REQUESTS_PER_CLIENT + k
                done.append((seed, client.generate(PipelineRequest(PROMPT, seed=seed, steps=4, gag_scale=10.0))))
        return done

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = [item for batch in pool.map(client_run, range(CLIENTS)) for item in batch]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for seed, image in results:
        assert max_pixel_diff(image, reference(seed)) <= TOLERANCE, seed


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_request_is_refused_and_the_next_one_served(server, reference, protocol):
    with PipelineClient(f"{protocol}://{server['urls'][protocol]}", timeout=300) as client:
        with pytest.raises(InvalidInputError, match="steps: this model samples with 1..4 steps, got 7"):
            client.generate(PipelineRequest(PROMPT, seed=1, steps=7))
        with pytest.raises(InvalidInputError, match="gag_scale: must be a finite number"):
            client.generate(PipelineRequest(PROMPT, seed=1, steps=4, gag_scale=float("nan")))
        with pytest.raises(InvalidInputError, match="prompt: 1001 characters"):
            client.generate(PipelineRequest("x" * 1001, seed=1, steps=4))
        image = client.generate(PipelineRequest(PROMPT, seed=7, steps=4, gag_scale=10.0))
    assert max_pixel_diff(image, reference(7)) <= TOLERANCE


def test_gag_eta_inf_is_served(server, reference):
    """inf: no norm cap, as `generate --gag-eta inf` takes it (the server refused it as not finite)."""
    with PipelineClient(f"http://{server['urls']['http']}", timeout=300) as client:
        image = client.generate(PipelineRequest(PROMPT, seed=7, steps=4, gag_scale=10.0, gag_eta=float("inf")))
    assert max_pixel_diff(image, reference(7, eta=float("inf"))) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_component_or_unknown_model_is_refused_naming_the_pipeline(server, protocol):
    for model, why in (("unet", "not a pipeline model"), ("nosuch", "the server has no model of that name")):
        refused = pytest.raises(InvalidInputError, match=f"--model {model}: {why}.*pipeline models served at .*: pipeline")
        with PipelineClient(f"{protocol}://{server['urls'][protocol]}", model=model, timeout=60) as client, refused:
            client.generate(PipelineRequest(PROMPT, seed=1))


def test_metrics_endpoint_counts_the_requests(server):
    with urllib.request.urlopen(f"http://{server['urls']['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'nv_inference_request_success{model="pipeline"' in text


def test_shutdown_leaves_no_process_shared_memory_or_temp_folder(server):
    """Last in this module: SIGINT (Ctrl-C) stops `gag-export serve` and everything it started."""
    process = server["process"]
    parent = psutil.Process(process.pid)
    started = [parent, *parent.children(recursive=True)]
    assert any("tritonserver" in p.name() for p in started[1:])
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in started[1:])
    prefix = f"{SHM_PREFIX}-{process.pid}-"
    assert list(SHM_DIR.glob(f"{prefix}*")), "the Python backend's regions carry the server's prefix"
    assert list(server["tmp"].glob("gag-export-triton-*"))

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.5)
    assert not [p.pid for p in started if _alive(p)]
    assert not list(SHM_DIR.glob(f"{prefix}*"))
    # ONNX Runtime's telemetry keeps one session file, `.ses`, in TMPDIR (every ORT process, /tmp/.ses
    # outside this test): not the server's. Everything else the server made there must be gone.
    assert not [p.name for p in server["tmp"].iterdir() if p.name != ".ses"]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
