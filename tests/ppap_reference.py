"""Float64 references for tests/test_ppap.py, transcribed from the official PPAP code (github.com/riiid/PPAP; Go et
al., "Towards Practical Plug-and-Play Diffusion Models", CVPR 2023) and from the guided-diffusion code it builds on.

Each function names the official function it follows. They share nothing with guiders/ppap.py or nodes/ppap_patch.py;
the only thing they assume of the pack is the naming of an expert's tensors, which follows the official wrappers
(`peft/lora.py`: the wrapped layer is the child `conv` or `linear`, next to `lora_A` and `lora_B`), so that an
expert's state loads onto the official wrappers as the official sampling script loads it (`load_state_dict(...,
strict=False)`).
"""

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def range_list(n_experts: int, max_step: int = 1000) -> list[list[int]]:
    """python_scripts/classifier_train.py: the timestep range [lo, hi) each expert is trained on."""
    ranges = []
    for interval in range(n_experts):
        now_range = [int(interval / n_experts * max_step), int((interval + 1) / n_experts * max_step)]
        ranges.append(now_range)
    return ranges


def step_to_classifier_index(t: float, n_experts: int, num_timesteps: int = 1000) -> int:
    """guided_diffusion/multi_expert_helper.py, `MultiExpertWrapper.step_to_classifier_index` (its `step_range` made
    in `__init__`), for one timestep: the expert that guides at t."""
    classifier_steps = [int(i * num_timesteps / n_experts) for i in range(0, n_experts + 1)]
    for i in range(0, len(classifier_steps)):
        if classifier_steps[i] <= t <= classifier_steps[i + 1]:
            return i


def set_annealed_lr(base_lr: float, frac_done: float) -> float:
    """python_scripts/classifier_train.py (`frac_done = step / iterations`, iterations per expert)."""
    return base_lr * (1 - frac_done)


def kd_loss(output: torch.Tensor, output_origin: torch.Tensor) -> torch.Tensor:
    """python_scripts/classifier_train.py, method "ppap": the student's logits `output` on the noisy images against
    the clean classifier's `output_origin`, temperature 0.25 hard-coded, then `loss.mean()` for the backward pass."""
    kd = torch.nn.KLDivLoss(reduction="none")(F.log_softmax(output.double(), dim=1),
                                               F.softmax(output_origin.double() / 0.25, dim=1))
    loss = kd.mean(dim=-1)
    return loss.mean()


def official_trainable(parameter_names: list[str]) -> set[str]:
    """peft/resnet_adapter.py, `AdapterWrapperResNet.freeze_model(True)`: which parameters of a LoRA-wrapped ResNet
    (torchvision names: `bn*` normalisation layers, `fc` head) train."""
    trainable = {n for n in parameter_names if "lora_" in n}
    for n in parameter_names:
        if "bias" in n:
            if "fc" not in n:
                trainable.add(n)
        elif "bn" in n:
            trainable.add(n)
    return trainable


def official_adapter_state_names(state_names: list[str]) -> set[str]:
    """peft/resnet_adapter.py, `AdapterWrapperResNet.adapter_state_dict`: what one expert checkpoint keeps."""
    kept = set()
    for name in state_names:
        if "lora_" in name:
            kept.add(name)
        elif "bn" in name:
            kept.add(name)
        elif "bias" in name:
            if "fc" not in name:
                kept.add(name)
    return kept


class LoraConv2d(nn.Module):
    """peft/lora.py `LoraConv2d` (loralib's Conv2d), its unmerged forward."""

    def __init__(self, r, lora_alpha, conv_layer):
        super().__init__()
        self.r, self.lora_alpha, self.conv = r, lora_alpha, conv_layer
        kernel_size = self.conv.kernel_size[0]
        self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * kernel_size, self.conv.in_channels * kernel_size)))
        self.lora_B = nn.Parameter(self.conv.weight.new_zeros((self.conv.out_channels * kernel_size, r * kernel_size)))
        self.scaling = self.lora_alpha / self.r
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def merged_weight(self):
        """`LoraConv2d.eval`: the weight the merged layer runs with."""
        return self.conv.weight + (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x):
        return F.conv2d(x, self.merged_weight(), self.conv.bias, self.conv.stride, self.conv.padding,
                        self.conv.dilation, self.conv.groups)


