"""ComfyUI node for adaptive projected guidance (`guiders/apg.py`)."""

from comfy_api.latest import io

from ..guiders.apg import THRESHOLD_MODES, VIDEO_MODES, APGConfig
from ..guiders.sigma_range import SIGMA_MAX, SIGMA_MIN
from .apg_patch import DISPLAY_NAME, NODE_ID, apply_apg
from .validation import SIGMA_RANGE_RULE, check_widgets


class AdaptiveProjectedGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = APGConfig()
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "APG (Sadat et al., ICLR 2025): CFG whose update is split into parts parallel and orthogonal to the "
                "conditional prediction, with the parallel part (the cause of oversaturation) down-weighted, the "
                "update's norm capped, and reverse momentum. Set the guidance scale on the sampler as usual; with "
                "eta=1, norm_threshold=0 and momentum=0 this is exactly CFG at that scale."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (any family: UNet or DiT, eps, v or flow)."),
                io.Float.Input(
                    "eta", default=defaults.eta, min=0.0, max=1.0, step=0.01,
                    tooltip="Weight of the update's part parallel to the conditional prediction, which mainly "
                    "oversaturates. 0 (paper default) removes it; 1 keeps it as in CFG.",
                ),
                io.Float.Input(
                    "norm_threshold", default=defaults.norm_threshold, min=0.0, max=100.0, step=0.1,
                    tooltip="r: the guidance update is rescaled to at most this L2 norm per image (per latent frame with video_mode=frame; scaled by sqrt(n/65536) with threshold_mode=per-element). 0 disables. "
                    "Paper value for SDXL latents: 15; lower values guide more gently.",
                ),
                io.Float.Input(
                    "momentum", default=defaults.momentum, min=-1.0, max=1.0, step=0.01,
                    tooltip="beta: running average of the update across steps. Negative (reverse momentum, paper "
                    "default -0.5) pushes away from earlier update directions; 0 disables.",
                ),
                io.Float.Input(
                    "sigma_start", default=defaults.sigma_start, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                    tooltip="APG acts only while sigma_end <= sigma <= sigma_start; other steps use plain CFG. "
                    "The default covers every schedule.",
                ),
                io.Float.Input(
                    "sigma_end", default=defaults.sigma_end, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                    tooltip="Lowest sigma at which APG acts (see sigma_start). 0 keeps it on to the last step.",
                ),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where APG guides, per position (a MASK at image size, resized to the "
                              "latent; one for all images or one per image). 1 = APG as is, 0 = the conditional "
                              "prediction (no guidance), values between blend the two. Saliency Map From Markers "
                              "makes one."),
                io.Combo.Input(
                    "threshold_mode", options=list(THRESHOLD_MODES), default=defaults.threshold_mode, optional=True,
                    tooltip="absolute (the paper's): norm_threshold caps the update's L2 norm over the whole latent, "
                    "which was tuned on SDXL at 1024x1024; the same value binds harder on larger latents (2048x2048, "
                    "video clips) and less on smaller ones (SD1.5 at 512x512). per-element: the cap grows with the "
                    "square root of the latent's size relative to SDXL at 1024x1024, so one norm_threshold caps the "
                    "same per-element (RMS) update at every resolution, model and clip length. Use absolute for "
                    "SDXL at 1024x1024 and settings tuned there; per-element to carry a tuned value to another size or "
                    "model, then check it there (the update does not scale exactly: the node's help page, 'Which threshold mode').",
                ),
                io.Combo.Input(
                    "video_mode", options=list(VIDEO_MODES), default=defaults.video_mode, optional=True,
                    tooltip="Video latents only (image latents are unaffected). clip: norms and projections over the "
                    "whole clip, as for an image. frame: per latent frame, each frame's update projected on that "
                    "frame's conditional prediction and capped on its own, so one frame's update does not change "
                    "how much another is guided.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with APG applied at the sampler's CFG step.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, SIGMA_RANGE_RULE)

    @classmethod
    def execute(cls, model, eta, norm_threshold, momentum, sigma_start, sigma_end, mask=None,
                threshold_mode=THRESHOLD_MODES[0], video_mode=VIDEO_MODES[0]) -> io.NodeOutput:
        try:
            config = APGConfig(eta, norm_threshold, momentum, sigma_start, sigma_end, threshold_mode, video_mode)
        except ValueError as e:  # values that came through links, which queue-time validation cannot see
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
        return io.NodeOutput(apply_apg(model, config, mask))
