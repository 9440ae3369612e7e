"""ComfyUI side of CFG++ (`guiders/cfgpp.py`): the samplers as ComfyUI SAMPLER objects, and inversion.

The CFG++ samplers need the conditional and unconditional denoised predictions of every model call; ComfyUI's
guider returns only the guided one. As core's `*_cfg_pp` samplers do, a post-CFG hook added to the run's copy of the
model options reads both predictions; here the hook is an object made anew for each sampling run
(`PredictionCapture`), so runs never share it. The guidance is the sampler's λ: the guider must run at cfg 1
(the hook stops the run otherwise), and the unconditional pass is forced even at cfg 1.

What composes with CFG++ (`composition_problem`, checked when a run starts; the README's table comes from the
composition test). CFG++ forms the guided prediction D_λ from the raw predictions itself, so:
- additive guidance terms that a post-CFG patch adds to the CFG result, independent of the CFG scale (PAG's
  s (D_c − D̂)), are carried into D_λ (`cfgpp.guided` says why that is where they belong);
- a CFG function (RescaleCFG, ...) or any other post-CFG patch (CFGNorm, CFGZeroStar, ...) acts on the CFG result at
  cfg 1, where it sees the conditional prediction instead of D_λ, so CFG++ would drop or distort it: refused;
- Adaptive Guidance / LinearAG are refused: they drop the unconditional pass once CFG's step at the guider's cfg
  agrees with the conditional one, which under CFG++ (cfg 1) is at once, and CFG++ renoises with that pass;
- AGD is refused: its adapters make the conditional pass CFG's guided prediction, which CFG++ would guide again;
- APG is refused: CFG++ interpolates (λ ≤ 1) and renoises with the unconditional prediction, while APG reshapes
  the extrapolation beyond D_c at w > 1; at w = λ < 1 its update moves D_λ away from D_u, so λ = 0 would no longer
  sample unconditionally, and neither paper defines the combination.
Any refusal names both nodes.

The CFG++ Sampler's optional mask weights each model call's guided pair per latent position (`cfgpp.weighted`): 1 is
CFG++ as is, 0 the plain conditional step (denoise with D_c, renoise with ε̂_c). The mask is resized to the run's
latent when the run starts (`saliency.latent_weights`). The inversion nodes take no mask.

Kept apart from the node classes so that scripts (benchmarks, evaluation) can sample and invert exactly as the nodes
do without importing ComfyUI's node API.
"""

import math

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import comfy.utils

from ..guiders import cfgpp
from ..guiders.saliency import latent_weights

SAMPLER_NODE_ID = "CFGppSampler"
INVERSION_NODE_ID = "CFGppDDIMInversion"
SAMPLE_BACK_NODE_ID = "CFGppDDIMSampleFromInversion"
# Key of the noise level an inverted LATENT was taken to, so that sampling back can check its schedule.
INVERTED_SIGMA_KEY = "cfgpp_inverted_sigma"


NODE_NAMES = {SAMPLER_NODE_ID: "CFG++ Sampler", INVERSION_NODE_ID: "CFG++ DDIM Inversion",
              SAMPLE_BACK_NODE_ID: "CFG++ DDIM Sample From Inversion"}


def patch_owner(function) -> str:
    """The node that put a sampler hook on the model, as the user knows it: our hooks name their node; a core
    node's hook is a closure inside the node class (`RescaleCFG.patch.<locals>.rescale_cfg`)."""
    owner = getattr(function, "__self__", function)
    if hasattr(owner, "node_name"):
        return owner.node_name
    qualname = getattr(function, "__qualname__", type(function).__qualname__)
    return qualname.split(".")[0] if ".<locals>." in qualname else f"the patch {qualname}"


