"""The GFCG patch that the node puts on a model: ComfyUI hooks around `guiders/gfcg.py`.

Kept apart from the node class so that scripts (benchmarks, evaluation) can patch a model exactly as the node does
without importing ComfyUI's node API.

Each model call in the sigma range, the classifier reads the conditional denoised prediction D_c (through the VAE for
an image classifier, without a graph), and the reference prediction D_r = D(x; r) is made for each image's
reference class r with the class conditioning (`ClassConditioning`: the reference model's class tokens, or one
encoded prompt per class). Our reading of when the classifier is read (the paper's could not be read): the reference
class r of a call is chosen from the latest D_c known before the call, so that the reference rows ride in the same
model call as the conditional and unconditional ones (2 rows for GFCG alone, 3 with CFG, one call): that is the
previous call's D_c, except at the run's first call in the range, which makes D_c first and D_r in a second call.
The scale s_t is read from the call's own D_c (one classifier pass per call either way). The post-CFG hook adds
s_t (D_c − D_r) to whatever the CFG step (or APG, or a CFG function) produced; the optional mask weights that term.

With Autoguidance applied before (nodes/autoguidance_patch.py) the weak model's pass is already a second call, so
there r is read from the call's own D_c, and the weak model is asked for r instead of c: D̂ = D_weak(x; r) +
w (D(x; c) − D_weak(x; r)), at ATG's cost; s is then not used (w is the only scale) and a mask is refused.

When another calc-cond-batch hook is installed before this one (PAG, AG), or ComfyUI's memory estimate says the
larger batch does not fit, the reference rows run as a separate call; both give the same result.
"""

import dataclasses
import uuid

import torch

import comfy.samplers

from ..guiders.gfcg import GFCGConfig, gfcg_guided, guidance_scale, reference_classes
from ..guiders.saliency import latent_weights
from .classifier_patch import DEFAULT_CHUNK, ClassifierTargets, classifier_on_denoised
from .pag_patch import batch_fits
from .run_state import run_state

NODE_ID = "GuidanceGFCG"
DISPLAY_NAME = "Gradient-Free Classifier Guidance (GFCG)"
# Seed of the random reference classes of the ablation; the same every run, so runs compare on the same draws.
RANDOM_REFERENCE_SEED = 0
# The keys of a prepared cond dict that the class conditioning replaces; the others (area, mask, strength, timestep
# range, control) are kept, so the reference rows are conditioned like the conditional ones but for the class.
CLASS_KEYS = ("cross_attn", "pooled_output", "model_conds", "uuid")
CLASS_PLACEHOLDER = "{}"
DEFAULT_CLASS_PROMPT = "a photo of a {}"


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
    """Conditioning of every class of the classifier: cross-attention rows [K, T, D] and, for models that read one
    (SDXL), pooled rows [K, P]; `names` the classes, in the classifier's order."""

    cross_attn: torch.Tensor
    names: tuple[str, ...]
    pooled: torch.Tensor | None = None

    def __post_init__(self):
        if self.cross_attn.ndim != 3 or self.cross_attn.shape[0] != len(self.names):
            raise ValueError(f"class conditioning of shape {tuple(self.cross_attn.shape)} for {len(self.names)} "
                             "classes; it must be [classes, tokens, width]")
        if self.pooled is not None and self.pooled.shape[0] != len(self.names):
            raise ValueError(f"pooled class conditioning for {self.pooled.shape[0]} classes, not {len(self.names)}")

    def check_classifier(self, class_names: tuple[str, ...]) -> None:
        if tuple(name.lower() for name in class_names) != tuple(name.lower() for name in self.names):
            raise ValueError(f"the class conditioning has classes {', '.join(self.names)}, the classifier "
                             f"{', '.join(class_names)}: they must be the same classes in the same order")

    def prepared(self, model, positive: list[dict], classes: torch.Tensor, x: torch.Tensor) -> list[dict]:
        """The sampler's cond list for image b conditioned on class classes[b]: the first positive entry's settings
        with the classes' conditioning, encoded for the BaseModel `model` as ComfyUI's sampler does."""
        index = classes.cpu()
        cond = {key: value for key, value in positive[0].items() if key not in CLASS_KEYS}
        cond.update(cross_attn=self.cross_attn[index].to(x.device), model_conds={}, uuid=uuid.uuid4())
        if self.pooled is not None:
            cond["pooled_output"] = self.pooled[index].to(x.device)
        return comfy.samplers.encode_model_conds(model.extra_conds, [cond], x, x.device, "positive")


