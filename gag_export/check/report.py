"""What a check found: `Finding`s of the lint, a `CheckResult` per component and check, the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import CheckFailedError
from ..export.parity import OutputParity

CHECKS = ("artifact", "onnx_checker", "shape_inference", "control_flow", "tensorrt_lint", "trt_parser", "precision", "parity")
TRT_VERSIONS = ("10", "11")


@dataclass(frozen=True)
class Finding:
    """One lint problem at one node: what, where, for which TensorRT versions, and what to do."""

    op: str
    node: str
    message: str
    hint: str = ""
    versions: tuple[str, ...] = TRT_VERSIONS
    severity: str = "error"  # "error" fails the lint; "warning" is reported only

    def __str__(self) -> str:
        trt = "/".join(f"{v}.x" for v in self.versions)
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"[TensorRT {trt}] {self.op} node {self.node!r}: {self.message}{hint}"


@dataclass(frozen=True)
class CheckResult:
    """One check of one component: status "passed" | "failed" | "skipped", and why."""

    component: str
    check: str
    status: str
    details: str = ""
    findings: tuple[Finding, ...] = ()
    parity: tuple[OutputParity, ...] = ()

    def __bool__(self) -> bool:
        return self.status != "failed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class CheckReport:
    """All results for one graphs folder; truthy when nothing failed."""

    graphs_dir: Path
    model: str
    results: list[CheckResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(self.results)

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r]

    def get(self, component: str, check: str) -> CheckResult | None:
        return next((r for r in self.results if r.component == component and r.check == check), None)

    def summary(self) -> str:
        lines = [f"{self.model} ({self.graphs_dir}): "
                 + ("all checks passed" if self else f"{len(self.failures())} check(s) failed")]
        for r in self.results:
            lines.append(f"  {r.component:16} {r.check:16} {r.status.upper():8} {r.details}")
            for finding in r.findings:
                lines.append(f"      {finding}")
            for p in r.parity:
                lines.append(f"      {p}")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """`CheckFailedError` (exit 4) naming every failed check, if any failed."""
        if not self:
            failed = ", ".join(f"{r.component}/{r.check}" for r in self.failures())
            raise CheckFailedError(f"{self.graphs_dir}: failed checks: {failed}\n{self.summary()}")


__all__ = ["CHECKS", "TRT_VERSIONS", "CheckReport", "CheckResult", "Finding"]
