"""APG against a float64 transcription of the paper's Algorithm 1, and its invariants."""

import pytest
import torch

from comfyui_guidance.guiders.apg import (
    APGConfig,
    APGState,
    apg_cfg_uncond,
    apg_guided,
    apg_update,
)
from comfyui_guidance.kernels.projection import project, rescale_to_max_norm

from apg_reference import paper_apg


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def predictions(shape, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    conds = [torch.randn(shape, generator=g) * 3 for _ in range(steps)]
    unconds = [c + torch.randn(shape, generator=g) for c in conds]
    return conds, unconds


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 16, 3, 8, 8)], ids=["4d-image", "5d-video"])
@pytest.mark.parametrize(
    "eta,r,beta", [(0.0, 15.0, -0.5), (0.0, 2.5, -0.75), (0.3, 0.0, 0.0), (1.0, 4.0, 0.4), (0.5, 1e6, -0.5)]
)
def test_matches_float64_paper_algorithm(shape, eta, r, beta):
    conds, unconds = predictions(shape)
    w = 7.5
    reference = paper_apg(conds, unconds, w, eta, r, beta)
    config = APGConfig(eta=eta, norm_threshold=r, momentum=beta)
    state = APGState(beta)
    sigmas = [14.0, 7.0, 2.0, 0.5]
    for cond, uncond, ref, sigma in zip(conds, unconds, reference, sigmas):
        guided = apg_guided(cond, uncond, w, config, state, sigma)
        assert guided.dtype == cond.dtype and guided.shape == cond.shape
        assert rel_err(guided, ref) < 1e-6


def test_cfg_uncond_form_gives_apg_through_plain_cfg():
    conds, unconds = predictions((3, 4, 8, 8))
    config = APGConfig()
    w = 9.0
    guided = apg_guided(conds[0], unconds[0], w, config, APGState(config.momentum), 3.0)
    u = apg_cfg_uncond(conds[0], unconds[0], config, APGState(config.momentum), 3.0)
    assert rel_err(u + w * (conds[0] - u), guided) < 1e-6


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 16, 2, 8, 8)])
def test_eta_one_without_rescale_or_momentum_is_cfg(shape):
    conds, unconds = predictions(shape)
    config = APGConfig(eta=1.0, norm_threshold=0.0, momentum=0.0)
    state = APGState(0.0)
    for cond, uncond in zip(conds, unconds):
        for w in (1.0, 4.0, 12.0):
            cfg = uncond + w * (cond - uncond)
            assert torch.allclose(apg_guided(cond, uncond, w, config, state, 1.0), cfg, rtol=0, atol=1e-5)
        assert torch.allclose(apg_cfg_uncond(cond, uncond, config, state, 1.0), uncond, rtol=0, atol=1e-5)


def test_eta_zero_update_is_orthogonal_to_conditional_prediction():
    conds, unconds = predictions((4, 4, 8, 8))
    update = apg_update(conds[0], unconds[0], APGConfig(eta=0.0, norm_threshold=0.0, momentum=0.0))
    cosine = torch.nn.functional.cosine_similarity(update.flatten(1), conds[0].flatten(1), dim=1)
    assert cosine.abs().max() < 1e-5


def test_rescaling_caps_norm_per_sample():
    cond = torch.randn(3, 4, 8, 8)
    uncond = cond - torch.randn(3, 4, 8, 8) * torch.tensor([0.01, 1.0, 10.0]).view(3, 1, 1, 1)
    r = 2.0
    update = apg_update(cond, uncond, APGConfig(eta=1.0, norm_threshold=r, momentum=0.0))
    norms = update.flatten(1).norm(dim=1)
    raw = (cond - uncond).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.minimum(raw, torch.tensor(r)), rtol=1e-5)


