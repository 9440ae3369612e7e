"""Every ordered pair of guidance nodes either composes, equal to a float64 reference of the combination, or stops
with an error that names both nodes: never a silent drop.

The nodes: the pack's APG, PAG and CFG++ Sampler, and the core CFG-function nodes a user stacks with them
(RescaleCFG, CFGNorm, CFGZeroStar). A model patch (APG, PAG, core) acts at one place of ComfyUI's guidance step,
so the reference of a stack applies, in float64 on the raw predictions of each step, first the pre-CFG patches
(APG: the unconditional prediction for which CFG equals APG), then the CFG step (or RescaleCFG's), then the post-CFG
patches in the order they were applied (PAG: + s (D_c − D̂); CFGNorm; CFGZeroStar). CFG++ is a sampler: it carries
PAG's term into its guided prediction and refuses the others (nodes/cfgpp_patch.py says why). The FreCaS Sampler
runs its stages with the model's patches: the pre- and post-CFG patches act in every stage (APG's update G takes the
place of D_c − D_u and FA-CFG weights its frequency bands), and the patches that replace the CFG step, skip or distil
its passes, or read the image at the training size are refused (nodes/frecas_patch.py says why).

Each later method adds itself to PATCHES (or as a sampler) with its reference stage; the README's table "What
composes with what" is generated from these cases: a test checks that the README carries it (and prints the table
to paste when it does not). AGD, whose model samples at cfg 1, has cases of its own (after the CFG++ ones).
"""

import dataclasses
import functools
import pathlib
import re

import numpy as np
import pytest
import torch
from comfy.samplers import calc_cond_batch

import slim_models
from apg_reference import paper_apg
from comfyui_guidance.guiders import cfgpp
from comfyui_guidance.guiders.elucd import EluCDConfig
from cfgpp_reference import noise_prediction, paper_coefficients
from ppap_stacked import made_experts, ppap_shift
from test_e2e_server import saved_images
from test_elucd_sampling import ddpm_variance, latent_classifier, official_step_prediction
from test_pag_sampling import Spy, apg, flux_identity, pag, rel_err, slim_model, unet_identity
from test_pag_sampling import one_torch_thread  # noqa: F401 (autouse: one torch thread, see there)

CFG = 6.0
LAMBDA = 0.6
APG_SETTINGS = {"eta": 0.0, "norm_threshold": 1.0, "momentum": -0.5}  # a threshold that binds on the slim models
PAG_SCALE = 2.5
RESCALE_MULTIPLIER = 0.7
CFG_NORM_STRENGTH = 0.9
# PAG's default layers (`auto`: middle.0 on SD1.5, double.1 on Flux), perturbed independently of the pack.
PAG_REFERENCES = {"sd15": unet_identity([("middle", 0, 0)]), "flux": flux_identity({("double", 1)})}
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@dataclasses.dataclass(frozen=True)
class Step:
    """What one step of a run saw, in float64: state, sigma, raw conditional, unconditional and perturbed
    predictions, and the unconditional prediction after the pre-CFG patches so far."""

    x: torch.Tensor
    sigma: float
    cond: torch.Tensor
    uncond: torch.Tensor
    perturbed: torch.Tensor
    index: int = 0  # the step's place in the run's schedule
    schedule: tuple = ()  # σ_0 > … > σ_N


def apg_pre(steps, unconds):
    """APG (Algorithm 1, float64) as a pre-CFG patch: per step the unconditional prediction D_c − update, for which
    CFG at w gives D_c + (w − 1)·update."""
    conds = [s.cond for s in steps]
    guided = paper_apg(conds, unconds, CFG, APG_SETTINGS["eta"], APG_SETTINGS["norm_threshold"],
                       APG_SETTINGS["momentum"])
    return [c - (g - c) / (CFG - 1) for c, g in zip(conds, guided)]


def cfg_step(step, uncond):
    return uncond + CFG * (step.cond - uncond)


def rescale_cfg_step(step, uncond):
    """RescaleCFG (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024, Sec. 3.4):
    CFG on v-predictions, rescaled to the conditional prediction's standard deviation and mixed by φ. ComfyUI's
    state is x = z/α_t with α_t = 1/√(1+σ²), σ_t = σ α_t, and v = α_t ε − σ_t x0."""
    alpha_t = (1 + step.sigma**2) ** -0.5
    sigma_t = step.sigma * alpha_t

    def velocity(denoised):
        return alpha_t * (step.x - denoised) / step.sigma - sigma_t * denoised

    v_cond, v_uncond = velocity(step.cond), velocity(uncond)
    v_cfg = v_uncond + CFG * (v_cond - v_uncond)
    dims = list(range(1, v_cfg.ndim))
    v_rescaled = v_cfg * v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
    v_final = RESCALE_MULTIPLIER * v_rescaled + (1 - RESCALE_MULTIPLIER) * v_cfg
    return alpha_t**2 * step.x - sigma_t * v_final  # x0 = α_t z − σ_t v


def pag_post(step, uncond, out):
    return out + PAG_SCALE * (step.cond - step.perturbed)


def cfg_norm_post(step, uncond, out):
    """CFGNorm (ComfyUI core, no paper): per position, the guided prediction's norm over channels is capped at the
    conditional prediction's, then scaled by the strength."""
    ratio = step.cond.norm(dim=1, keepdim=True) / (out.norm(dim=1, keepdim=True) + 1e-8)
    return out * ratio.clamp(0, 1) * CFG_NORM_STRENGTH


