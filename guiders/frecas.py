"""Frequency-aware cascaded sampling (FreCaS).

Zhang, Li, Zhang, "FreCaS: Efficient Higher-Resolution Image Generation via Frequency-aware Cascaded Sampling",
ICLR 2025, arXiv:2410.18410; official code github.com/xtudbxk/FreCaS (read here: `utils/scheduler_wrapper.py`,
`utils/facfg_wrapper.py`, `utils/camap_wrapper.py`, `test.sh`). Section numbers below are the paper's (Sec. 3); the
formulas are written as the official code computes them.

Cascaded stages (Sec. 3.2). Sampling runs in N+1 stages of rising resolution s_0 < … < s_N, s_0 the training size.
Stage i samples the timesteps ⌊linspace(t_start_i, t_end_i, n_i)⌋ (t_start_0 = 999, t_end_N = 0); its last model
call gives the clean estimate ẑ_0, which is upsampled to s_{i+1} (decoded, nearest-neighbour upsampled in pixels and
re-encoded: `transition` in nodes/frecas_patch.py) and diffused again to the next stage's first timestep:

    z_{t_start_{i+1}} = √ᾱ · up(ẑ_0) + √(1 − ᾱ) · ε                  (flow models: (1 − σ) up(ẑ_0) + σ ε)

The next stage starts at the noise level whose signal-to-noise ratio is the end level's scaled by (s_i / s_{i+1})^γ,
which keeps the noise per low-frequency component of the larger image at what the smaller one had
(`get_next_starttimestep`: ᾱ' = sᾱ / (1 + (s − 1)ᾱ), SNR' = s·SNR, s = (s_i / s_{i+1})^γ, rounded up to the next
discrete timestep; γ = 3.0 for SD2.1, 1.5 for SDXL at 2048², 2.0 for SDXL at 4096²). The flow models' rule
(`get_next_starttimestep_rf`, SD3) is the same with γ = 1: t' = ⌊1000·k·t / (1000 + (k − 1) t)⌋, k = √(s_{i+1}/s_i),
on the unshifted timestep.

FA-CFG (Sec. 3.3). In every stage after the first, the guidance update is split into the band the previous stage
could already represent and the band this stage adds, and the new band gets its own, larger strength:

    low(x) = up(down(x, s_{i−1}), s_i)          (bilinear both ways, `freq_decompose`; kernels/frequency.py)
    ε̂ = ε_u + w_l · low(ε_c − ε_u) + w_h · (ε_c − ε_u − low(ε_c − ε_u))

The official code applies it to the model's ε output; the denoised predictions of every parameterisation are
D = a(σ)·x + b(σ)·output with the same a, b for both passes, so the same combination of D_c and D_u is the same
sample, and computing it on D serves eps, v and flow models with one code path.

Cross-attention map fusion (Sec. 3.4). At the last step of each stage but the last, every cross-attention's
probabilities softmax(QKᵀ/√d), averaged over heads, are collected; maps of one resolution are averaged, resized to
the largest and averaged again into one map per image. Every cross-attention of the next stage then outputs

    out = (1 − w_c) · softmax(QKᵀ/√d) V + w_c · up(M̄) V

with up(M̄) the fused map resized to that layer's resolution. The official code resizes the maps as [tokens, keys]
images, i.e. along the row-major flattened token axis (`F.interpolate(map, size=(N_q, N_k))`), which maps positions
to the wrong places (a new row takes half of an old row, stretched); this module resizes them on the 2-D grid of
positions, which is what the paper describes. (The official SD3 path of this fusion refers to an undefined name and
cannot run; nodes/frecas_patch.py offers the fusion on UNets only.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..kernels.frequency import weight_bands
from .checks import check_finite

FIRST_TIMESTEP = 999
TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    """The official settings for one model family (test.sh and the README of the official code)."""

    steps: tuple[int, ...]
    ends: tuple[int, ...]
    gamma: float
    cfg: float
    cfg_high: float
    attention_fusion: float


# Two stages (2× side, 4× area) per family, from the official test.sh: SD2.1 512→1024, SDXL 1024→2048 and SD3
# 1024→2048. SD1.x (512², no official setting) takes SD2.1's. The three-stage settings of test.sh (SD2.1 to 2048²:
# steps 30,10,10, ends 200,200,0, w_h 35, w_c 0.4; SDXL to 4096²: steps 30,5,15, ends 400,200,0, γ 2.0) are in the
# node's tooltips.
FAMILY_DEFAULTS = {
    "sd1": FamilyDefaults((40, 10), (100, 0), 3.0, 7.5, 45.0, 0.6),
    "sd2": FamilyDefaults((40, 10), (100, 0), 3.0, 7.5, 45.0, 0.6),
    "sdxl": FamilyDefaults((40, 10), (200, 0), 1.5, 7.5, 35.0, 0.6),
    "sd3": FamilyDefaults((20, 8), (50, 0), 1.0, 7.5, 35.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its latent size (height, width) and the discrete timesteps it samples, highest first."""

    size: tuple[int, int]
    timesteps: tuple[int, ...]


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """'40, 10' → (40, 10); commas or spaces separate the numbers."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name} must be whole numbers separated by commas, like '40, 10'; got '{text}'") from None
    if not values:
        raise ValueError(f"{name} is empty; give one number per stage, like '40, 10'")
    return values


def check_plan(steps: tuple[int, ...], ends: tuple[int, ...]) -> None:
    """Raises ValueError unless `steps` and `ends` describe a plan of at least two stages."""
    if len(steps) != len(ends):
        raise ValueError(f"steps gives {len(steps)} stages and stage_ends {len(ends)}; give one number per stage in "
                         "both")
    if len(steps) < 2:
        raise ValueError("FreCaS needs at least two stages (the training size and a larger one), e.g. steps '40, 10' "
                         "and stage_ends '200, 0'")
    if any(n < 1 for n in steps):
        raise ValueError(f"every stage needs at least one step; got steps {list(steps)}")
    if ends[-1] != 0:
        raise ValueError(f"the last stage must end at timestep 0 (a clean image); got stage_ends {list(ends)}")
    if any(not 0 <= e < FIRST_TIMESTEP for e in ends):
        raise ValueError(f"stage_ends are timesteps in [0, {FIRST_TIMESTEP}); got {list(ends)}")
    if any(a < b for a, b in zip(ends, ends[1:])):  # equal ends pass: the official SD2.1 2048 plan is 200, 200, 0
        raise ValueError(f"stage_ends must not rise from stage to stage; got {list(ends)}")


def stage_sizes(base: tuple[int, int], target: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """Latent sizes from the training size `base` to `target`, in geometric steps (the official 3-stage plans are
    1024 → 2048 → 4096 and 512 → 1024 → 2048)."""
    if stages < 2:
        raise ValueError(f"FreCaS needs at least two stages; got {stages}")
    if target[0] < base[0] or target[1] < base[1] or tuple(target) == tuple(base):
        raise ValueError(f"the target latent {target[1]}x{target[0]} must be larger than the first stage's "
                         f"{base[1]}x{base[0]} in at least one side and smaller in none")
    sizes = []
    for i in range(stages):
        f = i / (stages - 1)
        sizes.append(tuple(round(b * (t / b) ** f) for b, t in zip(base, target)))
    return sizes


def size_ratio(small: tuple[int, int], large: tuple[int, int]) -> float:
    """s_{i+1}/s_i along the side that grows most, as the official code picks it."""
    return max(large[0] / small[0], large[1] / small[1])


def stage_timesteps(start: int, end: int, steps: int) -> tuple[int, ...]:
    """⌊linspace(start, end, steps)⌋ as the official code (`torch.linspace(...).to(torch.int32)`)."""
    return tuple(int(t) for t in torch.linspace(start, end, steps, dtype=torch.float32).to(torch.int32))


def next_start_vp(alphas_cumprod: torch.Tensor, end: int, ratio: float, gamma: float) -> int:
    """The first timestep of the next stage for a VP (eps/v) model: the first discrete t whose ᾱ_t is at most
    sᾱ_end / (1 + (s − 1)ᾱ_end), s = ratio^−γ (`get_next_starttimestep`)."""
    s = ratio ** (-gamma)
    a = alphas_cumprod.double()
    target = s * a[end] / (1 + (s - 1) * a[end])
    t = len(a) - int(torch.searchsorted(torch.flip(a, dims=(0,)), target, right=True))
    return min(t, FIRST_TIMESTEP)


def next_start_flow(end: int, ratio: float, gamma: float = 1.0) -> int:
    """The first timestep of the next stage for a flow model: the time shift by k = ratio^(γ/2) of the end timestep
    (`get_next_starttimestep_rf`, whose k = √ratio is γ = 1)."""
    k = ratio ** (gamma / 2)
    return min(int(TIMESTEPS * k * end / (TIMESTEPS + (k - 1) * end)), FIRST_TIMESTEP)


def plan_stages(sizes: list[tuple[int, int]], steps: tuple[int, ...], ends: tuple[int, ...], gamma: float,
                alphas_cumprod: torch.Tensor | None) -> list[Stage]:
    """The stages of a FreCaS run. `alphas_cumprod` is the VP model's ᾱ_t (t = 0 … 999); None for flow models."""
    check_plan(steps, ends)
    check_finite(gamma=gamma)
    if len(sizes) != len(steps):
        raise ValueError(f"{len(sizes)} stage sizes for {len(steps)} stages")
    stages, start = [], FIRST_TIMESTEP
    for i, (size, n, end) in enumerate(zip(sizes, steps, ends)):
        if start <= end:
            raise ValueError(f"stage {i + 1} would start at timestep {start}, not above its end {end}: raise the "
                             f"previous stage's end or gamma")
        stages.append(Stage(tuple(size), stage_timesteps(start, end, n)))
        if i + 1 < len(sizes):
            ratio = size_ratio(size, sizes[i + 1])
            start = (next_start_vp(alphas_cumprod, end, ratio, gamma) if alphas_cumprod is not None
                     else next_start_flow(end, ratio, gamma))
    return stages


