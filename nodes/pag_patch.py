"""The PAG patch that the node puts on a model: ComfyUI hooks around `guiders/pag.py`.

Kept apart from the node class so that scripts (benchmarks, evaluation) can patch a model exactly as the node does
without importing ComfyUI's node API.

How the perturbed pass runs. ComfyUI's sampler evaluates the conditional and unconditional predictions in one
`calc_cond_batch` call, which concatenates them into one model batch and records in
`transformer_options["cond_or_uncond"]` which list each batch chunk came from. PAG's calc-cond-batch hook appends the
conditional list once more, as list number `len(conds)`, so the perturbed pass rides in the same model call; the
perturbation is applied only to the batch rows of that chunk:

- UNet: an attn1 replace patch on each chosen (block, transformer) computes ordinary attention for the other rows
  and returns V for the perturbed rows (their attention is never computed);
- DiT (SD3, Flux, Wan): a "dit" block patch on each chosen block marks the block's transformer options, and an
  attention override applies the identity to the perturbed rows of the first attention call in a marked block,
  which is the block's self- or joint attention (cross-attention, where a block has one, comes after it).

The patches exist only in the options of that one call, never on the model. When ComfyUI's memory estimate says the
larger batch does not fit, when the user turns batching off, or when another calc-cond-batch function is already
installed, the perturbed pass runs as a separate call instead, with every row perturbed; both give the same result.
The perturbed prediction is handed to the post-CFG hook through the run's state, and the post-CFG hook adds
s (D_c − D̂) to whatever CFG (or APG, or any CFG function) produced. A guider that bypasses the calc-cond-batch hook
still gets PAG: the post-CFG hook then runs the separate pass itself.
"""

import dataclasses

import torch

import comfy.model_management
import comfy.samplers
from comfy.ldm.modules import attention

from ..guiders.pag import PAGConfig, identity_attention, pag_guided
from ..guiders.saliency import latent_weights
from .pag_layers import DIT_BLOCK_KEYS, Layer, select_layers
from .run_state import reserve_run_state, run_state

NODE_ID = "GuidancePerturbedAttention"
DISPLAY_NAME = "Perturbed-Attention Guidance (PAG)"
# Set in a perturbed DiT block's transformer options, for the attention override.
BLOCK_MARK = "comfyui_guidance.pag_block"
# ComfyUI's own margin on its memory estimate when it decides how many conds to batch (comfy/samplers.py).
MEMORY_MARGIN = 1.5


