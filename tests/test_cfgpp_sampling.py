"""The CFG++ nodes inside real ComfyUI sampling: parity with core's `_cfg_pp` samplers, the paper's DDIM update in
float64 on what the sampler saw, inversion and sampling back, and the errors users get."""

import pytest
import torch

import slim_models
import cfgpp_reference
from cfgpp_reference import (ddim_cfgpp_inversion_step, ddim_cfgpp_step, flow_cfgpp_inversion_step, noise_prediction,
                             paper_coefficients)

SAMPLER = "CFGppSampler"
INVERSION = "CFGppDDIMInversion"
SAMPLE_BACK = "CFGppDDIMSampleFromInversion"
LAMBDA = 0.7
# ("euler" is the same sampler as "ddim": the deterministic DDIM step is the Euler step)
CORE = {"ddim": "euler_cfg_pp", "euler_ancestral": "euler_ancestral_cfg_pp", "dpmpp_2m": "dpmpp_2m_cfg_pp",
        "dpmpp_2s_ancestral": "dpmpp_2s_ancestral_cfg_pp"}
# Every core sampler on eps; v and flow, whose samplers see the same denoised predictions, on the first-order ones
# (core's dpmpp_2m_cfg_pp and dpmpp_2s_ancestral_cfg_pp take the eps/v form for flow models too; ours is flow-aware).
PARITY = [("sd15", "eps", method) for method in CORE] + [("sd15", "v", "ddim"), ("flux", "flow", "ddim"),
                                                          ("flux", "flow", "euler_ancestral")]
FAMILY_PREDICTIONS = [("sd15", "eps"), ("sd15", "v"), ("sdxl", "eps"), ("flux", "flow"), ("wan21", "flow")]
# One model of each parameterisation, for the float64 references of every sampler and of inversion.
PARAMETERISATIONS = [("sd15", "eps"), ("sd15", "v"), ("flux", "flow")]


def run(comfy, node_id, *args):
    return comfy.NODE_CLASS_MAPPINGS[node_id].execute(*args).result[0]


def setup(family, prediction, batch=2, seed=0):
    model = slim_models.build_model(family, prediction, seed=seed)
    positive, negative = slim_models.conditioning(family, batch=batch, seed=seed)
    latent = slim_models.empty_latent(family, batch=batch, height=32, width=32)
    return model, positive, negative, latent


def cfgpp(comfy, model, positive, negative, latent, method, guidance=LAMBDA, steps=4, seed=0):
    sampler = run(comfy, SAMPLER, method, guidance)
    return slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=1.0, steps=steps,
                                              sampler=sampler, seed=seed)["samples"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sigmas_of(comfy, model, steps, scheduler="normal"):
    return run(comfy, "BasicScheduler", model, scheduler, steps, 1.0)


class Recorder:
    """A pre-CFG hook that records what each model call saw: state, sigma, conditional and unconditional output."""

    def __init__(self, model):
        self.calls = []
        self.model = model.clone()
        self.model.set_model_sampler_pre_cfg_function(self)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def __call__(self, args):
        cond, uncond = args["conds_out"][:2]
        self.calls.append((args["input"].clone(), float(args["sigma"][0]), cond.clone(), uncond.clone()))
        return args["conds_out"]


class FrozenUncond:
    """A pre-CFG hook that fixes the unconditional prediction to one tensor, so it does not change within a step."""

    def __init__(self, model, shape):
        self.uncond = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        self.model = model.clone()
        self.model.set_model_sampler_pre_cfg_function(self)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        cond = args["conds_out"][0]
        return [cond, self.uncond.to(cond)]


@pytest.mark.parametrize("family,prediction,method", PARITY)
def test_matches_core_cfg_pp_sampler(comfy, family, prediction, method):
    """Our sampler at lambda with cfg 1 is core's `_cfg_pp` sampler at cfg = lambda, to float tolerance. For
    dpmpp_2s_ancestral the unconditional prediction is held fixed: core's last step reads the midpoint's, ours the
    step's own (see `sample_dpmpp_2s_ancestral`), and the two agree when it does not change within a step."""
    model, positive, negative, latent = setup(family, prediction)
    if method == "dpmpp_2s_ancestral":
        model = FrozenUncond(model, latent["samples"].shape).model
    ours = cfgpp(comfy, model, positive, negative, latent, method, steps=4, seed=3)
    core = slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=LAMBDA, steps=4,
                                              sampler=CORE[method], seed=3)["samples"]
    assert torch.isfinite(ours).all()
    assert rel_err(ours, core) < 1e-5


