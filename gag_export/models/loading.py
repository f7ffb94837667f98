"""Loading pipelines: pretrained (Hugging Face cache or a local folder), random full-size, or tiny.

    pipe = load_pipeline("tiny-sdxl")                                  # built in code
    pipe = load_pipeline("dmd2", dtype="fp16")                         # from the local HF cache
    pipe = load_pipeline("/models/my-sdxl")                            # a diffusers folder
    pipe = load_pipeline("sdxl", weights="random", components=("unet",))   # 2.6B random params

Pretrained weights are read from the local Hugging Face cache only, unless
`local_files_only=False`; missing ones raise `WeightsNotFoundError` with the download command.
Single-file denoisers (DMD2 `.bin`, Hyper-SD and Lightning `.safetensors`) hold diffusers-layout
state dicts; `.bin` files are read with `torch.load(weights_only=True)` and nothing else (a
pickle that needs more than tensors is refused).

`weights="random"` builds the real architectures from the configs in `models/configs/` with
random weights (seeded). Their tokenizers are the in-code ones from `tiny.py`, set up with the
real vocabulary sizes and special ids (CLIP bos/eos 49406/49407, T5 pad 0 / eos 1): the real
tokenizer files cannot be downloaded here, and random text encoders make any vocabulary as
good as another. `components=` builds or loads only some models (the rest are None), e.g. just
the denoiser: the whole FLUX.1 is ~17B parameters.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..core.errors import (
    ArtifactError,
    InvalidInputError,
    ResourceExhaustedError,
    WeightsNotFoundError,
)
from ..core.memory import available_bytes
from .base import Precision
from .registry import ModelEntry, SchedulerSpec, WeightsSource, get_entry
from .tiny import (
    FLUX_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    TINY_FLUX_CONFIGS,
    TINY_SDXL_CONFIGS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_sdxl_pipeline,
)

log = logging.getLogger(__name__)

WEIGHTS_KINDS = ("pretrained", "random", "tiny")
FAMILY_MODELS = {
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae"),
    "flux": ("text_encoder", "text_encoder_2", "transformer", "vae"),
}
DENOISER = {"sdxl": "unet", "flux": "transformer"}
PIPELINE_FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux"}
_ALIASES = {"vae_decoder": "vae", "vae_encoder": "vae"}


# --------------------------------------------------------------------------- configs


def shipped_config(family: str, component: str) -> dict:
    """A full-size config shipped in gag_export/models/configs/<family>/<component>.json."""
    path = resources.files("gag_export.models") / "configs" / family / f"{component}.json"
    return json.loads(path.read_text())


def entry_configs(entry: ModelEntry) -> dict[str, dict]:
    """{component: config} of an entry without loading it: tiny configs, or full-size + overrides."""
    if entry.is_tiny:
        tiny = TINY_SDXL_CONFIGS if entry.family == "sdxl" else TINY_FLUX_CONFIGS
        configs = {name: dict(config) for name, config in tiny.items()}
        configs["scheduler"] = dict(SDXL_SCHEDULER_CONFIG if entry.family == "sdxl" else FLUX_SCHEDULER_CONFIG)
        return configs
    configs = {name: shipped_config(entry.family, name) for name in (*FAMILY_MODELS[entry.family], "scheduler")}
    for name, overrides in entry.config_overrides.items():
        configs[name].update(overrides)
    return configs


def _init_kwargs(config: Mapping) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


# --------------------------------------------------------------------------- entry resolution


def manifest_entry(manifest: Mapping) -> ModelEntry:
    """The entry an export was made from: the registry's by name, else the local folder it recorded.

    A local diffusers folder exports under the folder's name with `source` = its path, so the
    graphs of `/ckpt/my-dmd2` are found again as model "my-dmd2" while that folder exists.
    """
    model, source = manifest.get("model"), manifest.get("source")
    try:
        return get_entry(model)
    except InvalidInputError:
        if not (isinstance(source, str) and os.path.isabs(source)):
            raise
    if not os.path.isdir(source):
        raise ArtifactError(f"{model!r} was exported from the local folder {source}, which is not there any more: "
                            "restore it, or export again from where the model is now")
    return resolve_entry(source)


def resolve_entry(name_or_path: str | os.PathLike | ModelEntry) -> ModelEntry:
    """A registry entry by name, or an entry describing a local diffusers folder.

    A local folder's family comes from its model_index.json; its schedule is the folder's own
    scheduler with 1..100 steps (default 4) and no CFG: a caller that knows better overrides it.
    """
    if isinstance(name_or_path, ModelEntry):
        return name_or_path
    text = os.fspath(name_or_path)
    if not os.path.isdir(text):
        if os.path.isfile(text):
            raise InvalidInputError(
                f"--model {text}: a single file is not a pipeline; give a diffusers folder or a model name "
                "(a single-file UNet/transformer goes with denoiser_path)"
            )
        return get_entry(text)
    folder = Path(text)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InvalidInputError(f"--model {text}: not a diffusers pipeline folder (no model_index.json)")
    index = _read_model_index(index_path)
    class_name = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise InvalidInputError(
            f"--model {text}: pipeline class {index.get('_class_name')!r} is not supported "
            f"(supported: {', '.join(PIPELINE_FAMILIES)})"
        )
    scheduler_class = _scheduler_class(index)
    size = 1024 if family == "flux" else _local_default_size(folder)
    return ModelEntry(
        name=folder.resolve().name,
        family=family,
        description=f"local diffusers folder {folder}",
        source=WeightsSource(str(folder.resolve())),  # absolute: manifests find the folder again from anywhere
        height=size,
        width=size,
        scheduler=SchedulerSpec(scheduler_class, default_steps=4, min_steps=1, max_steps=100),
        text_len=256 if family == "flux" else None,
    )


def _read_model_index(path: Path) -> dict:
    """A folder's model_index.json; ArtifactError naming the file when it is not a JSON object
    (a damaged or half-downloaded folder is a bad artifact, not a bug)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise ArtifactError(f"{path}: cannot read it as JSON ({exc}); repair or re-download the pipeline folder") from None
    if not isinstance(index, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(index).__name__}; repair or re-download "
                            "the pipeline folder")
    return index


