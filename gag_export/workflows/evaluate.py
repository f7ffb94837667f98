"""`gag-export eval`: a scorer over a prompt set x a sweep grid, averaged per setting, as a table and a plot.

    prompts = read_prompts(Path("prompts.txt"))
    scorer = load_scorer("clip")                       # before the sampler: a missing scorer fails in seconds
    with Sampler.load("dmd2", "tensorrt") as sampler:
        result = run_eval(sampler, scorer, prompts, parse_grid("0,5,10", "15,inf", baseline=True), seed=0)
    write_outputs(result, Path("eval"))               # eval.md, eval.json, eval.csv, eval.png

Prompt i is sampled with seed `seed + i` at every setting, so within a prompt the settings differ by
guidance alone, and the prompts do not all share one noise. The mean over prompts is the setting's
score; the spread (standard deviation, and the standard error of the mean) says how far apart two
settings must be to mean something.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..core.atomic import write_atomic
from ..core.errors import InvalidInputError
from ..core.shapes import check_prompt
from ..runtime import GenerationConfig, Sampler
from .figures import pyplot, save_figure
from .sweep import GridSetting, SweepGrid, format_value, generate_grid

OUTPUT_NAMES = {"markdown": "eval.md", "json": "eval.json", "csv": "eval.csv", "plot": "eval.png"}


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"--prompts: cannot read {path}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidInputError(f"--prompts: {path} holds no prompt (one per line; '#' starts a comment)")
    for prompt in prompts:
        check_prompt(prompt)
    return prompts


def default_prompts() -> tuple[str, ...]:
    """The 24 prompts shipped with the package (written for this project: subjects, styles, text,
    scenes): `calibrate` and `eval` use them when no `--prompts` file is given."""
    with resources.as_file(resources.files(__package__) / "prompts.txt") as path:
        return tuple(read_prompts(path))


@dataclass(frozen=True)
class SettingScores:
    """A setting's scores, one per prompt in prompt order."""

    setting: GridSetting
    scores: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def std(self) -> float:
        """Sample standard deviation over prompts (0 for one prompt)."""
        n = len(self.scores)
        return math.sqrt(sum((s - self.mean) ** 2 for s in self.scores) / (n - 1)) if n > 1 else 0.0

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(len(self.scores))

    def row(self) -> dict:
        setting = self.setting
        return {"gag": "off" if setting.is_baseline else "on",
                "scale": None if setting.is_baseline else setting.scale,
                "eta": None if setting.is_baseline else format_value(setting.eta),
                "mean": self.mean, "std": self.std, "sem": self.sem,
                "min": min(self.scores), "max": max(self.scores), "n": len(self.scores)}


@dataclass(frozen=True)
class EvalResult:
    model: str
    backend: str
    scorer: str
    scorer_model: str
    definition: str
    prompts: tuple[str, ...]
    seed: int
    steps: int
    settings: tuple[SettingScores, ...]

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "scorer": self.scorer, "scorer_model": self.scorer_model,
                "definition": self.definition, "seeds": f"{self.seed} + prompt index", "steps": self.steps,
                "prompts": list(self.prompts),
                "settings": [{**s.row(), "scores": list(s.scores)} for s in self.settings]}


def run_eval(sampler: Sampler, scorer, prompts: list[str], grid: SweepGrid, *, seed: int = 0, steps: int | None = None,
             height: int | None = None, width: int | None = None, negative_prompt: str = "",
             on_image: Callable[[], None] | None = None) -> EvalResult:
    """Every prompt at every setting of `grid` through `sampler`, each image scored against its prompt."""
    scores: dict[GridSetting, list[float]] = {setting: [] for setting in grid.settings()}
    used_steps = None
    for index, prompt in enumerate(prompts):
        request = GenerationConfig(prompt, seed=seed + index, steps=steps, height=height, width=width,
                                   negative_prompt=negative_prompt)
        settings, images = [], []
        for setting, result in generate_grid(sampler, request, grid):
            settings.append(setting)
            images.append(result.image)
            used_steps = result.steps
            if on_image is not None:
                on_image()
        # one prompt's images at a time: a few images in memory, however long the prompt set
        for setting, value in zip(settings, scorer.score(images, [prompt] * len(images))):
            scores[setting].append(value)
    return EvalResult(sampler.entry.name, sampler.components.backend, scorer.name, scorer.model_id,
                      scorer.spec.definition, tuple(prompts), seed, used_steps,
                      tuple(SettingScores(setting, tuple(values)) for setting, values in scores.items()))


def render_eval_markdown(result: EvalResult) -> str:
    lines = [f"# {result.scorer} on {result.model} ({result.backend})", "",
             f"{len(result.prompts)} prompts, seed {result.seed} + prompt index, {result.steps} steps; "
             f"scorer {result.scorer_model}: {result.definition}. Mean over prompts, standard deviation and "
             "standard error of the mean.", "",
             "| GAG | scale | eta | mean | std | sem | min | max | n |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result.settings:
        row = s.row()
        scale = "" if row["scale"] is None else format_value(row["scale"])
        lines.append(f"| {row['gag']} | {scale} | {row['eta'] or ''} | {row['mean']:.3f} | {row['std']:.3f} | "
                     f"{row['sem']:.3f} | {row['min']:.3f} | {row['max']:.3f} | {row['n']} |")
    return "\n".join(lines) + "\n"


def render_eval_csv(result: EvalResult) -> str:
    text = io.StringIO()
    fields = ["gag", "scale", "eta", "mean", "std", "sem", "min", "max", "n"]
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for s in result.settings:
        row = s.row()
        writer.writerow({**row, "scale": "" if row["scale"] is None else format_value(row["scale"]), "eta": row["eta"] or ""})
    return text.getvalue()


def write_eval_plot(result: EvalResult, dest: Path) -> Path:
    """Mean score against scale, one line per eta (error bars: standard error over prompts); GAG off dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    guided = [s for s in result.settings if not s.setting.is_baseline]
    for eta in dict.fromkeys(s.setting.eta for s in guided):
        line = sorted((s for s in guided if s.setting.eta == eta), key=lambda s: s.setting.scale)
        ax.errorbar([s.setting.scale for s in line], [s.mean for s in line], yerr=[s.sem for s in line],
                    marker="o", capsize=3, label=f"eta {format_value(eta)}")
    for s in result.settings:
        if s.setting.is_baseline:
            ax.axhline(s.mean, color="grey", linestyle="--", label="GAG off")
    ax.set_xlabel("GAG scale")
    ax.set_ylabel(f"{result.scorer} score, mean over {len(result.prompts)} prompts")
    ax.set_title(f"{result.model} ({result.backend}), {result.steps} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, dest)


def write_outputs(result: EvalResult, out_dir: Path, plot: bool = True) -> list[Path]:
    """eval.md, eval.json, eval.csv (and eval.png) in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    texts = {"markdown": render_eval_markdown(result), "json": json.dumps(result.to_dict(), indent=2) + "\n",
             "csv": render_eval_csv(result)}
    written = []
    for kind, text in texts.items():
        write_atomic(out_dir / OUTPUT_NAMES[kind], text, make_parents=True)
        written.append(out_dir / OUTPUT_NAMES[kind])
    if plot:
        written.append(write_eval_plot(result, out_dir / OUTPUT_NAMES["plot"]))
    return written


__all__ = ["OUTPUT_NAMES", "EvalResult", "SettingScores", "read_prompts", "render_eval_csv", "render_eval_markdown", "run_eval",
           "write_outputs", "write_eval_plot"]
