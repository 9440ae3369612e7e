"""Adaptive Guidance and LinearAG on the GPU: what skipping the unconditional pass saves and what it costs.

Part 1, the reference model (reference/model.py), 1000 images (100 per class) per setting, euler, --steps steps, the
same initial noise for every setting, through ComfyUI's sampling path (`comfy.sample.sample`) as in
bench/reference_eval.py:

- CFG at --scale, --steps steps: the baseline, and the image each other setting is compared with (same seed);
- AG at a sweep of thresholds γ̄ (the node's default criterion, cos(ε_c, ε_cfg)): NFEs per image counted as the
  batch rows the UNet sees, wall time, FD / precision / recall / class accuracy against the real test split, and the
  deviation from the CFG image of the same seed: PSNR (images clamped to [-1, 1]) and the distance between the
  evaluation classifier's features of the two images, relative to the mean feature norm;
- CFG at the same NFE budget as each AG setting: the same scale with fewer steps (round(NFE / 2)), the honest peer;
- LinearAG: coefficients fitted (bench/adaptive_patch's fit_linear_ag, the node's procedure) on --fit-images other
  images, then sampled at the default threshold; the fitting time is reported;
- the per-call cosine γ of the CFG runs (mean, min, max over the images), to show where the threshold bites.

Part 2, the cost: an SDXL-size UNet (ComfyUI's model_base.SDXL, base config, random fp16 weights) at 1024², one
image, whole sampling runs of --sdxl-steps euler steps timed end to end: CFG against AG's own patch with the switch
forced at the call where the measured default-threshold AG of part 1 switches on average (random weights give no
meaningful cosine), so the time saving can be compared with the NFE saving; and single steps (CFG step, batch 2, and
conditional-only step, batch 1) to explain the ratio; each with cuDNN's autotuning off (ComfyUI's default) and on
(ComfyUI's --fast autotune).

    python bench/adaptive_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
    python bench/adaptive_bench.py ... --steps 20 --skip-sdxl --name adaptive_bench_20steps

DATA_DIR needs the Fashion-MNIST test split files (t10k-*); writes NAME.json and NAME.md (--name, default
adaptive_bench).
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _without_matplotlib():
    """reference_eval imports matplotlib for its plots, which this bench does not draw (and the GPU machine lacks):
    a stand-in when it is missing."""
    import importlib.util
    import types

    if importlib.util.find_spec("matplotlib") is None:
        stand_in = types.ModuleType("matplotlib")
        stand_in.use = lambda *a, **k: None
        stand_in.pyplot = types.ModuleType("matplotlib.pyplot")
        sys.modules.update({"matplotlib": stand_in, "matplotlib.pyplot": stand_in.pyplot})


_without_matplotlib()
import reference_eval as ref  # noqa: E402  (bench/, the script's folder)
from pack import PACKAGE, import_pack  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--thresholds", default="0.95,0.98,0.99,0.991,0.995,0.998,0.999,0.9995")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--fit-images", type=int, default=200)
    p.add_argument("--fit-seed", type=int, default=1000)
    p.add_argument("--sdxl-steps", type=int, default=30)
    p.add_argument("--sdxl-reps", type=int, default=3)
    p.add_argument("--sdxl-batches", default="1,4", help="images per sampling run in the SDXL timing")
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--name", default="adaptive_bench", help="file name of the results (.json and .md) in --out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    args = p.parse_args()
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    args.sdxl_batches = [int(b) for b in args.sdxl_batches.split(",")]
    args.sampler, args.scheduler = "euler", "normal"
    return args


def pack_modules():
    import importlib

    import_pack()
    return (importlib.import_module(f"{PACKAGE}.guiders.adaptive"),
            importlib.import_module(f"{PACKAGE}.nodes.adaptive_patch"),
            importlib.import_module(f"{PACKAGE}.nodes.run_state"))


class GammaTrace:
    """Pre-CFG hook: per call, γ of every image under both criteria (for the table of where the threshold bites)."""

    def __init__(self, adaptive):
        self.adaptive = adaptive
        self.calls: list[dict] = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        cond, uncond = args["conds_out"][:2]
        x, w = args["input"], args["cond_scale"]
        self.calls.append({name: self.adaptive.similarity(x, cond, uncond, w, name).cpu() for name in
                           self.adaptive.CRITERIA} | {"sigma": float(args["sigma"].max()),
                                                      "noise_cond_cfg": self.adaptive.similarity(
                                                          x, cond, uncond, w, "cond_cfg", space="noise").cpu()})
        return args["conds_out"]


def deviation(images, baseline, classifier, device) -> dict:
    """PSNR (dB, images clamped to [-1, 1], peak-to-peak 2) and relative classifier-feature distance to `baseline`."""
    a, b = images.clamp(-1, 1), baseline.clamp(-1, 1)
    mse = (a - b).square().flatten(1).mean(1)
    psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).clamp(max=100.0)
    fa, _ = ref.classify(classifier, images, device)
    fb, _ = ref.classify(classifier, baseline, device)
    distance = (fa - fb).norm(dim=1)
    return {"psnr_db": float(psnr.mean()), "psnr_db_median": float(psnr.median()),
            "identical_images": int((mse == 0).sum()),
            "feature_distance_rel": float(distance.mean() / fb.norm(dim=1).mean())}


def run_setting(name, setup, steps, tokens, labels, noise, args, classifier, real, device, baseline=None, extra=None):
    counted, counter = ref.with_counter(setup)
    # an untimed run first: AG's per-sample decisions give the UNet batch sizes it has not seen yet, and the first
    # call at a new shape pays for cuDNN's plan selection; what is timed is the second, steady-state run
    ref.sample(setup, tokens, labels, noise, args, steps=steps)
    images, seconds = ref.sample(counted, tokens, labels, noise, args, steps=steps)
    row = {"method": name, "steps": steps, **(extra or {}),
           **ref.evaluate(images, labels, classifier, real, args.k, device),
           "nfe_per_image": counter.rows / len(labels), "ms_per_image": 1000 * seconds / len(labels),
           "seconds": seconds}
    if baseline is not None:
        row.update(deviation(images, baseline, classifier, device))
    print(f"{name:>22} steps {steps:3d}  NFE {row['nfe_per_image']:6.2f}  {seconds:6.2f}s  FD {row['fd']:6.3f}  "
          f"P {row['precision']:.3f} R {row['recall']:.3f} acc {row['class_accuracy']:.3f}  "
          f"PSNR {row.get('psnr_db', float('nan')):6.2f}  feat {row.get('feature_distance_rel', float('nan')):.4f}",
          flush=True)
    return row, images


def reference_part(args, device) -> dict:
    from comfy.sample import prepare_noise

    from reference.data import CLASS_NAMES, RESOLUTION

    adaptive, patch, _ = pack_modules()
    model, tokens = ref.load_diffusion(args.weights)
    classifier = ref.load_classifier(args.classifier, len(CLASS_NAMES), device)
    real = ref.RealReference(classifier, pathlib.Path(args.data), args.per_class, 0, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    w = args.scale
    # warm-up: every batch shape the UNet will see (cond + uncond, cond only, subsets), out of the timed runs
    ref.sample(ref.Setup(patch.apply_ag(model, adaptive.AGConfig(0.99)), w), tokens, labels, noise, args, steps=3)
    ref.sample(ref.Setup(model, w), tokens, labels, noise, args, steps=3)

    trace = GammaTrace(adaptive)
    traced = model.clone()
    traced.set_model_sampler_pre_cfg_function(trace)
    ref.sample(ref.Setup(traced, w), tokens, labels[: args.batch], noise[: args.batch], args)
    gamma_table = [{"call": i, "sigma": c["sigma"],
                    **{f"{k}_{stat}": float(getattr(c[k], stat)()) for k in adaptive.CRITERIA
                       for stat in ("mean", "min", "max")},
                    "noise_cond_cfg_mean": float(c["noise_cond_cfg"].mean())} for i, c in enumerate(trace.calls)]

    rows = []
    cfg_row, cfg_images = run_setting("cfg", ref.Setup(model, w), args.steps, tokens, labels, noise, args, classifier,
                                      real, device)
    rows.append(cfg_row)
    budgets = {}
    for threshold in args.thresholds:
        setup = ref.Setup(patch.apply_ag(model, adaptive.AGConfig(threshold)), w)
        row, _ = run_setting(f"ag γ̄={threshold:g}", setup, args.steps, tokens, labels, noise, args, classifier, real,
                             device, cfg_images, {"threshold": threshold})
        rows.append(row)
        budgets[max(1, round(row["nfe_per_image"] / 2))] = row["nfe_per_image"]

    began = time.perf_counter()
    from reference.model import class_conditioning

    fit_labels = ref.balanced_labels(len(CLASS_NAMES), max(1, args.fit_images // len(CLASS_NAMES)))
    fit_batch = min(args.batch, len(fit_labels))
    positive = [[torch.cat([class_conditioning(tokens, int(c))[0][0] for c in fit_labels[:fit_batch]]), {}]]
    negative = class_conditioning(tokens, None)
    latent = torch.zeros(1, 3, RESOLUTION, RESOLUTION)
    fitted = patch.fit_linear_ag(model, positive, negative, latent, args.sampler, args.scheduler, args.steps, w,
                                 args.fit_seed, len(fit_labels), fit_batch)
    fit_seconds = time.perf_counter() - began
    linear_thresholds = sorted({adaptive.DEFAULT_THRESHOLD, 1.0})
    for threshold in linear_thresholds:
        setup = ref.Setup(patch.apply_ag(model, adaptive.AGConfig(threshold), fitted), w)
        row, _ = run_setting(f"linear_ag γ̄={threshold:g}", setup, args.steps, tokens, labels, noise, args,
                             classifier, real, device, cfg_images, {"threshold": threshold, "linear": True})
        rows.append(row)
        budgets[max(1, round(row["nfe_per_image"] / 2))] = row["nfe_per_image"]

    for steps in sorted(budgets, reverse=True):
        if steps == args.steps:
            continue
        row, _ = run_setting(f"cfg {steps} steps", ref.Setup(model, w), steps, tokens, labels, noise, args,
                             classifier, real, device, cfg_images, {"nfe_budget_of": budgets[steps]})
        rows.append(row)
    cfg_row.update(deviation(cfg_images, cfg_images, classifier, device))
    return {"scale": w, "steps": args.steps, "images": len(labels), "rows": rows, "gamma_per_call": gamma_table,
            "linear_ag": {"fit_seconds": fit_seconds, "fit_images": len(fit_labels), "info": fitted.info,
                          "coefficients": fitted.coefficients.tolist()}}


def sdxl_part(args, switch_call: int) -> dict:
    """Wall time per image of whole sampling runs, CFG against AG with the switch forced at `switch_call`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    from apg_bench import build_sdxl

    adaptive, patch, run_state = pack_modules()

    class ForcedSwitch(patch.AGHook):
        """AG's own hooks and its cosine, with every image switched after call `switch_call` (the measured average)
        instead of at the threshold (γ̄ = 1 here, so only the forced switch acts)."""

        def passes_through(self, conds):
            return len(conds) < 2 or conds[1] is None

        def pre_cfg(self, args_):
            out = super().pre_cfg(args_)
            adaptive.similarity(args_["input"], out[0], out[1], args_["cond_scale"])  # the criterion's cost
            memory = run_state.run_state(args_["model_options"], self, patch.RunMemory)
            if memory.ag.calls >= switch_call:
                memory.ag.switched[:] = True
            return out

    model = build_sdxl(args.comfyui)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    ag_model = patcher.clone()
    hook = ForcedSwitch(adaptive.AGConfig(1.0), None)
    ag_model.set_model_sampler_calc_cond_batch_function(hook.calc_cond_batch)
    ag_model.set_model_sampler_pre_cfg_function(hook.pre_cfg)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    negative = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    per_batch = {}
    for images, autotune in [(b, a) for a in (False, True) for b in args.sdxl_batches]:
        # cuDNN's convolution autotuning is off in ComfyUI unless it runs with --fast autotune; it changes which
        # kernels a batch of 1 gets, so both are timed.
        torch.backends.cudnn.benchmark = autotune
        latent = torch.zeros(images, 4, 128, 128)
        noise = torch.randn(images, 4, 128, 128, generator=g)
        variants = {"cfg": patcher, "ag": ag_model}
        counters = {}
        for name in variants:
            counted, counters[name] = ref.with_counter(ref.Setup(variants[name], 5.0))
            variants[name] = counted.model

        def run(name):
            torch.cuda.synchronize()
            began = time.perf_counter()
            comfy.sample.sample(variants[name], noise, args.sdxl_steps, 5.0, "euler", "normal", positive, negative,
                                latent, seed=0, disable_pbar=True)
            torch.cuda.synchronize()
            return time.perf_counter() - began

        for name in variants:  # warm-up
            run(name)
        times = {name: [] for name in variants}
        for rep in range(args.sdxl_reps):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                counters[name].rows = 0
                times[name].append(run(name))
        rows = {name: counters[name].rows / images for name in variants}
        med = {name: statistics.median(t) / images for name, t in times.items()}
        nfe_saving = 1 - rows["ag"] / rows["cfg"]
        time_saving = 1 - med["ag"] / med["cfg"]
        key = f"{images}{' autotune' if autotune else ''}"
        per_batch[key] = {"seconds_per_image": med, "seconds_all": times, "unet_rows_per_image": rows,
                          "nfe_saving": nfe_saving, "time_saving": time_saving, "cudnn_benchmark": autotune,
                          "time_saving_over_nfe_saving": time_saving / nfe_saving if nfe_saving else None}
        print(f"SDXL batch {key}: {per_batch[key]}", flush=True)

    x = torch.randn(8, 4, 128, 128, device="cuda")
    sigma = torch.full((8,), 14.6, device="cuda")
    context = torch.randn(8, 77, 2048, device="cuda", dtype=torch.float16)
    y = torch.randn(8, 2816, device="cuda", dtype=torch.float16)

    def forward_ms(batch, reps=20):
        with torch.no_grad():
            for _ in range(3):
                model.apply_model(x[:batch], sigma[:batch], c_crossattn=context[:batch], y=y[:batch])
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                model.apply_model(x[:batch], sigma[:batch], c_crossattn=context[:batch], y=y[:batch])
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps

    forward = {}
    for autotune in (False, True):
        torch.backends.cudnn.benchmark = autotune
        forward.update({f"batch{b}{'_autotune' if autotune else ''}_ms": forward_ms(b) for b in (1, 2, 4, 8)})
    torch.backends.cudnn.benchmark = False
    return {"model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
            "latent_side": 128, "steps": args.sdxl_steps, "cfg": 5.0, "switch_after_call": switch_call,
            "per_batch": per_batch,
            "unet_forward": forward, "batch1_over_batch2": forward["batch1_ms"] / forward["batch2_ms"],
            "batch4_over_batch8": forward["batch4_ms"] / forward["batch8_ms"],
            "batch1_over_batch2_autotune": forward["batch1_autotune_ms"] / forward["batch2_autotune_ms"]}


