"""FreCaS as the node runs it (`guiders/frecas.py` for the method): one ComfyUI sampling run per stage, each on a
clone of the model with that stage's patches; kept apart from the node class so that scripts (benchmarks, tests)
sample exactly as the node does.

Per stage:
- the sigmas are the stage's discrete timesteps as the model's own schedule gives them, then 0, so the stage's last
  model call yields the clean estimate that the next stage starts from;
- from the second stage on, FA-CFG is the model's CFG function (at the stage's cfg for the low band, cfg_high for
  the high band); patches that act before CFG (APG: its update replaces D_c − D_u and FA-CFG weights its bands) or
  after it (PAG's term, CFGNorm, CFGZeroStar) act in every stage as they would in one run;
- with attention fusion, every cross-attention of the UNet is replaced by one that collects its maps at the stage's
  last step and, from the second stage on, mixes in the previous stage's fused maps.
Every stage is conditioned on the first stage's image size (SDXL's original and target size), as the official
pipeline is (`with_size_conditioning`). Between stages the clean estimate is upsampled (through the VAE in pixels
when one is given, as the paper does, else nearest-neighbour in the latent) and diffused to the next stage's first
noise level with new noise from the seed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from ..guiders.frecas import (CrossAttentionMaps, Stage, attention_probabilities, check_plan, check_weights, fa_cfg,
                              fuse_attention, plan_stages, stage_sizes)
from ..guiders.saliency import latent_weights
from ..kernels.frequency import resize_spatial
from .agd_patch import attachment_points
from .cfgpp_patch import patch_owner

NODE_ID = "GuidanceFreCaSSampler"
DISPLAY_NAME = "FreCaS Sampler"


@dataclasses.dataclass(frozen=True)
class FreCaSSettings:
    steps: tuple[int, ...]
    ends: tuple[int, ...]
    gamma: float
    cfg: float
    cfg_high: float
    attention_fusion: float
    sampler_name: str

    def __post_init__(self):
        check_weights(self.cfg, self.cfg_high, self.attention_fusion)
        if self.sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"unknown sampler '{self.sampler_name}'")


def is_flow(model_sampling) -> bool:
    """Flow (rectified-flow) models diffuse as (1 − σ)x + σε; VP models (eps, v) as x + σε on ComfyUI's scale."""
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def alphas_cumprod(model_sampling) -> torch.Tensor:
    """ᾱ_t of a discrete VP schedule from ComfyUI's σ_t = √((1 − ᾱ_t)/ᾱ_t)."""
    return 1.0 / (1.0 + model_sampling.sigmas.double() ** 2)


def check_schedule(model_sampling) -> None:
    if is_flow(model_sampling):
        return
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is None or sigmas.shape[0] != 1000:
        raise ValueError(f"{DISPLAY_NAME}: FreCaS places its stages on a 1000-step discrete schedule (SD1.x, SD2.x, "
                         f"SDXL) or a flow model's (SD3, Flux); this model samples with "
                         f"{type(model_sampling).__name__}, which has none")


def timestep_sigmas(model_sampling, timesteps: tuple[int, ...]) -> torch.Tensor:
    """σ of each discrete timestep as the official schedulers index them: VP t → σ_t; flow t → the model's
    shifted σ at (t + 1)/1000 (the official SD3 scheduler's index 999 − t of its 1000-step schedule)."""
    if is_flow(model_sampling):
        return torch.tensor([model_sampling.percent_to_sigma(1.0 - (t + 1) / 1000) for t in timesteps])
    return torch.stack([model_sampling.sigma(torch.tensor(float(t))) for t in timesteps]).float().cpu()


def stage_schedule(model_sampling, stage: Stage) -> torch.Tensor:
    return torch.cat([timestep_sigmas(model_sampling, stage.timesteps), torch.zeros(1)])


