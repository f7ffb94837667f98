"""Tiny real pipelines and tokenizers, built from configs in code: no downloads, seconds, a few MB.

`build_tiny_sdxl_pipeline()` is a `StableDiffusionXLPipeline` and `build_tiny_flux_pipeline()` a
`FluxPipeline` with the real architectures at toy widths: an SDXL UNet with two levels,
cross-attention and `text_time` added embeddings; a FLUX transformer with one double- and one
single-stream block; AutoencoderKLs with the real 8x factor (four levels) and latent channels
(4 and 16); CLIP and T5 text encoders. Same seed, same weights.

Tokenizers are built in code too:
- CLIP: byte-level BPE (CLIP's pre-tokenizer, byte alphabet and `</w>` word ends) whose merges
  are learned here from a small built-in prompt corpus, deterministically. bos/eos sit at the
  last two ids of the model's vocabulary (tiny: 998/999; full-size: 49406/49407, as in the real
  tokenizer), pad = eos, 77 tokens. Text tokenizes sensibly; ids differ from the real tokenizer's.
- T5: a Unigram vocabulary of the corpus words plus single characters (pad 0, eos 1, unk 2).
The random-weight pipelines (loading.py) use these with the real vocabulary sizes, since the
real tokenizer files cannot be downloaded here.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Iterable

import torch

log = logging.getLogger(__name__)

CLIP_TEXT_LEN = 77
TINY_VOCAB = 1000
TINY_FLUX_TEXT_LEN = 32

# --------------------------------------------------------------------------- configs

_TINY_CLIP = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "max_position_embeddings": CLIP_TEXT_LEN,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    # Inside the tiny vocabulary (shared/EXPORT-NOTES.md): eos != 2 selects first-eos pooling.
    "bos_token_id": TINY_VOCAB - 2,
    "eos_token_id": TINY_VOCAB - 1,
    "pad_token_id": TINY_VOCAB - 1,
}

TINY_SDXL_CONFIGS: dict[str, dict] = {
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 64,  # text_encoder 32 + text_encoder_2 32
        "transformer_layers_per_block": [1, 2],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + pooled 32
        "norm_num_groups": 8,
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    },
    "text_encoder": dict(_TINY_CLIP),
    "text_encoder_2": dict(_TINY_CLIP),
}

TINY_FLUX_CONFIGS: dict[str, dict] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels * 2x2 packing
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # T5 d_model
        "pooled_projection_dim": 32,  # CLIP hidden size
        "guidance_embeds": False,
        "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    "text_encoder": dict(_TINY_CLIP),
    "text_encoder_2": {
        "vocab_size": TINY_VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
}

# SDXL base's DDPM betas (LCM/Euler/TCD schedulers start from these) and FLUX.1-schnell's flow schedule.
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


# --------------------------------------------------------------------------- tokenizers

# A small prompt corpus: the CLIP merges and the T5 pieces are learned from it.
_CORPUS = """
a photo of a cat sitting on a wooden table next to the window in soft morning light
portrait of an astronaut riding a horse on the moon, highly detailed digital painting
landscape with snowy mountains and a quiet lake at sunset, oil painting, warm colors
a city street in the rain at night with neon signs and reflections, cinematic lighting
close up of a red fox in the forest, autumn leaves, shallow depth of field, bokeh
an old lighthouse on a rocky coast during a storm, dramatic clouds, waves crashing
a bowl of fresh fruit with apples oranges and grapes, still life, studio photograph
a small cottage in a green valley with flowers and a river, watercolor illustration
a robot reading a book in a library, concept art, intricate details, sharp focus
a golden retriever puppy playing in the grass on a sunny day, professional photo
a futuristic spaceship flying over a desert planet with two moons, science fiction art
a woman wearing a blue dress standing in a field of sunflowers, summer, film grain
a cup of coffee and a croissant on a marble counter, morning, minimal composition
an ancient castle on a hill surrounded by fog, fantasy, epic scale, matte painting
a colorful parrot perched on a branch in the tropical jungle, vibrant, high resolution
a snowy village at christmas with lights in the windows, cozy, winter evening
a bicycle leaning against a brick wall, street photography, black and white
a dragon flying above the clouds, sunrise, detailed scales, trending on artstation
a plate of sushi on a black slate, food photography, top view, natural light
an underwater scene with coral reef, tropical fish and sunbeams, crystal clear water
a cute cartoon character with big eyes, 3d render, pixar style, smooth shading
a mountain cabin interior with a fireplace, wooden furniture, warm ambient light
a portrait of an elderly man with a beard, rembrandt lighting, dark background
a field of lavender under a starry sky, milky way, long exposure, night photography
a steaming bowl of ramen with egg and green onions, japanese restaurant, closeup
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _corpus_words() -> list[str]:
    text = _CORPUS.lower().replace(",", " , ")
    return text.split()


