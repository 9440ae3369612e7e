"""Slim, architecture-faithful diffusion models for the tests, built from ComfyUI's own classes.

Real checkpoints are gigabytes and may not be downloaded here, so the tests build the same architectures (ComfyUI's
model configs from `comfy.supported_models`, its `comfy.model_base` classes, `ModelPatcher`) at a fraction of the
width and depth, with random weights from a fixed seed. Conditioning widths (context, pooled, adm) stay real, so
conditioning has the shapes the real text encoders give, and sampling runs through ComfyUI's own samplers.

`write_checkpoints` goes one step further for the server tests: it writes checkpoint files that the stock
CheckpointLoaderSimple recognises as SD1.5 and SDXL, text encoders and VAE included.

Importing this module needs ComfyUI on sys.path and its nodes loaded (tests/conftest.py does both).
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import itertools
import os
import pathlib
import tempfile

import comfy.ldm.flux.model
import comfy.ldm.models.autoencoder
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import comfyui_version
import nodes
import torch

ModelType = comfy.model_base.ModelType

# Bump when the generated checkpoints change, so stale cached files are not reused.
FIXTURE_VERSION = 1
IMAGE_PREDICTIONS = {"eps": ModelType.EPS, "v": ModelType.V_PREDICTION, "flow": ModelType.FLOW}


def unet_config(channels, mult, res_blocks, depth, depth_middle, depth_output, context_dim, adm=None, linear=False):
    """A UNet config in exactly the form `comfy.model_detection.detect_unet_config` reads back from weights.

    Keeping that form lets a model built here be saved and recognised again by the stock checkpoint loader.
    `depth` has one entry per input res block, `depth_output` one per output res block.
    """
    config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": adm, "in_channels": 4, "out_channels": 4, "model_channels": channels,
        "num_res_blocks": res_blocks, "transformer_depth": depth, "transformer_depth_output": depth_output,
        "channel_mult": mult, "transformer_depth_middle": depth_middle, "use_linear_in_transformer": linear,
        "context_dim": context_dim, "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if adm is not None:
        config["num_classes"] = "sequential"
    return config


def flux_config(**params):
    """A Flux unet_config from Flux-dev's settings `params`, with every other field that this ComfyUI's `FluxParams`
    requires set to the empty value of its type.

    The fields are read from the dataclass at run time, since they grow between releases (0.33 added
    `txt_ids_dims`): an empty list is what `comfy.model_detection` reads back for Flux dev (no text position axes), so
    a new field that ComfyUI fills that way keeps Flux dev's behaviour. A new required field of another type fails
    here, by name.
    """
    config = {"image_model": "flux", **params}
    for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams):
        if field.name in config or field.default is not dataclasses.MISSING \
                or field.default_factory is not dataclasses.MISSING:
            continue
        kind = getattr(builtins, field.type) if isinstance(field.type, str) else field.type
        if kind not in (list, tuple, dict):
            raise TypeError(f"FluxParams requires {field.name}: {field.type}, which flux_config has no value for")
        config[field.name] = kind()
    return config


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: ComfyUI's config and model classes, a slim backbone, and the conditioning it takes."""

    config: type  # comfy.supported_models class: latent format, sampling settings, text encoder target
    model: type  # comfy.model_base class
    backbone: dict  # slim unet_config
    predictions: dict  # prediction name -> ModelType; the first is the family's own
    latent_channels: int
    tokens: int  # context length (77 for CLIP; T5-style encoders get a short prompt)
    context_dim: int
    pooled_dim: int | None
    video: bool = False


