"""GFCG and Autoguidance inside real ComfyUI sampling (nodes/gfcg_patch.py, nodes/autoguidance_patch.py): each model
call's guided prediction equals the rules of guiders/gfcg.py transcribed here in float64 (for eps, v and flow models,
GFCG alone and with CFG, ATG and ATG + GFCG), from the model's own predictions made at the call's input outside the
patch; the reference rows ride in the conditional call; both models of ATG are loaded by ComfyUI's model management;
masks, batches with their own classes, SamplerCustomAdvanced, 5-D latents; and the refusals, each naming the node."""

import functools
import re

import comfy.model_management as model_management
import comfy.model_patcher as model_patcher
import pytest
import torch

import slim_models
from comfyui_guidance.guiders.gfcg import CONSTANT, RANDOM, GFCGConfig, guidance_scale, reference_classes
from comfyui_guidance.nodes.autoguidance_patch import DISPLAY_NAME as ATG_NAME, apply_autoguidance
from comfyui_guidance.nodes.classifier_patch import ClassifierTargets
from comfyui_guidance.nodes.gfcg_patch import DISPLAY_NAME as GFCG_NAME, ClassConditioning, apply_gfcg
from comfyui_guidance.reference.model import build_base_model
from test_elucd_sampling import CLASSES, latent_classifier
from test_pag_sampling import one_torch_thread, rel_err, setup, slim_model  # noqa: F401 (autouse fixture)

TARGETS = (1, 3)
SCALE = 3.0
CFG = 4.0
STEPS = 3
TOLERANCE = 1e-4  # float32 model calls batched differently (3 rows against 1) against float64 arithmetic


# --- the rules, transcribed in float64 from the reading (independently of guiders/gfcg.py) ---

def expected_reference(p, target):
    """r = argmax over k ≠ c of p(k | D_c), per row."""
    r = []
    for row, c in zip(p.tolist(), target):
        others = [(value, k) for k, value in enumerate(row) if k != c]
        r.append(max(others)[1])
    return r


def expected_scale(p, target, reference, scale, rule="adaptive"):
    """s · p_r / (p_c + p_r), or s."""
    if rule == CONSTANT:
        return [scale] * len(target)
    return [scale * p[i, r].item() / (p[i, c].item() + p[i, r].item()) for i, (c, r) in enumerate(zip(target,
                                                                                                      reference))]


def test_rules_match_their_transcription():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, 7, dtype=torch.float64) * 3, dim=1)
    target = torch.tensor([0, 6, 3, 3, 1, 2])
    r = reference_classes(p, target)
    assert r.tolist() == expected_reference(p, target.tolist())
    for rule in ("adaptive", CONSTANT):
        got = guidance_scale(p, target, r, 2.5, rule)
        assert torch.allclose(got, torch.tensor(expected_scale(p, target.tolist(), r.tolist(), 2.5, rule),
                                                dtype=torch.float64), rtol=1e-12, atol=0)
    # the scale's range: near 0 when sure of c, s/2 at a tie, towards s when the sample drifts to r
    sure, tie, drift = torch.tensor([[1 - 1e-9, 1e-9, 0]]), torch.tensor([[0.4, 0.4, 0.2]]), torch.tensor([[1e-9,
                                                                                                          1 - 1e-9, 0]])
    c = torch.tensor([0])
    assert [float(guidance_scale(q, c, reference_classes(q, c), 2.0)) for q in (sure, tie, drift)] == \
        pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    # both probabilities underflowed: a tie
    assert float(guidance_scale(torch.tensor([[0.0, 0.0, 1.0]]), c, torch.tensor([1]), 2.0)) == 1.0


def test_random_reference_is_uniform_over_the_other_classes():
    p = torch.full((20000, 4), 0.25)
    target = torch.arange(20000) % 4
    r = reference_classes(p, target, RANDOM, torch.Generator().manual_seed(0))
    assert not (r == target).any()
    counts = torch.bincount(r[target == 2], minlength=4).double()
    assert counts[2] == 0 and (counts[[0, 1, 3]] / counts.sum() - 1 / 3).abs().max() < 0.02


def test_bad_settings_are_refused():
    for bad in ({"scale": float("nan")}, {"scale": -1.0}, {"scale_rule": "linear"}, {"reference_rule": "best"},
                {"sigma_start": 1.0, "sigma_end": 2.0}):
        with pytest.raises(ValueError):
            GFCGConfig(**bad)
    with pytest.raises(ValueError, match="at least two classes"):
        reference_classes(torch.ones(2, 1), torch.tensor([0, 0]))


# --- sampling ---

