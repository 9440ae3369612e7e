"""Adaptive Guidance (AG) and LinearAG: skip the unconditional pass once it stops mattering.

Castillo, Kohler, Pérez, Pérez, Pumarola, Ghanem, Arbeláez, Thabet, "Adaptive Guidance: Training-free Acceleration
of Conditional Diffusion Models", AAAI 2025, arXiv:2312.12487.

What could and could not be checked against the paper here. Only the abstract (arXiv, Hugging Face papers, the AAAI
proceedings' record) could be read from this project's machines, not the paper's body; so section and equation
numbers are not cited (the issue asked for them; they could not be checked), and each rule below says whether it is the paper's as read or our reading of it:

- The abstract (read): "the denoising steps proposed by CFG become increasingly aligned with simple conditional
  steps, which renders the extra neural network evaluation of CFG redundant, especially in the second half"; AG
  "adaptively omits network evaluations when the denoising process displays convergence"; LinearAG replaces "entire
  neural function evaluations [in the first half] by simple affine transformations of past score estimates".
- The criterion (our reading of that sentence): γ_t = cos(D_c, D_cfg), the cosine between the conditional prediction
  and the CFG-guided prediction, per sample over every non-batch dimension; once γ_t ≥ γ̄ the remaining steps of
  that sample are conditional-only (its unconditional pass is not computed). The public implementations
  (asagi4/ComfyUI-Adaptive-Guidance `__init__.py`, `check_similarity`, and its fork) compare the conditional with the
  *unconditional* denoised prediction instead, cos(D_c, D_u), over the whole batch flattened into one vector: one
  decision for the batch, after which every later step is conditional-only; that is `criterion="cond_uncond_batch"`
  (at their default threshold 0.990, `PUBLIC_THRESHOLD`), and `criterion="cond_uncond"` is the same cosine per
  sample. The paper's project page plots cos(D_c, D_u), rising from about 0.85–0.88 to 1.
  Since D_cfg − D_c = (w − 1)(D_c − D_u), 1 − cos(D_c, D_cfg) ≈ (w − 1)² (1 − cos(D_c, D_u)) for small angles: the
  default criterion asks for agreement in proportion to the guidance scale, which is what decides whether dropping
  the unconditional pass changes the step.
- The space: the denoised predictions (ComfyUI's x0 estimates, what its CFG step combines), not the noise
  predictions ε = (x − D)/σ. In noise space the cosine is close to 1 at the *start* of every run whose σ_max is large
  against the data (x − D ≈ σ·noise for both predictions) and falls as noise is removed: measured on the reference
  model at cfg 3, cos(ε_c, ε_cfg) is 0.99999 at the first of 30 euler steps and 0.993 at the last, so "switch once it
  holds" would stop guidance at the first step, the opposite of the alignment the paper reports. On the denoised
  predictions it grows over the run as the paper describes (0.87 at the first step, 0.991 about a third of the way,
  1.0 at the end); `similarity(..., space="noise")` gives the other reading for measurements.
- The threshold γ̄ = 0.991 of the default criterion is ours (the public implementations' default is 0.990, for
  cos(D_c, D_u)); γ̄ ≥ 1 never skips, so AG is then CFG bit for bit.

LinearAG (our reading of the abstract's sentence; the paper's regression could not be read): the unconditional
noise prediction of a step in the first half of the run is estimated as an affine combination of estimates that are
already known at that step,

    ε̂_u(i) = a_i ε_c(i) + b_i ε_c(i−1) + c_i ε_u(i−1)

(this call's conditional prediction, the previous call's conditional and unconditional predictions), with one
coefficient triple per model call i, fitted by least squares on CFG trajectories of the user's model and prompts: the
regression target is the true ε_u(i) at every element of every fitting image. The estimated calls are every other
call of the first half (i odd, 1 ≤ i < n/2), so the previous call's terms are always real network outputs, in
fitting and in sampling alike; the second half runs AG's criterion as above.

Everything here is plain torch on denoised predictions (ComfyUI's x0 estimates), per sample over every non-batch
dimension.
"""

import dataclasses

import torch

from .checks import check_finite

DEFAULT_THRESHOLD = 0.991
CRITERIA = ("cond_cfg", "cond_uncond", "cond_uncond_batch")
# The public implementations' threshold (asagi4/ComfyUI-Adaptive-Guidance `AdaptiveGuidanceGuider`, default 0.990).
PUBLIC_THRESHOLD = 0.990
# Past terms of the LinearAG estimate, in the order of its coefficients.
LINEAR_TERMS = ("cond", "previous_cond", "previous_uncond")


@dataclasses.dataclass(frozen=True)
class AGConfig:
    threshold: float = DEFAULT_THRESHOLD
    criterion: str = "cond_cfg"

    def __post_init__(self):
        check_finite(threshold=self.threshold)
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold ({self.threshold}) must be a cosine, between -1 and 1")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion {self.criterion!r} is not one of {', '.join(CRITERIA)}")

    @property
    def never_skips(self) -> bool:
        """γ̄ = 1: a cosine computed in floating point can round to 1, so 1 is treated as 'never', exactly."""
        return self.threshold >= 1.0


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) per sample over every non-batch dimension, accumulated in float64; 1 where either is zero."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    dot = (a * b).sum(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(dot))


