"""The project's reference model: a small class-conditional pixel-space diffusion model made of ComfyUI's own parts.

The denoiser is ComfyUI's `UNetModel` (openaimodel.py) with self-attention and cross-attention in its two lower
levels, so attention patches (PAG, cross-attention fusion) have something to act on. The condition is a class: each
class, and the empty class used for classifier-free guidance, is a short sequence of learned tokens that the UNet
reads through cross-attention, exactly as a text-to-image model reads its prompt. The model is a v-prediction model on
the DDPM linear schedule (ComfyUI's `ModelSamplingDiscrete`), in ComfyUI's 3-channel pixel space (the `pixel_space`
VAE), trained at 32×32; being fully convolutional apart from attention it also samples at 64×64.

Weights file (safetensors): `diffusion_model.*` (the UNet), `class_tokens` ([classes + 1, tokens, context_dim], the
last row being the empty class), metadata `class_names` (comma-separated).
"""

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    # self- and cross-attention at 16×16 and 8×8 (levels 2 and 3) and in the middle block
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "context_dim": 128,
    "num_head_channels": 32,
    "use_linear_in_transformer": True,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_checkpoint": False,
}
TOKENS_PER_CLASS = 4
SAMPLING_SETTINGS = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}


class PixelSpace(comfy.latent_formats.LatentFormat):
    """RGB in [-1, 1], as ComfyUI's `pixel_space` VAE produces and consumes it."""

    latent_channels = 3

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


class ReferenceConfig(comfy.supported_models_base.BASE):
    unet_config = UNET_CONFIG
    unet_extra_config = {}
    latent_format = PixelSpace
    sampling_settings = SAMPLING_SETTINGS
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

    def __init__(self, dtype=torch.float32):
        super().__init__(dict(UNET_CONFIG, dtype=dtype))
        self.set_inference_dtype(dtype, None)

    def get_model(self, state_dict=None, prefix="", device=None):
        return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device)


def build_base_model(device=None, dtype=torch.float32) -> comfy.model_base.BaseModel:
    return ReferenceConfig(dtype).get_model(device=device)


def initialise_for_training(model: comfy.model_base.BaseModel) -> None:
    """Gives the UNet torch's default initialisation, with the original LDM's zero-initialised block outputs.

    ComfyUI builds layers with weight initialisation disabled, since inference loads every weight; training needs it.
    As in the original latent-diffusion UNet, each residual block's last convolution, each transformer's output
    projection and the final convolution start at zero, so every block starts as the identity.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = model.diffusion_model
    for module in unet.modules():
        for base in type(module).__mro__:
            if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                base.reset_parameters(module)
                break
    zero = [unet.out[-1]]
    zero += [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)]
    zero += [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    with torch.no_grad():
        for layer in zero:
            for p in layer.parameters():
                p.zero_()


def class_tokens_parameter(num_classes: int, device=None) -> torch.nn.Parameter:
    """[classes + 1, tokens, context_dim] learned tokens; the last row is the empty class of classifier-free guidance."""
    shape = (num_classes + 1, TOKENS_PER_CLASS, UNET_CONFIG["context_dim"])
    return torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)


def unet_state(state_dict: dict) -> dict:
    """The UNet's tensors of a reference weights file, named as in `model.diffusion_model`."""
    prefix = "diffusion_model."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_reference(state_dict: dict, class_names: list[str]):
    """(ModelPatcher, class tokens) from a reference weights file's tensors, on ComfyUI's devices."""
    load_device = comfy.model_management.get_torch_device()
    dtype = comfy.model_management.unet_dtype(supported_dtypes=ReferenceConfig.supported_inference_dtypes)
    model = build_base_model(device=comfy.model_management.unet_offload_device(), dtype=dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(unet_state(state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(f"reference weights do not fit the reference UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokens = state_dict["class_tokens"].float()
    if tokens.shape != (len(class_names) + 1, TOKENS_PER_CLASS, UNET_CONFIG["context_dim"]):
        raise ValueError(f"class_tokens has shape {tuple(tokens.shape)}, expected one row per class plus the empty class")
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )
    return patcher, tokens


def class_conditioning(tokens: torch.Tensor, class_index: int | None) -> list:
    """ComfyUI CONDITIONING for one class (or the empty class when class_index is None)."""
    row = tokens.shape[0] - 1 if class_index is None else class_index
    return [[tokens[row : row + 1].clone(), {}]]
