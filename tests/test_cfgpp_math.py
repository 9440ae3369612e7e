"""CFG++ samplers and inversion (`guiders/cfgpp.py`) on analytic denoisers: the paper's update in float64, the
exact λ ↔ CFG-scale correspondence, exact inversion, flow models from σ = 1, and the ODE the samplers share."""

import math

import pytest
import torch

from comfyui_guidance.guiders import cfgpp
from comfyui_guidance.guiders.cfgpp import Denoised, SigmaSpace

import cfgpp_reference
from cfgpp_reference import (ddim_cfgpp_inversion_step, ddim_cfgpp_step, flow_cfgpp_inversion_step, noise_prediction,
                             paper_coefficients)

SPACES = {"eps_v": SigmaSpace(flow=False), "flow": SigmaSpace(flow=True)}
SAMPLERS = ["ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"]


class GaussianData:
    """Exact denoisers of Gaussian data, x0 ~ N(μ, s²) per element: D(x, σ) = μ + α s² / (α² s² + σ²) (x − α μ).
    The conditional and unconditional distributions differ in mean and spread, so the guidance term depends on x."""

    def __init__(self, space, dim=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.space = space
        self.mean_cond, self.mean_uncond = torch.randn(dim, generator=g) * 0.8, torch.randn(dim, generator=g) * 0.2
        self.std_cond, self.std_uncond = 0.4, 1.0

    def _denoise(self, x, sigma, mean, std):
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        alpha = self.space.alpha(sigma)
        mean = mean.to(x.dtype)
        return mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x - alpha * mean)

    def __call__(self, x, sigma, **extra_args):
        return Denoised(self._denoise(x, sigma, self.mean_cond, self.std_cond),
                        self._denoise(x, sigma, self.mean_uncond, self.std_uncond))

    def conditional(self, x, sigma, **extra_args):
        """The conditional distribution's denoiser as both predictions: sampling it at any λ is unguided."""
        cond = self._denoise(x, sigma, self.mean_cond, self.std_cond)
        return Denoised(cond, cond)

    def conditional_ode_solution(self, x, sigma, sigma_next):
        """The probability-flow ODE of the conditional data from (x, σ) to σ' in closed form: in VE form y = x/α,
        ρ = σ/α it is dy/dρ = (y − D)/ρ, solved by y − μ ∝ √(s² + ρ²)."""
        alpha, alpha_next = self.space.alpha(sigma), self.space.alpha(sigma_next)
        rho, rho_next = sigma / alpha, sigma_next / alpha_next
        spread = ((self.std_cond**2 + rho_next**2) / (self.std_cond**2 + rho**2)).sqrt()
        mean = self.mean_cond.to(x.dtype)
        return alpha_next * (mean + (x / alpha - mean) * spread)

    def start(self, sigma, batch=3, seed=1):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, len(self.mean_cond), generator=g, dtype=torch.float64)
        return (noise if self.space.flow else noise * sigma).float()


