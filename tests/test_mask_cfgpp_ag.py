"""The optional mask of the CFG++ Sampler, Adaptive Guidance and LinearAG inside real ComfyUI sampling: weight 1 is the
node as is (bit for bit), weight 0 the method's neutral point (CFG++: the plain conditional sampler; AG / LinearAG:
the conditional prediction), weights between interpolate per latent position; one mask for every image, one per image,
resized by area; a mask batch that fits neither is refused naming the node. Eps and flow models, and a video latent.

References are float64 and written from the methods' own definitions: `cfgpp_reference` (the paper's variables) run
on the recorded predictions, with the conditional prediction in place of the unconditional one where the weight is 0;
AG's rule on the true predictions of every call (test_adaptive's recorder), guided as D_c + (w − 1) m (D_c − D_u);
the mask's latent weights as the mean of each latent cell's pixels, computed here."""

import gc

import comfy.model_management
import pytest
import torch

import cfgpp_reference
import slim_models
from cfgpp_reference import ddim_cfgpp_step, noise_prediction, paper_coefficients
from test_adaptive import CFG, Recorder as AGRecorder, ag, mixed_threshold, one_torch_thread  # noqa: F401 (autouse)
from test_adaptive import reference_ag
from test_cfgpp_sampling import LAMBDA, FrozenUncond, Recorder, rel_err, run, sigmas_of

SAMPLER = "CFGppSampler"
LINEAR = "GuidanceLinearAG"
METHODS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral")
SIZE = 32  # image pixels: a 4 x 4 latent, whose left two columns are the image's left half


# Masks and their latent weights --------------------------------------------------------------------------------------