def refused_patches(model_options: dict):
    """(node, why) for each guidance patch on the model that CFG++ cannot carry (see the module's docstring)."""
    if "sampler_cfg_function" in model_options:
        yield (patch_owner(model_options["sampler_cfg_function"]), "replaces ComfyUI's CFG step with a CFG function, "
               "which CFG++ bypasses: it combines the raw predictions itself")
    for hook in model_options.get("sampler_pre_cfg_function", []):
        if getattr(getattr(hook, "__self__", None), "distills_guidance", False):
            yield (hook.__self__.node_name, "makes the model's conditional pass give CFG's guided prediction (sample "
                   "it at cfg 1 with a regular sampler), while CFG++ forms its own guided prediction from the base "
                   "model's conditional and unconditional predictions and renoises with the unconditional one")
        if getattr(getattr(hook, "__self__", None), "skips_unconditional_passes", False):
            yield (hook.__self__.node_name, "decides when to drop the unconditional pass from CFG's step at the "
                   "guider's cfg, which is 1 under CFG++ (so it would drop it at once), while CFG++ needs the "
                   "unconditional prediction of every step to renoise with")
        if getattr(hook, "reshapes_extrapolation", False):
            yield (hook.node_name, "reshapes CFG's extrapolation beyond the conditional prediction (w > 1), while "
                   "CFG++ interpolates (lambda <= 1) and renoises with the unconditional prediction; at lambda < 1, "
                   "APG's update would keep lambda = 0 from sampling unconditionally")
    for hook in model_options.get("sampler_post_cfg_function", []):
        if not getattr(getattr(hook, "__self__", None), "adds_guidance_term", False):
            yield (patch_owner(hook), "changes the CFG result after ComfyUI's CFG step, which runs at cfg 1 under "
                   "CFG++ and so sees the conditional prediction, not CFG++'s guided one")


def composition_problem(model_options: dict, node_id: str) -> str | None:
    """Why the model's guidance patches cannot run under CFG++ node `node_id`, naming both nodes, or None."""
    for other, why in refused_patches(model_options):
        return (f"{NODE_NAMES[node_id]} and {other} do not combine: {other} {why}. Remove {other} from the model, "
                "or use a regular sampler instead of CFG++.")
    return None


class PredictionCapture:
    """Post-CFG hook of one sampling run: keeps the last call's conditional and unconditional denoised predictions
    and what the post-CFG patches before it (PAG) added to the CFG result."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.pred: cfgpp.Denoised | None = None

    def __call__(self, args: dict):
        if args["uncond"] is None:
            raise ValueError(f"{NODE_NAMES[self.node_id]}: CFG++ needs the unconditional prediction, but the guider "
                             "has no negative conditioning. Use CFGGuider (or SamplerCustom) with a negative prompt.")
        if not math.isclose(args["cond_scale"], 1.0):
            raise ValueError(f"{NODE_NAMES[self.node_id]}: the guider's cfg is {args['cond_scale']:g}, but CFG++ "
                             "takes its guidance from this sampler's lambda. Set cfg to 1.0 on CFGGuider or "
                             "SamplerCustom.")
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        # The post-CFG patches that ran before this one (the capture runs last) are additive guidance terms (see
        # `composition_problem`): what they added to ComfyUI's CFG step, recomputed here bit for bit.
        others = args["model_options"].get("sampler_post_cfg_function", [])[:-1]
        other_guidance = args["denoised"] - (uncond + (cond - uncond) * args["cond_scale"]) if others else None
        self.pred = cfgpp.Denoised(cond, uncond, other_guidance)
        return args["denoised"]


class PredictionPairModel:
    """The k-diffusion model a CFG++ sampler calls: runs ComfyUI's model and returns the captured pair."""

    def __init__(self, model, capture: PredictionCapture):
        self.model = model
        self.capture = capture

    def __call__(self, x, sigma, **extra_args) -> cfgpp.Denoised:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.capture.pred = None
        self.model(x, sigma, **extra_args)
        if self.capture.pred is None:
            raise ValueError(f"{NODE_NAMES[self.capture.node_id]}: the guider did not run ComfyUI's CFG step, so "
                             "CFG++ got no unconditional prediction. Use CFGGuider (or SamplerCustom) with a negative "
                             "prompt.")
        return self.capture.pred