def test_samples_in_a_batch_do_not_interact():
    conds, unconds = predictions((3, 4, 8, 8))
    config = APGConfig()
    batched = apg_guided(conds[0], unconds[0], 7.0, config, APGState(config.momentum), 5.0)
    for i in range(3):
        single = apg_guided(conds[0][i : i + 1], unconds[0][i : i + 1], 7.0, config, APGState(config.momentum), 5.0)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-6)


def test_momentum_state_resets_when_sigma_rises():
    conds, unconds = predictions((2, 4, 8, 8), steps=2)
    config = APGConfig(momentum=-0.5)
    state = APGState(config.momentum)
    first = [apg_guided(c, u, 5.0, config, state, s) for c, u, s in zip(conds, unconds, [10.0, 1.0])]
    again = [apg_guided(c, u, 5.0, config, state, s) for c, u, s in zip(conds, unconds, [10.0, 1.0])]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # without the reset the second step would differ, so the test above can fail
    carried = apg_guided(conds[1], unconds[1], 5.0, config, state, 0.5)
    assert not torch.allclose(carried, first[1])


def test_half_precision_inputs_keep_dtype_and_accuracy():
    conds, unconds = predictions((2, 4, 16, 16), steps=1)
    config = APGConfig()
    ref = paper_apg(conds, unconds, 7.0, config.eta, config.norm_threshold, config.momentum)[0]
    out = apg_guided(conds[0].half(), unconds[0].half(), 7.0, config, APGState(config.momentum), 1.0)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_are_refused(bad):
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    uncond[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        apg_guided(cond, uncond, 5.0, APGConfig())


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        apg_guided(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 9), 5.0, APGConfig())


def test_sigma_range_must_be_ordered():
    with pytest.raises(ValueError, match="sigma_start"):
        APGConfig(sigma_start=1.0, sigma_end=2.0)


def test_projection_and_rescale_ops_match_float64():
    g = torch.Generator().manual_seed(3)
    v, c = torch.randn(3, 4, 2, 8, 8, generator=g), torch.randn(3, 4, 2, 8, 8, generator=g)
    vd, cd = v.double(), c.double()
    dims = list(range(1, v.ndim))
    k = (vd * cd).sum(dims, keepdim=True) / (cd * cd).sum(dims, keepdim=True)
    parallel, orthogonal = project(v, c)
    assert rel_err(parallel, k * cd) < 1e-6
    assert rel_err(orthogonal, vd - k * cd) < 1e-6
    norm = vd.norm(p=2, dim=dims, keepdim=True)
    assert rel_err(rescale_to_max_norm(v, 5.0), vd * torch.clamp(5.0 / norm, max=1.0)) < 1e-6


# Issue 16: a norm threshold per element, and video latents guided per clip or per frame ------------------------------

from comfyui_guidance.guiders.apg import THRESHOLD_MODES, VIDEO_MODES  # noqa: E402
from comfyui_guidance.kernels.projection import combine, group_count, group_elements, sample_dots  # noqa: E402

from apg_reference import REFERENCE_ELEMENTS, paper_guide  # noqa: E402

SIGMAS = [14.0, 7.0, 2.0, 0.5]


def scaled_predictions(shape, scales, steps=4, seed=0):
    """Predictions whose differences have a spread of sizes: `scales` broadcasts against the latent (one per sample,
    or per sample and frame), so a threshold binds on some vectors and not on others."""
    g = torch.Generator().manual_seed(seed)
    conds = [torch.randn(shape, generator=g) * 3 for _ in range(steps)]
    unconds = [c + torch.randn(shape, generator=g) * scales for c in conds]
    return conds, unconds


def frame_scales(batch, frames):
    """[B, 1, T, 1, 1] difference sizes from 0.003 to 3 (rms per element), mixed over samples and frames."""
    scales = torch.logspace(-2.5, 0.5, batch * frames)[torch.randperm(batch * frames, generator=torch.Generator()
                                                                      .manual_seed(1))]
    return scales.view(batch, 1, frames, 1, 1)


