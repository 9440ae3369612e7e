"""EluCD's calibration-driven pre-conditioning of an off-the-shelf classifier.

Ma, Hu, Gu, Liu, Yu, Ding, Zhu, Li, "Elucidating the Design Space of Classifier-Guided Diffusion Generation", ICLR
2024, arXiv:2310.11311; official code github.com/AlexMaOLS/EluCD. The paper's point is that a classifier trained on
clean images guides well once it is applied to the denoised estimate and *calibrated*; its two pre-conditioning
steps, as the official code implements them (DDPM/scripts/classifier_sample.py, `design_cond_fn`; EDM/generate.py):

- smoothing: every ReLU of the classifier becomes Softplus(β) (β = 3 in the DDPM script, 5 in the EDM one), so the
  input gradient is smooth instead of piecewise constant;
- calibrated log-probability: with logits z, target y, the joint temperature τ₁ and the margin temperature
  τ₂ = τ₁ · d (d = `margin_temperature_discount`, 0.5 in the DDPM script),

      log p̃(y | x̂₀) = τ₁ z_y − log Σ_k exp(τ₂ z_k),

  whose gradient with respect to the denoised estimate x̂₀ (detached from the diffusion model) is the guidance
  direction. τ₂ = τ₁ is the plain log-softmax at temperature 1/τ₁.

and the guidance schedule of the DDPM script (guided_diffusion/gaussian_diffusion.py, `p_sample`): the gradient g
is added to the posterior mean of the step t → t−1 as (Σ_t + a_t) · s · g, where Σ_t is the step's posterior
variance, a_t = max(sin(π t/T) · max Σ · γ, 0) a sine bump over the run (t/T the fraction of the run still to go,
max Σ the largest posterior variance so far, γ = 0.3) and s the classifier scale (1.0).

ComfyUI's samplers take a denoised prediction, not a mean, so the term is carried by the denoised prediction: in
ComfyUI's coordinates x = x₀ + σ ε (ᾱ = 1/(1 + σ²)), the DDPM posterior mean moves by (1 − σ'²/σ²) · δ when the
denoised prediction moves by δ (σ' the step's next noise level), and the official term (Σ_t + a_t) s g moves the
mean in the variance-preserving coordinates x√ᾱ, which is 1/√ᾱ' times as much in ComfyUI's. So

    δ = s (1 + a_t / Σ_t) · σ'² √ᾱ' · g,    Σ_t = ᾱ' σ'² (σ² − σ'²) / σ²  (the posterior variance, VP)

(`denoised_shift`), which makes a DDPM step with the shifted prediction exactly the official guided step (a test
checks it in float64) and gives every other sampler the same guided prediction.
"""