def cfg_zero_star_post(step, uncond, out):
    """CFG-Zero* (Fan et al., 2025, Eq. 7): the unconditional prediction scaled by s* = ⟨v_c, v_u⟩/‖v_u‖² in the
    guidance, D_u s* + w (D_c − D_u s*), on what ComfyUI passes (x − D); as an edit of the incoming result."""
    v_cond, v_uncond = (step.x - step.cond).flatten(1), (step.x - uncond).flatten(1)
    scale = ((v_cond * v_uncond).sum(1) / (v_uncond.square().sum(1) + 1e-8)).view(-1, *[1] * (out.ndim - 1))
    return out + (1 - CFG) * (scale - 1) * uncond


AG_THRESHOLD = 0.991  # the default; on the slim SD1.5 model at cfg 6 the two images switch at different calls
MATRIX_STEPS = 3


def ag_pre(steps, unconds, estimated=()):
    """Adaptive Guidance (Castillo et al., arXiv:2312.12487; guiders/adaptive.py) in float64 as a pre-CFG patch: per
    image, once cos(D_c, D_cfg) of the raw predictions reaches γ̄ at a step, every later step hands CFG D_c as
    the unconditional prediction (a conditional-only step, whose unconditional pass is not computed). It runs last
    among the pre-CFG patches, so APG acts on the guided steps only. At LinearAG's `estimated` calls there is no
    real unconditional prediction, so nothing is measured there."""
    switched = torch.zeros(steps[0].x.shape[0], dtype=torch.bool)
    out = []
    for i, (step, uncond) in enumerate(zip(steps, unconds)):
        out.append(torch.where(switched.view(-1, 1, 1, 1), step.cond, uncond))
        if i in estimated:
            continue
        d_c = step.cond.flatten(1)
        d_g = (step.uncond + CFG * (step.cond - step.uncond)).flatten(1)
        gamma = (d_c * d_g).sum(1) / (d_c.norm(dim=1) * d_g.norm(dim=1))
        switched = switched | (gamma >= AG_THRESHOLD)
    return out


@functools.cache
def linear_ag_coefficients():
    """LinearAG coefficients fitted (once per session) for the matrix's model, sampler, schedule and step count."""
    from comfyui_guidance.nodes.adaptive_patch import fit_linear_ag

    model, positive, negative, latent = setup()
    return fit_linear_ag(model, positive, negative, latent["samples"], "euler", "normal", MATRIX_STEPS, CFG, seed=11,
                         images=2, batch=2)


def linear_ag(comfy, model):
    from comfyui_guidance.guiders.adaptive import AGConfig
    from comfyui_guidance.nodes.adaptive_patch import LINEAR_DISPLAY_NAME, apply_ag

    return apply_ag(model, AGConfig(AG_THRESHOLD), linear_ag_coefficients(), LINEAR_DISPLAY_NAME)


def linear_ag_estimate(steps, unconds):
    """LinearAG's estimate in float64, before every pre-CFG patch (it replaces the unconditional pass itself): at an
    estimated call i, D̂_u = x − σ ε̂_u with ε̂_u = a ε_c(i) + b ε_c(i−1) + c ε_u(i−1), the coefficients of call i and
    the true noise directions ε = (x − D)/σ (the previous call is a real one; a switched image's is D_c, which AG
    hands on as its unconditional prediction)."""
    coefficients = linear_ag_coefficients().coefficients
    out = list(unconds)
    for i in LINEAR_AG_CALLS:
        now, before = steps[i], steps[i - 1]
        eps = [(s.x - d) / s.sigma for s, d in ((now, now.cond), (before, before.cond), (before, unconds[i - 1]))]
        a, b, c = coefficients[i].tolist()
        out[i] = now.x - now.sigma * (a * eps[0] + b * eps[1] + c * eps[2])
    return out


LINEAR_AG_CALLS = (1,)  # guiders.adaptive.estimated_calls(3): every other call of the first half

ELUCD_TARGETS = (1, 3)
ELUCD_CONFIG = EluCDConfig(scale=40.0)  # the slim model's latents are small: a scale at which the term shows


def elucd(comfy, model):
    from comfyui_guidance.nodes.classifier_patch import ClassifierTargets
    from comfyui_guidance.nodes.elucd_patch import apply_elucd

    return apply_elucd(model, ClassifierTargets(latent_classifier(4), ELUCD_TARGETS), ELUCD_CONFIG)


def elucd_post(step, uncond, out):
    """EluCD (test_elucd_sampling's float64 official step) on whatever the stack produced so far."""
    max_variance = max((ddpm_variance(step.schedule[j], step.schedule[j + 1]) for j in range(step.index)),
                       default=0.0)
    steps = len(step.schedule) - 1
    guided, _ = official_step_prediction(out, latent_classifier(4).network, torch.tensor(ELUCD_TARGETS), step.sigma,
                                         step.schedule[step.index + 1], (steps - 1 - step.index) / steps,
                                         max_variance, ELUCD_CONFIG, flow=False)
    return guided


PPAP_TARGETS = (2, 0)
PPAP_SCALE = 1.0  # its term at the first step is about the size of CFG's prediction; larger ones swamp AG's
# Three experts: the matrix's euler/normal run of 3 steps is at timesteps 999, ~500 and 0, one in each range, so each
# step is guided by another expert (test_ppap_expert_choice_shows checks that the choice matters).
PPAP_EXPERTS = 3