def run_steps(conds, unconds, w, config, fused=None):
    state = APGState(config.momentum)
    return [apg_guided(c, u, w, config, state, s, fused) for c, u, s in zip(conds, unconds, SIGMAS)]


def frame_norms(x):
    """[B, T] L2 norms of each latent frame of a 5-D latent, in float64."""
    return x.double().pow(2).sum(dim=(1, 3, 4)).sqrt()


def test_threshold_is_r_or_r_times_root_of_elements_over_sdxl_1024():
    r = 15.0
    for n in (1, 64, 1024, 4 * 64 * 64, 65536, 16 * 90 * 160, 16 * 21 * 90 * 160):
        assert APGConfig(norm_threshold=r).threshold(n) == r
        assert APGConfig(norm_threshold=r, threshold_mode="per-element").threshold(n) == pytest.approx(
            r * (n / 65536) ** 0.5, rel=1e-12)
    assert REFERENCE_ELEMENTS == 65536 == 4 * 128 * 128
    assert APGConfig(norm_threshold=r, threshold_mode="per-element").threshold(65536) == r


# shape, video_mode, the norm each cap applies to (over the whole sample or per frame), elements per capped vector
CAP_CASES = [
    ((3, 4, 16, 16), "clip", "sample", 4 * 16 * 16),
    ((2, 4, 40, 24), "frame", "sample", 4 * 40 * 24),  # 4-D: no frames
    ((2, 16, 3, 8, 8), "clip", "sample", 16 * 3 * 8 * 8),
    ((2, 16, 3, 8, 8), "frame", "frame", 16 * 8 * 8),
    ((3, 5, 4, 7, 9), "frame", "frame", 5 * 7 * 9),
]