import copy
import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class EluCDCalibration:
    """The pre-conditioning settings; defaults from the official DDPM script (ImageNet 128, ResNet-101 guide)."""

    softplus_beta: float = 3.0  # 0 (or inf): keep the ReLUs, no smoothing
    joint_temperature: float = 1.0  # τ₁
    margin_temperature_discount: float = 0.5  # d: τ₂ = τ₁ · d

    def __post_init__(self):
        if not self.softplus_beta >= 0:  # NaN fails this too
            raise ValueError(f"softplus_beta must be >= 0 (0: no smoothing), not {self.softplus_beta}")
        for name in ("joint_temperature", "margin_temperature_discount"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive, not {value}")


def smooth_activations(network: nn.Module, beta: float) -> tuple[nn.Module, int]:
    """(`network` with every nn.ReLU module replaced by nn.Softplus(beta), in a copy; how many were replaced). ReLUs
    called as functions inside `forward` cannot be replaced and stay. With nothing to replace (β = 0 or inf, or no
    ReLU module, e.g. CLIP's GELUs) the network itself is returned, not a copy: a large classifier is kept once."""
    if beta in (0, float("inf")) or not any(isinstance(m, nn.ReLU) for m in network.modules()):
        return network, 0
    smoothed = copy.deepcopy(network)
    replaced = 0
    for parent in smoothed.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
                replaced += 1
    return smoothed, replaced


def calibrated_log_prob(logits: torch.Tensor, target: torch.Tensor, calibration: EluCDCalibration) -> torch.Tensor:
    """τ₁ z_y − log Σ_k exp(τ₂ z_k) per sample ([B]), computed stably (logsumexp)."""
    joint = calibration.joint_temperature
    margin = joint * calibration.margin_temperature_discount
    return joint * logits.gather(1, target.view(-1, 1)).squeeze(1) - torch.logsumexp(margin * logits, dim=1)


def posterior_variance(sigma: float, sigma_next: float) -> float:
    """Σ_t of the DDPM step σ → σ' in variance-preserving coordinates: ᾱ' σ'² (σ² − σ'²) / σ² (written so that
    σ = inf, a flow model's first step, gives its limit)."""
    return sigma_next ** 2 * (1 - (sigma_next / sigma) ** 2) / (1 + sigma_next ** 2)


def sine_bump(remaining: float, max_variance: float, gamma: float) -> float:
    """a_t = max(sin(π t/T) · max Σ · γ, 0), with t/T = `remaining`, the fraction of the run still to go."""
    return max(math.sin(math.pi * remaining) * max_variance * gamma, 0.0)


def denoised_shift(gradient: torch.Tensor, sigma: float, sigma_next: float, remaining: float, max_variance: float,
                   scale: float, gamma: float) -> torch.Tensor:
    """δ = s (1 + a_t/Σ_t) σ'² √ᾱ' g: what to add to the denoised prediction at σ (next level σ') so that a DDPM
    step carries the official term (Σ_t + a_t) s g (see the module docstring). Zero at the last step (σ' = 0), where
    the official sampler adds no noise and Σ_t = 0."""
    variance = posterior_variance(sigma, sigma_next)
    if variance <= 0:
        return torch.zeros_like(gradient)
    bump = sine_bump(remaining, max_variance, gamma)
    return gradient * (scale * (1 + bump / variance) * sigma_next ** 2 / math.sqrt(1 + sigma_next ** 2))


@dataclasses.dataclass(frozen=True)
class EluCDConfig:
    """Guidance settings; defaults from the official DDPM script (`--classifier_scale 1.0`, `--gamma_factor 0.3`)."""

    scale: float = 1.0  # s
    gamma: float = 0.3  # γ of the sine bump a_t; 0 gives the plain posterior-variance schedule
    calibration: EluCDCalibration = EluCDCalibration()

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, not {self.scale}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, not {self.gamma}")


@dataclasses.dataclass
class EluCDState:
    """What a run remembers: the largest posterior variance so far (the official sampler's `max_variance`)."""

    max_variance: float = 0.0


def step_position(schedule: torch.Tensor, sigma: float) -> tuple[int, float]:
    """(k, σ') for a model call at `sigma` of a run over `schedule` (σ_0 > … > σ_N): the step k whose interval
    [σ_{k+1}, σ_k] holds sigma and its next level σ_{k+1}. A sampler's extra calls inside a step (Heun, DPM++ 2S)
    belong to that step."""
    levels = schedule.detach().double().cpu().flatten().tolist()
    tolerance = 1e-5 * max(abs(sigma), 1e-8)
    for k in range(len(levels) - 1):
        if levels[k + 1] + tolerance < sigma <= levels[k] + tolerance:
            return k, levels[k + 1]
    raise ValueError(f"sigma {sigma:.6g} lies outside this run's schedule ({levels[0]:.6g} to {levels[-1]:.6g})")


def remaining_fraction(step: int, steps: int) -> float:
    """t/T of the official sampler at step `step` of `steps` (0-based): its t counts down from T − 1 to 0."""
    return (steps - 1 - step) / steps