@functools.cache
def class_rows(family="sd15", seed=7):
    """Cross-attention conditioning of each class (and pooled, where the family reads it): random prompts."""
    spec = slim_models.FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(CLASSES, spec.tokens, spec.context_dim, generator=g)
    pooled = torch.randn(CLASSES, spec.pooled_dim, generator=g) if spec.pooled_dim else None
    return rows, pooled


def conditioning(family="sd15"):
    rows, pooled = class_rows(family)
    return ClassConditioning(rows, tuple(f"class {k}" for k in range(CLASSES)), pooled)


def targets():
    return ClassifierTargets(latent_classifier(4), TARGETS)


def run_setup(family="sd15", prediction=None):
    """(model, positive: the targets' class prompts, negative, latent of 2 images)."""
    model, _, negative, latent = setup(family, prediction, batch=1)
    rows, pooled = class_rows(family)
    extra = {} if pooled is None else {"pooled_output": pooled[list(TARGETS)]}
    positive = [[rows[list(TARGETS)], extra]]
    latent = slim_models.empty_latent(family, batch=len(TARGETS), height=32, width=32)
    return model, positive, negative, latent


class Recorder:
    """A post-CFG hook placed after every patch: the input, sigma and guided prediction of each model call."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def __call__(self, args):
        self.calls.append((args["input"].clone(), args["sigma"].clone(), args["denoised"].clone()))
        return args["denoised"]

    def around(self, patched):
        out = patched.clone()
        out.set_model_sampler_post_cfg_function(self)
        return out


def denoised(model, x, sigma, rows):
    """D(x; rows) in float64, from the model's own forward outside the sampler (rows: [B, T, D])."""
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=rows.to(x)).double()


def probabilities(d):
    network = latent_classifier(4).network.double()
    with torch.no_grad():
        return torch.softmax(network(d), dim=1)


def expected_gfcg(model, negative, calls, cfg, rule="adaptive", scale=SCALE):
    """The guided prediction of every recorded call: the CFG result (or D_c) + s_t (D_c − D_r), r read from the
    previous call's D_c (the call's own at the first), s_t from the call's own."""
    rows, _ = class_rows()
    target = list(TARGETS)
    out, earlier = [], None
    for x, sigma, _ in calls:
        d_c = denoised(model, x, sigma, rows[target])
        p = probabilities(d_c)
        r = expected_reference(earlier if earlier is not None else p, target)
        s = torch.tensor(expected_scale(p, target, r, scale, rule), dtype=torch.float64).view(-1, 1, 1, 1)
        d_r = denoised(model, x, sigma, rows[r])
        guided = d_c
        if cfg != 1:
            d_u = denoised(model, x, sigma, negative[0][0].expand(len(target), -1, -1))
            guided = d_u + cfg * (d_c - d_u)
        out.append(guided + s * (d_c - d_r))
        earlier = p
    return out


def assert_calls(recorder, expected):
    assert len(recorder.calls) == len(expected) == STEPS
    for (_, _, got), want in zip(recorder.calls, expected):
        assert rel_err(got, want) < TOLERANCE


@pytest.mark.parametrize("cfg", [1.0, CFG], ids=["alone", "with-cfg"])
@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_gfcg_equals_float64_reference(comfy, prediction, cfg):
    model, positive, negative, latent = run_setup("sd15", prediction)
    recorder = Recorder()
    patched = recorder.around(apply_gfcg(model, targets(), conditioning(), GFCGConfig(SCALE)))
    slim_models.ksample(patched, positive, negative, latent, cfg=cfg, steps=STEPS)
    assert_calls(recorder, expected_gfcg(model, negative, recorder.calls, cfg))


def test_constant_scale_equals_float64_reference(comfy):
    model, positive, negative, latent = run_setup()
    recorder = Recorder()
    config = GFCGConfig(SCALE, scale_rule=CONSTANT)
    patched = recorder.around(apply_gfcg(model, targets(), conditioning(), config))
    slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=STEPS)
    assert_calls(recorder, expected_gfcg(model, negative, recorder.calls, CFG, CONSTANT))


class CallCounter:
    """UNet function wrapper: the rows of each UNet call."""

    def __init__(self):
        self.rows = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        self.rows.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])


def counted(model):
    counter = CallCounter()
    out = model.clone()
    out.set_model_unet_function_wrapper(counter)
    return out, counter


@pytest.mark.parametrize("cfg,rows", [(1.0, 2), (CFG, 3)], ids=["alone", "with-cfg"])
def test_reference_rows_ride_in_the_conditional_call(comfy, cfg, rows):
    """After the first call (which must read D_c before it knows r), one UNet call per step holds every row."""
    model, positive, negative, latent = run_setup()
    counting, counter = counted(model)
    patched = apply_gfcg(counting, targets(), conditioning(), GFCGConfig(SCALE))
    slim_models.ksample(patched, positive, negative, latent, cfg=cfg, steps=STEPS)
    images = len(TARGETS)
    assert counter.rows == [(rows - 1) * images, images] + [rows * images] * (STEPS - 1)


