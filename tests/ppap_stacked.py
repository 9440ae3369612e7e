"""PPAP for the tests that stack it with other nodes or masks (test_composition.py, test_masks.py): experts made
in-test for test_elucd_sampling's latent classifier, and a float64 reference of PPAP's post-CFG term written from the
paper and the official code, not from the pack's classes (tests/ppap_reference.py holds test_ppap.py's references).

PPAP (Go et al., CVPR 2023, Sec. 2 and 4) guides with the expert of the current timestep's range, i the first of the
N ranges [⌊iT/N⌋, ⌊(i+1)T/N⌋] (T = 1000) holding t (the official `step_to_classifier_index`), read on the model's
noisy input. On an eps model of ComfyUI's state x = x₀ + σ ε that input is x / √(1 + σ²), and adding
s ∇ₓ log p_φᵢ(y | x) to the score moves the denoised prediction by s σ² ∇ₓ log p_φᵢ(y | x).

An expert is loralib's Conv2d update of the backbone's convolutions, ΔW = (B A).view(W.shape) · α/r, with its own
biases; the head (the last Linear) stays the backbone's.
"""

import math

import torch
import torch.nn.functional as F

from test_elucd_sampling import latent_classifier

RANK, ALPHA = 4, 8.0
TIMESTEPS = 1000
CONVOLUTIONS = (0, 2)  # test_elucd_sampling.latent_classifier: conv, ReLU, conv, ReLU, flatten, linear (the head)
HEAD = 5


def made_experts(model, count: int, channels: int = 4, seed: int = 0, spread: float = 0.3):
    """`count` PPAP experts for `model` on latent_classifier(channels), each with LoRA matrices and biases drawn
    from its own seed (distinct experts, so that which one guides a step shows in the result)."""
    from comfyui_guidance.guiders.ppap import add_adapters, expert_state, network_sha256
    from comfyui_guidance.nodes.adaptive_patch import model_fingerprint
    from comfyui_guidance.nodes.ppap_patch import InputMap, PPAPExperts, noise_schedule

    classifier = latent_classifier(channels)
    states = []
    with torch.inference_mode(False):
        for i in range(count):
            generator = torch.Generator().manual_seed(1000 * seed + i)
            network = add_adapters(classifier.network, RANK, ALPHA, generator)
            with torch.no_grad():
                for parameter in network.parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * spread)
            states.append(expert_state(network))
    info = {"backbone_sha256": network_sha256(classifier.network), "backbone_name": classifier.name,
            "noise_schedule": noise_schedule(model), "model_fingerprint": model_fingerprint(model)}
    return PPAPExperts(classifier, states, RANK, ALPHA, InputMap("latent"), info)


def expert_of(sigma: float, model_sampling, count: int) -> int:
    """The official choice: t the discrete timestep whose σ is nearest in log σ, then the first range holding it."""
    log_sigmas = model_sampling.sigmas.double().log()
    t = int((log_sigmas - math.log(sigma)).abs().argmin())
    for i in range(count):
        if math.floor(i * TIMESTEPS / count) <= t <= math.floor((i + 1) * TIMESTEPS / count):
            return i
    raise AssertionError(f"timestep {t} in no range")


def expert_logits(experts, index: int, images: torch.Tensor) -> torch.Tensor:
    """Expert `index` of `made_experts` on `images`, in float64: the backbone's convolutions with the loralib update
    and the expert's biases, ReLU, the backbone's head."""
    backbone = experts.classifier.network
    state = {name: value.double() for name, value in experts.states[index].items()}
    assert set(state) == {f"{i}.{leaf}" for i in CONVOLUTIONS for leaf in ("lora_A", "lora_B", "conv.bias")}, state
    h = images
    for i in CONVOLUTIONS:
        weight = backbone[i].weight.double()
        update = (state[f"{i}.lora_B"] @ state[f"{i}.lora_A"]).view(weight.shape) * (ALPHA / RANK)
        h = F.relu(F.conv2d(h, weight + update, state[f"{i}.conv.bias"], padding=1))
    return F.linear(h.flatten(1), backbone[HEAD].weight.double(), backbone[HEAD].bias.double())


def ppap_shift(experts, targets, scale: float, x: torch.Tensor, sigma: float, model_sampling,
               index: int | None = None) -> torch.Tensor:
    """s σ² ∇ₓ log softmax(f_φᵢ(x / √(1 + σ²)))_y in float64 (eps model), i the official expert of σ unless
    `index` is given; `targets` the class of each image of the batch."""
    i = expert_of(sigma, model_sampling, experts.count) if index is None else index
    with torch.inference_mode(False), torch.enable_grad():
        state = x.double().detach().clone().requires_grad_(True)
        logits = expert_logits(experts, i, state / math.sqrt(1 + sigma ** 2))
        chosen = torch.log_softmax(logits, dim=1)[torch.arange(len(targets)), torch.as_tensor(targets)]
        (gradient,) = torch.autograd.grad(chosen.sum(), state)
    return scale * sigma ** 2 * gradient
