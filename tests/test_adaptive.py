"""The Adaptive Guidance node inside real ComfyUI sampling: float64 reference of the rule (eps, v and flow models),
per-sample decisions in a batch, the unconditional rows really leaving the model calls, threshold 1 = CFG bit for bit,
isolation between runs, SamplerCustomAdvanced, APG and PAG in both orders, refusals."""

import comfy.samplers
import pytest
import torch

import slim_models
from test_pag_sampling import Spy, rel_err, slim_model

NODE = "GuidanceAdaptiveGuidance"
CFG = 6.0
# On the slim SD1.5 eps model (seed 0, cfg 6) γ = cos(D_c, D_cfg) of the two images at the first call is about
# (0.9903, 0.9917): at the default threshold one switches after the first call, the other after the second.
MIXED = {("sd15", "eps"): 0.991, ("sd15", "v"): None, ("flux", "flow"): None}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ag(comfy, model, threshold=0.991, criterion="cond_cfg"):
    return comfy.NODE_CLASS_MAPPINGS[NODE].execute(model, threshold, criterion).result[0]


def setup(family="sd15", prediction="eps", batch=2):
    model = slim_model(family, prediction)
    positive, negative = slim_models.conditioning(family, batch=batch)
    return model, positive, negative, slim_models.empty_latent(family, batch=batch, height=32, width=32)


class Recorder(Spy):
    """Per call: the input, sigma, the true conditional and unconditional predictions (an unpatched calc_cond_batch
    at the same input, so skipped passes are computed here for the reference) and the guided output; placed around
    the patch as test_pag_sampling's Spy is."""

    def __init__(self):
        self.x, self.sigma, self.cond, self.uncond, self.guided = [], [], [], [], []

    def pre(self, args):
        cond, uncond = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                      {})
        self.x.append(args["input"].double())
        self.sigma.append(float(args["sigma"].max()))
        self.cond.append(cond.double())
        self.uncond.append(uncond.double())
        return args["conds_out"]

    def post(self, args):
        self.guided.append(args["denoised"].double())
        return args["denoised"]


def gammas(rec, scale=CFG, criterion="cond_cfg"):
    out = []
    for x, c, u in zip(rec.x, rec.cond, rec.uncond):
        d_c = c.flatten(1)
        other = (u + scale * (c - u)) if criterion == "cond_cfg" else u
        d_o = other.flatten(1)
        out.append((d_c * d_o).sum(1) / (d_c.norm(dim=1) * d_o.norm(dim=1)))
    return out


class _One:
    def __init__(self, x, c, u):
        self.x, self.cond, self.uncond = [x], [c], [u]


def mixed_threshold(model, positive, negative, latent, criterion="cond_cfg"):
    """A threshold between the two images' γ at the first call of a CFG run: one switches after it, the other not."""
    rec = Recorder()
    slim_models.ksample(rec.around(model, lambda m: m), positive, negative, latent, cfg=CFG, steps=5)
    first = gammas(rec, criterion=criterion)[0]
    assert abs(float(first[0] - first[1])) > 1e-9
    return float(first.mean())


def reference_ag(rec, threshold, scale=CFG, criterion="cond_cfg"):
    """Float64: per sample, CFG until the cosine of its denoised predictions reaches γ̄ at a call, D_c from the next call
    on. Returns (guided per call, switched mask per call)."""
    switched = torch.zeros(rec.x[0].shape[0], dtype=torch.bool)
    outs, masks = [], []
    for x, c, u in zip(rec.x, rec.cond, rec.uncond):
        gamma = gammas(_One(x, c, u), scale, criterion)[0]
        mask = switched.view(-1, *[1] * (c.ndim - 1))
        outs.append(torch.where(mask, c, u + scale * (c - u)))
        masks.append(switched.clone())
        switched = switched | (gamma >= threshold)
    return outs, masks


@pytest.mark.parametrize("family,prediction", list(MIXED), ids=[f"{f}-{p}" for f, p in MIXED])
@pytest.mark.parametrize("criterion", ["cond_cfg", "cond_uncond"])
def test_guided_output_matches_float64_reference(comfy, family, prediction, criterion):
    """Every call's output is the float64 rule on the true predictions, and the two images of the batch switch at
    different calls (a sample that still needs guidance keeps it)."""
    model, positive, negative, latent = setup(family, prediction)
    threshold = mixed_threshold(model, positive, negative, latent, criterion)
    rec = Recorder()
    slim_models.ksample(rec.around(model, lambda m: ag(comfy, m, threshold, criterion)), positive, negative, latent,
                        cfg=CFG, steps=5)
    want, masks = reference_ag(rec, threshold, criterion=criterion)
    assert len(rec.guided) == 5
    for got, expected in zip(rec.guided, want):
        assert rel_err(got, expected) < 1e-5
    assert bool(masks[1].any()) and not bool(masks[1].all()), [m.tolist() for m in masks]


