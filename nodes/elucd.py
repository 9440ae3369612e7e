"""ComfyUI node for EluCD's classifier guidance (`guiders/elucd.py`, patch in `elucd_patch.py`)."""

from comfy_api.latest import io

from ..guiders.elucd import EluCDCalibration, EluCDConfig
from .classifier import GuidanceClassifierTargets
from .classifier_patch import DEFAULT_CHUNK
from .elucd_patch import DISPLAY_NAME, NODE_ID, apply_elucd
from .validation import check_widgets


class EluCDClassifierGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults, calibration = EluCDConfig(), EluCDCalibration()
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description=(
                "EluCD (Ma et al., ICLR 2024): classifier guidance with an off-the-shelf classifier, trained on clean "
                "images only. Each step it reads the classifier on the denoised prediction (through the VAE for an "
                "image classifier), smooths the classifier's ReLUs and calibrates its log-probability, and moves the "
                "prediction along its gradient with the paper's schedule. Works with CFG (any cfg, 1 included), APG, "
                "PAG and AG; one extra classifier pass with a backward pass per model call."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (eps, v or flow)."),
                GuidanceClassifierTargets.Input("targets", tooltip="From Classifier Target Classes: the classifier "
                                                "and the class each image is guided towards."),
                io.Float.Input("scale", default=defaults.scale, min=0.0, max=100.0, step=0.01,
                               tooltip="s: classifier guidance scale. 1 is the paper's (DDPM, ImageNet); 0 disables "
                               "EluCD."),
                io.Float.Input("gamma", default=defaults.gamma, min=0.0, max=10.0, step=0.01,
                               tooltip="Height of the sine bump added to the step's variance in the guidance "
                               "schedule, as a fraction of the largest variance so far; strongest mid-run. 0.3 is "
                               "the paper's; 0 gives the plain variance schedule."),
                io.Float.Input("softplus_beta", default=calibration.softplus_beta, min=0.0, max=1000.0, step=0.1,
                               tooltip="The classifier's ReLUs become Softplus(beta), for a smooth gradient. 3 is the "
                               "paper's; 0 keeps the ReLUs. Networks without ReLU modules are unchanged."),
                io.Float.Input("joint_temperature", default=calibration.joint_temperature, min=0.01, max=100.0,
                               step=0.01, tooltip="tau1, the weight of the target logit in the calibrated "
                               "log-probability tau1*z_y - log sum exp(tau2*z). 1 is the paper's."),
                io.Float.Input("margin_temperature_discount", default=calibration.margin_temperature_discount,
                               min=0.01, max=100.0, step=0.01,
                               tooltip="d, with tau2 = tau1*d in the log-sum-exp over all classes. 0.5 is the "
                               "paper's; 1 gives the plain log-softmax (no calibration)."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE, needed by classifiers that read images "
                             "(decoded with a differentiable copy of its decoder); not by latent classifiers."),
                io.Int.Input("chunk", default=DEFAULT_CHUNK, min=1, max=4096,
                             tooltip="Images per classifier pass (decode, forward and backward). Lower it if the "
                             "pass runs out of memory on large images; the result is the same."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where EluCD guides, per position (a MASK at image size, resized to "
                              "the latent; one for all images or one per image). 1 = EluCD as is, 0 = the prediction "
                              "without EluCD's shift, values between blend the two. Saliency Map From Markers makes "
                              "one."),
            ],
            outputs=[io.Model.Output(tooltip="The model with EluCD added to the sampler's guidance.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, targets, scale, gamma, softplus_beta, joint_temperature, margin_temperature_discount,
                vae=None, chunk=DEFAULT_CHUNK, mask=None) -> io.NodeOutput:
        try:
            config = EluCDConfig(scale, gamma, EluCDCalibration(softplus_beta, joint_temperature,
                                                                margin_temperature_discount))
            return io.NodeOutput(apply_elucd(model, targets, config, vae, chunk, mask))
        except ValueError as e:  # values that came through links, and a classifier that does not fit the model
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
