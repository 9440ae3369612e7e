"""PPAP: practical plug-and-play guidance by noise-range experts distilled without labels.

Go, Lee, Kim, Lee, Jeong, Lee, Choi, "Towards Practical Plug-and-Play Diffusion Models", CVPR 2023, arXiv:2212.05973; official
code github.com/riiid/PPAP (python_scripts/classifier_train.py, classifier_sample.py, peft/, guided_diffusion/
multi_expert_helper.py). An off-the-shelf classifier, trained on clean images, gives a poor gradient on the noisy
states a sampler visits, and one network asked to read every noise level does poorly at each (the paper's
study of classifiers under noise; its PDF was not readable here, so what follows cites the parts of its method and the
official code, not equation numbers). PPAP therefore:

- splits the T = 1000 diffusion timesteps into N equal ranges and gives each its *expert* (multi-experts; the official
  `range_list`: expert i reads t in [⌊iT/N⌋, ⌊(i+1)T/N⌋], N = 5 by default); at sampling time the expert of the
  current timestep guides (`MultiExpertWrapper.step_to_classifier_index`: the first range holding t);
- makes each expert a parameter-efficient fine-tune of one shared backbone, the off-the-shelf classifier itself
  (parameter-efficient fine-tuning): LoRA (Hu et al. 2021) on its layers, in the Conv2d form of loralib that the
  official `LoraConv2d` uses (ΔW = (B A).view(W.shape) · α/r, A of shape [r·k, C_in·k], B of shape [C_out·k, r·k], A Kaiming-
  uniform, B zero, r = 16 and α = 8 by default), with its normalisation layers and every bias but the head's also
  trained (the official `freeze_model`); an expert is stored as those tensors alone;
- trains the experts by data-free knowledge transfer: the diffusion model's own samples x₀ (no labels, no
  dataset) are noised to a timestep of the expert's range, and the expert's prediction on x_t is fitted to the clean
  classifier's prediction on x₀, sharpened by a temperature of 0.25:

      L = KL( softmax(f(x₀) / τ) ‖ softmax(f_φᵢ(x_t)) ),   τ = 0.25,

  averaged over the classes and the batch as the official `KLDivLoss(reduction="none").mean(-1)` does;
- guides with the expert's gradient as classifier guidance does (Dhariwal and Nichol 2021):
  ∇ log p(x_t | y) = ∇ log p(x_t) + s ∇ log p_φᵢ(y | x_t), the classifier read on the model's noisy input x_t
  itself (`cond_fn`: the gradient of log_softmax(f_φᵢ(x_t))_y with respect to x_t), s = 7.5 by default.

In ComfyUI's coordinates x = α(x₀ + ρ ε) (α = 1, ρ = σ for eps and v models; α = 1 − σ, ρ = σ/(1 − σ) for flow),
adding s ∇ₓ log p(y | x) to the score moves the denoised prediction by (`denoised_shift`)

    δ = s · ρ² α · ∇ₓ log p_φᵢ(y | x),

the same guided prediction for every sampler; for DDIM on an eps model it is exactly the official
`condition_score` (ε' = ε − √(1 − ᾱ) s ∇ log p), which the tests check in float64.

Training follows the official script: AdamW (lr 1e-4, weight decay 0.05), the learning rate annealed linearly to 0
over each expert's steps (`--anneal_lr True`), the total step budget split evenly over the experts, trained one
after another on one set of adapters (the script never resets them, so expert i starts from expert i − 1: the
low-noise expert first), random horizontal flips of the transfer images. The departures, each stated where it acts:
where LoRA goes (the official ResNet wrapper adapts the stem and the first two convolutions of each bottleneck; here
every convolution and linear layer but the head, `add_adapters`, so that any backbone can be adapted);
the expert reads the noisy input through the same affine map that takes a clean sample to the classifier's input
(the official student reads x_t unnormalised while the teacher reads normalised x₀; with the map, the expert of
the lowest noise starts as the teacher); its LoRA on linear layers carries the α/r scaling that the official
`LoRALinear.forward` leaves out (and its merge puts in); batches are drawn from the transfer set with replacement
(the official data loader goes through it in epochs).

Plain torch: the backbone, the noising and the data come from the caller.
"""

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

TIMESTEPS = 1000  # the discrete diffusion timesteps the official ranges split (ADM, 1000 steps)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


