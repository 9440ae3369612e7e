"""The APG patch that the node puts on a model: a ComfyUI pre-CFG hook around `guiders/apg.py`.

Kept apart from the node class so that scripts (benchmarks, evaluation) can patch a model exactly as the node does
without importing ComfyUI's node API.
"""

import torch

from ..guiders.apg import APGConfig, APGState, apg_cfg_uncond
from ..guiders.saliency import latent_weights
from .run_state import reserve_run_state, run_state

NODE_ID = "AdaptiveProjectedGuidance"
DISPLAY_NAME = "Adaptive Projected Guidance (APG)"


def apply_apg(model, config: APGConfig, mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` with APG at the sampler's CFG step; `mask` (a MASK, [B, H, W] in [0, 1])
    weights APG per position: 1 is APG, 0 the conditional prediction (no guidance)."""
    patched = model.clone()
    reserve_run_state(patched)
    patched.set_model_sampler_pre_cfg_function(APGHook(config, mask))
    return patched


class APGHook:
    """Pre-CFG hook: swaps the unconditional prediction for D_c − update, so the sampler's own CFG step at scale w
    yields APG at w (D_c + (w − 1)·update) and any CFG function or post-CFG patch downstream still composes."""

    node_name = DISPLAY_NAME
    # Marks APG's hook wherever this module was imported from (ComfyUI and scripts import the pack under different
    # package names, so the class itself is not one object): CFG++ refuses it.
    reshapes_extrapolation = True

    def __init__(self, config: APGConfig, mask: torch.Tensor | None = None):
        self.config = config
        self.mask = mask

    def __call__(self, args: dict) -> list:
        conds_out = args["conds_out"]
        if len(conds_out) < 2 or args["conds"][1] is None:  # cfg = 1: ComfyUI skipped the unconditional pass
            return conds_out
        sigma = float(args["sigma"].max())
        if not self.config.acts_at(sigma):
            return conds_out
        cond, uncond = conds_out[0], conds_out[1]
        state = run_state(args["model_options"], self, lambda: APGState(self.config.momentum))
        try:
            guided_uncond = apg_cfg_uncond(cond, uncond, self.config, state, sigma)
        except ValueError as e:
            raise ValueError(
                f"{DISPLAY_NAME}: {e} at sigma {sigma:.4g}. The model produced it before APG ran: run the model in "
                "float32 (e.g. start ComfyUI with --force-fp32) or check the checkpoint and LoRAs."
            ) from e
        if self.mask is not None:  # CFG at w of lerp(D_c, u, m) is D_c + m (w − 1) update: 0 leaves D_c
            guided_uncond = torch.lerp(cond, guided_uncond, latent_weights(self.mask, cond, DISPLAY_NAME))
        return [cond, guided_uncond, *conds_out[2:]]