def _scheduler_class(index: Mapping) -> str:
    """The scheduler class model_index.json names (`"scheduler": [library, class]`), else Euler."""
    entry = index.get("scheduler")
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str) and entry[1]:
        return entry[1]
    return "EulerDiscreteScheduler"


def _local_default_size(folder: Path) -> int:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError):  # TypeError: a config that is not an object
        return 1024


def _components(family: str, components: Iterable[str] | None) -> tuple[str, ...]:
    allowed = FAMILY_MODELS[family]
    if components is None:
        return allowed
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    chosen = []
    for name in components:
        name = DENOISER[family] if name == "denoiser" else _ALIASES.get(name, name)
        if name not in allowed:
            raise InvalidInputError(f"components: {name!r} is not a {family} component; choose from {', '.join(allowed)}")
        chosen.append(name)
    return tuple(c for c in allowed if c in chosen)


# --------------------------------------------------------------------------- public entry point


def load_pipeline(
    name_or_path: str | os.PathLike | ModelEntry,
    weights: str | None = None,
    dtype: Precision | str = "fp32",
    local_files_only: bool = True,
    components: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    denoiser_path: str | os.PathLike | None = None,
    seed: int = 0,
):
    """A diffusers pipeline (StableDiffusionXLPipeline or FluxPipeline) with the entry's scheduler.

    weights: "pretrained" (default; HF cache or local folder), "random" (full-size architecture,
        random weights) or "tiny" (the family's tiny model; the default for tiny-* entries).
    components: models to load or build (default: all); the others are None. Names as in the
        pipeline ("unet", "vae", ...), "vae_decoder", "vae_encoder" and "denoiser" accepted.
    cache_dir: a Hugging Face cache folder (default: the hub's, HF_HUB_CACHE).
    denoiser_path: a local single-file UNet/transformer (safetensors or .bin, diffusers layout)
        replacing the entry's denoiser.
    seed: random and tiny weights.
    """
    entry = resolve_entry(name_or_path)
    precision = Precision.parse(dtype)
    kind = weights or ("tiny" if entry.is_tiny else "pretrained")
    if kind not in WEIGHTS_KINDS:
        raise InvalidInputError(f"weights: must be one of {', '.join(WEIGHTS_KINDS)}, got {kind!r}")
    if kind == "pretrained" and entry.is_tiny:
        raise InvalidInputError(f"{entry.name} has no pretrained weights: it is built in code (use --weights tiny)")
    wanted = _components(entry.family, components)

    if kind == "tiny":
        build = build_tiny_sdxl_pipeline if entry.family == "sdxl" else build_tiny_flux_pipeline
        pipe = build(seed)
        for name in FAMILY_MODELS[entry.family]:
            if name not in wanted:
                setattr(pipe, name, None)
        if precision is not Precision.FP32:
            pipe.to(dtype=precision.torch_dtype)
        base_scheduler = pipe.scheduler.config
    elif kind == "random":
        pipe = build_random_pipeline(entry, precision, wanted, seed)
        base_scheduler = pipe.scheduler.config
    else:
        pipe = _load_pretrained(entry, precision, wanted, local_files_only, cache_dir)
        base_scheduler = pipe.scheduler.config

    if denoiser_path is not None:
        _replace_denoiser(pipe, entry, Path(denoiser_path), precision)
    pipe.scheduler = entry.scheduler.build(base_scheduler)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s weights, %s, %s)", entry.name, kind, precision.value, ", ".join(wanted) or "no models")
    return pipe