@functools.cache
def ppap_experts():
    return made_experts(setup()[0], PPAP_EXPERTS)


def ppap(comfy, model):
    from comfyui_guidance.nodes.classifier_patch import ClassifierTargets
    from comfyui_guidance.nodes.ppap_patch import apply_ppap

    experts = ppap_experts()
    return apply_ppap(model, experts, ClassifierTargets(experts.classifier, PPAP_TARGETS), PPAP_SCALE)


def ppap_post(step, uncond, out, index=None):
    """PPAP (tests/ppap_stacked.py, float64): + s σ² ∇ₓ log p_φᵢ(y | x/√(1 + σ²)) on whatever the stack produced,
    φᵢ the expert of the step's timestep (or expert `index`)."""
    sampling = setup()[0].get_model_object("model_sampling")
    return out + ppap_shift(ppap_experts(), PPAP_TARGETS, PPAP_SCALE, step.x, step.sigma, sampling, index)


@dataclasses.dataclass(frozen=True)
class Patch:
    """A model-patch node of the matrix: how to apply it, and its float64 reference at the place where it acts."""

    apply: object  # (comfy, model) -> model
    pre: object = None  # (steps, unconds) -> unconds
    cfg: object = None  # (step, uncond) -> guided
    post: object = None  # (step, uncond, guided) -> guided
    pre_last: bool = False  # its pre-CFG stage runs after every other one, whatever the order the nodes were applied
    estimate: object = None  # (steps, unconds) -> unconds: replaces the unconditional pass, before any pre-CFG stage


def core_node(node_id, **inputs):
    def apply(comfy, model):
        node = comfy.NODE_CLASS_MAPPINGS[node_id]
        if hasattr(node, "execute"):
            return node.execute(model, **inputs).result[0]
        return getattr(node(), node.FUNCTION)(model, **inputs)[0]
    return apply


PATCHES = {
    "APG": Patch(lambda comfy, m: apg(comfy, m, **APG_SETTINGS), pre=apg_pre),
    "PAG": Patch(lambda comfy, m: pag(comfy, m, scale=PAG_SCALE), post=pag_post),
    "RescaleCFG": Patch(core_node("RescaleCFG", multiplier=RESCALE_MULTIPLIER), cfg=rescale_cfg_step),
    "CFGNorm": Patch(core_node("CFGNorm", strength=CFG_NORM_STRENGTH), post=cfg_norm_post),
    "CFGZeroStar": Patch(core_node("CFGZeroStar"), post=cfg_zero_star_post),
    "AG": Patch(core_node("GuidanceAdaptiveGuidance", threshold=AG_THRESHOLD, criterion="cond_cfg"), pre=ag_pre,
                pre_last=True),
    "LinearAG": Patch(linear_ag, estimate=linear_ag_estimate,
                      pre=lambda steps, unconds: ag_pre(steps, unconds, LINEAR_AG_CALLS), pre_last=True),
    "EluCD": Patch(elucd, post=elucd_post),
    "PPAP": Patch(ppap, post=ppap_post),
}
OURS = ("APG", "PAG", "AG", "LinearAG", "EluCD", "PPAP")
# Two AG-family nodes on one model would both decide which unconditional passes to skip: refused, naming both.
AG_FAMILY = {"AG", "LinearAG"}
REFUSED_PAIRS = [(a, b) for a in AG_FAMILY for b in AG_FAMILY]
PATCH_PAIRS = [(a, b) for a in PATCHES for b in PATCHES if (a in OURS or b in OURS) and (a, b) not in REFUSED_PAIRS]
# The patches whose effect CFG++ carries; every other one is refused, naming both nodes.
CFGPP = "CFG++ Sampler"
CARRIED_BY_CFGPP = {"PAG"}
# The names that a refusal must carry for each node (what the user sees on the node).
SHOWN_NAMES = {"APG": "Adaptive Projected Guidance (APG)", "PAG": "Perturbed-Attention Guidance (PAG)",
               "RescaleCFG": "RescaleCFG", "CFGNorm": "CFGNorm", "CFGZeroStar": "CFGZeroStar", "AG": "Adaptive Guidance (AG)",
               "LinearAG": "LinearAG (Adaptive Guidance with fitted estimates)", "EluCD": "EluCD Classifier Guidance",
               "PPAP": "PPAP Classifier Guidance", CFGPP: CFGPP}


class StepSpy(Spy):
    """test_pag_sampling's Spy, also recording each step's input state."""

    def __init__(self, reference):
        super().__init__(reference)
        self.inputs = []

    def pre(self, args):
        self.inputs.append(args["input"].clone())
        return super().pre(args)


def recorded_steps(spy):
    """The steps of a run; the unconditional prediction is an unpatched call's at the same state (the raw one where
    no patch leaves it out of the model call, as Adaptive Guidance does once an image switches)."""
    schedule = (*(float(sigma[0]) for sigma in spy.sigmas), 0.0)  # one call per step (euler), down to 0 (normal)
    return [Step(x.double(), float(sigma[0]), c.double(), plain[1].double(), p.double(), i, schedule)
            for i, (x, sigma, (c, u), plain, p) in enumerate(zip(spy.inputs, spy.sigmas, spy.raw, spy.plain,
                                                                  spy.perturbed))]


