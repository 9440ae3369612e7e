"""ComfyUI nodes for CFG++ (`guiders/cfgpp.py`): a SAMPLER for custom sampling, DDIM inversion and sampling back."""

from comfy_api.latest import io

from ..guiders.cfgpp import DEFAULT_GUIDANCE, MAX_GUIDANCE, MIN_GUIDANCE, SAMPLERS
from .cfgpp_patch import (INVERSION_NODE_ID, NODE_NAMES, SAMPLE_BACK_NODE_ID, SAMPLER_NODE_ID, cfgpp_sampler, invert,
                          sample_back)
from .validation import check_widgets

CATEGORY = "sampling/guidance"
LAMBDA_TOOLTIP = (
    f"CFG++ guidance lambda in [{MIN_GUIDANCE:g}, {MAX_GUIDANCE:g}] (the paper's range; {DEFAULT_GUIDANCE:g} is the "
    "official SD1.5 setting): 0 samples unconditionally, 1 conditionally. It replaces the CFG scale (set cfg to 1): "
    "a DDIM step at lambda equals a CFG step at cfg = lambda * rho / (rho - rho_next), rho = sigma / alpha, so the "
    "same lambda guides harder with more steps: 0.6 is about cfg 2.8 at 20 steps and cfg 7 at 50 (SD1.5, normal)."
)

MASK_TOOLTIP = (
    "Optional: where CFG++ guides, per position (a MASK at image size, resized to the latent; one for all images or "
    "one per image). 1 = CFG++ as is, 0 = plain conditional steps there (denoise and renoise with the conditional "
    "prediction, no guidance), values between blend the two. Saliency Map From Markers makes one."
)


def lambda_input() -> io.Float.Input:
    # Frontend 1.32.9 ignores an input's display_name: it labels the widget and socket with the i18n entry
    # nodeDefs.<node>.inputs.guidance.name, which locales/en/nodeDefs.json sets to "lambda". The input keeps the name
    # "guidance", so saved UI and API workflows stay valid.
    return io.Float.Input("guidance", display_name="lambda", default=DEFAULT_GUIDANCE, min=MIN_GUIDANCE,
                          max=MAX_GUIDANCE, step=0.01, tooltip=LAMBDA_TOOLTIP)


def conditioning_inputs(positive_tooltip: str) -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model (any family: eps, v or flow)."),
        io.Conditioning.Input("positive", tooltip=positive_tooltip),
        io.Conditioning.Input("negative", tooltip="The unconditional prompt (usually empty); CFG++ renoises with "
                              "its prediction."),
    ]


class CFGppNode(io.ComfyNode):
    """The CFG++ nodes' queue-time check: every widget value in range (NaN and inf refused), a listed sampler."""

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)


class CFGppSampler(CFGppNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SAMPLER_NODE_ID,
            display_name=NODE_NAMES[SAMPLER_NODE_ID],
            category=CATEGORY,
            description=(
                "CFG++ (Chung et al., ICLR 2025): denoises with the guided prediction but renoises with the "
                "unconditional one, which keeps samples on the data manifold at small guidance. For SamplerCustom and "
                "SamplerCustomAdvanced (with CFGGuider). The guidance is lambda, set here: set cfg to 1.0 on the "
                "guider or SamplerCustom (any other cfg stops the run with an error)."
            ),
            inputs=[
                io.Combo.Input(
                    "sampler_name", options=list(SAMPLERS), default="ddim",
                    tooltip="ddim (the paper's Algorithm 2; euler is the same update), euler_ancestral, dpmpp_2m or "
                    "dpmpp_2s_ancestral, each with CFG++ renoising. Ancestral samplers use eta = 1 and the seed of "
                    "the noise input.",
                ),
                lambda_input(),
                io.Mask.Input("mask", optional=True, tooltip=MASK_TOOLTIP),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom or SamplerCustomAdvanced; set cfg to 1.0.")],
        )

    @classmethod
    def execute(cls, sampler_name, guidance, mask=None) -> io.NodeOutput:
        return io.NodeOutput(cfgpp_sampler(sampler_name, guidance, mask))


class CFGppDDIMInversion(CFGppNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=INVERSION_NODE_ID,
            display_name=NODE_NAMES[INVERSION_NODE_ID],
            category=CATEGORY,
            description=(
                "Inverts an image latent to the noise that CFG++ DDIM turns back into it: DDIM from low to high "
                "sigma along the schedule, with the prompt that describes the image. CFG++ makes this nearly exact "
                "at any lambda, where CFG DDIM inversion breaks down at usual scales. Sample back with CFG++ DDIM "
                "Sample From Inversion: the same prompt reconstructs the image, another prompt edits it."
            ),
            inputs=[
                *conditioning_inputs("The prompt that describes the image."),
                io.Latent.Input("latent_image", tooltip="The image latent to invert (VAE Encode)."),
                io.Sigmas.Input("sigmas", tooltip="The sampling schedule (a scheduler's SIGMAS, ending at 0), walked "
                                "backwards from 0 up to its first sigma. Use the same schedule to sample back."),
                lambda_input(),
            ],
            outputs=[io.Latent.Output(display_name="inverted", tooltip="The latent at the schedule's highest sigma; "
                                      "feed it to CFG++ DDIM Sample From Inversion.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, sigmas, guidance) -> io.NodeOutput:
        return io.NodeOutput(invert(model, positive, negative, latent_image, sigmas, guidance))


class CFGppDDIMSampleFromInversion(CFGppNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=SAMPLE_BACK_NODE_ID,
            display_name=NODE_NAMES[SAMPLE_BACK_NODE_ID],
            category=CATEGORY,
            description=(
                "CFG++ DDIM sampling that starts from an inverted latent as it is (no noise added). With the "
                "inversion's prompt it reconstructs the image; with another prompt it edits it (the paper's "
                "inversion-based editing)."
            ),
            inputs=[
                *conditioning_inputs("The inversion's prompt to reconstruct the image, or a new prompt to edit it."),
                io.Latent.Input("inverted", tooltip="The output of CFG++ DDIM Inversion."),
                io.Sigmas.Input("sigmas", tooltip="The schedule that the inversion used."),
                lambda_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent; VAE Decode it.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, inverted, sigmas, guidance) -> io.NodeOutput:
        return io.NodeOutput(sample_back(model, positive, negative, inverted, sigmas, guidance))
