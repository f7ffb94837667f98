"""A calibration as JSON (the recommendation rule applied), checked on reading; plots; `--apply`.

The rule: per layer, eta = the (1 - clip_share)-quantile of the pre-cap update norm over every
prompt, step, head and token, so that `clip_share` of the tokens are capped. The cap's job is to
bound the outliers whose update would leave the contraction region, not to shrink every update;
a quantile makes "how many tokens are capped" the user's knob and means the same on every layer,
however far apart the layers' norms are (one eta for all caps nearly every token of some layers
and none of others when they differ widely). Per step: the same quantile of that step's norms, given only for
a layer where some step's value differs from the layer's by more than `step_tolerance` (relative).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ...core.atomic import atomic_path
from ...core.errors import ArtifactError, InvalidInputError
from .run import Calibration
from .stats import BINS_PER_DECADE, EDGES, REPORTED_QUANTILES, RESOLUTION

CALIBRATION_FORMAT = 1


def _cap_value(quantile: float) -> float:
    """A quantile as an eta (> 0, as GAGConfig requires): norms of 0 cannot be capped anyway."""
    return max(quantile, float(EDGES[0]))


def calibration_document(cal: Calibration) -> dict:
    """The calibration file's document (README, "Calibrate eta"; `check_calibration` reads it)."""
    cfg, stats = cal.config, cal.stats
    q = 1.0 - cfg.clip_share
    layers = []
    for i, name in enumerate(cal.layer_names):
        steps = []
        for s in range(cal.steps):
            count = int(stats.count[i, s])
            steps.append({
                "step": s, "count": count, "mean": float(stats.total[i, s] / count), "max": float(stats.maximum[i, s]),
                "quantiles": {str(p): stats.quantile(i, s, p) for p in REPORTED_QUANTILES},
                "clipped_share": [float(n) / count for n in stats.above[i, s]],
            })
        eta = _cap_value(stats.quantile(i, None, q))
        per_step = [_cap_value(stats.quantile(i, s, q)) for s in range(cal.steps)]
        varies = any(abs(e / eta - 1.0) > cfg.step_tolerance for e in per_step)
        layers.append({"name": name, "index": i, "steps": steps, "recommended_eta": eta,
                       "recommended_eta_per_step": per_step if varies else None})
    gag = cfg.gag
    return {
        "format": CALIBRATION_FORMAT, "model": cfg.model, "family": cal.family, "prompts": len(cfg.prompts),
        "steps": cal.steps, "seed": cfg.seed,
        "rule": {"name": "quantile", "clip_share": cfg.clip_share, "quantile": q, "step_tolerance": cfg.step_tolerance},
        "eta_grid": list(cfg.eta_grid),
        "histogram": {"bins_per_decade": BINS_PER_DECADE, "range": [float(EDGES[0]), float(EDGES[-1])],
                      "resolution": RESOLUTION},
        # what the model ran with while measured (eta null: no cap)
        "gag": {"scale": gag.scale, "eta": gag.eta if math.isfinite(gag.eta) else None, "zeta": gag.zeta,
                "alpha": gag.alpha, "layers": gag.layers, "method": gag.method},
        "weights": cfg.weights, "timesteps": cal.timesteps, "seconds": round(cal.seconds, 3),
        "layers": layers,
        "recommended": {"eta": [layer["recommended_eta"] for layer in layers], "layer_names": list(cal.layer_names)},
    }


