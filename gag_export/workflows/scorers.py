"""Image-text scorers for `gag-export eval`, loaded from the local caches only (nothing is downloaded).

    scorer = load_scorer("clip")                         # openai/clip-vit-large-patch14 from the HF cache
    scorer.score([image_a, image_b], ["a red fox", "a red fox"])   # one float per image

- clip: CLIP score as torchmetrics' `CLIPScore` defines it (after Hessel et al. 2021, without their
  2.5 weight): 100 * max(cos(image embedding, text embedding), 0), from transformers' CLIPModel.
- pickscore: PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on human preferences,
  yuvalkirstain/PickScore_v1 with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K;
  score = logit_scale.exp() * cos, as its model card computes it (no clamp).
- imagereward: ImageReward-v1.0 (Xu et al. 2023) through its own package (`image-reward`), where it is
  importable and its weights are in its cache folder; its own `score`.

A scorer that is not in the cache stops with `WeightsNotFoundError` (exit 6) naming the model id and
the command that downloads it; `--scorer-model` takes another id or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import InvalidInputError, MissingDependencyError, WeightsNotFoundError


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    default_model: str
    processor: str | None  # None: the model's own processor
    definition: str        # what a score is, written into eval's outputs


SCORERS = {
    "clip": ScorerSpec("clip", "openai/clip-vit-large-patch14", None,
                       "CLIP score (torchmetrics' CLIPScore): 100 * max(cos(image embedding, text embedding), 0)"),
    "pickscore": ScorerSpec("pickscore", "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                            "PickScore: logit_scale.exp() * cos(image embedding, text embedding)"),
    "imagereward": ScorerSpec("imagereward", "ImageReward-v1.0", None, "ImageReward-v1.0 reward (its package's score)"),
}


def _not_cached(what: str, repos: Sequence[str], exc: Exception | None = None) -> WeightsNotFoundError:
    from ..models.loading import download_command  # noqa: PLC0415

    detail = f" ({type(exc).__name__})" if exc is not None else ""
    return WeightsNotFoundError(
        f"scorer {what} is not in the local Hugging Face cache{detail}; eval runs offline and never downloads: "
        f"get it with `{' && '.join(f'{download_command()} {repo}' for repo in repos)}` on a machine with "
        "network access (HF_HOME points at the cache)")


class ClipScorer:
    """CLIP-space agreement of each image with its prompt: the `clip` or the `pickscore` rule."""

    def __init__(self, spec: ScorerSpec, model, processor, model_id: str, device: str = "cpu"):
        self.spec, self.model_id, self.device = spec, model_id, device
        self.model = model.to(device).eval()
        self.processor = processor

    @property
    def name(self) -> str:
        return self.spec.name

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        import torch  # noqa: PLC0415

        if len(images) != len(prompts):
            raise InvalidInputError(f"score: {len(images)} images for {len(prompts)} prompts")
        max_length = getattr(self.processor.tokenizer, "model_max_length", 77)
        inputs = self.processor(text=list(prompts), images=[image.convert("RGB") for image in images],
                                return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        with torch.inference_mode():
            # the model's forward returns both embeddings L2-normalised (transformers 4 and 5 alike)
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(dim=-1)
            if self.spec.name == "pickscore":
                scores = self.model.logit_scale.exp().float() * cosine
            else:
                scores = 100.0 * cosine.clamp(min=0)
        return [float(s) for s in scores.cpu()]


class ImageRewardScorer:
    def __init__(self, model, model_id: str):
        self.spec, self.model, self.model_id = SCORERS["imagereward"], model, model_id

    @property
    def name(self) -> str:
        return self.spec.name

    def score(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        return [float(self.model.score(prompt, image.convert("RGB"))) for image, prompt in zip(images, prompts)]


def _device(device: str | None) -> str:
    if device:
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_scorer(name: str, model_id: str | None = None, device: str | None = None):
    """The scorer `name` (clip, pickscore, imagereward) from the local caches only; `model_id`: another
    Hub id or a local folder with the model (and, for clip, its processor)."""
    if name not in SCORERS:
        raise InvalidInputError(f"--scorer: unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    spec = SCORERS[name]
    model_id = model_id or spec.default_model
    if name == "imagereward":
        return _load_imagereward(model_id, _device(device))
    from transformers import CLIPModel, CLIPProcessor  # noqa: PLC0415

    processor_id = spec.processor or model_id
    if any((Path(model_id) / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        processor_id = model_id  # a local folder that brings its own processor
    needed = [repo for repo in dict.fromkeys([model_id, processor_id]) if not Path(repo).is_dir()]
    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _not_cached(f"{name}'s model {model_id!r}", needed or [model_id], exc) from exc
    try:
        processor = CLIPProcessor.from_pretrained(processor_id, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _not_cached(f"{name}'s processor {processor_id!r}", needed or [processor_id], exc) from exc
    return ClipScorer(spec, model, processor, model_id, _device(device))


def _load_imagereward(model_id: str, device: str) -> ImageRewardScorer:
    """ImageReward through its own package, only where it is installed and its files are already in its cache."""
    if importlib.util.find_spec("ImageReward") is None:
        raise MissingDependencyError("scorer imagereward needs the ImageReward package, which is not installed: "
                                     "pip install image-reward (then its weights, once, on a machine with network access)")
    root = Path(os.environ.get("IMAGEREWARD_CACHE", Path.home() / ".cache" / "ImageReward"))
    needed = [root / "ImageReward.pt", root / "med_config.json"]
    if model_id != SCORERS["imagereward"].default_model or not all(path.is_file() for path in needed):
        raise WeightsNotFoundError(
            f"scorer imagereward: {model_id!r} is not in {root} (needs {', '.join(p.name for p in needed)}); eval never "
            "downloads: run `python -c \"import ImageReward; ImageReward.load('ImageReward-v1.0')\"` once on a machine "
            "with network access (and bert-base-uncased in the Hugging Face cache)")
    os.environ["HF_HUB_OFFLINE"] = "1"  # its BLIP text encoder loads bert-base-uncased by name: from the cache only
    import ImageReward  # noqa: PLC0415

    try:
        model = ImageReward.load(model_id, device=device, download_root=str(root))
    except OSError as exc:
        raise _not_cached("imagereward's text encoder 'bert-base-uncased'", ["bert-base-uncased"], exc) from exc
    return ImageRewardScorer(model, model_id)


__all__ = ["SCORERS", "ClipScorer", "ImageRewardScorer", "ScorerSpec", "load_scorer"]
