"""ComfyUI node for frequency-aware cascaded sampling (`guiders/frecas.py`, the run in `frecas_patch.py`)."""

import comfy.samplers
from comfy_api.latest import io

from ..guiders.frecas import FAMILY_DEFAULTS, check_plan, parse_int_list
from .frecas_patch import DISPLAY_NAME, NODE_ID, FreCaSSettings, sample_frecas
from .validation import Rule, check_widgets

DEFAULTS = FAMILY_DEFAULTS["sdxl"]


def plan_rule(values: dict) -> str | None:
    """steps and stage_ends together describe at least two stages (read only when both are widget values)."""
    if values.get("steps") is None or values.get("stage_ends") is None:
        return None
    try:
        check_plan(parse_int_list(values["steps"], "steps"), parse_int_list(values["stage_ends"], "stage_ends"))
    except ValueError as e:
        return str(e)
    return None


def joined(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


class FreCaSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "FreCaS (Zhang et al., ICLR 2025): images larger than the model's training size, sampled in stages "
                "of rising resolution. Each stage starts from the previous stage's clean estimate, upsampled and "
                "noised again; FA-CFG guides the frequency band a stage adds (cfg_high) harder than the band it "
                "inherits (cfg); cross-attention maps of the previous stage keep the layout. Defaults: the official "
                "SDXL 1024->2048 setting."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model: SD1.x, SD2.x, SDXL (all features); SD3 and "
                               "other flow models with attention_fusion 0. Other guidance patches act in every stage."),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CFG's unconditional pass)."),
                io.Latent.Input("latent_image", tooltip="The first stage's latent, at the model's training size "
                                "(512x512 SD1.x/SD2.x, 1024x1024 SDXL/SD3): its size, batch and aspect ratio."),
                io.Float.Input("scale_by", default=2.0, min=1.05, max=8.0, step=0.05,
                               tooltip="The final image's side over the first stage's: 2 = 4x the pixels "
                               "(1024x1024 -> 2048x2048), 1.41 = 2x the pixels. Stages in between grow "
                               "geometrically."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise of the first stage; stage i renoises with seed + i."),
                io.String.Input("steps", default=joined(DEFAULTS.steps),
                                tooltip="Steps of each stage, one number per stage; their count is the number of "
                                "stages. Official: SDXL 2048 '40, 10', SDXL 4096 '30, 5, 15', SD2.1 1024 '40, 10', "
                                "SD2.1 2048 '30, 10, 10', SD3 2048 '20, 8'."),
                io.String.Input("stage_ends", default=joined(DEFAULTS.ends),
                                tooltip="The timestep (of 1000) at which each stage stops, the last 0. Official: SDXL "
                                "2048 '200, 0', SDXL 4096 '400, 200, 0', SD2.1 1024 '100, 0', SD2.1 2048 "
                                "'200, 200, 0', SD3 2048 '50, 0'."),
                io.Float.Input("gamma", default=DEFAULTS.gamma, min=0.0, max=8.0, step=0.05,
                               tooltip="How much noisier each stage starts than the previous one ended: its "
                               "signal-to-noise ratio is scaled by (smaller side / larger side)^gamma. Official: SDXL "
                               "1.5 (2048) or 2.0 (4096), SD1.x/SD2.x 3.0, SD3 1.0."),
                io.Float.Input("cfg", default=DEFAULTS.cfg, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the first stage and of the frequency band every later stage "
                               "inherits from the one before (official 7.5)."),
                io.Float.Input("cfg_high", default=DEFAULTS.cfg_high, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="FA-CFG: the CFG scale of the frequency band a stage adds. Official: 35 "
                               "(SDXL, SD3, SD2.1 to 2048), 45 (SD2.1 to 1024). Equal to cfg: plain CFG."),
                io.Float.Input("attention_fusion", default=DEFAULTS.attention_fusion, min=0.0, max=1.0, step=0.05,
                               tooltip="w_c: weight of the previous stage's cross-attention maps in every "
                               "cross-attention of the next stage (keeps the layout). Official: 0.6 (SDXL, SD2.1 "
                               "to 1024), 0.4 (SD2.1 to 2048). UNets only; 0 turns it off."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="The sampler of every stage (official: DDIM; flow models: Euler). The noise "
                               "levels are the paper's, evenly spaced timesteps per stage."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional, recommended: carry each stage's image to the next through the VAE "
                             "(decode, upsample the pixels, encode) as the paper does. Without it the latent is "
                             "upsampled (nearest neighbour)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where FreCaS guides, per position (a MASK, resized to each stage). "
                              "1 = CFG / FA-CFG as is, 0 = the conditional prediction (no guidance), values between "
                              "blend the two. Saliency Map From Markers makes one."),
            ],
            outputs=[io.Latent.Output(tooltip="The last stage's latent: scale_by times the first stage's size.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, Rule(("steps", "stage_ends"), plan_rule))

    @classmethod
    def execute(cls, model, positive, negative, latent_image, scale_by, seed, steps, stage_ends, gamma, cfg,
                cfg_high, attention_fusion, sampler_name, vae=None, mask=None) -> io.NodeOutput:
        try:
            settings = FreCaSSettings(parse_int_list(steps, "steps"), parse_int_list(stage_ends, "stage_ends"),
                                      gamma, cfg, cfg_high, attention_fusion, sampler_name)
            size = latent_image["samples"].shape[-2:]
            target = (round(size[0] * scale_by), round(size[1] * scale_by))
        except ValueError as e:  # values that came through links, which queue-time validation cannot see
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
        samples = sample_frecas(model, positive, negative, latent_image, seed, settings, target, vae, mask)
        out = {key: value for key, value in latent_image.items() if key not in ("samples", "noise_mask")}
        return io.NodeOutput({**out, "samples": samples})