def refused_patches(model_options: dict):
    """(node, why) for each guidance patch on the model that FreCaS cannot carry."""
    if "sampler_cfg_function" in model_options:
        yield (patch_owner(model_options["sampler_cfg_function"]), "replaces ComfyUI's CFG step with its own CFG "
               "function, and FreCaS's FA-CFG is that step in every stage after the first")
    for hook in model_options.get("sampler_pre_cfg_function", []):
        owner = getattr(hook, "__self__", hook)
        if getattr(owner, "distills_guidance", False):
            yield (owner.node_name, "makes one conditional pass give CFG's prediction at cfg 1, which leaves no "
                   "unconditional prediction for FA-CFG to split into frequency bands")
        elif getattr(owner, "skips_unconditional_passes", False):
            yield (owner.node_name, "drops the unconditional pass once the conditional and CFG predictions agree, "
                   "but FA-CFG is not CFG and each FreCaS stage restarts at a higher noise level, where that "
                   "decision no longer holds")
    for hook in model_options.get("sampler_post_cfg_function", []):
        owner = getattr(hook, "__self__", hook)
        if getattr(owner, "guides_denoised", False):
            yield (owner.node_name, "reads the image with a classifier at the size it was trained for, and "
                   "FreCaS's later stages are larger")
    replaced = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if replaced:
        yield (patch_owner(next(iter(replaced.values()))), "replaces cross-attention layers, which FreCaS's "
               "attention fusion replaces too")


def composition_problem(model_options: dict, attention_fusion: float) -> str | None:
    for other, why in refused_patches(model_options):
        if "cross-attention layers" in why and attention_fusion == 0:
            continue
        fix = ("set attention_fusion to 0" if "cross-attention layers" in why else
               f"remove {other} from the model, or sample with a regular sampler")
        return f"{DISPLAY_NAME} and {other} do not combine: {other} {why}. {fix[0].upper()}{fix[1:]}."
    return None


class FACFG:
    """The CFG function of a stage after the first: FA-CFG (guiders/frecas.py `fa_cfg`) at the sampler's cfg for the
    low band and `cfg_high` for the band the stage adds; with a mask, the guided prediction is blended with the
    conditional one per position (1 = FA-CFG, 0 = the conditional prediction)."""

    node_name = DISPLAY_NAME

    def __init__(self, low_size: tuple[int, int] | None, cfg_high: float | None, mask: torch.Tensor | None):
        self.low_size, self.cfg_high, self.mask = low_size, cfg_high, mask

    def __call__(self, args: dict) -> torch.Tensor:
        cond, uncond, x = args["cond_denoised"], args["uncond_denoised"], args["input"]
        w = args["cond_scale"]
        if self.low_size is None:  # the first stage: CFG (only a mask brings this function in)
            guided = uncond + w * (cond - uncond)
        else:
            guided = fa_cfg(cond, uncond, self.low_size, w, self.cfg_high)
        if self.mask is not None:
            guided = torch.lerp(cond, guided, latent_weights(self.mask, cond, DISPLAY_NAME))
        return x - guided  # ComfyUI's CFG functions return x − D̂


class AttentionFusion:
    """The cross-attention of one stage: ordinary attention, whose maps are collected into `maps` at the stage's last
    step (`collect_sigma`) and, when `weight` > 0 and an earlier stage left fused maps, mixed with them."""

    node_name = DISPLAY_NAME

    def __init__(self, maps: CrossAttentionMaps, weight: float, collect_sigma: float | None):
        self.maps, self.weight, self.collect_sigma = maps, weight, collect_sigma
        self._step = (None, False)  # (the model call's sigma tensor, whether that call collects)

    def collects(self, sigmas: torch.Tensor) -> bool:
        """Whether this model call is the stage's last step. Every layer of a call gets the same sigma tensor, so it
        is read (a device sync) once per call, not at each of the UNet's cross-attentions."""
        if self.collect_sigma is None:
            return False
        if self._step[0] is not sigmas:
            self._step = (sigmas, math.isclose(float(sigmas.max()), self.collect_sigma, rel_tol=1e-5))
        return self._step[1]

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        grid = tuple(extra_options["activations_shape"][-2:])
        chunks = chunk_keys(extra_options.get("cond_or_uncond", [0]))
        rows = q.shape[0] // len(chunks)
        if self.collects(extra_options["sigmas"]):
            probs = attention_probabilities(q, k, heads)
            for i, key in enumerate(chunks):
                self.maps.collect(key, probs[i * rows:(i + 1) * rows], grid)
        if self.weight > 0 and self.maps.ready:
            fused = self.maps.batch_at(chunks, grid, rows, v.dtype, v.device)
            if fused is not None:
                out = fuse_attention(out, fused, v, self.weight)
        return out


