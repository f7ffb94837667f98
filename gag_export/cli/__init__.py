"""The `gag-export` command line: options become configs, configs go to the layers.

No logic lives here. Each command turns its options into the objects the layers take and
reports what they return. Errors from the layers (`GagExportError`) become one line on stderr
and the exit code documented in README (see `gag_export.core.errors.EXIT_CODES`).
"""

from . import build_commands, lora_commands, run_commands, serve_commands, sweep_commands, tune_commands  # noqa: F401  (each registers its commands on `cli`)
from .app import cli, main

__all__ = ["cli", "main"]