def markdown(report: dict) -> str:
    lines = [f"# Adaptive Guidance and LinearAG (bench/adaptive_bench.py)", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"ComfyUI {report['comfyui']}.", ""]
    part = report.get("reference")
    if part:
        lines += [f"## Reference model: {part['images']} images per setting, euler, CFG scale {part['scale']:g}", "",
                  "Deviation columns compare each image with the CFG image of the same seed at "
                  f"{part['steps']} steps (PSNR on [-1, 1]; feature distance relative to the mean feature norm).", "",
                  "| setting | steps | NFE/image | NFE saved | ms/image | FD ↓ | precision | recall | class acc. | "
                  "PSNR vs CFG (dB) ↑ | feature dist. vs CFG ↓ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        base = part["rows"][0]["nfe_per_image"]
        for r in part["rows"]:
            psnr = "∞" if r.get("psnr_db", 0) >= 100 else f"{r.get('psnr_db', float('nan')):.2f}"
            lines.append(f"| {r['method']} | {r['steps']} | {r['nfe_per_image']:.2f} | "
                         f"{1 - r['nfe_per_image'] / base:.1%} | {r['ms_per_image']:.3f} | {r['fd']:.3f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} | {psnr} | "
                         f"{r.get('feature_distance_rel', float('nan')):.4f} |")
        lin = part["linear_ag"]
        lines += ["", f"LinearAG fit: {lin['fit_images']} images, {lin['fit_seconds']:.1f} s, estimated calls "
                  f"{lin['info']['estimated_calls']}, relative residual per call "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in lin["info"]["relative_residual"].items()), "",
                  "γ per call of the CFG runs (first batch), on the denoised predictions (the node's criterion "
                  "cond_cfg and the alternative cond_uncond) and, for comparison, on the noise directions:", "",
                  "| call | sigma | cos(D_c, D_cfg) mean | min | max | cos(D_c, D_u) mean | cos(ε_c, ε_cfg) mean |",
                  "|---|---|---|---|---|---|---|"]
        for g in part["gamma_per_call"]:
            lines.append(f"| {g['call']} | {g['sigma']:.3f} | {g['cond_cfg_mean']:.5f} | {g['cond_cfg_min']:.5f} | "
                         f"{g['cond_cfg_max']:.5f} | {g['cond_uncond_mean']:.6f} | {g['noise_cond_cfg_mean']:.6f} |")
    s = report.get("sdxl")
    if s:
        lines += ["", f"## SDXL-size UNet at 1024², {s['steps']} euler steps, switch after call "
                  f"{s['switch_after_call']}", "",
                  *[f"- {b.replace(' autotune', '')} image(s) per batch"
                    f"{', cuDNN autotuning (--fast autotune)' if r.get('cudnn_benchmark') else ''}: seconds per image CFG {r['seconds_per_image']['cfg']:.3f}, AG "
                    f"{r['seconds_per_image']['ag']:.3f}; UNet rows per image CFG {r['unet_rows_per_image']['cfg']:g}, "
                    f"AG {r['unet_rows_per_image']['ag']:g}; NFE saving {r['nfe_saving']:.1%}, time saving "
                    f"{r['time_saving']:.1%} (ratio {r['time_saving_over_nfe_saving']:.2f})"
                    for b, r in s["per_batch"].items()],
                  f"- one UNet forward: batch 2 {s['unet_forward']['batch2_ms']:.2f} ms, batch 1 "
                  f"{s['unet_forward']['batch1_ms']:.2f} ms (ratio {s['batch1_over_batch2']:.2f}); batch 8 {s['unet_forward']['batch8_ms']:.2f} ms, "
                  f"batch 4 {s['unet_forward']['batch4_ms']:.2f} ms (ratio {s['batch4_over_batch8']:.2f}); with "
                  f"cuDNN autotuning: batch 2 {s['unet_forward']['batch2_autotune_ms']:.2f} ms, batch 1 "
                  f"{s['unet_forward']['batch1_autotune_ms']:.2f} ms (ratio {s['batch1_over_batch2_autotune']:.2f})"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ref.run_record("bench/adaptive_bench.py", args, device)
    report["reference"] = reference_part(args, device)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    if not args.skip_sdxl and device.type == "cuda":
        rows = report["reference"]["rows"]
        default = next(r for r in rows if r.get("threshold") == 0.991 and not r.get("linear"))
        skipped_uncond = 2 * args.steps - default["nfe_per_image"]  # unconditional calls skipped per image
        switch_call = max(1, min(args.sdxl_steps, round(args.sdxl_steps - skipped_uncond * args.sdxl_steps /
                                                         args.steps)))
        report["sdxl"] = sdxl_part(args, switch_call)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
