"""The optional `mask` input of APG, PAG, EluCD and PPAP (issue 12): a mask of ones is the node as is, bit for bit; a
mask of zeros is the node's neutral point (APG: the conditional prediction; PAG, EluCD and PPAP: the prediction
without their term); a mask in between splits each step's prediction by region, per image of a batch; masks of another
size are resized to the latent, a batch of masks that fits neither one nor the batch is refused naming the node. And
the saliency nodes that make such masks from markers."""

import pytest
import torch

import slim_models
from comfyui_guidance.guiders.elucd import EluCDConfig
from comfyui_guidance.nodes.classifier_patch import ClassifierTargets
from comfyui_guidance.nodes.elucd_patch import apply_elucd
from comfyui_guidance.nodes.ppap_patch import apply_ppap
from ppap_stacked import made_experts
from test_elucd_sampling import latent_classifier
from test_pag_sampling import apg, pag, rel_err, setup

CFG = 5.0


def elucd(comfy, model, mask=None):
    return apply_elucd(model, ClassifierTargets(latent_classifier(model.model.latent_format.latent_channels), (1, 3)),
                       EluCDConfig(scale=2000.0), mask=mask)  # large: the slim latents move little at the first step


PPAP_TARGETS = (2, 0)


def ppap(comfy, model, mask=None):
    experts = made_experts(model, 2, model.model.latent_format.latent_channels)
    return apply_ppap(model, experts, ClassifierTargets(experts.classifier, PPAP_TARGETS), 1.0, mask=mask)


METHODS = {  # name: (apply with an optional mask, the neutral model it must equal under a mask of zeros, its cfg)
    "APG": (lambda comfy, m, mask=None: apg(comfy, m, norm_threshold=1.0, mask=mask), 1.0),
    "PAG": (lambda comfy, m, mask=None: pag(comfy, m, scale=3.0, mask=mask), CFG),
    "EluCD": (elucd, CFG),
    "PPAP": (ppap, CFG),
}


class FirstStep:
    """Post-CFG hook placed after the patches: the guided prediction of each model call."""

    def __init__(self):
        self.guided = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        self.guided.append(args["denoised"].clone())
        return args["denoised"]

    def around(self, model):
        recorded = model.clone()
        recorded.set_model_sampler_post_cfg_function(self)
        return recorded


def run(model, positive, negative, latent, cfg=CFG, steps=3):
    recorder = FirstStep()
    samples = slim_models.ksample(recorder.around(model), positive, negative, latent, cfg=cfg, steps=steps,
                                  sampler="euler")["samples"]
    return samples, recorder.guided


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("flux", "flow")])
@pytest.mark.parametrize("method", list(METHODS))
def test_ones_are_the_node_and_zeros_its_neutral_point(comfy, method, family, prediction):
    apply, neutral_cfg = METHODS[method]
    model, positive, negative, latent = setup(family, prediction, batch=2)
    size = latent["samples"].shape[-1] * 8
    plain, _ = run(apply(comfy, model), positive, negative, latent)
    ones, _ = run(apply(comfy, model, torch.ones(1, size, size)), positive, negative, latent)
    assert torch.equal(ones, plain)
    zeros, _ = run(apply(comfy, model, torch.zeros(1, size, size)), positive, negative, latent)
    # APG's neutral point is the conditional model (cfg 1: a batch without the unconditional rows, hence float
    # tolerance); PAG's, EluCD's and PPAP's is the model without them at the same cfg
    neutral, _ = run(model, positive, negative, latent, cfg=neutral_cfg)
    assert rel_err(zeros, neutral) < 1e-5
    assert rel_err(plain, neutral) > 1e-3  # the method does something here