def apply_pag(model, config: PAGConfig, layers: str, batched: bool = True, mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` with PAG on the named layers (see nodes/pag_layers.py); `mask` (a MASK,
    [B, H, W] in [0, 1]) weights PAG's term per position: 1 is PAG, 0 leaves the prediction without it."""
    chosen = select_layers(layers, model.get_model_object("diffusion_model"))
    patched = model.clone()
    reserve_run_state(patched)
    hook = PAGHook(config, chosen, batched, patched.model_options.get("sampler_calc_cond_batch_function"), mask)
    patched.set_model_sampler_calc_cond_batch_function(hook.calc_cond_batch)
    patched.set_model_sampler_post_cfg_function(hook.post_cfg)
    return patched


class PerturbedChunk:
    """The rows of a model batch that belong to the perturbed pass: the chunks whose `cond_or_uncond` entry is
    `index`. ComfyUI concatenates equal-sized chunks in the order of `cond_or_uncond`."""

    def __init__(self, index: int):
        self.index = index

    def runs(self, cond_or_uncond: list[int], rows: int) -> list[tuple[slice, bool]]:
        """Consecutive row ranges with whether they are perturbed."""
        if rows % len(cond_or_uncond):
            raise RuntimeError(f"{DISPLAY_NAME}: a batch of {rows} rows does not split into "
                               f"{len(cond_or_uncond)} chunks")
        size = rows // len(cond_or_uncond)
        runs = []
        for i, chunk in enumerate(cond_or_uncond):
            perturbed = chunk == self.index
            if runs and runs[-1][1] == perturbed:
                runs[-1] = (slice(runs[-1][0].start, (i + 1) * size), perturbed)
            else:
                runs.append((slice(i * size, (i + 1) * size), perturbed))
        return runs


def attend_by_rows(runs, attend, identity) -> torch.Tensor:
    """attend(rows) for ordinary row ranges and identity(rows) for perturbed ones, in batch order."""
    parts = [identity(rows) if perturbed else attend(rows) for rows, perturbed in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class IdentitySelfAttention:
    """attn1 replace patch of one UNet transformer: q, k, v are [B, N, heads·d], the output [B, N, heads·d]."""

    def __init__(self, chunk: PerturbedChunk, replaced):
        self.chunk = chunk
        self.replaced = replaced  # a replace patch the user had on this layer: still used for ordinary rows

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(rows):
            if self.replaced is not None:
                return self.replaced(q[rows], k[rows], v[rows], extra_options)
            return attention.optimized_attention(q[rows], k[rows], v[rows], heads,
                                                 attn_precision=extra_options["attn_precision"],
                                                 transformer_options=extra_options)

        runs = self.chunk.runs(extra_options["cond_or_uncond"], q.shape[0])
        return attend_by_rows(runs, attend, lambda rows: identity_attention(v[rows], heads))


@dataclasses.dataclass
class BlockCall:
    """One call of a perturbed DiT block; its first attention call is the one PAG perturbs."""

    perturbed: bool = False


class PerturbedBlock:
    """"dit" block patch: runs the block with its transformer options marked for the attention override."""

    def __init__(self, replaced):
        self.replaced = replaced  # a block patch the user had on this block: still runs, with the mark

    def __call__(self, args, extra):
        if "transformer_options" not in args:
            raise RuntimeError(f"{DISPLAY_NAME}: this model's blocks do not pass transformer options to block patches, "
                               "so PAG cannot reach their attention; choose another model family's layers.")
        marked = {**args, "transformer_options": {**args["transformer_options"], BLOCK_MARK: BlockCall()}}
        if self.replaced is not None:
            return self.replaced(marked, extra)
        return extra["original_block"](marked)


class IdentityAttentionOverride:
    """ComfyUI's `optimized_attention_override`: identity on the perturbed rows of a marked block's first attention
    call, ordinary attention everywhere else. q, k, v come as [B, N, heads·d] or, with skip_reshape, as
    [B, heads, N, d]; a per-batch mask is split with the rows."""

    def __init__(self, chunk: PerturbedChunk, overridden):
        self.chunk = chunk
        self.overridden = overridden  # an override the user had (another attention backend): still used

    def __call__(self, func, *args, **kwargs):
        def call(*a, **kw):
            return func(*a, **kw) if self.overridden is None else self.overridden(func, *a, **kw)

        options = kwargs["transformer_options"]
        block = options.get(BLOCK_MARK)
        if block is None or block.perturbed:
            return call(*args, **kwargs)
        block.perturbed = True
        q, k, v, *rest = args
        heads = rest[0] if rest else kwargs["heads"]
        rows_total = q.shape[0]
        mask = kwargs.get("mask")

        def attend(rows):
            sliced = dict(kwargs)
            if torch.is_tensor(mask) and mask.ndim >= 3 and mask.shape[0] == rows_total:
                sliced["mask"] = mask[rows]
            return call(q[rows], k[rows], v[rows], *rest, **sliced)

        def identity(rows):
            return identity_attention(v[rows], heads, kwargs.get("skip_reshape", False),
                                      kwargs.get("skip_output_reshape", False))

        return attend_by_rows(self.chunk.runs(options["cond_or_uncond"], rows_total), attend, identity)


def perturbed_model_options(model_options: dict, layers: tuple[Layer, ...], perturbed_index: int) -> dict:
    """A copy of `model_options` whose model call perturbs `layers` in the rows of list `perturbed_index`."""
    chunk = PerturbedChunk(perturbed_index)
    transformer_options = dict(model_options.get("transformer_options", {}))
    replaces = {name: dict(patches) for name, patches in transformer_options.get("patches_replace", {}).items()}
    for layer in layers:
        if layer.is_unet:
            attn1 = replaces.setdefault("attn1", {})
            key = (layer.kind, layer.index, layer.transformer)
            attn1[key] = IdentitySelfAttention(chunk, attn1.get(key, attn1.get(key[:2])))
        else:
            dit = replaces.setdefault("dit", {})
            key = (DIT_BLOCK_KEYS[layer.kind], layer.index)
            dit[key] = PerturbedBlock(dit.get(key))
    if not all(layer.is_unet for layer in layers):
        transformer_options["optimized_attention_override"] = IdentityAttentionOverride(
            chunk, transformer_options.get("optimized_attention_override"))
    transformer_options["patches_replace"] = replaces
    return {**model_options, "transformer_options": transformer_options}


@dataclasses.dataclass
class PerturbedPrediction:
    """The perturbed prediction of the current step, from the calc-cond-batch hook to the post-CFG hook."""

    input: torch.Tensor | None = None
    prediction: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The prediction made for input `x` (the same tensor object the sampler passes to both hooks), once."""
        prediction = self.prediction if self.input is x else None
        self.input = self.prediction = None
        return prediction


def batch_fits(model, x: torch.Tensor, chunks: int) -> bool:
    """ComfyUI's own test for batching conds (comfy/samplers.py), for `chunks` chunks of x's batch."""
    shape = [x.shape[0] * chunks, *x.shape[1:]]
    return model.memory_required(shape) * MEMORY_MARGIN < comfy.model_management.get_free_memory(x.device)


class PAGHook:
    """Calc-cond-batch hook (adds the perturbed pass to the model call) and post-CFG hook (adds s (D_c − D̂))."""

    node_name = DISPLAY_NAME
    # The post-CFG hook adds a term that does not depend on the CFG scale: CFG++ carries it into its guided prediction.
    adds_guidance_term = True

    def __init__(self, config: PAGConfig, layers: tuple[Layer, ...], batched: bool, replaced_calc_cond_batch,
                 mask: torch.Tensor | None = None):
        self.config = config
        self.layers = layers
        self.batched = batched
        self.replaced_calc_cond_batch = replaced_calc_cond_batch
        self.mask = mask

    def scale_at(self, model, sigma: torch.Tensor) -> float:
        timestep = model.model_sampling.timestep(sigma)
        return self.config.scale_at(float(sigma.max()), float(timestep.max()))

    def plain_calc_cond_batch(self, args) -> list:
        if self.replaced_calc_cond_batch is not None:
            return self.replaced_calc_cond_batch(args)
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    def perturbed_pass(self, model, cond, x, sigma, model_options) -> torch.Tensor:
        """D̂ in a model call of its own, every row perturbed."""
        options = perturbed_model_options(model_options, self.layers, 0)
        return comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)[0]

    def calc_cond_batch(self, args) -> list:
        conds, x, sigma, model, model_options = (args[k] for k in ("conds", "input", "sigma", "model", "model_options"))
        if self.scale_at(model, sigma) == 0:
            return self.plain_calc_cond_batch(args)
        chunks = sum(c is not None for c in conds) + 1
        if self.batched and self.replaced_calc_cond_batch is None and batch_fits(model, x, chunks):
            options = perturbed_model_options(model_options, self.layers, len(conds))
            out = comfy.samplers.calc_cond_batch(model, [*conds, conds[0]], x, sigma, options)
            perturbed = out.pop()
        else:
            out = self.plain_calc_cond_batch(args)
            perturbed = self.perturbed_pass(model, conds[0], x, sigma, model_options)
        stash = run_state(model_options, self, PerturbedPrediction)
        stash.input, stash.prediction = x, perturbed
        return out

    def post_cfg(self, args) -> torch.Tensor:
        scale = self.scale_at(args["model"], args["sigma"])
        if scale == 0:
            return args["denoised"]
        perturbed = run_state(args["model_options"], self, PerturbedPrediction).take(args["input"])
        if perturbed is None:
            perturbed = self.perturbed_pass(args["model"], args["cond"], args["input"], args["sigma"],
                                            args["model_options"])
        guided = pag_guided(args["denoised"], args["cond_denoised"], perturbed, scale)
        if self.mask is None:
            return guided
        return torch.lerp(args["denoised"], guided, latent_weights(self.mask, guided, DISPLAY_NAME))
