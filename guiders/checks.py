"""Checks of a method's settings shared by every method."""

import math


def check_finite(**values: float) -> None:
    """Raises ValueError naming the first value that is NaN or infinite: every comparison with NaN is false, so a
    NaN setting would otherwise pass range checks and silently switch a method off (or on everywhere)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}; it must be a finite number")
