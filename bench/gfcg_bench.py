"""GFCG and Autoguidance on the GPU: the abstracts' claims on the reference model, the ablations, and what a step costs.

Part 1, the reference model (reference/model.py), --per-class images per class (1000 in all) per setting, --sampler
with the normal scheduler, --steps steps, the same initial noise and sampler seeds for every setting, through
ComfyUI's sampling path (`comfy.sample.sample`) as in bench/reference_eval.py, each image conditioned on its balanced
label. GFCG is the node's own patch (nodes/gfcg_patch.py `apply_gfcg`) with the reference classifier (reference/
weights/fashion_classifier.safetensors) reading each image's target, and the model's class conditioning for the
reference class; Autoguidance is the node's patch (nodes/autoguidance_patch.py) with the shipped weak checkpoint
(reference/weights/fashion_weak_diffusion.safetensors, the same training at an early step). Settings:

- CFG at each of --cfgs (w = 1 + s is GFCG with the unconditional prediction as the reference and a constant scale:
  the "unconditional reference" ablation);
- GFCG alone (cfg 1) at each of --scales, with the adaptive scale and the most likely competitor (our reading), and
  the ablations on the same sweep: constant scale; a random other class as the reference;
- CFG at --cfg + GFCG at each of --combined-scales;
- ATG at each of --atg-cfgs, and ATG + GFCG at the same w (the weak model asked for the reference class).

Scoring, with the guiding classifier never judging: class accuracy under the independent judge (reference/judge.py);
FD, precision and recall in the judge's feature space (its pooled features before the linear head) against the real
test split (of which the judge trained on the first 8000 images); the guide-space FD of the other benches
(bench/reference_eval.py's `evaluate`) beside it for continuity; model rows per image (UNet batch rows of the main
and the weak model, counted by UNet function wrappers, over the images); ms per image (synchronised wall time of the
sampling calls after a 2-step warm-up of the same setting). The report states, from the numbers, whether each claim
of the issue is reproduced (bench/classifier_bench.py's `matched` for sweeps against sweeps: FD at the same judge
accuracy).

Part 2, the cost of one step on an SDXL-size model (bench/classifier_bench.py's `sdxl_models`: ComfyUI's
model_base.SDXL with random fp16 weights at 1024², latent 128², one image; an SDXL VAE and the pack's CLIP zero-shot
network on a ViT-L/14-size tower, random weights), timed with CUDA events, interleaved, median of --sdxl-reps after
--sdxl-warmup rounds: the CFG step (one UNet call of 2 rows), the CFG + GFCG step (one call of 3 rows, and the
classifier on D_c: decode, resize, forward, no gradient), the ATG step (the main model's call of 1 row and a second
SDXL-size model's call of 1 row; a weak model of the same size is the dearest case) and ATG + GFCG (ATG and the
classifier), each as a ratio to the CFG step, with the classifier's share of the GFCG step.

    python bench/gfcg_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
    python bench/gfcg_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --quick --device cpu  (smoke)

--quick: 1 image per class, 2 steps, one setting of each kind, a tiny SDXL-shaped UNet (not a measurement). DATA_DIR holds the
Fashion-MNIST test split files (t10k-*), unpacked there from the Debian package if missing; writes NAME.json and NAME.md (--name, default gfcg_bench).
"""

import argparse
import importlib
import json
import pathlib
import sys
import time

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adaptive_bench import ref  # noqa: E402  (bench/, the script's folder)
from classifier_bench import accuracy, fmt, matched, measure, sdxl_models  # noqa: E402
from pack import PACKAGE, import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402

WEIGHTS = ROOT / "reference" / "weights"
CFG, GFCG, COMBINED, ATG, ATG_GFCG = "CFG", "GFCG", "CFG + GFCG", "ATG", "ATG + GFCG"
CONSTANT, RANDOM = "GFCG, constant scale", "GFCG, random other class"
QUICK = {"per_class": 1, "steps": 2, "batch": 10, "cfgs": "3", "scales": "2", "combined_scales": "1",
         "atg_cfgs": "2", "sdxl_smoke": True}
