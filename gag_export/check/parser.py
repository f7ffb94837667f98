"""TensorRT's (or TensorRT-RTX's) real ONNX parser over a graph: no build, no GPU; for `check`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.tensorrt import (
    TENSORRT,
    TensorRTCapabilities,
    TensorRTFlavor,
    get_flavor,
    import_tensorrt,
)
from .report import CheckResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParserError:
    """One node TensorRT's ONNX parser refused."""

    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.message}"


@dataclass
class ParsedNetwork:
    """What the parser made of a graph: the network (alive while its builder and parser are) or errors."""

    caps: TensorRTCapabilities
    errors: list[ParserError]
    network: Any = None
    _keep: tuple = ()  # builder and parser: the network is only valid while they live

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_layers(self) -> int:
        return self.network.num_layers if self.network is not None else 0


def parse_onnx(onnx_path: Path, flavor: TensorRTFlavor | str = TENSORRT) -> ParsedNetwork:
    """Parse a graph (and its external data) into a strongly typed network with the real ONNX parser
    of TensorRT or TensorRT-RTX; refused nodes come back as `ParserError`s, not as log lines."""
    flavor = get_flavor(flavor)
    trt = import_tensorrt(flavor)
    caps = TensorRTCapabilities.from_module(trt, flavor)

    class _Quiet(trt.ILogger):  # the parser's errors are read from the parser; its log goes to ours
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.debug("%s: %s", flavor.label, msg)

    logger = _Quiet()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if caps.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return ParsedNetwork(caps, [], network, (builder, parser, logger))
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        code, desc = str(e.code()).rsplit(".", 1)[-1], str(e.desc()).strip()
        detail = f": {desc}" if desc and desc != "false" else f" ({e.func()})" if e.func() else ""  # "false": a failed assert
        errors.append(ParserError(e.node_name() or f"#{e.node()}", e.node_operator() or "?", f"{code}{detail}"))
    return ParsedNetwork(caps, errors or [ParserError("<model>", "?", "the parser failed without saying why")])


def parse_result(path: Path, parser: str, notify, component: str) -> tuple[CheckResult | None, str | None]:
    """The `trt_parser` result of one graph (None when asked for no parser), and the builder whose
    parser accepted it (None unless it did)."""
    if parser == "none":
        return None, None
    from ..core.tensorrt import TENSORRT_RTX, get_flavor, installed_flavor  # noqa: PLC0415  (at call time: tests stand one in)

    flavor = installed_flavor() if parser == "auto" else get_flavor(parser)
    if flavor is None:
        return CheckResult(component, "trt_parser", "skipped",
                           f"neither TensorRT nor TensorRT-RTX is installed (`{TENSORRT_RTX.install}` runs its "
                           "real parser on any machine); the lint's op table stands in"), None
    notify(component, "trt_parser")
    parsed = parse_onnx(path, flavor)
    label = parsed.caps.label
    if parsed.ok:
        return CheckResult(component, "trt_parser", "passed", f"{label}: parsed into {parsed.num_layers} network layers"), label
    errors = [str(e) for e in parsed.errors]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return CheckResult(component, "trt_parser", "failed",
                       f"{label}'s ONNX parser refused {'; '.join(errors[:5])}{more}"), None


__all__ = ["ParsedNetwork", "ParserError", "parse_onnx", "parse_result"]
