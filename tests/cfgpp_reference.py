"""Float64 transcriptions of CFG++ as the paper and the official code write it, in their own variables.

The paper works with x_t = a_t·x0 + s_t·ε (VP: a_t = √ᾱ_t, s_t = √(1−ᾱ_t); a flow model has a_t = 1 − σ_t,
s_t = σ_t) and noise predictions ε̂. `paper_coefficients` gives (a, s) and the factor from ComfyUI's state to the
paper's for a ComfyUI sigma, so the tests can run the references on what ComfyUI's samplers saw.

`sample` is every CFG++ sampler in the same variables, written from DDIM (Song et al., ICLR 2021, eqs. 12 and 16)
and DPM-Solver++ (Lu et al., arXiv:2211.01095, Algorithms 1 and 2) with CFG++'s rule: denoise with x̂_λ, renoise
with ε̂_∅.
"""

import math

import torch


def paper_coefficients(sigma: float, flow: bool) -> tuple[float, float, float]:
    """(a, s, z/x): the paper's signal and noise coefficients at ComfyUI sigma, and paper state / ComfyUI state."""
    sigma = float(sigma)
    if flow:
        return 1.0 - sigma, sigma, 1.0
    abar = 1.0 / (1.0 + sigma**2)
    return abar**0.5, (1.0 - abar) ** 0.5, abar**0.5


def noise_prediction(z, x0, a, s):
    """ε̂ for which z = a·x0 + s·ε̂."""
    return (z.double() - a * x0.double()) / s


def ddim_cfgpp_step(z, eps_cond, eps_uncond, lam, a, s, a_prev, s_prev):
    """Algorithm 2, one step: x̂_λ = (x_t − s_t ε̂_λ)/a_t (Tweedie), x_{t−1} = a_{t−1} x̂_λ + s_{t−1} ε̂_∅."""
    eps_lam = eps_uncond + lam * (eps_cond - eps_uncond)
    x0 = (z - s * eps_lam) / a
    return a_prev * x0 + s_prev * eps_uncond


def ddim_cfgpp_inversion_step(z, eps_cond, eps_uncond, lam, a, s, a_next, s_next):
    """The official `ddim_inversion_cfg++` step: z0 = (z_{t−1} − s_{t−1} ε̂_∅)/a_{t−1}, z_t = a_t z0 + s_t ε̂_λ,
    with ε̂ predicted from z_{t−1} at time t."""
    eps_lam = eps_uncond + lam * (eps_cond - eps_uncond)
    x0 = (z - s * eps_uncond) / a
    return a_next * x0 + s_next * eps_lam


def flow_cfgpp_inversion_step(z, v_cond, v_uncond, lam, a, s, a_next, s_next):
    """The flow-model state z' at (a', s') from which Algorithm 2's step to (a, s) gives z, with each prediction's
    velocity v = ε̂ − x̂ held at its value: x̂ = z' − s'v and ε̂ = z' + a'v (a' + s' = 1) put into z = a x̂_λ + s ε̂_∅
    and solved for z'. (The official step holds ε̂ instead, which has no value at a flow model's σ = 1.)"""
    v_lam = v_uncond + lam * (v_cond - v_uncond)
    return (z + a * s_next * v_lam - s * a_next * v_uncond) / (a + s)


def half_log_snr(a: float, s: float) -> float:
    """λ = log(a/s), DPM-Solver's time; −inf at pure noise (a flow model's σ = 1), inf with no noise left."""
    if a == 0 or s == 0:
        return math.inf if s == 0 else -math.inf
    return math.log(a / s)


def coefficients_at_half_log_snr(half_log_snr: float, flow: bool) -> tuple[float, float]:
    """(a, s) with log(a/s) = λ on the model's path: a + s = 1 for flow, a² + s² = 1 (VP) otherwise."""
    if flow:
        return 1 / (1 + math.exp(-half_log_snr)), 1 / (1 + math.exp(half_log_snr))
    return (1 / (1 + math.exp(-2 * half_log_snr))) ** 0.5, (1 / (1 + math.exp(2 * half_log_snr))) ** 0.5