@dataclasses.dataclass(frozen=True)
class PPAPConfig:
    """The experts and their training; defaults from the official README's PPAP command and script defaults."""

    experts: int = 5  # N (`--n_experts 5`)
    rank: int = 16  # r (`--gamma 16`)
    alpha: float = 8.0  # α (`--lora_alpha 8`)
    steps: int = 300_000  # optimizer steps over all experts (`--iterations 300000`), steps // experts each
    batch: int = 256  # `--batch_size 256`
    learning_rate: float = 1e-4  # `--lr 1e-4`
    weight_decay: float = 0.05  # `--weight_decay 0.05`
    teacher_temperature: float = 0.25  # τ of the teacher's softmax (hard-coded in the official script)
    flip: bool = True  # random horizontal flips of the transfer images (`random_flip=True`)

    def __post_init__(self):
        for name in ("experts", "rank", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.steps < self.experts:
            raise ValueError(f"steps ({self.steps}) must give every one of the {self.experts} experts at least one "
                             "step")
        for name in ("alpha", "learning_rate", "teacher_temperature"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive, not {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, not {self.weight_decay}")

    @property
    def steps_per_expert(self) -> int:
        return self.steps // self.experts  # the official `args.iterations / args.n_experts`


def expert_ranges(experts: int, timesteps: int = TIMESTEPS) -> list[tuple[int, int]]:
    """[(⌊iT/N⌋, ⌊(i+1)T/N⌋)] for i < N: the official `range_list`."""
    return [(int(i / experts * timesteps), int((i + 1) / experts * timesteps)) for i in range(experts)]


def expert_index(timestep: float, experts: int, timesteps: int = TIMESTEPS) -> int:
    """The expert that guides at `timestep` (0 ≤ t ≤ T): the first range [lo, hi] holding it, as the official
    `step_to_classifier_index` (a boundary timestep goes to the lower range)."""
    for i, (low, high) in enumerate(expert_ranges(experts, timesteps)):
        if low <= timestep <= high:
            return i
    raise ValueError(f"timestep {timestep:g} lies outside [0, {timesteps}]")


class LoRAConv2d(nn.Module):
    """A frozen Conv2d plus the loralib low-rank update of its (square) kernel: W + (B A).view(W.shape) · α/r."""

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.conv = conv
        k = conv.kernel_size[0]
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(conv.weight.new_zeros((rank * k, conv.in_channels * k)))
        self.lora_B = nn.Parameter(conv.weight.new_zeros((conv.out_channels * k, rank * k)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling
        return self.conv._conv_forward(x, self.conv.weight + delta, self.conv.bias)


class LoRALinear(nn.Module):
    """A frozen Linear plus its low-rank update: x Wᵀ + x Aᵀ Bᵀ · α/r."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(linear.weight.new_zeros((rank, linear.in_features)))
        self.lora_B = nn.Parameter(linear.weight.new_zeros((linear.out_features, rank)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def adaptable(module: nn.Module) -> bool:
    """Layers that take LoRA: Linear, and Conv2d with a square kernel and no groups (loralib's Conv2d form)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.kernel_size[0] == module.kernel_size[1])


def head_name(network: nn.Module) -> str:
    """The classification head: the last Linear of the network, frozen weight and bias (the official `fc`)."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else ""


def add_adapters(backbone: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None
                 ) -> nn.Module:
    """A copy of `backbone` with LoRA on every adaptable layer but the head, its parameters frozen except the
    expert's (`expert_parameter_names`). With `generator`, the A matrices are drawn from it (reproducible)."""
    import copy

    network = copy.deepcopy(backbone)
    head = head_name(network)
    targets = [(name, module) for name, module in network.named_modules() if name != head and adaptable(module)]
    if not targets:
        raise ValueError("the classifier has no convolution or linear layer besides its head for LoRA to adapt")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        wrapper = (LoRALinear if isinstance(module, nn.Linear) else LoRAConv2d)(module, rank, alpha)
        if generator is not None:
            bound = 1 / math.sqrt(wrapper.lora_A.shape[1])  # kaiming_uniform_(a=√5)'s bound
            with torch.no_grad():
                wrapper.lora_A.copy_(torch.rand(wrapper.lora_A.shape, generator=generator) * 2 * bound - bound)
        setattr(parent, child, wrapper)
    trainable = set(expert_parameter_names(network))
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name in trainable)
    return network


def expert_parameter_names(network: nn.Module) -> list[str]:
    """The parameters an expert trains (the official `freeze_model`): LoRA's A and B, the affine parameters of the
    normalisation layers, and every bias but the head's."""
    head = head_name(network)
    norms = {name for name, module in network.named_modules() if isinstance(module, NORM_LAYERS)}
    names = []
    for name, _ in network.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if "lora_" in leaf or owner in norms or (leaf == "bias" and owner != head):
            names.append(name)
    return names


def expert_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """What one expert is: its trained parameters and its normalisation layers' running statistics (trained on its
    noise range), detached copies (the official `adapter_state_dict`)."""
    norms = {name for name, module in network.named_modules() if isinstance(module, NORM_LAYERS)}
    keep = set(expert_parameter_names(network))
    keep |= {name for name, _ in network.named_buffers() if name.rpartition(".")[0] in norms}
    return {name: value.detach().clone() for name, value in network.state_dict().items() if name in keep}


def load_expert(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Puts one expert's tensors into the adapted network (in place)."""
    own = network.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"the expert holds tensors the adapted classifier lacks ({', '.join(unknown[:3])}...): it "
                         "was made for another classifier or another LoRA rank")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ValueError(f"the expert's {name} has shape {tuple(value.shape)}, the adapted classifier's "
                                 f"{tuple(own[name].shape)}: it was made for another classifier or LoRA rank")
            own[name].copy_(value)


def trainable_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / τ) ‖ softmax(student)), averaged over classes and batch (the official KD loss)."""
    target = torch.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(torch.log_softmax(student_logits.float(), dim=1), target, reduction="none").mean()


def annealed_learning_rate(base: float, step: int, steps: int) -> float:
    """The official `set_annealed_lr`: base · (1 − step / steps), within one expert's steps."""
    return base * (1 - step / steps)


def range_timesteps(expert_range: tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` timesteps uniform over the expert's range [lo, hi) of the T discrete steps (the official schedule
    sampler with weights 1 on the range), as floats."""
    low, high = expert_range
    return torch.randint(low, max(high, low + 1), (count,), generator=generator).double()


def denoised_shift(gradient: torch.Tensor, sigma: float, flow: bool, scale: float) -> torch.Tensor:
    """δ = s ρ² α ∇ₓ log p(y | x): the denoised prediction's move that adds s ∇ₓ log p(y | x) to the score (module
    docstring). A flow model's pure-noise state (σ ≥ 1) carries no classifier information: no move."""
    if not flow:
        return gradient * (scale * sigma ** 2)
    if sigma >= 1:
        return torch.zeros_like(gradient)
    return gradient * (scale * sigma ** 2 / (1 - sigma))


def network_sha256(network: nn.Module) -> str:
    """SHA-256 of a network's tensors (names, shapes, float32 values): the identity of a backbone, so that experts
    never load onto another classifier."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
