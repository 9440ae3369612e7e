"""The EluCD patch that the node puts on a model: a ComfyUI post-CFG hook around `guiders/elucd.py`.

Kept apart from the node class so that scripts (benchmarks, evaluation) can patch a model exactly as the node does
without importing ComfyUI's node API.

Each model call, the hook reads the classifier on the guided denoised prediction D (after CFG and any patch before
it), takes the gradient g of EluCD's calibrated log-probability of the image's target class with respect to D, and
returns D + δ, δ the shift that makes a DDPM step the official guided step (`guiders.elucd.denoised_shift`). The
step's place in the run comes from the sampler's schedule (`sample_sigmas`): the next noise level σ' and the fraction
of the run still to go; the largest posterior variance so far is the run's state. Flow models are handled in the
variance-exploding form of the same state, ρ = σ/(1 − σ), in which the denoised prediction is the same.

CFG++ refuses EluCD (its post-CFG hook would read the conditional prediction at cfg 1, not CFG++'s guided one).
"""

import math
from functools import partial

import torch

import comfy.model_sampling

from ..guiders.elucd import (EluCDConfig, EluCDState, calibrated_log_prob, denoised_shift, posterior_variance,
                             remaining_fraction, smooth_activations, step_position)
from ..guiders.saliency import latent_weights
from .classifier_patch import DEFAULT_CHUNK, ClassifierTargets, classifier_on_denoised
from .run_state import reserve_run_state, run_state

NODE_ID = "GuidanceEluCD"
DISPLAY_NAME = "EluCD Classifier Guidance"


def apply_elucd(model, targets: ClassifierTargets, config: EluCDConfig, vae=None, chunk: int = DEFAULT_CHUNK,
                mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` with EluCD's classifier guidance added after the CFG step; `mask` (a MASK,
    [B, H, W] in [0, 1]) weights its shift per position: 1 is EluCD, 0 leaves the prediction without it."""
    with torch.inference_mode(False):  # a smoothed copy must hold ordinary tensors (see classifier_patch.py)
        network, _ = smooth_activations(targets.classifier.network, config.calibration.softplus_beta)
    classifier = classifier_on_denoised(targets.classifier, network, model, vae, DISPLAY_NAME, chunk)
    flow = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    patched = model.clone()
    reserve_run_state(patched)
    patched.set_model_sampler_post_cfg_function(EluCDHook(classifier, network, targets, config, flow, mask))
    return patched


def variance_exploding(sigma: float, flow: bool) -> float:
    """ρ, the noise level of the same state in the form x = x₀ + ρ ε (inf at a flow model's σ = 1)."""
    if not flow:
        return sigma
    return math.inf if sigma >= 1 else sigma / (1 - sigma)


class EluCDHook:
    """Post-CFG hook: D + δ, δ carrying s (Σ_t + a_t) ∇ log p̃(y | D) (see the module docstring)."""

    node_name = DISPLAY_NAME
    guides_denoised = True  # acts on the guided prediction alone, whatever made it (AGD's one-pass one included)

    def __init__(self, classifier, network, targets: ClassifierTargets, config: EluCDConfig, flow: bool,
                 mask: torch.Tensor | None = None):
        self.mask = mask
        self.classifier = classifier
        self.network = network
        self.targets = targets
        self.config = config
        self.flow = flow
        self.log_prob = partial(calibrated_log_prob, calibration=config.calibration)

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if self.config.scale == 0:
            return denoised
        schedule = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if schedule is None:
            raise ValueError(f"{DISPLAY_NAME}: the sampler did not pass its schedule, which EluCD's guidance schedule "
                             "follows; sample with KSampler, SamplerCustom or SamplerCustomAdvanced.")
        sigma = float(args["sigma"].max())
        try:
            step, sigma_next = step_position(schedule, sigma)
        except ValueError as e:
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
        rho, rho_next = variance_exploding(sigma, self.flow), variance_exploding(sigma_next, self.flow)
        state = run_state(args["model_options"], self, EluCDState)
        state.max_variance = max(state.max_variance, posterior_variance(rho, rho_next))
        target = self.targets.for_batch(denoised.shape[0], DISPLAY_NAME, denoised.device)
        with torch.inference_mode(False):  # moved under inference mode, its weights could not enter the graph
            self.network.to(denoised.device)
        gradient, _ = self.classifier.log_prob_gradient(denoised, target, log_prob=self.log_prob)
        if not torch.isfinite(gradient).all():
            raise ValueError(f"{DISPLAY_NAME}: the classifier's gradient is not finite at sigma {sigma:.4g}; check the "
                             "model's output (run it in float32, e.g. --force-fp32) and the classifier.")
        shift = denoised_shift(gradient, rho, rho_next, remaining_fraction(step, len(schedule) - 1),
                               state.max_variance, self.config.scale, self.config.gamma)
        guided = denoised + shift.to(denoised.dtype)
        if self.mask is None:
            return guided
        return torch.lerp(denoised, guided, latent_weights(self.mask, guided, DISPLAY_NAME))