def comfyui_state(z, a: float, s: float, flow: bool):
    """(x, σ) in ComfyUI's variables for the paper's state z at (a, s): x = z/a, σ = s/a for VP; unchanged for flow."""
    return (z, s) if flow else (z / a, s / a)


def ancestral_noise_std(a: float, s: float, a_next: float, s_next: float, eta: float) -> float:
    """σ_η = η·s'·√(1 − e^{−2h}), h = λ' − λ: η times the std of the forward posterior q(x_{t'} | x_t, x0) (DDIM's
    eq. 16 for VP paths, the same posterior for any path x_t = a_t x0 + s_t ε)."""
    decay = a * s_next / (a_next * s)  # e^{−h}
    return eta * s_next * (1 - decay**2) ** 0.5


ANCESTRAL = {"euler_ancestral", "dpmpp_2s_ancestral"}


def sample(method, predict, z, sigmas, lam, flow, eta=1.0, noises=()):
    """The CFG++ sampler `method` from paper state z through ComfyUI `sigmas`, in float64; returns the last state.

    `predict(z, a, s)` gives the data predictions (x̂_c, x̂_∅) at paper state z; `noises` one fresh noise per step
    of an ancestral sampler (eta > 0). Every step works on CFG++'s state x̃ = a x̂_λ + s ε̂_∅ (x_t denoised with
    the guided prediction, renoised with the unconditional noise) and moves to (a', s_d), s_d = √(s'² − σ_η²), by
    DPM-Solver++ in the data prediction D, then adds σ_η n:

        x_{t'} = (s_d/s) x̃ − a' (e^{−h} − 1) D + σ_η n,    h = log(a'/s_d) − log(a/s)

    D = x̂_λ is DDIM's eq. 12 (η = 0: the paper's Algorithm 2). DPM-Solver++(2S) (Algorithm 1, r = ½) takes D = x̂_λ
    at the midpoint x_s = (s_s/s) x̃ − a_s (e^{−h/2} − 1) x̂_λ of the log-SNR step (at a = 0 the interval is infinite
    and its midpoint is the start itself). DPM-Solver++(2M) (Algorithm 2) takes D = (1 + 1/2r) x̂_λ − (1/2r) x̂_∅,prev
    with r = h_prev/h and the previous step's unconditional prediction (ComfyUI core's `dpmpp_2m_cfg_pp`). The
    last step, to σ = 0, gives x̂_λ (k-diffusion's convention, where the log-SNR step is infinite).
    """
    noises = iter(noises)
    previous = None  # the previous step's (x̂_∅, λ), for 2M
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        a, s, _ = paper_coefficients(sigma, flow)
        a_next, s_next, _ = paper_coefficients(sigma_next, flow)
        x0_cond, x0_uncond = predict(z, a, s)
        x0_guided = x0_uncond + lam * (x0_cond - x0_uncond)
        if s_next == 0:
            z = x0_guided
            continue
        state = a * x0_guided + s * noise_prediction(z, x0_uncond, a, s)
        noise_std = ancestral_noise_std(a, s, a_next, s_next, eta) if method in ANCESTRAL else 0.0
        s_down = max(s_next**2 - noise_std**2, 0.0) ** 0.5
        t, t_next = half_log_snr(a, s), half_log_snr(a_next, s_down)
        data = x0_guided
        if method == "dpmpp_2s_ancestral" and a > 0:
            a_mid, s_mid = coefficients_at_half_log_snr((t + t_next) / 2, flow)
            z_mid = s_mid / s * state - a_mid * (math.exp(-(t_next - t) / 2) - 1) * x0_guided
            mid_cond, mid_uncond = predict(z_mid, a_mid, s_mid)
            data = mid_uncond + lam * (mid_cond - mid_uncond)
        elif method == "dpmpp_2m" and previous is not None:
            x0_uncond_prev, t_prev = previous
            r = (t - t_prev) / (t_next - t)
            data = (1 + 1 / (2 * r)) * x0_guided - 1 / (2 * r) * x0_uncond_prev
        z = s_down / s * state - a_next * (math.exp(-(t_next - t)) - 1) * data
        if noise_std:
            z = z + noise_std * next(noises).double()
        previous = x0_uncond, t
    return z
