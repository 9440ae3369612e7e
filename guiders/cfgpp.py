"""CFG++: manifold-constrained classifier-free guidance.

Chung, Kim, Park, Nam, Ye, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models", ICLR 2025,
arXiv:2406.08070. DDIM sampling follows the paper's Algorithm 2 (against CFG's Algorithm 1); DDIM inversion follows
the official code (github.com/CFGpp-diffusion/CFGpp, `latent_diffusion.py`, solver `ddim_inversion_cfg++`); Euler
ancestral, DPM-Solver++(2M) and DPM-Solver++(2S) ancestral are the CFG++ forms that ComfyUI core ships as
`*_cfg_pp` (comfy/k_diffusion/sampling.py), written here for flow models as well.

Notation. A sampler's state is x = α·x0 + σ·ε with ComfyUI's sigmas: α = 1 for eps and v models (the
variance-exploding form of the VP process, x = z/√ᾱ, σ = √((1−ᾱ)/ᾱ)), α = 1 − σ for flow (CONST) models. The
model gives denoised predictions D_c (conditional) and D_u (unconditional); ε̂ = (x − α·D)/σ is the noise that a
denoised prediction implies. With guidance λ:

    CFG, scale ω:        D_ω = D_u + ω (D_c − D_u),   x_next = α' D_ω + σ' ε̂_ω        (Algorithm 1)
    CFG++, λ ∈ [0, 1]:   D_λ = D_u + λ (D_c − D_u),   x_next = α' D_λ + σ' ε̂_u        (Algorithm 2)

CFG++ denoises with the guided prediction (Tweedie's formula on ε̂_λ) but renoises with the unconditional noise ε̂_u,
which keeps the state on the data manifold. In the paper's VP notation the second line is
x_{t−1} = √ᾱ_{t−1} x̂_λ(x_t) + √(1−ᾱ_{t−1}) ε̂_∅(x_t); dividing by √ᾱ_{t−1} gives the ComfyUI form above.

λ and the CFG scale. The coefficient of D_c − D_u in x_next is α'·λ for CFG++ and ω·α'·(1 − ρ'/ρ) for CFG, with
ρ = σ/α; everything else is equal. A CFG++ DDIM step at λ is therefore exactly a CFG DDIM step at

    ω = λ · ρ / (ρ − ρ')                                                                 (`equivalent_cfg_scales`)

which grows as steps get shorter and is λ on a last step to 0. Averaged over the steps of SD1.5's normal schedule,
λ = 0.6 is ω ≈ 2.8 at 20 steps and ω ≈ 7.0 at 50 (the official 50-step examples pair λ = 0.6 with ω = 7.5).

Inversion runs DDIM from low to high sigma with the two predictions' roles swapped (denoise with ε̂_u, renoise
with ε̂_λ), which makes each step the exact inverse of a sampling step with the same predictions (`invert_ddim`).
What inversion loses is the change of the predictions across a step, and the guidance term's share of it is small
for CFG++ at λ ≤ 1 and large for CFG at ω ≫ 1.

Every sampler has k-diffusion's signature. `model(x, sigma, **extra_args)` returns a `Denoised` pair (conditional,
unconditional) for a batch; `space` says how α depends on σ. No state outlives a call.

Weighting per position (`weight`, a tensor in [0, 1] broadcastable to the state; None is no weighting). The neutral
point of CFG++ is the plain conditional step (denoise with D_c, renoise with ε̂_c); a weight m interpolates each
model call's guided pair between it and CFG++'s:

    D = lerp(D_c, D_λ, m),   ε̂ = lerp(ε̂_c, ε̂_u, m) = ε̂ of the prediction lerp(D_c, D_u, m)       (`weighted`)

so m = 1 is CFG++ bit for bit (torch.lerp returns its end exactly at 1) and m = 0 the conditional sampler of the same
kind (DPM-Solver++(2M)'s history term then holds D_c as well). Inversion takes no weight.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import trange

# λ of the official code's examples for SD1.5 text-to-image, inversion and editing (README; CFG takes 7.5 there).
DEFAULT_GUIDANCE = 0.6
# The paper's range: λ = 0 is unconditional sampling, λ = 1 conditional sampling with ε̂_u renoising.
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 1.0
# The official README: "λ ∈ [0, 1] can be used with a similar effect as ω ∈ [1.0, 12.5] in CFG".
README_CFG_RANGE = (1.0, 12.5)
# k-diffusion's ancestral defaults (ComfyUI's KSamplerSelect uses them too).
DEFAULT_ETA = 1.0
DEFAULT_S_NOISE = 1.0


@dataclass(frozen=True)
class SigmaSpace:
    """How a sampler's state relates to data and noise: x = α(σ)·x0 + σ·ε.

    `flow`: α = 1 − σ (rectified flow, ComfyUI's CONST); otherwise α = 1 (eps and v models). `sigma_data` enters
    only the network's input scaling, which inversion needs (see `invert_ddim`).
    """

    flow: bool = False
    sigma_data: float = 1.0

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 - sigma if self.flow else torch.ones_like(sigma)

    def velocity(self, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """dx/dσ of the probability-flow ODE through (x, σ) with denoised prediction D: ε̂ + (dα/dσ)·D."""
        eps = implied_noise(x, denoised, self.alpha(sigma), sigma)
        return eps - denoised if self.flow else eps

    def noise_to_signal(self, sigma: torch.Tensor) -> torch.Tensor:
        """ρ = σ/α, the sigma of the same state in variance-exploding form (inf at σ = 1 of a flow model)."""
        return sigma / self.alpha(sigma)

    def half_log_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        """log(α/σ) = −log ρ, the time variable of DPM-Solver++."""
        return -sigma.logit() if self.flow else -sigma.log()

    def sigma_at_half_log_snr(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        return (-half_log_snr).sigmoid() if self.flow else (-half_log_snr).exp()

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """The factor ComfyUI multiplies x by before the network (`model_sampling.calculate_input`)."""
        if self.flow:
            return torch.ones_like(sigma)
        return (sigma**2 + self.sigma_data**2).rsqrt()


class Denoised(NamedTuple):
    """The model's denoised predictions (x0 estimates) for one state: conditional and unconditional, and the sum of
    the additive guidance terms of other methods, if any (e.g. PAG's s (D_c − D̂); see `guided`)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    other_guidance: torch.Tensor | None = None


def guided(pred: Denoised, guidance: float) -> torch.Tensor:
    """D_λ = D_u + λ (D_c − D_u) (the same expression as ComfyUI's CFG, so the two agree bit for bit), plus the
    other methods' guidance terms.

    Other guidance terms belong to the guided prediction: CFG++ denoises with the guided prediction (Algorithm 2's
    Tweedie step on the guided noise) and renoises with the unconditional noise alone (its renoising step), so a
    term such as PAG's s (D_c − D̂), which CFG adds to its guided prediction, is added to D_λ and nowhere else. Its
    scale is then on CFG++'s footing, as λ's is: in a DDIM step the term's coefficient in x_next is α' s, against
    α' s (1 − ρ'/ρ) when CFG adds it, so a CFG++ step with scale s equals a CFG step with s ρ/(ρ − ρ').
    """
    out = pred.uncond + (pred.cond - pred.uncond) * guidance
    return out if pred.other_guidance is None else out + pred.other_guidance


def weighted(pred: Denoised, guidance: float, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the guided prediction, the prediction to renoise with) of one model call: (D_λ, D_u) without a weight, and
    (lerp(D_c, D_λ, m), lerp(D_c, D_u, m)) with weight m (see the module docstring). The renoising noise ε̂ is
    affine in its prediction, so ε̂ of lerp(D_c, D_u, m) is lerp(ε̂_c, ε̂_u, m)."""
    denoised = guided(pred, guidance)
    if weight is None:
        return denoised, pred.uncond
    weight = weight.to(pred.cond.dtype)
    return torch.lerp(pred.cond, denoised, weight), torch.lerp(pred.cond, pred.uncond, weight)


def implied_noise(x: torch.Tensor, denoised: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """ε̂ such that x = α·D + σ·ε̂ (Tweedie's formula solved for the noise)."""
    return (x - alpha * denoised) / sigma


def ancestral_step(rho: torch.Tensor, rho_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ_down, ρ_up) of an ancestral step from ρ to ρ' in variance-exploding form: a deterministic step to ρ_down,
    then fresh noise of scale ρ_up, with ρ_down² + ρ_up² = ρ'² (k-diffusion's `get_ancestral_step`; DDIM's σ_t(η)).

    Written with ρ'/ρ so that ρ = inf (a flow model's σ = 1) gives the limit ρ_up = min(1, η)·ρ'.
    """
    if not eta:
        return rho_next, torch.zeros_like(rho_next)
    ratio = rho_next / rho
    rho_up = torch.minimum(rho_next, eta * rho_next * (1 - ratio**2).clamp(min=0).sqrt())
    return (rho_next**2 - rho_up**2).clamp(min=0).sqrt(), rho_up


def equivalent_cfg_scales(guidance: float, sigmas: torch.Tensor, space: SigmaSpace = SigmaSpace()) -> torch.Tensor:
    """ω_i for which a CFG DDIM step from sigmas[i] to sigmas[i+1] equals the CFG++ DDIM step at λ:
    ω_i = λ·ρ_i/(ρ_i − ρ_{i+1}).

    The same holds for inversion steps (sigmas increasing), where ω_i = λ·ρ_{i+1}/(ρ_{i+1} − ρ_i).
    """
    sigmas = sigmas.double()
    rho = space.noise_to_signal(sigmas)
    high, low = torch.maximum(rho[:-1], rho[1:]), torch.minimum(rho[:-1], rho[1:])
    return guidance / (1 - low / high)


def readme_cfg_scale(guidance: float) -> float:
    """The CFG scale the official README likens λ to: λ ∈ [0, 1] acts like ω ∈ [1, 12.5] (its SD examples, 50 steps).
    A rule of thumb, linear in λ; `equivalent_cfg_scales` is the exact per-step correspondence."""
    low, high = README_CFG_RANGE
    return low + guidance * (high - low)


def sampling_sigmas_for_inversion(sigmas: torch.Tensor) -> torch.Tensor:
    """The inversion walk of a sampling schedule: sigmas[::-1], from 0 (the clean latent) up to sigmas[0].

    Raises ValueError unless the schedule is strictly decreasing and ends at 0, as a scheduler's SIGMAS do.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"the schedule needs at least two sigmas, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("the schedule must decrease strictly (a scheduler's SIGMAS, not flipped ones)")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"the schedule must end at sigma 0 (a clean latent), not {float(sigmas[-1]):.4g}")
    return sigmas.flip(0)


def _predict(model, x, sigma, guidance, extra_args, callback, i, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prediction to renoise with, the guided prediction) at (x, σ) (`weighted`); the guided one is reported to
    the callback as step i's denoised image."""
    pred = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
    denoised, renoise = weighted(pred, guidance, weight)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return renoise, denoised


def _default_noise_sampler(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           guidance=DEFAULT_GUIDANCE, eta=DEFAULT_ETA, s_noise=DEFAULT_S_NOISE, noise_sampler=None,
                           space=SigmaSpace(), manifold_constrained=True, weight=None):
    """Ancestral DDIM (Euler ancestral) with CFG++: a deterministic CFG++ step to ρ_down, then noise of scale ρ_up.

        x_next = α' (D_λ + ρ_down ε̂_u + s_noise · ρ_up · n),   n ~ N(0, I)

    eta = 0 is DDIM (Algorithm 2). ComfyUI core: `sample_euler_ancestral_cfg_pp`. `manifold_constrained=False`
    renoises with ε̂_λ instead: plain CFG at scale `guidance` (Algorithm 1), for comparisons. `weight`: see the module
    docstring.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        renoise, denoised = _predict(model, x, sigma, guidance, extra_args, callback, i, weight)
        if sigma_next == 0:
            x = denoised
            continue
        alpha, alpha_next = space.alpha(sigma), space.alpha(sigma_next)
        eps_renoise = implied_noise(x, renoise if manifold_constrained else denoised, alpha, sigma)
        rho_down, rho_up = ancestral_step(space.noise_to_signal(sigma), space.noise_to_signal(sigma_next), eta)
        x = alpha_next * denoised + alpha_next * rho_down * eps_renoise
        if eta > 0 and s_noise > 0:
            x = x + alpha_next * noise_sampler(sigma, sigma_next) * s_noise * rho_up
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, guidance=DEFAULT_GUIDANCE,
                space=SigmaSpace(), manifold_constrained=True, weight=None):
    """DDIM with CFG++ (Algorithm 2): x_next = α' D_λ + σ' ε̂_u. It is also the Euler step of the probability-flow
    ODE in σ, so ComfyUI's `euler_cfg_pp` computes the same update. `manifold_constrained=False` is DDIM with plain
    CFG at scale `guidance` (Algorithm 1): x_next = α' D_ω + σ' ε̂_ω."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, guidance, eta=0.0, s_noise=0.0,
                                  space=space, manifold_constrained=manifold_constrained, weight=weight)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, guidance=DEFAULT_GUIDANCE,
                    space=SigmaSpace(), weight=None):
    """DPM-Solver++(2M) with CFG++: the CFG++ DDIM step plus the multistep correction, with t = log(α/σ),
    h = t' − t, r = h_prev/h and D_u,prev the previous step's unconditional prediction:

        x_next = α' D_λ + σ' ε̂_u + α' (1 − e^{−h}) / (2r) · (D_λ − D_u,prev)

    For α = 1 this is ComfyUI core's `sample_dpmpp_2m_cfg_pp` term for term; core applies that form to flow models
    too, where it is not the CFG++ DDIM step (it differs from it by σ' λ (D_c − D_u)); this one is.
    """
    extra_args = {} if extra_args is None else extra_args
    old_uncond = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        renoise, denoised = _predict(model, x, sigma, guidance, extra_args, callback, i, weight)
        if sigma_next == 0:
            x = denoised
            continue
        alpha, alpha_next = space.alpha(sigma), space.alpha(sigma_next)
        step = alpha_next * denoised + sigma_next * implied_noise(x, renoise, alpha, sigma)
        if old_uncond is not None:
            t, t_next, t_prev = (space.half_log_snr(s) for s in (sigma, sigma_next, sigmas[i - 1]))
            h = t_next - t
            r = (t - t_prev) / h
            step = step - alpha_next * torch.expm1(-h) / (2 * r) * (denoised - old_uncond)
        x = step
        old_uncond = renoise
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              guidance=DEFAULT_GUIDANCE, eta=DEFAULT_ETA, s_noise=DEFAULT_S_NOISE, noise_sampler=None,
                              space=SigmaSpace(), weight=None):
    """DPM-Solver++(2S) ancestral with CFG++, after ComfyUI core's `sample_dpmpp_2s_ancestral_cfg_pp`.

    Core runs the eps/v solver on the state shifted by the guidance, x + (D_λ − D_u): a CFG++ DDIM step to the
    midpoint ρ_s = √(ρ ρ_down) gives x_s = α_s D_λ + σ_s ε̂_u, and its guided prediction D_2 replaces D_λ in the step
    to ρ_down:

        x_next = α' (D_2 + ρ_down ε̂_u + (ρ_down/ρ)(D_λ − D_2) + s_noise · ρ_up · n)

    Here ε̂_u is the first call's throughout. Core's final step reads D_u from its post-CFG hook after the midpoint
    call has overwritten it, which adds (ρ_down/ρ)(D_u − D_u,2) to each step: at λ = 0 core's sampler is then not
    the unguided DPM-Solver++(2S), and it does not converge to the CFG++ path; this one is and does. The two agree
    exactly when D_u does not change within a step.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        renoise, denoised = _predict(model, x, sigma, guidance, extra_args, callback, i, weight)
        if sigma_next == 0:
            x = denoised
            continue
        alpha, alpha_next = space.alpha(sigma), space.alpha(sigma_next)
        rho = space.noise_to_signal(sigma)
        rho_down, rho_up = ancestral_step(rho, space.noise_to_signal(sigma_next), eta)
        eps_uncond = implied_noise(x, renoise, alpha, sigma)
        if rho_down == 0 or alpha == 0:
            # no deterministic part left, or a step from pure noise (σ = 1 of a flow model): the midpoint of an
            # infinite log-SNR interval does not exist, and the first-order step is the whole step
            x = alpha_next * (denoised + rho_down * eps_uncond)
        else:
            sigma_mid = space.sigma_at_half_log_snr(-(rho * rho_down).sqrt().log())
            x_mid = space.alpha(sigma_mid) * denoised + sigma_mid * eps_uncond
            pred_mid = model(x_mid, sigma_mid * x.new_ones([x.shape[0]]), **extra_args)
            denoised_mid = weighted(pred_mid, guidance, weight)[0]
            x = alpha_next * (denoised_mid + rho_down * eps_uncond + rho_down / rho * (denoised - denoised_mid))
        if eta > 0 and s_noise > 0:
            x = x + alpha_next * noise_sampler(sigma, sigma_next) * s_noise * rho_up
    return x


@torch.no_grad()
def invert_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, guidance=DEFAULT_GUIDANCE,
                space=SigmaSpace(), manifold_constrained=True):
    """DDIM inversion with CFG++: from a clean latent x at sigmas[0] (= 0) up to sigmas[-1]; sigmas increase.

    Each step inverts a CFG++ DDIM sampling step x = α D_λ + σ ε̂_u taken from (x', σ'): with the probability-flow
    velocity v = dx/dσ = ε̂ + (dα/dσ)·D of each prediction (ε̂ for eps/v models, ε̂ − D for flow),

        x' = x − α' σ v_u + α σ' v_λ

    which is exact when the velocities are those at (x', σ') (use x' = α'D + σ'ε̂ and α + σ = 1 resp. α = 1). For
    eps and v models it is the official code's step, x' = (x − σ ε̂_u) + σ' ε̂_λ, and the predictions are taken
    where the official code takes them: the network sees the current state (its input x·c_in(σ)) with the next
    noise level σ' as its time. Holding v rather than ε̂ fixed keeps a flow model's last step to σ = 1 (where ε̂ = x
    carries no prediction) well posed. `manifold_constrained=False` is DDIM inversion with plain CFG at scale
    `guidance` (v_λ in both places), the baseline the paper compares against.
    """
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_eval = x * (space.input_scale(sigma) / space.input_scale(sigma_next))
        renoise, denoised = _predict(model, x_eval, sigma_next, guidance, extra_args, callback, i)
        v_guided = space.velocity(x_eval, denoised, sigma_next)
        v_denoise = space.velocity(x_eval, renoise, sigma_next) if manifold_constrained else v_guided
        x = x - space.alpha(sigma_next) * sigma * v_denoise + space.alpha(sigma) * sigma_next * v_guided
    return x


SAMPLERS = {
    "ddim": sample_ddim,
    "euler": sample_ddim,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
}
ANCESTRAL = {"euler_ancestral", "dpmpp_2s_ancestral"}


def check_guidance(guidance: float) -> None:
    if not (MIN_GUIDANCE <= guidance <= MAX_GUIDANCE) or math.isnan(guidance):
        raise ValueError(f"lambda must lie in [{MIN_GUIDANCE}, {MAX_GUIDANCE}] (the paper's range), got {guidance}")