# --------------------------------------------------------------------------- pretrained


def _dtype_kwargs(precision: Precision) -> dict:
    """diffusers >= 0.42 takes `dtype=` (and deprecates `torch_dtype=`); older versions only `torch_dtype=`."""
    import diffusers
    from packaging.version import Version

    key = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
    return {key: precision.torch_dtype}


def _pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline


def download_command() -> str:
    """The Hub CLI's download command for the installed huggingface_hub: `hf download` from 0.34 on
    (`huggingface-cli` was deprecated then and is absent from recent releases), else `huggingface-cli download`."""
    import huggingface_hub
    from packaging.version import Version

    return "hf download" if Version(huggingface_hub.__version__).release >= (0, 34) else "huggingface-cli download"


def _download_hint(entry: ModelEntry, missing: str) -> str:
    source = entry.source
    download = download_command()
    commands = []
    if source.repo_id and not Path(source.repo_id).exists():
        commands.append(f"{download} {source.repo_id}")
    if source.denoiser_repo:
        file = f" {source.denoiser_file}" if source.denoiser_file else ""
        commands.append(f"{download} {source.denoiser_repo}{file}")
    tiny = f"tiny-{entry.family}"
    return (
        f"weights for {entry.name!r} are not available locally: {missing}. "
        f"Download them with: {' && '.join(commands) or f'{download} <repo>'}; "
        f"or run without them: --weights random (full-size architecture, random weights) or --model {tiny}"
    )


def weights_present(entry: ModelEntry | str, cache_dir: str | os.PathLike | None = None) -> bool | None:
    """Whether an entry's pretrained weights look present locally; None for built-in tiny models.

    A cheap look at the Hugging Face cache (nothing is loaded or downloaded): the pipeline's
    model_index.json and its denoiser's weights (the single file, the denoiser repo's config, or
    the pipeline's own `unet/`/`transformer/` safetensors or shard index). A local folder entry is
    present when its model_index.json is. Incomplete shards are found only by loading.
    """
    from huggingface_hub import try_to_load_from_cache

    entry = resolve_entry(entry) if isinstance(entry, str) else entry
    source = entry.source
    if source.repo_id is None:
        return None
    if Path(source.repo_id).is_dir():
        return (Path(source.repo_id) / "model_index.json").is_file()

    def cached(repo: str, *files: str) -> bool:
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in files)

    if not cached(source.repo_id, "model_index.json"):
        return False
    if source.denoiser_repo:
        return cached(source.denoiser_repo, source.denoiser_file or "config.json")
    sub = DENOISER[entry.family]
    names = [f"{sub}/diffusion_pytorch_model{suffix}" for suffix in (".safetensors", ".safetensors.index.json")]
    if source.variant:
        names += [f"{sub}/diffusion_pytorch_model.{source.variant}{suffix}"
                  for suffix in (".safetensors", ".safetensors.index.json")]
    return cached(source.repo_id, *names)


