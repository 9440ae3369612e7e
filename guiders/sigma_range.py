"""The sigma range in which a guidance method acts, shared by every method that has one.

Outside the range a method leaves the step as plain CFG. The default range, [SIGMA_MIN, SIGMA_MAX], covers every
schedule ComfyUI uses.
"""

from .checks import check_finite

SIGMA_MAX = 10000.0
SIGMA_MIN = 0.0


def check_sigma_range(sigma_start: float, sigma_end: float) -> None:
    check_finite(sigma_start=sigma_start, sigma_end=sigma_end)
    if sigma_start < sigma_end:
        raise ValueError(f"sigma_start ({sigma_start}) must not be below sigma_end ({sigma_end})")


def in_sigma_range(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    return sigma_end <= sigma <= sigma_start