@pytest.mark.parametrize("method", ["dpmpp_2s_ancestral", "dpmpp_2m", "euler_ancestral"])
def test_lambda_zero_is_cores_unguided_sampler(comfy, method):
    """At lambda 0 each sampler is core's sampler of the same name on the unconditional prediction alone."""
    model, positive, negative, latent = setup("sd15", "eps")
    ours = cfgpp(comfy, model, positive, negative, latent, method, guidance=0.0, steps=4, seed=3)
    unguided = slim_models.sample_custom_advanced(model, negative, negative, latent, cfg=1.0, steps=4,
                                                  sampler=method, seed=3)["samples"]
    assert rel_err(ours, unguided) < 1e-5


@pytest.mark.parametrize("family,prediction", FAMILY_PREDICTIONS)
def test_ddim_step_is_the_papers_update_in_float64(comfy, family, prediction):
    """Each step's result is Algorithm 2 in the paper's variables, computed in float64 from what the model saw."""
    model, positive, negative, latent = setup(family, prediction)
    recorder = Recorder(model)
    out = cfgpp(comfy, recorder.model, positive, negative, latent, "ddim", steps=4)
    flow = prediction == "flow"
    states = [x for x, *_ in recorder.calls[1:]] + [model.model.process_latent_in(out)]
    assert len(recorder.calls) == 4 and out.shape[0] == 2
    sigmas = [sigma for _, sigma, *_ in recorder.calls] + [0.0]
    for (x, sigma, cond, uncond), sigma_next, got in zip(recorder.calls, sigmas[1:], states):
        a, s, to_paper = paper_coefficients(sigma, flow)
        if a == 0:  # a flow model's sigma = 1: Tweedie's formula is 0/0 there (its value is the model's D_lambda)
            continue
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, flow)
        z = x.double() * to_paper
        want = ddim_cfgpp_step(z, noise_prediction(z, cond, a, s), noise_prediction(z, uncond, a, s), LAMBDA,
                               a, s, a_next, s_next) / to_paper_next
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"])
@pytest.mark.parametrize("family,prediction", PARAMETERISATIONS)
def test_sampler_is_the_dpm_solver_reference_in_float64(comfy, noise_draws, family, prediction, method):
    """Every model call (midpoints included) and the result are those of the float64 DDIM / DPM-Solver++ reference
    in the paper's variables, run on the predictions the model gave and, for the ancestral samplers, on ComfyUI's
    noise of the run's seed: each factor α' of a flow model's update counts. Five steps, so that 2M's multistep
    term is live on a flow schedule from sigma 1 (whose second step has none)."""
    model, positive, negative, latent = setup(family, prediction)
    recorder = Recorder(model)
    out = cfgpp(comfy, recorder.model, positive, negative, latent, method, steps=5, seed=3)
    flow = prediction == "flow"
    calls = iter(recorder.calls)

    def recorded(z, a, s):
        x, sigma, cond, uncond = next(calls)
        want_x, want_sigma = cfgpp_reference.comfyui_state(z, a, s, flow)
        # (rel 1e-2: in float32 the ancestral split ρ_down = √(ρ'² − ρ_up²) loses digits on steep steps)
        assert sigma == pytest.approx(want_sigma, rel=1e-2) and rel_err(x, want_x) < 1e-5
        return cond.double(), uncond.double()

    sigmas = sigmas_of(comfy, model, 5).tolist()
    z = recorder.calls[0][0].double() * paper_coefficients(sigmas[0], flow)[2]
    want = cfgpp_reference.sample(method, recorded, z, sigmas, LAMBDA, flow, noises=noise_draws)
    assert next(calls, None) is None
    assert rel_err(model.model.process_latent_in(out), want) < 1e-5


