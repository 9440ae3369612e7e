"""The APG node inside real ComfyUI sampling: slim models of every family, KSampler and SamplerCustomAdvanced."""

import pytest
import torch

import slim_models
from apg_reference import paper_apg

DEFAULTS = {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "sigma_start": 10000.0, "sigma_end": 0.0}
CFG_SETTINGS = {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}
FAMILY_PREDICTIONS = [("sd15", "eps"), ("sd15", "v"), ("sdxl", "eps"), ("flux", "flow"), ("wan21", "flow")]


def apg(comfy, model, **settings):
    return comfy.NODE_CLASS_MAPPINGS["AdaptiveProjectedGuidance"].execute(model, **(DEFAULTS | settings)).result[0]


def setup(family, prediction="eps", batch=1, seed=0):
    model = slim_models.build_model(family, prediction, seed=seed)
    positive, negative = slim_models.conditioning(family, batch=batch, seed=seed)
    latent = slim_models.empty_latent(family, batch=batch, height=32, width=32)
    return model, positive, negative, latent


class Spy:
    """Records the raw model outputs (a pre-CFG hook placed before APG's) and the final guided output."""

    def __init__(self, model):
        self.raw, self.guided, self.sigmas = [], [], []
        self.model = model.clone()
        self.model.set_model_sampler_pre_cfg_function(self.pre)
        self.model.set_model_sampler_post_cfg_function(self.post)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def pre(self, args):
        cond, uncond = args["conds_out"][:2]
        self.raw.append((cond.clone(), uncond.clone()))
        self.sigmas.append(float(args["sigma"][0]))
        return args["conds_out"]

    def post(self, args):
        self.guided.append(args["denoised"].clone())
        return args["denoised"]


@pytest.mark.parametrize("family,prediction", FAMILY_PREDICTIONS)
def test_guided_output_in_the_sampler_matches_float64_paper_algorithm(comfy, family, prediction):
    model, positive, negative, latent = setup(family, prediction, batch=3)
    spy = Spy(model)
    patched = apg(comfy, spy.model, norm_threshold=2.0)  # a threshold that binds for these slim models
    slim_models.ksample(patched, positive, negative, latent, cfg=6.0, steps=4)
    conds = [c for c, _ in spy.raw]
    unconds = [u for _, u in spy.raw]
    assert len(conds) == 4 and conds[0].shape[0] == 3
    expected = paper_apg(conds, unconds, 6.0, 0.0, 2.0, -0.5)
    for got, want in zip(spy.guided, expected):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("family,prediction", FAMILY_PREDICTIONS)
def test_eta_one_without_rescale_or_momentum_is_cfg(comfy, family, prediction):
    model, positive, negative, latent = setup(family, prediction, batch=2)
    plain = slim_models.ksample(model, positive, negative, latent, cfg=5.0, steps=3)["samples"]
    patched = slim_models.ksample(apg(comfy, model, **CFG_SETTINGS), positive, negative, latent, cfg=5.0, steps=3)
    assert torch.allclose(patched["samples"], plain, rtol=0, atol=1e-4 * plain.abs().max().item())


def test_defaults_change_the_result(comfy):
    model, positive, negative, latent = setup("sd15")
    plain = slim_models.ksample(model, positive, negative, latent, cfg=7.0)["samples"]
    guided = slim_models.ksample(apg(comfy, model, norm_threshold=1.0), positive, negative, latent, cfg=7.0)["samples"]
    assert (guided - plain).abs().max() > 1e-3


def test_momentum_state_is_per_run(comfy):
    """Two runs in a row, and two differently patched models interleaved, give what fresh models give."""
    model, positive, negative, latent = setup("sd15")

    def run(m):
        return slim_models.ksample(m, positive, negative, latent, cfg=6.0, steps=4)["samples"]

    first = apg(comfy, model, momentum=-0.75, norm_threshold=1.0)
    other = apg(comfy, model, momentum=0.5, norm_threshold=1.0)
    a1, b1, a2, b2 = run(first), run(other), run(first), run(other)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert torch.equal(a1, run(apg(comfy, model, momentum=-0.75, norm_threshold=1.0)))
    assert not torch.allclose(a1, b1)


