"""FreCaS (frequency-aware cascaded sampling) on the GPU: time against direct high-resolution sampling, hires fix and
Deep Shrink on an SDXL-size UNet, and quality on the project's reference model.

Part 1, time. An SDXL-size UNet (ComfyUI's `model_base.SDXL` with the SDXL base config, random fp16 weights, as
bench/apg_bench.py builds it) and an SDXL-architecture VAE (ComfyUI's `comfy.sd.VAE` from a state dict of random
weights; the SDXL VAE has the SD1.x VAE's architecture) make one 2048² image (latent 256²) with 50 model steps in all:

- FreCaS, the official SDXL setting (steps 40,10; stage_ends 200,0; γ 1.5; cfg 7.5; cfg_high 35; attention fusion
  0.6; DDIM): 40 steps at 1024², the stage transition through the VAE (decode, upsample, encode), 10 steps at 2048²;
  also without attention fusion, with the transition in the latent instead of the VAE, and without both;
- direct: 50 steps of CFG 7.5 at 2048²;
- hires fix: 40 steps at 1024², the latent upscaled ×2 (bicubic), a second pass of 10 steps at denoise 0.5 at 2048²
  (KSampler's denoise: the last 10 of 20 steps);
- Deep Shrink: ComfyUI's PatchModelAddDownscale with its defaults (block 3, factor 2, 0–35 %, after skip, bicubic),
  50 steps at 2048².
All with the ddim sampler and the normal scheduler, from one process, a warm-up of every method first, then
--sdxl-rounds rounds in which the methods take turns (the order rotated each round); per method the median wall time
per image (CUDA synchronised) and `torch.cuda.max_memory_allocated` (reset before each run; the weights of the UNet
and VAE included). The VAE's share is timed inside the FreCaS runs (decode and encode synchronised).

Part 2, quality on the reference model (reference/model.py: 32² Fashion-MNIST, v-prediction), at 2× side (64²) and
4× side (128²): FreCaS, its ablations (without FA-CFG: cfg_high = cfg; without attention fusion; without both), direct
sampling at that size (30 steps), hires fix (20 steps at 32², bicubic ×2 or ×4, 10 steps at denoise 0.5) and the 1×
sample (30 steps at 32²) upscaled bicubic; FreCaS, hires fix and the 1× sample start from the same 32² noise (and
FreCaS and hires fix renoise with the same seed), direct sampling from noise of its own size. Euler, the normal
scheduler, CFG --cfg for every method, 'all classes' conditioning (image i of class i mod 10), --per-class images per
class. FreCaS's stage transitions go through the reference loader's pixel-space VAE (nodes/reference.py), as the
reference workflow does. Every image is downsampled (area) to 32², the training size, before it is measured (the
paper's FID_b idea): FD, precision, recall and class accuracy in the guide classifier's features
(bench/reference_eval.py `evaluate`), class accuracy under the independent judge (reference/judge.py), and the number
of foreground objects (bench/metrics.py `object_counts`: 8-connected components of grey > 0.1 of at least 8 pixels;
one garment per image is the data, so more than one marks repeated or broken objects).

The FreCaS settings at each size come from a sweep on a separate noise seed (--sweep-seed, --sweep-per-class per
class): one pass of coordinate search from the reference workflow's provisional values (steps 20,10; stage_ends 200,0;
γ 2; cfg_high 8; attention fusion 0.6) over the stage plan, γ, cfg_high and the fusion weight, each step keeping the
lowest FD; the main comparison then runs on --seed.

    python bench/frecas_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
        [--skip-sdxl | --skip-reference] [--merge EARLIER.json] [--smoke]

--smoke: tiny sizes and counts (a tiny SDXL-like UNet, 16² → 32² latents), for a check on the CPU.
"""

import argparse
import copy
import json
import math
import pathlib
import statistics
import struct
import sys
import time
import zlib

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adaptive_bench import ref  # noqa: E402  (bench/reference_eval.py, with a stand-in for matplotlib where missing)
import metrics  # noqa: E402
from pack import PACKAGE, import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui, to_model_space  # noqa: E402

PROVISIONAL = {"steps": "20,10", "ends": "200,0", "gamma": 2.0, "cfg_high": 8.0, "attention_fusion": 0.6}
SWEEP_GAMMA = (1.0, 1.5, 2.0, 3.0, 4.0)
SWEEP_CFG_HIGH = (4.0, 6.0, 8.0, 12.0, 16.0)
SWEEP_FUSION = (0.0, 0.3, 0.6, 0.9)
SWEEP_PLANS = (("20,10", "100,0"), ("20,10", "200,0"), ("20,10", "300,0"), ("20,10", "400,0"), ("25,5", "200,0"),
               ("15,15", "200,0"))
