"""Adaptive projected guidance (APG).

Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models",
ICLR 2025, arXiv:2410.02416; the order of operations follows the paper's Algorithm 1.

APG acts on denoised predictions, D_c = D(z_t, t, y) and D_u = D(z_t, t, ∅): the paper shows that projecting onto the
denoised sample, not the predicted noise, is what reduces saturation. A sampler's denoised outputs are x0 estimates
for eps, v and flow (CONST) models alike, so one implementation serves every parameterisation.

    CFG in denoiser form:   D̂ = D_c + (w − 1) ΔD_t,                     ΔD_t = D_c − D_u
    reverse momentum:       ΔD_t ← ΔD_t + β · ΔD̄_{t−1}                  (β < 0; ΔD̄ is this running average,
                                                                          kept before rescaling)
    rescaling:              ΔD_t ← ΔD_t · min(1, r / ‖ΔD_t‖)
    projection:             ΔD_t^∥ = (⟨ΔD_t, D_c⟩ / ⟨D_c, D_c⟩) D_c,     ΔD_t^⊥ = ΔD_t − ΔD_t^∥
    APG:                    D̂ = D_c + (w − 1) (ΔD_t^⊥ + η ΔD_t^∥)

Norms and inner products are per sample over every non-batch dimension (4-D image and 5-D video latents alike),
or, with `video_mode="frame"`, per latent frame of a 5-D video latent [B, C, T, H, W]: each frame's update is
projected on that frame's conditional prediction and capped on its own. With η = 1, r = 0 and β = 0 the update is
ΔD_t and APG is CFG at the same w. The whole update is a per-group linear combination a·ΔD_t + b·D_c, which is how
it is computed: one pass for the three inner products, one pass to combine.

The threshold r caps an L2 norm, which grows with the square root of the number of elements it is taken over, so the
paper's r = 15 (SDXL at 1024²: a 4 × 128 × 128 latent) binds harder on larger latents and less on smaller ones. With
`threshold_mode="per-element"` the cap of a group of n elements is r·√(n / n_ref), n_ref = 4 · 128 · 128: the same
r then caps the same root-mean-square update at every size, family and frame count. "absolute" (the default) is
the paper's r as it is.
"""

from dataclasses import dataclass

import torch

from ..kernels.projection import combine, group_elements, parallel_coefficient, rescale_factor, sample_dots
from .checks import check_finite
from .sigma_range import SIGMA_MAX, SIGMA_MIN, check_sigma_range, in_sigma_range

# Paper defaults: η = 0 is the recommended setting (Appendix C.8); r = 15 and β = −0.5 are the paper's SDXL values
# (Table 10), which suit the latent scale of Stable Diffusion models in ComfyUI.
DEFAULT_ETA = 0.0
DEFAULT_NORM_THRESHOLD = 15.0
DEFAULT_MOMENTUM = -0.5
THRESHOLD_MODES = ("absolute", "per-element")
VIDEO_MODES = ("clip", "frame")
# n_ref of the per-element threshold: the elements of the latent the paper tuned r = 15 on (SDXL at 1024², 4 channels
# at 128 × 128).
REFERENCE_ELEMENTS = 4 * 128 * 128


@dataclass(frozen=True)
class APGConfig:
    eta: float = DEFAULT_ETA
    norm_threshold: float = DEFAULT_NORM_THRESHOLD
    momentum: float = DEFAULT_MOMENTUM
    sigma_start: float = SIGMA_MAX
    sigma_end: float = SIGMA_MIN
    threshold_mode: str = THRESHOLD_MODES[0]
    video_mode: str = VIDEO_MODES[0]

    def __post_init__(self):
        check_finite(eta=self.eta, norm_threshold=self.norm_threshold, momentum=self.momentum)
        check_sigma_range(self.sigma_start, self.sigma_end)
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, not {self.threshold_mode!r}")
        if self.video_mode not in VIDEO_MODES:
            raise ValueError(f"video_mode must be one of {', '.join(VIDEO_MODES)}, not {self.video_mode!r}")

    @property
    def frames(self) -> bool:
        """Norms and projections per latent frame (of 5-D latents; others have none)."""
        return self.video_mode == "frame"

    def threshold(self, elements: int) -> float:
        """The cap of a group of `elements` elements: r, or r·√(n / n_ref) per element."""
        if self.threshold_mode == "absolute":
            return self.norm_threshold
        return self.norm_threshold * (elements / REFERENCE_ELEMENTS) ** 0.5

    def acts_at(self, sigma: float) -> bool:
        return in_sigma_range(sigma, self.sigma_start, self.sigma_end)