def chunk_keys(cond_or_uncond: list) -> list[tuple[int, int]]:
    """A key per chunk of the model's batch: its kind (conditional, unconditional, …) and how many chunks of that
    kind came before it in the call."""
    seen: dict[int, int] = {}
    keys = []
    for kind in cond_or_uncond:
        keys.append((kind, seen.get(kind, 0)))
        seen[kind] = seen.get(kind, 0) + 1
    return keys


def cross_attention_blocks(model) -> list[tuple[str, int]]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = model.get_model_object("diffusion_model")
    if not isinstance(unet, UNetModel):
        raise ValueError(f"{DISPLAY_NAME}: attention fusion mixes the cross-attention maps of UNet models (SD1.x, "
                         f"SD2.x, SDXL); this model's denoiser is {type(unet).__name__}. Set attention_fusion to 0 "
                         "(the cascaded stages and FA-CFG work on it).")
    return sorted({point.block for point in attachment_points(model, DISPLAY_NAME)[0]})


def stage_model(model, index: int, stages: list[Stage], settings: FreCaSSettings, maps: CrossAttentionMaps | None,
                blocks: list[tuple[str, int]], sigmas: torch.Tensor, mask: torch.Tensor | None):
    """A clone of `model` patched for stage `index`."""
    patched = model.clone()
    later = index > 0
    # At cfg 1 (and cfg_high 1 in later stages) the guided prediction is the conditional one, which ComfyUI computes
    # without the unconditional pass; FA-CFG's high band at cfg 1 needs that pass back.
    guides = not math.isclose(settings.cfg, 1.0) or (later and not math.isclose(settings.cfg_high, 1.0))
    if guides and (later or mask is not None):
        patched.set_model_sampler_cfg_function(
            FACFG(stages[index - 1].size if later else None, settings.cfg_high, mask),
            disable_cfg1_optimization=later)
    if maps is not None:
        last = index == len(stages) - 1
        fusion = AttentionFusion(maps, settings.attention_fusion if later else 0.0,
                                 None if last else float(sigmas[-2]))
        for block_name, number in blocks:
            patched.set_model_attn2_replace(fusion, block_name, number)
    return patched