def _require(condition: bool, where: str, why: str) -> None:
    if not condition:
        raise ArtifactError(f"calibration file: {where} {why}")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check_calibration(data) -> dict:
    """`data` if it is a calibration document of this format (every field the readers use), else
    ArtifactError naming the first field that is not."""
    _require(isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT, "format", f"must be {CALIBRATION_FORMAT}")
    for key, kind in (("model", str), ("family", str), ("prompts", int), ("steps", int), ("seed", int),
                      ("rule", dict), ("eta_grid", list), ("layers", list), ("recommended", dict)):
        _require(isinstance(data.get(key), kind), key, f"must be a {kind.__name__}")
    grid = data["eta_grid"]
    _require(bool(grid) and all(_positive(v) for v in grid), "eta_grid", "must hold numbers > 0")
    rule = data["rule"]
    _require(rule.get("name") == "quantile" and _positive(rule.get("clip_share")) and rule["clip_share"] < 1,
             "rule", "must be {'name': 'quantile', 'clip_share': a share in (0, 1)}")
    _require(len(data["layers"]) > 0, "layers", "is empty")
    for i, layer in enumerate(data["layers"]):
        where = f"layers[{i}]"
        _require(isinstance(layer, dict) and layer.get("index") == i and isinstance(layer.get("name"), str),
                 where, f"needs a name and index {i}")
        _require(_positive(layer.get("recommended_eta")) and layer["recommended_eta"] > 0, f"{where}.recommended_eta",
                 "must be a number > 0")
        per_step = layer.get("recommended_eta_per_step")
        _require(per_step is None or (isinstance(per_step, list) and len(per_step) == data["steps"]
                                      and all(_positive(v) for v in per_step)),
                 f"{where}.recommended_eta_per_step", f"must be null or {data['steps']} numbers")
        steps = layer.get("steps")
        _require(isinstance(steps, list) and [s.get("step") for s in steps] == list(range(data["steps"])),
                 f"{where}.steps", f"must hold steps 0..{data['steps'] - 1}")
        for s in steps:
            at = f"{where}.steps[{s['step']}]"
            _require(isinstance(s.get("count"), int) and s["count"] > 0, f"{at}.count", "must be > 0")
            _require(all(_positive(s.get(k)) for k in ("mean", "max")), at, "needs mean and max")
            quantiles = s.get("quantiles")
            _require(isinstance(quantiles, dict) and all(_positive(quantiles.get(str(p))) for p in REPORTED_QUANTILES),
                     f"{at}.quantiles", f"must hold {[str(p) for p in REPORTED_QUANTILES]}")
            shares = s.get("clipped_share")
            _require(isinstance(shares, list) and len(shares) == len(grid) and all(_positive(v) and v <= 1 for v in shares),
                     f"{at}.clipped_share", "must hold one share per eta_grid value")
    recommended = data["recommended"]
    names = [layer["name"] for layer in data["layers"]]
    _require(recommended.get("layer_names") == names, "recommended.layer_names", "must list the layers in index order")
    _require(recommended.get("eta") == [layer["recommended_eta"] for layer in data["layers"]], "recommended.eta",
             "must hold each layer's recommended_eta in index order")
    return data


def write_calibration(cal: Calibration, dest: Path) -> dict:
    data = check_calibration(calibration_document(cal))
    with atomic_path(Path(dest), make_parents=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    return data


def read_calibration(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the calibration file {path}: {exc}") from None
    return check_calibration(data)


def apply_calibration(data: dict, source: Path, graphs_dir: Path) -> list[float]:
    """Record `data`'s per-layer recommended eta as the defaults of the export in `graphs_dir`;
    InvalidInputError when that export is of another model or rewrote other layers."""
    from ...artifacts.manifest import Manifest, apply_gag_defaults  # noqa: PLC0415

    manifest = Manifest.load(Path(graphs_dir))
    if manifest.model != data["model"]:
        raise InvalidInputError(f"--apply: {graphs_dir} holds {manifest.model!r}, the calibration is of {data['model']!r}")
    names = data["recommended"]["layer_names"]
    exported = manifest.gag_layer_names
    if exported != names:
        raise InvalidInputError(
            f"--apply: {graphs_dir} rewrote {len(exported or [])} GAG layers, the calibration measured {len(names)} "
            + ("(other layers: calibrate with the export's --gag-layers)" if exported else
               "(an export made before per-layer guidance: re-export it)"))
    eta = list(data["recommended"]["eta"])
    apply_gag_defaults(Path(graphs_dir), eta=eta, source=f"calibrate {source}")
    return eta


__all__ = ["CALIBRATION_FORMAT", "apply_calibration", "calibration_document", "check_calibration", "read_calibration",
           "write_calibration"]