@pytest.mark.parametrize("method", list(METHODS))
def test_a_mask_splits_each_image_by_region(comfy, method):
    """Image 0 guided on its left half only, image 1 not at all, masks at twice the image size: the first step's
    prediction is the method's where the weight is 1 (bit for bit) and the neutral point's where it is 0 (to float
    tolerance: PAG's perturbed pass shares the model batch, which moves the other rows by rounding)."""
    apply, neutral_cfg = METHODS[method]
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    size = latent["samples"].shape[-1] * 8
    masks = torch.zeros(2, 2 * size, 2 * size)
    masks[0, :, :size] = 1
    # two steps: EluCD adds nothing at a run's last step (σ' = 0), so the first of two is compared
    _, full = run(apply(comfy, model), positive, negative, latent, steps=2)
    _, neutral = run(model, positive, negative, latent, cfg=neutral_cfg, steps=2)
    _, split = run(apply(comfy, model, masks), positive, negative, latent, steps=2)
    half = latent["samples"].shape[-1] // 2
    assert torch.equal(split[0][0, ..., :half], full[0][0, ..., :half])
    if method == "APG":  # the conditional prediction of the CFG run, not of a cfg-1 run
        assert not torch.equal(split[0][0, ..., half:], full[0][0, ..., half:])
    else:
        assert rel_err(split[0][0, ..., half:], neutral[0][0, ..., half:]) < 1e-5
        assert rel_err(split[0][1], neutral[0][1]) < 1e-5
        assert rel_err(full[0][1], neutral[0][1]) > 1e-3


def test_apg_mask_zero_hands_cfg_the_conditional_prediction(comfy):
    """APG's neutral point within a CFG run: where the weight is 0, the CFG step gets D_c as the unconditional
    prediction, so the guided prediction is D_c of that very call."""
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    size = latent["samples"].shape[-1] * 8
    conds = []

    def record(args):
        conds.append(args["conds_out"][0].clone())
        return args["conds_out"]

    recorded = model.clone()
    recorded.set_model_sampler_pre_cfg_function(record)
    _, guided = run(apg(comfy, recorded, norm_threshold=1.0, mask=torch.zeros(2, size, size)), positive, negative,
                    latent, steps=1)
    assert torch.equal(guided[0], conds[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_a_mask_batch_that_fits_nothing_is_refused(comfy, method):
    apply, _ = METHODS[method]
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    with pytest.raises(ValueError, match="mask has 3 images for a latent batch of 2: give 1"):
        run(apply(comfy, model, torch.ones(3, 32, 32)), positive, negative, latent, steps=1)


def test_video_latent_takes_one_mask_for_every_frame(comfy):
    model, positive, negative, latent = setup("wan21", batch=1)
    size = latent["samples"].shape[-1] * 8
    plain, _ = run(apg(comfy, model, norm_threshold=1.0), positive, negative, latent, steps=2)
    ones, _ = run(apg(comfy, model, norm_threshold=1.0, mask=torch.ones(1, size, size)), positive, negative,
                  latent, steps=2)
    half = torch.ones(1, size, size)
    half[:, :, size // 2:] = 0
    split, _ = run(apg(comfy, model, norm_threshold=1.0, mask=half), positive, negative, latent, steps=2)
    assert latent["samples"].ndim == 5 and torch.equal(ones, plain) and not torch.equal(split, plain)


def test_saliency_nodes_make_a_map_from_points(comfy):
    points = comfy.NODE_CLASS_MAPPINGS["GuidanceSaliencyMarkersFromPoints"]
    saliency = comfy.NODE_CLASS_MAPPINGS["GuidanceSaliencyMap"]
    [markers] = points.execute("16,8; 40,50", 64, 56).result
    assert markers.shape == (1, 56, 64) and markers.sum() == 2 and markers[0, 8, 16] == 1
    smap, preview = saliency.execute(markers, 0.25, 0.05).result
    assert smap.shape == (1, 56, 64) and preview.shape == (1, 56, 64, 3)
    assert float(smap.max()) == pytest.approx(1.0) and smap[0, 8, 16] > 0.9 and smap[0, 30, 5] < smap[0, 8, 16]
    assert float(smap[0, 55, 0]) == 0.0  # beyond the radius (14 px) and the filter's reach from both markers
    assert torch.equal(preview[..., 0], smap)
    floored, _ = saliency.execute(markers, 0.25, 0.05, 0.3).result
    assert torch.allclose(floored, 0.3 + 0.7 * smap) and float(floored.min()) == pytest.approx(0.3)
    assert "Saliency Markers From Points: points: marker 70,10 lies outside the 64x56 image" in points.validate_inputs(
        points="70,10", width=64, height=56)
    with pytest.raises(ValueError, match="Saliency Map From Markers: image 0 of the batch has no marker"):
        saliency.execute(torch.zeros(1, 8, 8), 0.25, 0.05)
