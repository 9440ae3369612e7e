"""ComfyUI side of adapter guidance distillation (`guiders/agd.py`): where the adapters attach, the patch that
applies them, and the training (trajectories with ComfyUI's samplers, then the adapters' training loop).

Kept apart from the node classes so that scripts (the training command, benchmarks) patch and train exactly as the
nodes do without importing ComfyUI's node API.

The adapters attach through ComfyUI's transformer patches, never by editing the model, so a model without the patch
is the base model bit for bit: an `emb_patch` keeps the UNet's timestep embedding of the call in the call's
transformer options, an `attn2_patch` keeps each cross-attention's input and context in the block's options, and an
`attn2_output_patch` adds the block's adapter to the cross-attention's output. The same patch objects run in training
(with the adapters' float32 parameters) and at sampling (with a copy in the model's dtype). A pre-CFG hook checks each
run: the sampler's cfg must be 1 (the adapters give the guided prediction; CFG on top would guide it twice at twice
the cost), and guidance patches that need the unconditional pass are refused, naming both nodes.
"""

import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ..guiders.agd import (AdapterSet, AdapterSpec, AttachmentPoint, StackedConditions, adapter_layout,
                           cfg_prediction, distillation_loss, learning_rate_factor, load_adapters, uniform_scales)
from ..guiders.saliency import latent_weights
from .adaptive_patch import model_fingerprint
from .cfgpp_patch import patch_owner

NODE_ID = "GuidanceAGDApply"
DISPLAY_NAME = "Adapter Guidance Distillation (AGD)"
TRAIN_NODE_ID = "GuidanceAGDTrain"
TRAIN_DISPLAY_NAME = "Train AGD Adapters"
FOLDER = "agd_adapters"  # models/agd_adapters: trained adapter files
BASE_CHECKS = ("exact weights", "same architecture")
TIME_KEY = "comfyui_guidance.agd.time_embedding"
SCALE_KEY = "comfyui_guidance.agd.scales"  # per-row scales of a training batch
INPUT_KEY = "comfyui_guidance.agd.attn2_input"
CALL_KEY = "comfyui_guidance.agd.call"


def unet_of(model, node_name: str):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = model.get_model_object("diffusion_model")
    if not isinstance(unet, UNetModel):
        raise ValueError(f"{node_name}: AGD's adapters attach to the cross-attention layers of UNet models (SD1.x, "
                         f"SD2.x, SDXL, the pack's reference model); this model's denoiser is "
                         f"{type(unet).__name__}, which this node does not support.")
    return unet