def public_ag(rec, threshold, scale=CFG):
    """asagi4/ComfyUI-Adaptive-Guidance `__init__.py` (`AdaptiveGuider.predict_noise` and `check_similarity`) in
    float64: at a step of timestep ts (σ), if an earlier step set threshold_timestep > ts the step is conditional
    only; else threshold_timestep = 0, CFG, and if cos(D_c, D_u) of the whole batch flattened
    (`cos(cond_pred.reshape(1, -1), uncond_pred.reshape(1, -1))`) ≥ threshold, threshold_timestep = ts.
    Returns the guided prediction per call."""
    threshold_timestep, outs = 0.0, []
    for sigma, c, u in zip(rec.sigma, rec.cond, rec.uncond):
        if threshold_timestep > sigma:
            outs.append(c)
            continue
        threshold_timestep = 0.0
        a, b = c.reshape(1, -1), u.reshape(1, -1)
        if float((a * b).sum() / (a.norm() * b.norm())) >= threshold:
            threshold_timestep = sigma
        outs.append(u + scale * (c - u))
    return outs


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("flux", "flow")])
def test_batch_criterion_is_the_public_implementation(comfy, family, prediction):
    """criterion cond_uncond_batch: every call's output is the public implementations' rule in float64 (one decision
    for the whole batch), at a threshold between the batch cosine and the higher image's own cosine at the second
    call: a per-image rule would switch that image a call earlier than the batch."""
    model, positive, negative, latent = setup(family, prediction)
    rec = Recorder()
    slim_models.ksample(rec.around(model, lambda m: m), positive, negative, latent, cfg=CFG, steps=5)
    batch_gammas = [float(torch.nn.functional.cosine_similarity(c.reshape(1, -1), u.reshape(1, -1)))
                    for c, u in zip(rec.cond, rec.uncond)]
    image_gammas = gammas(rec, criterion="cond_uncond")
    threshold = (batch_gammas[1] + float(image_gammas[1].max())) / 2
    assert float(image_gammas[0].max()) < threshold and batch_gammas[1] < threshold, (batch_gammas, image_gammas)
    rec = Recorder()
    slim_models.ksample(rec.around(model, lambda m: ag(comfy, m, threshold, "cond_uncond_batch")), positive, negative,
                        latent, cfg=CFG, steps=5)
    want = public_ag(rec, threshold)
    switched = [torch.equal(w, c) for w, c in zip(want, rec.cond)]
    assert any(switched) and not all(switched), switched
    for i, (got, expected) in enumerate(zip(rec.guided, want)):
        assert rel_err(got, expected) < 1e-5, f"call {i}: not the public implementations' batch rule"


class RowCounter:
    """The batch rows of every forward of the diffusion model."""

    def __init__(self, monkeypatch, model):
        self.rows = []
        inner = model.model.diffusion_model.forward

        def counting(x, *args, **kwargs):
            self.rows.append(x.shape[0])
            return inner(x, *args, **kwargs)

        monkeypatch.setattr(model.model.diffusion_model, "forward", counting)


def test_unconditional_rows_disappear_after_the_switch(comfy, monkeypatch):
    """Rows the diffusion model's forward sees per call, batch of 2: CFG 4 every call; AG 4 until the first image
    switches, then 2 + 1 (its unconditional row is not computed), then 2 once both have switched."""
    model, positive, negative, latent = setup()
    counter = RowCounter(monkeypatch, model)
    slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=5)
    assert counter.rows == [4] * 5
    counter.rows.clear()
    rec = Recorder()
    patched = ag(comfy, model, MIXED[("sd15", "eps")])
    slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=5)
    # per call: conditional rows of the batch, then the unconditional rows of the images still guided
    assert counter.rows == [4, 2, 1, 2, 2, 2], counter.rows
    counter.rows.clear()
    slim_models.ksample(ag(comfy, model, -1.0), positive, negative, latent, cfg=CFG, steps=5)
    assert counter.rows == [4, 2, 2, 2, 2]
    del rec


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_threshold_one_is_cfg_bit_for_bit(comfy, sampler):
    model, positive, negative, latent = setup()
    cfg = slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=4, sampler=sampler)["samples"]
    never = slim_models.ksample(ag(comfy, model, 1.0), positive, negative, latent, cfg=CFG, steps=4,
                                sampler=sampler)["samples"]
    assert torch.equal(cfg, never)


def test_runs_are_isolated(comfy):
    """Two runs of one patched model give what fresh patches give, and a run on another batch starts afresh."""
    model, positive, negative, latent = setup()
    threshold = MIXED[("sd15", "eps")]
    patched = ag(comfy, model, threshold)
    first = slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=5)["samples"]
    second = slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=5)["samples"]
    fresh = slim_models.ksample(ag(comfy, model, threshold), positive, negative, latent, cfg=CFG, steps=5)["samples"]
    assert torch.equal(first, second) and torch.equal(first, fresh)
    one_pos, one_neg = slim_models.conditioning("sd15", batch=1)
    single = slim_models.empty_latent("sd15", batch=1, height=32, width=32)
    alone = slim_models.ksample(patched, one_pos, one_neg, single, cfg=CFG, steps=5)["samples"]
    fresh_alone = slim_models.ksample(ag(comfy, model, threshold), one_pos, one_neg, single, cfg=CFG,
                                      steps=5)["samples"]
    assert torch.equal(alone, fresh_alone)


