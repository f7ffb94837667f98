"""Serving commands: `triton` (write a model repository), `serve`, `client`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..core.errors import GagExportError
from .app import cli, console
from .run_commands import number_list


def _gpu_ids(ctx, param, value):
    """`--gpus 0,1` as a tuple of ints (empty: every GPU)."""
    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated GPU ids, e.g. 0,1; got {value!r}") from None


@cli.command("triton")
@click.argument("graphs_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The model repository to write, e.g. triton/<model> (replaced atomically).")
@click.option("--engines", "engines_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The model's engine folder (engines/<model>) for --backend plan or tensorrt-rtx.")
@click.option("--backend", type=click.Choice(["plan", "onnx", "tensorrt-rtx"]), default=None,
              help="Components as TensorRT plans, ONNX models, or TensorRT-RTX plans (Python models running them: "
                   "Triton's TensorRT backend cannot load those) [default: plan with --engines, else onnx].")
@click.option("--cpu-standin", is_flag=True,
              help="Every component a Python model running its ONNX graph on ONNX Runtime, KIND_CPU (loads without a GPU).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each component model per GPU (stand-ins: per machine).")
@click.option("--gpus", callback=_gpu_ids, default=None, metavar="IDS", help="GPU ids for the instance groups, e.g. 0,1 [default: all].")
@click.option("--max-batch", type=click.IntRange(min=0), default=8, show_default=True,
              help="Largest batch Triton may form for a batchable model (0: no batching).")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True,
              help="Let Triton batch concurrent requests to batchable models.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500, show_default=True,
              help="How long the dynamic batcher waits for more requests.")
@click.option("--sampler-instances", type=click.IntRange(min=1), default=2, show_default=True,
              help="Sampler instances (CPU processes running scheduler loops concurrently).")
@click.option("--cpu-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime threads per stand-in instance (0: its default).")
@click.option("--max-prompt-chars", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Longest prompt the pipeline accepts.")
def triton_command(graphs_dir, out_dir, engines_dir, backend, cpu_standin, instances, gpus, max_batch, dynamic_batching,
                   max_queue_delay_us, sampler_instances, cpu_threads, max_prompt_chars) -> None:
    """Write a Triton Inference Server model repository for an export, e.g.
    `gag-export triton graphs/tiny-sdxl --out triton/tiny-sdxl --cpu-standin`."""
    from ..serving.repository import RepositoryOptions, build_repository

    options = RepositoryOptions(
        backend=backend or ("plan" if engines_dir is not None else "onnx"), cpu_standin=cpu_standin,
        instances=instances, gpus=gpus, max_batch=max_batch, dynamic_batching=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us, sampler_instances=sampler_instances, standin_threads=cpu_threads,
        max_prompt_chars=max_prompt_chars,
    )
    with console.status(f"writing {out_dir}"):
        report = build_repository(graphs_dir, out_dir, options, engines_dir=engines_dir)
    table = Table(title=f"{report.model} -> {report.path}", header_style="bold")
    for column in ("model", "kind", "max batch", "instances", "files"):
        table.add_column(column)
    for m in report.models:
        table.add_row(m.name, m.kind, str(m.max_batch_size), m.instances, ", ".join(m.files))
    Console().print(table)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"serve it: gag-export serve --repo {report.path}")


@cli.command("serve")
@click.option("--repo", "repository", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A repository written by `gag-export triton`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP, gRPC and metrics endpoints bind to.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: a free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0: a free port.")
@click.option("--tritonserver", "binary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The server binary [default: tritonserver on PATH, else the nvidia-pytriton wheel's].")
@click.option("--python-env", type=click.Path(path_type=Path), default=None,
              help="Virtual environment (or interpreter) for the Python models [default: the serving environment if set up].")
@click.option("--setup", is_flag=True,
              help="Create or update the serving environment (~/.cache/gag-export/triton-venv: nvidia-pytriton, numpy<2, "
                   "this package's dependencies) first; alone, only that.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds to wait for every model to load.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the server's log there [default: stderr].")
def serve_command(repository, host, http_port, grpc_port, metrics_port, binary, python_env, setup, ready_timeout,
                  log_file) -> None:
    """Run Triton Inference Server on a generated repository until Ctrl-C, e.g.
    `gag-export serve --setup --repo triton/tiny-sdxl`."""

    from ..serving.environment import ensure_environment
    from ..serving.server import ServerConfig, TritonServer, interrupt_on_signals

    if repository is None and not setup:
        raise click.UsageError("give --repo (and/or --setup)")
    if setup:
        with console.status("serving environment") as status:
            env = ensure_environment(python_env, on_step=status.update)
        click.echo(f"serving environment: {env.python.parent.parent} (Python {env.version}, numpy {env.numpy})", err=True)
        if repository is None:
            return
    config = ServerConfig(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          tritonserver=binary, environment=python_env, ready_timeout=ready_timeout)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupt_on_signals())
        sink = stack.enter_context(open(log_file, "a")) if log_file is not None else sys.stderr
        with console.status(f"starting Triton on {repository} (loading models)"):
            server = stack.enter_context(TritonServer(config, log_file=sink))
        click.echo(f"ready: http://{server.urls.http}  grpc://{server.urls.grpc}  metrics http://{server.urls.metrics}"
                   "/metrics  (Ctrl-C stops)", err=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            click.echo("stopping (unloading models)...", err=True)
            return
    if code:
        raise GagExportError(f"tritonserver exited with code {code}")


@cli.command("client")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True,
              help="http://host:port or grpc://host:port of a `gag-export serve` server.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None, help="For a URL without scheme [default: http].")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the initial latents.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the served model's].")
@click.option("--gag-scale", type=float, default=None, help="GAG scale [default: the served export's].")
@click.option("--gag-eta", type=float, default=None, help="GAG norm cap eta [default: the served export's].")
@click.option("--gag-zeta", type=float, default=None, help="GAG orthogonal weight zeta [default: the served export's].")
@click.option("--gag-scale-steps", default=None, metavar="S1,S2,...",
              help="Per-step GAG scale, one per denoising step, the last repeating (as `generate`).")
@click.option("--gag-eta-steps", default=None, metavar="E1,E2,...", help="Per-step GAG eta, as --gag-scale-steps.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image-to-image: the input image (sent as uint8 HxWx3; the served export needs --img2img).")
@click.option("--strength", type=float, default=None,
              help="With --image: how much of the schedule runs on it, in (0, 1] [default: the server's, diffusers'].")
@click.option("--model", "model_name", default="pipeline", show_default=True, help="The served model to call.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600, show_default=True, help="Seconds to wait for the image.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output PNG [default: triton-<seed>.png].")
def client_command(url, protocol, prompt, seed, steps, gag_scale, gag_eta, gag_zeta, gag_scale_steps, gag_eta_steps,
                   image_path, strength, model_name, timeout, out_path) -> None:
    """Request an image from a served pipeline, e.g.
    `gag-export client --url http://127.0.0.1:8000 --prompt "a red fox" --out fox.png`, or from an image
    (an export with --img2img): `... --image fox.png --strength 0.5`."""
    from PIL import Image

    from ..images import require_png_path, save_png
    from ..serving.client import PipelineClient, PipelineRequest, read_image

    out_path = require_png_path(out_path or Path(f"triton-{seed}.png"))
    init = read_image(image_path) if image_path is not None else None
    schedules = {f"gag_{k}_steps": number_list(f"--gag-{k}-steps", v)
                 for k, v in (("scale", gag_scale_steps), ("eta", gag_eta_steps)) if v is not None}
    request = PipelineRequest(prompt, seed=seed, steps=steps, gag_scale=gag_scale, gag_eta=gag_eta, gag_zeta=gag_zeta,
                              image=init, strength=strength, **schedules)
    with PipelineClient(url, protocol=protocol, model=model_name, timeout=timeout) as client, \
            console.status(f"requesting {model_name} at {url}"):
        request = client.resolve(request)
        image = client.generate(request)
        served = client.defaults.get("gag_export_model", "")
    metadata = {"prompt": prompt, "seed": str(seed), "steps": str(request.steps), "model": served,
                "backend": f"triton {client.protocol}://{client.address}", **{
                    k: "" if v is None else json.dumps(list(v)) if isinstance(v, tuple) else repr(float(v)) for k, v in
                    (("gag_scale", request.gag_scale), ("gag_eta", request.gag_eta), ("gag_zeta", request.gag_zeta))},
                **{k: json.dumps(list(v)) for k, v in schedules.items()},
                **({"init_image": str(image_path), "strength": "" if strength is None else repr(float(strength))}
                   if image_path is not None else {}),
                "Software": f"gag-export {__version__}"}
    path = save_png(Image.fromarray(image), out_path, metadata)
    click.echo(f"wrote {path} ({image.shape[1]}x{image.shape[0]})")