def fa_cfg(cond: torch.Tensor, uncond: torch.Tensor, low_size: tuple[int, int], w_low: float,
           w_high: float) -> torch.Tensor:
    """FA-CFG: uncond + w_low·low(Δ) + w_high·(Δ − low(Δ)), Δ = cond − uncond, low = the band that the latent size
    `low_size` (the previous stage's) represents. With w_low = w_high it is CFG."""
    return uncond + weight_bands(cond - uncond, low_size, w_low, w_high)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QKᵀ/√d) averaged over heads, in float32: q [B, N_q, heads·d], k [B, N_k, heads·d] → [B, N_q, N_k]."""
    b, nq, width = q.shape
    d = width // heads
    qh = q.float().view(b, nq, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1).mean(dim=1)


def resize_map(probs: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Attention maps [B, h·w, N_k] on the position grid (h, w) resized bilinearly to the grid `size`: [B, H·W, N_k].
    Every row stays a distribution over the keys (bilinear weights sum to one)."""
    if tuple(grid) == tuple(size):
        return probs
    b, _, nk = probs.shape
    images = probs.transpose(1, 2).reshape(b, nk, *grid)
    resized = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)
    return resized.reshape(b, nk, -1).transpose(1, 2)


class CrossAttentionMaps:
    """The cross-attention maps of one FreCaS run: collected at the last step of a stage (`collect`), fused when the
    stage ends (`end_stage`), read by every cross-attention of the next stage (`fused_at`).

    Maps are kept per chunk of the model's batch (`key`: the conditioning it belongs to, e.g. conditional or
    unconditional), so that ComfyUI may batch the passes together or run them apart."""

    def __init__(self):
        self._collected: dict[object, dict[tuple[int, int], list]] = {}
        self._fused: dict[object, tuple[torch.Tensor, tuple[int, int]]] = {}
        # Every cross-attention of a resolution reads the same resized maps at every step of the stage: made once.
        self._batches: dict[tuple, torch.Tensor] = {}

    @property
    def ready(self) -> bool:
        return bool(self._fused)

    def collect(self, key, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        sums = self._collected.setdefault(key, {})
        total, count = sums.get(tuple(grid), (0.0, 0))
        sums[tuple(grid)] = (total + probs.float(), count + 1)

    def end_stage(self) -> None:
        """Fuses what was collected (the mean per resolution, resized to the largest and averaged) and starts
        collecting afresh; without a collection the previous fused maps stay."""
        if not self._collected:
            return
        fused = {}
        for key, sums in self._collected.items():
            largest = max(sums, key=lambda g: g[0] * g[1])
            maps = [resize_map(total / count, grid, largest) for grid, (total, count) in sums.items()]
            fused[key] = (torch.stack(maps).mean(dim=0), largest)
        self._fused, self._collected, self._batches = fused, {}, {}

    def fused_at(self, key, grid: tuple[int, int]) -> torch.Tensor | None:
        if key not in self._fused:
            return None
        probs, own = self._fused[key]
        return resize_map(probs, own, grid)

    def batch_at(self, keys: list, grid: tuple[int, int], rows: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor | None:
        """The fused maps of the chunks `keys` (`rows` images each) at `grid`, stacked as one batch [B, N_q, N_k] in
        `dtype` on `device`; None when a chunk has no fused maps of that many images."""
        index = (tuple(keys), tuple(grid), rows, dtype, device)
        if index not in self._batches:
            parts = [self.fused_at(key, grid) for key in keys]
            if not all(p is not None and p.shape[0] == rows for p in parts):
                return None
            self._batches[index] = torch.cat(parts).to(device=device, dtype=dtype)
        return self._batches[index]


def fuse_attention(out: torch.Tensor, fused_map: torch.Tensor, value: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w_c)·out + w_c·M̄V: out [B, N_q, C] the layer's attention output, fused_map [B, N_q, N_k] (one map for
    every head), value [B, N_k, C]."""
    guided = torch.bmm(fused_map.to(device=value.device, dtype=value.dtype), value)
    return torch.lerp(out, guided, weight)


def check_weights(cfg: float, cfg_high: float, attention_fusion: float) -> None:
    check_finite(cfg=cfg, cfg_high=cfg_high, attention_fusion=attention_fusion)
    if not 0.0 <= attention_fusion <= 1.0:
        raise ValueError(f"attention_fusion is a weight in [0, 1]; got {attention_fusion}")
