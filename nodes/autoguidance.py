"""ComfyUI node for Autoguidance (patch in `autoguidance_patch.py`; the rule in `guiders/gfcg.py`)."""

from comfy_api.latest import io

from .autoguidance_patch import DISPLAY_NAME, NODE_ID, apply_autoguidance
from .validation import prefixed


class Autoguidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "Autoguidance (Karras et al., NeurIPS 2024): guides the model away from a weak version of itself "
                "(an earlier checkpoint, or a smaller model of the same family) instead of away from its "
                "unconditional prediction: D_weak + cfg (D - D_weak), both for the prompt. The sampler's cfg is the "
                "guidance weight w; the negative prompt is not used. Both models run in the same sampling run; "
                "ComfyUI loads and offloads the weak one with the main one. Add GFCG after this node for "
                "ATG + GFCG at ATG's cost."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to guide."),
                io.Model.Input("weak_model", tooltip="A weak version of the same model: an early training checkpoint "
                               "(Karras et al. use one trained for a fraction of the steps) or a smaller model of the "
                               "same family and latent format. Its own LoRAs and patches apply to its calls."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Autoguidance; the sampler's cfg is w (2 to 3 is a "
                                     "typical range; 1 turns guidance off and skips the weak model).")],
        )

    @classmethod
    def execute(cls, model, weak_model) -> io.NodeOutput:
        try:
            return io.NodeOutput(apply_autoguidance(model, weak_model))
        except ValueError as e:
            raise prefixed(DISPLAY_NAME, e) from e