FD_LOSS = 0.05  # CFG + GFCG may lose at most this share of CFG's FD (the issue's claim)
RECALL_SLACK = 0.01  # ATG + GFCG keeps ATG's recall within this


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfgs", default="1.5,2,3,5,9", help="the CFG sweep (w = 1 + s: GFCG with the unconditional "
                   "reference at a constant scale s)")
    p.add_argument("--scales", default="1,2,4,8", help="GFCG alone (cfg 1): the sweep of s, for every ablation too")
    p.add_argument("--cfg", type=float, default=3.0, help="the CFG scale of CFG + GFCG")
    p.add_argument("--combined-scales", default="1,2", help="GFCG's s on top of CFG at --cfg")
    p.add_argument("--atg-cfgs", default="1.5,2,3", help="w of ATG and of ATG + GFCG")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500, help="images per sampling call (and per classifier pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--sdxl-reps", type=int, default=10)
    p.add_argument("--sdxl-warmup", type=int, default=3)
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--sdxl-smoke", action="store_true", help="part 2 with a tiny UNet at a small latent, any device")
    p.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k} {v}" for k, v in
                                                                                     QUICK.items()))
    p.add_argument("--name", default="gfcg_bench", help="file name of the results (.json and .md) in --out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default=str(WEIGHTS / "fashion_diffusion.safetensors"))
    p.add_argument("--weak", default=str(WEIGHTS / "fashion_weak_diffusion.safetensors"))
    p.add_argument("--judge", default=str(WEIGHTS / "fashion_judge.safetensors"))
    args = p.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("cfgs", "scales", "combined_scales", "atg_cfgs"):
        setattr(args, key, [float(v) for v in str(getattr(args, key)).split(",")])
    args.scheduler = "normal"
    if args.sdxl_smoke:
        args.sdxl_reps, args.sdxl_warmup = 1, 1
    images = len(CLASS_NAMES) * args.per_class
    batch = min(args.batch, images)
    if images % batch or batch % len(CLASS_NAMES):
        p.error(f"--batch must give equal sampling calls of whole class rounds: {images} images in calls of {batch}")
    return args


def pack_modules():
    import_pack()
    return tuple(importlib.import_module(f"{PACKAGE}.{name}") for name in
                 ("guiders.gfcg", "nodes.gfcg_patch", "nodes.autoguidance_patch", "nodes.classifier_patch"))


class JudgeSpace(nn.Module):
    """The judge as an evaluation network for bench/reference_eval.py's `evaluate`: `features` its pooled features
    before the linear head, `head` that linear layer."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge

    def features(self, x):
        return self.judge.head[:-1](self.judge.blocks(self.judge.stem(x)))

    def head(self, features):
        return self.judge.head[-1](features)


class SharedRowCounter(ref.RowCounter):
    """ref.RowCounter that survives ModelPatcher.clone (which deep-copies model options): the weak model is cloned
    with every clone of the main one."""

    def __deepcopy__(self, memo):
        return self


def counted(model):
    counter = SharedRowCounter(model.model_options.get("model_function_wrapper"))
    out = model.clone()
    out.set_model_unet_function_wrapper(counter)
    return out, counter


def reference_part(args, device) -> dict:
    import comfy.sd
    from comfy.sample import prepare_noise

    from reference.data import ensure_fashion_mnist
    from reference.judge import judge_split, load_judge

    gfcg, patch, autoguidance, classifier_patch = pack_modules()
    model, tokens = ref.load_diffusion(args.weights)
    weak, _ = ref.load_diffusion(args.weak)
    guide_path = classifier_patch.WEIGHTS_DIR / classifier_patch.DEFAULT_CLASSIFIER
    guide = ref.load_classifier(guide_path, len(CLASS_NAMES), device)
    judge = load_judge(args.judge, device)
    judge_space = JudgeSpace(judge)
    data = ensure_fashion_mnist(pathlib.Path(args.data), ("test",))
    real = ref.RealReference(judge_space, data, args.per_class, 0, device)
    real_guide = ref.RealReference(guide, data, args.per_class, 0, device)
    _, (held_images, held_labels) = judge_split(real.images, real.labels)
    held_out = {"images": len(held_labels), "judge_accuracy": accuracy(judge, held_images, held_labels, device)}
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    batch = min(args.batch, len(labels))
    targets = classifier_patch.ClassifierTargets(classifier_patch.reference_classifier(),
                                                 tuple(labels[:batch].tolist()))  # every call holds these classes
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # the reference loader's VAE
    classes = patch.reference_class_conditioning({"names": CLASS_NAMES, "tokens": tokens})
    counting, main_counter = counted(model)
    weak_counting, weak_counter = counted(weak)
    autoguided = autoguidance.apply_autoguidance(counting, weak_counting)

    def guided(base, scale, **changes):
        return patch.apply_gfcg(base, targets, classes, gfcg.GFCGConfig(scale, **changes), vae, chunk=batch)

    settings = [("cond cfg 1", "cond", ref.Setup(counting, 1.0), {})]
    settings += [(f"CFG {w:g}", CFG, ref.Setup(counting, w), {"cfg": w}) for w in args.cfgs]
    for variant, changes in ((GFCG, {}), (CONSTANT, {"scale_rule": gfcg.CONSTANT}),
                             (RANDOM, {"reference_rule": gfcg.RANDOM})):
        settings += [(f"{variant} s={s:g}", variant, ref.Setup(guided(counting, s, **changes), 1.0), {"scale": s})
                     for s in args.scales]
    settings += [(f"CFG {args.cfg:g} + GFCG s={s:g}", COMBINED, ref.Setup(guided(counting, s), args.cfg),
                  {"cfg": args.cfg, "scale": s}) for s in args.combined_scales]
    for w in args.atg_cfgs:
        settings += [(f"ATG {w:g}", ATG, ref.Setup(autoguided, w), {"cfg": w}),
                     (f"ATG {w:g} + GFCG", ATG_GFCG, ref.Setup(guided(autoguided, 1.0), w), {"cfg": w})]

    rows = []
    for name, variant, setup, extra in settings:
        ref.sample(setup, tokens, labels, noise, args, steps=2)  # warm-up: loading, kernel choice, allocator growth
        main_counter.rows = weak_counter.rows = 0
        images, seconds = ref.sample(setup, tokens, labels, noise, args)
        in_guide = ref.evaluate(images, labels, guide, real_guide, args.k, device)
        row = {"setting": name, "variant": variant, **extra, **ref.evaluate(images, labels, judge_space, real, args.k,
                                                                            device),
               "guide_fd": in_guide["fd"], "guide_accuracy": in_guide["class_accuracy"],
               "rows_per_image": (main_counter.rows + weak_counter.rows) / len(labels),
               "weak_rows_per_image": weak_counter.rows / len(labels),
               "ms_per_image": 1000 * seconds / len(labels)}
        row["judge_accuracy"] = row.pop("class_accuracy")
        rows.append(row)
        print(f"{name:>40}  {seconds:7.2f}s  FD {row['fd']:8.3f}  P {row['precision']:.3f} R {row['recall']:.3f}  "
              f"judge {row['judge_accuracy']:.3f}  rows/image {row['rows_per_image']:.0f}", flush=True)
    return {"images": len(labels), "batch": batch, "unet_dtype": str(model.model.get_dtype()), "steps": args.steps,
            "sampler": args.sampler, "scheduler": args.scheduler, "held_out": held_out,
            "test_split_judge_accuracy": real.test_accuracy, "rows": rows, "claims": claims(rows, args)}


def by_setting(rows: list) -> dict:
    return {r["setting"]: r for r in rows}


def claims(rows: list, args) -> dict:
    """Each claim of the issue, judged from the rows."""
    by = by_setting(rows)
    out = {
        "GFCG vs CFG at the same rows (FD at equal judge accuracy)": matched(rows, GFCG, CFG),
        "ATG vs CFG (FD at equal judge accuracy)": matched(rows, ATG, CFG),
        "ablation: adaptive vs constant scale (FD at equal judge accuracy)": matched(rows, GFCG, CONSTANT),
        "ablation: most likely competitor vs random other class": matched(rows, GFCG, RANDOM),
        "ablation: class reference (constant scale) vs the unconditional one, i.e. CFG 1 + s": matched(
            rows, CONSTANT, CFG),
    }
    cfg = by.get(f"CFG {args.cfg:g}")
    combined = []
    for s in args.combined_scales:
        r = by[f"CFG {args.cfg:g} + GFCG s={s:g}"]
        if cfg is not None:
            holds = r["judge_accuracy"] > cfg["judge_accuracy"] and r["fd"] <= (1 + FD_LOSS) * cfg["fd"]
            combined.append({"setting": r["setting"], "holds": holds, "judge_accuracy": [r["judge_accuracy"],
                                                                                         cfg["judge_accuracy"]],
                             "fd": [r["fd"], cfg["fd"]]})
    out[f"CFG + GFCG raises judge accuracy over CFG {args.cfg:g} losing at most {FD_LOSS:.0%} FD"] = {
        "verdict": verdict_of([c["holds"] for c in combined]), "cases": combined}
    atg = []
    for w in args.atg_cfgs:
        a, b = by[f"ATG {w:g} + GFCG"], by[f"ATG {w:g}"]
        holds = (a["precision"] > b["precision"] and abs(a["recall"] - b["recall"]) <= RECALL_SLACK
                 and a["fd"] <= b["fd"] and a["rows_per_image"] == b["rows_per_image"])
        atg.append({"cfg": w, "holds": holds, **{k: [a[k], b[k]] for k in ("precision", "recall", "fd",
                                                                            "judge_accuracy", "rows_per_image")}})
    out["ATG + GFCG vs ATG: higher precision, recall within 0.01, FD no worse, same rows per image"] = {
        "verdict": verdict_of([c["holds"] for c in atg]), "cases": atg}
    return out


def verdict_of(holds: list) -> str:
    if not holds:
        return "not measured"
    return "reproduced" if all(holds) else "not reproduced" if not any(holds) else \
        f"mixed ({sum(holds)} of {len(holds)})"


def sdxl_part(args, device) -> dict:
    """Per-step cost of CFG + GFCG and of ATG (two SDXL-size models) against CFG (module docstring)."""
    import comfy.samplers

    gfcg, _, _, classifier_patch = pack_modules()
    unet, patcher, vae, clip = sdxl_models(args, device)
    weak, _, _, _ = sdxl_models(args, device)
    classifier = classifier_patch.classifier_on_denoised(clip, clip.network, patcher, vae, "GFCG", chunk=1)
    side = 8 if args.sdxl_smoke else 128
    schedule = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 30)
    sigma = schedule[:1].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(3, 4, side, side, device=device, generator=g) * sigma
    context = torch.randn(3, 77, 2048, device=device, generator=g)
    y = torch.randn(3, 2816, device=device, generator=g)
    w, s = 5.0, 1.0
    target = torch.zeros(1, dtype=torch.long, device=device)

    def call(model, rows):
        with torch.no_grad():
            return model.apply_model(x[:rows], sigma.expand(rows), c_crossattn=context[:rows], y=y[:rows])

    def cfg_step(_=None):
        cond, uncond = call(unet, 2).chunk(2)
        return uncond + w * (cond - uncond)

    def gfcg_step(_=None):
        cond, uncond, reference = call(unet, 3).chunk(3)
        p = classifier.probabilities(cond)
        scale = gfcg.guidance_scale(p, target, gfcg.reference_classes(p, target), s)
        return gfcg.gfcg_guided(uncond + w * (cond - uncond), cond, reference, scale)

    def atg_step(_=None):
        cond = call(unet, 1)
        d_weak = call(weak, 1)
        return d_weak + w * (cond - d_weak)

    def atg_gfcg_step(_=None):
        cond = call(unet, 1)
        gfcg.reference_classes(classifier.probabilities(cond), target)
        d_weak = call(weak, 1)
        return d_weak + w * (cond - d_weak)

    results = measure({
        "cfg_step": (None, cfg_step),
        "gfcg_step": (None, gfcg_step),
        "classifier": (None, lambda _: classifier.probabilities(x[:1])),
        "atg_step": (None, atg_step),
        "atg_gfcg_step": (None, atg_gfcg_step),
    }, device, args.sdxl_warmup, args.sdxl_reps)
    ms = {name: r.get("ms") for name, r in results.items()}
    derived = {}
    if None not in ms.values():
        derived = {"over_cfg_step": {k: ms[k] / ms["cfg_step"] for k in ("gfcg_step", "atg_step", "atg_gfcg_step")},
                   "classifier_share_of_gfcg_step": ms["classifier"] / ms["gfcg_step"]}
    print(f"SDXL ms: {ms} {derived}", flush=True)
    return {"smoke": args.sdxl_smoke, "latent": [1, 4, side, side], "image_side": 8 * side,
            "unet": "tiny SDXL-shaped UNet, float32 (smoke)" if args.sdxl_smoke else
            "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random; the weak model another",
            "unet_dtype": str(unet.get_dtype()), "vae_dtype": str(vae.vae_dtype), "classifier": clip.name,
            "sigma": float(sigma), "cfg": w, "reps": args.sdxl_reps, "warmup_rounds": args.sdxl_warmup,
            "results": results, **derived}


def markdown(report: dict) -> str:
    lines = ["# GFCG and Autoguidance (bench/gfcg_bench.py)", "", f"`{report['command']}`", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"ComfyUI {report['comfyui']}.", ""]
    part = report["reference"]
    lines += [f"## Reference model: {part['images']} images per setting, {part['sampler']}/{part['scheduler']}, "
              f"{part['steps']} steps, UNet {part['unet_dtype']}", "",
              "Same initial noise and sampler seeds for every setting. The guide (GFCG's classifier) never judges: "
              "judge accuracy, FD, precision and recall are in the independent judge's space (reference/judge.py); "
              "guide FD and guide accuracy are the other benches' numbers, for continuity only. Rows/image: UNet "
              f"rows of both models over the images. Judge accuracy on its held-out real images: "
              f"{part['held_out']['judge_accuracy']:.4f} ({part['held_out']['images']} images).", "",
              "| setting | FD ↓ | precision | recall | judge acc. | guide FD | guide acc. | rows/image | ms/image |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['setting']} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['judge_accuracy']:.3f} | {r['guide_fd']:.3f} | {r['guide_accuracy']:.3f} | "
                     f"{r['rows_per_image']:.0f} | {r['ms_per_image']:.2f} |")
    lines += ["", "Claims (reproduced / not reproduced / mixed, from the rows above):", ""]
    for claim, v in part["claims"].items():
        if "points" in v:
            points = "; ".join(f"{p['judge_accuracy']:.3f}: {p['fd'][0]:.2f} vs {p['fd'][1]:.2f}" for p in v["points"])
            lines.append(f"- {claim}: **{v['verdict']}** (judge accuracy: FD of {v['better']} vs {v['worse']}: "
                         f"{points or 'none'})")
        else:
            cases = "; ".join(", ".join(f"{k} {fmt(val[0], '.3f')} vs {fmt(val[1], '.3f')}" if isinstance(val, list)
                                        else f"{k} {val}" for k, val in c.items() if k != "holds")
                              for c in v["cases"])
            lines.append(f"- {claim}: **{v['verdict']}** ({cases})")
    s = report.get("sdxl")
    if s:
        smoke = f" (SMOKE RUN, tiny UNet on {report['device']}: not a measurement)" if s["smoke"] else ""
        lines += ["", f"## Cost of one step at {s['image_side']}²{smoke}", "",
                  f"{s['unet']}; classifier: {s['classifier']} through the SDXL VAE ({s['vae_dtype']}). One image, "
                  f"cfg {s['cfg']:g}, sigma {s['sigma']:.3g}; CUDA events, interleaved, median of {s['reps']} after "
                  f"{s['warmup_rounds']} warm-up rounds.", "", "| step | ms | peak MiB |", "|---|---|---|"]
        names = {"cfg_step": "CFG: one call of 2 rows", "gfcg_step": "CFG + GFCG: one call of 3 rows + classifier",
                 "classifier": "the classifier on D_c (decode, resize, forward)",
                 "atg_step": "ATG: main model 1 row + weak model 1 row",
                 "atg_gfcg_step": "ATG + GFCG: ATG + classifier"}
        for key, title in names.items():
            r = s["results"][key]
            lines.append(f"| {title} | {r['error']} | |" if "error" in r else
                         f"| {title} | {r['ms']:.2f} | {fmt(r['peak_mib'], '.0f')} |")
        if "over_cfg_step" in s:
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in s["over_cfg_step"].items())
            lines += ["", f"Ratios to the CFG step: {ratios}; the classifier's share of the GFCG step: "
                      f"{s['classifier_share_of_gfcg_step']:.0%}."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {**ref.run_record("bench/gfcg_bench.py", args, device),
              "weights": {"diffusion": ref.file_record(args.weights), "weak": ref.file_record(args.weak),
                          "judge": ref.file_record(args.judge),
                          "guide": ref.file_record(str(WEIGHTS / "fashion_classifier.safetensors"))}}
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
