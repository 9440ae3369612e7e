"""EluCD classifier guidance on the GPU: what the calibration does to the samples, and what a guided step costs.

Part 1, the reference model (reference/model.py), 1000 images (100 per class) per setting, --sampler (ddpm: EluCD's
schedule is the DDPM posterior's) with the normal scheduler, --steps steps, the same initial noise and sampler seeds
for every setting, through ComfyUI's sampling path (`comfy.sample.sample`) as in bench/reference_eval.py. EluCD is the
node's own patch (nodes/elucd_patch.py `apply_elucd`) with the reference classifier (reference/weights/
fashion_classifier.safetensors) guiding each image towards its balanced label:

- the unconditional model (the empty class as the prompt, cfg 1), unguided and under EluCD at each of --scales: the
  paper's setting, an off-the-shelf classifier making an unconditional model class-conditional;
- EluCD's ablations on the unconditional model, each removing one pre-conditioning step, each at every one of
  --scales: no smoothing (softplus β 0, the ReLUs kept), no temperature calibration (margin discount 1, the plain
  log-softmax), no sine bump (γ 0), and all three at once ("uncalibrated": the plain log-softmax gradient of the ReLU
  classifier on the plain posterior-variance schedule). Removing a step also changes the gradient's size, so one
  scale is not a fair comparison: each variant is compared with the full method on its accuracy-FD curve (FD at the
  same judge accuracy, interpolated along the scale sweep);
- the conditional model at cfg 1 and with CFG at --cfg, each alone and under EluCD at --combined-scale, and APG at
  --cfg (bench/reference_eval.py's apg_r2.5, the APG setting that does best on this model there) alone and under EluCD.

For each: FD, precision and recall against the real test split in the feature space of the evaluation classifier
(bench/reference_eval.py's `evaluate`) - which is the guiding classifier itself -, class accuracy under the guiding
classifier and under the independent judge (reference/judge.py) side by side, ms per image (synchronised wall time of
the sampling calls over the images, after a 2-step warm-up run of the same setting) and peak GPU memory of the sampling
calls (torch.cuda.max_memory_allocated, reset per setting). The guide's and the judge's accuracy on the judge's
held-out real images give the scale. The report states, from the numbers, whether the paper's directions of effect
are reproduced: calibrated beats uncalibrated guidance (and each step helps) at matched judge accuracy, guidance
makes the unconditional model class-conditional, EluCD adds to the conditional model and to CFG.

Part 2, the cost on an SDXL-size model (bench/apg_bench.py's `build_sdxl`: ComfyUI's model_base.SDXL, base config,
random fp16 weights) at 1024² (latent 128²), one image, CFG batch of 2, with a classifier on the decoded image: an
SDXL-architecture VAE (ComfyUI's AutoencoderKL, loaded through comfy.sd.VAE, which picks its dtype) with random
weights, decoded through EluCD's own differentiable decoder, and the pack's CLIP zero-shot classifier network
(nodes/clip_classifier.py: a float32 copy of the vision tower, run with out-of-place residuals) made from a CLIP
ViT-L/14-size vision model at 224 (ComfyUI's comfy.clip_vision encoder class with its ViT-L config, random weights)
over 1000 random class embeddings. Timed with CUDA events, interleaved, median of --sdxl-reps after warm-ups: (a) the
UNet call (cond + uncond), (b) the VAE decode forward as EluCD runs it (recording autograd), (c) the resize to 224 and
the classifier forward, (d) the backward pass through classifier and decoder, their sum as EluCD runs it
(`log_prob_gradient`), and the whole EluCD step (UNet, CFG combination and EluCD's post-CFG hook) against a plain CFG
step; with the peak memory of each. An out-of-memory error in one of them is reported in its place.

    python bench/classifier_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
    python bench/classifier_bench.py ... --device cpu --per-class 2 --steps 4 --skip-sdxl   (smoke test)
    python bench/classifier_bench.py ... --device cpu --per-class 1 --steps 2 --sdxl-smoke  (part 2's code, tiny UNet)

DATA_DIR needs the Fashion-MNIST test split files (t10k-*); writes NAME.json and NAME.md (--name, default
classifier_bench).
"""

