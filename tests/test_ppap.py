"""PPAP (Go et al., CVPR 2023; guiders/ppap.py, nodes/ppap_patch.py, nodes/ppap.py, scripts/train_ppap.py) against
the official code (github.com/riiid/PPAP), inside real ComfyUI.

The references are float64 transcriptions of the official functions (tests/ppap_reference.py): the experts' timestep
ranges and the expert chosen at a timestep, loralib's LoRA weight of `peft/lora.py` and the freeze rule and expert
checkpoint of `peft/resnet_adapter.py`, the distillation loss and learning-rate annealing of `classifier_train.py`,
and the guided step of `classifier_sample.py` (`cond_fn`) with guided-diffusion's `condition_score` and DDIM update.

What is checked and why:
1. the official expert layout, at every timestep, so that each expert guides exactly where it was trained;
2. the LoRA layers, the trainable set and what an expert file holds, on the reference classifier and on a toy
   ResNet with torchvision's names (on which the official name-based rules apply as written);
3. the distillation loss and the learning-rate schedule;
4. the guided prediction of every model call, on eps (the official DDIM step, from the recorded UNet calls), v and
   flow models with a latent classifier, and on the reference model through its pixel-space input map, with experts
   of different random states so that a wrong expert shows;
5. the hook's behaviour (scale 0, masks, chunks, repeated runs, CFG, failures); 6. refusals;
7. training for real on the reference model and classifier at a tiny size: the timesteps, noise levels and inputs
   of each expert's steps, the experts' order, the file, resuming and restarting; and, on every kind of schedule,
   that each expert trains on the noise levels where it guides; 8. the nodes as a prompt runs them; 9. the command
   line.
"""

import copy
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import comfy.model_management as model_management
import comfy.model_sampling
import comfy.sample as comfy_sample
import comfy.sd
import comfy.taesd.taesd
import folder_paths
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ppap_reference as official
import slim_models
from comfyui_guidance.guiders import ppap
from comfyui_guidance.guiders.classifier import ImageClassifier
from comfyui_guidance.nodes import ppap_patch
from comfyui_guidance.nodes.adaptive_patch import model_fingerprint
from comfyui_guidance.nodes.classifier_patch import ClassifierTargets, reference_classifier
from comfyui_guidance.nodes.ppap_patch import (DISPLAY_NAME, FOLDER, LOAD_DISPLAY_NAME, LOAD_NODE_ID, NODE_ID,
                                               TRAIN_DISPLAY_NAME, TRAIN_NODE_ID, InputMap, PPAPExperts,
                                               TransferSettings, apply_ppap, read_experts, train_ppap)
from comfyui_guidance.nodes.reference import (ALL_CLASSES, DEFAULT_WEIGHTS, EmptyReferenceLatent,
                                              ReferenceClassConditioning, ReferenceModelLoader)
from conftest import REPO, comfyui_dir
from test_pag_sampling import one_torch_thread, rel_err, setup  # noqa: F401 (autouse: one torch thread)

CLASSES = 5
RANK, ALPHA = 4, 8.0


@pytest.fixture(autouse=True, scope="module")
def release_models():
    """Drops the module's cached models at its end (ComfyUI's model management warns of a leak otherwise)."""
    yield
    reference_inputs.cache_clear()
    fashion_classifier.cache_clear()
    gc.collect()
    model_management.cleanup_models_gc()


@functools.cache
def reference_inputs():
    """The reference model (v-prediction, pixel space), its pixel-space VAE, its classes, and its empty class (the
    unconditional model, as the paper samples its transfer set) with an empty 32 × 32 latent."""
    model, vae, classes = ReferenceModelLoader.execute(DEFAULT_WEIGHTS).result
    _, unconditional, _ = ReferenceClassConditioning.execute(classes, ALL_CLASSES, 1).result
    [latent] = EmptyReferenceLatent.execute(32, 32, 1).result
    return model, vae, classes, unconditional, latent["samples"]


@functools.cache
def fashion_classifier() -> ImageClassifier:
    return reference_classifier()


def latent_classifier(channels: int, seed: int = 0, name: str = "latent classifier") -> ImageClassifier:
    """A small classifier on 4 × 4 latents (slim models' latents of 32 × 32 images) with a BatchNorm (an expert keeps
    its running statistics) and smooth activations (float32 and float64 gradients agree closely everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                                nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 16, CLASSES))
    network.eval().requires_grad_(False)
    return ImageClassifier(network, (channels, 4, 4), tuple(f"class {k}" for k in range(CLASSES)), "latent", name)


def perturb_(network: nn.Module, generator: torch.Generator, strength: float) -> None:
    """Random values for every tensor an expert holds (LoRA's B made nonzero), in place."""
    held = ppap.expert_state(network)
    with torch.no_grad():
        for name, value in network.state_dict().items():
            if name not in held or not value.is_floating_point():
                continue
            leaf = name.rpartition(".")[2]
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            if leaf == "running_var":
                value.mul_(1 + 0.5 * strength * noise.tanh())
            elif leaf == "weight":  # a normalisation layer's scale
                value.mul_(1 + strength * noise.tanh())
            else:
                value.add_(strength * noise)


def random_states(classifier: ImageClassifier, count: int, strength: float = 0.2, seed: int = 0) -> list[dict]:
    """`count` experts of `classifier`, each the fresh adaptation with its own random perturbation."""
    generator = torch.Generator().manual_seed(seed)
    fresh = ppap.add_adapters(classifier.network, RANK, ALPHA, generator)
    states = []
    for _ in range(count):
        adapted = copy.deepcopy(fresh)
        perturb_(adapted, generator, strength)
        states.append(ppap.expert_state(adapted))
    return states


def made_for(model, classifier: ImageClassifier, **overrides) -> dict[str, str]:
    """The `info` that Train PPAP Experts gives experts of `classifier` distilled on `model`."""
    return {"backbone_sha256": ppap.network_sha256(classifier.network), "backbone_name": classifier.name,
            "noise_schedule": ppap_patch.noise_schedule(model), "model_fingerprint": model_fingerprint(model),
            **overrides}


def random_experts(model, classifier: ImageClassifier, count: int = 5, space: InputMap = InputMap("latent"),
                   strength: float = 0.2, **info) -> PPAPExperts:
    return PPAPExperts(classifier, random_states(classifier, count, strength), RANK, ALPHA, space,
                       made_for(model, classifier, **info))


def sample(model, positive, negative, latent, cfg=1.0, steps=3, sampler="euler", scheduler="normal"):
    return slim_models.ksample(model, positive, negative, latent, cfg=cfg, steps=steps, sampler=sampler,
                               scheduler=scheduler)["samples"]


# 1. The official layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [1, 2, 3, 5, 7])
def test_expert_ranges_and_the_expert_of_each_timestep_are_the_official_ones(experts):
    """`range_list` of the training script, and `step_to_classifier_index` at every integer timestep and on both
    sides of every boundary (a flow model's timesteps are continuous); a boundary goes to the lower range."""
    assert ppap.expert_ranges(experts) == [tuple(r) for r in official.range_list(experts)]
    boundaries = sorted({t for r in official.range_list(experts) for t in r})
    timesteps = list(range(0, 1001)) + [b + d for b in boundaries for d in (-1e-3, 1e-3) if 0 <= b + d <= 1000]
    for t in timesteps:
        assert ppap.expert_index(t, experts) == official.step_to_classifier_index(t, experts), t
    assert [ppap.expert_index(b, experts) for b in boundaries[1:]] == list(range(experts))


# 2. LoRA, the trainable set, an expert's tensors ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (5, 2, 2, 1),
                                                            (3, 1, 2, 2)])
