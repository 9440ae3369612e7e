"""ComfyUI node for Gradient-Free Classifier Guidance (`guiders/gfcg.py`, patch in `gfcg_patch.py`)."""

from comfy_api.latest import io

from ..guiders.gfcg import GFCGConfig, REFERENCE_RULES, SCALE_RULES
from ..guiders.sigma_range import SIGMA_MAX, SIGMA_MIN
from .classifier import GuidanceClassifierTargets
from .classifier_patch import DEFAULT_CHUNK
from .gfcg_patch import (CLASS_PLACEHOLDER, DEFAULT_CLASS_PROMPT, DISPLAY_NAME, NODE_ID, apply_gfcg,
                         prompt_class_conditioning, reference_class_conditioning)
from .reference import ReferenceClasses
from .validation import SIGMA_RANGE_RULE, Rule, check_widgets, prefixed


def class_prompt_problem(values: dict) -> str | None:
    """`class_prompt` has the placeholder where the class name goes."""
    prompt = values.get("class_prompt")
    if prompt is not None and CLASS_PLACEHOLDER not in prompt:
        return (f"class_prompt {prompt!r} has no {CLASS_PLACEHOLDER}: write where the class name goes, e.g. "
                f"{DEFAULT_CLASS_PROMPT!r}")
    return None


CLASS_PROMPT_RULE = Rule(("class_prompt",), class_prompt_problem)


class GradientFreeClassifierGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = GFCGConfig()
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description=(
                "GFCG (Shenoy et al., arXiv 2411.15393): each step a classifier, run without gradients on the "
                "conditional denoised prediction, picks a reference class r (the most likely class other than the "
                "target) and a scale; the model's prediction for r is the sample to contrast from: "
                "+ s_t (D_c - D_r). Works alone (cfg 1), on top of CFG (three rows in one model call), and after "
                "Autoguidance, where the weak model is asked for r instead of the target (no extra cost)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (eps, v or flow); after Autoguidance "
                               "for ATG + GFCG."),
                GuidanceClassifierTargets.Input("targets", tooltip="From Classifier Target Classes: the classifier "
                                                "and the class each image is generated as (the class of its prompt)."),
                io.Float.Input("scale", default=defaults.scale, min=0.0, max=100.0, step=0.01,
                               tooltip="s: the weight of the step away from the reference class's prediction. The "
                               "adaptive rule uses s * p_r / (p_c + p_r), at most s. 2 is our default (the paper's "
                               "value could not be read); 0 disables GFCG. Not used after Autoguidance (cfg is the "
                               "only weight there)."),
                io.Combo.Input("scale_rule", options=list(SCALE_RULES), default=defaults.scale_rule,
                               tooltip="adaptive: s * p_r / (p_c + p_r), small while the classifier is sure of the "
                               "target, larger as the sample drifts to r (our reading of the paper's scale). "
                               "constant: s every step (ablation)."),
                io.Combo.Input("reference_rule", options=list(REFERENCE_RULES), default=defaults.reference_rule,
                               tooltip="most likely competitor: r = argmax over the other classes of p(k | D_c) "
                               "(our reading of the paper). random other class: a uniform draw per image and step "
                               "(ablation)."),
                io.Float.Input("sigma_start", default=defaults.sigma_start, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                               tooltip="GFCG acts only while sigma_end <= sigma <= sigma_start; other steps run "
                               "without its rows and classifier. The default covers every schedule."),
                io.Float.Input("sigma_end", default=defaults.sigma_end, min=SIGMA_MIN, max=SIGMA_MAX, step=0.01,
                               tooltip="Lowest sigma at which GFCG acts (see sigma_start). 0 keeps it on to the last "
                               "step."),
                ReferenceClasses.Input("classes", optional=True,
                                       tooltip="The reference model's classes (from Load Guidance Reference Model): "
                                       "its class conditioning gives the prediction for class r. Connect this or "
                                       "clip."),
                io.Clip.Input("clip", optional=True,
                              tooltip="For text-to-image models: the text encoder of the model's prompts; each class "
                              "of the classifier becomes one prompt (class_prompt). Connect this or classes."),
                io.String.Input("class_prompt", default=DEFAULT_CLASS_PROMPT,
                                tooltip=f"With clip: the prompt of each class, {CLASS_PLACEHOLDER} standing for the "
                                "class name (from the classifier). Write it like the positive prompt."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE, needed by classifiers that read images; "
                             "not by latent classifiers."),
                io.Int.Input("chunk", default=DEFAULT_CHUNK, min=1, max=4096,
                             tooltip="Images per classifier pass (decode and forward). Lower it if the pass runs out "
                             "of memory on large images; the result is the same."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where GFCG guides, per position (a MASK at image size, resized to "
                              "the latent; one for all images or one per image). 1 = GFCG as is, 0 = the prediction "
                              "without GFCG's term. Not with Autoguidance."),
            ],
            outputs=[io.Model.Output(tooltip="The model with GFCG added to the sampler's guidance.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, SIGMA_RANGE_RULE, CLASS_PROMPT_RULE)

    @classmethod
    def execute(cls, model, targets, scale, scale_rule, reference_rule, sigma_start, sigma_end, classes=None,
                clip=None, class_prompt=DEFAULT_CLASS_PROMPT, vae=None, chunk=DEFAULT_CHUNK,
                mask=None) -> io.NodeOutput:
        try:
            config = GFCGConfig(scale, scale_rule, reference_rule, sigma_start, sigma_end)
            if (classes is None) == (clip is None):
                raise ValueError("connect the class conditioning: classes (the reference model's) or clip (a "
                                 "text-to-image model's text encoder), one of the two")
            names = targets.classifier.class_names
            conditioning = (reference_class_conditioning(classes) if classes is not None
                            else prompt_class_conditioning(clip, names, class_prompt))
            return io.NodeOutput(apply_gfcg(model, targets, conditioning, config, vae, chunk, mask))
        except ValueError as e:  # values that came through links, and class conditioning that does not fit
            raise prefixed(DISPLAY_NAME, e) from e