SWEEP_PLANS_3 = (("20,5,5", "400,200,0"),)  # three stages (32 → 64 → 128), only where the side grows 4×
OBJECTS = {"threshold": 0.1, "min_area": 8}


def provisional(args) -> dict:
    """The reference workflow's provisional FreCaS settings (steps scaled down for --smoke)."""
    return dict(PROVISIONAL, steps="4,2") if args.smoke else dict(PROVISIONAL)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--name", default="frecas_bench")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes and counts, for a check on the CPU")
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-sweep", action="store_true", help="use the provisional FreCaS settings at every size")
    p.add_argument("--real-only", action="store_true", help="with --merge: add the real train row to the merged "
                   "report's reference part (for a run that lacked the train split)")
    p.add_argument("--merge", default="", help="an earlier report of this bench whose parts this run does not redo")
    p.add_argument("--sdxl-rounds", type=int, default=2)
    p.add_argument("--sdxl-seed", type=int, default=0)
    p.add_argument("--upscale-method", default="bicubic", help="hires fix's upscaling and the 1× sample's")
    p.add_argument("--sizes", default="64,128", help="reference model: output sides")
    p.add_argument("--cfg", type=float, default=4.0, help="reference model: the CFG scale of every method")
    p.add_argument("--steps", type=int, default=30, help="reference model: total steps of every method")
    p.add_argument("--hires-steps", default="20,10")
    p.add_argument("--denoise", type=float, default=0.5)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-seed", type=int, default=100000)
    p.add_argument("--sweep-per-class", type=int, default=30)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    p.add_argument("--judge", default=str(ROOT / "reference" / "weights" / "fashion_judge.safetensors"))
    args = p.parse_args()
    if args.smoke:
        args.sdxl_rounds, args.per_class, args.sweep_per_class, args.batch = 1, 2, 2, 10
        args.steps, args.hires_steps = 6, "4,2"
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.hires_steps = tuple(int(s) for s in args.hires_steps.split(","))
    return args


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def frecas_module():
    import_pack()
    import importlib

    return importlib.import_module(f"{PACKAGE}.nodes.frecas_patch")


def settings_of(fp, config: dict, cfg: float, sampler: str):
    from comfyui_guidance.guiders.frecas import parse_int_list

    return fp.FreCaSSettings(parse_int_list(config["steps"], "steps"), parse_int_list(config["ends"], "stage_ends"),
                             config["gamma"], cfg, config["cfg_high"], config["attention_fusion"], sampler)


# Deep Shrink --------------------------------------------------------------------------------------------------------

def deep_shrink(model, block_number=3, downscale_factor=2.0, start_percent=0.0, end_percent=0.35,
                downscale_after_skip=True, downscale_method="bicubic", upscale_method="bicubic"):
    """ComfyUI 0.3.75's PatchModelAddDownscale (Kohya Deep Shrink, comfy_extras/nodes_model_downscale.py) with its
    defaults, its `execute` copied line for line: the GPU machine's ComfyUI copy has no comfy_extras, and the node
    module needs comfy_api (PyAV). The smoke run checks it against the node where the node imports."""
    import comfy.utils

    model_sampling = model.get_model_object("model_sampling")
    sigma_start = model_sampling.percent_to_sigma(start_percent)
    sigma_end = model_sampling.percent_to_sigma(end_percent)

    def input_block_patch(h, transformer_options):
        if transformer_options["block"][1] == block_number:
            sigma = transformer_options["sigmas"][0].item()
            if sigma <= sigma_start and sigma >= sigma_end:
                h = comfy.utils.common_upscale(h, round(h.shape[-1] * (1.0 / downscale_factor)),
                                               round(h.shape[-2] * (1.0 / downscale_factor)), downscale_method,
                                               "disabled")
        return h

    def output_block_patch(h, hsp, transformer_options):
        if h.shape[2] != hsp.shape[2]:
            h = comfy.utils.common_upscale(h, hsp.shape[-1], hsp.shape[-2], upscale_method, "disabled")
        return h, hsp

    m = model.clone()
    if downscale_after_skip:
        m.set_model_input_block_patch_after_skip(input_block_patch)
    else:
        m.set_model_input_block_patch(input_block_patch)
    m.set_model_output_block_patch(output_block_patch)
    return m


