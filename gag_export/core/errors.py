"""Errors that the CLI turns into one clear line and a documented exit code.

Every layer raises these instead of printing or exiting, so the same failure reads the same
whether it came from the Python API or from `gag-export`.
"""

from __future__ import annotations


class GagExportError(Exception):
    """Base class: a failure with a message meant for the user and an exit code for the CLI."""

    exit_code = 1


class InvalidInputError(GagExportError, ValueError):
    """Bad option or argument value (shape, guidance parameter, unknown model or backend)."""

    exit_code = 2


class MissingDependencyError(GagExportError, ImportError):
    """An optional dependency (TensorRT, onnxruntime-gpu, Triton) is not importable here."""

    exit_code = 3


class CheckFailedError(GagExportError):
    """A graph or engine failed a check (checker, lint, parity)."""

    exit_code = 4


class ArtifactError(GagExportError):
    """A graph, manifest or engine is missing, corrupt, or does not match what it claims to be."""

    exit_code = 5


class WeightsNotFoundError(GagExportError, FileNotFoundError):
    """Checkpoint weights are not available locally and cannot be downloaded."""

    exit_code = 6


class ResourceExhaustedError(GagExportError):
    """Out of disk space or memory while writing an artifact (nothing half-written is left), or a
    stage whose estimated peak cannot fit in this machine's memory (`core.memory`)."""

    exit_code = 7


# 128 + the signal's number, as shells report a program stopped by it: Ctrl-C (SIGINT), SIGTERM
INTERRUPTED_EXIT_CODE = 130
TERMINATED_EXIT_CODE = 143

EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with --verbose output)",
    InvalidInputError.exit_code: "invalid input: bad option value, unknown model/backend, bad shape",
    MissingDependencyError.exit_code: "an optional dependency (TensorRT, Triton, onnxruntime-gpu, the export extra) is missing",
    CheckFailedError.exit_code: "a check failed (ONNX checker, TensorRT lint, parity), or a benchmarked variant did",
    ArtifactError.exit_code: "missing, corrupt or mismatched artifact (ONNX, manifest, engine)",
    WeightsNotFoundError.exit_code: "model weights not available locally and no network",
    ResourceExhaustedError.exit_code: ("out of disk space or memory while writing an artifact, or a stage (loading random "
                                       "weights, parity, an engine build) that cannot fit in this machine's memory"),
    INTERRUPTED_EXIT_CODE: "interrupted (Ctrl-C); nothing half-written is left",
    TERMINATED_EXIT_CODE: "terminated by SIGTERM (129: SIGHUP); nothing half-written is left",
}