def test_ksampler_and_sampler_custom_advanced_agree(comfy):
    model, positive, negative, latent = setup("sdxl", batch=2)
    patched = apg(comfy, model, norm_threshold=1.0)
    via_ksampler = slim_models.ksample(patched, positive, negative, latent, cfg=6.0, steps=3)["samples"]
    via_custom = slim_models.sample_custom_advanced(patched, positive, negative, latent, cfg=6.0, steps=3)["samples"]
    assert torch.allclose(via_ksampler, via_custom, atol=1e-5)


def test_sigma_range_outside_every_step_is_plain_cfg(comfy):
    model, positive, negative, latent = setup("sd15")
    plain = slim_models.ksample(model, positive, negative, latent, cfg=6.0)["samples"]
    outside = apg(comfy, model, norm_threshold=1.0, sigma_start=0.001, sigma_end=0.0)
    assert torch.equal(slim_models.ksample(outside, positive, negative, latent, cfg=6.0)["samples"], plain)
    partial = apg(comfy, model, norm_threshold=1.0, sigma_start=5.0, sigma_end=0.5)
    spy = Spy(partial)
    slim_models.ksample(spy.model, positive, negative, latent, cfg=6.0, steps=6)
    assert any(s > 5.0 for s in spy.sigmas) and any(0.5 <= s <= 5.0 for s in spy.sigmas)


def test_composes_with_a_cfg_function_patch(comfy):
    """APG before ComfyUI's RescaleCFG (a sampler CFG function): with CFG settings it is RescaleCFG alone."""
    model, positive, negative, latent = setup("sd15", "v")
    rescale = comfy.NODE_CLASS_MAPPINGS["RescaleCFG"]

    def rescaled(m):
        out = rescale().patch(m, 0.7)
        return out[0] if isinstance(out, tuple) else out.result[0]

    alone = slim_models.ksample(rescaled(model), positive, negative, latent, cfg=6.0)["samples"]
    both = slim_models.ksample(rescaled(apg(comfy, model, **CFG_SETTINGS)), positive, negative, latent, cfg=6.0)
    assert torch.allclose(both["samples"], alone, atol=1e-4 * alone.abs().max().item())


def test_cfg_one_skips_the_unconditional_pass(comfy):
    model, positive, negative, latent = setup("sd15")
    plain = slim_models.ksample(model, positive, negative, latent, cfg=1.0)["samples"]
    assert torch.equal(slim_models.ksample(apg(comfy, model), positive, negative, latent, cfg=1.0)["samples"], plain)


def test_nan_prediction_stops_with_the_node_name(comfy):
    model, positive, negative, latent = setup("sd15")
    poisoned = model.clone()

    def poison(args):
        cond, uncond = args["conds_out"][:2]
        return [cond, torch.full_like(uncond, float("nan"))]

    poisoned.set_model_sampler_pre_cfg_function(poison)
    with pytest.raises(ValueError, match=r"Adaptive Projected Guidance \(APG\).*NaN"):
        slim_models.ksample(apg(comfy, poisoned), positive, negative, latent, cfg=6.0, steps=2)


def test_bad_sigma_range_is_refused_with_the_fix(comfy):
    model = slim_models.build_model("sd15")
    with pytest.raises(ValueError, match=r"Adaptive Projected Guidance \(APG\).*sigma_start"):
        apg(comfy, model, sigma_start=1.0, sigma_end=2.0)


# Issue 16: threshold_mode (absolute | per-element) and video_mode (clip | frame) ------------------------------------

# family, prediction, threshold_mode, video_mode, norm_threshold: thresholds that bind on some steps (or frames) of
# these slim models and not on others (wan21's update is about 0.45 per latent frame of 256 elements at the first
# step, sd15's about 3.5 over 64 elements)
MODE_CASES = [
    ("sd15", "eps", "per-element", "clip", 60.0),
    ("wan21", "flow", "absolute", "frame", 0.42),
    ("wan21", "flow", "per-element", "frame", 6.5),
    ("wan21", "flow", "per-element", "clip", 6.5),
]


@pytest.mark.parametrize("family,prediction,threshold_mode,video_mode,r", MODE_CASES,
                         ids=[f"{f}-{t}-{v}" for f, _, t, v, _ in MODE_CASES])