class ConstantVelocity:
    """Denoisers whose ODE velocity does not depend on x: D = x − σ·v(σ) with fixed v for each prediction."""

    def __init__(self, dim=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.v_cond, self.v_uncond = torch.randn(dim, generator=g), torch.randn(dim, generator=g)

    def __call__(self, x, sigma, **extra_args):
        sigma = sigma.reshape(-1, 1).to(x.dtype)
        scale = 1 + sigma  # any smooth function of sigma alone
        return Denoised(x - sigma * scale * self.v_cond, x - sigma * scale * self.v_uncond)


def schedule(space, steps):
    """Decreasing sigmas ending at 0: log-spaced for eps/v (SD's range), linear from 1 for flow."""
    if space.flow:
        return torch.linspace(1.0, 0.0, steps + 1)
    return torch.cat([torch.logspace(math.log10(14.6), math.log10(0.03), steps), torch.zeros(1)])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sample(name, model, x, sigmas, space, **options):
    return cfgpp.SAMPLERS[name](model, x, sigmas, disable=True, space=space, **options)


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
def test_ddim_matches_float64_paper_algorithm(space):
    """sample_ddim in float32 against Algorithm 2 in the paper's variables (x_t = a x0 + s ε) in float64."""
    model = GaussianData(space)
    sigmas = schedule(space, 12)
    x = model.start(float(sigmas[0]))
    ours = sample("ddim", model, x, sigmas, space, guidance=0.6)
    z = x.double() * paper_coefficients(sigmas[0], space.flow)[2]
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        a, s, to_paper = paper_coefficients(sigma, space.flow)
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, space.flow)
        pred = model(z / to_paper, torch.tensor([sigma], dtype=torch.float64))
        if a == 0:  # σ = 1 of a flow model: Tweedie's formula is 0/0 and its value is the guided prediction
            guided = cfgpp.guided(pred, 0.6)
            z = a_next * guided + s_next * (z - a * pred.uncond) / s
            continue
        eps_cond, eps_uncond = (noise_prediction(z, d, a, s) for d in pred[:2])
        z = ddim_cfgpp_step(z, eps_cond, eps_uncond, 0.6, a, s, a_next, s_next)
    assert rel_err(ours, z) < 1e-5


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
def test_inversion_matches_float64_reference_step(space):
    """invert_ddim against the official `ddim_inversion_cfg++` step (eps/v) or its flow form with the velocities
    held (up to σ = 1) in float64, the network seeing z_{t−1} at time t."""
    model = GaussianData(space)
    walk = cfgpp.sampling_sigmas_for_inversion(schedule(space, 12))
    x0 = model.mean_cond + 0.4 * torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    ours = cfgpp.invert_ddim(model, x0, walk, disable=True, guidance=0.6, space=space)
    z = x0.double()
    for sigma, sigma_next in zip(walk[:-1].tolist(), walk[1:].tolist()):
        a, s, _ = paper_coefficients(sigma, space.flow)
        a_next, s_next, to_paper_next = paper_coefficients(sigma_next, space.flow)
        pred = model(z / to_paper_next, torch.tensor([sigma_next], dtype=torch.float64))  # network input z
        eps_cond, eps_uncond = (noise_prediction(z, d, a_next, s_next) for d in pred[:2])
        if space.flow:
            z = flow_cfgpp_inversion_step(z, eps_cond - pred.cond, eps_uncond - pred.uncond, 0.6, a, s, a_next, s_next)
        else:
            z = ddim_cfgpp_inversion_step(z, eps_cond, eps_uncond, 0.6, a, s, a_next, s_next)
    assert rel_err(ours, z / paper_coefficients(walk[-1], space.flow)[2]) < 1e-5