def _hub_file(repo_id: str, filename: str, entry: ModelEntry, local_files_only: bool, cache_dir) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_files_only, cache_dir=cache_dir))
    except (EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise WeightsNotFoundError(_download_hint(entry, f"{repo_id}/{filename}")) from exc


def _load_pretrained(entry: ModelEntry, precision: Precision, wanted: tuple[str, ...], local_files_only: bool, cache_dir):
    family = entry.family
    denoiser_name = DENOISER[family]
    overrides: dict[str, object] = {name: None for name in FAMILY_MODELS[family] if name not in wanted}
    source = entry.source
    if source.denoiser_repo and denoiser_name in wanted:
        overrides[denoiser_name] = _load_hub_denoiser(entry, precision, local_files_only, cache_dir)
    pipe_cls = _pipeline_class(family)
    is_folder = Path(source.repo_id).is_dir()
    attempts = [None] if is_folder or not source.variant else [None, source.variant]
    errors = []
    for variant in attempts:
        try:
            return pipe_cls.from_pretrained(
                source.repo_id,
                **_dtype_kwargs(precision),
                local_files_only=local_files_only,
                cache_dir=cache_dir,
                variant=variant,
                **overrides,
            )
        except (OSError, ValueError) as exc:  # diffusers reports missing files/variants as either
            errors.append(exc)
            log.debug("loading %s (variant %s) failed: %s", source.repo_id, variant, exc)
    if is_folder:
        raise ArtifactError(f"could not load the diffusers folder {source.repo_id}: {errors[-1]}") from errors[-1]
    raise WeightsNotFoundError(_download_hint(entry, f"{source.repo_id} ({errors[-1]})")) from errors[-1]


def _load_hub_denoiser(entry: ModelEntry, precision: Precision, local_files_only: bool, cache_dir):
    """The entry's replacement UNet/transformer: a single file on the base config, or a diffusers repo."""
    source = entry.source
    family = entry.family
    model_cls = _denoiser_class(family)
    if source.denoiser_file is None:
        errors = []
        for variant in (None, source.variant) if source.variant else (None,):
            try:
                return model_cls.from_pretrained(
                    source.denoiser_repo, **_dtype_kwargs(precision), local_files_only=local_files_only,
                    cache_dir=cache_dir, variant=variant,
                )
            except (OSError, ValueError) as exc:
                errors.append(exc)
        raise WeightsNotFoundError(_download_hint(entry, f"{source.denoiser_repo} ({errors[-1]})")) from errors[-1]
    path = _hub_file(source.denoiser_repo, source.denoiser_file, entry, local_files_only, cache_dir)
    try:
        config = model_cls.load_config(
            source.repo_id, subfolder=DENOISER[family], local_files_only=local_files_only, cache_dir=cache_dir
        )
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(_download_hint(entry, f"{source.repo_id}/{DENOISER[family]}/config.json")) from exc
    return denoiser_from_file(family, config, path, precision)


def _denoiser_class(family: str):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    return UNet2DConditionModel if family == "sdxl" else FluxTransformer2DModel


def _replace_denoiser(pipe, entry: ModelEntry, path: Path, precision: Precision) -> None:
    name = DENOISER[entry.family]
    current = getattr(pipe, name, None)
    config = dict(current.config) if current is not None else entry_configs(entry)[name]
    setattr(pipe, name, denoiser_from_file(entry.family, config, path, precision))


# --------------------------------------------------------------------------- single files


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch `.bin`/`.pt` state dict (weights_only: no code runs).

    Raises WeightsNotFoundError if the file is missing and ArtifactError if it is not a plain
    tensor state dict (corrupt, or a pickle that needs arbitrary objects).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: not a plain tensor state dict (loaded with torch.load(weights_only=True), "
                f"which refuses arbitrary pickled objects): {str(exc).splitlines()[0]}"
            ) from exc
    if isinstance(state, dict) and set(state) == {"state_dict"} and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path}: expected a {{name: tensor}} state dict, got {type(state).__name__}")
    return state