def reference_of_stack(names, steps):
    """The float64 result of each step of the patches `names`, applied to the model in that order."""
    unconds = [s.uncond for s in steps]
    for name in names:
        if PATCHES[name].estimate is not None:
            unconds = PATCHES[name].estimate(steps, unconds)
    for name in sorted(names, key=lambda n: PATCHES[n].pre_last):  # stable: the others keep their order
        if PATCHES[name].pre is not None:
            unconds = PATCHES[name].pre(steps, unconds)
    cfg_stages = [PATCHES[n].cfg for n in names if PATCHES[n].cfg is not None]
    cfg = cfg_stages[-1] if cfg_stages else cfg_step  # ComfyUI keeps one CFG function: the last one applied
    for step, uncond in zip(steps, unconds):
        out = cfg(step, uncond)
        for name in names:
            if PATCHES[name].post is not None:
                out = PATCHES[name].post(step, uncond, out)
        yield out


def setup(batch=2):
    model = slim_model("sd15", "eps")
    positive, negative = slim_models.conditioning("sd15", batch=batch)
    return model, positive, negative, slim_models.empty_latent("sd15", batch=batch, height=32, width=32)


@pytest.mark.parametrize("first,second", PATCH_PAIRS, ids=[f"{a}-then-{b}" for a, b in PATCH_PAIRS])
def test_patch_pair_equals_float64_reference(comfy, first, second):
    """Every step's guided prediction of the pair, applied in this order, is the float64 reference of the stack, and
    differs from each node alone (neither was dropped)."""
    model, positive, negative, latent = setup()

    def stack(m):
        return PATCHES[second].apply(comfy, PATCHES[first].apply(comfy, m))

    spy = StepSpy(PAG_REFERENCES["sd15"])
    slim_models.ksample(spy.around(model, stack), positive, negative, latent, cfg=CFG, steps=MATRIX_STEPS)
    steps = recorded_steps(spy)
    assert len(steps) == MATRIX_STEPS and steps[0].x.shape[0] == 2
    for got, want in zip(spy.guided, reference_of_stack([first, second], steps)):
        assert rel_err(got, want) < 1e-5
    if first != second:
        for alone in ([first], [second]):
            assert max(rel_err(got, want) for got, want in zip(spy.guided, reference_of_stack(alone, steps))) > 1e-3


def test_ppap_expert_choice_shows(comfy):
    """The matrix's PPAP run is guided by each of its three experts in turn (timesteps 999, ~500, 0), and at every
    step the reference with any other expert misses the run's prediction by over three times the matrix's 1e-5 (at
    the last step, σ = σ_min, PPAP's term is 5e-5 of the prediction): a wrong choice anywhere would fail the
    pairs."""
    from ppap_stacked import expert_of

    model, positive, negative, latent = setup()
    spy = StepSpy(PAG_REFERENCES["sd15"])
    slim_models.ksample(spy.around(model, lambda m: ppap(comfy, m)), positive, negative, latent, cfg=CFG,
                        steps=MATRIX_STEPS)
    steps = recorded_steps(spy)
    sampling = model.get_model_object("model_sampling")
    assert [expert_of(s.sigma, sampling, PPAP_EXPERTS) for s in steps] == [2, 1, 0]
    for step, got in zip(steps, spy.guided):
        cfg = cfg_step(step, step.uncond)
        assert rel_err(got, ppap_post(step, None, cfg)) < 1e-5
        others = [i for i in range(PPAP_EXPERTS) if i != expert_of(step.sigma, sampling, PPAP_EXPERTS)]
        assert min(rel_err(got, ppap_post(step, None, cfg, i)) for i in others) > 3e-5


@pytest.mark.parametrize("first,second", REFUSED_PAIRS, ids=[f"{a}-then-{b}" for a, b in REFUSED_PAIRS])
def test_ag_family_pair_refused_naming_both(comfy, first, second):
    model = setup()[0]
    with pytest.raises(ValueError) as refusal:
        PATCHES[second].apply(comfy, PATCHES[first].apply(comfy, model))
    assert SHOWN_NAMES[first] in str(refusal.value) and SHOWN_NAMES[second] in str(refusal.value)


class PredictionRecorder:
    """A pre-CFG hook that records each model call of a CFG++ run: state, sigma, raw predictions and the perturbed
    prediction made independently at the same state (CFG++ refuses foreign post-CFG hooks, not pre-CFG ones)."""

    def __init__(self, model, family="sd15"):
        self.calls = []
        self.reference = PAG_REFERENCES[family]
        self.model = model.clone()
        self.model.set_model_sampler_pre_cfg_function(self)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def __call__(self, args):
        options = self.reference(args["model_options"].copy())
        [perturbed] = calc_cond_batch(args["model"], [args["conds"][0]], args["input"], args["sigma"], options)
        cond, uncond = args["conds_out"][:2]
        self.calls.append(Step(args["input"].double(), float(args["sigma"][0]), cond.double(), uncond.double(),
                               perturbed.double()))
        return args["conds_out"]


def cfgpp_sample(comfy, model, method="ddim", family="sd15", seed=0, steps=3):
    positive, negative = slim_models.conditioning(family, batch=2)
    latent = slim_models.empty_latent(family, batch=2, height=32, width=32)
    sampler = comfy.NODE_CLASS_MAPPINGS["CFGppSampler"].execute(method, LAMBDA).result[0]
    return slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=1.0, steps=steps,
                                              sampler=sampler, seed=seed)["samples"]


