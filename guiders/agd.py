"""Adapter guidance distillation (AGD): classifier-free guidance's prediction in one pass of the model.

Jensen and Sadat, "Efficient Distillation of Classifier-Free Guidance using Adapters", arXiv:2503.07274 (2025);
official code github.com/cristianpjensen/agd. CFG needs a conditional and an unconditional pass per step,

    D_w(x, σ, c) = D(x, σ, ∅) + w (D(x, σ, c) − D(x, σ, ∅))                                     (CFG)

AGD keeps the base model frozen and adds small adapters, conditioned on w, trained so that one conditional pass of
the adapted model gives D_w. Its two points:

- the adapters (about 2% of the parameters) sit beside every cross-attention of the denoiser; each is a single-head
  cross-attention from the cross-attention's input to a short sequence of condition tokens (the guidance scale's
  embedding, the timestep's, and the prompt's tokens), whose output is added to the cross-attention's output
  (official `agd/models/attention.py`, `CrossAttentionCFGAdapter`, attached to every `attn2` in `agd/sd/adapter.py`).
  The output projection starts at zero, so the adapted model starts as the base model;
- they are trained on CFG-guided trajectories, the states that sampling with CFG visits, not on training images
  noised forward ("ordinary diffusion trajectories", as earlier guidance distillation did), which removes the mismatch
  between the states seen in training and at inference (official `agd/sd/sample_trajectories.py`): each trajectory
  is sampled with CFG at a scale drawn uniformly from [w_min, w_max] ([1, 12] for Stable Diffusion, [1, 6] for DiT),
  and every step's (x_t, t, c, w) is a training input with the CFG prediction as its target. The loss is the mean
  squared error of the model's own output (ε for their models), AdamW at 1e-4 with 10% linear warm-up and a cosine
  decay, batch 64, 5000 steps (official `agd/sd/train.py`, `agd/utils/training_loop.py`).

Here the loss is taken on denoised predictions D, the space in which ComfyUI combines CFG, weighted per sample by
1/b(σ)², b(σ) = |∂D/∂(model output)|, which makes it the official MSE of the model's own output whatever that output
is (ε, v or a flow velocity; `nodes/agd_patch.py` `output_scale` computes b(σ) with ComfyUI's noise schedule).
For ε and v the target is the same as CFG on the raw outputs, since D is affine in the output with the same
coefficients for both passes.

This module holds the adapters and the training objective in plain torch; where the adapters attach in a ComfyUI
model and the training loop are in `nodes/agd_patch.py`.
"""

import dataclasses
import json
import math