def node_deep_shrink(model):
    """The real node's model where comfy_extras imports (the smoke check), else None."""
    try:
        from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
    except Exception:  # noqa: BLE001 (no comfy_extras, or comfy_api without PyAV)
        return None
    out = PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")
    return out.result[0] if hasattr(out, "result") else out[0]


# Part 1: time on an SDXL-size UNet ------------------------------------------------------------------------------------

def sdxl_unet(args, device):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from apg_bench import SDXL_UNET

    unet = dict(SDXL_UNET)
    if args.smoke:
        unet.update(model_channels=32, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
                    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = comfy.supported_models.SDXL(dict(unet, dtype=dtype))
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.SDXL(config, device=device)
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.diffusion_model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), dtype


def sdxl_vae():
    """comfy.sd.VAE of the SDXL VAE's architecture (the SD1.x AutoencoderKL: ch 128, ch_mult 1,2,4,4, 4 latent
    channels) with random weights: norms 1, biases 0, other weights N(0, 1/fan_in)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    shapes = {k: v.shape for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            sd[key] = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    vae = comfy.sd.VAE(sd=sd)
    return vae, sum(math.prod(s) for s in shapes.values())


class TimedVAE:
    """The VAE as FreCaS's stage transition calls it (decode, encode), each call timed with the device synchronised."""

    def __init__(self, vae, device):
        self.vae, self.device, self.seconds = vae, device, 0.0

    def _timed(self, fn, x):
        synchronize(self.device)
        began = time.perf_counter()
        out = fn(x)
        synchronize(self.device)
        self.seconds += time.perf_counter() - began
        return out

    def decode(self, latent):
        return self._timed(self.vae.decode, latent)

    def encode(self, pixels):
        return self._timed(self.vae.encode, pixels)


