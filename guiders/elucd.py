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

The guidance schedule (the DDPM script adds (Σ_t + a_t) · s · ∇ to the posterior mean, with a sine bump
a_t = max(sin(π t / T) · max Σ · γ, 0), γ = 0.3) belongs to the sampler side and is not here yet.
"""

import copy
import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class EluCDCalibration:
    """The pre-conditioning settings; defaults from the official DDPM script (ImageNet 128, ResNet-101 guide)."""

    softplus_beta: float = 3.0  # inf: keep the ReLUs
    joint_temperature: float = 1.0  # τ₁
    margin_temperature_discount: float = 0.5  # d: τ₂ = τ₁ · d

    def __post_init__(self):
        for name in ("softplus_beta", "joint_temperature", "margin_temperature_discount"):
            value = getattr(self, name)
            if not value > 0 or value != value:
                raise ValueError(f"{name} must be positive, not {value}")


def smooth_activations(network: nn.Module, beta: float) -> tuple[nn.Module, int]:
    """(a copy of `network` with every nn.ReLU module replaced by nn.Softplus(beta), how many were replaced). ReLUs
    called as functions inside `forward` cannot be replaced and stay; β = inf returns an unchanged copy."""
    smoothed = copy.deepcopy(network)
    if beta == float("inf"):
        return smoothed, 0
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