def test_outside_the_sigma_range_no_reference_rows(comfy):
    model, positive, negative, latent = run_setup()
    counting, counter = counted(model)
    plain = slim_models.ksample(counting, positive, negative, latent, cfg=CFG, steps=STEPS)["samples"]
    counter.rows.clear()
    patched = apply_gfcg(counting, targets(), conditioning(), GFCGConfig(SCALE, sigma_start=1e-4, sigma_end=0.0))
    out = slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=STEPS)["samples"]
    assert counter.rows == [2 * len(TARGETS)] * STEPS
    assert torch.equal(out, plain)


def test_mask_weights_the_term(comfy):
    """Mask 0 gives CFG exactly; a half mask gives the CFG result plus half of GFCG's term, per call."""
    model, positive, negative, latent = run_setup()
    plain = slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=STEPS)["samples"]
    zero = apply_gfcg(model, targets(), conditioning(), GFCGConfig(SCALE), mask=torch.zeros(1, 32, 32))
    assert torch.equal(slim_models.ksample(zero, positive, negative, latent, cfg=CFG, steps=STEPS)["samples"], plain)
    recorder = Recorder()
    half = recorder.around(apply_gfcg(model, targets(), conditioning(), GFCGConfig(SCALE),
                                      mask=torch.full((2, 32, 32), 0.5)))
    slim_models.ksample(half, positive, negative, latent, cfg=CFG, steps=STEPS)
    full = expected_gfcg(model, negative, recorder.calls, CFG)
    rows, _ = class_rows()
    for (x, sigma, got), want in zip(recorder.calls, full):
        d_c = denoised(model, x, sigma, rows[list(TARGETS)])
        d_u = denoised(model, x, sigma, negative[0][0].expand(2, -1, -1))
        cfg_result = d_u + CFG * (d_c - d_u)
        assert rel_err(got, (cfg_result + want) / 2) < TOLERANCE


def test_sampler_custom_advanced_equals_ksampler(comfy):
    model, positive, negative, latent = run_setup()
    weak = slim_models.build_model("sd15", seed=5)
    patched = apply_gfcg(apply_autoguidance(model, weak), targets(), conditioning(), GFCGConfig(SCALE))
    a = slim_models.ksample(patched, positive, negative, latent, cfg=2.0, steps=STEPS)["samples"]
    b = slim_models.sample_custom_advanced(patched, positive, negative, latent, cfg=2.0, steps=STEPS)["samples"]
    assert rel_err(a, b) < 1e-6


# --- Autoguidance ---

def expected_atg(model, weak, calls, cfg, reference_class=False):
    """D_weak(x; c or r) + w (D(x; c) − D_weak(x; c or r)), r from the call's own D_c."""
    rows, _ = class_rows()
    target = list(TARGETS)
    out = []
    for x, sigma, _ in calls:
        d_c = denoised(model, x, sigma, rows[target])
        weak_rows = rows[expected_reference(probabilities(d_c), target)] if reference_class else rows[target]
        d_w = denoised(weak, x, sigma, weak_rows)
        out.append(d_w + cfg * (d_c - d_w))
    return out


@pytest.mark.parametrize("with_gfcg", [False, True], ids=["atg", "atg+gfcg"])
@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_autoguidance_equals_float64_reference(comfy, monkeypatch, prediction, with_gfcg):
    model, positive, negative, latent = run_setup("sd15", prediction)
    weak = slim_models.build_model("sd15", prediction, seed=5)
    loaded = []
    load = model_management.load_models_gpu
    monkeypatch.setattr(model_management, "load_models_gpu",
                        lambda models, *a, **k: (loaded.append(list(models)), load(models, *a, **k))[1])
    counting, counter = counted(model)
    weak_counting, weak_counter = counted(weak)
    patched = apply_autoguidance(counting, weak_counting)
    if with_gfcg:
        patched = apply_gfcg(patched, targets(), conditioning(), GFCGConfig(SCALE))
    recorder = Recorder()
    slim_models.ksample(recorder.around(patched), positive, negative, latent, cfg=2.5, steps=STEPS)
    assert_calls(recorder, expected_atg(model, weak, recorder.calls, 2.5, with_gfcg))
    assert counter.rows == weak_counter.rows == [len(TARGETS)] * STEPS  # ATG's cost, with GFCG or without
    assert any(any(m.model is weak.model for m in models) and any(m.model is model.model for m in models)
               for models in loaded), "the weak model was not loaded with the main one"


