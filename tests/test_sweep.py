"""`gag-export sweep` and `gag-export eval` (gag_export/workflows/sweep.py, evaluate.py, scorers.py and the
contact sheet in images.py) on tiny-sdxl, torch and ONNX Runtime, one step, 64x64 tiles.

The scorer is a tiny random CLIP built here (transformers' CLIPConfig, the project's tiny CLIP tokenizer),
saved to a folder and loaded as a user's local model would be."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from runtime_helpers import PROMPT, exported_graphs, torch_sampler, torch_threads

from gag_export.cli import cli
from gag_export.images import SheetLayout, contact_sheet, read_png_metadata
from gag_export.runtime import GenerationConfig
from gag_export.workflows.scorers import load_scorer
from gag_export.workflows.sweep import SHEET_NAME, GridSetting, parse_grid, run_sweep


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    with torch_sampler(tmp_path_factory, "tiny-sdxl") as sampler:
        yield sampler


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP model and its processor saved like a downloaded one (32-pixel images, 77 tokens)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from gag_export.models.tiny import _TINY_CLIP, build_clip_tokenizer

    torch.manual_seed(0)
    text = {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
              "num_attention_heads": 4, "num_hidden_layers": 2}
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder


def assert_sheet(sheet: Image.Image, layout, tiles: dict, rows: list, columns: list) -> None:
    """Sheet of len(rows) x len(columns) tiles plus label margins; each tile is its file pixel for pixel;
    the margins hold ink (the labels)."""
    width, height = Image.open(next(iter(tiles.values()))).size
    assert (layout.tile_width, layout.tile_height) == (width, height)
    assert layout.left > 0 and layout.top > 0
    assert sheet.size == (layout.left + len(columns) * (width + layout.gutter),
                          layout.top + len(rows) * (height + layout.gutter))
    for (row, column), path in tiles.items():
        tile = np.asarray(sheet.crop(layout.box(row, column)))
        assert np.array_equal(tile, np.asarray(Image.open(path).convert("RGB"))), path
    pixels = np.asarray(sheet.convert("L"))
    assert pixels[layout.top:, : layout.left - layout.gutter].min() < 128, "no row label"
    assert pixels[: layout.top - layout.gutter, layout.left:].min() < 128, "no column label"


def test_sweep_torch_sheet_tiles_and_metadata(sdxl, tmp_path):
    grid = parse_grid("0,10", "1,inf", baseline=True)
    request = GenerationConfig(PROMPT, seed=3, steps=1)
    result = run_sweep(sdxl, request, grid, tmp_path)
    sheet = Image.open(result.sheet)
    assert result.rows == ("GAG off", "scale 0", "scale 10") and result.columns == ("eta 1", "eta inf")
    cells = {(0, 0): result.tiles[GridSetting(None, None)]}
    cells.update({(1 + i, j): result.tiles[GridSetting(s, e)] for i, s in enumerate(grid.scales)
                  for j, e in enumerate(grid.etas)})
    assert_sheet(sheet.convert("RGB"), result.layout, cells, list(result.rows), list(result.columns))
    blank = np.asarray(sheet.convert("RGB").crop(result.layout.box(0, 1)))
    assert (blank == 255).all(), "the baseline row has one tile; the rest of it stays blank"
    # each tile carries generate's metadata with its own setting; the sheet names the grid
    tile = read_png_metadata(result.tiles[GridSetting(10.0, math.inf)])
    assert (tile["gag_scale"], tile["gag_eta"], tile["seed"], tile["steps"]) == ("10.0", "inf", "3", "1")
    assert read_png_metadata(result.tiles[GridSetting(None, None)])["gag"] == "off"
    meta = read_png_metadata(result.sheet)
    assert json.loads(meta["sweep_scales"]) == ["0", "10"] and json.loads(meta["sweep_etas"]) == ["1", "inf"]
    assert meta["prompt"] == PROMPT and "gag_scale" not in meta
    # guidance changes the image (else the sheet shows nothing), and the tile equals a plain generate
    images = {s: np.asarray(Image.open(p)) for s, p in result.tiles.items()}
    assert not np.array_equal(images[GridSetting(0.0, math.inf)], images[GridSetting(10.0, math.inf)])
    again = sdxl.generate(GenerationConfig(PROMPT, seed=3, steps=1, gag=sdxl.gag_params(10.0, math.inf)))
    assert np.array_equal(np.asarray(again.image), images[GridSetting(10.0, math.inf)])


def test_sweep_cli_ort(tmp_path_factory, tmp_path):
    graphs = exported_graphs(tmp_path_factory, "tiny-sdxl")
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", "--model", "tiny-sdxl", "--prompt", PROMPT, "--backend", "ort",
                                      "--graphs", str(graphs), "--no-build", "--threads", "1", "--steps", "1",
                                      "--scale", "5", "--eta", "2,inf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    sheet = Image.open(out / SHEET_NAME).convert("RGB")
    # the sheet says where its tiles lie
    tiles = {(0, 0): out / "scale-5_eta-2.png", (0, 1): out / "scale-5_eta-inf.png"}
    layout = SheetLayout(**json.loads(read_png_metadata(out / SHEET_NAME)["sweep_layout"]))
    assert_sheet(sheet, layout, tiles, ["scale 5"], ["eta 2", "eta inf"])
    assert read_png_metadata(tiles[0, 1])["backend"] == "ort"


@pytest.mark.parametrize("option, value, word", [
    ("--scale", "0,500", "scale"), ("--scale", "-2", "scale"), ("--eta", "0", "eta"), ("--eta", "5,-1", "eta"),
    ("--eta", "nan", "eta"), ("--scale", "ten", "not a number"), ("--scale", "5,5", "twice"),
])
def test_bad_values_exit_2_nothing_written(tmp_path, option, value, word):
    out = tmp_path / "out"
    for command in (["sweep", "--prompt", "x"], ["eval", "--prompts", str(tmp_path / "absent.txt")]):
        result = CliRunner().invoke(cli, [*command, "--model", "tiny-sdxl", "--backend", "torch", option, value,
                                          "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {option}") and word in lines[0]
        assert not out.exists()


def test_eval_writes_table_with_a_row_per_setting(tiny_clip, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# a comment\n{PROMPT}\n\na red fox in the snow\n")
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-sdxl", "--prompts", str(prompts), "--backend", "torch",
                                      "--graphs", str(tmp_path / "no-graphs"), "--threads", "1", "--steps", "1",
                                      "--scale", "0,10", "--eta", "inf", "--no-gag", "--scorer-model", str(tiny_clip),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["prompts"] == [PROMPT, "a red fox in the snow"] and data["scorer"] == "clip"
    rows = [(s["gag"], s["scale"], s["eta"]) for s in data["settings"]]
    assert rows == [("off", None, None), ("on", 0.0, "inf"), ("on", 10.0, "inf")]
    for setting in data["settings"]:
        assert len(setting["scores"]) == setting["n"] == 2
        assert all(math.isfinite(s) and 0 <= s <= 100 for s in setting["scores"])
        assert setting["mean"] == pytest.approx(sum(setting["scores"]) / 2)
    assert len({tuple(s["scores"]) for s in data["settings"]}) > 1, "every setting scored the same"
    csv_lines = (out / "eval.csv").read_text().splitlines()
    assert csv_lines[0].startswith("gag,scale,eta,mean") and len(csv_lines) == 4
    assert (out / "eval.md").read_text().count("\n| o") == 3
    assert Image.open(out / "eval.png").size[0] > 100


def test_clip_and_pickscore_rules(tiny_clip):
    """CLIP score is 100 * max(cos, 0), PickScore logit_scale.exp() * cos, of the same embeddings."""
    clip, pick = load_scorer("clip", str(tiny_clip), "cpu"), load_scorer("pickscore", str(tiny_clip), "cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = [PROMPT, "a red fox", "a bowl of soup"]
    clip_scores, pick_scores = clip.score(images, prompts), pick.score(images, prompts)
    scale = float(pick.model.logit_scale.detach().exp())
    assert any(c > 0 for c in clip_scores), "no positive cosine: the comparison below would test only the clamp"
    for c, p in zip(clip_scores, pick_scores):
        assert c == pytest.approx(max(0.0, 100 * p / scale), abs=1e-4)
    assert clip.score(images[:1], prompts[:1]) == pytest.approx(clip_scores[:1], abs=1e-5)  # batch-independent


def test_scorer_not_in_cache_exit_6(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    result = CliRunner().invoke(cli, ["eval", "--model", "tiny-sdxl", "--prompts", str(prompts), "--backend", "torch",
                                      "--scorer", "pickscore", "--scorer-model", "gag-export-tests/not-cached",
                                      "--no-plot", "--out", str(tmp_path / "out")])
    assert result.exit_code == 6, result.output
    line = result.output.strip().splitlines()[-1]
    assert "'gag-export-tests/not-cached'" in line and "download gag-export-tests/not-cached" in line
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in line  # PickScore's processor is needed too
    assert not list((tmp_path / "out").glob("eval.*"))


def test_a_long_title_wraps_onto_more_lines_and_is_never_cut():
    tiles = [[Image.new("RGB", (64, 64), (90, 90, 90))] * 2]
    short, short_layout = contact_sheet(tiles, ["scale 5"], ["eta 2", "eta inf"], title="tiny-sdxl")
    long, long_layout = contact_sheet(tiles, ["scale 5"], ["eta 2", "eta inf"],
                                      title="tiny-sdxl (torch), seed 3, 4 steps: " + "a red fox in the snow " * 3)
    assert long.width == short.width and long_layout.left == short_layout.left
    assert long_layout.top > short_layout.top + short_layout.tile_height // 4  # extra title lines
    header = np.asarray(long.convert("L"))[: long_layout.top - long_layout.gutter]
    inked_rows = np.flatnonzero((header < 128).any(axis=1))
    assert inked_rows.max() > short_layout.top  # ink below where a one-line title ends