class LoRALinear(nn.Module):
    """peft/lora.py `LoRALinear` in its merged (eval) form, W + B A · α/r (the scaling that its unmerged forward
    leaves out; the pack applies it in both)."""

    def __init__(self, r, lora_alpha, linear_layer):
        super().__init__()
        self.r, self.lora_alpha, self.linear = r, lora_alpha, linear_layer
        self.lora_A = nn.Parameter(self.linear.weight.new_zeros((r, self.linear.in_features)))
        self.lora_B = nn.Parameter(self.linear.weight.new_zeros((self.linear.out_features, r)))
        self.scaling = self.lora_alpha / self.r
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        weight = self.linear.weight + (self.lora_B @ self.lora_A) * self.scaling
        return F.linear(x, weight, bias=self.linear.bias)


def expert_network(backbone: nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float) -> nn.Module:
    """A float64 copy of `backbone` in eval mode with the official LoRA wrappers on the layers `state` adapts, and
    `state` loaded as the official sampling script loads an expert (strict=False: missing keys are the frozen
    backbone's); an unexpected key is an error here, since it would be silently dropped there."""
    network = copy.deepcopy(backbone).double().eval()
    for name, module in list(network.named_modules()):
        if f"{name}.lora_A" not in state:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        wrapper = LoraConv2d if isinstance(module, nn.Conv2d) else LoRALinear
        setattr(parent, child, wrapper(rank, alpha, module))
    _, unexpected = network.load_state_dict({k: v.double() if v.is_floating_point() else v
                                             for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    return network.eval()


def class_gradient(network: nn.Module, x: torch.Tensor, y: torch.Tensor, read=lambda x: x) -> torch.Tensor:
    """python_scripts/classifier_sample.py `cond_fn` without the scale, in float64: ∇ₓ log softmax(f(read(x)))_y,
    `read` the classifier's input map (the identity there: the official classifier reads x_t)."""
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.double().detach().clone().requires_grad_(True)
        logits = network(read(x_in))
        log_probs = F.log_softmax(logits, dim=-1)
        selected = log_probs[range(len(logits)), y.view(-1)]
        return torch.autograd.grad(selected.sum(), x_in)[0]


def adm_linear_alphas_cumprod(num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """guided_diffusion/gaussian_diffusion.py `get_named_beta_schedule("linear")` → ᾱ_t (the official models'
    schedule, and the pack's reference model's)."""
    scale = 1000 / num_diffusion_timesteps
    betas = np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas, axis=0)


def scaled_linear_alphas_cumprod(start: float = 0.00085, end: float = 0.012, timesteps: int = 1000) -> np.ndarray:
    """Stable Diffusion's "scaled linear" schedule (betas linear in √β, the LDM "linear" schedule) → ᾱ_t."""
    betas = np.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


def guided_ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
                     cond_grad: torch.Tensor) -> torch.Tensor:
    """guided_diffusion/gaussian_diffusion.py `ddim_sample` with eta = 0 and `condition_score`, in the variance-
    preserving x_t of the official code; `eps` the model's output, `cond_grad` what `cond_fn` returns (the scaled class
    gradient at x_t). Without `clip_denoised` (ComfyUI never clips a prediction; a latent has no [-1, 1] range)."""
    sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alpha_bar)
    sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alpha_bar - 1)
    x, eps = x.double(), eps.double()
    pred_xstart = sqrt_recip_alphas_cumprod * x - sqrt_recipm1_alphas_cumprod * eps  # p_mean_variance
    # condition_score
    eps = (sqrt_recip_alphas_cumprod * x - pred_xstart) / sqrt_recipm1_alphas_cumprod
    eps = eps - math.sqrt(1 - alpha_bar) * cond_grad
    pred_xstart = sqrt_recip_alphas_cumprod * x - sqrt_recipm1_alphas_cumprod * eps
    # ddim_sample, eta = 0 (sigma = 0: no noise)
    eps = (sqrt_recip_alphas_cumprod * x - pred_xstart) / sqrt_recipm1_alphas_cumprod
    return pred_xstart * math.sqrt(alpha_bar_prev) + math.sqrt(1 - alpha_bar_prev) * eps