def test_sampler_custom_advanced_equals_ksampler(comfy):
    model, positive, negative, latent = setup()
    patched = ag(comfy, model, MIXED[("sd15", "eps")])
    k = slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=4)["samples"]
    custom = slim_models.sample_custom_advanced(patched, positive, negative, latent, cfg=CFG, steps=4)["samples"]
    assert rel_err(custom, k) < 1e-6


def test_cfg_one_passes_through(comfy, monkeypatch):
    """At cfg 1 ComfyUI computes no unconditional pass; AG changes nothing."""
    model, positive, negative, latent = setup()
    plain = slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=3)["samples"]
    patched = slim_models.ksample(ag(comfy, model, -1.0), positive, negative, latent, cfg=1.0, steps=3)["samples"]
    assert torch.equal(plain, patched)


def test_apg_acts_only_on_guided_steps_in_either_order(comfy):
    """APG + AG, both orders: APG's rule (float64, its momentum over the guided calls of each image) on the calls
    before an image switches, D_c after."""
    from apg_reference import paper_apg

    model, positive, negative, latent = setup()
    threshold = MIXED[("sd15", "eps")]
    apg_settings = {"eta": 0.0, "norm_threshold": 1.0, "momentum": -0.5, "sigma_start": 10000.0, "sigma_end": 0.0}

    def apg(m):
        return comfy.NODE_CLASS_MAPPINGS["AdaptiveProjectedGuidance"].execute(m, **apg_settings).result[0]

    results = []
    for order in ("apg-first", "ag-first"):
        rec = Recorder()
        stack = (lambda m: ag(comfy, apg(m), threshold)) if order == "apg-first" else (
            lambda m: apg(ag(comfy, m, threshold)))
        slim_models.ksample(rec.around(model, stack), positive, negative, latent, cfg=CFG, steps=5)
        _, masks = reference_ag(rec, threshold)
        apg_out = paper_apg(rec.cond, rec.uncond, CFG, 0.0, 1.0, -0.5)
        for got, mask, c, a in zip(rec.guided, masks, rec.cond, apg_out):
            want = torch.where(mask.view(-1, 1, 1, 1), c, a)
            assert rel_err(got, want) < 1e-5
        results.append(torch.stack(rec.guided))
    assert rel_err(results[0], results[1]) < 1e-6


@pytest.mark.parametrize("order", ["pag-first", "ag-first"])
def test_pag_perturbed_pass_unaffected(comfy, order):
    """PAG + AG: PAG's term s (D_c − D̂) on every call, on top of CFG before an image switches and D_c after."""
    from test_composition import PAG_REFERENCES, StepSpy, recorded_steps
    from test_pag_sampling import pag

    model, positive, negative, latent = setup()
    threshold = MIXED[("sd15", "eps")]
    stack = (lambda m: ag(comfy, pag(comfy, m, scale=2.5), threshold)) if order == "pag-first" else (
        lambda m: pag(comfy, ag(comfy, m, threshold), scale=2.5))
    spy = StepSpy(PAG_REFERENCES["sd15"])
    slim_models.ksample(spy.around(model, stack), positive, negative, latent, cfg=CFG, steps=5)
    steps = recorded_steps(spy)
    rec = Recorder()
    rec.x = [s.x for s in steps]
    rec.cond = [s.cond for s in steps]
    rec.uncond = [p[1].double() for p in spy.plain]
    _, masks = reference_ag(rec, threshold)
    assert any(bool(m.any()) for m in masks)
    for got, step, uncond, mask in zip(spy.guided, steps, rec.uncond, masks):
        cfg = torch.where(mask.view(-1, 1, 1, 1), step.cond, uncond + CFG * (step.cond - uncond))
        assert rel_err(got, cfg + 2.5 * (step.cond - step.perturbed)) < 1e-5


def test_cfgpp_refuses_ag_naming_both(comfy):
    model = slim_model("sd15", "eps")
    positive, negative = slim_models.conditioning("sd15", batch=2)
    latent = slim_models.empty_latent("sd15", batch=2, height=32, width=32)
    sampler = comfy.NODE_CLASS_MAPPINGS["CFGppSampler"].execute("ddim", 0.6).result[0]
    with pytest.raises(ValueError) as refusal:
        slim_models.sample_custom_advanced(ag(comfy, model), positive, negative, latent, cfg=1.0, steps=3,
                                           sampler=sampler)
    assert "Adaptive Guidance (AG)" in str(refusal.value) and "CFG++ Sampler" in str(refusal.value)


def test_node_validation(comfy):
    node = comfy.NODE_CLASS_MAPPINGS[NODE]
    assert node.validate_inputs(threshold=0.99, criterion="cond_cfg") is True
    for bad in ({"threshold": float("nan")}, {"threshold": 1.5}, {"criterion": "cfg"}):
        message = node.validate_inputs(**({"threshold": 0.99, "criterion": "cond_cfg"} | bad))
        assert isinstance(message, str) and message.startswith("Adaptive Guidance (AG):")
