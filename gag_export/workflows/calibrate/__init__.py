"""`gag-export calibrate`: measure GAG's pre-cap update norms over a prompt set, recommend eta per layer.

A workflow (only the CLI imports it): the runtime's torch sampler runs the model with GAG on, an
observer on the GAG layers (`GuidanceParams.observe`, `gag.math.update_norms`) sees each layer's
||par + zeta * orth|| per head and token before the cap, and `stats.NormStats` keeps per (layer,
step) exact count/mean/max/shares above the eta grid and a log-spaced histogram for quantiles.
Modules: `stats` (numpy), `run` (the run), `report` (JSON, the rule, `--apply`), `plots`.

    cal = run_calibration(CalibrationConfig("tiny-sdxl", steps=1, prompts=("a red fox",)))
    data = write_calibration(cal, Path("cal.json"))   # the document README's "Calibrate eta" shows
    write_plots(cal, data, Path("cal.json"))           # cal-norms.png, cal-clipped.png ([bench] extra)
    apply_calibration(data, Path("cal.json"), Path("graphs/tiny-sdxl"))   # the export's default eta
"""

from .plots import plot_paths, write_plots
from .report import (
    CALIBRATION_FORMAT,
    apply_calibration,
    calibration_document,
    check_calibration,
    read_calibration,
    write_calibration,
)
from ..evaluate import default_prompts
from .run import Calibration, CalibrationConfig, run_calibration
from .stats import DEFAULT_ETA_GRID, RESOLUTION, NormStats

__all__ = [
    "CALIBRATION_FORMAT", "DEFAULT_ETA_GRID", "RESOLUTION", "Calibration", "CalibrationConfig", "NormStats",
    "apply_calibration", "calibration_document", "check_calibration", "default_prompts", "plot_paths",
    "read_calibration", "run_calibration", "write_calibration", "write_plots",
]
