"""ComfyUI nodes for Adaptive Guidance and LinearAG (`guiders/adaptive.py`, patch and fitting in
`adaptive_patch.py`)."""

import os

import folder_paths
from comfy_api.latest import io

from ..guiders.adaptive import CRITERIA, DEFAULT_THRESHOLD, AGConfig
from .adaptive_patch import (COEFFICIENTS_FOLDER, DISPLAY_NAME, FIT_DISPLAY_NAME, FIT_NODE_ID, LINEAR_DISPLAY_NAME,
                             LINEAR_NODE_ID, NODE_ID, LinearAGCoefficients, apply_ag, check_model, fit_linear_ag)
from .reference import WEIGHTS_DIR
from .validation import FILENAME_RULE, check_widgets

REFERENCE_COEFFICIENTS = WEIGHTS_DIR / COEFFICIENTS_FOLDER

folder_paths.add_model_folder_path(COEFFICIENTS_FOLDER, os.path.join(folder_paths.models_dir, COEFFICIENTS_FOLDER))
# Coefficients shipped for the embedded reference model (scripts/fit_linear_ag.py --reference), after the user's
# folder, which stays the first (Fit LinearAG Coefficients saves there).
folder_paths.add_model_folder_path(COEFFICIENTS_FOLDER, str(REFERENCE_COEFFICIENTS))
folder_paths.folder_names_and_paths[COEFFICIENTS_FOLDER][1].add(".safetensors")

THRESHOLD_TOOLTIP = ("gamma-bar: once the cosine between the conditional step and the CFG step reaches this value for "
                     "an image, its remaining steps skip the unconditional pass (conditional only). 0.991 is ours for "
                     "cond_cfg; the public implementations use 0.990 with cond_uncond_batch; lower skips sooner and "
                     "saves more; 1.0 never skips (exactly CFG).")
CRITERION_TOOLTIP = ("Which two predictions the cosine compares, as noise (step) directions: cond_cfg = the "
                     "conditional and the CFG-guided step (default, our reading of the paper); cond_uncond = the "
                     "conditional and the unconditional prediction, per image (it reaches a given threshold sooner at "
                     "the same scale); cond_uncond_batch = the same over the whole batch at once, one switch for all "
                     "images (the public implementations' rule, at their threshold 0.990).")


def mask_tooltip(node: str) -> str:
    return (f"Optional: where {node} guides, per position (a MASK at image size, resized to the latent; one for all "
            f"images or one per image). 1 = {node} as is (CFG at the sampler's cfg until the image switches), 0 = the "
            "conditional prediction there (no guidance, as at cfg 1), values between blend the two. The switch is "
            "decided on the whole image, as without a mask. Saliency Map From Markers makes one.")


def ag_inputs(defaults: AGConfig, node: str) -> list:
    return [
        io.Float.Input("threshold", default=defaults.threshold, min=-1.0, max=1.0, step=0.001,
                       tooltip=THRESHOLD_TOOLTIP),
        io.Combo.Input("criterion", options=list(CRITERIA), default=defaults.criterion, tooltip=CRITERION_TOOLTIP),
        io.Mask.Input("mask", optional=True, tooltip=mask_tooltip(node)),
    ]


def config_of(node_name: str, threshold: float, criterion: str) -> AGConfig:
    try:
        return AGConfig(threshold, criterion)
    except ValueError as e:  # values that came through links, which queue-time validation cannot see
        raise ValueError(f"{node_name}: {e}.") from e


class AdaptiveGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "Adaptive Guidance (Castillo et al., AAAI 2025): CFG until an image's conditional step and CFG step "
                "agree (cosine above the threshold), then conditional-only steps for that image: its unconditional "
                "pass is no longer computed. Works with KSampler and every sampler; set cfg on the sampler as usual. "
                "Composes with APG (which acts on the guided steps), PAG and CFG functions."
            ),
            inputs=[io.Model.Input("model", tooltip="The diffusion model to patch (any family: eps, v or flow)."),
                    *ag_inputs(AGConfig(), "AG")],
            outputs=[io.Model.Output(tooltip="The model with Adaptive Guidance at the sampler's CFG step.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, threshold, criterion, mask=None) -> io.NodeOutput:
        return io.NodeOutput(apply_ag(model, config_of(DISPLAY_NAME, threshold, criterion), mask=mask))


def coefficient_files() -> list[str]:
    return folder_paths.get_filename_list(COEFFICIENTS_FOLDER)


class LinearAG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LINEAR_NODE_ID,
            display_name=LINEAR_DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "LinearAG (Castillo et al., AAAI 2025): Adaptive Guidance, and in the first half of the run every "
                "other unconditional pass replaced by an affine combination of the current conditional and the "
                "previous step's predictions, with coefficients fitted for this model and schedule (Fit LinearAG "
                "Coefficients). Coefficients fitted for another model, sampler, schedule or step count are refused."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the coefficients were fitted for."),
                io.Combo.Input("coefficients", options=coefficient_files(),
                               tooltip=f"A coefficients file in models/{COEFFICIENTS_FOLDER}/, made by Fit LinearAG "
                               "Coefficients for this model, sampler, scheduler and step count."),
                *ag_inputs(AGConfig(), "LinearAG"),
            ],
            outputs=[io.Model.Output(tooltip="The model with LinearAG at the sampler's CFG step.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, coefficients, threshold, criterion, mask=None) -> io.NodeOutput:
        path = folder_paths.get_full_path(COEFFICIENTS_FOLDER, coefficients)
        if path is None:
            raise ValueError(f"{LINEAR_DISPLAY_NAME}: no coefficients file {coefficients!r} in "
                             f"models/{COEFFICIENTS_FOLDER}/; make one with Fit LinearAG Coefficients.")
        fitted = LinearAGCoefficients.load(path)
        check_model(fitted, model, LINEAR_DISPLAY_NAME)
        return io.NodeOutput(apply_ag(model, config_of(LINEAR_DISPLAY_NAME, threshold, criterion), fitted,
                                      LINEAR_DISPLAY_NAME, mask))


class FitLinearAG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id=FIT_NODE_ID,
            display_name=FIT_DISPLAY_NAME,
            category="sampling/guidance",
            is_output_node=True,
            description=(
                "Fits LinearAG's coefficients for this model and these prompts by least squares on CFG runs with the "
                "sampler, scheduler, steps and cfg given, and saves them (with the model's fingerprint and the "
                f"schedule) to models/{COEFFICIENTS_FOLDER}/ for the LinearAG node. Interruptible."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to fit for (with its LoRAs: they change the fingerprint)."),
                io.Conditioning.Input("positive", tooltip="Prompts typical of your use."),
                io.Conditioning.Input("negative", tooltip="The negative prompt you sample with."),
                io.Latent.Input("latent_image", tooltip="An empty latent of the size you sample at (one is enough)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler the coefficients are for."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler the coefficients are for."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="The step count the coefficients are for."),
                io.Float.Input("cfg", default=7.0, min=1.01, max=100.0, step=0.1,
                               tooltip="The CFG scale of the fitting runs."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Noise seed of the first batch."),
                io.Int.Input("images", default=16, min=1, max=100000,
                             tooltip="Images sampled for the fit (the regression has 3 unknowns per step; a few "
                             "images suffice, more average over prompts and seeds)."),
                io.Int.Input("batch_size", default=4, min=1, max=4096, tooltip="Images per sampling run."),
                io.String.Input("filename", default="linear_ag", tooltip="File name (without extension) in "
                                f"models/{COEFFICIENTS_FOLDER}/."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the coefficients were saved.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, FILENAME_RULE)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, sampler_name, scheduler, steps, cfg, seed, images,
                batch_size, filename) -> io.NodeOutput:
        import comfy.utils

        bar = comfy.utils.ProgressBar(images)
        try:
            fitted = fit_linear_ag(model, positive, negative, latent_image["samples"], sampler_name, scheduler, steps,
                                   cfg, seed, images, batch_size, lambda done, total: bar.update_absolute(done, total))
        except ValueError as e:
            raise ValueError(f"{FIT_DISPLAY_NAME}: {e}") from e
        folder = folder_paths.get_folder_paths(COEFFICIENTS_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{filename}.safetensors")
        fitted.save(path)
        return io.NodeOutput(path)