def paper_predictions(model, flow):
    """`model` as the reference samplers call it: data predictions in float64 at the paper's state z and (a, s)."""

    def predict(z, a, s):
        x, sigma = cfgpp_reference.comfyui_state(z, a, s, flow)
        return model(x, torch.tensor([sigma], dtype=torch.float64))[:2]

    return predict


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_float64_dpm_solver_reference(name, space):
    """Each sampler in float64 against DDIM / DPM-Solver++ with CFG++'s split in the paper's variables, λ = 0.6,
    ancestral ones at η = 1 with the same noises: every factor α' of a flow model's update counts (for eps/v α' = 1),
    and 2M's multistep term is live from the third flow step on (its second step follows one from σ = 1)."""
    model = GaussianData(space)
    sigmas = schedule(space, 6).double()
    x = model.start(float(sigmas[0])).double()
    draw = seeded_noise(x)
    noises = [draw(sigma, sigma_next) for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:])]
    options = {"eta": 1.0, "noise_sampler": seeded_noise(x)} if name in cfgpp.ANCESTRAL else {}
    ours = sample(name, model, x, sigmas, space, guidance=0.6, **options)
    z = x * paper_coefficients(sigmas[0], space.flow)[2]
    want = cfgpp_reference.sample(name, paper_predictions(model, space.flow), z, sigmas.tolist(), 0.6, space.flow,
                                  noises=noises)
    assert rel_err(ours, want) < 1e-10


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_step_equals_cfg_at_equivalent_scale(space, lam):
    """A CFG++ DDIM step (and inversion step) at λ is the CFG step at ω = λρ/(ρ − ρ'), to float precision."""
    model = GaussianData(space)
    sigmas = schedule(space, 6).double()
    scales = cfgpp.equivalent_cfg_scales(lam, sigmas, space)
    assert scales[-1] == pytest.approx(lam) and (scales >= lam).all()
    for i in range(len(sigmas) - 1):
        pair = sigmas[i : i + 2]
        x = model.start(float(pair[0])).double()
        plus = sample("ddim", model, x, pair, space, guidance=lam)
        plain = sample("ddim", model, x, pair, space, guidance=float(scales[i]), manifold_constrained=False)
        assert rel_err(plus, plain) < 1e-12
        up = pair.flip(0)
        plus = cfgpp.invert_ddim(model, x, up, disable=True, guidance=lam, space=space)
        plain = cfgpp.invert_ddim(model, x, up, disable=True, guidance=float(scales[i]), space=space,
                                  manifold_constrained=False)
        assert rel_err(plus, plain) < 1e-12


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
@pytest.mark.parametrize("manifold_constrained", [True, False], ids=["cfg++", "cfg"])
def test_inversion_is_exact_when_the_velocity_is_constant(space, manifold_constrained):
    """Inversion then sampling back is the identity when predictions do not change across a step: the steps are
    exact inverses of each other, at flow's σ = 1 too."""
    model = ConstantVelocity()
    sigmas = schedule(space, 8).double()
    x0 = torch.randn(3, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inverted = cfgpp.invert_ddim(model, x0, cfgpp.sampling_sigmas_for_inversion(sigmas), disable=True,
                                 guidance=0.8, space=space, manifold_constrained=manifold_constrained)
    back = sample("ddim", model, inverted, sigmas, space, guidance=0.8, manifold_constrained=manifold_constrained)
    assert torch.isfinite(inverted).all() and rel_err(back, x0) < 1e-10


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
def test_inversion_error_shrinks_with_steps_without_guidance(space):
    """On smoothly varying predictions the round trip error is the discretisation's and falls with the step count."""
    model = GaussianData(space)
    x0 = model.mean_cond + 0.4 * torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    errors = []
    for steps in (10, 40):
        sigmas = schedule(space, steps).double()
        inverted = cfgpp.invert_ddim(model, x0.double(), cfgpp.sampling_sigmas_for_inversion(sigmas), disable=True,
                                     guidance=0.0, space=space)
        errors.append(rel_err(sample("ddim", model, inverted, sigmas, space, guidance=0.0), x0))
    assert errors[1] < errors[0] / 3  # first order: 4x the steps, about a quarter of the error


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
def test_round_trip_against_cfg_at_equal_guidance(space):
    """Invert and sample back at λ = 0.2: plain CFG DDIM at the README's matching scale (ω = 1 + 11.5 λ) loses over
    twice as much; at the per-step-equivalent mean scale ω̄(λ) the two are about equally invertible, as expected of
    updates that differ only in how the guidance is spread over the steps."""
    model = GaussianData(space)
    x0 = (model.mean_cond + 0.4 * torch.randn(8, 32, generator=torch.Generator().manual_seed(2))).double()
    sigmas = schedule(space, 20).double()

    def round_trip_error(guidance, manifold_constrained):
        options = {"guidance": guidance, "space": space, "manifold_constrained": manifold_constrained}
        inverted = cfgpp.invert_ddim(model, x0, cfgpp.sampling_sigmas_for_inversion(sigmas), disable=True, **options)
        return rel_err(sample("ddim", model, inverted, sigmas, **options), x0)

    plus = round_trip_error(0.2, True)
    assert round_trip_error(cfgpp.readme_cfg_scale(0.2), False) > 2 * plus
    mean_scale = float(cfgpp.equivalent_cfg_scales(0.2, sigmas, space).mean())
    assert 0.5 < round_trip_error(mean_scale, False) / plus < 2


def test_euler_is_the_ddim_update():
    assert cfgpp.SAMPLERS["euler"] is cfgpp.SAMPLERS["ddim"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
def test_lambda_zero_is_unconditional_sampling(name, space):
    model = GaussianData(space)
    sigmas = schedule(space, 6)
    x = model.start(float(sigmas[0]))
    seeded = {"noise_sampler": seeded_noise(x)} if name in cfgpp.ANCESTRAL else {}
    ours = sample(name, model, x, sigmas, space, guidance=0.0, **seeded)

    def unconditional(x, sigma, **extra_args):
        uncond = model(x, sigma).uncond
        return Denoised(uncond, uncond)

    seeded = {"noise_sampler": seeded_noise(x)} if name in cfgpp.ANCESTRAL else {}
    assert torch.allclose(ours, sample(name, unconditional, x, sigmas, space, guidance=0.9, **seeded))


def seeded_noise(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("name", SAMPLERS)
def test_flow_sampling_from_sigma_one_is_finite(name):
    space = SPACES["flow"]
    model = GaussianData(space)
    sigmas = schedule(space, 5)
    assert sigmas[0] == 1
    for eta in (0.0, 1.0):
        options = {"eta": eta, "noise_sampler": seeded_noise(model.start(1.0))} if name in cfgpp.ANCESTRAL else {}
        assert torch.isfinite(sample(name, model, model.start(1.0), sigmas, space, guidance=0.7, **options)).all()


def log_snr_schedule(space, steps, start, end):
    """Sigmas from `start` to `end` (both above 0) uniform in log(α/σ), the time the solvers' orders refer to."""
    fraction = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    start, end = torch.tensor([start, end], dtype=torch.float64)
    if space.flow:  # log(α/σ) = logit(1 − σ)
        return (torch.logit(1 - start) + fraction * (torch.logit(1 - end) - torch.logit(1 - start))).neg().sigmoid()
    return (start.log() + fraction * (end.log() - start.log())).exp()


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpmpp_2m", 2), ("dpmpp_2s_ancestral", 2)])
def test_observed_order_on_the_exact_ode_solution(space, name, order):
    """On Gaussian data the probability-flow ODE has a closed-form solution; from N to 2N steps the error of an
    order-p sampler falls by 2^p. λ = 0 (a fixed λ adds α'λ(D_c − D_u) per step and has no step-size limit), so
    this pins the solvers themselves: a multistep term wrong by a factor (e.g. without α' on flow) is first order."""
    model = GaussianData(space)
    start = 0.95 if space.flow else 14.6
    errors = []
    for steps in (32, 64):
        sigmas = log_snr_schedule(space, steps, start, 0.05)
        x = model.start(start).double()
        exact = model.conditional_ode_solution(x, sigmas[0], sigmas[-1])
        options = {"eta": 0.0} if name in cfgpp.ANCESTRAL else {}
        errors.append(rel_err(sample(name, model.conditional, x, sigmas, space, guidance=0.0, **options), exact))
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.2)


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES)
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2s_ancestral"])
def test_higher_order_samplers_converge_to_ddims_path(space, name):
    """CFG++ guides by α'λ(D_c − D_u) per step, so λ·steps fixed is one guided ODE. The second-order samplers
    (eta = 0) approach DDIM on it as steps grow: their corrections are consistent with the CFG++ DDIM step in both
    sigma spaces (the eps/v form applied to a flow model would leave a gap of σ'λ(D_c − D_u) per step)."""
    model = GaussianData(space)
    options = {"eta": 0.0} if name in cfgpp.ANCESTRAL else {}
    gaps = []
    for steps in (25, 100):
        sigmas = schedule(space, steps)
        x = model.start(float(sigmas[0]))
        ddim = sample("ddim", model, x, sigmas, space, guidance=10 / steps)
        gaps.append(rel_err(sample(name, model, x, sigmas, space, guidance=10 / steps, **options), ddim))
    assert gaps[1] < gaps[0] / 2


def test_schedule_for_inversion_is_checked():
    assert cfgpp.sampling_sigmas_for_inversion(torch.tensor([2.0, 1.0, 0.0])).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="decrease"):
        cfgpp.sampling_sigmas_for_inversion(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="end at sigma 0"):
        cfgpp.sampling_sigmas_for_inversion(torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="at least two"):
        cfgpp.sampling_sigmas_for_inversion(torch.tensor([0.0]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_guidance_outside_the_papers_range_is_refused(bad):
    with pytest.raises(ValueError, match="lambda"):
        cfgpp.check_guidance(bad)
