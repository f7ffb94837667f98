"""LoRA files fused at export (`--lora PATH[:SCALE]`, gag_export/models/lora.py).

The LoRA files are written here, in diffusers/PEFT keys (with PEFT metadata: lora_alpha != rank)
and in kohya keys (lora_down/lora_up/alpha), for tiny-sdxl (linear and conv layers) and tiny-flux
(kohya FLUX: BFL block names, a fused qkv). The reference is diffusers' own
`load_lora_weights` + `set_adapters(adapter_weights=...)` + `fuse_lora` (PEFT backend).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_helpers import exported, pipeline, session, shared_root
from safetensors.torch import save_file

from gag_export.artifacts.manifest import Manifest
from gag_export.cli.app import cli
from gag_export.core.errors import ArtifactError, InvalidInputError
from gag_export.core.names import MANIFEST_NAME
from gag_export.export import ExportConfig, export_model
from gag_export.export.parity import load_reference
from gag_export.models import ImageShape, get_entry
from gag_export.models.lora import LoraSpec, fuse_loras, lora_deltas
from gag_export.models.tiny import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline

RANK = 4
SDXL_TARGETS = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2",
                "down_blocks.0.resnets.0.conv1",            # 3x3 conv
                "down_blocks.1.resnets.0.conv_shortcut")    # 1x1 conv
FLUX_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                "single_transformer_blocks.0.proj_out")


def _lora_pair(module: torch.nn.Module, generator: torch.Generator):
    """(A, B) of one random rank-RANK LoRA layer for `module` (conv: A over the kernel, B 1x1)."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
        up = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
    else:
        down = torch.randn(RANK, module.in_features, generator=generator)
        up = torch.randn(module.out_features, RANK, generator=generator)
    return down * 0.1, up * 0.1


