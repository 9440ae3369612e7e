"""EluCD as a model patch inside real ComfyUI sampling (nodes/elucd_patch.py): each model call's output is the
official guided step's prediction, in float64, for eps, v and flow models and for one- and multi-call samplers; the
run's state starts afresh each run; the reference model's classes come out more often under its classifier; bad
inputs are refused with messages that name the node and the fix."""

import copy
import math

import pytest
import torch
from torch import nn

import slim_models
from comfyui_guidance.guiders.classifier import ImageClassifier
from comfyui_guidance.guiders.elucd import EluCDCalibration, EluCDConfig
from comfyui_guidance.nodes.classifier_patch import ClassifierTargets, reference_classifier
from comfyui_guidance.nodes.elucd_patch import DISPLAY_NAME, NODE_ID, apply_elucd
from test_pag_sampling import Spy, rel_err, setup

CLASSES = 5


def latent_classifier(channels: int, seed: int = 0) -> ImageClassifier:
    """A small ReLU network on 4×4 latents (slim models' latents of 32×32 images), with random weights large enough
    that its gradient matters."""
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, CLASSES)).eval()
    network.requires_grad_(False)
    return ImageClassifier(network, (channels, 4, 4), tuple(f"class {k}" for k in range(CLASSES)), "latent")


def variance_exploding(sigma, flow):
    """The noise level of the same state in x = x₀ + ρ ε: a flow model's x/(1 − σ) = x₀ + σ/(1 − σ) ε."""
    return (math.inf if sigma == 1 else sigma / (1 - sigma)) if flow else sigma


def ddpm_variance(rho, rho_next):
    """DDPM's posterior variance β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t of the step ρ → ρ', with ᾱ = 1/(1 + ρ²)."""
    abar, abar_next = 1 / (1 + rho ** 2), 1 / (1 + rho_next ** 2)
    return (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)


def official_step_prediction(denoised, network, target, sigma, sigma_next, remaining, max_variance, config, flow):
    """The official sampler's guided step (EluCD DDPM `p_sample`) expressed as a denoised prediction, in float64,
    written from the paper's variables: ReLU → Softplus(β) in a float64 copy, g = ∇_{x̂₀}[τ₁ z_y − log Σ exp(τ₂ z)],
    the mean moved by (Σ_t + a_t) s g in variance-preserving coordinates; since ComfyUI's DDPM mean is
    D + (ρ'²/ρ²)(x − D) in x = x₀ + ρ ε and x_VP = x/√(1 + ρ'²), D moves by (Σ_t + a_t) s g √(1 + ρ'²)/(1 − ρ'²/ρ²)."""
    smoothed = nn.Sequential(*[nn.Softplus(config.calibration.softplus_beta) if isinstance(m, nn.ReLU) else m
                               for m in copy.deepcopy(network)]).double()
    x0 = denoised.double().clone().requires_grad_(True)
    logits = smoothed(x0)
    tau1 = config.calibration.joint_temperature
    tau2 = tau1 * config.calibration.margin_temperature_discount
    value = tau1 * logits[torch.arange(len(target)), target] - torch.logsumexp(tau2 * logits, dim=1)
    (gradient,) = torch.autograd.grad(value.sum(), x0)
    rho, rho_next = (variance_exploding(s, flow) for s in (sigma, sigma_next))
    variance = ddpm_variance(rho, rho_next)
    max_variance = max(max_variance, variance)
    bump = max(math.sin(math.pi * remaining) * max_variance * config.gamma, 0.0)
    if variance == 0:
        return denoised.double(), max_variance
    shift = (variance + bump) * config.scale * gradient * math.sqrt(1 + rho_next ** 2) / (1 - (rho_next / rho) ** 2)
    return denoised.double() + shift, max_variance


class Recorder:
    """Post-CFG hooks around EluCD: the prediction it receives and the one it returns, per model call."""

    def __init__(self):
        self.before, self.after, self.sigmas, self.schedules = [], [], [], []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def first(self, args):
        self.before.append(args["denoised"].clone())
        self.sigmas.append(float(args["sigma"].max()))
        self.schedules.append(args["model_options"]["transformer_options"]["sample_sigmas"].clone())
        return args["denoised"]

    def last(self, args):
        self.after.append(args["denoised"].clone())
        return args["denoised"]

    def around(self, model, patch):
        before = model.clone()
        before.set_model_sampler_post_cfg_function(self.first)
        after = patch(before).clone()
        after.set_model_sampler_post_cfg_function(self.last)
        return after


CASES = [  # family, prediction, sampler, cfg, batch
    ("sd15", "eps", "ddpm", 5.0, 3),
    ("sd15", "v", "euler", 1.0, 2),
    ("sd15", "eps", "heun", 4.0, 2),
    ("flux", "flow", "euler", 1.0, 2),
    ("flux", "flow", "dpmpp_2s_ancestral", 3.0, 2),
]