import argparse
import dataclasses
import gc
import importlib
import json
import pathlib
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# bench/reference_eval.py, imported by bench/adaptive_bench.py with a stand-in for matplotlib where it is missing
from adaptive_bench import ref  # noqa: E402  (bench/, the script's folder)
from pack import PACKAGE, import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402

WEIGHTS = ROOT / "reference" / "weights"
# ComfyUI's comfy/clip_vision_config_vitl.json (CLIP ViT-L/14 at 224); copied because ComfyUI copies made of its
# Python files alone lack the json files
VIT_L14 = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024,
           "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
           "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3,
           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "torch_dtype": "float32"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# ComfyUI's SD VAE (comfy/sd.py, its default VAE parameters), which is SDXL's VAE architecture
SDXL_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
ZERO_SHOT_CLASSES = 1000
# --sdxl-smoke: part 2's code on the CPU in seconds, not a measurement
SMOKE_UNET = {"model_channels": 32, "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
              "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]}
SMOKE_CLIP_LAYERS = 2
SMOKE_LATENT = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--scales", default="0.5,1,2,4,8",
                   help="EluCD scales on the unconditional model, for the full method and each ablation")
    p.add_argument("--ablation-scale", type=float, default=2.0,
                   help="the scale at which the unconditional model's guided and unguided rows are compared")
    p.add_argument("--cfg", type=float, default=3.0, help="CFG (and APG) scale of the combined settings")
    p.add_argument("--combined-scale", type=float, default=1.0, help="EluCD scale on top of the conditional model")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500, help="images per sampling call (and per classifier pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--sdxl-reps", type=int, default=10)
    p.add_argument("--sdxl-warmup", type=int, default=3)
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--sdxl-smoke", action="store_true", help="part 2 with a tiny UNet at a small latent, any device")
    p.add_argument("--name", default="classifier_bench", help="file name of the results (.json and .md) in --out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default=str(WEIGHTS / "fashion_diffusion.safetensors"))
    p.add_argument("--judge", default=str(WEIGHTS / "fashion_judge.safetensors"))
    args = p.parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]
    args.scheduler = "normal"
    images = len(CLASS_NAMES) * args.per_class
    batch = min(args.batch, images)
    if images % batch or batch % len(CLASS_NAMES):
        p.error(f"--batch must give equal sampling calls of whole class rounds: {images} images in calls of "
                f"{batch} leave a different last call, or split the classes")
    if args.sdxl_smoke:
        args.sdxl_reps, args.sdxl_warmup = 1, 1
    return args


def pack_modules():
    import_pack()
    return (importlib.import_module(f"{PACKAGE}.guiders.elucd"),
            importlib.import_module(f"{PACKAGE}.nodes.elucd_patch"),
            importlib.import_module(f"{PACKAGE}.nodes.classifier_patch"))


@torch.no_grad()
def accuracy(network, images: torch.Tensor, labels: torch.Tensor, device, batch: int = 1000) -> float:
    """The share of images (in [-1, 1], clamped first as in ref.classify) that `network` puts in their class."""
    predicted = torch.cat([network(chunk.to(device).float().clamp(-1, 1)).argmax(1).cpu()
                           for chunk in images.split(batch)])
    return float((predicted == labels).double().mean())


def peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def reference_part(args, device) -> dict:
    import comfy.sd
    from comfy.sample import prepare_noise

    from reference.judge import judge_split, load_judge

    elucd, patch, classifier_patch = pack_modules()
    model, tokens = ref.load_diffusion(args.weights)
    # every class row replaced by the empty class: ref.sample's per-image prompts become the unconditional model's
    unconditional = tokens[-1:].expand_as(tokens).clone()
    guide_path = classifier_patch.WEIGHTS_DIR / classifier_patch.DEFAULT_CLASSIFIER
    guide = ref.load_classifier(guide_path, len(CLASS_NAMES), device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(guide, pathlib.Path(args.data), args.per_class, 0, device)
    _, (held_images, held_labels) = judge_split(real.images, real.labels)
    held_out = {"images": len(held_labels), "guide_accuracy": accuracy(guide, held_images, held_labels, device),
                "judge_accuracy": accuracy(judge, held_images, held_labels, device)}
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    batch = min(args.batch, len(labels))
    targets = classifier_patch.ClassifierTargets(classifier_patch.reference_classifier(),
                                                 tuple(labels[:batch].tolist()))  # every call holds these classes
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # the reference loader's VAE (nodes/reference.py)

    def guided(base, config):
        return patch.apply_elucd(base, targets, config, vae, chunk=batch)

    a, w, s = args.ablation_scale, args.cfg, args.combined_scale
    apg = ref.guidance_methods()["apg_r2.5"](model, w)
    calibration = elucd.EluCDCalibration
    variants = {  # the full method and the paper's ablations, each with its changes to EluCD's defaults
        FULL: {},
        "no smoothing": {"calibration": calibration(softplus_beta=0.0)},
        "no temperature calibration": {"calibration": calibration(margin_temperature_discount=1.0)},
        "no sine bump": {"gamma": 0.0},
        UNCALIBRATED: {"gamma": 0.0, "calibration": calibration(softplus_beta=0.0, margin_temperature_discount=1.0)},
    }
    settings = [("uncond", "unconditional", ref.Setup(model, 1.0), {})]
    settings += [(variant_setting(variant, x), "unconditional",
                  ref.Setup(guided(model, elucd.EluCDConfig(x, **changes)), 1.0),
                  {"elucd_scale": x, "variant": variant})
                 for variant, changes in variants.items() for x in sorted(set(args.scales) | {a})]
    settings += [
        ("cond cfg 1", "conditional", ref.Setup(model, 1.0), {}),
        (f"cond cfg 1 + EluCD s={s:g}", "conditional", ref.Setup(guided(model, elucd.EluCDConfig(s)), 1.0),
         {"elucd_scale": s}),
        (f"CFG {w:g}", "conditional", ref.Setup(model, w), {"cfg": w}),
        (f"CFG {w:g} + EluCD s={s:g}", "conditional", ref.Setup(guided(model, elucd.EluCDConfig(s)), w),
         {"cfg": w, "elucd_scale": s}),
        (f"APG r2.5 {w:g}", "conditional", apg, {"cfg": w}),
        (f"APG r2.5 {w:g} + EluCD s={s:g}", "conditional", apg._replace(model=guided(apg.model, elucd.EluCDConfig(s))),
         {"cfg": w, "elucd_scale": s}),
    ]

    rows = []
    for name, kind, setup, extra in settings:
        prompts = unconditional if kind == "unconditional" else tokens
        ref.sample(setup, prompts, labels, noise, args, steps=2)  # warm-up: loading, kernel choice, allocator growth
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        images, seconds = ref.sample(setup, prompts, labels, noise, args)
        peak = peak_mib(device)
        row = {"setting": name, "model": kind, **extra, "peak_mib": peak,
               **ref.evaluate(images, labels, guide, real, args.k, device),
               "judge_accuracy": accuracy(judge, images, labels, device),
               "ms_per_image": 1000 * seconds / len(labels), "seconds": seconds}
        rows.append(row)
        print(f"{name:>44}  {seconds:6.2f}s  FD {row['fd']:7.3f}  P {row['precision']:.3f} R {row['recall']:.3f}  "
              f"acc guide {row['class_accuracy']:.3f} judge {row['judge_accuracy']:.3f}", flush=True)
    return {"images": len(labels), "batch": batch, "unet_dtype": str(model.model.get_dtype()), "steps": args.steps,
            "sampler": args.sampler, "scheduler": args.scheduler, "cfg": w, "ablation_scale": a, "combined_scale": s,
            "scales": sorted(set(args.scales) | {a}),
            "apg": dataclasses.asdict(apg.model.model_options["sampler_pre_cfg_function"][-1].config),
            "elucd_defaults": dataclasses.asdict(elucd.EluCDConfig()),
            "held_out": held_out, "test_split_guide_accuracy": real.test_accuracy, "rows": rows,
            "directions": directions(rows, a, w, s)}


FULL = "EluCD"
UNCALIBRATED = "uncalibrated"


def variant_setting(variant: str, scale: float) -> str:
    return f"uncond + EluCD s={scale:g}" + ("" if variant == FULL else f", {variant}")


def fd_at_accuracy(rows: list, accuracy_level: float) -> float | None:
    """FD of a variant's scale sweep at a judge accuracy, by linear interpolation between the two sweep points
    around it (ordered by accuracy); None outside the sweep's range."""
    points = sorted((r["judge_accuracy"], r["fd"]) for r in rows)
    for (a0, f0), (a1, f1) in zip(points, points[1:]):
        if a0 <= accuracy_level <= a1:
            return f0 if a1 == a0 else f0 + (f1 - f0) * (accuracy_level - a0) / (a1 - a0)
    return None


def matched(rows: list, better: str, worse: str) -> dict:
    """Whether variant `better` reaches each judge accuracy of its sweep with a lower FD than variant `worse` (its
    sweep interpolated to that accuracy): a guidance variant that is only stronger or weaker at one scale is compared
    fairly, on the accuracy-FD trade-off the scale sweeps out."""
    sweep = {v: [r for r in rows if r.get("variant") == v] for v in (better, worse)}
    pairs = [(r["judge_accuracy"], r["fd"], fd_at_accuracy(sweep[worse], r["judge_accuracy"]))
             for r in sorted(sweep[better], key=lambda r: r["judge_accuracy"])]
    pairs = [p for p in pairs if p[2] is not None]
    lower = sum(fd < other for _, fd, other in pairs)
    word = ("no common accuracy range" if not pairs else "reproduced" if lower == len(pairs)
            else "not reproduced" if lower == 0 else f"mixed ({lower} of {len(pairs)} points)")
    return {"verdict": word, "better": better, "worse": worse,
            "points": [{"judge_accuracy": a, "fd": [fd, other]} for a, fd, other in pairs]}


def verdict(better: dict, worse: dict) -> dict:
    """Whether `better` beats `worse` as the paper says it does: higher judge accuracy and lower FD."""
    accuracy_up = better["judge_accuracy"] > worse["judge_accuracy"]
    fd_down = better["fd"] < worse["fd"]
    if accuracy_up and fd_down:
        word = "reproduced"
    elif accuracy_up or fd_down:
        word = f"partly reproduced ({'judge accuracy' if accuracy_up else 'FD'} only)"
    else:
        word = "not reproduced"
    return {"verdict": word, "better": better["setting"], "worse": worse["setting"],
            "judge_accuracy": [better["judge_accuracy"], worse["judge_accuracy"]], "fd": [better["fd"], worse["fd"]]}


def directions(rows: list, a: float, w: float, s: float) -> dict:
    """The paper's directions of effect, each judged from the rows (`verdict`)."""
    by = {r["setting"]: r for r in rows}
    at_matched_accuracy = {
        "calibrated guidance beats uncalibrated": matched(rows, FULL, UNCALIBRATED),
        "smoothing helps": matched(rows, FULL, "no smoothing"),
        "temperature calibration helps": matched(rows, FULL, "no temperature calibration"),
        "the sine bump helps": matched(rows, FULL, "no sine bump"),
    }
    claims = {
        "classifier guidance makes the unconditional model class-conditional": (by[variant_setting(FULL, a)],
                                                                               by["uncond"]),
        "EluCD improves the conditional model": (by[f"cond cfg 1 + EluCD s={s:g}"], by["cond cfg 1"]),
        "EluCD improves CFG": (by[f"CFG {w:g} + EluCD s={s:g}"], by[f"CFG {w:g}"]),
    }
    return {"matched": at_matched_accuracy, "pairs": {claim: verdict(*pair) for claim, pair in claims.items()}}


@torch.no_grad()
def randomise(module: nn.Module) -> nn.Module:
    """Random weights in place (ComfyUI builds its layers uninitialised): N(0, 0.02) for weight matrices, kernels and
    embeddings, 1 for normalisation scales, 0 for biases."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    return module


class EmptyClasses(types.ModuleType):
    """A module whose every name is a new empty class that takes any arguments."""

    def __getattr__(self, name):
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


def clip_classifier_module():
    """nodes/clip_classifier.py. Its node class needs comfy_api.latest, which imports PyAV, absent on the GPU machine
    (see bench/pag_bench.py); where that import fails, a stand-in whose every name is an empty class goes into
    sys.modules first: the bench uses only the module's network, which needs none of it."""
    try:
        import comfy_api.latest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("comfy_api.latest")
        stand_in.io = EmptyClasses("comfy_api.latest.io")
        sys.modules.setdefault("comfy_api", types.ModuleType("comfy_api"))
        sys.modules["comfy_api.latest"] = stand_in
    return importlib.import_module(f"{PACKAGE}.nodes.clip_classifier")


def sdxl_models(args, device):
    """(UNet, its ModelPatcher, VAE, CLIP ImageClassifier), random weights: SDXL-size, or tiny for --sdxl-smoke."""
    import comfy.clip_vision
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from apg_bench import SDXL_UNET, build_sdxl

    clip = clip_classifier_module()
    torch.manual_seed(0)
    if args.sdxl_smoke:
        config = comfy.supported_models.SDXL(dict(SDXL_UNET, **SMOKE_UNET, dtype=torch.float32))
        config.set_inference_dtype(torch.float32, None)
        unet = randomise(comfy.model_base.SDXL(config, device=device)).eval()
    else:
        unet = build_sdxl(args.comfyui)
    patcher = comfy.model_patcher.ModelPatcher(unet, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    # comfy.sd.VAE recognises the SD/SDXL VAE from the state dict's keys and picks its dtype as ComfyUI does
    vae = comfy.sd.VAE(sd=randomise(AutoencoderKL(ddconfig=SDXL_VAE, embed_dim=4)).state_dict())
    # the vision model as comfy.clip_vision.ClipVisionModel builds it, then the CLIP zero-shot network as the pack's
    # clip_vision_classifier makes it from one (a float32 copy run with out-of-place residuals), over random classes
    clip_config = dict(VIT_L14, num_hidden_layers=SMOKE_CLIP_LAYERS) if args.sdxl_smoke else VIT_L14
    vision = randomise(comfy.clip_vision.IMAGE_ENCODERS[clip_config["model_type"]](
        clip_config, comfy.model_management.text_encoder_dtype(device), device, comfy.ops.manual_cast))
    side = clip_config["image_size"]
    network = clip.CLIPZeroShotNetwork(
        clip.owned_copy(vision.vision_model, device), clip.owned_copy(vision.visual_projection, device),
        F.normalize(torch.randn(ZERO_SHOT_CLASSES, clip_config["projection_dim"], device=device), dim=1), side,
        torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device), clip.DEFAULT_LOGIT_SCALE)
    network.eval().requires_grad_(False)
    classifier = sys.modules[f"{PACKAGE}.guiders.classifier"].ImageClassifier(
        network, (3, side, side), tuple(f"class {k}" for k in range(ZERO_SHOT_CLASSES)), "image",
        "CLIP ViT-L/14-size zero-shot classifier, random weights")
    return unet, patcher, vae, classifier


def timed(run, state, device) -> tuple:
    """(ms, peak MiB, peak MiB above what was allocated before) of run(state): CUDA events on the GPU, the wall clock
    (and no memory) on the CPU."""
    if device.type != "cuda":
        began = time.perf_counter()
        run(state)
        return 1000 * (time.perf_counter() - began), None, None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run(state)
    end.record()
    end.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return start.elapsed_time(end), peak / 2 ** 20, (peak - before) / 2 ** 20


def measure(entries: dict, device, warmup: int, reps: int) -> dict:
    """name → (prepare, run): the median time of run(prepare()) (prepare untimed, None for nothing to prepare) over
    `reps` interleaved rounds after `warmup` rounds, with its peak memory; an entry that runs out of GPU memory is
    reported as such and leaves the rounds."""
    samples = {name: [] for name in entries}
    failed = {}
    for round_ in range(warmup + reps):
        for name, (prepare, run) in entries.items():
            if name in failed:
                continue
            try:
                sample = timed(run, prepare() if prepare else None, device)
            except torch.cuda.OutOfMemoryError as e:
                failed[name] = f"out of memory: {str(e).splitlines()[0]}"
                sample = None
            if sample is None:
                gc.collect()
                torch.cuda.empty_cache()
                print(f"SDXL {name}: {failed[name]}", flush=True)
            elif round_ >= warmup:
                samples[name].append(sample)
    result = {}
    for name, runs in samples.items():
        if name in failed:
            result[name] = {"error": failed[name]}
            continue
        ms = [r[0] for r in runs]
        result[name] = {"ms": statistics.median(ms), "ms_all": ms, "peak_mib": runs[0][1] and max(r[1] for r in runs),
                        "extra_mib": runs[0][2] and max(r[2] for r in runs)}
    return result


def sdxl_part(args, device) -> dict:
    """Per-step cost of EluCD with a decoder and a CLIP-size classifier on an SDXL-size model (module docstring)."""
    import comfy.samplers

    elucd, patch, classifier_patch = pack_modules()
    identity = sys.modules[f"{PACKAGE}.guiders.classifier"].identity
    unet, patcher, vae, clip = sdxl_models(args, device)
    guided = patch.apply_elucd(patcher, classifier_patch.ClassifierTargets(clip, (0,)), elucd.EluCDConfig(), vae,
                               chunk=1)
    hook = guided.model_options["sampler_post_cfg_function"][-1]
    hook.network.to(device)
    on_images = dataclasses.replace(hook.classifier, decode=identity)  # (c): resize and classifier, no decode
    side = SMOKE_LATENT if args.sdxl_smoke else 128
    schedule = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 30)
    sigma = schedule[:1].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 4, side, side, device=device, generator=g) * sigma
    context = torch.randn(2, 77, 2048, device=device, generator=g)
    y = torch.randn(2, 2816, device=device, generator=g)
    denoised = torch.randn(1, 4, side, side, device=device, generator=g)
    target = torch.zeros(1, dtype=torch.long, device=device)
    w = 5.0

    def unet_call(_=None):
        with torch.no_grad():
            return unet.apply_model(x, sigma.expand(2), c_crossattn=context, y=y)

    def cfg_step(_=None):
        cond, uncond = unet_call().chunk(2)
        return uncond + w * (cond - uncond)

    def elucd_step(_):
        return hook({"denoised": cfg_step(), "sigma": sigma,
                     "model_options": {"transformer_options": {"sample_sigmas": schedule}}})

    def leaf():
        return denoised.clone().requires_grad_(True)

    def graph():
        x0 = leaf()
        return x0, hook.log_prob(hook.classifier.logits(x0), target).sum()

    results = measure({
        "unet": (None, unet_call),
        "decode": (leaf, hook.classifier.decode),
        "classify": (lambda: hook.classifier.decode(leaf()), on_images.logits),
        "backward": (graph, lambda pair: torch.autograd.grad(pair[1], pair[0])),
        "elucd_gradient": (None, lambda _: hook.classifier.log_prob_gradient(denoised, target, log_prob=hook.log_prob)),
        "cfg_step": (None, cfg_step),
        "elucd_step": (None, elucd_step),
    }, device, args.sdxl_warmup, args.sdxl_reps)
    ms = {name: r.get("ms") for name, r in results.items()}
    derived = {}
    if None not in ms.values():
        derived = {"elucd_over_cfg_step": ms["elucd_step"] / ms["cfg_step"],
                   "hook_ms": ms["elucd_step"] - ms["cfg_step"],
                   "share_of_elucd_step": {k: ms[k] / ms["elucd_step"] for k in ("unet", "decode", "classify",
                                                                                   "backward")}}
    print(f"SDXL ms: {ms} {derived}", flush=True)
    return {"smoke": args.sdxl_smoke, "latent": [1, 4, side, side], "image_side": 8 * side,
            "unet": "tiny SDXL-shaped UNet, float32 (smoke)" if args.sdxl_smoke else
            "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
            "unet_dtype": str(unet.get_dtype()), "vae_dtype": str(vae.vae_dtype),
            "classifier": f"the pack's CLIP zero-shot network (nodes/clip_classifier.py) on a CLIP ViT-L/14-size "
                          f"vision tower ({len(clip.network.vision.encoder.layers)} layers) at {clip.input_shape[1]}, "
                          f"{ZERO_SHOT_CLASSES} random classes, random weights",
            "classifier_dtype": str(next(clip.network.parameters()).dtype),
            "sigma": float(sigma), "cfg": w, "reps": args.sdxl_reps, "warmup_rounds": args.sdxl_warmup,
            "results": results, **derived}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = ["# EluCD classifier guidance (bench/classifier_bench.py)", "", f"`{report['command']}`", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"ComfyUI {report['comfyui']}.", ""]
    part = report["reference"]
    held = part["held_out"]
    lines += [f"## Reference model: {part['images']} images per setting, {part['sampler']}/{part['scheduler']}, "
              f"{part['steps']} steps, UNet {part['unet_dtype']}", "",
              "Same initial noise and sampler seeds for every setting; EluCD targets each image's balanced label. "
              "The guide is reference/weights/fashion_classifier.safetensors, which is also the feature network of "
              "FD, precision and recall (bench/reference_eval.py's evaluation space, kept as the issue asks), so "
              "its accuracy and those metrics favour what it guides towards; the judge (reference/judge.py) is an "
              "independent classifier. The unconditional model is the empty class as the prompt at cfg 1 "
              "(accuracy near chance, 0.1, expected). "
              f"APG is bench/reference_eval.py's apg_r2.5: {part['apg']}. EluCD defaults: {part['elucd_defaults']}; "
              f"scales {', '.join(f'{x:g}' for x in part['scales'])}. Sampling in calls of {part['batch']} images, the "
              f"classifier in one chunk per call. ms/image: synchronised wall time of the sampling calls after a "
              f"2-step warm-up of the same setting; peak memory: torch.cuda.max_memory_allocated over the sampling "
              f"calls, model weights included.", "",
              f"Real held-out images (the judge's held-out part of the test split, {held['images']} images): guide "
              f"accuracy {held['guide_accuracy']:.4f}, judge accuracy {held['judge_accuracy']:.4f} (guide on the "
              f"whole test split {part['test_split_guide_accuracy']:.4f}).", "",
              "| setting | FD ↓ | precision | recall | class acc. (guide) | class acc. (judge) | ms/image | "
              "peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['setting']} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_accuracy']:.3f} | {r['judge_accuracy']:.3f} | {r['ms_per_image']:.3f} | "
                     f"{fmt(r['peak_mib'], '.0f')} |")
    lines += ["", "The paper's ablations, on the accuracy-FD trade-off: each variant's scale sweep (--scales), and "
              "at each judge accuracy that the full method reaches, its FD against the other variant's sweep "
              "interpolated to the same accuracy (a variant that is merely stronger at one scale is not "
              "rewarded for it):", ""]
    for claim, v in part["directions"]["matched"].items():
        points = "; ".join(f"{p['judge_accuracy']:.3f}: {p['fd'][0]:.2f} vs {p['fd'][1]:.2f}" for p in v["points"])
        lines.append(f"- {claim}: **{v['verdict']}** (judge accuracy: FD of {v['better']} vs {v['worse']}: "
                     f"{points or 'none'})")
    lines += ["", "Single comparisons (better: higher judge accuracy and lower FD):", ""]
    for claim, v in part["directions"]["pairs"].items():
        lines.append(f"- {claim}: **{v['verdict']}** ({v['better']} vs {v['worse']}: judge accuracy "
                     f"{v['judge_accuracy'][0]:.3f} vs {v['judge_accuracy'][1]:.3f}, FD {v['fd'][0]:.3f} vs "
                     f"{v['fd'][1]:.3f})")
    s = report.get("sdxl")
    if s:
        side = s["image_side"]
        smoke = f" (SMOKE RUN, tiny UNet on {report['device']}: not a measurement)" if s["smoke"] else ""
        lines += ["", f"## Cost of one EluCD step at {side}²{smoke}", "",
                  f"{s['unet']}; VAE: SDXL architecture (ComfyUI AutoencoderKL through comfy.sd.VAE), "
                  f"{s['vae_dtype']}, random, decoded through EluCD's differentiable decoder; classifier: "
                  f"{s['classifier']}, {s['classifier_dtype']}. One image, latent {s['latent']}, CFG batch of 2 "
                  f"at cfg {s['cfg']:g}, sigma {s['sigma']:.3g}. CUDA events, interleaved, median of {s['reps']} "
                  f"after {s['warmup_rounds']} warm-up rounds; peak memory with all models resident, and above what "
                  "was allocated when the part began.", "",
                  "| part | ms | peak MiB | MiB above resident |", "|---|---|---|---|"]
        names = {"unet": "(a) UNet call, cond + uncond (batch 2)",
                 "decode": f"(b) VAE decode forward {s['latent'][-1]}² → {side}², recording autograd",
                 "classify": "(c) resize to 224 + classifier forward",
                 "backward": "(d) backward through classifier and decoder",
                 "elucd_gradient": "EluCD's gradient as it runs it (b + c + d)",
                 "cfg_step": "plain CFG step (UNet + CFG combination)",
                 "elucd_step": "EluCD step (CFG step + EluCD's post-CFG hook)"}
        for key, title in names.items():
            r = s["results"][key]
            if "error" in r:
                lines.append(f"| {title} | {r['error']} | | |")
            else:
                lines.append(f"| {title} | {r['ms']:.2f} | {fmt(r['peak_mib'], '.0f')} | "
                             f"{fmt(r['extra_mib'], '.0f')} |")
        if "elucd_over_cfg_step" in s:
            share = ", ".join(f"{k} {v:.0%}" for k, v in s["share_of_elucd_step"].items())
            lines += ["", f"EluCD step / CFG step: {s['elucd_over_cfg_step']:.2f} (the hook adds "
                      f"{s['hook_ms']:.2f} ms); shares of the EluCD step: {share}."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    _, _, classifier_patch = pack_modules()
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {**ref.run_record("bench/classifier_bench.py", args, device),
              "weights": {"diffusion": ref.file_record(args.weights), "judge": ref.file_record(args.judge),
                          "guide": ref.file_record(str(classifier_patch.WEIGHTS_DIR /
                                                       classifier_patch.DEFAULT_CLASSIFIER))}}
    report["reference"] = reference_part(args, device)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    if args.sdxl_smoke or (not args.skip_sdxl and device.type == "cuda"):
        report["sdxl"] = sdxl_part(args, device)
    report["total_seconds"] = time.time() - started
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