def half_mask(batch=1, size=SIZE):
    """1 on the left half of the image, 0 on the right."""
    mask = torch.zeros(batch, size, size)
    mask[..., : size // 2] = 1.0
    return mask


def random_mask(batch, height, width, seed):
    return torch.rand(batch, height, width, generator=torch.Generator().manual_seed(seed))


def area_weights(mask, latent):
    """The latent weights of a MASK [M, H, W] whose sides are whole multiples of the latent's: each latent cell's mean
    over its pixels, shaped [M, 1, (1,) h, w] to broadcast over channels (and frames)."""
    h, w = latent.shape[-2:]
    m = mask.double()
    cells = m.view(m.shape[0], h, m.shape[1] // h, w, m.shape[2] // w).mean(dim=(2, 4)).unsqueeze(1)
    return cells.unsqueeze(2) if latent.ndim == 5 else cells


def left(t):
    return t[..., : t.shape[-1] // 2]


def right(t):
    return t[..., t.shape[-1] // 2:]


# CFG++ ----------------------------------------------------------------------------------------------------------------


def setup(family, prediction, batch=2, seed=0):
    model = slim_models.build_model(family, prediction, seed=seed)
    positive, negative = slim_models.conditioning(family, batch=batch, seed=seed)
    latent = slim_models.empty_latent(family, batch=batch, height=SIZE, width=SIZE)
    return model, positive, negative, latent


def cfgpp(comfy, model, positive, negative, latent, method, mask=None, steps=4, seed=3):
    sampler = comfy.NODE_CLASS_MAPPINGS[SAMPLER].execute(method, LAMBDA, mask=mask).result[0] if mask is not None \
        else run(comfy, SAMPLER, method, LAMBDA)
    return slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=1.0, steps=steps,
                                              sampler=sampler, seed=seed)["samples"]


MODELS = {("sd15", "eps"): None, ("flux", "flow"): None}


@pytest.fixture(autouse=True, scope="module")
def release_models():
    """Drops the module's models at its end: ComfyUI's model management warns of a leak, in whatever test loads a
    model next, while a model it loaded (through a clone) is still held here."""
    yield
    MODELS.update(dict.fromkeys(MODELS))
    gc.collect()
    comfy.model_management.cleanup_models_gc()


def model_of(family, prediction):
    """One slim model per family for the module (a model's first load is the slowest part on CPU)."""
    if MODELS.get((family, prediction)) is None:
        MODELS[(family, prediction)] = slim_models.build_model(family, prediction)
    return MODELS[(family, prediction)]


def cfgpp_setup(family, prediction, batch=2):
    positive, negative = slim_models.conditioning(family, batch=batch)
    return model_of(family, prediction), positive, negative, slim_models.empty_latent(family, batch=batch,
                                                                                       height=SIZE, width=SIZE)


CFGPP_CASES = [("sd15", "eps", m) for m in METHODS] + [("flux", "flow", m) for m in METHODS]


@pytest.mark.parametrize("family,prediction,method", CFGPP_CASES, ids=[f"{f}-{m}" for f, _, m in CFGPP_CASES])
def test_cfgpp_mask_of_ones_is_the_sampler_bit_for_bit(comfy, family, prediction, method):
    model, positive, negative, latent = cfgpp_setup(family, prediction)
    plain = cfgpp(comfy, model, positive, negative, latent, method)
    ones = cfgpp(comfy, model, positive, negative, latent, method, mask=torch.ones(1, SIZE, SIZE))
    assert torch.equal(plain, ones)
    # an [H, W] mask (no batch dimension) and one per image are the same weights
    assert torch.equal(plain, cfgpp(comfy, model, positive, negative, latent, method, mask=torch.ones(SIZE, SIZE)))
    assert torch.equal(plain, cfgpp(comfy, model, positive, negative, latent, method,
                                    mask=torch.ones(2, 2 * SIZE, 2 * SIZE)))


def replay(comfy, model, method, recorder, out, weight, flow, noises, steps=5):
    """(the sampler's result in the paper's variables, cfgpp_reference's float64 result on the recorded predictions
    with the unconditional prediction D_c + m (D_u − D_c), i.e. D_c where m = 0 and D_u where m = 1, and on the
    run's `noises`)."""
    calls = iter(recorder.calls)

    def recorded(z, a, s):
        x, sigma, cond, uncond = next(calls)
        want_x, want_sigma = cfgpp_reference.comfyui_state(z, a, s, flow)
        assert sigma == pytest.approx(want_sigma, rel=1e-2) and rel_err(x, want_x) < 1e-5
        cond, uncond = cond.double(), uncond.double()
        return cond, cond + weight * (uncond - cond)

    sigmas = sigmas_of(comfy, model, steps).tolist()
    z = recorder.calls[0][0].double() * paper_coefficients(sigmas[0], flow)[2]
    want = cfgpp_reference.sample(method, recorded, z, sigmas, LAMBDA, flow, noises=noises)
    assert next(calls, None) is None
    return model.model.process_latent_in(out), want


@pytest.mark.parametrize("family,prediction,method", CFGPP_CASES, ids=[f"{f}-{m}" for f, _, m in CFGPP_CASES])
def test_cfgpp_mask_of_zeros_is_the_conditional_sampler_in_float64(comfy, noise_draws, family, prediction, method):
    """Mask 0: every step denoises and renoises with the conditional prediction (the float64 reference with D_u
    replaced by D_c); five steps, so that 2M's history term is live on a flow schedule too."""
    model, positive, negative, latent = cfgpp_setup(family, prediction)
    recorder = Recorder(model)
    out = cfgpp(comfy, recorder.model, positive, negative, latent, method, mask=torch.zeros(1, SIZE, SIZE), steps=5)
    got, want = replay(comfy, model, method, recorder, out, 0.0, prediction == "flow", noise_draws)
    assert rel_err(got, want) < 1e-5
    plain = cfgpp(comfy, model, positive, negative, latent, method, steps=5)
    assert rel_err(out, plain) > 1e-4  # the mask did something (the slim models' D_c and D_u are close)


@pytest.mark.parametrize("method", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"])
def test_cfgpp_mask_of_zeros_is_cores_conditional_sampler(comfy, method):
    """Mask 0 on an eps model: core's sampler of the same name at cfg 1 (the conditional prediction alone)."""
    model, positive, negative, latent = cfgpp_setup("sd15", "eps")
    ours = cfgpp(comfy, model, positive, negative, latent, "ddim" if method == "euler" else method,
                 mask=torch.zeros(1, SIZE, SIZE))
    core = slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=1.0, steps=4, sampler=method,
                                              seed=3)["samples"]
    assert rel_err(ours, core) < 1e-5


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("flux", "flow"), ("wan21", "flow")])
def test_cfgpp_half_mask_each_ddim_step_is_cfgpp_left_and_conditional_right(comfy, family, prediction):
    """Per step, from the state and predictions the step saw: the left half is Algorithm 2 (denoise with x̂_λ,
    renoise with ε̂_∅), the right half the conditional DDIM step (ε̂_c in both places). The video latent takes one
    mask for all its frames. The unconditional prediction is a fixed random tensor (a pre-CFG hook before the
    recorder), so that the two rules differ by far more than float32 rounding (the slim models' D_u is close to D_c)."""
    model, positive, negative, latent = (setup(family, prediction) if family == "wan21"
                                         else cfgpp_setup(family, prediction))
    recorder = Recorder(FrozenUncond(model, latent["samples"].shape).model)
    out = cfgpp(comfy, recorder.model, positive, negative, latent, "ddim", mask=half_mask())
    flow = prediction == "flow"
    states = [x for x, *_ in recorder.calls[1:]] + [model.model.process_latent_in(out)]
    sigmas = [sigma for _, sigma, *_ in recorder.calls] + [0.0]
    checked = 0
    for (x, sigma, cond, uncond), sigma_next, got in zip(recorder.calls, sigmas[1:], states):
        a, s, to_paper = paper_coefficients(sigma, flow)
        if a == 0:  # a flow model's sigma 1 (see test_cfgpp_sampling)
            continue
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, flow)
        z = x.double() * to_paper
        eps_c, eps_u = noise_prediction(z, cond, a, s), noise_prediction(z, uncond, a, s)
        guided = ddim_cfgpp_step(z, eps_c, eps_u, LAMBDA, a, s, a_next, s_next) / to_paper_next
        conditional = ddim_cfgpp_step(z, eps_c, eps_c, LAMBDA, a, s, a_next, s_next) / to_paper_next
        assert rel_err(left(got), left(guided)) < 1e-5 and rel_err(right(got), right(conditional)) < 1e-5
        assert rel_err(right(guided), right(conditional)) > 1e-3  # the two halves' rules differ here
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("family,prediction,method", [("sd15", "eps", "dpmpp_2m"), ("sd15", "eps", "euler_ancestral"),
                                                      ("flux", "flow", "dpmpp_2s_ancestral"),
                                                      ("flux", "flow", "dpmpp_2m")])