@pytest.mark.parametrize("family,prediction", PARAMETERISATIONS)
def test_inversion_step_is_the_reference_update_in_float64(comfy, family, prediction):
    """Each inversion step is the official `ddim_inversion_cfg++` step (eps, v) or its flow form with the velocities
    held (up to sigma 1) in float64, with the network seeing the current state at the next time, as in the official
    code."""
    model, positive, negative, latent = setup(family, prediction)
    flow = prediction == "flow"
    image = torch.randn_like(latent["samples"])
    recorder = Recorder(model)
    sigmas = sigmas_of(comfy, model, 4)
    inverted = run(comfy, INVERSION, recorder.model, positive, negative, {"samples": image}, sigmas, LAMBDA)
    z = model.model.process_latent_in(image).double()
    walk = sigmas.flip(0).tolist()
    assert [sigma for _, sigma, *_ in recorder.calls] == pytest.approx(walk[1:], rel=1e-6)
    for (x_eval, sigma_next, cond, uncond), sigma in zip(recorder.calls, walk):
        a, s, to_paper = paper_coefficients(sigma, flow)
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, flow)
        network_input = x_eval.double() * to_paper_next
        assert rel_err(network_input, z * to_paper) < 1e-6  # the network sees z_{t-1} (paper state) at time t
        x0 = cond.double(), uncond.double()
        eps = [noise_prediction(network_input, d, a_next, s_next) for d in x0]
        if flow:
            velocities = [e - d for e, d in zip(eps, x0)]
            z = flow_cfgpp_inversion_step(z, *velocities, LAMBDA, a, s, a_next, s_next)
        else:
            z = ddim_cfgpp_inversion_step(z * a, *eps, LAMBDA, a, s, a_next, s_next) / a_next
    assert rel_err(model.model.process_latent_in(inverted["samples"]), z) < 1e-5


@pytest.mark.parametrize("family,prediction", [("sdxl", "eps"), ("flux", "flow"), ("wan21", "flow")])
def test_every_sampler_runs_on_the_other_families(comfy, family, prediction):
    model, positive, negative, latent = setup(family, prediction, batch=3)
    methods = ("ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral")
    results = {m: cfgpp(comfy, model, positive, negative, latent, m, steps=4) for m in methods}
    for method, samples in results.items():
        assert samples.shape == latent["samples"].shape and torch.isfinite(samples).all(), method
    assert rel_err(results["dpmpp_2m"], results["ddim"]) > 1e-4  # the multistep correction does something


def test_batch_images_are_independent(comfy):
    """Each image of a batch with different prompts inverts as it does alone (inversion adds no noise, so the
    batch and the single runs see the same inputs)."""
    model, positive, negative, latent = setup("sd15", "eps", batch=2)
    images = torch.randn_like(latent["samples"])
    sigmas = sigmas_of(comfy, model, 3)
    both = run(comfy, INVERSION, model, positive, negative, {"samples": images}, sigmas, LAMBDA)["samples"]
    for i in range(2):
        alone = run(comfy, INVERSION, model, [[positive[0][0][i:i + 1], {}]], [[negative[0][0][i:i + 1], {}]],
                    {"samples": images[i:i + 1]}, sigmas, LAMBDA)["samples"]
        assert rel_err(alone, both[i:i + 1]) < 1e-4


def test_deterministic_seeded_and_guided(comfy):
    """The same seed gives the same images, another seed other ones, another lambda other ones."""
    model, positive, negative, latent = setup("sd15", "eps", batch=1)

    def sample(seed=5, guidance=LAMBDA):
        return cfgpp(comfy, model, positive, negative, latent, "euler_ancestral", guidance, steps=3, seed=seed)

    first = sample()
    assert torch.equal(first, sample())
    assert rel_err(sample(seed=6), first) > 1e-3 and rel_err(sample(guidance=0.1), first) > 1e-3