def test_autoguidance_at_cfg_1_skips_the_weak_model(comfy):
    model, positive, negative, latent = run_setup()
    weak, weak_counter = counted(slim_models.build_model("sd15", seed=5))
    plain = slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=STEPS)["samples"]
    out = slim_models.ksample(apply_autoguidance(model, weak), positive, negative, latent, cfg=1.0, steps=STEPS)
    assert weak_counter.rows == [] and torch.equal(out["samples"], plain)


def test_autoguidance_on_5d_latents(comfy):
    model, positive, negative, latent = setup("wan21", batch=2)
    weak = slim_models.build_model("wan21", seed=5)
    recorder = Recorder()
    slim_models.ksample(recorder.around(apply_autoguidance(model, weak)), positive, negative, latent, cfg=3.0,
                        steps=2)
    for x, sigma, got in recorder.calls:
        cond = positive[0][0].expand(x.shape[0], -1, -1)
        d_c, d_w = denoised(model, x, sigma, cond), denoised(weak, x, sigma, cond)
        assert got.ndim == 5 and rel_err(got, d_w + 3.0 * (d_c - d_w)) < TOLERANCE


def test_autoguidance_refuses_another_family_naming_the_node(comfy):
    node = comfy.NODE_CLASS_MAPPINGS["GuidanceAutoguidance"]
    model = slim_model("sd15")
    with pytest.raises(ValueError, match=re.escape(ATG_NAME) + ": the weak model's model family is SDXL"):
        node.execute(model, slim_model("sdxl"))
    pixel_space = model_patcher.ModelPatcher(build_base_model(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=re.escape(ATG_NAME) + ": the weak model's latent format is PixelSpace"):
        node.execute(model, pixel_space)
    with pytest.raises(ValueError, match=re.escape(ATG_NAME) + ": the weak model is the model itself"):
        node.execute(model, model)


def test_orders_and_mask_under_autoguidance_are_refused_naming_both(comfy):
    model = slim_model("sd15")
    weak = slim_models.build_model("sd15", seed=5)
    gfcg = apply_gfcg(model, targets(), conditioning(), GFCGConfig(SCALE))
    with pytest.raises(ValueError, match=r"already has Gradient-Free Classifier Guidance \(GFCG\); apply "
                                         r"Autoguidance \(ATG\) first"):
        apply_autoguidance(gfcg, weak)
    with pytest.raises(ValueError, match=r"with Autoguidance \(ATG\).*disconnect the mask"):
        apply_gfcg(apply_autoguidance(model, weak), targets(), conditioning(), GFCGConfig(SCALE),
                   mask=torch.ones(1, 32, 32))


def test_gfcg_node_refusals_name_the_node(comfy):
    node = comfy.NODE_CLASS_MAPPINGS["GuidanceGFCG"]
    defaults = {"scale": SCALE, "scale_rule": "adaptive", "reference_rule": "most likely competitor",
                "sigma_start": 10000.0, "sigma_end": 0.0}
    model = slim_model("sd15")
    with pytest.raises(ValueError, match=re.escape(GFCG_NAME) + ": connect the class conditioning"):
        node.execute(model, targets(), **defaults)
    other = {"names": ["a", "b", "c", "d", "e"], "tokens": torch.zeros(6, 4, 768)}
    with pytest.raises(ValueError, match=re.escape(GFCG_NAME) + ": the class conditioning has classes a, b"):
        node.execute(model, targets(), classes=other, **defaults)
    three = ClassifierTargets(latent_classifier(4), (0, 1, 2))
    patched = node.execute(model, three, classes={"names": [f"class {k}" for k in range(CLASSES)],
                                                  "tokens": torch.cat([class_rows()[0], class_rows()[0][:1]])},
                           **defaults).result[0]
    model_, positive, negative, latent = run_setup()
    with pytest.raises(ValueError,
                       match=re.escape(GFCG_NAME) + ": Classifier Target Classes gives 3 targets for a batch of 2"):
        slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=1)


def test_cfgpp_refuses_gfcg_naming_both(comfy):
    model, positive, negative, latent = run_setup()
    sampler = comfy.NODE_CLASS_MAPPINGS["CFGppSampler"].execute("ddim", 0.6).result[0]
    patched = apply_gfcg(model, targets(), conditioning(), GFCGConfig(SCALE))
    with pytest.raises(ValueError, match=r"Gradient-Free Classifier Guidance \(GFCG\)") as refusal:
        slim_models.sample_custom_advanced(patched, positive, negative, latent, cfg=1.0, steps=STEPS, sampler=sampler)
    assert "CFG++" in str(refusal.value)