class APGState:
    """Reverse-momentum memory of one sampling run.

    Create one per run. It also forgets its average when sigma rises (a new run, or a restart inside one) or the
    batch shape changes, so a state that is reused by mistake cannot carry guidance from one image into another.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: torch.Tensor | None = None
        self.last_sigma: float | None = None

    def update(self, diff: torch.Tensor, sigma: float) -> torch.Tensor:
        """ΔD_t + β·ΔD̄_{t−1}; stores and returns the new running average."""
        if self.last_sigma is not None and sigma > self.last_sigma:
            self.running_average = None
        self.last_sigma = sigma
        if self.momentum == 0:
            return diff
        if self.running_average is not None and self.running_average.shape == diff.shape:
            diff = torch.add(diff, self.running_average, alpha=self.momentum)
        self.running_average = diff
        return diff


def update_coefficients(dots: torch.Tensor, eta: float, norm_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per group such that the APG update ΔD_t^⊥ + η ΔD_t^∥ of the rescaled ΔD_t equals a·ΔD_t + b·D_c.

    dots are ⟨ΔD,ΔD⟩, ⟨ΔD,D_c⟩, ⟨D_c,D_c⟩ per group ([groups, 3]). With s = min(1, r/‖ΔD‖) the rescaled update is s·ΔD,
    its parallel part is s·k·D_c with k = ⟨ΔD,D_c⟩/⟨D_c,D_c⟩, and ΔD^⊥ + η ΔD^∥ = s·ΔD − (1 − η)·s·k·D_c.
    """
    if not torch.isfinite(dots).all():
        raise ValueError("the conditional or unconditional prediction contains NaN or inf")
    scale = rescale_factor(dots[:, 0], norm_threshold)
    k = parallel_coefficient(dots[:, 1], dots[:, 2])
    return scale, -(1.0 - eta) * scale * k


def guidance_difference(
    pred_cond: torch.Tensor, pred_uncond: torch.Tensor, state: APGState | None, sigma: float | None
) -> torch.Tensor:
    """ΔD_t, with reverse momentum applied when a state is given."""
    if pred_cond.shape != pred_uncond.shape:
        raise ValueError(f"prediction shapes differ: {tuple(pred_cond.shape)} vs {tuple(pred_uncond.shape)}")
    diff = pred_cond - pred_uncond
    if state is not None:
        diff = state.update(diff, sigma)
    return diff


def apg_coefficients(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    config: APGConfig,
    state: APGState | None = None,
    sigma: float | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ΔD_t after momentum, a, b): the APG update is a·ΔD_t + b·D_c per group (sample, or sample and frame)."""
    diff = guidance_difference(pred_cond, pred_uncond, state, sigma)
    dots = sample_dots(diff, pred_cond, fused, config.frames)
    a, b = update_coefficients(dots, config.eta, config.threshold(group_elements(diff, config.frames)))
    return diff, a, b


def apg_update(pred_cond, pred_uncond, config: APGConfig, state=None, sigma=None, fused=None) -> torch.Tensor:
    """ΔD_t^⊥ + η ΔD_t^∥ of the (momentum-averaged, rescaled) guidance difference."""
    diff, a, b = apg_coefficients(pred_cond, pred_uncond, config, state, sigma, fused)
    return combine(diff, pred_cond, a, b, fused, config.frames)


def apg_guided(pred_cond, pred_uncond, guidance_scale: float, config: APGConfig, state=None, sigma=None, fused=None):
    """D̂ = D_c + (w − 1)(ΔD_t^⊥ + η ΔD_t^∥): the guided denoised prediction."""
    diff, a, b = apg_coefficients(pred_cond, pred_uncond, config, state, sigma, fused)
    w1 = guidance_scale - 1.0
    return combine(diff, pred_cond, w1 * a, 1.0 + w1 * b, fused, config.frames)


def apg_cfg_uncond(pred_cond, pred_uncond, config: APGConfig, state=None, sigma=None, fused=None) -> torch.Tensor:
    """D_c − update: the unconditional prediction for which plain CFG, D_u' + w(D_c − D_u'), equals APG at w.

    This lets APG sit before the CFG step of a sampler (e.g. ComfyUI's pre-CFG hook) and compose with whatever CFG
    function follows, at the user's own scale w.
    """
    diff, a, b = apg_coefficients(pred_cond, pred_uncond, config, state, sigma, fused)
    return combine(diff, pred_cond, -a, 1.0 - b, fused, config.frames)
