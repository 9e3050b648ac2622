"""Range and choice checks for config dataclasses, declared as a table per section.

A section lists its numeric settings' ranges once (`RANGES: ClassVar[dict[str, Range]]`) and calls
`check_ranges` in `__post_init__`; enum-like settings are `Literal` types checked by `check_choice`.
Both raise one ExplorerError that names the setting, its value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from engine.errors import ExplorerError


@dataclass(frozen=True)
class Range:
    """low <= value <= high (or < where open); `optional`: None is allowed too."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def text(self) -> str:
        def number(x: float) -> str:
            return f"{x:g}" if not float(x).is_integer() else f"{int(x)}"

        if not self.low_open and not self.high_open and math.isfinite(self.low) and math.isfinite(self.high):
            allowed = f"{number(self.low)}-{number(self.high)}"
        elif not math.isfinite(self.high):
            allowed = f"a value {'>' if self.low_open else '>='} {number(self.low)}"
        else:
            allowed = (f"a value in {'(' if self.low_open else '['}{number(self.low)}, "
                       f"{number(self.high)}{')' if self.high_open else ']'}")
        return allowed + (" or null" if self.optional else "")


def check_ranges(section: str, settings: object, ranges: Mapping[str, Range]) -> None:
    """Raise for the first setting of `settings` outside its range."""
    for name, allowed in ranges.items():
        value = getattr(settings, name)
        if not allowed.contains(value):
            raise ExplorerError(f"{section}.{name} = {value!r} is out of range.", f"use {allowed.text}.")


def check_choice(section: str, name: str, value: object, choices: Any) -> None:
    """Raise unless `value` is one of `choices`: a Literal type or a collection of allowed values."""
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        raise ExplorerError(f"{section}.{name} = {value!r} is not one of the choices.",
                            f"use {' or '.join(map(str, allowed))}.")