@pytest.mark.parametrize("shape,video_mode,unit,elements", CAP_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{v}" for s, v, _, _ in CAP_CASES])
@pytest.mark.parametrize("threshold_mode", THRESHOLD_MODES)
def test_update_norm_is_capped_at_the_threshold_of_its_elements(shape, video_mode, unit, elements, threshold_mode):
    """With η = 1 and no momentum the update is the rescaled ΔD_t: each capped vector's norm is min(‖ΔD‖, cap), the
    cap r (absolute) or r·√(n / 65536) with n the vector's elements (per-element)."""
    r = 2.0 if threshold_mode == "absolute" else 40.0
    cap = r if threshold_mode == "absolute" else r * (elements / 65536) ** 0.5
    if unit == "frame":
        scales = frame_scales(shape[0], shape[2])
    else:
        scales = frame_scales(shape[0], 1).view(shape[0], *(1,) * (len(shape) - 1))
    scales = scales * (cap / elements ** 0.5)  # sizes around the cap: some vectors below it, some above
    conds, unconds = scaled_predictions(shape, scales, steps=1)
    config = APGConfig(eta=1.0, norm_threshold=r, momentum=0.0, threshold_mode=threshold_mode, video_mode=video_mode)
    update = apg_update(conds[0], unconds[0], config)
    raw = conds[0] - unconds[0]
    norm = frame_norms if unit == "frame" else (lambda x: x.double().flatten(1).norm(dim=1))
    expected = torch.clamp(norm(raw), max=cap)
    assert (norm(raw) > cap * 1.01).any() and (norm(raw) < cap * 0.99).any()  # the cap binds on some, not on all
    assert torch.allclose(norm(update), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("video_mode", VIDEO_MODES)
def test_per_element_is_absolute_at_the_sdxl_1024_latent(video_mode):
    """On a 4 × 128 × 128 latent the per-element threshold is r itself: the same result, bit for bit."""
    conds, unconds = scaled_predictions((2, 4, 128, 128), torch.tensor([0.03, 1.0]).view(2, 1, 1, 1), steps=2)
    absolute = run_steps(conds, unconds, 7.5, APGConfig(norm_threshold=15.0, video_mode=video_mode))
    per_element = run_steps(conds, unconds, 7.5, APGConfig(norm_threshold=15.0, threshold_mode="per-element",
                                                           video_mode=video_mode))
    for a, b in zip(absolute, per_element):
        assert torch.equal(a, b)


PER_ELEMENT_SHAPES = [(3, 4, 16, 16), (2, 4, 72, 40), (2, 4, 176, 136), (2, 16, 13, 9), (2, 16, 3, 10, 6)]


@pytest.mark.parametrize("shape", PER_ELEMENT_SHAPES, ids=["x".join(map(str, s)) for s in PER_ELEMENT_SHAPES])
@pytest.mark.parametrize("eta,r,beta", [(0.0, 15.0, -0.5), (0.25, 6.0, -0.75), (1.0, 30.0, 0.3)])
def test_per_element_matches_float64_paper_algorithm_with_r_scaled(shape, eta, r, beta):
    """Per element, APG is Algorithm 1 with r·√(n / 65536) for r, n = C·H·W (·T) of a sample: the same
    root-mean-square update is allowed at every size."""
    scales = torch.tensor([0.01, 0.3, 2.0][: shape[0]]).view(shape[0], *(1,) * (len(shape) - 1))
    conds, unconds = scaled_predictions(shape, scales)
    config = APGConfig(eta=eta, norm_threshold=r, momentum=beta, threshold_mode="per-element")
    scaled_r = r * (conds[0][0].numel() / 65536) ** 0.5
    reference = paper_apg(conds, unconds, 7.5, eta, scaled_r, beta)
    assert all(torch.allclose(a, b) for a, b in zip(reference, paper_apg(conds, unconds, 7.5, eta, r, beta,
                                                                        per_element=True)))
    absolute = paper_apg(conds, unconds, 7.5, eta, r, beta)
    assert max(rel_err(a, b) for a, b in zip(absolute, reference)) > 1e-3  # the scaled r changes the result
    for guided, ref in zip(run_steps(conds, unconds, 7.5, config), reference):
        assert guided.dtype == torch.float32 and guided.shape == shape
        assert rel_err(guided, ref) < 1e-6


@pytest.mark.parametrize("shape", [(2, 4, 24, 16), (3, 16, 2, 8, 8), (2, 4, 5, 3, 7)])
@pytest.mark.parametrize("threshold_mode", THRESHOLD_MODES)
@pytest.mark.parametrize("video_mode", VIDEO_MODES)
def test_cfg_settings_are_cfg_in_every_mode(shape, threshold_mode, video_mode):
    """η = 1, r = 0, β = 0 is CFG whatever the threshold and video modes."""
    conds, unconds = predictions(shape, steps=2)
    config = APGConfig(eta=1.0, norm_threshold=0.0, momentum=0.0, threshold_mode=threshold_mode,
                       video_mode=video_mode)
    state = APGState(0.0)
    for cond, uncond, sigma in zip(conds, unconds, SIGMAS):
        for w in (1.0, 5.0):
            cfg = uncond + w * (cond - uncond)
            assert torch.allclose(apg_guided(cond, uncond, w, config, state, sigma), cfg, rtol=0, atol=1e-5)
        assert torch.allclose(apg_cfg_uncond(cond, uncond, config, state, sigma), uncond, rtol=0, atol=1e-5)


VIDEO_SHAPES = [(2, 16, 3, 8, 8), (3, 4, 5, 6, 10), (2, 3, 4, 7, 5)]
VIDEO_SETTINGS = [  # eta, r, beta, threshold_mode
    (0.0, 2.5, -0.5, "absolute"),
    (0.0, 15.0, -0.5, "per-element"),
    (0.3, 40.0, -0.75, "per-element"),
    (1.0, 4.0, 0.4, "absolute"),
    (0.5, 0.0, 0.0, "absolute"),
]


@pytest.mark.parametrize("shape", VIDEO_SHAPES, ids=["x".join(map(str, s)) for s in VIDEO_SHAPES])
@pytest.mark.parametrize("eta,r,beta,threshold_mode", VIDEO_SETTINGS)
def test_frame_mode_matches_float64_paper_algorithm_per_frame(shape, eta, r, beta, threshold_mode):
    """video_mode="frame": Algorithm 1 on each latent frame (projection on that frame's conditional prediction, the
    cap per frame, n = C·H·W of a frame per element), the running average over the whole tensor across steps."""
    conds, unconds = scaled_predictions(shape, frame_scales(shape[0], shape[2]))
    per_element = threshold_mode == "per-element"
    config = APGConfig(eta=eta, norm_threshold=r, momentum=beta, threshold_mode=threshold_mode, video_mode="frame")
    reference = paper_apg(conds, unconds, 7.5, eta, r, beta, frames=True, per_element=per_element)
    for guided, ref in zip(run_steps(conds, unconds, 7.5, config), reference):
        assert guided.dtype == torch.float32 and guided.shape == shape
        assert rel_err(guided, ref) < 1e-6
    if eta != 1.0 or r > 0:  # frame mode is not clip mode (else the reference above proves nothing about frames)
        clip = paper_apg(conds, unconds, 7.5, eta, r, beta, per_element=per_element)
        assert max(rel_err(a, b) for a, b in zip(clip, reference)) > 1e-3


@pytest.mark.parametrize("shape", VIDEO_SHAPES[:2], ids=["x".join(map(str, s)) for s in VIDEO_SHAPES[:2]])
@pytest.mark.parametrize("eta,r,beta,threshold_mode", VIDEO_SETTINGS[:3])
def test_clip_mode_is_the_whole_sample_as_before(shape, eta, r, beta, threshold_mode):
    """video_mode="clip" (the default) is Algorithm 1 over each whole sample, bit for bit what an APGConfig without
    video_mode gives; per element, n = C·T·H·W of the clip."""
    conds, unconds = scaled_predictions(shape, frame_scales(shape[0], shape[2]))
    settings = dict(eta=eta, norm_threshold=r, momentum=beta, threshold_mode=threshold_mode)
    clip = run_steps(conds, unconds, 7.5, APGConfig(**settings, video_mode="clip"))
    default = run_steps(conds, unconds, 7.5, APGConfig(**settings))
    reference = paper_apg(conds, unconds, 7.5, eta, r, beta, per_element=threshold_mode == "per-element")
    for got, same, ref in zip(clip, default, reference):
        assert torch.equal(got, same)
        assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("threshold_mode", THRESHOLD_MODES)
def test_frame_mode_guides_each_frame_as_an_image(threshold_mode):
    """Frame by frame, a clip is guided as its frames would be as image latents [B, C, H, W] (each with its own
    momentum memory: the running average is element-wise), whatever the clip length."""
    shape = (2, 16, 4, 6, 10)
    conds, unconds = scaled_predictions(shape, frame_scales(2, 4))
    config = APGConfig(norm_threshold=3.0 if threshold_mode == "absolute" else 30.0, threshold_mode=threshold_mode,
                       video_mode="frame")
    clip = run_steps(conds, unconds, 6.0, config)
    first_two = run_steps([c[:, :, :2] for c in conds], [u[:, :, :2] for u in unconds], 6.0, config)
    for t in range(4):
        images = run_steps([c[:, :, t] for c in conds], [u[:, :, t] for u in unconds], 6.0, config)
        for whole, image in zip(clip, images):
            assert torch.allclose(whole[:, :, t], image, rtol=1e-5, atol=1e-5)
    for whole, part in zip(clip, first_two):
        assert torch.allclose(whole[:, :, :2], part, rtol=1e-5, atol=1e-5)


def test_frame_mode_update_is_orthogonal_to_each_conditional_frame():
    conds, unconds = predictions((3, 4, 5, 8, 8))
    update = apg_update(conds[0], unconds[0], APGConfig(eta=0.0, norm_threshold=0.0, momentum=0.0, video_mode="frame"))
    cosine = torch.nn.functional.cosine_similarity(update.transpose(1, 2).flatten(2),
                                                   conds[0].transpose(1, 2).flatten(2), dim=2)
    assert cosine.shape == (3, 5) and cosine.abs().max() < 1e-5
    clip = apg_update(conds[0], unconds[0], APGConfig(eta=0.0, norm_threshold=0.0, momentum=0.0))
    assert torch.nn.functional.cosine_similarity(clip.transpose(1, 2).flatten(2), conds[0].transpose(1, 2).flatten(2),
                                                 dim=2).abs().max() > 1e-3  # clip mode projects on the clip only


def test_frame_with_an_all_zero_conditional_prediction_keeps_its_capped_difference():
    """A frame whose conditional prediction is zero has no parallel part: its update is its rescaled ΔD_t, finite;
    the other frames are guided as usual."""
    conds, unconds = predictions((2, 4, 3, 8, 8), steps=1)
    cond, uncond = conds[0].clone(), unconds[0].clone()
    cond[1, :, 2] = 0
    config = APGConfig(eta=0.0, norm_threshold=5.0, momentum=0.0, video_mode="frame")
    update = apg_update(cond, uncond, config).double()
    diff = (cond - uncond).double()
    assert torch.isfinite(update).all()
    assert rel_err(update[1, :, 2], diff[1, :, 2] * min(1.0, 5.0 / diff[1, :, 2].norm().item())) < 1e-6
    for i, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        one = (slice(i, i + 1), slice(None), t)
        expected = paper_guide(cond[one].double(), diff[one], 2.0, 0.0, 5.0) - cond[one].double()  # w = 2: the update
        assert rel_err(update[one], expected) < 1e-6


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 16, 9, 12), (5, 3, 7)])
@pytest.mark.parametrize("threshold_mode", THRESHOLD_MODES)
def test_video_mode_leaves_other_latents_unchanged(shape, threshold_mode):
    """Only 5-D latents have frames: for 4-D (and other) latents frame mode is clip mode, bit for bit."""
    conds, unconds = scaled_predictions(shape, torch.tensor([0.01, 0.3, 2.0, 1.0, 0.1][: shape[0]])
                                        .view(shape[0], *(1,) * (len(shape) - 1)))
    settings = dict(norm_threshold=2.0 if threshold_mode == "absolute" else 30.0, threshold_mode=threshold_mode)
    clip = run_steps(conds, unconds, 7.5, APGConfig(**settings, video_mode="clip"))
    frame = run_steps(conds, unconds, 7.5, APGConfig(**settings, video_mode="frame"))
    for a, b in zip(clip, frame):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frame_mode_half_precision_keeps_dtype_and_accuracy(dtype):
    conds, unconds = scaled_predictions((2, 16, 3, 8, 8), frame_scales(2, 3), steps=1)
    conds, unconds = [c.to(dtype) for c in conds], [u.to(dtype) for u in unconds]  # the reference of the same inputs
    config = APGConfig(video_mode="frame", threshold_mode="per-element")
    ref = paper_apg(conds, unconds, 7.0, config.eta, config.norm_threshold, config.momentum, frames=True,
                    per_element=True)[0]
    out = apg_guided(conds[0], unconds[0], 7.0, config, APGState(config.momentum), 1.0)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("field,value,allowed", [("threshold_mode", "relative", "absolute, per-element"),
                                                 ("threshold_mode", "Absolute", "absolute, per-element"),
                                                 ("video_mode", "frames", "clip, frame"),
                                                 ("video_mode", "", "clip, frame")])