def test_lora_conv_is_the_official_merged_weight(kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(kernel + stride)
    conv = nn.Conv2d(6, 10, kernel, stride, padding, dilation).double()
    lora = ppap.LoRAConv2d(conv, rank=3, alpha=5.0)
    reference = official.LoraConv2d(3, 5.0, copy.deepcopy(conv))
    assert lora.lora_A.shape == reference.lora_A.shape and lora.lora_B.shape == reference.lora_B.shape
    with torch.no_grad():
        lora.lora_B.normal_(0.0, 1.0, generator=generator)
        reference.lora_A.copy_(lora.lora_A)
        reference.lora_B.copy_(lora.lora_B)
    x = torch.randn(2, 6, 11, 11, generator=generator, dtype=torch.float64)
    want = reference(x)
    assert torch.allclose(lora(x), want, rtol=1e-12, atol=1e-12)
    assert rel_err(conv(x), want) > 1e-2  # the update is there


def test_lora_linear_is_the_official_merged_weight():
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(7, 5).double()
    lora = ppap.LoRALinear(linear, rank=3, alpha=6.0)
    reference = official.LoRALinear(3, 6.0, copy.deepcopy(linear))
    with torch.no_grad():
        lora.lora_B.normal_(0.0, 1.0, generator=generator)
        reference.lora_A.copy_(lora.lora_A)
        reference.lora_B.copy_(lora.lora_B)
    x = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    want = reference(x)
    assert torch.allclose(lora(x), want, rtol=1e-12, atol=1e-12)
    assert rel_err(linear(x), want) > 1e-2


class BasicBlock(nn.Module):
    """torchvision's BasicBlock names (conv1, bn1, conv2, bn2); conv1 with a bias, so a conv bias is in play."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ToyResNet(nn.Module):
    """A ResNet with torchvision's names (conv1, bn1, layer1..2, fc), LoRA-adaptable exactly where the official
    `AdapterWrapperResNet.add_adapter` puts LoRA (the stem conv and each block's conv1 and conv2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.layer2 = nn.Sequential(BasicBlock(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def toy_resnet(seed=0) -> ToyResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ToyResNet()
    for module in network.modules():  # nontrivial running statistics, as a trained network has
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return network.eval().requires_grad_(False)


def official_adapter(resnet: ToyResNet) -> ToyResNet:
    """`AdapterWrapperResNet.add_adapter` on a copy: LoRA on conv1 and on every block's conv1 and conv2."""
    wrapped = copy.deepcopy(resnet)
    wrapped.conv1 = official.LoraConv2d(RANK, ALPHA, wrapped.conv1)
    for layer in (wrapped.layer1, wrapped.layer2):
        for block in layer:
            for cv in ("conv1", "conv2"):
                setattr(block, cv, official.LoraConv2d(RANK, ALPHA, getattr(block, cv)))
    return wrapped


def trainable(network: nn.Module) -> set[str]:
    return {name for name, p in network.named_parameters() if p.requires_grad}


def test_the_trainable_set_and_an_expert_follow_the_official_rules_on_a_resnet():
    """On torchvision names the official rules apply as written: the same tensors, the same trainable set
    (`freeze_model`), the same expert checkpoint (`adapter_state_dict`: BatchNorm running statistics included)."""
    resnet = toy_resnet()
    adapted = ppap.add_adapters(resnet, RANK, ALPHA)
    wrapped = official_adapter(resnet)
    assert adapted.state_dict().keys() == wrapped.state_dict().keys()
    names = [name for name, _ in wrapped.named_parameters()]
    assert trainable(adapted) == set(ppap.expert_parameter_names(adapted)) == official.official_trainable(names)
    assert {"fc.weight", "fc.bias", "layer1.0.conv1.conv.bias"} <= set(names)  # the head and a conv bias are there
    state = ppap.expert_state(adapted)
    assert set(state) == official.official_adapter_state_names(list(wrapped.state_dict()))
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= set(state)
    assert not trainable(resnet) and isinstance(resnet.conv1, nn.Conv2d)  # the backbone is left as it was


def rule_by_layer_type(backbone: nn.Module) -> tuple[set[str], set[str]]:
    """The official rule stated by layer type, for networks without torchvision's names: (trainable, expert
    tensors) of the adapted network, the head being the last Linear."""
    modules = dict(backbone.named_modules())
    head = [name for name, m in modules.items() if isinstance(m, nn.Linear)][-1]
    train, keep = set(), set()
    for name, module in modules.items():
        if name != head and isinstance(module, (nn.Conv2d, nn.Linear)):
            child = "conv" if isinstance(module, nn.Conv2d) else "linear"
            train |= {f"{name}.lora_A", f"{name}.lora_B"} | ({f"{name}.{child}.bias"} if module.bias is not None
                                                              else set())
        elif isinstance(module, nn.BatchNorm2d):
            train |= {f"{name}.weight", f"{name}.bias"}
            keep |= {f"{name}.running_mean", f"{name}.running_var", f"{name}.num_batches_tracked"}
    return train, train | keep


def test_adapted_reference_classifier_starts_as_the_backbone_and_trains_the_official_set(comfy):
    """Freshly adapted (B = 0), the reference classifier and the toy ResNet give exactly their backbone's logits; the
    trainable set is LoRA's A and B, the BatchNorm affine parameters and every bias but the head's."""
    for backbone in (fashion_classifier().network, toy_resnet()):
        adapted = ppap.add_adapters(backbone, RANK, ALPHA, torch.Generator().manual_seed(0)).eval()
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(adapted(x), backbone(x))
        want_trainable, want_state = rule_by_layer_type(backbone)
        assert trainable(adapted) == want_trainable and set(ppap.expert_state(adapted)) == want_state
        assert all(p.abs().max() > 0 for n, p in adapted.named_parameters() if n.endswith("lora_A"))


def test_an_expert_is_its_state_and_loads_only_where_it_fits():
    """An expert's state (detached copies) loaded into another adaptation of the backbone makes the same network,
    which is the official wrappers with the state loaded; states of another rank or another network are refused."""
    resnet = toy_resnet()
    generator = torch.Generator().manual_seed(0)
    first = ppap.add_adapters(resnet, RANK, ALPHA, generator)
    perturb_(first, generator, 0.3)
    state = ppap.expert_state(first)
    second = ppap.add_adapters(resnet, RANK, ALPHA, generator)
    ppap.load_expert(second, state)
    assert all(torch.equal(second.state_dict()[k], v) for k, v in first.state_dict().items())
    x = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        want = official.expert_network(resnet, state, RANK, ALPHA)(x)
        assert torch.allclose(copy.deepcopy(second).double().eval()(x), want, rtol=1e-10, atol=1e-10)
        assert rel_err(resnet.double()(x), want) > 1e-3
        first.layer1[0].conv1.lora_B.add_(1.0)
    assert not torch.equal(state["layer1.0.conv1.lora_B"], first.layer1[0].conv1.lora_B)  # a copy, not the live tensor
    with pytest.raises(ValueError, match="conv1.lora_A has shape .*another classifier or LoRA rank"):
        ppap.load_expert(ppap.add_adapters(resnet, 2 * RANK, ALPHA), state)
    with pytest.raises(ValueError, match="lacks .*another classifier or another LoRA rank"):
        ppap.load_expert(second, {**state, "layer3.0.bn1.weight": torch.ones(8)})


# 3. Distillation loss and learning rate ------------------------------------------------------------------------------


def test_distillation_loss_is_the_official_kd_loss():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (3 * torch.randn(6, 10, generator=generator, dtype=torch.float64) for _ in range(2))
    want = official.kd_loss(student, teacher)
    assert ppap.distillation_loss(student, teacher, 0.25).item() == pytest.approx(want.item(), rel=1e-6)
    assert ppap.distillation_loss(teacher, teacher, 0.25).item() > 0  # the sharpened target is not the teacher


@pytest.mark.parametrize("steps", [1, 7, 60])
def test_learning_rate_is_the_official_annealing(steps):
    for step in range(steps):
        want = official.set_annealed_lr(3e-4, step / steps)
        assert ppap.annealed_learning_rate(3e-4, step, steps) == pytest.approx(want, rel=1e-15, abs=1e-20)


def test_training_timesteps_are_uniform_over_the_official_range():
    """The official schedule sampler with weight 1 on [lo, hi) and 0 elsewhere: every timestep of the range, no
    other, equally often."""
    generator = torch.Generator().manual_seed(0)
    for low, high in official.range_list(5):
        drawn = ppap.range_timesteps((low, high), 40_000, generator)
        assert torch.equal(drawn, drawn.round())
        counts = torch.bincount(drawn.long() - low, minlength=high - low)
        assert len(counts) == high - low and counts.min() > 120 and counts.max() < 280  # 200 expected, σ ≈ 14


# 4. The guided prediction against the official step ------------------------------------------------------------------


class Calls:
    """Post-CFG hooks around PPAP's: per model call, the state x, σ, the CFG result PPAP receives with its
    conditional and unconditional parts, and what PPAP returns."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def before(self, args):
        self.calls.append({"x": args["input"].clone(), "sigma": float(args["sigma"].max()),
                           "denoised": args["denoised"].clone(), "cond": args["cond_denoised"].clone(),
                           "uncond": args["uncond_denoised"].clone(), "cfg": args["cond_scale"]})
        return args["denoised"]

    def after(self, args):
        self.calls[-1]["guided"] = args["denoised"].clone()
        return args["denoised"]

    def around(self, model, patch):
        """`patch(model)` between this recorder's two hooks."""
        before = model.clone()
        before.set_model_sampler_post_cfg_function(self.before)
        after = patch(before).clone()
        after.set_model_sampler_post_cfg_function(self.after)
        return after


class UNetCalls:
    """Every call of the diffusion network: its input (the variance-preserving x_t for an eps model), its timestep and
    its raw output."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.get_model_object("diffusion_model").register_forward_hook(self.record)

    def record(self, module, args, output):
        self.calls.append((args[0].clone(), float(args[1].max()), output.clone()))


def official_timestep(model, sigma: float, flow: bool) -> float:
    """The step's timestep on the official 1000-step scale: a flow model's continuous t = 1000 σ; for a discrete
    schedule the index whose σ_t = √((1 − ᾱ_t)/ᾱ_t) is σ (ᾱ_t in float64 from the model's beta schedule)."""
    if flow:
        return 1000 * sigma
    table = np.sqrt((1 - alphas_cumprod(model)) / alphas_cumprod(model))
    return float(np.abs(np.log(table) - math.log(sigma)).argmin())


def alphas_cumprod(model) -> np.ndarray:
    settings = model.model.model_config.sampling_settings
    if settings.get("beta_schedule") == "sqrt_linear":  # the reference model: ADM's linear schedule
        assert (settings["linear_start"], settings["linear_end"]) == (1e-4, 2e-2)
        return official.adm_linear_alphas_cumprod()
    return official.scaled_linear_alphas_cumprod()  # Stable Diffusion's own


def expert_input(space: InputMap, sigma: float, flow: bool):
    """What the official classifier reads from the sampler's x: the diffusion model's input x_t (x/√(1 + σ²) for eps
    and v models, x itself for flow), as images in [0, 1] for the reference classifier (pixels (x_t + 1)/2)."""
    def read(x):
        x_t = x if flow else x / math.sqrt(1 + sigma ** 2)
        return x_t if space.space == "latent" else space.scale * x_t + space.offset
    return read


def official_prediction(call, networks, targets, scale, flow, space, model):
    """The prediction with PPAP, in float64, for each expert: D + s ρ² α ∇ₓ log p_φᵢ(y | x), ρ, α of x = α(x₀ + ρ ε)
    (eps, v: α = 1, ρ = σ; flow: α = 1 − σ, ρ = σ/(1 − σ)), the gradient that of `cond_fn` at the model input. At
    α = 0 the state is pure noise, whose true class likelihood is flat: no move."""
    sigma = call["sigma"]
    alpha, rho = (1 - sigma, sigma / (1 - sigma) if sigma < 1 else math.inf) if flow else (1.0, sigma)
    read = expert_input(space, sigma, flow)
    predictions = []
    for network in networks:
        if alpha == 0:
            predictions.append(call["denoised"].double())
            continue
        gradient = official.class_gradient(network, call["x"], targets, read)
        predictions.append(call["denoised"].double() + scale * rho ** 2 * alpha * gradient)
    return predictions


def official_clipped_prediction(call, networks, targets, scale, space):
    """The x̂₀ that the official guided DDIM step uses, for each expert, on the reference model (pixel space, its x̂₀
    in ADM's range [-1, 1]) in float64, written out from guided_diffusion/gaussian_diffusion.py (riiid/PPAP) in the
    variance-preserving coordinates x_t = x/√(1 + σ²), ᾱ = 1/(1 + σ²): `p_mean_variance(clip_denoised=True)`
    (pred_xstart = x̂₀.clamp(-1, 1)), then `condition_score` (eps = _predict_eps_from_xstart(x_t, pred_xstart);
    eps −= √(1 − ᾱ) cond_fn(x_t); pred_xstart = _predict_xstart_from_eps(x_t, eps)), `cond_fn` the scaled gradient
    of the expert's log-probability at x_t, the expert reading the pixels (x_t + 1)/2."""
    sigma = call["sigma"]
    alpha_bar = 1 / (1 + sigma ** 2)
    sqrt_recip, sqrt_recipm1 = math.sqrt(1 / alpha_bar), math.sqrt(1 / alpha_bar - 1)
    x_t = call["x"].double() / math.sqrt(1 + sigma ** 2)
    pred_xstart = call["denoised"].double().clamp(-1, 1)
    predictions = []
    for network in networks:
        eps = (sqrt_recip * x_t - pred_xstart) / sqrt_recipm1
        cond = scale * official.class_gradient(network, x_t, targets, lambda x: space.scale * x + space.offset)
        eps = eps - math.sqrt(1 - alpha_bar) * cond
        predictions.append(sqrt_recip * x_t - sqrt_recipm1 * eps)
    return predictions


def check_guided_calls(calls, experts, targets, scale, flow, model, clipped=False):
    """Each call's output is the official prediction of the official expert of its timestep (`clipped`: the official
    clip_denoised=True one on the reference model), and a wrong expert would show where PPAP moves the prediction;
    returns the experts used."""
    networks = [official.expert_network(experts.classifier.network, s, experts.rank, experts.alpha)
                for s in experts.states]
    used = []
    for call in calls:
        index = official.step_to_classifier_index(official_timestep(model, call["sigma"], flow), experts.count)
        predictions = (official_clipped_prediction(call, networks, targets, scale, experts.input_map) if clipped else
                       official_prediction(call, networks, targets, scale, flow, experts.input_map, model))
        assert rel_err(call["guided"], predictions[index]) < 1e-5, \
            f"sigma {call['sigma']:.4g}: not the official guided x̂₀ of expert {index} (clip_denoised {clipped})"
        unguided = call["denoised"].double().clamp(-1, 1) if clipped else call["denoised"]
        if rel_err(predictions[index], unguided) > 1e-3:
            used.append(index)
            assert min(rel_err(call["guided"], p) for k, p in enumerate(predictions) if k != index) > 1e-4
    return used


GUIDED_CASES = [  # family, prediction, sampler, scheduler, scale
    ("sd15", "v", "euler", "normal", 0.3),
    ("sd3", "flow", "euler", "normal", 0.3),
]


@pytest.mark.parametrize("family,prediction,sampler,scheduler,scale", GUIDED_CASES, ids=[c[1] for c in GUIDED_CASES])
def test_each_call_is_the_official_guided_prediction(comfy, family, prediction, sampler, scheduler, scale):
    """Slim v-prediction SD1.5 and flow SD3 with a latent classifier, two images with their own targets: every call's
    output is the float64 prediction of the official expert of its timestep (at σ = 1, the flow model's first level,
    the prediction unchanged)."""
    model, positive, negative, latent = setup(family, prediction, batch=2)
    classifier = latent_classifier(latent["samples"].shape[1])
    experts = random_experts(model, classifier)
    targets = torch.tensor([1, 3])
    recorder = Calls()
    patched = recorder.around(model, lambda m: apply_ppap(m, experts, ClassifierTargets(classifier, (1, 3)), scale))
    sample(patched, positive, negative, latent, steps=4, sampler=sampler, scheduler=scheduler)
    assert len(recorder.calls) == 4
    used = check_guided_calls(recorder.calls, experts, targets, scale, prediction == "flow", model)
    assert len(set(used)) >= 2


@pytest.mark.parametrize("clip_denoised", [True, False])
def test_reference_model_is_guided_through_its_pixels(comfy, clip_denoised):
    """The reference model (v-prediction, pixel space) with the reference classifier's experts: the expert reads the
    model input as pixels, (x_t + 1)/2, and the gradient flows back through that map. With clip_denoised (the
    default) each call's output is the official clipped guided x̂₀; without it, the unclipped prediction plus the
    same shift. Some predictions leave [-1, 1] (else the clip would go unchecked)."""
    model, vae, classes, _, _ = reference_inputs()
    classifier = fashion_classifier()
    space = ppap_patch.input_map(model, classifier, vae, DISPLAY_NAME)
    assert space == InputMap("image", 0.5, 0.5)
    experts = random_experts(model, classifier, count=3, space=space, strength=0.05)
    positive, negative, _ = ReferenceClassConditioning.execute(classes, "trouser", 2).result
    latent = {"samples": torch.zeros(2, 3, 32, 32)}
    recorder = Calls()
    targets = ClassifierTargets(classifier, (2, 7))
    patched = recorder.around(model, lambda m: apply_ppap(m, experts, targets, 2.0, clip_denoised=clip_denoised))
    sample(patched, positive, negative, latent, steps=3)
    assert any(call["denoised"].abs().max() > 1.01 for call in recorder.calls)
    used = check_guided_calls(recorder.calls, experts, torch.tensor([2, 7]), 2.0, False, model, clip_denoised)
    assert len(set(used)) >= 2


def test_eps_ddim_steps_are_the_official_guided_ddim_steps(comfy):
    """ComfyUI's ddim sampler (ddim_uniform schedule, cfg 1) with PPAP on an eps model: from each recorded UNet call
    (x_t, t, ε), the official `ddim_sample` with `condition_score` (eta 0) in float64, with the expert
    `step_to_classifier_index(t)`, gives the next UNet call's x_t, and after the last step the sample."""
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    classifier = latent_classifier(4)
    experts = random_experts(model, classifier)
    networks = [official.expert_network(classifier.network, s, RANK, ALPHA) for s in experts.states]
    scale, targets = 0.5, torch.tensor([4, 0])
    unet = UNetCalls(model)
    try:
        samples = sample(apply_ppap(model, experts, ClassifierTargets(classifier, (4, 0)), scale), positive, negative,
                         latent, steps=4, sampler="ddim", scheduler="ddim_uniform")
    finally:
        unet.handle.remove()
    abar = official.scaled_linear_alphas_cumprod()
    states = [x for x, _, _ in unet.calls[1:]] + [model.model.process_latent_in(samples)]
    timesteps = [int(t) for _, t, _ in unet.calls]
    assert timesteps == [751, 501, 251, 1]
    for k, ((x, t, eps), reached) in enumerate(zip(unet.calls, states)):
        abar_prev = abar[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0  # alphas_cumprod_prev at the end
        steps = [official.guided_ddim_step(x, eps, abar[int(t)], abar_prev,
                                           scale * official.class_gradient(network, x, targets))
                 for network in networks]
        index = official.step_to_classifier_index(t, experts.count)
        assert rel_err(reached, steps[index]) < 1e-5, k
        if k < 3:  # the last step, at σ = 0.03, hardly moves
            unguided = official.guided_ddim_step(x, eps, abar[int(t)], abar_prev, torch.zeros(eps.shape))
            assert rel_err(steps[index], unguided) > 1e-3
            assert min(rel_err(reached, s) for j, s in enumerate(steps) if j != index) > 1e-4


# 5. The hook's behaviour ---------------------------------------------------------------------------------------------


def slim_case(batch=2):
    """Slim SD1.5 (eps), `batch` prompts, a latent classifier and five random experts of it."""
    model, positive, negative, latent = setup("sd15", "eps", batch=batch)
    classifier = latent_classifier(4)
    return model, positive, negative, latent, classifier, random_experts(model, classifier)


def test_scale_zero_is_the_unpatched_model_and_runs_do_not_share_state(comfy):
    model, positive, negative, latent, classifier, experts = slim_case()
    targets = ClassifierTargets(classifier, (1, 2))
    plain = sample(model, positive, negative, latent, cfg=3.0)
    assert torch.equal(sample(apply_ppap(model, experts, targets, 0.0), positive, negative, latent, cfg=3.0), plain)
    patched = apply_ppap(model, experts, targets, 0.5)
    first, second = (sample(patched, positive, negative, latent, cfg=3.0) for _ in range(2))
    assert torch.equal(first, second) and rel_err(first, plain) > 1e-3
    assert torch.equal(sample(model, positive, negative, latent, cfg=3.0), plain)  # the model itself is untouched


def test_chunks_do_not_change_the_result(comfy):
    model, positive, negative, latent, classifier, experts = slim_case(batch=3)
    targets = ClassifierTargets(classifier, (1, 2, 4))
    one, eight = (sample(apply_ppap(model, experts, targets, 0.5, chunk=chunk), positive, negative, latent)
                  for chunk in (1, 8))
    assert rel_err(one, eight) < 1e-5  # float32 rounding of batches of 1 and 3, carried over three steps


def test_masks_blend_the_guided_and_unguided_predictions(comfy):
    """All-zero: the unguided run; all-one: the run without a mask; a left-half mask: in each call, PPAP's
    prediction on the left half of the latent and the prediction it received on the right half."""
    model, positive, negative, latent, classifier, experts = slim_case()
    targets = ClassifierTargets(classifier, (1, 2))
    plain, guided = (sample(m, positive, negative, latent) for m in (model, apply_ppap(model, experts, targets, 0.5)))
    assert torch.equal(sample(apply_ppap(model, experts, targets, 0.5, mask=torch.zeros(1, 32, 32)), positive,
                              negative, latent), plain)
    assert torch.equal(sample(apply_ppap(model, experts, targets, 0.5, mask=torch.ones(2, 32, 32)), positive,
                              negative, latent), guided)
    half = torch.zeros(1, 32, 32)
    half[..., :16] = 1
    recorder, full = Calls(), Calls()
    sample(full.around(model, lambda m: apply_ppap(m, experts, targets, 0.5)), positive, negative, latent, steps=1)
    sample(recorder.around(model, lambda m: apply_ppap(m, experts, targets, 0.5, mask=half)), positive, negative,
           latent, steps=1)
    [call], [whole] = recorder.calls, full.calls
    assert torch.equal(call["guided"][..., 2:], call["denoised"][..., 2:])
    assert torch.equal(call["guided"][..., :2], whole["guided"][..., :2])
    assert rel_err(call["guided"][..., :2], call["denoised"][..., :2]) > 1e-3


def test_ppap_acts_on_the_cfg_result(comfy):
    """With cfg 3, PPAP receives CFG's combination of the conditional and unconditional predictions and adds its
    shift to it (one expert pass per call, on the state)."""
    model, positive, negative, latent, classifier, experts = slim_case()
    recorder = Calls()
    patched = recorder.around(model, lambda m: apply_ppap(m, experts, ClassifierTargets(classifier, (3,)), 0.5))
    sample(patched, positive, negative, latent, cfg=3.0)
    for call in recorder.calls:
        assert call["cfg"] == 3.0
        assert rel_err(call["denoised"], call["uncond"] + 3.0 * (call["cond"] - call["uncond"])) < 1e-6
    used = check_guided_calls(recorder.calls, experts, torch.tensor([3, 3]), 0.5, False, model)
    assert used


def test_failures_are_reported_by_name(comfy):
    """A NaN in an expert stops the run naming the node; a video latent is refused by the image interface."""
    model, positive, negative, latent, classifier, experts = slim_case()
    broken = PPAPExperts(classifier, [{**s, "0.lora_B": torch.full_like(s["0.lora_B"], math.nan)}
                                      for s in experts.states], RANK, ALPHA, InputMap("latent"), experts.info)
    with pytest.raises(ValueError, match=f"^{DISPLAY_NAME}: the expert's gradient is not finite at sigma"):
        sample(apply_ppap(model, broken, ClassifierTargets(classifier, (1,)), 0.5), positive, negative, latent)
    wan, positive, negative, video = setup("wan21", batch=1)
    video_classifier = latent_classifier(16)
    patched = apply_ppap(wan, random_experts(wan, video_classifier), ClassifierTargets(video_classifier, (0,)), 0.5)
    with pytest.raises(ValueError, match=rf"^{DISPLAY_NAME}: .*\[batch, channels, height, width\]"):
        sample(patched, positive, negative, video, steps=2)


# 6. Refusals ---------------------------------------------------------------------------------------------------------


def latent_vae():
    """A real ComfyUI VAE whose latents are not images (TAESD; random weights: only its kind matters here)."""
    return comfy.sd.VAE(sd=comfy.taesd.taesd.TAESD(latent_channels=4).state_dict())


def test_an_image_classifier_cannot_learn_a_latent_model(comfy, tmp_path):
    model, positive, negative, latent = setup("sd15", "eps")
    classifier = fashion_classifier()
    with pytest.raises(ValueError, match=f"^{TRAIN_DISPLAY_NAME}: PPAP's experts read the model's noisy input, and "
                                         "this model's latents are not images \\(TAESD VAE\\)"):
        train_ppap(model, classifier, positive, negative, latent["samples"], latent_vae(), TransferSettings(1, 1, 1),
                   ppap.PPAPConfig(1, steps=1, batch=1), tmp_path / "work")
    assert not list(tmp_path.rglob("samples_*"))
    with pytest.raises(ValueError, match=f"^{TRAIN_DISPLAY_NAME}: .*connect the model's VAE"):
        ppap_patch.input_map(model, classifier, None, TRAIN_DISPLAY_NAME)
    assert ppap_patch.input_map(model, latent_classifier(4), None, TRAIN_DISPLAY_NAME) == InputMap("latent")


def edm_models(nodes, model):
    """The model with EDM-like sampling: ComfyUI's ModelSamplingContinuousEDM node, and a discrete EDM schedule."""
    continuous = nodes.NODE_CLASS_MAPPINGS["ModelSamplingContinuousEDM"]().patch(model, "edm", 120.0, 0.002)[0]

    class DiscreteEDM(comfy.model_sampling.ModelSamplingDiscreteEDM, comfy.model_sampling.EPS):
        pass

    discrete = model.clone()
    discrete.add_object_patch("model_sampling", DiscreteEDM(model.model.model_config))
    return continuous, discrete


def test_models_without_diffusion_timesteps_are_refused(comfy, tmp_path):
    model, positive, negative, latent = setup("sd15", "eps")
    classifier = latent_classifier(4)
    for edm, kind in zip(edm_models(comfy, model), ("ModelSamplingContinuousEDM", "ModelSamplingDiscreteEDM")):
        with pytest.raises(ValueError, match=f"^{DISPLAY_NAME}: PPAP's experts cover ranges of a model's diffusion "
                                             f"timesteps; this model's sampling \\({kind}.*use an eps, v or flow"):
            apply_ppap(edm, random_experts(edm, classifier, 1), ClassifierTargets(classifier, (0,)), 1.0)
        with pytest.raises(ValueError, match=f"^{TRAIN_DISPLAY_NAME}: .*{kind}"):
            train_ppap(edm, classifier, positive, negative, latent["samples"], None, TransferSettings(1, 1, 1),
                       ppap.PPAPConfig(1, steps=1, batch=1), tmp_path / "work")
    assert not list(tmp_path.rglob("samples_*"))


def test_experts_go_only_with_their_classifier_and_schedule(comfy, tmp_path, caplog):
    """Loading onto another classifier, targets of another classifier, another noise schedule: refused, naming
    both sides and the fix; other weights of the same schedule: a warning, and PPAP guides."""
    model, positive, negative, latent = setup("sd15", "eps")
    mine, other = latent_classifier(4, seed=0, name="classifier A"), latent_classifier(4, seed=1, name="classifier B")
    experts = random_experts(model, mine, 2)
    path = tmp_path / "experts.safetensors"
    experts.save(str(path))
    with pytest.raises(ValueError) as refusal:
        read_experts(str(path), other)
    message = str(refusal.value)
    assert message.startswith(f"{LOAD_DISPLAY_NAME}: these experts were distilled from another classifier")
    assert ppap.network_sha256(mine.network)[:12] in message and "classifier A" in message
    assert ppap.network_sha256(other.network)[:12] in message and "classifier B" in message
    assert f"Load them onto the classifier they were trained from, or train experts for this one with " \
           f"{TRAIN_DISPLAY_NAME}" in message
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a PPAP expert file"):
        read_experts(str(tmp_path / "other.safetensors"), mine)
    with pytest.raises(ValueError, match=f"^{DISPLAY_NAME}: the target classes are of classifier B, but these experts "
                                         "were distilled from classifier A"):
        apply_ppap(model, experts, ClassifierTargets(other, (0,)), 1.0)
    v_model = setup("sd15", "v")[0]
    with pytest.raises(ValueError) as refusal:
        apply_ppap(v_model, experts, ClassifierTargets(mine, (0,)), 1.0)
    message = str(refusal.value)
    assert message.startswith(f"{DISPLAY_NAME}: these experts were distilled for a model with "
                              "ModelSamplingDiscrete+EPS")
    assert "this model has ModelSamplingDiscrete+V_PREDICTION" in message and TRAIN_DISPLAY_NAME in message
    with caplog.at_level(logging.WARNING):
        apply_ppap(model, experts, ClassifierTargets(mine, (0,)), 1.0)
        assert not caplog.records
        elsewhere = random_experts(model, mine, 2, model_fingerprint="0123456789abcdef")
        patched = apply_ppap(model, elsewhere, ClassifierTargets(mine, (0,)), 1.0)
    [record] = caplog.records
    assert "distilled on the samples of other weights (fingerprint 0123456789abcdef" in record.getMessage()
    assert rel_err(sample(patched, positive, negative, latent), sample(model, positive, negative, latent)) > 1e-3


# 7. Training ---------------------------------------------------------------------------------------------------------

TRANSFER = TransferSettings(images=16, batch=8, sample_steps=3, seed=0)
CONFIG = ppap.PPAPConfig(experts=2, rank=RANK, alpha=ALPHA, steps=6, batch=8, learning_rate=1e-3)
PER_EXPERT = CONFIG.steps_per_expert


def train(work, config=CONFIG, transfer=TRANSFER, progress=None):
    model, vae, _, unconditional, latent = reference_inputs()
    return train_ppap(model, fashion_classifier(), unconditional, unconditional, latent, vae, transfer, config, work,
                      progress)


class TrainingRecord:
    """What the training loop hands its parts, step by step: the timesteps drawn and their σ, the learning-rate
    calls, the teacher's clean inputs, the student's noisy inputs and images, and the student's expert tensors at
    the start of each step."""

    def __init__(self, patch):
        self.positions, self.sigmas, self.rates = [], [], []
        self.clean, self.noisy, self.images, self.states = [], [], [], []
        position_sigmas, rate = ppap_patch.position_sigmas, ppap_patch.annealed_learning_rate
        record = self

        def recorded_sigmas(model_sampling, positions):
            sigmas = position_sigmas(model_sampling, positions)
            record.positions.append(positions.clone())
            record.sigmas.append(sigmas.clone())
            return sigmas

        def recorded_rate(base, step, steps):
            record.rates.append((step, steps))
            return rate(base, step, steps)

        class Recorded(ppap_patch.ClassifierOnDenoised):
            def logits(self, denoised):
                if any(p.requires_grad for p in self.network.parameters()):  # the student
                    record.states.append(ppap.expert_state(self.network))
                    record.noisy.append(denoised.detach().clone())
                    record.images.append(self.images(denoised).detach().clone())
                else:  # the teacher
                    record.clean.append(denoised.detach().clone())
                return super().logits(denoised)

        patch.setattr(ppap_patch, "position_sigmas", recorded_sigmas)
        patch.setattr(ppap_patch, "annealed_learning_rate", recorded_rate)
        patch.setattr(ppap_patch, "ClassifierOnDenoised", Recorded)


@pytest.fixture(scope="module")
def trained(comfy, tmp_path_factory):
    """Experts trained without interruption, their work folder, and the record of the run."""
    work = tmp_path_factory.mktemp("ppap") / "work"
    with pytest.MonkeyPatch.context() as patch:
        record = TrainingRecord(patch)
        experts = train(work)
    return experts, work, record


def transfer_set(work):
    return torch.cat([load_file(str(p))["samples"] for p in sorted((work / "transfer").glob("samples_*"))])


def test_each_expert_learns_its_noise_range_from_noised_transfer_images(comfy, trained):
    """Every step draws the batch's timesteps from its expert's official range [lo, hi) (integers, the official
    schedule sampler), at σ_t = √((1 − ᾱ_t)/ᾱ_t) of the official linear schedule; the student reads x_t = x/√(1 + σ²)
    of x = x₀ + σ ε (q_sample) as pixels (x_t + 1)/2, ε standard normal; x₀ are transfer images, some flipped."""
    _, work, record = trained
    assert len(record.positions) == len(record.noisy) == len(record.clean) == CONFIG.steps
    abar = official.adm_linear_alphas_cumprod()
    table = torch.from_numpy(np.sqrt((1 - abar) / abar))
    images = transfer_set(work)
    assert images.shape == (TRANSFER.images, 3, 32, 32)
    flipped = 0
    for step, (positions, sigmas, clean, noisy, seen) in enumerate(zip(
            record.positions, record.sigmas, record.clean, record.noisy, record.images)):
        low, high = official.range_list(CONFIG.experts)[step // PER_EXPERT]
        assert positions.shape == (CONFIG.batch,) and torch.equal(positions, positions.round())
        assert ((positions >= low) & (positions < high)).all(), (step, positions)
        assert rel_err(sigmas, table[positions.long()]) < 1e-5
        sigma = sigmas.double().view(-1, 1, 1, 1)
        noise = (noisy.double() - clean.double()) / sigma
        assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
        assert rel_err(seen, 0.5 * noisy.double() / (1 + sigma ** 2).sqrt() + 0.5) < 1e-6
        for x0 in clean:
            plain = (images == x0).flatten(1).all(1).any()
            mirrored = (images.flip(-1) == x0).flatten(1).all(1).any()
            assert plain or mirrored
            flipped += int(mirrored and not plain)
    assert 0 < flipped < CONFIG.steps * CONFIG.batch


def test_experts_train_one_after_another_with_the_official_annealing(comfy, trained):
    """Expert 2 starts where expert 1 ended (the official script never resets the adapters); the rate is annealed
    over each expert's own steps."""
    experts, _, record = trained
    assert record.rates == [(step, PER_EXPERT) for _ in range(CONFIG.experts) for step in range(PER_EXPERT)]
    first, second = experts.states
    start = record.states[PER_EXPERT]
    assert start.keys() == first.keys() and all(torch.equal(start[k], first[k]) for k in first)
    assert not all(torch.equal(record.states[0][k], first[k]) for k in first)
    assert not all(torch.equal(second[k], first[k]) for k in first)


def test_the_expert_file_holds_only_the_experts(comfy, trained, tmp_path):
    """Saved and read back: the same tensors; the file holds expert.<i>.<tensor> of each expert's state only (none of
    the backbone's frozen weights) and says which backbone and model they were made for."""
    experts, _, _ = trained
    model = reference_inputs()[0]
    classifier = fashion_classifier()
    path = tmp_path / "experts.safetensors"
    experts.save(str(path))
    _, want = rule_by_layer_type(classifier.network)
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {f"expert.{i}.{name}" for i in range(CONFIG.experts) for name in want}
    assert metadata["backbone_sha256"] == ppap.network_sha256(classifier.network)
    assert metadata["model_fingerprint"] == model_fingerprint(model)
    assert metadata["noise_schedule"] == ppap_patch.noise_schedule(model)
    assert json.loads(metadata["ranges"]) == official.range_list(CONFIG.experts)
    loaded = read_experts(str(path), classifier)
    assert (loaded.count, loaded.rank, loaded.alpha, loaded.input_map) == (2, RANK, ALPHA, experts.input_map)
    for mine, theirs in zip(experts.states, loaded.states):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def lcm(nodes, model):
    """The model with LCM's sampling (ComfyUI's ModelSamplingDiscrete node): 50 of the 1000 timesteps."""
    return nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, "lcm", False)[0]


AGREEMENT_CASES = [  # family, prediction, LCM sampling, how far (in timesteps) a noise level may stand from its own
    ("sd15", "eps", False, 1e-3),
    ("sd15", "eps", True, 10),  # LCM's levels are 20 timesteps apart
    ("sd3", "flow", False, 1e-3),
    ("flux", "flow", False, 1e-3),
]


@pytest.mark.parametrize("family,prediction,distilled,resolution", AGREEMENT_CASES,
                         ids=["sd15", "sd15-lcm", "sd3", "flux"])
def test_experts_train_on_the_noise_levels_where_they_guide(comfy, monkeypatch, family, prediction, distilled,
                                                            resolution):
    """Training turns each drawn timestep t into a noise level through the model's sampling, and the hook picks the
    expert of a noise level through it too: at every training noise level of expert i the hook picks the official
    expert of t (i, or i − 1 at its lower boundary; within the schedule's resolution), and the model's largest and
    smallest σ go to the last and the first expert. Shifted flow schedules (SD3, Flux) and LCM's 50 timesteps make
    the model's σ(t) differ from the identity scale."""
    model = setup(family, prediction)[0]
    model = lcm(comfy, model) if distilled else model
    channels = model.get_model_object("latent_format").latent_channels
    classifier = latent_classifier(channels)
    drawn, position_sigmas = [], ppap_patch.position_sigmas

    def recorded(sampling, positions):
        drawn.append((positions.clone(), position_sigmas(sampling, positions)))
        return drawn[-1][1]

    monkeypatch.setattr(ppap_patch, "position_sigmas", recorded)
    clean = torch.randn(8, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    config = ppap.PPAPConfig(experts=5, rank=2, steps=5, batch=32)
    ppap_patch.distill_experts(model, classifier, clean, InputMap("latent"), config, seed=0)
    sampling = model.get_model_object("model_sampling")

    def expert_at(sigma):  # as the hook picks it
        return ppap.expert_index(ppap_patch.model_position(sampling, sigma), 5)

    assert (expert_at(float(sampling.sigma_max)), expert_at(float(sampling.sigma_min))) == (4, 0)
    for expert, (positions, sigmas) in enumerate(drawn):
        for t, sigma in zip(positions.tolist(), sigmas.tolist()):
            official_experts = {official.step_to_classifier_index(min(max(t + d, 0), 1000), 5)
                                for d in (-resolution, 0, resolution)}
            assert expert in official_experts and expert_at(sigma) in official_experts, (expert, t, sigma)


@pytest.fixture
def counted_sampling(monkeypatch):
    """The sampling runs of the transfer set, counted."""
    runs = []
    real = comfy_sample.sample
    monkeypatch.setattr(comfy_sample, "sample", lambda *a, **k: runs.append(1) or real(*a, **k))
    return runs


def cancel_at(count, reports):
    """A progress callback that presses Cancel when the count reaches `count`."""
    def progress(done, total):
        reports.append(done)
        if done == count:
            model_management.interrupt_current_processing(True)
    return progress


def test_an_interrupted_training_resumes_to_the_same_experts(comfy, trained, tmp_path, monkeypatch,
                                                             counted_sampling):
    """Cancelled after the first transfer batch, then after step 5 (checkpoints every 2 steps: the last at step 4, in
    expert 2), then queued again with the same work folder: no transfer image is sampled twice, training goes on
    from step 5, and the experts equal the uninterrupted run's."""
    uninterrupted, _, _ = trained
    monkeypatch.setattr(ppap_patch, "CHECKPOINT_EVERY", 2)
    work, reports = tmp_path / "work", []
    for stop in (TRANSFER.batch, TRANSFER.images + 5):
        try:
            with pytest.raises(model_management.InterruptProcessingException):
                train(work, progress=cancel_at(stop, reports))
        finally:
            model_management.interrupt_current_processing(False)
        assert reports[-1] == stop
    assert len(counted_sampling) == 2
    assert torch.load(work / "training.pt", weights_only=True)["done"] == 4
    reports.clear()
    resumed = train(work, progress=lambda done, total: reports.append(done))
    assert len(counted_sampling) == 2 and reports == [8, 16, TRANSFER.images + 5, TRANSFER.images + 6]
    for want, got in zip(uninterrupted.states, resumed.states):
        assert want.keys() == got.keys()
        assert max((got[k].double() - want[k].double()).abs().max().item() for k in want) <= 1e-6


def test_changed_settings_restart_the_training_and_reuse_the_transfer_set(comfy, trained, tmp_path,
                                                                           counted_sampling):
    """A finished run's work folder and other training settings: training starts from step 1 (a resume would find
    every step done); the transfer set on disk is used as it is. Other transfer settings sample it anew."""
    _, finished, _ = trained
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    reports = []
    short = dataclasses.replace(CONFIG, steps=2)
    experts = train(work, config=short, progress=lambda done, total: reports.append(done))
    assert counted_sampling == [] and reports == [8, 16, 17, 18] and experts.count == 2
    train(work, config=short, transfer=dataclasses.replace(TRANSFER, images=8))
    assert len(counted_sampling) == 1 and len(list((work / "transfer").glob("samples_*"))) == 1


def test_other_prompts_sample_a_new_transfer_set_and_restart_the_training(comfy, trained, tmp_path,
                                                                         counted_sampling):
    """A run's work folder queued again with another prompt (a class instead of the empty class) and the same
    settings: the transfer set is sampled anew from that prompt, and the training, whose data changed, starts again
    from step 1 rather than going on from the checkpoint made on the old samples."""
    _, finished, _ = trained
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    model, vae, classes, _, latent = reference_inputs()
    positive, negative, _ = ReferenceClassConditioning.execute(classes, "trouser", 1).result
    reports = []
    train_ppap(model, fashion_classifier(), positive, negative, latent, vae, TRANSFER, CONFIG, work,
               lambda done, total: reports.append(done))
    assert len(counted_sampling) == 2
    assert reports == [8, 16, *range(TRANSFER.images + 1, TRANSFER.images + CONFIG.steps + 1)]


# 8. The nodes --------------------------------------------------------------------------------------------------------


@pytest.fixture
def expert_folder(tmp_path, monkeypatch):
    """models/ppap_experts pointed at a fresh folder for the nodes (restored after the test)."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))
    return folder


def run_node(comfy, node_id, **inputs):
    return comfy.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def test_train_load_and_guide_through_the_nodes(comfy, expert_folder):
    """As a prompt runs them (under inference mode): Train PPAP Experts saves its file in models/ppap_experts and
    removes its work folder, Load PPAP Experts reads it onto the classifier, PPAP Classifier Guidance patches the
    model, which samples."""
    with torch.inference_mode():
        model, vae, classes = run_node(comfy, "GuidanceReferenceModelLoader", weights=DEFAULT_WEIGHTS)
        [classifier] = run_node(comfy, "GuidanceReferenceClassifierLoader", weights="fashion_classifier.safetensors")
        positive, negative, _ = run_node(comfy, "GuidanceReferenceClassConditioning", classes=classes,
                                         class_name="bag", images_per_class=2)
        [latent] = run_node(comfy, "GuidanceEmptyReferenceLatent", width=32, height=32, batch_size=2)
        trained, path = run_node(
            comfy, TRAIN_NODE_ID, model=model, classifier=classifier, positive=negative, negative=negative,
            latent_image=latent, vae=vae, experts=2, rank=RANK, alpha=ALPHA, train_steps=2, batch_size=4,
            learning_rate=1e-3, teacher_temperature=0.25, transfer_images=4, transfer_batch=4, sample_steps=2,
            transfer_cfg=1.0, seed=0, filename="tiny")
        assert path == str(expert_folder / "tiny.safetensors") and not (expert_folder / "tiny.training").exists()
        [loaded] = run_node(comfy, LOAD_NODE_ID, classifier=classifier, experts="tiny.safetensors")
        assert loaded.count == 2 and all(torch.equal(a[k], b[k]) for a, b in zip(trained.states, loaded.states)
                                         for k in a)
        [targets] = run_node(comfy, "GuidanceClassifierTargets", classifier=classifier, classes="bag",
                             images_per_class=2)
        [patched] = run_node(comfy, NODE_ID, model=model, experts=loaded, targets=targets, scale=7.5)
        guided, plain = (sample(m, positive, negative, latent, steps=2) for m in (patched, model))
    assert torch.isfinite(guided).all() and rel_err(guided, plain) > 1e-4
    with pytest.raises(ValueError, match=f"^{LOAD_DISPLAY_NAME}: no expert file 'missing.safetensors'"):
        run_node(comfy, LOAD_NODE_ID, classifier=classifier, experts="missing.safetensors")


def test_train_node_validates_its_widgets(comfy):
    node = comfy.NODE_CLASS_MAPPINGS[TRAIN_NODE_ID]
    assert node.validate_inputs(experts=3, train_steps=3, filename="experts") is True
    message = node.validate_inputs(experts=3, train_steps=2, filename="experts")
    assert message.startswith(f"{TRAIN_DISPLAY_NAME}: ") and "train_steps (2) is below experts (3)" in message
    for name in ("../experts", "a/b", ".hidden", " "):
        assert "give a plain file name" in node.validate_inputs(experts=1, train_steps=1, filename=name)


# 9. The command line -------------------------------------------------------------------------------------------------


def test_command_writes_experts_that_load(comfy, tmp_path):
    out = tmp_path / "fashion_ppap.safetensors"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_ppap.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--experts", "2", "--rank", "2", "--steps", "2", "--batch", "4", "--transfer-images", "4",
         "--transfer-batch", "4", "--sample-steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out} (2 experts" in run.stdout and not out.with_suffix(".training").exists()
    experts = read_experts(str(out), fashion_classifier())
    assert (experts.count, experts.rank) == (2, 2)
    assert json.loads(experts.info["transfer"])["images"] == 4 and json.loads(experts.info["config"])["steps"] == 2
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_ppap.py"), "--comfyui", str(comfyui_dir()), "--cpu",
         "--experts", "3", "--steps", "2", "--out", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "steps (2) must give every one of the 3 experts" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()