@functools.lru_cache(maxsize=None)
def _clip_bpe(n_merges: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(learned tokens, merges) of a byte-level BPE trained on the corpus, ties broken by pair order."""
    byte_chars = _bytes_to_unicode()
    counts = collections.Counter(_corpus_words())
    words = {}
    for word in counts:
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        words[word] = tuple(chars)
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter = collections.Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(best)
        tokens.append(merged)
        for word, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[word] = tuple(out)
    return tuple(tokens), tuple(merges)


def build_clip_tokenizer(vocab_size: int = TINY_VOCAB, model_max_length: int = CLIP_TEXT_LEN):
    """A CLIPTokenizer built in code: byte alphabet (512 ids), learned merges, bos/eos at the top ids.

    With `vocab_size` 1000 the ids fill 0..999; with 49408 (real CLIP) the BPE ids stay below
    ~1000 and bos/eos are 49406/49407 like the real tokenizer's.
    """
    from transformers import CLIPTokenizer

    if vocab_size < 514:
        raise ValueError(f"vocab_size must leave room for the 512 byte tokens and bos/eos, got {vocab_size}")
    byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
    base = byte_chars + [c + "</w>" for c in byte_chars]
    learned, merges = _clip_bpe(min(vocab_size, TINY_VOCAB) - len(base) - 2)
    vocab: dict[str, int] = {}
    for token in [*base, *learned]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (Unigram) built in code: pad 0, eos 1, unk 2, corpus words, single characters."""
    from transformers import T5TokenizerFast

    words = collections.Counter(_corpus_words())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        pieces.append(("▁" + word, -2.0 - 1.0 / count))
    alphabet: Iterable[str] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&%+*#@=<>[]"
    pieces.append(("▁", -6.0))
    for char in alphabet:
        pieces.append((char, -8.0))
        pieces.append(("▁" + char, -9.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------- pipelines


def _seeded(seed: int, build):
    """Run `build()` under a private RNG seeded with `seed` (the caller's RNG state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _clip_text_model(config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_cls(CLIPTextConfig(**config)).eval()


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with tiny random weights (LCMScheduler, as DMD2 uses)."""
    from diffusers import (
        AutoencoderKL,
        LCMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    configs = TINY_SDXL_CONFIGS

    def build():
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**configs["vae"]).eval(),
            text_encoder=_clip_text_model(configs["text_encoder"], projection=False),
            text_encoder_2=_clip_text_model(configs["text_encoder_2"], projection=True),
            tokenizer=build_clip_tokenizer(configs["text_encoder"]["vocab_size"]),
            tokenizer_2=build_clip_tokenizer(configs["text_encoder_2"]["vocab_size"]),
            unet=UNet2DConditionModel(**configs["unet"]).eval(),
            scheduler=LCMScheduler(**SDXL_SCHEDULER_CONFIG),
            add_watermarker=False,
        )

    pipe = _seeded(seed, build)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline with tiny random weights (FlowMatchEulerDiscreteScheduler, schnell settings).

    Call it with `max_sequence_length=TINY_FLUX_TEXT_LEN` (or any length <= 512).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    configs = TINY_FLUX_CONFIGS

    def build():
        t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"])).eval()
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
            vae=AutoencoderKL(**configs["vae"]).eval(),
            text_encoder=_clip_text_model(configs["text_encoder"], projection=False),
            tokenizer=build_clip_tokenizer(configs["text_encoder"]["vocab_size"]),
            text_encoder_2=t5,
            tokenizer_2=build_t5_tokenizer(),
            transformer=FluxTransformer2DModel(**configs["transformer"]).eval(),
        )

    pipe = _seeded(seed, build)
    pipe.set_progress_bar_config(disable=True)
    return pipe
