"""The Autoguidance patch that the node puts on a model: a ComfyUI calc-cond-batch hook that asks a second, weak model.

Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024 (`guiders/gfcg.py` states the
rule): D̂ = D_weak(x; c) + w (D(x; c) − D_weak(x; c)). ComfyUI's CFG step at the sampler's cfg w computes exactly
that when it is handed D_weak(x; c) as the unconditional prediction, so the hook replaces the unconditional pass by
the weak model's conditional one and leaves the rest of the step (pre-CFG patches, the CFG step or a CFG function,
post-CFG patches) to ComfyUI. The negative prompt is not used. At cfg 1 ComfyUI skips the unconditional pass, and the
weak model is not called.

The weak model is one of the patched model's additional models (`ModelPatcher.set_additional_models`), so ComfyUI's
`prepare_sampling` loads it to the GPU with the main one (`comfy.model_management.load_models_gpu`) for the run and
offloads it after, as it does for ControlNets; each call runs it through `comfy.samplers.calc_cond_batch` with its own
patches. The conditioning the sampler prepared for the main model serves the weak one, which is why the weak model
must be of the same family and latent format (checked when the node runs).

With GFCG applied after this node (nodes/gfcg_patch.py), the weak model is asked for the classifier's reference
class instead of the target: ATG + GFCG at ATG's cost.
"""

import torch

import comfy.model_patcher
import comfy.samplers

NODE_ID = "GuidanceAutoguidance"
DISPLAY_NAME = "Autoguidance (ATG)"
WEAK_MODEL_KEY = "comfyui_guidance.autoguidance_weak"
# What must agree between the two models for the main model's prepared conditioning to serve the weak one.
SHARED_UNET_SETTINGS = ("in_channels", "out_channels", "context_dim", "adm_in_channels", "num_classes")


def family_problem(model, weak) -> str | None:
    """Why the ModelPatcher `weak` cannot guide `model`, or None."""
    main, other = model.model, weak.model
    if main is other:
        return ("the weak model is the model itself (the same loaded checkpoint); load an earlier checkpoint or a "
                "smaller model of the same family")
    for what, a, b in (("model family", type(main).__name__, type(other).__name__),
                       ("latent format", type(main.latent_format).__name__, type(other.latent_format).__name__)):
        if a != b:
            return f"the weak model's {what} is {b}, the model's is {a}: give a weak model of the same family"
    for key in SHARED_UNET_SETTINGS:
        a, b = (m.model_config.unet_config.get(key) for m in (main, other))
        if a != b:
            return (f"the weak model's {key} is {b}, the model's is {a}: it cannot read the same latents and "
                    "conditioning; give a weak model of the same family")
    return None


def apply_autoguidance(model, weak):
    """A clone of the ModelPatcher `model` whose sampler guides with the ModelPatcher `weak` in place of the
    unconditional pass (w is the sampler's cfg)."""
    problem = family_problem(model, weak)
    if problem is not None:
        raise ValueError(problem)
    replaced = model.model_options.get("sampler_calc_cond_batch_function")
    owner = getattr(replaced, "__self__", None)
    if getattr(owner, "chooses_reference_class", False):
        raise ValueError(f"this model already has {owner.node_name}; apply {DISPLAY_NAME} first and "
                         f"{owner.node_name} after it, which then asks the weak model for its reference class")
    if getattr(owner, "autoguides", False):
        raise ValueError(f"this model already has {owner.node_name}; apply it once, with one weak model")
    patched = model.clone()
    patched.set_additional_models(WEAK_MODEL_KEY, [weak])
    patched.set_model_sampler_calc_cond_batch_function(AutoguidanceHook(replaced).calc_cond_batch)
    return patched


def weak_patcher(model):
    """The weak ModelPatcher that ComfyUI loaded for this run (a clone of the node's, held by the run's patcher of
    the BaseModel `model`), made the current patcher of its model."""
    patcher = getattr(model, "current_patcher", None)
    weak = patcher.get_additional_models_with_key(WEAK_MODEL_KEY) if patcher is not None else []
    if not weak:
        raise ValueError(f"{DISPLAY_NAME}: the sampler did not load the weak model; sample with KSampler, "
                         "SamplerCustom or SamplerCustomAdvanced")
    weak = weak[0]
    if weak.model.current_patcher is not weak:
        weak.pre_run()
    return weak


class AutoguidanceHook:
    """Calc-cond-batch hook: [D(x; c), D_weak(x; c)] in place of [D(x; c), D(x; u)]."""

    node_name = DISPLAY_NAME
    # Marks the hook wherever this module was imported from (ComfyUI and scripts import it under different package
    # names, so the class itself is not one object): GFCG asks it for the reference class.
    autoguides = True

    def __init__(self, replaced_calc_cond_batch):
        self.replaced_calc_cond_batch = replaced_calc_cond_batch

    def conditional(self, args) -> list:
        """The main model's outputs for the conditional list alone (through a hook installed before this one)."""
        conds = [args["conds"][0], None]
        if self.replaced_calc_cond_batch is not None:
            return self.replaced_calc_cond_batch({**args, "conds": conds})
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"],
                                              args["model_options"])

    def weak_prediction(self, args, cond: list) -> torch.Tensor:
        """D_weak(x; cond), cond a list of the sampler's prepared cond dicts."""
        weak = weak_patcher(args["model"])
        options = comfy.model_patcher.create_model_options_clone(weak.model_options)
        sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if sigmas is not None:
            options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        return comfy.samplers.calc_cond_batch(weak.model, [cond], args["input"], args["sigma"], options)[0]

    def calc_cond_batch(self, args) -> list:
        conds = args["conds"]
        if len(conds) < 2 or conds[1] is None:  # cfg 1: no guidance, and ComfyUI asked for no second prediction
            return self.conditional(args)
        out = self.conditional(args)
        return [out[0], self.weak_prediction(args, conds[0]), *out[2:]]