class ConstantVelocity:
    """A pre-CFG hook that replaces the predictions by D = x − σ(1 + σ)·v with fixed v (one for each prediction):
    their ODE velocity does not depend on x, so inverting and sampling back must reproduce the latent exactly."""

    def __init__(self, model, shape):
        g = torch.Generator().manual_seed(7)
        self.velocities = [torch.randn(shape, generator=g), torch.randn(shape, generator=g)]
        self.model = model.clone()
        self.model.set_model_sampler_pre_cfg_function(self)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        x = args["input"]
        sigma = args["sigma"].reshape(-1, *[1] * (x.ndim - 1))
        return [x - sigma * (1 + sigma) * v.to(x) for v in self.velocities]


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd15", "v"), ("flux", "flow"), ("wan21", "flow")])
def test_inversion_nodes_invert_exactly(comfy, family, prediction):
    """Inversion node then sample-back node reproduce the latent when predictions do not change across a step:
    latent format, state hand-over (flow models up to sigma 1) and the two updates are exact inverses."""
    model, positive, negative, latent = setup(family, prediction)
    image = {"samples": torch.randn_like(latent["samples"])}
    patched = ConstantVelocity(model, image["samples"].shape).model
    sigmas = sigmas_of(comfy, model, 4)
    inverted = run(comfy, INVERSION, patched, positive, negative, image, sigmas, 0.8)
    back = run(comfy, SAMPLE_BACK, patched, positive, negative, inverted, sigmas, 0.8)
    assert torch.isfinite(inverted["samples"]).all()
    assert rel_err(back["samples"], image["samples"]) < 1e-4


def test_editing_samples_back_with_another_prompt(comfy):
    model, positive, negative, latent = setup("sd15", "eps", batch=1)
    target, _ = slim_models.conditioning("sd15", seed=9)
    image = {"samples": torch.randn_like(latent["samples"])}
    sigmas = sigmas_of(comfy, model, 4)
    inverted = run(comfy, INVERSION, model, positive, negative, image, sigmas, 0.6)
    same = run(comfy, SAMPLE_BACK, model, positive, negative, inverted, sigmas, 0.6)["samples"]
    edited = run(comfy, SAMPLE_BACK, model, target, negative, inverted, sigmas, 0.6)["samples"]
    assert torch.isfinite(edited).all() and rel_err(edited, same) > 1e-3


def test_cfg_other_than_one_is_refused_with_the_fix(comfy):
    model, positive, negative, latent = setup("sd15", "eps", batch=1)
    sampler = run(comfy, SAMPLER, "ddim", 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ Sampler: the guider's cfg is 7.*Set cfg to 1.0"):
        slim_models.sample_custom_advanced(model, positive, negative, latent, cfg=7.0, steps=2, sampler=sampler)


def test_guider_without_negative_is_refused(comfy):
    model, positive, _, latent = setup("sd15", "eps", batch=1)
    guider = comfy.NODE_CLASS_MAPPINGS["BasicGuider"].execute(model, positive).result[0]
    sampler = run(comfy, SAMPLER, "dpmpp_2m", 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ Sampler: .*negative"):
        slim_models.sample_custom_advanced(model, positive, None, latent, cfg=1.0, steps=2, sampler=sampler,
                                           guider=guider)


def test_bad_inversion_inputs_are_refused(comfy):
    model, positive, negative, latent = setup("sd15", "eps", batch=1)
    sigmas = sigmas_of(comfy, model, 4)
    image = {"samples": torch.randn_like(latent["samples"])}
    with pytest.raises(ValueError, match="CFG\\+\\+ DDIM Inversion: .*end at sigma 0"):
        run(comfy, INVERSION, model, positive, negative, image, sigmas[:-1], 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ DDIM Inversion: .*decrease"):
        run(comfy, INVERSION, model, positive, negative, image, sigmas.flip(0), 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ DDIM Inversion: .*noise mask"):
        run(comfy, INVERSION, model, positive, negative, {**image, "noise_mask": torch.ones(1, 4, 4)}, sigmas, 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ DDIM Inversion: lambda"):
        run(comfy, INVERSION, model, positive, negative, image, sigmas, 1.5)
    inverted = {**image, "cfgpp_inverted_sigma": float(sigmas[0])}
    with pytest.raises(ValueError, match="CFG\\+\\+ DDIM Sample From Inversion: the latent was inverted to sigma"):
        run(comfy, SAMPLE_BACK, model, positive, negative, inverted, sigmas_of(comfy, model, 4, "karras")[1:], 0.6)
    with pytest.raises(ValueError, match="CFG\\+\\+ Sampler: unknown sampler"):
        run(comfy, SAMPLER, "heun", 0.6)