def test_modes_in_the_sampler_match_float64_paper_algorithm(comfy, family, prediction, threshold_mode, video_mode, r):
    """Through KSampler, batch 2, three steps of reverse momentum: per element, Algorithm 1 with r·√(n / 65536) (n of
    a sample, or of a latent frame); per frame, each latent frame of the video guided on its own."""
    model, positive, negative, latent = setup(family, prediction, batch=2)
    if family == "wan21":
        latent = slim_models.empty_latent(family, batch=2, height=32, width=32, length=9)  # [2, 16, 3, 4, 4]
    spy = Spy(model)
    patched = apg(comfy, spy.model, norm_threshold=r, threshold_mode=threshold_mode, video_mode=video_mode)
    slim_models.ksample(patched, positive, negative, latent, cfg=6.0, steps=3)
    conds, unconds = [c for c, _ in spy.raw], [u for _, u in spy.raw]
    assert len(conds) == 3 and conds[0].shape[0] == 2 and conds[0].ndim == (5 if family == "wan21" else 4)
    frames, per_element = video_mode == "frame", threshold_mode == "per-element"
    expected = paper_apg(conds, unconds, 6.0, 0.0, r, -0.5, frames=frames, per_element=per_element)
    for got, want in zip(spy.guided, expected):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    # each mode matters here: the other threshold mode, and on video the other video mode, guide otherwise
    others = [paper_apg(conds, unconds, 6.0, 0.0, r, -0.5, frames=frames, per_element=not per_element)]
    if family == "wan21":
        others.append(paper_apg(conds, unconds, 6.0, 0.0, r, -0.5, frames=not frames, per_element=per_element))
    for other in others:
        assert max(((a - b).norm() / b.norm()).item() for a, b in zip(other, expected)) > 1e-3


def test_video_mode_leaves_image_latents_unchanged_in_the_sampler(comfy):
    model, positive, negative, latent = setup("sdxl", batch=2)
    settings = dict(norm_threshold=30.0, threshold_mode="per-element")
    clip = slim_models.ksample(apg(comfy, model, **settings, video_mode="clip"), positive, negative, latent, cfg=6.0,
                               steps=3)["samples"]
    frame = slim_models.ksample(apg(comfy, model, **settings, video_mode="frame"), positive, negative, latent, cfg=6.0,
                                steps=3)["samples"]
    assert torch.equal(clip, frame)


def hook_config(patched):
    hooks = patched.model_options["sampler_pre_cfg_function"]
    return hooks[-1].config


def test_node_without_the_new_inputs_is_absolute_and_clip(comfy):
    """Callers that pass no threshold_mode or video_mode (API prompts and scripts from before) get the paper's
    absolute threshold over whole samples, as before; the two inputs reach the patch when given."""
    model = slim_models.build_model("wan21")
    node = comfy.NODE_CLASS_MAPPINGS["AdaptiveProjectedGuidance"]
    old = node.execute(model, **DEFAULTS).result[0]
    config = hook_config(old)
    assert (config.threshold_mode, config.video_mode) == ("absolute", "clip")
    assert not config.frames and config.threshold(16 * 21 * 90 * 160) == DEFAULTS["norm_threshold"]
    new = node.execute(model, **DEFAULTS, threshold_mode="per-element", video_mode="frame").result[0]
    config = hook_config(new)
    assert (config.threshold_mode, config.video_mode) == ("per-element", "frame") and config.frames
    inputs = node.GET_SCHEMA().inputs
    combos = {i.id: i for i in inputs if i.id in ("threshold_mode", "video_mode")}
    assert combos["threshold_mode"].optional and combos["video_mode"].optional
    assert combos["threshold_mode"].default == "absolute" and combos["video_mode"].default == "clip"
    assert list(combos["threshold_mode"].options) == ["absolute", "per-element"]
    assert list(combos["video_mode"].options) == ["clip", "frame"]


@pytest.mark.parametrize("field,value,allowed", [("threshold_mode", "relative", "absolute, per-element"),
                                                 ("video_mode", "frames", "clip, frame")])
def test_unknown_mode_is_refused_with_the_node_name(comfy, field, value, allowed):
    """A value that arrives through a link (not checked when queued) stops the node, naming it and the choices."""
    model = slim_models.build_model("sd15")
    with pytest.raises(ValueError, match=rf"Adaptive Projected Guidance \(APG\).*{field} must be one of {allowed}"):
        apg(comfy, model, **{field: value})