@pytest.mark.parametrize("patch", list(PATCHES))
def test_patch_under_cfgpp_composes_or_refuses_naming_both(comfy, patch):
    """PAG under CFG++ DDIM: each step is Algorithm 2 in the paper's variables with PAG's term in the guided
    prediction, x̂ = D_u + λ (D_c − D_u) + s (D_c − D̂), renoised with ε̂_∅ alone. Every other patch stops the run
    with an error that names both nodes."""
    model = slim_model("sd15", "eps")
    if patch not in CARRIED_BY_CFGPP:
        with pytest.raises(ValueError) as refusal:
            cfgpp_sample(comfy, PATCHES[patch].apply(comfy, model))
        assert SHOWN_NAMES[patch] in str(refusal.value) and CFGPP in str(refusal.value)
        return
    recorder = PredictionRecorder(model)
    out = cfgpp_sample(comfy, PATCHES[patch].apply(comfy, recorder.model))
    plain = cfgpp_sample(comfy, model)
    assert rel_err(out, plain) > 1e-3  # PAG's effect is there
    calls = recorder.calls
    states = [c.x for c in calls[1:]] + [model.model.process_latent_in(out).double()]
    sigmas = [c.sigma for c in calls] + [0.0]
    assert len(calls) == 3
    for call, sigma_next, got in zip(calls, sigmas[1:], states):
        a, s, to_paper = paper_coefficients(call.sigma, flow=False)
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, flow=False)
        z = call.x * to_paper
        x0 = call.uncond + LAMBDA * (call.cond - call.uncond) + PAG_SCALE * (call.cond - call.perturbed)
        want = (a_next * x0 + s_next * noise_prediction(z, call.uncond, a, s)) / to_paper_next
        assert rel_err(got, want) < 1e-5


SAMPLER_CASES = [(family, method) for family in ("sd15", "flux")
                 for method in ("ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral")]


def test_cfgpp_refuses_patches_applied_by_scripts(comfy, pack):
    """Scripts patch a model through the pack's `*_patch.py` modules, which ComfyUI imports again under another
    module name for its nodes: the CFG++ Sampler (the node) still recognises and refuses them, naming both."""
    from comfyui_guidance.guiders.adaptive import AGConfig
    from comfyui_guidance.guiders.apg import APGConfig
    from comfyui_guidance.nodes.adaptive_patch import apply_ag
    from comfyui_guidance.nodes.apg_patch import apply_apg

    model = slim_model("sd15", "eps")
    for patched, name in ((apply_apg(model, APGConfig()), SHOWN_NAMES["APG"]),
                          (apply_ag(model, AGConfig()), SHOWN_NAMES["AG"])):
        with pytest.raises(ValueError) as refusal:
            cfgpp_sample(comfy, patched)
        assert name in str(refusal.value) and CFGPP in str(refusal.value)


@pytest.mark.parametrize("family,method", SAMPLER_CASES, ids=[f"{f}-{m}" for f, m in SAMPLER_CASES])
def test_pag_term_reaches_every_cfgpp_model_call(comfy, noise_draws, family, method):
    """Under every CFG++ sampler (eps and flow), each model call's guided prediction carries PAG's term: the
    sampler replayed in float64 on the recorded predictions plus s (D_c − D̂), with the same noise, visits the same
    states and ends at the same latent."""
    model = slim_model(family, "flow" if family == "flux" else "eps")
    recorder = PredictionRecorder(model, family)
    out = cfgpp_sample(comfy, PATCHES["PAG"].apply(comfy, recorder.model), method, family, seed=5)
    calls = iter(recorder.calls)
    # float32 sampling against a float64 replay: up to 1.2e-4 apart here (Flux 2S at eta 1, whose last midpoint sigma
    # float32 gets 20% off through cancellation in ρ_down = √(ρ'² − ρ_up²)); a PAG term missing from one call puts the
    # next state 2e-2 away.
    tolerance = 1e-3

    def replay(x, sigma, **extra):
        call = next(calls)
        assert rel_err(x, call.x) < tolerance
        return cfgpp.Denoised(call.cond, call.uncond, PAG_SCALE * (call.cond - call.perturbed))

    x0 = recorder.calls[0].x
    sigmas = comfy.NODE_CLASS_MAPPINGS["BasicScheduler"].execute(model, "normal", 3, 1.0).result[0].double()
    noise = iter(noise_draws)  # the run's own noise, in the order it drew it
    options = {"noise_sampler": lambda s, t: next(noise).double()} if method in cfgpp.ANCESTRAL else {}
    flow = family == "flux"
    replayed = cfgpp.SAMPLERS[method](replay, x0, sigmas, disable=True, guidance=LAMBDA,
                                      space=cfgpp.SigmaSpace(flow=flow), **options)
    assert next(calls, None) is None
    assert rel_err(model.model.process_latent_in(out), replayed) < tolerance


