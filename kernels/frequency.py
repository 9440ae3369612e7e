"""Frequency split of a latent by resampling: the low band is what survives a round trip through a smaller grid.

FreCaS (guiders/frecas.py) splits a guidance update into the band an earlier, smaller stage could already represent
and the band the current stage adds: low = up(down(x)), high = x − low, with bilinear resampling both ways as in the
official code (utils/facfg_wrapper.py `freq_decompose`). Image latents [B, C, H, W] and video latents
[B, C, T, H, W] alike: the split acts on the last two (spatial) dimensions, each frame on its own.

A fused kernel does not pay here: the low band is two small resampling passes whose traffic is a fraction of the
model call that precedes them, and the band weights are applied in one `torch.lerp`-like pass (`weight_bands`).
"""

import torch
import torch.nn.functional as F


def _as_images(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x as a batch of [N, C, H, W] images (frames of a 5-D latent folded into the batch) and its original shape."""
    if x.ndim == 4:
        return x, tuple(x.shape)
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), tuple(x.shape)
    raise ValueError(f"expected a 4-D [B, C, H, W] or 5-D [B, C, T, H, W] latent, got shape {tuple(x.shape)}")


def _from_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `_as_images` for images of x's own spatial size (which may differ from the original's)."""
    if len(shape) == 4:
        return x
    b, c, t = shape[:3]
    return x.reshape(b, t, c, *x.shape[-2:]).permute(0, 2, 1, 3, 4)


def resize_spatial(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """x (4-D or 5-D) resampled to the spatial `size`, each frame on its own."""
    images, shape = _as_images(x)
    return _from_images(F.interpolate(images, size=tuple(size), mode=mode), shape)


def low_pass(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """up(down(x)): x resampled to the spatial `size` and back to its own (the official `freq_decompose`)."""
    images, shape = _as_images(x)
    own = tuple(images.shape[-2:])
    if tuple(size) == own:
        return x.clone()
    low = F.interpolate(F.interpolate(images, size=tuple(size), mode=mode), size=own, mode=mode)
    return _from_images(low, shape)


def weight_bands(x: torch.Tensor, size: tuple[int, int], low_weight: float, high_weight: float,
                 mode: str = "bilinear") -> torch.Tensor:
    """low_weight·low + high_weight·(x − low), with low = low_pass(x, size): computed as
    high_weight·x + (low_weight − high_weight)·low, one pass over x after the resampling."""
    low = low_pass(x, size, mode)
    return torch.add(high_weight * x, low, alpha=low_weight - high_weight)