def test_unknown_modes_are_refused_naming_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field} must be one of {allowed}, not {value!r}"):
        APGConfig(**{field: value})


# The projection primitives per frame (torch path) --------------------------------------------------------------------

FRAME_SHAPES = [(2, 16, 3, 8, 8), (3, 5, 7, 9, 11), (1, 4, 1, 6, 6), (2, 1, 4, 1, 1)]


def float64_frame_dots(x, y):
    """[B·T, 3]: <x,x>, <x,y>, <y,y> of each (sample, frame), sample-major, in float64."""
    xd, yd = x.double(), y.double()
    return torch.stack([torch.einsum("bcthw,bcthw->bt", p, q).reshape(-1) for p, q in ((xd, xd), (xd, yd), (yd, yd))],
                       dim=1)


@pytest.mark.parametrize("shape", FRAME_SHAPES, ids=["x".join(map(str, s)) for s in FRAME_SHAPES])
def test_frame_dots_match_float64_per_sample_and_frame(shape):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x = x * torch.arange(1, shape[0] * shape[2] + 1, dtype=torch.float32).view(shape[0], 1, shape[2], 1, 1)
    dots = sample_dots(x, y, fused=False, frames=True)
    assert dots.shape == (shape[0] * shape[2], 3) and dots.dtype == torch.float64
    assert rel_err(dots, float64_frame_dots(x, y)) < 1e-6
    assert group_count(x, True) == shape[0] * shape[2] and group_elements(x, True) == shape[1] * shape[3] * shape[4]
    assert group_count(x) == shape[0] and group_elements(x) == x[0].numel()
    # a non-contiguous view of the same values gives the same inner products
    xt = x.transpose(3, 4).contiguous().transpose(3, 4)
    assert torch.equal(sample_dots(xt, y, fused=False, frames=True), dots)