def reference_cfgpp_prompt(pag_scale):
    """The issue's repro on the reference model: loader → PAG (or none) → SamplerCustom (cfg 1, CFG++ Sampler ddim,
    λ 0.6) → VAE Decode → Save Image, in API format."""
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "GuidanceReferenceModelLoader", "inputs": {"weights": "fashion_diffusion.safetensors"}},
        "2": {"class_type": "GuidanceReferenceClassConditioning",
              "inputs": {"classes": ["1", 2], "class_name": "all classes", "images_per_class": 1}},
        "3": {"class_type": "GuidanceEmptyReferenceLatent",
              "inputs": {"width": 32, "height": 32, "batch_size": ["2", 2]}},
        "5": {"class_type": "CFGppSampler", "inputs": {"sampler_name": "ddim", "guidance": LAMBDA}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 8,
                                                         "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 1]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"repro/pag{pag_scale}"}},
    }
    if pag_scale:
        prompt["4"] = {"class_type": "GuidancePerturbedAttention",
                       "inputs": {"model": ["1", 0], "scale": pag_scale, "adaptive_scale": 0.0, "layers": "auto",
                                  "sigma_start": 10000.0, "sigma_end": 0.0, "batched": True}}
        model = ["4", 0]
    prompt["7"] = {"class_type": "SamplerCustom",
                   "inputs": {"model": model, "add_noise": True, "noise_seed": 3, "cfg": 1.0, "positive": ["2", 0],
                              "negative": ["2", 1], "sampler": ["5", 0], "sigmas": ["6", 0],
                              "latent_image": ["3", 0]}}
    return prompt


def test_pag_under_cfgpp_through_the_server(comfy_server):
    """The reported graph: PAG before SamplerCustom with the CFG++ Sampler changes the images, more as the scale
    grows, instead of giving the images of the same graph without PAG."""
    images = {}
    for scale in (0.0, 0.5, 3.0):
        entry = comfy_server.run_prompt(reference_cfgpp_prompt(scale))
        assert entry["status"]["status_str"] == "success", entry["status"]
        [images[scale]] = saved_images(comfy_server, entry).values()
    weak, strong = (np.abs(images[s] - images[0.0]).mean() for s in (0.5, 3.0))
    assert 0.002 < weak < strong


# Adapter guidance distillation (AGD) ---------------------------------------------------------------------------------
# AGD's adapters give CFG's prediction in the conditional pass, so its model is sampled at cfg 1, with no
# unconditional pass: a node that needs that pass, the cfg scale or CFG's combination (APG, AG, LinearAG, RescaleCFG,
# CFGNorm, CFGZeroStar, CFG++) cannot act on it and is refused, naming both nodes, in either order (at apply time,
# or when the run starts); a term added to the guided prediction that needs neither (PAG's s (D − D̂), EluCD's
# classifier step on D, PPAP's expert gradient at the state x) composes, on AGD's one-pass prediction D_agd.

AGD = "AGD"
SHOWN_NAMES[AGD] = "Adapter Guidance Distillation (AGD)"
AGD_SCALE = 4.0
COMPOSES_WITH_AGD = {"PAG", "EluCD", "PPAP"}
AGD_ORDERS = [(other, AGD) for other in PATCHES] + [(AGD, other) for other in PATCHES]
AGD_COMPOSED = [pair for pair in AGD_ORDERS if set(pair) & COMPOSES_WITH_AGD]
AGD_REFUSED = [pair for pair in AGD_ORDERS if pair not in AGD_COMPOSED] + [(AGD, AGD)]


