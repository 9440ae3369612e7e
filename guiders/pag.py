"""Perturbed-attention guidance (PAG).

Ahn, Cho, Min, Jang, Kim, Kim, Park, Jin, Kim, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", ECCV 2024, arXiv:2403.17377.

PAG degrades the model on purpose and guides away from the degraded prediction. In chosen self-attention layers the
attention map A = softmax(QKᵀ/√d) is replaced by the identity, so the layer's output becomes its value projection:

    self-attention:            SA(Q, K, V) = softmax(QKᵀ/√d) V
    perturbed self-attention:  PSA(Q, K, V) = I V = V

The model with those layers perturbed gives the prediction ε̂ (the paper's ε̂_θ). The guided prediction is

    PAG alone (unconditional, or cfg = 1):  ε̃ = ε_c + s (ε_c − ε̂)
    PAG with CFG:                           ε̃ = ε_u + w (ε_c − ε_u) + s (ε_c − ε̂)

with ε_c, ε_u the conditional and unconditional predictions and ε̂ the perturbed conditional one (the combination of
the official pipeline, hyoungwoncho/sd_perturbed_attention_guidance). Both are the CFG result (or ε_c) plus
s (ε_c − ε̂), so one rule serves both. ComfyUI's samplers combine denoised predictions D = x − σ ε (x0 estimates for
eps, v and flow models alike); D_c − D̂ = −σ (ε_c − ε̂), so the same rule on denoised predictions is exactly the
paper's rule on noise predictions.

The scale may fall over the run: the official pipeline's adaptive scale is s(t) = max(0, s − a (1000 − t)) with t the
model's timestep (1000 at pure noise), so PAG fades out towards the end of sampling. PAG also acts only within a
sigma range; outside it (or where the scale is 0) the perturbed pass is skipped altogether.
"""

from dataclasses import dataclass

import torch

from .checks import check_finite
from .sigma_range import SIGMA_MAX, SIGMA_MIN, check_sigma_range, in_sigma_range

# Paper defaults. s = 3 is the official pipeline's scale with CFG (its example pairs it with cfg 4; unconditional
# examples use 5), and ComfyUI's and diffusers' default. a = 0 (no adaptive fall-off) is the official default.
DEFAULT_SCALE = 3.0
DEFAULT_ADAPTIVE_SCALE = 0.0
# The timestep of pure noise in the adaptive schedule (DDPM's 1000 training steps; flow models' t = 1000·σ).
TIMESTEP_MAX = 1000.0


@dataclass(frozen=True)
class PAGConfig:
    scale: float = DEFAULT_SCALE
    adaptive_scale: float = DEFAULT_ADAPTIVE_SCALE
    sigma_start: float = SIGMA_MAX
    sigma_end: float = SIGMA_MIN

    def __post_init__(self):
        check_finite(scale=self.scale, adaptive_scale=self.adaptive_scale)
        check_sigma_range(self.sigma_start, self.sigma_end)
        if self.scale < 0 or self.adaptive_scale < 0:
            raise ValueError(f"scale ({self.scale}) and adaptive_scale ({self.adaptive_scale}) must not be negative")

    def scale_at(self, sigma: float, timestep: float) -> float:
        """The PAG scale of a step: 0 outside the sigma range, else s(t) = max(0, s − a (1000 − t))."""
        if not in_sigma_range(sigma, self.sigma_start, self.sigma_end):
            return 0.0
        return max(0.0, self.scale - self.adaptive_scale * (TIMESTEP_MAX - timestep))


def pag_guided(guided: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """guided + s (cond − perturbed): PAG on top of a CFG result, or on cond itself for PAG alone."""
    if not guided.shape == cond.shape == perturbed.shape:
        raise ValueError(f"prediction shapes differ: {tuple(guided.shape)}, {tuple(cond.shape)}, "
                         f"{tuple(perturbed.shape)}")
    return guided + scale * (cond - perturbed)


def identity_attention(v: torch.Tensor, heads: int, skip_reshape: bool = False,
                       skip_output_reshape: bool = False) -> torch.Tensor:
    """PSA(Q, K, V) = V, laid out as an attention function's output.

    Attention functions take V either as [B, N, heads·d] (some DiTs pass [B, N, heads, d]) or, with `skip_reshape`,
    as [B, heads, N, d], and return [B, N, heads·d], or [B, heads, N, d] with `skip_output_reshape`.
    """
    if skip_reshape:
        per_head = v
    else:
        per_head = v.reshape(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)
    if skip_output_reshape:
        return per_head
    batch, _, tokens, dim = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, tokens, heads * dim)