@pytest.mark.parametrize("shape", FRAME_SHAPES, ids=["x".join(map(str, s)) for s in FRAME_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frame_combine_matches_float64_per_sample_and_frame(shape, dtype):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    groups = shape[0] * shape[2]
    a = torch.randn(groups, generator=g, dtype=torch.float64)
    b = torch.randn(groups, generator=g, dtype=torch.float64)
    out = combine(x, y, a, b, fused=False, frames=True)
    expected = torch.empty(shape, dtype=torch.float64)
    for i in range(shape[0]):
        for t in range(shape[2]):
            expected[i, :, t] = a[i * shape[2] + t] * x[i, :, t].double() + b[i * shape[2] + t] * y[i, :, t].double()
    assert out.dtype == dtype and out.shape == shape
    assert rel_err(out, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_frames_leave_4d_primitives_unchanged():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(3, 4, 9, 7, generator=g), torch.randn(3, 4, 9, 7, generator=g)
    assert torch.equal(sample_dots(x, y, fused=False, frames=True), sample_dots(x, y, fused=False))
    a, b = torch.randn(3, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    assert torch.equal(combine(x, y, a, b, fused=False, frames=True), combine(x, y, a, b, fused=False))
    assert group_count(x, True) == 3 and group_elements(x, True) == 4 * 9 * 7


@pytest.mark.parametrize("shape,frames,groups", [((2, 4, 3, 5, 5), True, 6), ((2, 4, 3, 5, 5), False, 2),
                                                 ((3, 4, 5, 5), True, 3)])
def test_coefficient_shape_errors_name_the_expected_shape(shape, frames, groups):
    x = torch.randn(shape)
    wrong = torch.ones(shape[0] * shape[2] if groups == shape[0] else shape[0], dtype=torch.float64)
    if wrong.shape == (groups,):
        wrong = torch.ones(groups + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"coefficients must have shape \({groups},\), got \({wrong.shape[0]},\)"):
        combine(x, x, wrong, wrong, fused=False, frames=frames)
    ok = torch.ones(groups, dtype=torch.float64)
    assert torch.equal(combine(x, x, ok, ok, fused=False, frames=frames), 2 * x)