def sigma_space(model_patcher) -> cfgpp.SigmaSpace:
    """The `SigmaSpace` of a ModelPatcher's model (a k-diffusion wrapper's is `model.inner_model.model_patcher`)."""
    model_sampling = model_patcher.get_model_object("model_sampling")
    flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    return cfgpp.SigmaSpace(flow=flow, sigma_data=float(getattr(model_sampling, "sigma_data", 1.0)))


def capturing(model, extra_args: dict, node_id: str) -> tuple[PredictionPairModel, dict]:
    """(the CFG++ model for this run, extra_args with the run's capture hook in a copy of the model options)."""
    problem = composition_problem(extra_args.get("model_options", {}), node_id)
    if problem is not None:
        raise ValueError(problem)
    capture = PredictionCapture(node_id)
    model_options = comfy.model_patcher.set_model_options_post_cfg_function(
        extra_args.get("model_options", {}).copy(), capture, disable_cfg1_optimization=True)
    return PredictionPairModel(model, capture), {**extra_args, "model_options": model_options}


def run_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, function, node_id: str,
              seeded_noise: bool = False, mask: torch.Tensor | None = None, **options):
    """A k-diffusion sampler function (what `comfy.samplers.KSAMPLER` calls) that runs `function`, a sampler or
    `invert_ddim` of `guiders/cfgpp.py`, on ComfyUI's model with this run's prediction capture. `seeded_noise` gives
    ancestral samplers ComfyUI's noise from the run's seed, as core samplers get it; `mask` (a MASK) becomes the
    sampler's per-position `weight` on this run's latent."""
    pair_model, extra_args = capturing(model, extra_args or {}, node_id)
    if mask is not None:
        options["weight"] = latent_weights(mask, x, NODE_NAMES[node_id])
    if seeded_noise:
        options["noise_sampler"] = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    space = sigma_space(model.inner_model.model_patcher)
    return function(pair_model, x, sigmas, extra_args, callback, disable, space=space, **options)


def cfgpp_sampler(method: str, guidance: float, mask: torch.Tensor | None = None) -> comfy.samplers.KSAMPLER:
    """The SAMPLER of CFG++ sampler `method` at λ = `guidance`, for SamplerCustom and SamplerCustomAdvanced; `mask`
    (a MASK, [B, H, W] or [H, W] in [0, 1]) weights the guidance per position (1 = CFG++, 0 = conditional steps)."""
    if method not in cfgpp.SAMPLERS:
        raise ValueError(f"{NODE_NAMES[SAMPLER_NODE_ID]}: unknown sampler {method!r}; choose one of "
                         f"{sorted(cfgpp.SAMPLERS)}.")
    check_guidance_of(SAMPLER_NODE_ID, guidance)
    options = {"function": cfgpp.SAMPLERS[method], "node_id": SAMPLER_NODE_ID, "guidance": guidance,
               "seeded_noise": method in cfgpp.ANCESTRAL}
    if mask is not None:
        options["mask"] = mask
    return comfy.samplers.KSAMPLER(run_cfgpp, extra_options=options)


def check_guidance_of(node_id: str, guidance: float) -> None:
    try:
        cfgpp.check_guidance(guidance)
    except ValueError as e:
        raise ValueError(f"{NODE_NAMES[node_id]}: {e}.") from e


class LatentStateSampler(comfy.samplers.Sampler):
    """A `run_cfgpp` sampler that starts from the latent itself as the exact state at sigmas[0] and returns the state
    at sigmas[-1] as it is: no noise added, no `noise_scaling` or `inverse_noise_scaling`. Those conversions cannot
    represent a flow model's state at σ = 1 (they scale the latent by 1 − σ), and inversion and sampling back must
    hand the state over unchanged."""

    def __init__(self, options: dict):
        self.options = options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        extra_args = {**extra_args, "denoise_mask": None}
        total_steps = len(sigmas) - 1
        k_callback = None if callback is None else lambda info: callback(info["i"], info["denoised"], info["x"],
                                                                        total_steps)
        return run_cfgpp(model_k, latent_image, sigmas, extra_args=extra_args, callback=k_callback,
                         disable=disable_pbar, **self.options)