def test_cfgpp_per_image_masks_resized_by_area_match_float64(comfy, noise_draws, family, prediction, method):
    """A batch of 2 with a mask per image at twice the image's size, random weights in [0, 1]: the float64 reference
    with each position's unconditional prediction D_c + m (D_u − D_c), m the mean of the mask's pixels over the
    latent cell; the two images' weights differ."""
    model, positive, negative, latent = cfgpp_setup(family, prediction)
    mask = random_mask(2, 2 * SIZE, 2 * SIZE, seed=4)
    recorder = Recorder(model)
    out = cfgpp(comfy, recorder.model, positive, negative, latent, method, mask=mask, steps=5)
    got, want = replay(comfy, model, method, recorder, out, area_weights(mask, latent["samples"]),
                       prediction == "flow", noise_draws)
    assert rel_err(got, want) < 1e-4


def test_cfgpp_images_of_a_batch_take_their_own_masks(comfy):
    """Masks (ones, zeros) on a batch of 2: image 0 is the unmasked run's image 0, image 1 the all-zeros run's."""
    model, positive, negative, latent = cfgpp_setup("sd15", "eps")
    both = cfgpp(comfy, model, positive, negative, latent, "euler_ancestral",
                 mask=torch.stack([torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)]))
    ones = cfgpp(comfy, model, positive, negative, latent, "euler_ancestral")
    zeros = cfgpp(comfy, model, positive, negative, latent, "euler_ancestral", mask=torch.zeros(1, SIZE, SIZE))
    assert rel_err(both[:1], ones[:1]) < 1e-6 and rel_err(both[1:], zeros[1:]) < 1e-6
    assert rel_err(ones[1:], zeros[1:]) > 1e-3


def test_cfgpp_mask_batch_that_fits_neither_is_refused(comfy):
    model, positive, negative, latent = cfgpp_setup("sd15", "eps")
    with pytest.raises(ValueError, match="CFG\\+\\+ Sampler: mask has 3 images for a latent batch of 2: give 1"):
        cfgpp(comfy, model, positive, negative, latent, "ddim", mask=torch.ones(3, SIZE, SIZE))


def test_cfgpp_video_mask_of_ones_is_bit_for_bit(comfy):
    model, positive, negative, latent = setup("wan21", "flow")
    plain = cfgpp(comfy, model, positive, negative, latent, "dpmpp_2m")
    assert torch.equal(plain, cfgpp(comfy, model, positive, negative, latent, "dpmpp_2m", mask=torch.ones(1, 8, 8)))


# Adaptive Guidance and LinearAG ---------------------------------------------------------------------------------------