def write_peft_lora(path: Path, denoiser, prefix: str, targets, seed: int, alpha: float | None = None,
                    extra: dict | None = None) -> Path:
    """diffusers/PEFT keys (`<prefix>.<module>.lora_A.weight`); `alpha`: PEFT metadata's lora_alpha."""
    modules = dict(denoiser.named_modules())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for target in targets:
        state[f"{prefix}.{target}.lora_A.weight"], state[f"{prefix}.{target}.lora_B.weight"] = \
            _lora_pair(modules[target], generator)
    state.update(extra or {})
    metadata = None
    if alpha is not None:  # what diffusers' save_lora_weights writes for a LoraConfig
        config = {f"{prefix}.r": RANK, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": list(targets)}
        for key in extra or {}:  # text-encoder layers: their own LoraConfig
            owner, module = key.split(".", 1)
            config.update({f"{owner}.r": RANK, f"{owner}.lora_alpha": RANK,
                           f"{owner}.target_modules": [module.split(".lora_")[0]]})
        metadata = {"lora_adapter_metadata": json.dumps(config)}
    save_file(state, str(path), metadata=metadata)
    return path


def write_kohya_sdxl_lora(path: Path, unet, seed: int, alpha: float) -> Path:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    peft = {}
    for target in SDXL_TARGETS:
        peft[f"unet.{target}.lora_A.weight"], peft[f"unet.{target}.lora_B.weight"] = \
            _lora_pair(modules[target], generator)
    kohya = convert_state_dict_to_kohya(peft)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    save_file({k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in kohya.items()}, str(path))
    return path


def write_kohya_flux_lora(path: Path, transformer, seed: int) -> Path:
    """kohya FLUX keys on BFL's names (one fused qkv, split by diffusers' converter), alphas != rank."""
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(seed)
    dim = modules["transformer_blocks.0.attn.to_q"].in_features
    linear2 = modules["single_transformer_blocks.0.proj_out"]
    state = {}
    for name, (out_features, in_features), alpha in (
            ("double_blocks_0_img_attn_qkv", (3 * dim, dim), 2.0),
            ("double_blocks_0_img_attn_proj", (dim, dim), 8.0),
            ("single_blocks_0_linear2", (linear2.out_features, linear2.in_features), 1.0)):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.1
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.1
        state[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def tiny_loras(tmp_path: Path, family: str, denoiser) -> tuple[Path, Path]:
    """(PEFT-format, kohya-format) LoRA files for the tiny model of `family`."""
    if family == "sdxl":
        return (write_peft_lora(tmp_path / "peft.safetensors", denoiser, "unet", SDXL_TARGETS, 1, alpha=8.0),
                write_kohya_sdxl_lora(tmp_path / "kohya.safetensors", denoiser, 2, alpha=2.0))
    return (write_peft_lora(tmp_path / "peft.safetensors", denoiser, "transformer", FLUX_TARGETS, 1),
            write_kohya_flux_lora(tmp_path / "kohya.safetensors", denoiser, 2))


# ------------------------------------------------------------------------------------------ specs


def test_spec_parse_scale_and_record(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    assert LoraSpec.parse(str(path)) == LoraSpec(path, 1.0)
    spec = LoraSpec.parse(f"{path}:-0.25")
    assert spec.scale == -0.25
    assert spec.record() == {"name": "a.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "scale": -0.25}


@pytest.mark.parametrize("text, message", [
    ("{dir}/a.safetensors:abc", "must be a number"),
    ("{dir}/a.safetensors:nan", "finite"),
    ("{dir}/a.safetensors:inf", "finite"),
    ("{dir}/missing.safetensors", "no such file"),
    ("{dir}/a.bin", "only .safetensors"),
])
def test_spec_bad_input(tmp_path, text, message):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "a.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidInputError, match=message):
        LoraSpec.parse(text.format(dir=tmp_path))


# ------------------------------------------------------------- fused == diffusers' fuse_lora


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_fused_equals_diffusers_fuse_lora(tmp_path, family, caplog):
    """Two LoRAs, one per format, scales 0.7 and -1.3: fuse_loras gives diffusers' fused weights."""
    pipe = build_tiny_sdxl_pipeline() if family == "sdxl" else build_tiny_flux_pipeline()
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    peft_file, kohya_file = tiny_loras(tmp_path, family, denoiser)
    if family == "sdxl":  # a text-encoder layer too: diffusers fuses it, gag-export skips it with a warning
        name, q_proj = next((n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith("self_attn.q_proj"))
        a, b = _lora_pair(q_proj, torch.Generator().manual_seed(3))
        write_peft_lora(peft_file, denoiser, "unet", SDXL_TARGETS, 1, alpha=8.0, extra={
            f"text_encoder.{name}.lora_A.weight": a, f"text_encoder.{name}.lora_B.weight": b})
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    ours = copy.deepcopy(denoiser)
    specs = [LoraSpec(peft_file, 0.7), LoraSpec(kohya_file, -1.3)]
    with caplog.at_level(logging.WARNING, logger="gag_export.models.lora"):
        records = fuse_loras(ours, specs, family)
    assert [r["scale"] for r in records] == [0.7, -1.3]
    if family == "sdxl":
        assert "1 text-encoder layers skipped" in caplog.text

    pipe.load_lora_weights(str(peft_file), adapter_name="first")
    pipe.load_lora_weights(str(kohya_file), adapter_name="second")
    pipe.set_adapters(["first", "second"], adapter_weights=[0.7, -1.3])
    pipe.fuse_lora(components=[("unet" if family == "sdxl" else "transformer")], lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay, the LoRA layers go: the original parameter names again
    reference = dict(denoiser.named_parameters())
    changed = 0
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(param, base[name])
        if not torch.equal(param, base[name]):
            assert (param - base[name]).abs().max() > 1e-3  # a real change, not rounding
    # both files touch the same layers on SDXL; on FLUX the kohya qkv is to_q/to_k/to_v, plus to_out.0
    assert changed == (4 if family == "sdxl" else 6)


# ------------------------------------------------------------------------------ bad input


def test_wrong_family_and_unknown_keys_refused_before_writing(tmp_path):
    sdxl = pipeline("tiny-sdxl")
    flux_lora = write_peft_lora(tmp_path / "flux.safetensors", pipeline("tiny-flux").transformer, "transformer",
                                FLUX_TARGETS, 1)
    kohya_flux = write_kohya_flux_lora(tmp_path / "kohya_flux.safetensors", pipeline("tiny-flux").transformer, 2)
    junk = tmp_path / "junk.safetensors"
    save_file({"unet.no_such_block.lora_A.weight": torch.zeros(RANK, 8),
               "unet.no_such_block.lora_B.weight": torch.zeros(8, RANK)}, str(junk))
    sdxl_lora = write_peft_lora(tmp_path / "sdxl.safetensors", sdxl.unet, "unet", SDXL_TARGETS, 1)
    shapes = {n: tuple(p.shape) for n, p in sdxl.unet.named_parameters()}
    for path in (flux_lora, kohya_flux, junk):
        with pytest.raises(InvalidInputError, match=f"--lora {path}"):
            lora_deltas([LoraSpec(path)], "sdxl", shapes, sdxl.unet.config)
    flux_shapes = {n: tuple(p.shape) for n, p in pipeline("tiny-flux").transformer.named_parameters()}
    with pytest.raises(InvalidInputError, match="match no parameter of the flux denoiser"):
        lora_deltas([LoraSpec(sdxl_lora)], "flux", flux_shapes)
    out = tmp_path / "graphs"
    entry = get_entry("tiny-sdxl")
    config = ExportConfig("tiny-sdxl", out, ImageShape(entry.height, entry.width), gag=None, components=("unet",),
                          loras=(LoraSpec(flux_lora),))
    with pytest.raises(InvalidInputError, match="flux.safetensors"):
        export_model(sdxl, entry, config)
    assert not out.exists()


@pytest.mark.parametrize("suffix, code, message", [
    (":nan", 2, "finite"),
    ("x:1", 2, "only .safetensors"),
    ("_missing.safetensors", 2, "no such file"),
])
def test_cli_bad_lora_refused(tmp_path, suffix, code, message):
    good = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(good))
    text = f"{good}{suffix}" if suffix.startswith(":") else str(tmp_path / f"a{suffix}")
    out = tmp_path / "graphs"
    result = CliRunner().invoke(cli, ["export", "--model", "tiny-sdxl", "--out", str(out), "--lora", text])
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not out.exists()


def test_generate_lora_needs_torch_backend(tmp_path):
    lora = write_peft_lora(tmp_path / "a.safetensors", pipeline("tiny-sdxl").unet, "unet", SDXL_TARGETS, 1)
    png = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["generate", "--model", "tiny-sdxl", "--prompt", "a fox", "--backend", "ort",
                                      "--graphs", str(tmp_path / "graphs"), "--out", str(png), "--lora", str(lora)])
    assert result.exit_code == 2, result.output
    assert "--lora is for --backend torch" in result.output and "export --lora" in result.output
    assert not png.exists() and not (tmp_path / "graphs").exists()


# ------------------------------------------------------------------- export with a LoRA


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """tiny-sdxl's UNet (no GAG) exported with two LoRAs; the pipeline is the shared cached one."""
    folder = tmp_path_factory.mktemp("lora")
    pipe = pipeline("tiny-sdxl")
    peft_file, kohya_file = tiny_loras(folder, "sdxl", pipe.unet)
    specs = (LoraSpec(peft_file, 0.7), LoraSpec(kohya_file, -1.3))
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    entry = get_entry("tiny-sdxl")
    config = ExportConfig("tiny-sdxl", folder / "graphs", ImageShape(entry.height, entry.width), gag=None,
                          components=("unet",), loras=specs)
    manifest = export_model(pipe, entry, config)
    after = dict(pipe.unet.named_parameters())
    restored = all(torch.equal(before[n], after[n]) for n in before)
    return manifest, specs, config, restored


def test_export_with_lora_differs_and_is_recorded(lora_export, tmp_path_factory):
    manifest, specs, _, restored = lora_export
    assert restored  # a pipeline not handed over (release=False) comes back without the LoRA
    assert Manifest.load(manifest.graphs_dir).loras == [s.record() for s in specs]
    plain = exported("sdxl_nogag_unet", shared_root(tmp_path_factory))
    assert plain.loras == [] and plain.data["loras"] == []
    reference = load_reference(manifest.graphs_dir, manifest.components["unet"]["parity_reference"])
    feed = dict(reference.feed)
    with_lora = session(manifest.graph_path("unet")).run(None, feed)[0]
    without = session(plain.graph_path("unet")).run(None, feed)[0]
    assert np.abs(with_lora - without).max() > 1e-3
    # ...and it is the fused torch model's output (recorded at export from the fused UNet)
    np.testing.assert_allclose(with_lora, next(iter(reference.outputs.values())), atol=1e-4, rtol=1e-4)


def test_manifest_loras_validated(lora_export, tmp_path):
    manifest = lora_export[0]
    for bad in ({"name": "a", "sha256": "xyz", "scale": 1.0}, {"name": "a", "sha256": "0" * 64, "scale": float("nan")},
                "a.safetensors"):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest.data, "loras": [bad]}))
        with pytest.raises(ArtifactError, match=r"loras\[0\]"):
            Manifest.load(tmp_path)


def test_partial_export_refuses_other_loras(lora_export):
    manifest, _, config, _ = lora_export
    before = manifest.path.read_bytes()
    entry = get_entry("tiny-sdxl")
    plain = ExportConfig("tiny-sdxl", config.out_dir, config.shape, gag=None, components=("vae_decoder",))
    with pytest.raises(InvalidInputError, match="loras"):
        export_model(pipeline("tiny-sdxl"), entry, plain)
    assert manifest.path.read_bytes() == before


def test_ensure_graphs_never_takes_other_loras(lora_export):
    from gag_export.workflows.artifacts import ensure_graphs

    manifest, specs, config, _ = lora_export
    assert ensure_graphs("tiny-sdxl", config.out_dir, loras=specs) is False  # the same LoRAs: reused
    assert ensure_graphs("tiny-sdxl", config.out_dir) is False  # None: whatever the export carries
    for other in ((), specs[:1], (LoraSpec(specs[0].path, 0.5), specs[1])):
        with pytest.raises(InvalidInputError, match="was exported with"):
            ensure_graphs("tiny-sdxl", config.out_dir, loras=other)


def test_torch_backend_fuses_loras(lora_export, tmp_path):
    from gag_export.runtime import BackendOptions, load_components

    specs = lora_export[1]
    components = load_components("tiny-sdxl", "torch", graphs=tmp_path,
                                 options=BackendOptions(threads=1, loras=specs))
    base = pipeline("tiny-sdxl").unet
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    deltas = lora_deltas(specs, "sdxl", shapes, base.config)
    fused = dict(components.pipe.unet.named_parameters())
    for name, param in base.named_parameters():
        torch.testing.assert_close(fused[name], param + deltas.get(name, 0), rtol=0, atol=1e-6)