@functools.cache
def agd_adapters():
    """Adapters for the matrix's model with random output projections (fresh ones would be the identity)."""
    from comfyui_guidance.guiders.agd import AdapterSpec
    from comfyui_guidance.nodes.agd_patch import new_adapters

    adapters = new_adapters(setup()[0], AdapterSpec(hidden_dim=8), seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters.adapters.values():
            adapter.out_proj.weight.normal_(0.0, 1.0, generator=generator)
            adapter.out_proj.bias.normal_(0.0, 0.1, generator=generator)
    return adapters


def agd(comfy, model):
    from comfyui_guidance.nodes.agd_patch import apply_agd

    return apply_agd(model, agd_adapters(), AGD_SCALE)


def apply_by_name(comfy, model, name):
    return agd(comfy, model) if name == AGD else PATCHES[name].apply(comfy, model)


class AGDSpy(Spy):
    """For runs at cfg 1 with AGD: a pre-CFG hook before the patches records each call's raw conditional prediction;
    a post-CFG hook after them records the guided result and makes, at the same state and each in a model call of its
    own: AGD's one-pass prediction D_agd and AGD's prediction with PAG's perturbation (the reference perturbation),
    both on the run's options, which carry AGD's adapters; and the base model's conditional and perturbed
    predictions, on the base model's options, without the adapters."""

    guides_denoised = True  # it reads the guided prediction only, so AGD's run check lets it follow AGD

    def __init__(self, base_options):
        super().__init__()
        self.base_options = base_options
        self.inputs, self.one_pass, self.base, self.base_perturbed = [], [], [], []

    def pre(self, args):
        assert args["conds"][1] is None  # cfg 1: no unconditional pass
        self.raw.append(args["conds_out"][0].double())
        return args["conds_out"]

    def post(self, args):
        model, cond, x, sigma, options = (args[k] for k in ("model", "cond", "input", "sigma", "model_options"))
        perturb = PAG_REFERENCES["sd15"]

        def predict(options):
            return calc_cond_batch(model, [cond], x, sigma, options)[0].double()

        self.inputs.append(x.double())
        self.sigmas.append(float(sigma[0]))
        self.guided.append(args["denoised"].double())
        self.one_pass.append(predict(options))
        self.perturbed.append(predict(perturb(options.copy())))
        self.base.append(predict(self.base_options))
        self.base_perturbed.append(predict(perturb(self.base_options.copy())))
        return args["denoised"]

    def steps(self, predictions):
        schedule = (*self.sigmas, 0.0)  # one call per step (euler), down to 0 (normal)
        return [Step(x, sigma, d, None, None, i, schedule)
                for i, (x, sigma, d) in enumerate(zip(self.inputs, self.sigmas, predictions))]


def agd_stack_reference(other, spy):
    """(the float64 result of each call of AGD stacked with `other`, of AGD alone, of `other` alone at cfg 1)."""
    if other == "PAG":
        stacked = [d + PAG_SCALE * (d - p) for d, p in zip(spy.one_pass, spy.perturbed)]
        alone = [b + PAG_SCALE * (b - p) for b, p in zip(spy.base, spy.base_perturbed)]
    else:  # EluCD and PPAP act on whatever prediction they are handed: AGD's one-pass one
        post = PATCHES[other].post
        stacked = [post(step, None, step.cond) for step in spy.steps(spy.one_pass)]
        alone = [post(step, None, step.cond) for step in spy.steps(spy.base)]
    return stacked, spy.one_pass, alone


@pytest.mark.parametrize("first,second", AGD_COMPOSED, ids=[f"{a}-then-{b}" for a, b in AGD_COMPOSED])
def test_agd_pair_equals_float64_reference(comfy, first, second):
    """PAG, EluCD and PPAP on AGD's model at cfg 1, either order: each call's guided prediction is the other node's
    term on AGD's one-pass prediction (PAG: D_agd + s (D_agd − D̂_agd), D̂_agd AGD's prediction under PAG's
    perturbation; EluCD: its classifier step on D_agd; PPAP: D_agd + its expert's shift at the call's state), and
    differs from AGD alone and from the other node alone."""
    model, positive, negative, latent = setup()
    other = first if second == AGD else second
    spy = AGDSpy(model.model_options)
    stack = spy.around(model, lambda m: apply_by_name(comfy, apply_by_name(comfy, m, first), second))
    slim_models.ksample(stack, positive, negative, latent, cfg=1.0, steps=MATRIX_STEPS)
    assert len(spy.guided) == MATRIX_STEPS and spy.guided[0].shape[0] == 2
    stacked, agd_alone, other_alone = agd_stack_reference(other, spy)
    for raw, one_pass in zip(spy.raw, spy.one_pass):  # the run's conditional pass carries the adapters
        assert rel_err(raw, one_pass) < 1e-5
    for got, want in zip(spy.guided, stacked):
        assert rel_err(got, want) < 1e-5
    for alone in (agd_alone, other_alone):
        assert max(rel_err(got, want) for got, want in zip(spy.guided, alone)) > 1e-3


@pytest.mark.parametrize("first,second", AGD_REFUSED, ids=[f"{a}-then-{b}" for a, b in AGD_REFUSED])
def test_agd_pair_refused_naming_both(comfy, first, second):
    """Refused when the second node is applied, or at the latest when the run starts, naming both nodes."""
    model, positive, negative, latent = setup()
    with pytest.raises(ValueError) as refusal:
        stacked = apply_by_name(comfy, apply_by_name(comfy, model, first), second)
        slim_models.ksample(stacked, positive, negative, latent, cfg=1.0, steps=MATRIX_STEPS)
    message = str(refusal.value)
    assert SHOWN_NAMES[first] in message and SHOWN_NAMES[second] in message
    if first == second:
        assert message.count(SHOWN_NAMES[AGD]) >= 2


def test_agd_under_cfgpp_refused_naming_both(comfy):
    """CFG++ forms its guided prediction from the conditional and unconditional predictions of the base model and
    renoises with the unconditional one; AGD's conditional pass already is the guided prediction: refused."""
    model = slim_model("sd15", "eps")
    with pytest.raises(ValueError) as refusal:
        cfgpp_sample(comfy, agd(comfy, model))
    assert SHOWN_NAMES[AGD] in str(refusal.value) and CFGPP in str(refusal.value)


# FreCaS Sampler -----------------------------------------------------------------------------------------------------
# A sampler, like CFG++: each of its stages is a sampling run of the patched model. Stage 1 is CFG; in later stages
# FA-CFG (D_u + w_l low(D_c − D_u) + w_h high(D_c − D_u), low = bilinear to the previous stage's size and back) is the
# CFG step, so a pre-CFG patch's unconditional prediction goes into it (APG: D_u' = D_c − G, giving
# D_c + (w_l − 1) low(G) + (w_h − 1) high(G)) and a post-CFG patch edits its result.

FRECAS = "FreCaS Sampler"
SHOWN_NAMES[FRECAS] = FRECAS
COMPOSES_WITH_FRECAS = {"APG", "PAG", "CFGNorm", "CFGZeroStar"}
FRECAS_STEPS, FRECAS_CFG_HIGH, FRECAS_SIZES = (2, 2), 15.0, [(4, 4), (8, 8)]


def frecas_sample(model, seed=0):
    from comfyui_guidance.nodes.frecas_patch import FreCaSSettings, sample_frecas

    positive, negative = slim_models.conditioning("sd15", batch=2)
    latent = slim_models.empty_latent("sd15", batch=2, height=32, width=32)
    plan = FreCaSSettings(FRECAS_STEPS, (300, 0), 3.0, CFG, FRECAS_CFG_HIGH, 0.0, "euler")
    return sample_frecas(model, positive, negative, latent, seed, plan, FRECAS_SIZES[-1], progress=False)


def fa_cfg_step(low_size):
    """FA-CFG in float64 as the official `facfg_forward` computes it: both predictions split into high and low bands
    (`freq_decompose`), each band combined at its own weight."""
    def decompose(x):
        low = torch.nn.functional.interpolate(torch.nn.functional.interpolate(x, size=low_size, mode="bilinear"),
                                              size=x.shape[-2:], mode="bilinear")
        return [x - low, low]

    def step(s, uncond):
        return sum(u + w * (c - u) for u, c, w in zip(decompose(uncond), decompose(s.cond), (FRECAS_CFG_HIGH, CFG)))
    return step


def frecas_reference(names, steps, fa=True):
    """The float64 result of each call of a FreCaS run with the patches `names`: per stage (a run of its own, so
    APG's momentum starts afresh) the pre-CFG patches, then CFG (stage 1; every stage unless `fa`) or FA-CFG, then
    the post-CFG patches."""
    out, start = [], 0
    for stage, n in enumerate(FRECAS_STEPS):
        stage_steps = steps[start:start + n]
        start += n
        unconds = [s.uncond for s in stage_steps]
        for name in names:
            if PATCHES[name].pre is not None:
                unconds = PATCHES[name].pre(stage_steps, unconds)
        cfg = cfg_step if stage == 0 or not fa else fa_cfg_step(FRECAS_SIZES[stage - 1])
        for step, uncond in zip(stage_steps, unconds):
            guided = cfg(step, uncond)
            for name in names:
                if PATCHES[name].post is not None:
                    guided = PATCHES[name].post(step, uncond, guided)
            out.append(guided)
    return out


@pytest.mark.parametrize("patch", [*PATCHES, AGD])
def test_patch_under_frecas_composes_or_refuses_naming_both(comfy, patch):
    """APG, PAG, CFGNorm and CFGZeroStar act in every FreCaS stage: each call's guided prediction is the float64
    reference (FA-CFG in the later stages, on APG's update where APG is there), and differs from FreCaS alone and
    from the patch alone (CFG in every stage). Every other node is refused before anything runs, naming both."""
    model = slim_model("sd15", "eps")
    if patch not in COMPOSES_WITH_FRECAS:
        spy = StepSpy(None)
        with pytest.raises(ValueError) as refusal:
            frecas_sample(spy.around(model, lambda m: apply_by_name(comfy, m, patch)))
        assert SHOWN_NAMES[patch] in str(refusal.value) and FRECAS in str(refusal.value)
        assert spy.raw == []
        return
    spy = StepSpy(PAG_REFERENCES["sd15"])
    frecas_sample(spy.around(model, lambda m: PATCHES[patch].apply(comfy, m)))
    steps = recorded_steps(spy)
    assert len(steps) == sum(FRECAS_STEPS) and steps[0].x.shape[0] == 2
    assert [s.x.shape[-2:] for s in steps] == [torch.Size(size) for size, n in zip(FRECAS_SIZES, FRECAS_STEPS)
                                               for _ in range(n)]
    for got, want in zip(spy.guided, frecas_reference([patch], steps)):
        assert rel_err(got, want) < 1e-5
    if patch == "APG":  # the form of the brief: D_c + (w_l − 1) low(G) + (w_h − 1) high(G), G = D_c − D_u'
        stage_two = steps[FRECAS_STEPS[0]:]
        for step, uncond, got in zip(stage_two, apg_pre(stage_two, [s.uncond for s in stage_two]),
                                     spy.guided[FRECAS_STEPS[0]:]):
            update = step.cond - uncond
            low = fa_cfg_step(FRECAS_SIZES[0])(dataclasses.replace(step, cond=update), torch.zeros_like(update))
            low = (low - FRECAS_CFG_HIGH * update) / (CFG - FRECAS_CFG_HIGH)  # the low band of G
            want = step.cond + (CFG - 1) * low + (FRECAS_CFG_HIGH - 1) * (update - low)
            assert rel_err(got, want) < 1e-5
    alone_frecas = frecas_reference([], steps)
    alone_patch = frecas_reference([patch], steps, fa=False)
    for alone in (alone_frecas, alone_patch):
        assert max(rel_err(got, want) for got, want in zip(spy.guided, alone)) > 1e-3


def composition_table() -> str:
    """The README's table: for each ordered pair (row first, then column), whether it composes or is refused."""
    rows = [*PATCHES, AGD]
    columns = [*rows, CFGPP, FRECAS]
    lines = ["| first ↓ then → | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for first in rows:
        cells = []
        for second in columns:
            if second == CFGPP:
                cells.append("composes" if first in CARRIED_BY_CFGPP else "refused")
            elif second == FRECAS:
                cells.append("composes" if first in COMPOSES_WITH_FRECAS else "refused")
            elif AGD in (first, second):
                cells.append("composes" if (first, second) in AGD_COMPOSED else "refused")
            else:
                cells.append("composes" if (first, second) in PATCH_PAIRS
                             else "refused" if (first, second) in REFUSED_PAIRS else "–")
        lines.append(f"| {first} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_readme_table_is_generated_from_these_cases():
    readme = README.read_text()
    match = re.search(r"<!-- composition table: generated.*?-->\n(.*?)<!-- end composition table -->", readme,
                      re.S)
    assert match, "README lacks the composition table markers"
    assert match[1].strip() == composition_table(), f"replace the README's table with:\n{composition_table()}"