def sdxl_part(args, device, progress=lambda part: None) -> dict:
    import comfy.sample
    import comfy.utils

    fp = frecas_module()
    patcher, dtype = sdxl_unet(args, device)
    vae, vae_parameters = sdxl_vae()
    base, target = ((16, 16), (32, 32)) if args.smoke else ((128, 128), (256, 256))
    stage_steps = (4, 2) if args.smoke else (40, 10)
    total = sum(stage_steps)
    cfg, sampler, scheduler, seed = 7.5, "ddim", "normal", args.sdxl_seed
    g = torch.Generator().manual_seed(1)

    def conditioning():
        return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]

    positive, negative = conditioning(), conditioning()
    official = {"steps": ",".join(map(str, stage_steps)), "ends": "200,0", "gamma": 1.5, "cfg_high": 35.0,
                "attention_fusion": 0.6}
    shrunk = deep_shrink(patcher)
    vae_seconds = {}

    def frecas(name, fusion, use_vae, steps):
        settings = settings_of(fp, {**official, "attention_fusion": fusion, "steps": ",".join(map(str, steps))},
                               cfg, sampler)
        timed = TimedVAE(vae, device) if use_vae else None
        out = fp.sample_frecas(patcher, positive, negative, {"samples": torch.zeros(1, 4, *base)}, seed, settings,
                               target, vae=timed, progress=False)
        vae_seconds[name] = timed.seconds if timed else 0.0
        return out

    def direct(model, steps):
        latent = torch.zeros(1, 4, *target)
        return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, cfg, sampler, scheduler,
                                   positive, negative, latent, seed=seed, disable_pbar=True)

    def hires(steps):
        latent = torch.zeros(1, 4, *base)
        low = comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, seed), steps[0], cfg, sampler,
                                  scheduler, positive, negative, latent, seed=seed, disable_pbar=True)
        up = comfy.utils.common_upscale(low, target[1], target[0], args.upscale_method, "disabled")
        return comfy.sample.sample(patcher, comfy.sample.prepare_noise(up, seed + 1), steps[1], cfg, sampler,
                                   scheduler, positive, negative, up, denoise=args.denoise, seed=seed + 1,
                                   disable_pbar=True)

    def methods(steps):
        n = sum(steps)
        return {
            "FreCaS": lambda: frecas("FreCaS", 0.6, True, steps),
            "FreCaS, no attention fusion": lambda: frecas("FreCaS, no attention fusion", 0.0, True, steps),
            "FreCaS, latent transition (no VAE)": lambda: frecas("FreCaS, latent transition (no VAE)", 0.6, False,
                                                                 steps),
            "FreCaS, latent transition, no fusion": lambda: frecas("FreCaS, latent transition, no fusion", 0.0,
                                                                   False, steps),
            "direct 2048²": lambda: direct(patcher, n),
            "hires fix": lambda: hires(steps),
            "Deep Shrink": lambda: direct(shrunk, n),
        }

    check = None
    if args.smoke:
        node = node_deep_shrink(patcher)
        if node is not None:
            check = bool(torch.equal(direct(node, 3), direct(shrunk, 3)))
            print(f"Deep Shrink copy equals the node's output: {check}", flush=True)
    print("SDXL warm-up (every method, 2+1 steps)", flush=True)
    began = time.perf_counter()
    for fn in methods((2, 1)).values():
        fn()
    synchronize(device)
    print(f"  warm-up {time.perf_counter() - began:.1f} s", flush=True)
    timed = methods(stage_steps)
    names = list(timed)
    seconds = {name: [] for name in names}
    peaks = {name: [] for name in names}
    vae_share = {name: [] for name in names}
    finite = {}
    weights_mib = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    def summary(rounds_done):
        rows = []
        direct_s = statistics.median(seconds["direct 2048²"])
        for name in names:
            if not seconds[name]:
                continue
            s = statistics.median(seconds[name])
            row = {"method": name, "seconds": s, "seconds_per_round": seconds[name],
                   "speedup_over_direct": direct_s / s, "peak_mib": max(peaks[name]) if peaks[name] else None,
                   "vae_seconds": statistics.median(vae_share[name]), "output_finite": finite[name]}
            row["vae_fraction"] = row["vae_seconds"] / s
            rows.append(row)
        return {"model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), random weights" +
                (" (tiny smoke config)" if args.smoke else ""), "unet_dtype": str(dtype),
                "unet_parameters": sum(p.numel() for p in patcher.model.diffusion_model.parameters()),
                "vae": "comfy.sd.VAE, SD1.x/SDXL AutoencoderKL architecture, random weights", "vae_dtype": str(vae.vae_dtype),
                "vae_parameters": vae_parameters, "first_stage_latent": list(base), "target_latent": list(target),
                "stage_steps": list(stage_steps), "total_steps": total, "cfg": cfg, "sampler": sampler,
                "scheduler": scheduler, "frecas_settings": official, "hires_upscale": args.upscale_method,
                "hires_denoise": args.denoise, "deep_shrink": "PatchModelAddDownscale defaults (block 3, factor 2, "
                "start 0, end 0.35, after skip, bicubic/bicubic), code of ComfyUI 0.3.75",
                "deep_shrink_matches_node": check, "weights_mib": weights_mib, "rounds": rounds_done, "rows": rows}

    for r in range(args.sdxl_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            began = time.perf_counter()
            out = timed[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - began)
            if device.type == "cuda":
                peaks[name].append(torch.cuda.max_memory_allocated() / 2**20)
            vae_share[name].append(vae_seconds.get(name, 0.0))
            finite[name] = bool(torch.isfinite(out).all())
            print(f"  round {r + 1} {name:>38}: {seconds[name][-1]:7.2f} s"
                  + (f", peak {peaks[name][-1]:8.0f} MiB" if peaks[name] else "")
                  + (f", VAE {vae_seconds[name]:.2f} s" if name in vae_seconds and vae_seconds[name] else ""),
                  flush=True)
        progress(summary(rounds_done=r + 1))
    return summary(rounds_done=args.sdxl_rounds)


# Part 2: quality on the reference model -----------------------------------------------------------------------------

def accuracy(network, images, labels, device, batch=1000) -> float:
    predicted = torch.cat([network(chunk.to(device).float().clamp(-1, 1)).argmax(1).cpu()
                           for chunk in images.split(batch)])
    return float((predicted == labels).double().mean())


class Reference:
    """The reference model's sampling (ComfyUI's path), batch by batch: batch b uses seed --seed + 1000·b for its
    first noise (32² for FreCaS, hires fix and the 1× sample, the output size for direct sampling) and seed + 1 more
    for what it renoises (FreCaS's second stage and hires fix's second pass draw the same noise)."""

    def __init__(self, args, device):
        import comfy.sd
        from reference.judge import load_judge

        self.args, self.device = args, device
        self.fp = frecas_module()
        self.model, self.tokens = ref.load_diffusion(args.weights)
        self.vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # the reference loader's VAE
        self.guide = ref.load_classifier(args.classifier, len(CLASS_NAMES), device)
        self.judge = load_judge(args.judge, device)
        self.real = ref.RealReference(self.guide, pathlib.Path(args.data), args.per_class, 0, device)

    def real_for(self, per_class: int):
        real = copy.copy(self.real)
        real.subsample = real.features[ref.balanced_subsample(real.labels, per_class, 0)]
        return real

    def run(self, labels, seed, fn) -> tuple[torch.Tensor, float]:
        from reference.model import class_conditioning

        negative = class_conditioning(self.tokens, None)
        images, seconds = [], 0.0
        for b, start in enumerate(range(0, len(labels), self.args.batch)):
            batch = labels[start:start + self.args.batch]
            positive = [[torch.cat([class_conditioning(self.tokens, int(c))[0][0] for c in batch]), {}]]
            synchronize(self.device)
            began = time.perf_counter()
            images.append(fn(len(batch), positive, negative, seed + 1000 * b).float().cpu())
            synchronize(self.device)
            seconds += time.perf_counter() - began
        return torch.cat(images), seconds

    def sample(self, noise_size, latent, steps, cfg, positive, negative, seed, denoise=1.0):
        import comfy.sample

        noise = comfy.sample.prepare_noise(torch.zeros(latent.shape[0], 3, noise_size, noise_size), seed)
        return comfy.sample.sample(self.model, noise, steps, cfg, self.args.sampler, self.args.scheduler, positive,
                                   negative, latent, denoise=denoise, seed=seed, disable_pbar=True)

    def direct(self, labels, seed, size, cfg):
        return self.run(labels, seed, lambda n, pos, neg, s: self.sample(
            size, torch.zeros(n, 3, size, size), self.args.steps, cfg, pos, neg, s))

    def upscaled(self, labels, seed, size, cfg):
        import comfy.utils

        def fn(n, pos, neg, s):
            low = self.sample(RESOLUTION, torch.zeros(n, 3, RESOLUTION, RESOLUTION), self.args.steps, cfg, pos, neg, s)
            return low if size == RESOLUTION else comfy.utils.common_upscale(low, size, size, self.args.upscale_method,
                                                                             "disabled")
        return self.run(labels, seed, fn)

    def hires(self, labels, seed, size, cfg):
        import comfy.utils

        first, second = self.args.hires_steps

        def fn(n, pos, neg, s):
            low = self.sample(RESOLUTION, torch.zeros(n, 3, RESOLUTION, RESOLUTION), first, cfg, pos, neg, s)
            up = comfy.utils.common_upscale(low, size, size, self.args.upscale_method, "disabled")
            return self.sample(size, up, second, cfg, pos, neg, s + 1, denoise=self.args.denoise)
        return self.run(labels, seed, fn)

    def frecas(self, labels, seed, size, cfg, config):
        settings = settings_of(self.fp, config, cfg, self.args.sampler)
        return self.run(labels, seed, lambda n, pos, neg, s: self.fp.sample_frecas(
            self.model, pos, neg, {"samples": torch.zeros(n, 3, RESOLUTION, RESOLUTION)}, s, settings, (size, size),
            vae=self.vae, progress=False))

    def quality(self, images, labels, real) -> dict:
        return downsampled_quality(images, labels, self.guide, self.judge, real, self.args.k, self.device)


def downsampled_quality(images, labels, guide, judge, real, k, device) -> dict:
    """Every metric of images of any size, measured at the training size: downsampled (area) to 32² first, then
    bench/reference_eval.py's `evaluate` (guide classifier features and pixels), the judge's class accuracy and the
    object counts."""
    small = images if images.shape[-1] == RESOLUTION else F.interpolate(images, size=(RESOLUTION, RESOLUTION),
                                                                       mode="area")
    row = ref.evaluate(small, labels, guide, real, k, device)
    row["judge_accuracy"] = accuracy(judge, small, labels, device)
    row.update(metrics.object_counts(small.to(device), **OBJECTS))
    return row


def line(name, row) -> str:
    return (f"{name:>44}  FD {row['fd']:6.2f}  P {row['precision']:.3f}  R {row['recall']:.3f}  acc "
            f"{row['class_accuracy']:.3f}/{row['judge_accuracy']:.3f}  objects {row['components_mean']:.2f} "
            f">1 {row['multi_object_fraction']:.3f}  empty {row['empty_fraction']:.3f}")


def config_name(c: dict) -> str:
    return (f"steps {c['steps']}; ends {c['ends']}; γ {c['gamma']:g}; cfg_high {c['cfg_high']:g}; "
            f"w_c {c['attention_fusion']:g}")


def sweep(ref_model: Reference, args, size: int, report) -> tuple[dict, list]:
    """One pass of coordinate search from the provisional settings on --sweep-seed; each dimension keeps the setting
    of lowest FD (ties: the earlier one)."""
    labels = ref.balanced_labels(len(CLASS_NAMES), args.sweep_per_class)
    real = ref_model.real_for(args.sweep_per_class)
    plans = SWEEP_PLANS + (SWEEP_PLANS_3 if size >= 4 * RESOLUTION else ())
    if args.smoke:
        plans, dims = plans[1:2] + plans[-1:], {"gamma": (2.0, 3.0), "cfg_high": (8.0,), "attention_fusion": (0.6,)}
        plans = tuple((",".join(str(max(1, int(n) // 5)) for n in s.split(",")), e) for s, e in plans)
    else:
        dims = {"gamma": SWEEP_GAMMA, "cfg_high": SWEEP_CFG_HIGH, "attention_fusion": SWEEP_FUSION}
    best = provisional(args)
    tried, rows = {}, []

    def trial(config):
        key = json.dumps(config, sort_keys=True)
        if key not in tried:
            try:
                images, seconds = ref_model.frecas(labels, args.sweep_seed, size, args.cfg, config)
            except ValueError as e:  # a plan this γ cannot start (a stage would start below its end)
                tried[key] = None
                rows.append({"config": config, "error": str(e)})
                print(f"  {size}² sweep {config_name(config)}: {e}", flush=True)
                return None
            row = {"config": config, **ref_model.quality(images, labels, real), "seconds": seconds}
            tried[key] = row
            rows.append(row)
            print(f"  {size}² sweep " + line(config_name(config), row), flush=True)
        return tried[key]

    steps_plans = [{"steps": s, "ends": e} for s, e in plans]
    for dim, values in [("plan", steps_plans), *dims.items()]:
        results = []
        for value in values:
            config = {**best, **value} if dim == "plan" else {**best, dim: value}
            row = trial(config)
            if row is not None:
                results.append((row["fd"], config))
        if results:
            best = min(results, key=lambda r: r[0])[1]
        report()
    return best, rows


def real_train_row(ref_model, args) -> dict | None:
    """The metrics of --per-class real train images per class (seed 1): the best a generated set of this size can
    reach. None where the train split's files are missing (the GPU run leaves them behind for the upload limit;
    --real-only adds the row afterwards)."""
    from reference.data import load_split

    try:
        images, labels = (torch.from_numpy(a) for a in load_split(pathlib.Path(args.data), "train"))
    except FileNotFoundError:
        return None
    pick = ref.balanced_subsample(labels, args.per_class, 1)
    return ref_model.quality(to_model_space(images[pick]), labels[pick], ref_model.real)


def reference_part(args, device, progress) -> dict:
    ref_model = Reference(args, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    real = ref_model.real
    part = {"images": len(labels), "cfg": args.cfg, "steps": args.steps, "sampler": args.sampler,
            "scheduler": args.scheduler, "hires_steps": list(args.hires_steps), "denoise": args.denoise,
            "upscale_method": args.upscale_method, "objects": OBJECTS, "seed": args.seed,
            "sweep_seed": args.sweep_seed, "sweep_images": args.sweep_per_class * len(CLASS_NAMES),
            "real_train_subsample": real_train_row(ref_model, args),
            "real_test": metrics.object_counts(real.images.to(device), **OBJECTS), "sizes": {}}
    if part["real_train_subsample"]:
        print(line("real (train subsample)", part["real_train_subsample"]), flush=True)
    # the model at its training size: the 1× sample of the comparison, and warm-up of the sampling path
    one_x, seconds = ref_model.upscaled(labels, args.seed, RESOLUTION, args.cfg)
    part["one_x"] = {**ref_model.quality(one_x, labels, real), "ms_per_image": 1000 * seconds / len(labels)}
    print(line("1× (32², the training size)", part["one_x"]), flush=True)
    progress(part)
    for size in args.sizes:
        entry = part["sizes"][str(size)] = {}
        if args.skip_sweep:
            best, rows = provisional(args), []
        else:
            best, rows = sweep(ref_model, args, size, lambda: progress(part))
        entry.update({"chosen": best, "sweep": rows})
        print(f"{size}²: chosen {config_name(best)}", flush=True)
        setups = [("FreCaS", lambda: ref_model.frecas(labels, args.seed, size, args.cfg, best)),
                  ("FreCaS, no FA-CFG (cfg_high = cfg)",
                   lambda: ref_model.frecas(labels, args.seed, size, args.cfg, {**best, "cfg_high": args.cfg})),
                  ("FreCaS, no attention fusion",
                   lambda: ref_model.frecas(labels, args.seed, size, args.cfg, {**best, "attention_fusion": 0.0})),
                  ("FreCaS, neither", lambda: ref_model.frecas(
                      labels, args.seed, size, args.cfg, {**best, "cfg_high": args.cfg, "attention_fusion": 0.0}))]
        if best != provisional(args):
            setups.append(("FreCaS, provisional workflow settings",
                           lambda: ref_model.frecas(labels, args.seed, size, args.cfg, provisional(args))))
        setups += [(f"direct {size}²", lambda: ref_model.direct(labels, args.seed, size, args.cfg)),
                   ("hires fix", lambda: ref_model.hires(labels, args.seed, size, args.cfg)),
                   (f"1× upscaled ({args.upscale_method})",
                    lambda: ref_model.upscaled(labels, args.seed, size, args.cfg))]
        entry["rows"], grid = [], []
        for name, fn in setups:
            images, seconds = fn()
            row = {"method": name, **ref_model.quality(images, labels, real),
                   "ms_per_image": 1000 * seconds / len(labels)}
            entry["rows"].append(row)
            grid.append(ref.first_of_each_class(images, labels, len(CLASS_NAMES)))
            print(f"{size}² " + line(name, row) + f"  {row['ms_per_image']:.2f} ms/image", flush=True)
            progress(part)
        write_png(pathlib.Path(args.out) / f"{args.name}_{size}.png", grid)
        entry["grid"] = f"{args.name}_{size}.png"
        entry["grid_rows"] = [name for name, _ in setups]
    return part


def write_png(path: pathlib.Path, grid: list):
    """Rows of one image per class (columns: the classes in order), RGB, no labels (the report lists the rows)."""
    rows = [torch.cat(list(images), dim=2) for images in grid]  # [3, H, classes·W]
    image = (metrics.to_unit_rgb(torch.cat(rows, dim=1)) * 255).round().byte().permute(1, 2, 0).contiguous()
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].numpy().tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# Report ---------------------------------------------------------------------------------------------------------------

QUALITY_HEADER = ("| method | FD ↓ | precision ↑ | recall ↑ | acc. guide ↑ | acc. judge ↑ | objects/image | >1 object | "
                  "empty | ms/image |\n|---|---|---|---|---|---|---|---|---|---|")


def quality_cells(name, r) -> str:
    ms = f"{r['ms_per_image']:.2f}" if "ms_per_image" in r else ""
    return (f"| {name} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} | "
            f"{r['judge_accuracy']:.3f} | {r['components_mean']:.3f} | {r['multi_object_fraction']:.3f} | "
            f"{r['empty_fraction']:.3f} | {ms} |")


def markdown(report: dict) -> str:
    lines = ["# FreCaS: cascaded high-resolution sampling (bench/frecas_bench.py)", ""]
    for key, part in (("sdxl", "Part 1 (time)"), ("reference", "Part 2 (quality)")):
        if key in report:
            run = report.get(f"{key}_run", report)
            lines.append(f"{part}: `{run['command']}`; {run['device']}, {run['date']}, commit {run['commit']}, "
                         f"torch {run['torch']}, ComfyUI {run['comfyui']}.")
            lines.append("")
    if "real_row_run" in report:
        run = report["real_row_run"]
        lines += [f"Real (train subsample) rows: `{run['command']}`; {run['device']}, {run['date']}.", ""]
    s = report.get("sdxl")
    if s:
        lines += [f"## Time: {s['model']}, {s['total_steps']} steps to latent "
                  f"{s['target_latent'][0]}² (2048² pixels)", "",
                  f"UNet {s['unet_dtype']} ({s['unet_parameters']:,} parameters); VAE {s['vae']}, "
                  f"{s['vae_dtype']} ({s['vae_parameters']:,} parameters). CFG {s['cfg']:g}, {s['sampler']}/"
                  f"{s['scheduler']}. FreCaS: {s['stage_steps'][0]} steps at latent {s['first_stage_latent'][0]}² + "
                  f"{s['stage_steps'][1]} at {s['target_latent'][0]}², settings {config_name(s['frecas_settings'])}. "
                  f"Hires fix: the same split, upscale {s['hires_upscale']}, denoise {s['hires_denoise']:g}. "
                  f"Deep Shrink: {s['deep_shrink']}. Median of {s['rounds']} interleaved rounds after a warm-up; "
                  f"peak = torch.cuda.max_memory_allocated over the run (weights of UNet and VAE, "
                  f"{s['weights_mib'] or 0:.0f} MiB before any run, included).", "",
                  "| method | s/image | × faster than direct | peak MiB | VAE s | VAE share |", "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else ""
            lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['speedup_over_direct']:.2f} | {peak} | "
                         f"{r['vae_seconds']:.2f} | {r['vae_fraction']:.1%} |")
    p = report.get("reference")
    if p:
        lines += ["", f"## Quality: reference model, {p['images']} images per method ('all classes', "
                  f"{p['images'] // len(CLASS_NAMES)} per class), CFG {p['cfg']:g}, {p['sampler']}/{p['scheduler']}, "
                  f"{p['steps']} steps in all", "",
                  "Every image is downsampled (area) to 32² before it is measured. FD, precision (k-NN, k = "
                  f"{report['args']['k']}), recall and 'acc. guide' in the guide classifier's features against the "
                  "real test split; 'acc. judge': the independent judge (reference/judge.py). 'objects/image': "
                  f"8-connected foreground components (grey > {p['objects']['threshold']}, at least "
                  f"{p['objects']['min_area']} pixels of the 32² image); a Fashion-MNIST image is one garment on black, "
                  "so '>1 object' is the share of images with repeated or broken-up objects (the failure of direct "
                  "sampling above the training size) and 'empty' the share with none. Real test split: "
                  f"{p['real_test']['components_mean']:.3f} objects/image, {p['real_test']['multi_object_fraction']:.3f}"
                  f" with more than one, {p['real_test']['empty_fraction']:.3f} empty.", "",
                  f"FreCaS, hires fix ({p['hires_steps'][0]} + {p['hires_steps'][1]} steps, {p['upscale_method']}, "
                  f"denoise {p['denoise']:g}) and the 1× sample ({p['steps']} steps at 32², upscaled "
                  f"{p['upscale_method']}) start from the same 32² noise (seed {p['seed']}); direct sampling from "
                  "noise of the output size. FreCaS's transitions go through the pixel-space VAE.", ""]
        for size, entry in p["sizes"].items():
            lines += [f"### {size}² ({int(size) // RESOLUTION}× side)", "",
                      f"FreCaS settings (chosen on seed {p['sweep_seed']}): "
                      f"{config_name(entry['chosen']) if 'chosen' in entry else '(sweep running)'}.", "",
                      QUALITY_HEADER]
            lines += [quality_cells(r["method"], r) for r in entry.get("rows", [])]
            lines += [quality_cells("1× at 32² (not upscaled)", p["one_x"])]
            if p.get("real_train_subsample"):
                lines.append(quality_cells("real (train subsample)", p["real_train_subsample"]))
            lines.append("")
            if entry.get("grid"):
                lines += [f"Samples: {entry['grid']}, one image per class (columns: {', '.join(CLASS_NAMES)}); rows: "
                          + "; ".join(entry["grid_rows"]) + ".", ""]
            if entry.get("sweep"):
                lines += [f"Sweep ({p['sweep_images']} images, seed {p['sweep_seed']}; coordinate search in this "
                          "order: plan, γ, cfg_high, w_c; each keeps the lowest FD):", "",
                          "| settings | FD | precision | recall | acc. guide | acc. judge | >1 object | empty |",
                          "|---|---|---|---|---|---|---|---|"]
                for r in entry["sweep"]:
                    if "error" in r:
                        lines.append(f"| {config_name(r['config'])} | refused: {r['error']} |||||||")
                    else:
                        lines.append(f"| {config_name(r['config'])} | {r['fd']:.2f} | {r['precision']:.3f} | "
                                     f"{r['recall']:.3f} | {r['class_accuracy']:.3f} | {r['judge_accuracy']:.3f} | "
                                     f"{r['multi_object_fraction']:.3f} | {r['empty_fraction']:.3f} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = ref.run_record("bench/frecas_bench.py", args, device)
    report = dict(run)
    if args.merge:
        earlier = json.loads(pathlib.Path(args.merge).read_text())
        for key in ("sdxl", "reference"):
            if key in earlier:
                report[key] = earlier[key]
                report[f"{key}_run"] = earlier.get(f"{key}_run", {k: earlier[k] for k in run if k in earlier})

    def write():
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
        (out / f"{args.name}.md").write_text(markdown(report))

    if args.real_only:
        report["reference"]["real_train_subsample"] = real_train_row(Reference(args, device), args)
        report["real_row_run"] = run
        args.skip_sdxl = args.skip_reference = True
        write()
    if not args.skip_sdxl:
        report["sdxl_run"] = run

        def sdxl_progress(part):
            report["sdxl"] = part
            write()
        report["sdxl"] = sdxl_part(args, device, sdxl_progress)
        write()
    if not args.skip_reference:
        report["reference_run"] = run

        def progress(part):
            report["reference"] = part
            write()
        report["reference"] = reference_part(args, device, progress)
        write()
    print(markdown(report))


if __name__ == "__main__":
    main()
