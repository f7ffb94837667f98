"""Image sizes and the positive-integer rule every size and batch follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError


def require_positive_int(label: str, value: Any) -> None:
    """InvalidInputError naming `label` unless `value` is an integer > 0 (a bool is not one): the
    check of every size and batch, whether it arrives as an option, a config field or a shape."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{label}: must be a positive integer, got {value!r}")


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
