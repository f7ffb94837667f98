"""A small writer for protobuf text format, enough for Triton's `config.pbtxt`.

Values map to text format as follows: `str` -> quoted string, `bool` -> true/false, `int`/`float`
-> number, `Token` -> a bare identifier (enum values: `TYPE_FP32`, `KIND_GPU`), `dict` -> a
message `{ ... }`, a list of dicts -> one block per element (repeated message, map entries
included), a list of scalars -> `[a, b]`. Keys keep their insertion order; `None` values are left
out. The tests parse every generated file with protobuf's own `text_format` into Triton's
`ModelConfig`, so a typo in a field name fails there, not on a server.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


class Token(str):
    """An enum value or other bare identifier, written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, Token):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"protobuf text format has no literal for {value!r}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string literal
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as protobuf text")


def _message(fields: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_message(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(item, Mapping) for item in value):
                for item in value:
                    lines += [f"{pad}{key} {{", *_message(item, indent + 1), f"{pad}}}"]
            elif any(isinstance(item, Mapping) for item in value):
                raise TypeError(f"{key}: a list mixes messages and scalars")
            else:
                lines.append(f"{pad}{key}: [{', '.join(_scalar(item) for item in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def dumps(fields: Mapping[str, Any]) -> str:
    """`fields` as protobuf text format (one field per line, two-space indents, trailing newline)."""
    return "\n".join(_message(fields, 0)) + "\n"