FAMILIES = {
    # SD1.5 layout in miniature: conv-projected attention at every level, 8 heads (SD15's own setting).
    "sd15": Family(
        comfy.supported_models.SD15, comfy.model_base.BaseModel,
        unet_config(64, [1, 2], [1, 1], [1, 1], 1, [1, 1, 1, 1], 768),
        IMAGE_PREDICTIONS, 4, 77, 768, 768),
    # SDXL layout in miniature: no attention at the top level, linear projections, adm = pooled 1280 + 6 x 256.
    "sdxl": Family(
        comfy.supported_models.SDXL, comfy.model_base.SDXL,
        unet_config(64, [1, 2], [1, 1], [0, 1], 1, [0, 0, 1, 1], 2048, adm=2816, linear=True),
        IMAGE_PREDICTIONS, 4, 77, 2048, 1280),
    # Flux-dev layout: double- then single-stream blocks, 2x2 patches, guidance embedding, T5 context + CLIP-L pooled.
    "flux": Family(
        comfy.supported_models.Flux, comfy.model_base.Flux,
        flux_config(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=128,
                    mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
                    patch_size=2, qkv_bias=True, guidance_embed=True),
        {"flow": ModelType.FLUX}, 16, 32, 4096, 768),
    # Wan 2.1 text-to-video layout: 5-D latents [B, 16, T, H, W], 1x2x2 patches, umT5 context.
    "wan21": Family(
        comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21,
        {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
         "dim": 128, "ffn_dim": 256, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 2,
         "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
        {"flow": ModelType.FLOW}, 16, 32, 4096, None, video=True),
    # SD3.5-medium layout (MMDiT-X): joint blocks (hidden 64 x depth, as ComfyUI reads it back from weights), RMS
    # q/k norms, an extra image self-attention in block 0; CLIP-L+G context padded to T5 width, pooled 768 + 1280.
    "sd3": Family(
        comfy.supported_models.SD3, comfy.model_base.SD3,
        {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
         "adm_in_channels": 2048, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
         "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
         "qk_norm": "rms", "x_block_self_attn_layers": [0]},
        {"flow": ModelType.FLOW}, 16, 77, 4096, 2048),
}

# Checkpoints the stock loader accepts. It recognises SD1.5 and SDXL by model_channels 320, the context width and,
# for SDXL, the per-block transformer depths of the input side [0, 0, 2, 2, 10, 10]; channel multipliers, levels,
# middle and output depths are read from the weights, so those are slim.
CHECKPOINTS = {
    "v1-5-pruned-emaonly.safetensors": ("sd15", unet_config(320, [1, 1], [1, 1], [1, 1], 1, [1, 1, 1, 1], 768)),
    "sd_xl_base_1.0.safetensors": ("sdxl", unet_config(
        320, [1, 1, 1], [2, 2, 2], [0, 0, 2, 2, 10, 10], 1, [0, 0, 0, 1, 1, 1, 1, 1, 1], 2048, adm=2816,
        linear=True)),
    # SD3 medium with its CLIP-L and CLIP-G encoders (the official file without T5): slim joint blocks; the loader
    # reads every MMDiT size from the weights.
    "sd3_medium_incl_clips.safetensors": ("sd3", {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        "x_block_self_attn_layers": []}),
}
# ComfyUI's SD3 config builds only the text encoders whose weights a checkpoint holds; these keys tell it which.
CLIP_TARGET_KEYS = {"sd3": ["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                            "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"]}

# The SD VAE config that comfy.sd.VAE assumes for an `AutoencoderKL` state dict; the loader takes no sizes from
# the weights, so the fixture VAE has the real size (missing weights would stay uninitialised).
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def randomize_(module, seed):
    """Give every parameter of `module` random values from `seed`, leaving the global RNG untouched.

    ComfyUI's ops skip weight init (weights come from checkpoints), so a model built in code holds uninitialised
    memory. Layers get PyTorch's own init; bare parameters (norm scales, modulation tables) get ones for
    vectors and N(0, 1/fan_in) otherwise; scalars are set by their constructors and are kept.
    """
    initialised = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            reset = _torch_reset(layer)
            if reset is not None:
                reset(layer)
                initialised.update(id(p) for p in layer.parameters(recurse=False))
        with torch.no_grad():
            for param in module.parameters():
                if id(param) in initialised or param.ndim == 0:
                    continue
                if param.ndim == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, param.shape[-1] ** -0.5)
    return module


def randomize_buffers_(module, seed):
    """Give every floating-point buffer of `module` N(0, 1) values from `seed` (e.g. MMDiT's position table, which
    real checkpoints store and ComfyUI leaves uninitialised); modules without such buffers are untouched."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.normal_(0.0, 1.0)
    return module


def _torch_reset(layer):
    """The `reset_parameters` of the torch.nn class under a ComfyUI op (ComfyUI's override is a no-op)."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
            return cls.reset_parameters
    return None


def _patcher(config_class, model_class, backbone, model_type, seed):
    """Build and randomise one diffusion model in fp32 and wrap it the way the loaders do."""
    config = config_class(backbone)
    config.set_inference_dtype(torch.float32, None)
    model = model_class(config, model_type=model_type)
    randomize_(model.diffusion_model, seed)
    randomize_buffers_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_model(family, prediction=None, seed=0):
    """A slim model of `family` as a ModelPatcher, like the MODEL output of a loader.

    `prediction` is "eps", "v" or "flow" (CONST, discrete-flow sampling) where the family supports it; None picks
    the family's own (eps for sd15/sdxl, flow for flux/wan21).
    """
    spec = FAMILIES[family]
    prediction = prediction or next(iter(spec.predictions))
    if prediction not in spec.predictions:
        raise ValueError(f"{family} supports predictions {sorted(spec.predictions)}, not {prediction!r}")
    return _patcher(spec.config, spec.model, spec.backbone, spec.predictions[prediction], seed)


def conditioning(family, batch=1, seed=0):
    """Random (positive, negative) CONDITIONING for `family`, with pooled outputs where the family takes them.

    Each of the `batch` entries is its own random "prompt"; a batch of 1 is repeated over any latent batch, as
    ComfyUI does with a single prompt.
    """
    spec = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    return _random_prompt(spec, batch, generator), _random_prompt(spec, batch, generator)


def _random_prompt(spec, batch, generator):
    extra = {}
    if spec.pooled_dim is not None:
        extra["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    return [[torch.randn(batch, spec.tokens, spec.context_dim, generator=generator), extra]]


def empty_latent(family, batch=1, height=64, width=64, length=5):
    """An all-zero LATENT for `family`, sized like EmptyLatentImage (or EmptyHunyuanLatentVideo for video).

    `length` (frames) only matters for video families: Wan packs 4 frames into one latent frame after the first.
    """
    spec = FAMILIES[family]
    shape = [batch, spec.latent_channels, height // 8, width // 8]
    if spec.video:
        shape.insert(2, (length - 1) // 4 + 1)
    return {"samples": torch.zeros(shape)}


def ksample(model, positive, negative, latent, cfg, steps=4, sampler="euler", scheduler="normal", seed=0,
            denoise=1.0):
    """Sample the way the KSampler node does (nodes.common_ksampler); returns the LATENT dict."""
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent,
                                 denoise=denoise)[0]


def sample_custom_advanced(model, positive, negative, latent, cfg, steps=4, sampler="euler", scheduler="normal",
                           seed=0, denoise=1.0, guider=None):
    """Sample through ComfyUI's own custom-sampling nodes, as a SamplerCustomAdvanced graph would.

    The graph is CFGGuider (or the given `guider`, a GUIDER value; positive, negative and cfg then go unused) +
    KSamplerSelect + BasicScheduler + RandomNoise; returns the `output` LATENT dict. `sampler` is a sampler name for
    KSamplerSelect or a SAMPLER object (a sampler node's output).
    """
    if guider is None:
        guider = _run_node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)[0]
    if isinstance(sampler, str):
        sampler = _run_node("KSamplerSelect", sampler_name=sampler)[0]
    sigmas = _run_node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=denoise)[0]
    return _run_node(
        "SamplerCustomAdvanced", noise=_run_node("RandomNoise", noise_seed=seed)[0], guider=guider,
        sampler=sampler, sigmas=sigmas, latent_image=latent)[0]


def interrupting(model, steps):
    """A clone of `model` whose sampling runs are interrupted after `steps` guided predictions (one per step of a
    first-order sampler) the way the server's /interrupt does it: the flag is set, and ComfyUI raises
    InterruptProcessingException at its next check, which every layer of the model makes. The caller clears the flag
    afterwards (`comfy.model_management.interrupt_current_processing(False)`).

    A post-CFG hook counts the steps, not the progress hook: which progress updates reach that is the host's choice
    (0.33 throttles them to one per 0.1 s).
    """
    made = itertools.count(1)

    def interrupt_after_steps(args):
        if next(made) == steps:
            comfy.model_management.interrupt_current_processing()
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(interrupt_after_steps)
    return clone


def _run_node(node_id, **inputs):
    """Run a loaded (schema v3) ComfyUI node class by id and return its outputs."""
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def fixtures_dir():
    """Where generated checkpoints are cached; the tag changes with anything that changes their bytes."""
    cache = pathlib.Path(os.environ.get("GUIDANCE_CACHE", "~/.cache/comfyui-guidance")).expanduser()
    torch_version = torch.__version__.split("+")[0]
    tag = f"v{FIXTURE_VERSION}-comfyui{comfyui_version.__version__}-torch{torch_version}"
    return cache / "fixtures" / tag


def write_checkpoints(models_dir):
    """Make the fixture checkpoints appear under `models_dir/checkpoints/`; returns {file name: path}.

    Files are generated once into `fixtures_dir()` and symlinked, since they hold full-size text encoders.
    """
    folder = pathlib.Path(models_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in CHECKPOINTS:
        paths[name] = folder / name
        paths[name].symlink_to(cached_checkpoint(name))
    return paths


def cached_checkpoint(name):
    """The cached fixture checkpoint `name`, generated (atomically, so a crash leaves no half file) if missing."""
    path = fixtures_dir() / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
        os.close(fd)
        comfy.utils.save_torch_file(checkpoint_state_dict(name), partial)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    return path


def checkpoint_state_dict(name, seed=0):
    """The state dict of fixture checkpoint `name`, in fp16, laid out by ComfyUI's own checkpoint-saving code.

    The text encoders are full size: the loader builds them from its fixed configs whatever the file holds, and
    layers missing from the file stay uninitialised (NaN conditioning), so a slim encoder is not an option.
    """
    family, backbone = CHECKPOINTS[name]
    spec = FAMILIES[family]
    model = _patcher(spec.config, spec.model, backbone, next(iter(spec.predictions.values())), seed).model
    clip = comfy.sd.CLIP(model.model_config.clip_target(dict.fromkeys(CLIP_TARGET_KEYS.get(family, []))))
    randomize_(clip.cond_stage_model, seed + 1)
    vae_config = dict(SD_VAE_CONFIG, z_channels=spec.latent_channels)
    vae = randomize_(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=vae_config, embed_dim=spec.latent_channels),
                     seed + 2)
    state = state_dict_for_saving(model, clip.get_sd(), vae.state_dict())
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def state_dict_for_saving(model, clip_state_dict, vae_state_dict):
    """The checkpoint layout of `model` (a comfy.model_base model) with these text-encoder and VAE weights.

    Called by keyword: ComfyUI 0.33 put the UNet's state dict first (its ModelPatcher passes it in), where 0.3.75
    read it from the model itself; the UNet's weights are given when the signature asks for them.
    """
    unet = {}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        unet["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict, **unet)
