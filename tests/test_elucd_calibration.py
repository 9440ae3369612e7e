"""EluCD's pre-conditioning (guiders/elucd.py), as the official code implements it: the calibrated log-probability
τ₁ z_y − log Σ exp(τ₂ z_k) and its gradient through the shared classifier interface against a float64 closed form,
and the ReLU → Softplus(β) smoothing of a real classifier (the reference one)."""

import pytest
import torch

from comfyui_guidance.guiders.classifier import ClassifierOnDenoised
from comfyui_guidance.guiders.elucd import EluCDCalibration, calibrated_log_prob, smooth_activations
from reference.classifier import Classifier
from test_classifier_interface import CLASSES, linear


@pytest.mark.parametrize("joint,discount", [(1.0, 0.5), (2.0, 1.0), (0.7, 0.3)])
def test_calibrated_gradient_equals_float64_closed_form(joint, discount):
    """∇_x [τ₁ z_y − log Σ_k exp(τ₂ z_k)] = τ₁ W_y − τ₂ Σ_k softmax(τ₂ z)_k W_k for a linear classifier z = W x + b."""
    network, weight, bias = linear(seed=3)
    denoised = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 3, 9, 9, 4])
    calibration = EluCDCalibration(joint_temperature=joint, margin_temperature_discount=discount)
    grad, value = ClassifierOnDenoised(network, (3, 8, 8), chunk=2).log_prob_gradient(
        denoised, target, log_prob=lambda z, y: calibrated_log_prob(z, y, calibration))
    z = denoised.flatten(1) @ weight.T + bias
    margin = joint * discount
    p = torch.softmax(margin * z, dim=1)
    want = (joint * weight[target] - margin * p @ weight).view_as(denoised)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)
    want_value = joint * z.gather(1, target.view(-1, 1)).squeeze(1) - torch.logsumexp(margin * z, dim=1)
    assert torch.allclose(value, want_value, rtol=1e-12)
    if discount == 1.0:  # τ₂ = τ₁: the plain log-softmax at temperature 1/τ₁
        assert torch.allclose(value, torch.log_softmax(joint * z, 1).gather(1, target.view(-1, 1)).squeeze(1))


def test_smoothing_replaces_every_relu_of_a_copy():
    torch.manual_seed(0)
    guide = Classifier(CLASSES).eval()
    x = torch.randn(4, 3, 32, 32)
    smoothed, replaced = smooth_activations(guide, beta=3.0)
    assert replaced == 6 and not any(isinstance(m, torch.nn.ReLU) for m in smoothed.modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in guide.modules()) == 6  # the original is left as it was
    assert smooth_activations(guide, float("inf"))[1] == 0 and smooth_activations(guide, 0.0)[1] == 0

    def input_gradient(net):
        x_ = x.clone().requires_grad_(True)
        net(x_)[:, 2].sum().backward()
        return x_.grad

    relu_grad = input_gradient(guide)
    gaps = [float((input_gradient(smooth_activations(guide, beta)[0]) - relu_grad).norm() / relu_grad.norm())
            for beta in (3.0, 300.0, 3e5)]
    assert gaps[0] > 1e-2 and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2, gaps  # Softplus(β) → ReLU as β → ∞


@pytest.mark.parametrize("field", ["joint_temperature", "margin_temperature_discount"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_calibration_refuses_non_positive_values(field, value):
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        EluCDCalibration(**{field: value})


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_calibration_refuses_negative_smoothing(value):
    with pytest.raises(ValueError, match="softplus_beta must be >= 0"):
        EluCDCalibration(softplus_beta=value)


@pytest.mark.parametrize("sigma,sigma_next,remaining", [(14.6, 9.7, 0.95), (2.0, 1.5, 0.5), (0.3, 0.1, 0.04)])
def test_denoised_shift_makes_a_ddpm_step_the_official_guided_step(sigma, sigma_next, remaining):
    """In float64: the official step (DDPM posterior mean in variance-preserving coordinates, plus (Σ_t + a_t) s g)
    equals the DDPM posterior mean taken in ComfyUI's coordinates x = x₀ + σ ε from the shifted denoised prediction
    D + δ, mapped back."""
    from comfyui_guidance.guiders.elucd import denoised_shift, posterior_variance, sine_bump

    g = torch.Generator().manual_seed(7)
    x, denoised, grad = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(3))
    x = x * sigma  # ComfyUI's state at σ
    scale, gamma, max_variance = 1.5, 0.3, 0.02
    abar, abar_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    beta = 1 - abar / abar_next
    x_vp = x * abar ** 0.5
    mean = (abar_next ** 0.5 * beta / (1 - abar) * denoised
            + (1 - beta) ** 0.5 * (1 - abar_next) / (1 - abar) * x_vp)
    variance = (1 - abar_next) / (1 - abar) * beta
    assert variance == pytest.approx(posterior_variance(sigma, sigma_next), rel=1e-12)
    official = mean + (variance + sine_bump(remaining, max_variance, gamma)) * scale * grad

    shifted = denoised + denoised_shift(grad, sigma, sigma_next, remaining, max_variance, scale, gamma)
    mean_comfy = shifted + sigma_next ** 2 / sigma ** 2 * (x - shifted)
    assert torch.allclose(mean_comfy * abar_next ** 0.5, official, rtol=1e-12, atol=1e-14)


def test_no_shift_at_the_last_step():
    from comfyui_guidance.guiders.elucd import denoised_shift

    assert not denoised_shift(torch.ones(1, 3, 2, 2), 0.5, 0.0, 0.0, 0.1, 1.0, 0.3).any()