def ag_setup(family="sd15", prediction="eps", batch=2):
    positive, negative = slim_models.conditioning(family, batch=batch)
    model = model_of(family, prediction) if (family, prediction) in MODELS else slim_models.build_model(family,
                                                                                                      prediction)
    return model, positive, negative, slim_models.empty_latent(family, batch=batch, height=SIZE, width=SIZE)


def ag_masked(comfy, model, threshold, mask):
    return comfy.NODE_CLASS_MAPPINGS["GuidanceAdaptiveGuidance"].execute(model, threshold, "cond_cfg",
                                                                         mask=mask).result[0]


def masked_cfg(cond, uncond, weight, switched):
    """AG with a weight, float64: D_c for switched images, D_c + (w − 1) m (D_c − D_u) otherwise."""
    out = cond + (CFG - 1) * weight * (cond - uncond)
    return torch.where(switched.view(-1, *[1] * (cond.ndim - 1)), cond, out)


def test_ag_mask_of_ones_is_bit_for_bit(comfy):
    model, positive, negative, latent = ag_setup()
    threshold = mixed_threshold(model, positive, negative, latent)
    for t in (threshold, 1.0):
        plain = slim_models.ksample(ag(comfy, model, t), positive, negative, latent, cfg=CFG, steps=5)["samples"]
        ones = slim_models.ksample(ag_masked(comfy, model, t, torch.ones(1, SIZE, SIZE)), positive, negative, latent,
                                   cfg=CFG, steps=5)["samples"]
        assert torch.equal(plain, ones)


def test_ag_mask_of_zeros_is_the_conditional_model(comfy):
    model, positive, negative, latent = ag_setup()
    zeros = slim_models.ksample(ag_masked(comfy, model, 0.991, torch.zeros(1, SIZE, SIZE)), positive, negative,
                                latent, cfg=CFG, steps=5)["samples"]
    conditional = slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=5)["samples"]
    guided = slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=5)["samples"]
    assert rel_err(zeros, conditional) < 1e-5 and rel_err(guided, conditional) > 1e-3


AG_CASES = [("sd15", "eps", "mixed"), ("sd15", "eps", 1.0), ("flux", "flow", "mixed"), ("wan21", "flow", 0.991)]


@pytest.mark.parametrize("family,prediction,threshold", AG_CASES, ids=[f"{f}-{t}" for f, _, t in AG_CASES])
def test_ag_half_mask_per_call(comfy, family, prediction, threshold):
    """Each call's guided prediction with the half mask: AG's result (CFG until the image switches, decided on the
    unweighted predictions) on the left, D_c on the right. The images switch at different calls where `mixed`;
    threshold 1 never switches (the mask still acts); the video latent takes one mask for every frame."""
    model, positive, negative, latent = ag_setup(family, prediction)
    if threshold == "mixed":
        threshold = mixed_threshold(model, positive, negative, latent)
    rec = AGRecorder()
    slim_models.ksample(rec.around(model, lambda m: ag_masked(comfy, m, threshold, half_mask())), positive, negative,
                        latent, cfg=CFG, steps=5)
    unweighted, switched = reference_ag(rec, threshold)
    assert len(rec.guided) == 5
    for got, want, c, mask in zip(rec.guided, unweighted, rec.cond, switched):
        assert rel_err(left(got), left(want)) < 1e-5
        assert rel_err(right(got), right(c)) < 1e-5
    if family != "wan21":
        assert any(bool(m.any()) and not bool(m.all()) for m in switched) or threshold == 1.0


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("flux", "flow")])
def test_ag_per_image_masks_resized_by_area(comfy, family, prediction):
    """A mask per image at twice the image's size, random weights: every call is D_c + (w − 1) m (D_c − D_u) with
    m the mean over each latent cell, D_c for switched images."""
    model, positive, negative, latent = ag_setup(family, prediction)
    threshold = mixed_threshold(model, positive, negative, latent)
    mask = random_mask(2, 2 * SIZE, 2 * SIZE, seed=5)
    rec = AGRecorder()
    slim_models.ksample(rec.around(model, lambda m: ag_masked(comfy, m, threshold, mask)), positive, negative, latent,
                        cfg=CFG, steps=5)
    _, switched = reference_ag(rec, threshold)
    weight = area_weights(mask, latent["samples"])
    for got, c, u, s in zip(rec.guided, rec.cond, rec.uncond, switched):
        assert rel_err(got, masked_cfg(c, u, weight, s)) < 1e-5