def cfg_denoised(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """D_cfg = D_u + w (D_c − D_u), ComfyUI's CFG step on denoised predictions."""
    return uncond + (cond - uncond) * scale


def similarity(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
               criterion: str = "cond_cfg", space: str = "denoised") -> torch.Tensor:
    """γ per sample: cos(D_c, D_cfg) (default) or cos(D_c, D_u) on the denoised predictions, or (cond_uncond_batch,
    the public implementations') cos(D_c, D_u) of the whole batch as one vector, the same γ for every sample; with
    space="noise" the same on the noise directions x − D ∝ ε (for measurements only, see the module docstring)."""
    other = cfg_denoised(cond, uncond, scale) if criterion == "cond_cfg" else uncond
    a, b = (x - cond, x - other) if space == "noise" else (cond, other)
    if criterion == "cond_uncond_batch":
        return per_sample_cosine(a.reshape(1, -1), b.reshape(1, -1)).expand(a.shape[0])
    return per_sample_cosine(a, b)


class AGState:
    """Which samples of one sampling run have switched to conditional-only steps (the switch is final for the run).

    Create one per run. The decisions are kept on the CPU, so that deciding which passes to run never waits for the
    GPU (a synchronisation per step costs more than a skipped pass saves where the model is launch-bound); the
    cosine is read back once per step, and only while some sample still takes guidance. A batch of another size
    (a state reused by mistake) starts afresh.
    """

    def __init__(self):
        self.switched: torch.Tensor | None = None  # bool [B], on the CPU
        self.calls = 0  # model calls of this run so far (LinearAG's index into its coefficients)

    def begin_call(self, batch: int) -> torch.Tensor:
        """The switched mask for this call ([B] bool, CPU); counts the call."""
        if self.switched is None or self.switched.shape[0] != batch:
            self.switched, self.calls = torch.zeros(batch, dtype=torch.bool), 0
        self.calls += 1
        return self.switched

    def update(self, gamma: torch.Tensor, threshold: float, measured: torch.Tensor | None = None) -> None:
        """Switch the samples whose γ reached γ̄ (only those in `measured`, where given)."""
        reached = gamma.cpu() >= threshold
        if measured is not None:
            reached &= measured
        self.switched = self.switched | reached


def uncond_for_cfg(cond: torch.Tensor, uncond: torch.Tensor, switched: torch.Tensor) -> torch.Tensor:
    """The unconditional prediction to hand CFG: D_c itself for switched samples, so that CFG's
    D_u + w (D_c − D_u) is exactly D_c there (a conditional-only step), and D_u elsewhere."""
    mask = switched.to(cond.device, non_blocking=True).view(-1, *[1] * (cond.ndim - 1))
    return torch.where(mask, cond, uncond)


# LinearAG ---------------------------------------------------------------------------------------------------------


def noise_direction(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ε = (x − D)/σ per sample (σ of shape [B] or scalar)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return (x - denoised) / sigma


def denoised_from_noise(x: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D = x − σ ε."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return x - sigma * eps


def estimated_calls(calls: int) -> list[int]:
    """The model calls whose unconditional pass LinearAG estimates: every other call of the first half (odd i,
    1 ≤ i < calls/2), so the previous call's terms are always real network outputs."""
    return [i for i in range(1, (calls + 1) // 2) if i % 2 == 1]


def linear_estimate(coefficients: torch.Tensor, cond: torch.Tensor, previous_cond: torch.Tensor,
                    previous_uncond: torch.Tensor) -> torch.Tensor:
    """ε̂_u = a ε_c(i) + b ε_c(i−1) + c ε_u(i−1) for one call's coefficients (a, b, c)."""
    a, b, c = (float(v) for v in coefficients)
    return a * cond + b * previous_cond + c * previous_uncond


class LinearAGFit:
    """Least-squares fit of the LinearAG coefficients, accumulated over fitting batches: per estimated call, the 3×3
    Gram matrix of the terms and their inner products with the target, in float64, summed over every element of
    every image (the normal equations of the regression)."""

    def __init__(self, calls: int):
        self.calls = calls
        self.estimated = estimated_calls(calls)
        self.gram = torch.zeros(calls, 3, 3, dtype=torch.float64)
        self.rhs = torch.zeros(calls, 3, dtype=torch.float64)
        self.target_square = torch.zeros(calls, dtype=torch.float64)
        self.images = 0

    def add(self, call: int, cond, previous_cond, previous_uncond, uncond) -> None:
        """One call's terms and target (noise directions) for a batch of images."""
        terms = torch.stack([t.flatten().double() for t in (cond, previous_cond, previous_uncond)])
        target = uncond.flatten().double()
        self.gram[call] += (terms @ terms.T).cpu()
        self.rhs[call] += (terms @ target).cpu()
        self.target_square[call] += target.square().sum().cpu()

    def coefficients(self) -> torch.Tensor:
        """[calls, 3] coefficients; NaN for the calls LinearAG does not estimate."""
        out = torch.full((self.calls, 3), float("nan"), dtype=torch.float64)
        for i in self.estimated:
            if self.target_square[i] == 0:
                raise ValueError(f"no fitting data for model call {i}")
            out[i] = torch.linalg.lstsq(self.gram[i], self.rhs[i].unsqueeze(1)).solution.squeeze(1)
        return out

    def relative_residuals(self, coefficients: torch.Tensor) -> dict[int, float]:
        """‖ε_u − ε̂_u‖/‖ε_u‖ of the fit, per estimated call, from the normal equations."""
        out = {}
        for i in self.estimated:
            k = coefficients[i]
            residual = self.target_square[i] - 2 * k @ self.rhs[i] + k @ self.gram[i] @ k
            out[i] = float((residual.clamp_min(0) / self.target_square[i]).sqrt())
        return out
