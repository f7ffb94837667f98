"""Image sizes and the positive-integer rule every size and batch follows; the prompt's text rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError


def require_positive_int(label: str, value: Any) -> None:
    """InvalidInputError naming `label` unless `value` is an integer > 0 (a bool is not one): the
    check of every size and batch, whether it arrives as an option, a config field or a shape."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{label}: must be a positive integer, got {value!r}")


def check_prompt(text: Any, label: str = "prompt", max_chars: int | None = None) -> str:
    """The one prompt rule (CLI, Python API, server): text that is valid UTF-8 (no lone surrogates,
    which is what undecodable command-line bytes become), without NUL, at most `max_chars` long."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{label}: must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{label}: not valid UTF-8 (character {exc.start} cannot be encoded)") from None
    if "\x00" in text:
        raise InvalidInputError(f"{label}: contains a NUL character")
    if max_chars is not None and len(text) > max_chars:
        raise InvalidInputError(f"{label}: {len(text)} characters, at most {max_chars} are accepted")
    return text


@dataclass(frozen=True)
class ImageShape:
    """Output image size in pixels and the batch size (checked against a family's multiple later)."""

    height: int
    width: int
    batch: int = 1

    def __post_init__(self) -> None:
        for field in ("height", "width", "batch"):
            require_positive_int(f"ImageShape.{field}", getattr(self, field))

    def require_multiple(self, multiple: int, family: str = "") -> "ImageShape":
        """Raise InvalidInputError naming the field unless height and width are multiples of `multiple`."""
        for field in ("height", "width"):
            value = getattr(self, field)
            if value % multiple:
                lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
                suggestion = f"{lower} or {upper}" if lower else f"{upper}"
                raise InvalidInputError(
                    f"ImageShape.{field}: {value} is not a multiple of {multiple}"
                    f"{f' (required by {family} models)' if family else ''}; use {suggestion}"
                )
        return self


__all__ = ["ImageShape", "require_positive_int"]