def test_ag_mask_batch_that_fits_neither_is_refused(comfy):
    model, positive, negative, latent = ag_setup()
    with pytest.raises(ValueError, match=r"Adaptive Guidance \(AG\): mask has 3 images for a latent batch of 2: "
                                         "give 1"):
        slim_models.ksample(ag_masked(comfy, model, 0.991, torch.ones(3, SIZE, SIZE)), positive, negative, latent,
                            cfg=CFG, steps=2)


@pytest.fixture(scope="module")
def linear_node(comfy, tmp_path_factory):
    """The LinearAG node with coefficients fitted for the slim SD1.5 model, 4 euler steps (call 1 is estimated),
    saved where the node finds them."""
    import folder_paths
    from comfyui_guidance.nodes.adaptive_patch import COEFFICIENTS_FOLDER, fit_linear_ag

    model, positive, negative, latent = ag_setup()
    fitted = fit_linear_ag(model, positive, negative, latent["samples"], "euler", "normal", 4, CFG, 3, images=2,
                           batch=2)
    folder = tmp_path_factory.mktemp("linear_ag")
    fitted.save(folder / "mask_test.safetensors")
    folder_paths.add_model_folder_path(COEFFICIENTS_FOLDER, str(folder))
    node = comfy.NODE_CLASS_MAPPINGS[LINEAR]

    def apply(m, threshold, mask=None):
        return node.execute(m, "mask_test.safetensors", threshold, "cond_cfg", mask=mask).result[0]

    return apply, fitted


def test_linear_ag_mask_of_ones_is_bit_for_bit(comfy, linear_node):
    apply, _ = linear_node
    model, positive, negative, latent = ag_setup()
    for threshold in (0.991, 1.0):
        plain = slim_models.ksample(apply(model, threshold), positive, negative, latent, cfg=CFG, steps=4)["samples"]
        ones = slim_models.ksample(apply(model, threshold, torch.ones(1, SIZE, SIZE)), positive, negative, latent,
                                   cfg=CFG, steps=4)["samples"]
        assert torch.equal(plain, ones)


def test_linear_ag_mask_weights_the_estimate(comfy, linear_node):
    """Threshold 1 (estimates only), a half mask for image 0 and a random one for image 1: at the estimated call 1
    CFG's unconditional prediction is the float64 estimate x − σ (a ε_c(1) + b ε_c(0) + c ε_u(0)) from the true,
    unweighted predictions, weighted like a real pass: D_c + (w − 1) m (D_c − D̂_u); mask 0 is the conditional model."""
    apply, fitted = linear_node
    model, positive, negative, latent = ag_setup()
    mask = torch.stack([half_mask()[0], random_mask(1, SIZE, SIZE, seed=6)[0]])
    weight = area_weights(mask, latent["samples"])
    rec = AGRecorder()
    slim_models.ksample(rec.around(model, lambda m: apply(m, 1.0, mask)), positive, negative, latent, cfg=CFG, steps=4)
    assert len(rec.guided) == 4
    no_switch = torch.zeros(2, dtype=torch.bool)
    for i, (x, cond, uncond, got) in enumerate(zip(rec.x, rec.cond, rec.uncond, rec.guided)):
        if i == 1:
            a, b, c = fitted.coefficients[i].tolist()
            eps = [(rec.x[j] - d) / rec.sigma[j] for j, d in ((1, cond), (0, rec.cond[0]), (0, rec.uncond[0]))]
            estimate = x - rec.sigma[i] * (a * eps[0] + b * eps[1] + c * eps[2])
            assert rel_err(estimate, uncond) > 1e-6
            uncond = estimate
        assert rel_err(got, masked_cfg(cond, uncond, weight, no_switch)) < 1e-4, f"call {i}"
    zeros = slim_models.ksample(apply(model, 0.991, torch.zeros(1, SIZE, SIZE)), positive, negative, latent, cfg=CFG,
                                steps=4)["samples"]
    conditional = slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=4)["samples"]
    assert rel_err(zeros, conditional) < 1e-5


def test_mask_inputs_are_optional_and_say_what_0_and_1_mean(comfy):
    for node_id in (SAMPLER, "GuidanceAdaptiveGuidance", LINEAR):
        schema = comfy.NODE_CLASS_MAPPINGS[node_id].define_schema()
        [mask] = [i for i in schema.inputs if i.id == "mask"]
        assert mask.optional and "1 = " in mask.tooltip and "0 = " in mask.tooltip
