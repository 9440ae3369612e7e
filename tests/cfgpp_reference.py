"""Float64 transcriptions of CFG++ as the paper and the official code write it, in their own variables.

The paper works with x_t = a_t·x0 + s_t·ε (VP: a_t = √ᾱ_t, s_t = √(1−ᾱ_t); a flow model has a_t = 1 − σ_t,
s_t = σ_t) and noise predictions ε̂. `paper_coefficients` gives (a, s) and the factor from ComfyUI's state to the
paper's for a ComfyUI sigma, so the tests can run the references on what ComfyUI's samplers saw.
"""

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