import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "comfyui-guidance.agd/1"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The adapters' size and what they attend to; defaults from the official Stable Diffusion code: `--hidden-dim
    320`, `mlp_ratio` 4, and the timestep and prompt tokens, which the official model builders (`agd/sd/adapter.py`,
    `get_untrained_adapter*`) read by default while its training CLI reads them only when passed `--use-timestep` and
    `--use-prompt` (the repository's README elides the options of the paper's runs)."""

    hidden_dim: int = 320
    mlp_ratio: float = 4.0
    use_timestep: bool = True
    use_prompt: bool = True

    def __post_init__(self):
        if not (isinstance(self.hidden_dim, int) and self.hidden_dim >= 2 and self.hidden_dim % 2 == 0):
            raise ValueError(f"hidden_dim must be an even integer >= 2, not {self.hidden_dim}")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"mlp_ratio must be positive, not {self.mlp_ratio}")


@dataclasses.dataclass(frozen=True)
class AttachmentPoint:
    """A cross-attention of the base model: where it sits (ComfyUI's block, e.g. ("input", 4), and the index of the
    transformer block in it) and the width of its input."""

    block: tuple[str, int]
    index: int
    input_dim: int

    @property
    def name(self) -> str:
        return f"{self.block[0]}_{self.block[1]}_{self.index}"


def fourier_features(frequencies: torch.Tensor, phases: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """cos(2π (f w + φ)) in float32 whatever the model's dtype, as the official adapters were trained and sampled: in
    float16 the angle f w + φ at w = 12 keeps too few digits (features off by up to 0.1)."""
    return torch.cos(2 * math.pi * (frequencies.float() * value.float().unsqueeze(-1) + phases.float()))


class FourierFeatures(nn.Module):
    """cos(2π (f w + φ)) with fixed random f ~ N(0, 1), φ ~ U(0, 1) (official `FourierEncoding`); f and φ stay
    float32 when the module is cast to another dtype, so that the features do (`fourier_features`)."""

    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim, generator=generator))
        self.register_buffer("phases", torch.rand(dim, generator=generator))

    def _apply(self, fn, recurse=True):
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            self._buffers[name] = buffer.float().to(self._buffers[name].device)
        return self

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return fourier_features(self.frequencies, self.phases, value)


def xavier_(layer: nn.Linear, gain: float, generator: torch.Generator | None) -> None:
    bound = gain * math.sqrt(6.0 / (layer.in_features + layer.out_features))
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()


class ScaleEmbedding(nn.Module):
    """The guidance scale's token: Fourier features, an MLP and LayerNorm (official `ScalarEncoder`)."""

    def __init__(self, dim: int, mlp_ratio: float, generator: torch.Generator | None = None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fourier = FourierFeatures(dim, generator)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        for layer in (self.fc1, self.fc2):
            xavier_(layer, math.sqrt(2), generator)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.relu(self.fc1(self.fourier(scale).to(self.fc1.weight.dtype)))))


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32, max_period: float = 1e4):
    """[length, dim] positions of the condition tokens: sines then cosines (official `PositionalEncoding`)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(-math.log(max_period) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angle = position * frequency
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(dtype)


class GuidanceAdapter(nn.Module):
    """One adapter: a single-head cross-attention from the features entering a cross-attention ([B, T, C]) to the
    condition tokens [scale, timestep, prompt tokens…] (each projected to `hidden_dim`, plus positions), whose output,
    projected back to C, is added to that cross-attention's output. `out_proj` starts at zero: the identity."""

    def __init__(self, input_dim: int, spec: AdapterSpec, time_dim: int | None, prompt_dim: int | None,
                 generator: torch.Generator | None = None):
        super().__init__()
        h = spec.hidden_dim
        self.spec = spec
        self.q_proj = nn.Linear(input_dim, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.out_proj = nn.Linear(h, input_dim)
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            xavier_(layer, 1.0, generator)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.scale_embedding = ScaleEmbedding(h, spec.mlp_ratio, generator)
        if spec.use_timestep:
            if not time_dim:
                raise ValueError("the adapter reads the timestep, but the base model has no timestep embedding")
            self.time_proj = nn.Linear(time_dim, h)
            xavier_(self.time_proj, 1.0, generator)
        if spec.use_prompt:
            if not prompt_dim:
                raise ValueError("the adapter reads the prompt, but the base model has no cross-attention context")
            self.prompt_proj = nn.Linear(prompt_dim, h)
            xavier_(self.prompt_proj, 1.0, generator)

    def condition_tokens(self, scale: torch.Tensor, time_embedding: torch.Tensor | None,
                         prompt: torch.Tensor | None) -> torch.Tensor:
        """[B, S, hidden_dim]: the scale's token, the timestep's, the prompt's tokens, with their positions."""
        tokens = [self.scale_embedding(scale).unsqueeze(1)]
        if self.spec.use_timestep:
            tokens.append(self.time_proj(time_embedding).unsqueeze(1))
        if self.spec.use_prompt:
            tokens.append(self.prompt_proj(prompt))
        tokens = torch.cat(tokens, dim=1)
        return tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[2], tokens.device, tokens.dtype)

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The adapter's output for features x [B, T, C] given the condition tokens' keys and values [B, S, h]."""
        q = self.q_proj(x).unsqueeze(1)
        attended = F.scaled_dot_product_attention(q, keys.unsqueeze(1), values.unsqueeze(1),
                                                  scale=1 / math.sqrt(self.spec.hidden_dim))
        return self.out_proj(attended.squeeze(1))

    def forward(self, x: torch.Tensor, scale: torch.Tensor, time_embedding: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.condition_tokens(scale, time_embedding, prompt)
        return self.attend(x, self.k_proj(tokens), self.v_proj(tokens))


class StackedConditions:
    """The condition tokens' keys and values of every adapter of a set at once ([A, B, S, h]), with the adapters'
    token weights stacked: what each adapter's `condition_tokens`, `k_proj` and `v_proj` compute, in a few batched
    operations per model call instead of a few dozen small ones per adapter (the UNet's sampling is launch-bound on
    fast GPUs, where per-adapter kernels would cost more than the pass AGD saves). Read-only: for sampling."""

    def __init__(self, adapters: list[GuidanceAdapter]):
        first = adapters[0]
        self.spec = first.spec

        def stack(get):
            return torch.stack([get(a).detach() for a in adapters])

        e = lambda a: a.scale_embedding  # noqa: E731
        self.frequencies, self.phases = stack(lambda a: e(a).fourier.frequencies), stack(lambda a: e(a).fourier.phases)
        self.fc1 = (stack(lambda a: e(a).fc1.weight), stack(lambda a: e(a).fc1.bias))
        self.fc2 = (stack(lambda a: e(a).fc2.weight), stack(lambda a: e(a).fc2.bias))
        self.norm = (stack(lambda a: e(a).norm.weight), stack(lambda a: e(a).norm.bias), e(first).norm.eps)
        self.time = (stack(lambda a: a.time_proj.weight), stack(lambda a: a.time_proj.bias)) \
            if self.spec.use_timestep else None
        self.prompt = (stack(lambda a: a.prompt_proj.weight), stack(lambda a: a.prompt_proj.bias)) \
            if self.spec.use_prompt else None
        self.keys, self.values = stack(lambda a: a.k_proj.weight), stack(lambda a: a.v_proj.weight)

    def keys_values(self, scale: torch.Tensor, time_embedding: torch.Tensor | None = None,
                    prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.keys.dtype
        h = fourier_features(self.frequencies.unsqueeze(1), self.phases.unsqueeze(1), scale.view(1, -1)).to(dtype)
        h = F.relu(torch.baddbmm(self.fc1[1].unsqueeze(1), h, self.fc1[0].transpose(1, 2)))
        h = torch.baddbmm(self.fc2[1].unsqueeze(1), h, self.fc2[0].transpose(1, 2))
        weight, bias, eps = self.norm
        tokens = [(F.layer_norm(h, h.shape[-1:], eps=eps) * weight.unsqueeze(1) + bias.unsqueeze(1)).unsqueeze(2)]
        if self.time is not None:
            t = torch.einsum("bd,ahd->abh", time_embedding.to(dtype), self.time[0]) + self.time[1].unsqueeze(1)
            tokens.append(t.unsqueeze(2))
        if self.prompt is not None:
            tokens.append(torch.einsum("bld,ahd->ablh", prompt.to(dtype), self.prompt[0])
                          + self.prompt[1].view(self.prompt[1].shape[0], 1, 1, -1))
        tokens = torch.cat(tokens, dim=2)
        tokens = tokens + sinusoidal_positions(tokens.shape[2], tokens.shape[3], tokens.device, dtype)
        return (torch.einsum("absh,agh->absg", tokens, self.keys), torch.einsum("absh,agh->absg", tokens, self.values))


class AdapterSet(nn.Module):
    """The adapters of one base model, one per attachment point, with what they were made for."""

    def __init__(self, points: list[AttachmentPoint], spec: AdapterSpec, time_dim: int | None,
                 prompt_dim: int | None, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.points, self.spec, self.time_dim, self.prompt_dim = list(points), spec, time_dim, prompt_dim
        self.adapters = nn.ModuleDict({p.name: GuidanceAdapter(p.input_dim, spec, time_dim, prompt_dim, generator)
                                       for p in points})
        self.info: dict[str, str] = {}  # what the adapters were made for (base fingerprint, training), saved with them

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layout(self) -> dict:
        return adapter_layout(self.points, self.spec, self.time_dim, self.prompt_dim)


def adapter_layout(points: list[AttachmentPoint], spec: AdapterSpec, time_dim: int | None,
                   prompt_dim: int | None) -> dict:
    """What must match for adapters to load into a model: spec, attachment points and condition widths."""
    return {"spec": dataclasses.asdict(spec), "time_dim": time_dim, "prompt_dim": prompt_dim,
            "points": [[p.block[0], p.block[1], p.index, p.input_dim] for p in points]}


def save_adapters(adapters: AdapterSet, path: str) -> None:
    """safetensors holding the adapters' tensors only, float32, with their layout and `info` as metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapters.state_dict().items()}
    metadata = {"format": FORMAT, "layout": json.dumps(adapters.layout()), **adapters.info}
    save_file(tensors, path, metadata=metadata)


def load_adapters(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterSet:
    """The AdapterSet of a file's tensors and metadata (as `save_adapters` wrote them)."""
    if (metadata or {}).get("format") != FORMAT:
        raise ValueError(f"not an AGD adapter file (format {(metadata or {}).get('format')!r}, expected {FORMAT!r})")
    layout = json.loads(metadata["layout"])
    points = [AttachmentPoint((kind, block), index, dim) for kind, block, index, dim in layout["points"]]
    adapters = AdapterSet(points, AdapterSpec(**layout["spec"]), layout["time_dim"], layout["prompt_dim"])
    missing, unexpected = adapters.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"the file's tensors do not fit its layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapters.info = {k: v for k, v in metadata.items() if k not in ("format", "layout")}
    return adapters


def cfg_prediction(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """D_u + w (D_c − D_u) with one w per sample ([B])."""
    w = scale.to(cond.dtype).view(-1, *[1] * (cond.ndim - 1))
    return uncond + w * (cond - uncond)


def uniform_scales(count: int, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The trajectories' guidance scales, uniform in [low, high] (official `random.uniform(min, max)`)."""
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def distillation_loss(student: torch.Tensor, target: torch.Tensor, output_scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the model's own output: of denoised predictions, each sample divided by
    b(σ) = |∂D/∂output| (`nodes/agd_patch.py` `output_scale`)."""
    b = output_scale.to(student.dtype).view(-1, *[1] * (student.ndim - 1))
    return ((student - target) / b).square().mean()


def learning_rate_factor(step: int, total: int, warmup_fraction: float = 0.1, floor: float = 1e-4) -> float:
    """The official schedule as a factor of the base rate: linear warm-up from `floor` over the first 10% of the
    steps, then a cosine down to `floor` (torch's LinearLR then CosineAnnealingLR with eta_min = lr · floor)."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return floor + (1 - floor) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
