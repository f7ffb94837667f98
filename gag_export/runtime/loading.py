"""A model's components for a backend: each backend's module is imported when it is asked for."""

from __future__ import annotations

from pathlib import Path

from .components import BackendOptions, ComponentSet, parse_backend
from .exports import check_graph_files, load_manifest_for, manifest_specs


def load_components(
    model: str,
    backend: str,
    *,
    graphs: Path = Path("graphs"),
    engines: Path = Path("engines"),
    options: BackendOptions = BackendOptions(),
) -> ComponentSet:
    """Every component of `model` for `backend`, validated but not yet activated.

    ort/tensorrt read `graphs/<model>/manifest.json` (and `engines/<model>/...` for TensorRT) and
    raise `ArtifactError` naming the command to run when something is missing. The torch backend
    builds the pipeline from the registry and, when an export exists, rewrites it with the same
    GAG config as the graphs (so both backends compute the same function).
    """
    from .ort_backend import OrtComponent  # noqa: PLC0415  (each backend's module when it is used)
    from .tensorrt_backend import tensorrt_components  # noqa: PLC0415
    from .torch_backend import load_torch_components  # noqa: PLC0415

    backend = parse_backend(backend)
    graphs = Path(graphs)
    if backend == "torch":
        return load_torch_components(model, graphs, options)
    manifest = load_manifest_for(model, graphs)
    check_graph_files(manifest, graphs)
    if backend == "ort":
        components = {
            name: OrtComponent(name, entry["role"], *manifest_specs(entry), path=manifest.graph_path(name),
                               providers=options.ort_providers, threads=options.threads, model=model)
            for name, entry in manifest.components.items()
        }
    else:
        components = tensorrt_components(manifest, graphs, Path(engines), options, backend)
    return ComponentSet(model, backend, components, manifest=manifest, gag=manifest.gag)


__all__ = ["load_components"]