def attachment_points(model, node_name: str) -> tuple[list[AttachmentPoint], int, int]:
    """(every cross-attention of the UNet as ComfyUI names it while running, timestep-embedding width, context
    width). The official code attaches an adapter to every `attn2` (agd/sd/adapter.py)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = unet_of(model, node_name)
    points, context_dims = [], set()
    groups = [("input", i, m) for i, m in enumerate(unet.input_blocks)]
    groups += [("middle", 0, unet.middle_block)] if unet.middle_block is not None else []
    groups += [("output", i, m) for i, m in enumerate(unet.output_blocks)]
    for kind, block, module in groups:
        index = 0  # ComfyUI's block_index counts the transformer blocks of every SpatialTransformer in the block
        for layer in module:
            if not isinstance(layer, SpatialTransformer):
                continue
            for transformer in layer.transformer_blocks:
                if transformer.attn2 is not None:
                    points.append(AttachmentPoint((kind, block), index, transformer.attn2.to_q.in_features))
                    context_dims.add(transformer.attn2.to_k.in_features)
                index += 1
    if not points:
        raise ValueError(f"{node_name}: this UNet has no cross-attention layer for AGD's adapters to attach to.")
    return points, unet.time_embed[-1].out_features, max(context_dims)


def new_adapters(model, spec: AdapterSpec, seed: int, node_name: str = TRAIN_DISPLAY_NAME) -> AdapterSet:
    points, time_dim, prompt_dim = attachment_points(model, node_name)
    adapters = AdapterSet(points, spec, time_dim, prompt_dim, seed)
    adapters.info = {"base_fingerprint": model_fingerprint(model)}
    return adapters


def check_base(adapters: AdapterSet, model, base_check: str, node_name: str = DISPLAY_NAME) -> None:
    """Refuses adapters made for another base: another layout always, other weights under 'exact weights'."""
    points, time_dim, prompt_dim = attachment_points(model, node_name)
    if adapters.layout() != adapter_layout(points, adapters.spec, time_dim, prompt_dim):
        def describe(points, time_dim, prompt_dim):
            return (f"{len(points)} cross-attention layers of widths {sorted({p.input_dim for p in points})}, "
                    f"context width {prompt_dim}, timestep embedding width {time_dim}")
        raise ValueError(f"{node_name}: these adapters were made for a model of another architecture "
                         f"({describe(adapters.points, adapters.time_dim, adapters.prompt_dim)}; this model has "
                         f"{describe(points, time_dim, prompt_dim)}). Train adapters for this model with "
                         f"{TRAIN_DISPLAY_NAME}.")
    if base_check != "exact weights":
        return
    made_for, this = adapters.info.get("base_fingerprint"), model_fingerprint(model)
    if made_for != this:
        raise ValueError(f"{node_name}: these adapters were trained on other weights (base fingerprint {made_for}; "
                         f"this model's, LoRAs included, is {this}). Train adapters for this model, or set base_check "
                         f"to 'same architecture' to use them on a checkpoint derived from their base (the paper "
                         f"reports that adapters carry over to such checkpoints).")


def read_adapter_file(path: str, node_name: str = DISPLAY_NAME) -> AdapterSet:
    tensors, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    try:
        return load_adapters(tensors, metadata)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{node_name}: {os.path.basename(path)}: {e}") from e


class AGDPatch:
    """The transformer patches that add the adapters to a UNet's cross-attention outputs, and the run check."""

    node_name = DISPLAY_NAME
    distills_guidance = True  # gives CFG's prediction in the conditional pass: CFG++ and the CFG reshapers refuse it

    def __init__(self, adapters: AdapterSet, scale: float, mask: torch.Tensor | None = None, trainable: bool = False):
        self.adapters, self.scale, self.mask, self.trainable = adapters, scale, mask, trainable
        self.copies: dict = {}  # (device, dtype) -> read-only copy of the adapters for sampling

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; the adapters are read-only
        return self

    def keep_time_embedding(self, emb, model_channels, transformer_options):
        transformer_options[TIME_KEY] = emb
        transformer_options[CALL_KEY] = {}  # this model call's keys and values, made at its first cross-attention
        return emb

    def keep_input(self, n, context, value, extra_options):
        extra_options[INPUT_KEY] = (n, context)
        return n, context, value

    def sampling_copy(self, like: torch.Tensor) -> tuple[AdapterSet, StackedConditions, dict]:
        """The adapters in the dtype and on the device of the model's features, their stacked token weights and
        each adapter's place in the stack."""
        key = (like.device, like.dtype)
        if key not in self.copies:
            with torch.inference_mode(False):
                twin = copy.deepcopy(self.adapters).to(device=like.device, dtype=like.dtype).requires_grad_(False)
            self.copies[key] = (twin, StackedConditions(list(twin.adapters.values())),
                                {name: i for i, name in enumerate(twin.adapters)})
        return self.copies[key]

    def prepare_sampling_copy(self, patcher) -> None:
        """Pre-run callback: the sampling copy for the device and dtype the model computes in, made before the first
        model call, so that a compiled model (torch.compile) never meets the copying inside its compiled region (a
        graph break) or a copy added between two calls (a recompilation)."""
        model = patcher.model
        dtype = model.manual_cast_dtype if model.manual_cast_dtype is not None else model.get_dtype()
        self.sampling_copy(torch.empty(0, device=patcher.load_device, dtype=dtype))

    def add_adapter(self, n, extra_options):
        kind, block = extra_options["block"]
        name = f"{kind}_{block}_{extra_options.get('block_index', 0)}"
        kept = extra_options.pop(INPUT_KEY, None)
        if kept is None:  # a transformer block without cross-attention: ComfyUI still runs the output patches
            return n
        x, context = kept
        time_embedding = extra_options[TIME_KEY]
        call = extra_options[CALL_KEY]
        if self.trainable:  # each adapter on its own, in the adapters' float32, for autograd
            adapter = self.adapters.adapters[name]
            dtype = adapter.out_proj.weight.dtype
            out = adapter(x.to(dtype), self.row_scales(extra_options, x), time_embedding.to(dtype), context.to(dtype))
        else:
            adapters, stacked, index = self.sampling_copy(n)
            if "keys" not in call:
                call["keys"], call["values"] = stacked.keys_values(self.row_scales(extra_options, x), time_embedding,
                                                                   context)
            out = adapters.adapters[name].attend(x, call["keys"][index[name]], call["values"][index[name]])
        if self.mask is not None:
            out = out * self.token_weights(extra_options, call, out)
        return n + out.to(n.dtype)

    def row_scales(self, extra_options, x: torch.Tensor) -> torch.Tensor:
        """[rows]: the guidance scale of each row of the call (a training batch's own, else the node's)."""
        scales = extra_options.get(SCALE_KEY)
        if scales is None:
            return torch.full((x.shape[0],), self.scale, device=x.device)
        return scales.to(x.device)

    def token_weights(self, extra_options, call: dict, out: torch.Tensor) -> torch.Tensor:
        """[rows, tokens, 1]: the mask at this layer's resolution, for every chunk of the call's batch; made once per
        resolution and model call, on the features' device."""
        _, _, height, width = extra_options["activations_shape"]
        key = ("mask", height, width)
        if key not in call:
            rows = out.shape[0]
            chunks = max(len(extra_options.get("cond_or_uncond", [0])), 1)
            like = torch.empty(rows // chunks, 1, height, width, device=out.device)
            weights = latent_weights(self.mask, like, self.node_name)
            weights = weights.expand(rows // chunks, 1, height, width).repeat(chunks, 1, 1, 1)
            call[key] = weights.flatten(1).unsqueeze(-1).to(out.dtype)
        return call[key]

    def check_run(self, args: dict):
        """Pre-CFG hook: stops a run whose cfg is not 1, or that carries a patch needing the unconditional pass."""
        if not math.isclose(args["cond_scale"], 1.0):
            raise ValueError(f"{self.node_name}: the sampler's cfg is {args['cond_scale']:g}, but the node's "
                             f"adapters already give the guided prediction at scale {self.scale:g} in one pass. Set "
                             "cfg to 1.0 on the KSampler (CFG on top would guide twice, at twice the cost).")
        problem = composition_problem(args["model_options"], self)
        if problem:
            raise ValueError(problem)
        return args["conds_out"]


def refused_patches(model_options: dict, own: AGDPatch):
    """(node, why) for each guidance patch on the model that cannot act on AGD's one-pass prediction."""
    if "sampler_cfg_function" in model_options:
        yield (patch_owner(model_options["sampler_cfg_function"]), "replaces CFG's combination of the conditional "
               "and unconditional predictions, and at cfg 1 under AGD there is no unconditional prediction")
    for hook in model_options.get("sampler_pre_cfg_function", []):
        owner = getattr(hook, "__self__", hook)
        if owner is own:
            continue
        if getattr(owner, "distills_guidance", False):
            yield (owner.node_name, "also adds adapters that give the guided prediction; two sets would guide twice")
        elif getattr(owner, "skips_unconditional_passes", False):
            yield (owner.node_name, "decides when to skip CFG's unconditional pass, which AGD never makes")
        elif getattr(hook, "reshapes_extrapolation", False):
            yield (hook.node_name, "reshapes CFG's update D_c - D_u, which needs the unconditional pass that AGD "
                   "removes")
    for hook in model_options.get("sampler_post_cfg_function", []):
        owner = getattr(hook, "__self__", hook)
        if not (getattr(owner, "adds_guidance_term", False) or getattr(owner, "guides_denoised", False)):
            yield (patch_owner(hook), "changes CFG's result using the unconditional prediction or the cfg scale, "
                   "which are absent at cfg 1 under AGD")


def composition_problem(model_options: dict, own: AGDPatch) -> str | None:
    for other, why in refused_patches(model_options, own):
        return (f"{own.node_name} and {other} do not combine: {other} {why}. Remove {other}, or remove "
                f"{own.node_name} and sample with CFG.")
    return None


def attach(model, patch: AGDPatch) -> None:
    """Adds the patch's transformer patches to the ModelPatcher `model` (a clone the caller owns)."""
    model.set_model_emb_patch(patch.keep_time_embedding)
    model.set_model_attn2_patch(patch.keep_input)
    model.set_model_attn2_output_patch(patch.add_adapter)


def apply_agd(model, adapters: AdapterSet, scale: float, base_check: str = "exact weights",
              mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` whose conditional pass gives CFG's prediction at `scale` (sample at cfg 1);
    `mask` (a MASK) weights the adapters per position: 1 is AGD, 0 the base model's conditional prediction."""
    if base_check not in BASE_CHECKS:
        raise ValueError(f"{DISPLAY_NAME}: base_check must be one of {BASE_CHECKS}, not {base_check!r}")
    check_base(adapters, model, base_check)
    low, high = (float(adapters.info[k]) for k in ("scale_low", "scale_high")) if "scale_low" in adapters.info \
        else (-math.inf, math.inf)
    if not low <= scale <= high:
        raise ValueError(f"{DISPLAY_NAME}: these adapters were trained on guidance scales {low:g} to {high:g}; scale "
                         f"{scale:g} is outside that range, where the adapters were never taught anything.")
    patch = AGDPatch(adapters, scale, mask)
    problem = composition_problem(model.model_options, patch)
    if problem:
        raise ValueError(problem)
    patched = model.clone()
    attach(patched, patch)
    patched.set_model_sampler_pre_cfg_function(patch.check_run)
    patched.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, patch.prepare_sampling_copy)
    return patched


# Training ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How trajectories are made and the adapters trained; defaults from the official Stable Diffusion scripts, but
    for the trajectories' sampler and steps (the official code samples 999 DDIM steps; a sampler and step count that
    the adapters will be used with visit the same states for a fraction of the cost)."""

    trajectories: int = 256
    scale_low: float = 1.0
    scale_high: float = 12.0
    sampler: str = "euler"
    scheduler: str = "normal"
    sample_steps: int = 30
    trajectory_batch: int = 8
    train_steps: int = 5000
    batch: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    ordinary: bool = False  # the ablation: training images noised forward instead of CFG-guided trajectories
    resident_bytes: int = 2 << 30  # trajectory chunks held in memory at once

    def __post_init__(self):
        if not (1 <= self.scale_low <= self.scale_high and math.isfinite(self.scale_high)):
            raise ValueError(f"the scale range must satisfy 1 <= low <= high, not [{self.scale_low}, {self.scale_high}]")
        for name in ("trajectories", "sample_steps", "trajectory_batch", "train_steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate}")

    def trajectory_fields(self) -> dict:
        keys = ("trajectories", "scale_low", "scale_high", "sampler", "scheduler", "sample_steps", "seed", "ordinary")
        return {k: getattr(self, k) for k in keys}


def output_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """b(σ) = |∂D/∂output| per sample: what turns a denoised error into an error of the model's own output."""
    ones = torch.ones_like(sigma).view(-1, 1)
    return model_sampling.calculate_denoised(sigma, ones, torch.zeros_like(ones)).abs().flatten()


class TrajectoryRecorder:
    """Post-CFG hook of a trajectory run: per model call, CFG's prediction with each trajectory's own scale, and the
    state, σ and conditioning it was made from."""

    def __init__(self, scales: torch.Tensor):
        self.scales = scales
        self.inputs, self.targets, self.sigmas = [], [], []
        self.conds: dict[str, torch.Tensor] | None = None

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        if args["uncond"] is None:
            raise ValueError(f"{TRAIN_DISPLAY_NAME}: the trajectories need CFG's unconditional pass; connect a "
                             "negative conditioning.")
        x, cond, uncond = args["input"], args["cond_denoised"], args["uncond_denoised"]
        target = cfg_prediction(cond, uncond, self.scales.to(x.device))
        self.inputs.append(x.to("cpu", torch.float16))
        self.targets.append(target.to("cpu", torch.float16))
        self.sigmas.append(args["sigma"].float().cpu().expand(x.shape[0]).clone())
        if self.conds is None:
            self.conds = model_conds(args["cond"], x)
        return target

    def chunk(self) -> dict[str, torch.Tensor]:
        calls, rows = len(self.inputs), self.inputs[0].shape[0]
        chunk = {"x": torch.cat(self.inputs), "target": torch.cat(self.targets), "sigma": torch.cat(self.sigmas),
                 "scale": self.scales.float().repeat(calls), "row": torch.arange(rows).repeat(calls)}
        chunk.update({f"cond.{k}": v for k, v in self.conds.items()})
        return chunk


def model_conds(cond: list, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's conditioning tensors of a processed positive conditioning, one row per image of `x`."""
    if len(cond) != 1:
        raise ValueError(f"{TRAIN_DISPLAY_NAME}: the positive conditioning has {len(cond)} entries (areas or "
                         "combined prompts); give one prompt (or one batch of prompts) per training run.")
    area = (*x.shape[2:], *[0] * (x.ndim - 2))
    out = {}
    for name, value in cond[0]["model_conds"].items():
        out[name] = value.process_cond(batch_size=x.shape[0], device="cpu", area=area).cond.float().clone()
    return out


def ordinary_calls(model, x, sigmas, extra_args=None, callback=None, disable=None, clean=None, generator=None):
    """A 'sampler' for the ablation: one model call per σ of the schedule at clean images noised forward (fresh
    noise each time), as ordinary diffusion training sees them; it returns the clean images."""
    s_in = x.new_ones([x.shape[0]])
    clean = clean.to(x)
    model_sampling = model.inner_model.inner_model.model_sampling
    for sigma in sigmas[:-1]:
        noise = torch.randn(clean.shape, generator=generator).to(x)
        model(model_sampling.noise_scaling(sigma, noise, clean), sigma * s_in, **(extra_args or {}))
    return clean


def inputs_digest(*values) -> str:
    """A digest of the trajectories' inputs (conditionings and latents, nested in lists and dicts), so that chunks
    made from other prompts are never reused."""
    digest = hashlib.sha256()

    def add(value):
        if torch.is_tensor(value):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    for value in values:
        add(value)
    return digest.hexdigest()[:16]


def make_trajectories(model, positive, negative, latent: torch.Tensor, settings: TrainingSettings, cache: pathlib.Path,
                      progress=None, clean: torch.Tensor | None = None) -> list[pathlib.Path]:
    """Chunk files of training pairs in `cache` (one per batch of trajectories; chunks already there are kept, so an
    interrupted run resumes). `latent`: one latent of the size to train at, or (ordinary) ignored for `clean`."""
    import comfy.sample

    if (clean is not None) != settings.ordinary:
        raise ValueError(f"{TRAIN_DISPLAY_NAME}: settings.ordinary is {settings.ordinary}, but clean latents were "
                         f"{'given' if clean is not None else 'not given'}; the ablation needs both, CFG trajectories "
                         "neither.")
    prompts = positive[0][0].shape[0] if positive else 1
    if settings.trajectory_batch % prompts:
        raise ValueError(f"{TRAIN_DISPLAY_NAME}: the positive conditioning holds a batch of {prompts} prompts, but "
                         f"trajectory_batch is {settings.trajectory_batch}; ComfyUI would cut the batch of prompts to "
                         f"fit, and some prompts would never be trained on. Set trajectory_batch to a multiple of "
                         f"{prompts}.")
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / "trajectories.json"
    fields = json.dumps({**settings.trajectory_fields(), "base": model_fingerprint(model),
                         "inputs": inputs_digest(positive, negative, latent if clean is None else clean)},
                        sort_keys=True)
    if manifest.exists() and manifest.read_text() != fields:
        for old in cache.glob("chunk_*.safetensors"):
            old.unlink()
    manifest.write_text(fields)
    from safetensors.torch import save_file

    scales = uniform_scales(settings.trajectories, settings.scale_low, settings.scale_high,
                            torch.Generator().manual_seed(settings.seed))
    paths = []
    for start in range(0, settings.trajectories, settings.trajectory_batch):
        comfy.model_management.throw_exception_if_processing_interrupted()
        path = cache / f"chunk_{start:06d}.safetensors"
        paths.append(path)
        count = min(settings.trajectory_batch, settings.trajectories - start)
        if not path.exists():
            recorder = TrajectoryRecorder(scales[start:start + count])
            recording = model.clone()
            recording.set_model_sampler_post_cfg_function(recorder)
            seed = settings.seed + start
            if clean is None:
                empty = latent[:1].repeat(count, *[1] * (latent.ndim - 1))
                noise = comfy.sample.prepare_noise(empty, seed)
                comfy.sample.sample(recording, noise, settings.sample_steps, 2.0, settings.sampler, settings.scheduler,
                                    positive, negative, empty, seed=seed, disable_pbar=True)
            else:
                images = clean[torch.arange(start, start + count) % clean.shape[0]]  # in turn, cycling
                sampler = comfy.samplers.KSAMPLER(ordinary_calls, extra_options={
                    "clean": model.model.process_latent_in(images), "generator": torch.Generator().manual_seed(seed)})
                sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), settings.scheduler,
                                                         settings.sample_steps)
                comfy.sample.sample_custom(recording, torch.zeros_like(images), 2.0, sampler, sigmas, positive,
                                           negative, images, seed=seed, disable_pbar=True)
            save_file(recorder.chunk(), str(path))
        if progress is not None:
            progress(start + count, settings.trajectories)
    return paths


class ChunkSampler:
    """Random training batches from trajectory chunk files, holding as many chunks in memory as fit the budget and
    replacing one at random every `refresh` batches when they do not all fit."""

    def __init__(self, paths: list[pathlib.Path], budget: int, generator: torch.Generator, refresh: int = 50):
        from safetensors.torch import load_file

        self.load = lambda p: load_file(str(p))
        self.paths, self.generator, self.refresh = list(paths), generator, refresh
        first = self.load(self.paths[0])
        size = sum(t.numel() * t.element_size() for t in first.values())
        self.capacity = max(1, min(len(self.paths), budget // max(size, 1)))
        order = torch.randperm(len(self.paths), generator=generator).tolist()
        self.resident = [self.load(self.paths[i]) for i in order[:self.capacity]]
        self.batches = 0

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        self.batches += 1
        if self.capacity < len(self.paths) and self.batches % self.refresh == 0:
            slot = int(torch.randint(self.capacity, (1,), generator=self.generator))
            self.resident[slot] = self.load(self.paths[int(torch.randint(len(self.paths), (1,),
                                                                         generator=self.generator))])
        counts = torch.tensor([c["x"].shape[0] for c in self.resident])
        picks = torch.multinomial(counts.double(), size, replacement=True, generator=self.generator)
        parts = []
        for i in picks.unique().tolist():
            chunk = self.resident[i]
            rows = torch.randint(chunk["x"].shape[0], (int((picks == i).sum()),), generator=self.generator)
            part = {k: chunk[k][rows] for k in ("x", "target", "sigma", "scale")}
            part.update({k: v[chunk["row"][rows]] for k, v in chunk.items() if k.startswith("cond.")})
            parts.append(part)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def ordinary_tensor(weight: torch.Tensor) -> torch.Tensor:
    return weight.clone() if weight.is_inference() else weight


def training_clone(model):
    """A clone of `model` whose layers hand autograd ordinary tensors: ComfyUI loads weights inside inference mode,
    and autograd cannot keep inference tensors for the backward pass through the frozen base. As core's LoRA
    training does, a weight function on every layer makes ComfyUI cast a copy of each weight per call (LoRAs on the
    model applied), so no second copy of the model is kept."""
    clone = model.clone()
    for name, module in model.get_model_object("diffusion_model").named_modules():
        for kind in ("weight", "bias"):
            if hasattr(module, f"{kind}_function") and getattr(module, kind, None) is not None:
                clone.add_weight_wrapper(f"diffusion_model.{name}.{kind}", ordinary_tensor)
    return clone


def train_adapters(model, adapters: AdapterSet, chunks: list[pathlib.Path], settings: TrainingSettings,
                   checkpoint: pathlib.Path | None = None, progress=None, log=None) -> list[float]:
    """Trains `adapters` (in place) on the chunks with the base model frozen; returns the loss of every step. With
    `checkpoint`, saves the adapters, optimizer and step there every 100 steps and resumes from it."""
    device = comfy.model_management.get_torch_device()
    model = training_clone(model)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    base = model.model
    model_sampling = model.get_model_object("model_sampling")
    with torch.inference_mode(False), torch.enable_grad():
        adapters.to(device=device, dtype=torch.float32).train()
        attach(model, AGDPatch(adapters, 0.0, trainable=True))
        options = model.model_options["transformer_options"]
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay)
        generator = torch.Generator().manual_seed(settings.seed)
        sampler = ChunkSampler(chunks, settings.resident_bytes, generator)
        losses, step = [], 0
        if checkpoint is not None and checkpoint.exists():
            # the batches go on as they would have (exactly so when every chunk is held in memory)
            saved = torch.load(checkpoint, map_location=device, weights_only=False)
            adapters.load_state_dict(saved["adapters"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            losses, step = saved["losses"], saved["step"]
            sampler.batches = step
        began = time.perf_counter()
        while step < settings.train_steps:
            comfy.model_management.throw_exception_if_processing_interrupted()
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * learning_rate_factor(step, settings.train_steps)
            batch = {k: v.to(device) for k, v in sampler.batch(settings.batch).items()}
            dtype = base.get_dtype()
            conds = {k[len("cond."):]: v.to(dtype) for k, v in batch.items() if k.startswith("cond.")}
            x, sigma = batch["x"].float(), batch["sigma"].float()
            student = base.apply_model(x, sigma, transformer_options={**options, SCALE_KEY: batch["scale"]}, **conds)
            loss = distillation_loss(student.float(), batch["target"].float(), output_scale(model_sampling, sigma))
            if not torch.isfinite(loss):
                raise ValueError(f"{TRAIN_DISPLAY_NAME}: the loss became {loss.item()} at step {step + 1}; lower the "
                                 "learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if checkpoint is not None and (step % 100 == 0 or step == settings.train_steps):
                torch.save({"adapters": adapters.state_dict(), "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "losses": losses, "step": step}, checkpoint)
            if progress is not None:
                progress(step, settings.train_steps)
            if log is not None and step % 100 == 0:
                log(f"step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.5f} "
                    f"({step / (time.perf_counter() - began):.1f} steps/s)")
        adapters.eval().requires_grad_(False)
    return losses


def train_agd(model, positive, negative, latent: torch.Tensor, settings: TrainingSettings, spec: AdapterSpec,
              work: pathlib.Path, progress=None, log=None, clean: torch.Tensor | None = None) -> AdapterSet:
    """Trajectories, then training; `work` holds the trajectory chunks and the training checkpoint, so that a run
    interrupted at any point resumes where it stopped. Progress: trajectories count 1 each, training steps 1 each."""
    attachment_points(model, TRAIN_DISPLAY_NAME)  # refuses a model without cross-attention before any sampling
    total = settings.trajectories + settings.train_steps
    report = (lambda done, _: progress(done, total)) if progress else None
    began = time.perf_counter()
    chunks = make_trajectories(model, positive, negative, latent, settings, work / "trajectories", report, clean)
    made = time.perf_counter()
    with torch.inference_mode(False):  # trainable parameters (a node runs inside inference mode)
        adapters = new_adapters(model, spec, settings.seed)
    key = json.dumps({"trajectories": settings.trajectory_fields(), "settings": dataclasses.asdict(settings),
                      "spec": dataclasses.asdict(spec), "base": adapters.info["base_fingerprint"]}, sort_keys=True)
    checkpoint = work / "training.pt"
    if (work / "training.json").exists() and (work / "training.json").read_text() != key:
        checkpoint.unlink(missing_ok=True)
    (work / "training.json").write_text(key)
    train_report = (lambda done, _: progress(settings.trajectories + done, total)) if progress else None
    losses = train_adapters(model, adapters, chunks, settings, checkpoint, train_report, log)
    adapters.info.update({"scale_low": str(settings.scale_low), "scale_high": str(settings.scale_high),
                          "settings": json.dumps(dataclasses.asdict(settings)),
                          "trajectory_seconds": f"{made - began:.1f}",
                          "training_seconds": f"{time.perf_counter() - made:.1f}",
                          "final_loss": f"{sum(losses[-100:]) / len(losses[-100:]):.6g}"})
    return adapters