def upsample_latent(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of the spatial dimensions (4-D and 5-D latents)."""
    return resize_spatial(latent, size, "nearest")


def check_vae_latent(latent: torch.Tensor) -> None:
    if latent.ndim != 4:
        raise ValueError(f"{DISPLAY_NAME}: stage transitions through the VAE take image latents; this one has shape "
                         f"{tuple(latent.shape)}. Disconnect the VAE to upsample in the latent.")


def transition(latent: torch.Tensor, size: tuple[int, int], vae=None) -> torch.Tensor:
    """A stage's clean estimate (a LATENT's samples) carried to the next stage's latent size: with a VAE as the
    official code does (decode, clip, nearest-neighbour upsampling of the pixels, encode), else in the latent."""
    if vae is None:
        return upsample_latent(latent, size)
    check_vae_latent(latent)
    images = vae.decode(latent)  # [B, H, W, C] in [0, 1]: ComfyUI clamps, as the official code clips to [−1, 1]
    if images.ndim == 5:  # VAEs that decode a batch of frames give [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    factor = images.shape[1] / latent.shape[-2]
    pixels = (round(size[0] * factor), round(size[1] * factor))
    upsampled = F.interpolate(images.movedim(-1, 1), size=pixels, mode="nearest").movedim(1, -1)
    return vae.encode(upsampled[..., :3])


class StageProgress:
    """One progress bar (with previews) over every stage's steps; checks for an interrupt after each step."""

    def __init__(self, model, total: int):
        import latent_preview

        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.done = total, 0

    def stage_callback(self):
        start = self.done

        def callback(step, x0, x, total_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
            self.done = start + step + 1
            self.bar.update_absolute(self.done, self.total, preview)

        return callback


def with_size_conditioning(conditioning: list, height: int, width: int) -> list:
    """`conditioning` with the image size (height, width) as its size conditioning wherever it gives none. The
    official pipeline (xtudbxk/FreCaS main.py calling diffusers' StableDiffusionXLPipeline without a size) computes
    SDXL's original and target size time-ids once, from the pipeline's default size, its SDXL plans' first stage
    (1024²), and keeps them in every stage; ComfyUI would fill them from each stage's latent (2048² in the last)."""
    return [[tensor, {"height": height, "width": width, **options}] for tensor, options in conditioning]


def sample_frecas(model, positive, negative, latent: dict, seed: int, settings: FreCaSSettings,
                  target: tuple[int, int], vae=None, mask: torch.Tensor | None = None, progress: bool = True):
    """FreCaS from the first stage's `latent` (a LATENT at the model's training size) to the latent size `target`
    (height, width); returns the last stage's LATENT samples."""
    problem = composition_problem(model.model_options, settings.attention_fusion)
    if problem:
        raise ValueError(problem)
    if "noise_mask" in latent:
        raise ValueError(f"{DISPLAY_NAME}: the latent has a noise mask (inpainting), which FreCaS's stages of "
                         "other sizes cannot follow; sample the full image, or use a regular sampler")
    model_sampling = model.get_model_object("model_sampling")
    check_schedule(model_sampling)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if vae is not None:  # refused before the first stage runs, not after it
        check_vae_latent(samples)
    try:
        check_plan(settings.steps, settings.ends)
        sizes = stage_sizes(tuple(samples.shape[-2:]), tuple(target), len(settings.steps))
        stages = plan_stages(sizes, settings.steps, settings.ends, settings.gamma,
                             None if is_flow(model_sampling) else alphas_cumprod(model_sampling))
    except ValueError as e:
        raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
    blocks = cross_attention_blocks(model) if settings.attention_fusion > 0 else []
    maps = CrossAttentionMaps() if blocks else None
    bar = StageProgress(model, sum(settings.steps)) if progress else None
    sampler = comfy.samplers.sampler_object(settings.sampler_name)
    batch_inds = latent.get("batch_index")
    # the first stage's size as ComfyUI fills it in from a latent (8 pixels per latent cell), for every stage
    height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
    positive, negative = (with_size_conditioning(c, height, width) for c in (positive, negative))
    for i, stage in enumerate(stages):
        sigmas = stage_schedule(model_sampling, stage)
        noise = comfy.sample.prepare_noise(samples, seed + i, batch_inds)
        samples = comfy.sample.sample_custom(
            stage_model(model, i, stages, settings, maps, blocks, sigmas, mask), noise, settings.cfg, sampler,
            sigmas, positive, negative, samples, callback=bar.stage_callback() if bar else None, disable_pbar=True,
            seed=seed + i)
        if maps is not None:
            maps.end_stage()
        if i + 1 < len(stages):
            comfy.model_management.throw_exception_if_processing_interrupted()
            samples = transition(samples, stages[i + 1].size, vae)
    return samples