def denoiser_from_file(family: str, config: Mapping, path: str | os.PathLike, precision: Precision | str = "fp32"):
    """A UNet/transformer with this config and the weights of a diffusers-layout single file.

    The model is created on the meta device and the file's tensors are assigned to it, so a
    2.6B-parameter UNet is never allocated twice.
    """
    precision = Precision.parse(precision)
    state = load_state_dict(path)
    model_cls = _denoiser_class(family)
    with torch.device("meta"):
        model = model_cls.from_config(_init_kwargs(config))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        hint = ""
        if any(key.startswith("model.diffusion_model.") for key in unexpected):
            hint = " (this is an original/LDM-layout checkpoint; gag-export reads diffusers-layout files)"
        raise ArtifactError(
            f"{path}: does not match {model_cls.__name__}{hint}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    dtype = precision.torch_dtype
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------- random weights


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_model(family: str, name: str, config: Mapping):
    from diffusers import AutoencoderKL

    if name == "vae":
        return AutoencoderKL.from_config(_init_kwargs(config))
    if name == DENOISER[family]:
        return _denoiser_class(family).from_config(_init_kwargs(config))
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if family == "flux" and name == "text_encoder_2":
        return T5EncoderModel(T5Config(**_init_kwargs(config)))
    text_config = CLIPTextConfig(**_init_kwargs(config))
    projected = family == "sdxl" and name == "text_encoder_2"
    return (CLIPTextModelWithProjection if projected else CLIPTextModel)(text_config)


def parameter_count(family: str, configs: Mapping[str, Mapping], components: Iterable[str]) -> int:
    """Parameters of these components, counted on the meta device (nothing allocated)."""
    total = 0
    with torch.device("meta"):
        for name in components:
            total += sum(p.numel() for p in _build_model(family, name, configs[name]).parameters())
    return total


def _check_memory(entry: ModelEntry, configs, components, precision: Precision) -> None:
    need = parameter_count(entry.family, configs, components) * precision.torch_dtype.itemsize
    available = available_bytes()
    if need > 0.9 * available:
        raise ResourceExhaustedError(
            f"random {entry.name} ({', '.join(components)}) needs ~{need / 2**30:.1f} GiB in {precision.value}, "
            f"{available / 2**30:.1f} GiB available: build fewer components (e.g. components=('{DENOISER[entry.family]}',)), "
            f"a smaller dtype, or use tiny-{entry.family}"
        )


def build_random_pipeline(
    entry: ModelEntry | str,
    dtype: Precision | str = "fp32",
    components: Iterable[str] | None = None,
    seed: int = 0,
    configs: Mapping[str, Mapping] | None = None,
):
    """The entry's full-size architecture with random weights (see the module docstring).

    For tiny-* entries this is the tiny architecture (seeded per component). `configs` replaces
    the shipped configs per component, e.g. to build a smaller variant.
    """
    entry = get_entry(entry) if isinstance(entry, str) else entry
    precision = Precision.parse(dtype)
    wanted = _components(entry.family, components)
    configs = {**entry_configs(entry), **(configs or {})}
    _check_memory(entry, configs, wanted, precision)

    models: dict[str, object] = {}
    dtype = precision.torch_dtype
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):  # built directly in dtype: no fp32 copy
        for index, name in enumerate(FAMILY_MODELS[entry.family]):
            models[name] = None
            if name in wanted:
                torch.manual_seed(seed + index)  # each component independent of which others are built
                model = _build_model(entry.family, name, configs[name]).eval()
                if any(p.dtype != dtype for p in model.parameters()):
                    model.to(dtype)
                models[name] = model

    clip_vocab = int(configs["text_encoder"]["vocab_size"])
    tokenizers = {"tokenizer": build_clip_tokenizer(clip_vocab)}
    if entry.family == "sdxl":
        tokenizers["tokenizer_2"] = build_clip_tokenizer(int(configs["text_encoder_2"]["vocab_size"]))
        extra = {"add_watermarker": False}
    else:
        tokenizers["tokenizer_2"] = build_t5_tokenizer()
        extra = {}
    scheduler = entry.scheduler.build(configs["scheduler"])
    pipe = _pipeline_class(entry.family)(**models, **tokenizers, scheduler=scheduler, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "load_pipeline",
    "weights_present",
    "download_command",
    "resolve_entry",
    "entry_configs",
    "shipped_config",
    "load_state_dict",
    "denoiser_from_file",
    "build_random_pipeline",
    "parameter_count",
]