def run_from_latent(model, positive, negative, latent: dict, sigmas: torch.Tensor, options: dict) -> torch.Tensor:
    """The samples of `run_cfgpp(**options)` run from `latent` (the state at sigmas[0]) through ComfyUI's CFGGuider
    at cfg 1, with model patches, conditioning and latent format handled as in any ComfyUI sampling run."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(1.0)
    samples = latent["samples"]
    progress = comfy.utils.ProgressBar(len(sigmas) - 1)
    return guider.sample(torch.zeros_like(samples), samples, LatentStateSampler(options), sigmas,
                         callback=lambda step, denoised, x, total: progress.update_absolute(step + 1, total),
                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)


def invert(model, positive, negative, latent: dict, sigmas: torch.Tensor, guidance: float,
           manifold_constrained: bool = True) -> dict:
    """The LATENT inverted with CFG++ DDIM along the sampling schedule `sigmas` (decreasing, ending at 0), walked
    from 0 up to sigmas[0]. Its samples are the state at sigmas[0] in the latent format; the noise level is kept
    under INVERTED_SIGMA_KEY. `manifold_constrained=False` inverts with plain CFG at scale `guidance` instead."""
    if manifold_constrained:
        check_guidance_of(INVERSION_NODE_ID, guidance)
    if "noise_mask" in latent:
        raise ValueError(f"{NODE_NAMES[INVERSION_NODE_ID]}: the latent has a noise mask; inversion works on whole "
                         "latents. Remove the mask (e.g. encode with VAE Encode instead of VAE Encode for Inpaint).")
    try:
        walk = cfgpp.sampling_sigmas_for_inversion(sigmas)
    except ValueError as e:
        raise ValueError(f"{NODE_NAMES[INVERSION_NODE_ID]}: {e}. Connect a scheduler's SIGMAS (e.g. BasicScheduler at "
                         "denoise 1), the same as for sampling back.") from e
    options = {"function": cfgpp.invert_ddim, "node_id": INVERSION_NODE_ID, "guidance": guidance,
               "manifold_constrained": manifold_constrained}
    samples = run_from_latent(model, positive, negative, latent, walk, options)
    return {**latent, "samples": samples, INVERTED_SIGMA_KEY: float(walk[-1])}


def sample_back(model, positive, negative, latent: dict, sigmas: torch.Tensor, guidance: float,
                manifold_constrained: bool = True) -> dict:
    """The LATENT sampled with CFG++ DDIM from `latent` as the state at sigmas[0] (an inverted latent);
    `manifold_constrained=False` samples with plain CFG at scale `guidance` instead."""
    if manifold_constrained:
        check_guidance_of(SAMPLE_BACK_NODE_ID, guidance)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{NODE_NAMES[SAMPLE_BACK_NODE_ID]}: the schedule must be a decreasing list of at least two "
                         "sigmas; connect the scheduler that the inversion used.")
    inverted_sigma = latent.get(INVERTED_SIGMA_KEY)
    if inverted_sigma is not None and not math.isclose(inverted_sigma, float(sigmas[0]), rel_tol=1e-4):
        raise ValueError(f"{NODE_NAMES[SAMPLE_BACK_NODE_ID]}: the latent was inverted to sigma {inverted_sigma:.4g}, "
                         f"but the schedule starts at {float(sigmas[0]):.4g}. Connect the scheduler that the inversion "
                         "used.")
    options = {"function": cfgpp.sample_ddim, "node_id": SAMPLE_BACK_NODE_ID, "guidance": guidance,
               "manifold_constrained": manifold_constrained}
    samples = run_from_latent(model, positive, negative, latent, sigmas, options)
    out = {key: value for key, value in latent.items() if key != INVERTED_SIGMA_KEY}
    return {**out, "samples": samples}
