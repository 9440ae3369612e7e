"""Gradient-Free Classifier Guidance (GFCG) and its combination with Autoguidance (ATG).

Shenoy, Sun, Lin, Song, Chen, Zhou, "Gradient-Free Classifier Guidance for Diffusion Model Sampling", arXiv
2411.15393 (WACV 2026). Karras, Aittala, Kynkäänniemi, Lehtinen, Aila, Laine, "Guiding a Diffusion Model with a Bad
Version of Itself", NeurIPS 2024 (Autoguidance).

What the paper says (its abstract, and the opening of its method section as paper-summary pages quote it; the body and
the code could not be read here):
- a pre-trained classifier is used only in inference mode (no gradient) to choose, at each step, a time-adaptive
  reference class and a guidance scale;
- the reference class replaces CFG's unconditional prediction, "the sample to increase contrast from", by a
  conditional prediction for that class, and the scale is computed on the fly "depending on how confused the
  diffusion model is";
- it is complementary to CFG, and with Autoguidance it adds no computational overhead.

What Karras et al. say (their paper and NVlabs/edm2, generate_images.py): the guided prediction is
D_weak + w (D − D_weak), a weak model (fewer training steps, or smaller) of the same family in place of the
unconditional one, both for the same class.

Our reading (each rule a function below, tested against its own float64 transcription):
- the classifier reads the conditional denoised prediction D_c = D(x; c), as for EluCD (`classifier.py`);
- reference class per sample: r = argmax over k ≠ c of p(k | D_c), the most likely competitor (`reference_classes`;
  a random other class is offered for the ablation);
- adaptive scale: s_t = s · p_r / (p_c + p_r), near 0 when the classifier is sure of c, s/2 at a tie, towards s when
  the sample drifts to r; `constant` keeps s_t = s (`guidance_scale`);
- GFCG alone: D̂ = D_c + s_t (D_c − D_r), D_r = D(x; r); with CFG: D̂ = D_u + w (D_c − D_u) + s_t (D_c − D_r);
  both are the CFG result (or D_c) plus s_t (D_c − D_r) (`gfcg_guided`);
- ATG: D̂ = D_weak(x; c) + w (D(x; c) − D_weak(x; c)); ATG + GFCG at ATG's cost asks the weak model for the
  reference class instead: D̂ = D_weak(x; r) + w (D(x; c) − D_weak(x; r)); there the sampler's w is the only scale.
  Both are ComfyUI's own CFG step with D_weak handed to it as the unconditional prediction (nodes/autoguidance_patch.py).

All rules act on denoised predictions D = x − σ ε; since D_c − D_r = −σ (ε_c − ε_r), they are the same rules on noise
predictions (eps, v and flow models alike).
"""

import dataclasses
import math

import torch

from .checks import check_finite
from .sigma_range import SIGMA_MAX, SIGMA_MIN, check_sigma_range, in_sigma_range

ADAPTIVE = "adaptive"
CONSTANT = "constant"
SCALE_RULES = (ADAPTIVE, CONSTANT)
COMPETITOR = "most likely competitor"
RANDOM = "random other class"
REFERENCE_RULES = (COMPETITOR, RANDOM)
# Our choice (the paper's value could not be read): at a tie between c and r the adaptive scale is s/2 = 1, one
# conditional contrast, and it grows towards 2 as the sample drifts to r.
DEFAULT_SCALE = 2.0


@dataclasses.dataclass(frozen=True)
class GFCGConfig:
    scale: float = DEFAULT_SCALE  # s
    scale_rule: str = ADAPTIVE
    reference_rule: str = COMPETITOR
    sigma_start: float = SIGMA_MAX
    sigma_end: float = SIGMA_MIN

    def __post_init__(self):
        check_finite(scale=self.scale)
        check_sigma_range(self.sigma_start, self.sigma_end)
        if self.scale < 0:
            raise ValueError(f"scale must not be negative, not {self.scale}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {', '.join(SCALE_RULES)}, not {self.scale_rule!r}")
        if self.reference_rule not in REFERENCE_RULES:
            raise ValueError(f"reference_rule must be one of {', '.join(REFERENCE_RULES)}, not "
                             f"{self.reference_rule!r}")

    def acts_at(self, sigma: float) -> bool:
        return self.scale > 0 and in_sigma_range(sigma, self.sigma_start, self.sigma_end)


def check_probabilities(probabilities: torch.Tensor, target: torch.Tensor) -> None:
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"the classifier's probabilities have shape {tuple(probabilities.shape)}; GFCG needs "
                         "[batch, classes] with at least two classes (a reference class other than the target)")
    if target.shape != probabilities.shape[:1]:
        raise ValueError(f"{target.shape[0]} targets for {probabilities.shape[0]} images")
    if not torch.isfinite(probabilities).all():
        raise ValueError("the classifier's probabilities are not finite")


def reference_classes(probabilities: torch.Tensor, target: torch.Tensor, rule: str = COMPETITOR,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """r per image ([B], long): the most likely class other than the target under p(k | D_c) ([B, K]), or (the
    ablation) a class drawn uniformly among the others with `generator`."""
    check_probabilities(probabilities, target)
    others = torch.ones_like(probabilities, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    if rule == COMPETITOR:
        return probabilities.masked_fill(~others, -math.inf).argmax(dim=1)
    if rule == RANDOM:
        # a draw in [0, K−1) shifted past the target: uniform over the K − 1 other classes
        draw = torch.randint(0, probabilities.shape[1] - 1, target.shape, generator=generator,
                             device=generator.device if generator is not None else "cpu").to(target.device)
        return draw + (draw >= target).long()
    raise ValueError(f"unknown reference rule {rule!r}")


def guidance_scale(probabilities: torch.Tensor, target: torch.Tensor, reference: torch.Tensor, scale: float,
                   rule: str = ADAPTIVE) -> torch.Tensor:
    """s_t per image ([B], the probabilities' dtype): s · p_r / (p_c + p_r), or s (`constant`). Where both
    probabilities underflow to 0 the two classes tie: s/2."""
    check_probabilities(probabilities, target)
    if rule == CONSTANT:
        return torch.full(target.shape, float(scale), dtype=probabilities.dtype, device=probabilities.device)
    if rule != ADAPTIVE:
        raise ValueError(f"unknown scale rule {rule!r}")
    p_c = probabilities.gather(1, target.view(-1, 1)).squeeze(1)
    p_r = probabilities.gather(1, reference.view(-1, 1)).squeeze(1)
    total = p_c + p_r
    return scale * torch.where(total > 0, p_r / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] values broadcast over the other dimensions of `like` ([B, ...])."""
    return values.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


def gfcg_guided(guided: torch.Tensor, cond: torch.Tensor, reference: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """guided + s_t (D_c − D_r), s_t per image: GFCG on a CFG result, or on D_c itself for GFCG alone."""
    if not guided.shape == cond.shape == reference.shape:
        raise ValueError(f"prediction shapes differ: {tuple(guided.shape)}, {tuple(cond.shape)}, "
                         f"{tuple(reference.shape)}")
    return guided + per_image(scale, cond) * (cond - reference)