def reference_class_conditioning(classes: dict) -> ClassConditioning:
    """The reference model's class conditioning (its loader's `classes`: names, and class tokens with the empty class
    last)."""
    names = tuple(classes["names"])
    return ClassConditioning(classes["tokens"][:len(names)], names)


def prompt_class_conditioning(clip, names: tuple[str, ...], prompt: str) -> ClassConditioning:
    """One prompt per class, `prompt` with the class name in place of CLASS_PLACEHOLDER, encoded by ComfyUI's CLIP
    `clip` as CLIPTextEncode does (with its pooled output, which SDXL reads)."""
    rows, pooled = [], []
    for name in names:
        cond, pool = clip.encode_from_tokens(clip.tokenize(prompt.replace(CLASS_PLACEHOLDER, name)),
                                             return_pooled=True)
        rows.append(cond)
        pooled.append(pool)
    if len({row.shape for row in rows}) > 1:
        raise ValueError("the class prompts encode to different lengths (a long class name); shorten class_prompt "
                         "or the class names so that each fits one CLIP window")
    return ClassConditioning(torch.cat(rows), names, None if any(p is None for p in pooled) else torch.cat(pooled))


def apply_gfcg(model, targets: ClassifierTargets, conditioning: ClassConditioning, config: GFCGConfig, vae=None,
               chunk: int = DEFAULT_CHUNK, mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` with GFCG; `mask` (a MASK, [B, H, W] in [0, 1]) weights its term per
    position: 1 is GFCG, 0 leaves the prediction without it."""
    conditioning.check_classifier(targets.classifier.class_names)
    replaced = model.model_options.get("sampler_calc_cond_batch_function")
    owner = getattr(replaced, "__self__", None)
    if getattr(owner, "chooses_reference_class", False):
        raise ValueError(f"this model already has {owner.node_name}; apply it once")
    if getattr(owner, "autoguides", False) and mask is not None:
        raise ValueError(f"with {owner.node_name} the weak model is asked for the reference class and GFCG adds no "
                         "term of its own, so there is nothing for the mask to weight: disconnect the mask")
    classifier = classifier_on_denoised(targets.classifier, targets.classifier.network, model, vae, DISPLAY_NAME,
                                        chunk)
    patched = model.clone()
    hook = GFCGHook(classifier, targets, conditioning, config, replaced, mask)
    patched.set_model_sampler_calc_cond_batch_function(hook.calc_cond_batch)
    patched.set_model_sampler_post_cfg_function(hook.post_cfg)
    return patched


@dataclasses.dataclass
class ReferencePrediction:
    """What a call hands the post-CFG hook (for the input `x` it was made for), and what the next call reads."""

    input: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None  # p(k | D_c) of the latest call in the range
    generator: torch.Generator = dataclasses.field(
        default_factory=lambda: torch.Generator().manual_seed(RANDOM_REFERENCE_SEED))

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(D_r, s_t) made for input `x` (the same tensor object the sampler passes to both hooks), once."""
        made = (self.prediction, self.scale) if self.input is x else None
        self.input = self.prediction = self.scale = None
        return made


class GFCGHook:
    """Calc-cond-batch hook (adds the reference rows, reads the classifier) and post-CFG hook (adds s_t (D_c − D_r))."""

    node_name = DISPLAY_NAME
    # Marks the hook wherever this module was imported from: Autoguidance refuses to be applied after it. (CFG++
    # refuses the post-CFG hook, which carries no `adds_guidance_term` mark: GFCG under CFG++ is not measured.)
    chooses_reference_class = True

    def __init__(self, classifier, targets: ClassifierTargets, conditioning: ClassConditioning, config: GFCGConfig,
                 replaced_calc_cond_batch, mask: torch.Tensor | None = None):
        self.classifier = classifier
        self.targets = targets
        self.conditioning = conditioning
        self.config = config
        self.replaced_calc_cond_batch = replaced_calc_cond_batch
        self.mask = mask

    @property
    def autoguidance(self):
        owner = getattr(self.replaced_calc_cond_batch, "__self__", None)
        return owner if getattr(owner, "autoguides", False) else None

    def plain_calc_cond_batch(self, args) -> list:
        if self.replaced_calc_cond_batch is not None:
            return self.replaced_calc_cond_batch(args)
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    def probabilities(self, cond: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):  # moved under inference mode, its weights could not be used outside it
            self.targets.classifier.network.to(cond.device)
        probabilities = self.classifier.probabilities(cond)
        if not torch.isfinite(probabilities).all():
            raise ValueError(f"{DISPLAY_NAME}: the classifier's probabilities are not finite; check the model's output "
                             "(run it in float32, e.g. --force-fp32) and the classifier.")
        return probabilities

    def reference(self, probabilities: torch.Tensor, target: torch.Tensor, state: ReferencePrediction):
        return reference_classes(probabilities, target, self.config.reference_rule, state.generator)

    def separate_pass(self, args, positive: list, reference: torch.Tensor) -> torch.Tensor:
        cond = self.conditioning.prepared(args["model"], positive, reference, args["input"])
        return comfy.samplers.calc_cond_batch(args["model"], [cond], args["input"], args["sigma"],
                                              args["model_options"])[0]

    def calc_cond_batch(self, args) -> list:
        conds, x, sigma, model, model_options = (args[k] for k in ("conds", "input", "sigma", "model", "model_options"))
        if not self.config.acts_at(float(sigma.max())):
            return self.plain_calc_cond_batch(args)
        state = run_state(model_options, self, ReferencePrediction)
        target = self.targets.for_batch(x.shape[0], DISPLAY_NAME, x.device)
        if self.autoguidance is not None:
            return self.with_autoguidance(args, state, target)
        earlier = state.probabilities
        if earlier is None or earlier.shape[0] != x.shape[0]:  # the first call in the range: D_c first
            out = self.plain_calc_cond_batch(args)
            probabilities = self.probabilities(out[0])
            reference = self.reference(probabilities, target, state)
            prediction = self.separate_pass(args, conds[0], reference)
        else:
            reference = self.reference(earlier, target, state)
            chunks = sum(c is not None for c in conds) + 1
            if self.replaced_calc_cond_batch is None and batch_fits(model, x, chunks):
                cond = self.conditioning.prepared(model, conds[0], reference, x)
                out = comfy.samplers.calc_cond_batch(model, [*conds, cond], x, sigma, model_options)
                prediction = out.pop()
            else:
                out = self.plain_calc_cond_batch(args)
                prediction = self.separate_pass(args, conds[0], reference)
            probabilities = self.probabilities(out[0])
        state.probabilities = probabilities
        state.input, state.prediction = x, prediction
        state.scale = guidance_scale(probabilities, target, reference, self.config.scale, self.config.scale_rule)
        return out

    def with_autoguidance(self, args, state: ReferencePrediction, target: torch.Tensor) -> list:
        """[D(x; c), D_weak(x; r)], r read from this call's D(x; c)."""
        conds = args["conds"]
        out = self.autoguidance.conditional(args)
        if len(conds) < 2 or conds[1] is None:  # cfg 1: no guidance
            return out
        probabilities = self.probabilities(out[0])
        state.probabilities = probabilities
        reference = self.reference(probabilities, target, state)
        cond = self.conditioning.prepared(args["model"], conds[0], reference, args["input"])
        return [out[0], self.autoguidance.weak_prediction(args, cond), *out[2:]]

    def post_cfg(self, args) -> torch.Tensor:
        denoised = args["denoised"]
        if self.autoguidance is not None or not self.config.acts_at(float(args["sigma"].max())):
            return denoised
        state = run_state(args["model_options"], self, ReferencePrediction)
        made = state.take(args["input"])
        if made is None:  # a guider that bypassed the calc-cond-batch hook: read and call here
            cond_denoised = args["cond_denoised"]
            target = self.targets.for_batch(cond_denoised.shape[0], DISPLAY_NAME, cond_denoised.device)
            probabilities = self.probabilities(cond_denoised)
            reference = self.reference(probabilities, target, state)
            made = (self.separate_pass(args, args["cond"], reference),
                    guidance_scale(probabilities, target, reference, self.config.scale, self.config.scale_rule))
        prediction, scale = made
        guided = gfcg_guided(denoised, args["cond_denoised"], prediction, scale)
        if self.mask is None:
            return guided
        return torch.lerp(denoised, guided, latent_weights(self.mask, guided, DISPLAY_NAME))
