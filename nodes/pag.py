"""ComfyUI node for perturbed-attention guidance (`guiders/pag.py`, patch in `pag_patch.py`)."""

from comfy_api.latest import io

from ..guiders.pag import PAGConfig
from ..guiders.sigma_range import SIGMA_MAX, SIGMA_MIN
from .pag_layers import AUTO, malformed_layer_names
from .pag_patch import DISPLAY_NAME, NODE_ID, apply_pag
from .validation import SIGMA_RANGE_RULE, Rule, check_widgets


def layer_names_rule(values: dict) -> str | None:
    """Layer names that no model has (a typo): refused at queue time; names this model lacks need the model."""
    malformed = malformed_layer_names(values.get("layers") or "")
    if not malformed:
        return None
    return (f"layers has {', '.join(malformed)}, which is no layer name: use input.B[.T], middle.0[.T], output.B[.T] "
            "(UNet), joint.N (SD3), double.N or single.N (Flux), block.N (Wan), ranges like single.0-37, or 'auto'")


class PerturbedAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = PAGConfig()
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "PAG (Ahn et al., ECCV 2024): runs the model once more with chosen self-attention maps replaced by "
                "the identity and guides away from that degraded prediction, for better structure with or without "
                "CFG (cfg 1 gives PAG alone). The perturbed pass rides in the same model call as cond and uncond "
                "where memory allows. Works on UNet (SD1.x, SDXL), SD3, Flux and Wan models; composes with APG and "
                "other model patches."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch: UNet (SD1.x, SD2.x, SDXL), SD3, Flux "
                               "or Wan."),
                io.Float.Input(
                    "scale", default=defaults.scale, min=0.0, max=100.0, step=0.01,
                    tooltip="s: weight of the step away from the perturbed prediction. 3 is the paper's setting "
                    "with CFG; up to 5 for PAG alone (cfg 1). 0 disables PAG.",
                ),
                io.Float.Input(
                    "adaptive_scale", default=defaults.adaptive_scale, min=0.0, max=1.0, step=0.0001,
                    tooltip="a: lowers the scale as sampling goes on, s(t) = max(0, s - a*(1000 - t)) at model "
                    "timestep t (1000 = pure noise). 0 (paper default) keeps it constant; e.g. 0.005 brings "
                    "s = 3 down to 0 at t = 400.",
                ),
                io.String.Input(
                    "layers", default=AUTO,
                    tooltip="Self-attention layers to perturb, separated by commas. UNet: input.B, middle.0, output.B "
                    "(every transformer of block B) or input.B.T (transformer T); SD3: joint.N; Flux: double.N, "
                    "single.N; Wan: block.N; ranges like single.0-37. 'auto' is the paper's choice: middle.0 on "
                    "UNets, the second block on DiTs. A name the model lacks stops with a list of its layers.",
                ),
                io.Float.Input(
                    "sigma_start", default=defaults.sigma_start, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                    tooltip="PAG acts only while sigma_end <= sigma <= sigma_start; other steps skip the perturbed "
                    "pass. The default covers every schedule.",
                ),
                io.Float.Input(
                    "sigma_end", default=defaults.sigma_end, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                    tooltip="Lowest sigma at which PAG acts (see sigma_start). 0 keeps it on to the last step.",
                ),
                io.Boolean.Input(
                    "batched", default=True,
                    tooltip="Run the perturbed pass in the same model call as cond and uncond when ComfyUI's memory "
                    "estimate says it fits (faster). Off: always a separate call (less memory). Same result.",
                ),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where PAG guides, per position (a MASK at image size, resized to the "
                              "latent; one for all images or one per image). 1 = PAG as is, 0 = the prediction "
                              "without PAG's term (CFG's, or the conditional one at cfg 1), values between blend the "
                              "two. Saliency Map From Markers makes one."),
            ],
            outputs=[io.Model.Output(tooltip="The model with PAG added to the sampler's guidance.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, SIGMA_RANGE_RULE, Rule(("layers",), layer_names_rule))

    @classmethod
    def execute(cls, model, scale, adaptive_scale, layers, sigma_start, sigma_end, batched, mask=None) -> io.NodeOutput:
        try:
            config = PAGConfig(scale, adaptive_scale, sigma_start, sigma_end)
        except ValueError as e:  # values that came through links, which queue-time validation cannot see
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
        try:
            return io.NodeOutput(apply_pag(model, config, layers, batched, mask))
        except ValueError as e:
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