@pytest.mark.parametrize("family,prediction,sampler,cfg,batch", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-cfg{c[3]:g}" for c in CASES])
def test_each_call_is_the_official_guided_step(comfy, family, prediction, sampler, cfg, batch):
    """Every model call's output equals the float64 official step prediction of the prediction EluCD received, with
    different target classes across the batch; calls inside a step (Heun, 2S) take that step's next level."""
    model, positive, negative, latent = setup(family, prediction, batch=batch)
    classifier = latent_classifier(latent["samples"].shape[1])
    targets = ClassifierTargets(classifier, tuple(k % CLASSES for k in range(batch)))
    config = EluCDConfig(scale=40.0, gamma=0.3, calibration=EluCDCalibration(3.0, 1.3, 0.5))
    recorder = Recorder()
    patched = recorder.around(model, lambda m: apply_elucd(m, targets, config))
    slim_models.ksample(patched, positive, negative, latent, cfg=cfg, steps=4, sampler=sampler)
    flow = prediction == "flow"
    max_variance, moved = 0.0, []
    target = torch.tensor(targets.targets)
    for before, after, sigma, schedule in zip(recorder.before, recorder.after, recorder.sigmas, recorder.schedules):
        levels = schedule.double().tolist()
        step = max(k for k in range(len(levels) - 1) if levels[k] >= sigma * (1 - 1e-6))
        remaining = (len(levels) - 2 - step) / (len(levels) - 1)
        want, max_variance = official_step_prediction(before, classifier.network, target, sigma, levels[step + 1],
                                                      remaining, max_variance, config, flow)
        assert rel_err(after, want) < 1e-5
        moved.append(rel_err(after, before))
    assert len(recorder.after) >= 4 and max(moved) > 1e-2  # the guidance is there, not a no-op


def test_runs_do_not_share_state(comfy):
    """The largest variance so far lives in the run: a second run of the same patched model gives the same latent."""
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    targets = ClassifierTargets(latent_classifier(4), (1, 3))
    patched = apply_elucd(model, targets, EluCDConfig(scale=40.0))
    first, second = (slim_models.ksample(patched, positive, negative, latent, cfg=3.0, steps=4, sampler="ddpm")
                     ["samples"] for _ in range(2))
    plain = slim_models.ksample(model, positive, negative, latent, cfg=3.0, steps=4, sampler="ddpm")["samples"]
    assert torch.equal(first, second) and rel_err(first, plain) > 1e-3


def test_scale_zero_is_the_unpatched_model(comfy):
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    patched = apply_elucd(model, ClassifierTargets(latent_classifier(4), (0,)), EluCDConfig(scale=0.0))
    run = [slim_models.ksample(m, positive, negative, latent, cfg=3.0, steps=3)["samples"] for m in (patched, model)]
    assert torch.equal(*run)


def reference_run(comfy, guided: bool, images_per_class: int, steps: int, seed: int = 0):
    loader, conditioning, empty = (comfy.NODE_CLASS_MAPPINGS[n] for n in (
        "GuidanceReferenceModelLoader", "GuidanceReferenceClassConditioning", "GuidanceEmptyReferenceLatent"))
    model, vae, classes = loader.execute("fashion_diffusion.safetensors").result
    positive, negative, batch = conditioning.execute(classes, "all classes", images_per_class).result
    latent = empty.execute(32, 32, batch).result[0]
    if guided:
        classifier = comfy.NODE_CLASS_MAPPINGS["GuidanceReferenceClassifierLoader"].execute(
            "fashion_classifier.safetensors").result[0]
        targets = comfy.NODE_CLASS_MAPPINGS["GuidanceClassifierTargets"].execute(
            classifier, "all classes", images_per_class).result[0]
        model = comfy.NODE_CLASS_MAPPINGS[NODE_ID].execute(model, targets, 8.0, 0.3, 3.0, 1.0, 0.5, vae).result[0]
    samples = slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=steps, sampler="ddpm",
                                  seed=seed)["samples"]
    return samples, torch.arange(10).repeat_interleave(images_per_class)


def test_reference_model_moves_towards_its_classes(comfy):
    """Through the nodes, as a prompt runs them (under inference mode), on the trained reference model at cfg 1: the
    classifier gives the target classes a higher log-probability with EluCD than without, and finds them at least as
    often (the reference model already gets ~95% right at cfg 1; the judge's verdict is the GPU bench's)."""
    network = reference_classifier().network
    accuracy, log_prob = {}, {}
    with torch.inference_mode():
        for guided in (False, True):
            samples, labels = reference_run(comfy, guided, images_per_class=4, steps=12)
            logits = network(((samples + 1) / 2).clamp(0, 1))
            accuracy[guided] = float((logits.argmax(1) == labels).float().mean())
            log_prob[guided] = float(torch.log_softmax(logits, 1)[torch.arange(len(labels)), labels].mean())
    assert log_prob[True] > log_prob[False] + 0.05 and accuracy[True] >= accuracy[False], (log_prob, accuracy)


def test_refusals_name_the_node_and_the_fix(comfy):
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}.*connect the model's VAE"):
        apply_elucd(model, ClassifierTargets(reference_classifier(), (0,)), EluCDConfig())
    three = apply_elucd(model, ClassifierTargets(latent_classifier(4), (0, 1, 2)), EluCDConfig())
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: .*3 targets for a batch of 2"):
        slim_models.ksample(three, positive, negative, latent, cfg=3.0, steps=2)
    wrong_channels = apply_elucd(model, ClassifierTargets(latent_classifier(16), (0,)), EluCDConfig())
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: .*4 channels, the classifier takes 16"):
        slim_models.ksample(wrong_channels, positive, negative, latent, cfg=3.0, steps=2)
    broken = latent_classifier(4)
    broken.network[0].weight[0, 0, 0, 0] = float("nan")
    nan = apply_elucd(model, ClassifierTargets(broken, (0,)), EluCDConfig())
    with pytest.raises(ValueError, match=f"{DISPLAY_NAME}: the classifier's gradient is not finite"):
        slim_models.ksample(nan, positive, negative, latent, cfg=3.0, steps=2)


def test_video_latents_are_refused_by_an_image_classifier(comfy):
    """A 5-D video latent: the classifier interface wants images [batch, channels, height, width] and says so."""
    model, positive, negative, latent = setup("wan21", batch=1)
    patched = apply_elucd(model, ClassifierTargets(latent_classifier(16), (0,)), EluCDConfig())
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        slim_models.ksample(patched, positive, negative, latent, cfg=1.0, steps=2)
