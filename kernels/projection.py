"""Per-sample projection and norm rescaling over every non-batch dimension.

Guidance methods that treat each sample's prediction as one vector (APG, and later methods that split an update into
parts parallel and orthogonal to a reference) reduce to two primitives:

- `sample_dots(x, y)`: the three inner products <x,x>, <x,y>, <y,y> of each sample, over all non-batch dimensions,
  so 4-D image latents [B,C,H,W] and 5-D video latents [B,C,T,H,W] are handled alike;
- `combine(x, y, a, b)`: a[i]·x[i] + b[i]·y[i] with one coefficient pair per sample.

With `frames=True` a 5-D video latent [B, C, T, H, W] is grouped per (sample, frame) instead: the inner products
are over (C, H, W) of each frame, [B·T, 3] in sample-major order, and `combine` takes one coefficient pair per
(sample, frame). Other latents ignore `frames`.

Projection, rescaling and the APG update are small formulas over those per-sample scalars. Each primitive has a torch
path that runs everywhere and a fused Triton path for CUDA tensors (`kernels/triton_projection.py`) that reads each
input once per primitive; `use_fused` picks between them.
"""

import torch

# Below this many elements per call the launch overhead of the fused path outweighs the saved memory traffic.
FUSED_MIN_NUMEL = 1 << 16


def sample_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def per_frame(x: torch.Tensor, frames: bool) -> bool:
    """Whether `x` is grouped per (sample, frame): only a 5-D latent [B, C, T, H, W], and only when asked."""
    return frames and x.ndim == 5


def group_count(x: torch.Tensor, frames: bool = False) -> int:
    """How many groups (coefficient pairs) `x` has: B, or B·T per frame."""
    return x.shape[0] * x.shape[2] if per_frame(x, frames) else x.shape[0]


def group_elements(x: torch.Tensor, frames: bool = False) -> int:
    """Elements per group: C·(T·)H·W of a sample, or C·H·W of a frame."""
    return x[0].numel() // (x.shape[2] if per_frame(x, frames) else 1)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of samples [B, ...], got shape {tuple(x.shape)}")


def _fused_available(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.numel() < FUSED_MIN_NUMEL:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(x: torch.Tensor, fused: bool | None) -> bool:
    """`fused=None` chooses the Triton path for large CUDA tensors; True demands it; False forces torch."""
    if fused is None:
        return _fused_available(x)
    if fused and not x.is_cuda:
        raise ValueError("the fused projection kernels need CUDA tensors")
    return fused


def sample_dots_torch(x: torch.Tensor, y: torch.Tensor, frames: bool = False) -> torch.Tensor:
    """[groups, 3] float64: <x,x>, <x,y>, <y,y> per sample, or per (sample, frame) (products in float32, sums in
    float64)."""
    dims = (1, 3, 4) if per_frame(x, frames) else sample_dims(x)
    xf, yf = x.float(), y.float()
    return torch.stack(
        [
            torch.sum(xf * xf, dim=dims, dtype=torch.float64).flatten(),
            torch.sum(xf * yf, dim=dims, dtype=torch.float64).flatten(),
            torch.sum(yf * yf, dim=dims, dtype=torch.float64).flatten(),
        ],
        dim=1,
    )


def combine_torch(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  frames: bool = False) -> torch.Tensor:
    """a[g]·x[g] + b[g]·y[g] per group in float32, returned in x's dtype."""
    shape = (x.shape[0], 1, x.shape[2], 1, 1) if per_frame(x, frames) else (-1,) + (1,) * (x.ndim - 1)
    out = a.to(torch.float32).view(shape) * x.float() + b.to(torch.float32).view(shape) * y.float()
    return out.to(x.dtype)


def sample_dots(x: torch.Tensor, y: torch.Tensor, fused: bool | None = None, frames: bool = False) -> torch.Tensor:
    _check_pair(x, y)
    if use_fused(x, fused):
        from .triton_projection import sample_dots_triton

        return sample_dots_triton(x, y, per_frame(x, frames))
    return sample_dots_torch(x, y, frames)


def combine(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fused: bool | None = None,
            frames: bool = False) -> torch.Tensor:
    _check_pair(x, y)
    groups = group_count(x, frames)
    if a.shape != (groups,) or b.shape != (groups,):
        raise ValueError(f"coefficients must have shape ({groups},), got {tuple(a.shape)} and {tuple(b.shape)}")
    if use_fused(x, fused):
        from .triton_projection import combine_triton

        return combine_triton(x, y, a, b, per_frame(x, frames))
    return combine_torch(x, y, a, b, frames)


def rescale_factor(squared_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, r/‖v‖) per sample; 1 where rescaling is off (r <= 0) or the norm is zero."""
    if max_norm <= 0:
        return torch.ones_like(squared_norm)
    return torch.clamp(max_norm / squared_norm.sqrt(), max=1.0)


def parallel_coefficient(dot: torch.Tensor, reference_squared_norm: torch.Tensor) -> torch.Tensor:
    """<v,c>/<c,c>: the multiple of c that is v's parallel part; 0 for an all-zero reference."""
    return torch.where(reference_squared_norm > 0, dot / reference_squared_norm, torch.zeros_like(dot))


def project(v: torch.Tensor, onto: torch.Tensor, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of v with respect to onto, per sample."""
    dots = sample_dots(v, onto, fused)
    k = parallel_coefficient(dots[:, 1], dots[:, 2])
    zeros, ones = torch.zeros_like(k), torch.ones_like(k)
    parallel = combine(v, onto, zeros, k, fused)
    orthogonal = combine(v, onto, ones, -k, fused)
    return parallel, orthogonal


def rescale_to_max_norm(v: torch.Tensor, max_norm: float, fused: bool | None = None) -> torch.Tensor:
    """v·min(1, r/‖v‖) per sample."""
    dots = sample_dots(v, v, fused)
    scale = rescale_factor(dots[:, 0], max_norm)
    return combine(v, v, scale, torch.zeros_like(scale), fused)
