"""Guidance per region on the GPU: does a saliency mask move each region as intended, and what does it cost.

Part 1, the reference model (reference/model.py), --per-class images per class, euler, --steps steps, the same
initial noise for every setting, through ComfyUI's sampling path as in bench/reference_eval.py. Markers: a disc at
the image centre (Fashion-MNIST's garments are centred), made into a map by guiders/saliency.py's `saliency_map`
(radius 0.25, softness 0.05 of the side) with a background level b chosen so that, outside the garment, guidance at
--high acts as guidance at --low: with the map m, the node's update is scaled by m, so b = (low − 1)/(high − 1).
For CFG (APG with η 1, r 0, β 0, which is CFG exactly) and for APG (bench/reference_eval.py's apg_r2.5): the unmasked
run at --low, the unmasked run at --high, and the masked run at --high. Per region (inside: map ≥ 0.95; outside:
map ≤ 0.05; per pixel), the pixel metrics of the APG paper's symptoms (bench/metrics.py: overshoot past [-1, 1], the
fraction out of range) and the contrast (standard deviation of the pixel values in the region, over all images);
for the whole image FD / precision / recall / class accuracy (guide and independent judge). The intended movement:
the masked run's inside follows the --high run's, its outside the --low run's.

Part 2, the cost on an SDXL-size latent (bench/apg_bench.py's `build_sdxl`, 1024², one image, CFG batch 2): one CFG
step (UNet call and combination) against the mask path the nodes add per step (`latent_weights` of a 1024² mask to
the 128² latent, and the `torch.lerp`), interleaved CUDA timings; and the one-off cost of a 1024² saliency map on
the GPU.

    python bench/mask_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA

DATA_DIR needs the Fashion-MNIST test split files (t10k-*); writes NAME.json and NAME.md (--name, default
mask_bench).
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# classifier_bench, as adaptive_bench, stands in for matplotlib (which reference_eval imports) where it is missing
from classifier_bench import accuracy  # noqa: E402
import metrics  # noqa: E402
import reference_eval as ref  # noqa: E402
from pack import import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402

DISC = 7  # pixels: the marker region, a disc at the centre of the 32×32 image, over the garment's middle
RADIUS, SOFTNESS = 0.25, 0.05
# Regions measured: the core (map ≥ CORE, guided at the full weight) and the background (map ≤ 1 − CORE, at the
# background weight); the transition between them is left out.
CORE = 0.95


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--high", type=float, default=12.0, help="guidance scale inside the region")
    p.add_argument("--low", type=float, default=3.0, help="guidance scale the background should get")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--name", default="mask_bench")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--judge", default=str(ROOT / "reference" / "weights" / "fashion_judge.safetensors"))
    args = p.parse_args()
    args.sampler, args.scheduler = "euler", "normal"
    return args


def region_metrics(images: torch.Tensor, region: torch.Tensor) -> dict:
    """Pixel metrics of `images` [N, 3, H, W] over the pixels where `region` [H, W] is true."""
    values = images.permute(1, 0, 2, 3)[:, :, region]  # [3, N, pixels]
    return {"overshoot": metrics.overshoot(values), "out_of_range": metrics.out_of_range_fraction(values),
            "contrast": float(values.double().std())}


def reference_part(args, device) -> dict:
    from comfy.sample import prepare_noise

    from reference.judge import load_judge

    import_pack()
    from comfyui_guidance.guiders.apg import APGConfig
    from comfyui_guidance.guiders.saliency import saliency_map
    from comfyui_guidance.nodes.apg_patch import apply_apg

    model, tokens = ref.load_diffusion(args.weights)
    guide = ref.load_classifier(ROOT / "reference" / "weights" / "fashion_classifier.safetensors", len(CLASS_NAMES),
                                device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(guide, pathlib.Path(args.data), args.per_class, 0, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)

    grid = torch.arange(RESOLUTION) - (RESOLUTION - 1) / 2
    markers = (grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2 <= DISC ** 2).unsqueeze(0)
    smap = saliency_map(markers, RADIUS * RESOLUTION, SOFTNESS * RESOLUTION)[0]
    background = (args.low - 1) / (args.high - 1)
    mask = background + (1 - background) * smap  # what Saliency Map From Markers gives with this background
    regions = {"inside": smap >= CORE, "outside": smap <= 1 - CORE}

    configs = {"CFG": APGConfig(eta=1.0, norm_threshold=0.0, momentum=0.0),  # exactly CFG (tests/test_apg_math.py)
               "APG r2.5": APGConfig(eta=0.0, norm_threshold=2.5, momentum=-0.75)}
    rows = []
    for method, config in configs.items():
        runs = ((f"{method} {args.low:g}", args.low, None), (f"{method} {args.high:g}", args.high, None),
                (f"{method} {args.high:g} masked", args.high, mask.unsqueeze(0)))
        for name, w, weights in runs:
            setup = ref.Setup(apply_apg(model, config, weights), w)
            ref.sample(setup, tokens, labels, noise, args, steps=2)  # warm-up
            images, seconds = ref.sample(setup, tokens, labels, noise, args)
            row = {"setting": name, "method": method, "cfg": w, "masked": weights is not None,
                   **ref.evaluate(images, labels, guide, real, args.k, device),
                   "judge_accuracy": accuracy(judge, images, labels, device),
                   "ms_per_image": 1000 * seconds / len(labels)}
            for region, where in regions.items():
                row[region] = region_metrics(images, where)
            rows.append(row)
            print(f"{name:>20}  FD {row['fd']:.3f}  inside {row['inside']}  outside {row['outside']}", flush=True)
    return {"images": len(labels), "steps": args.steps, "sampler": args.sampler, "high": args.high, "low": args.low,
            "background": background, "radius": RADIUS, "softness": SOFTNESS,
            "disc": DISC, "inside_pixels": int(regions["inside"].sum()),
            "outside_pixels": int(regions["outside"].sum()),
            "configs": {k: dataclasses.asdict(v) for k, v in configs.items()},
            "rows": rows, "movement": movement(rows, args)}


def movement(rows: list, args) -> dict:
    """For each method and region metric: is the masked run's inside nearer the --high run's than the --low run's,
    and its outside nearer the --low run's?"""
    by = {r["setting"]: r for r in rows}
    out = {}
    for method in sorted({r["method"] for r in rows}):
        low, high, masked = (by[f"{method} {args.low:g}"], by[f"{method} {args.high:g}"],
                             by[f"{method} {args.high:g} masked"])
        for region, target, other in (("inside", high, low), ("outside", low, high)):
            for metric in ("overshoot", "out_of_range", "contrast"):
                value = masked[region][metric]
                nearer = abs(value - target[region][metric]) < abs(value - other[region][metric])
                out[f"{method} {region} {metric}"] = {"masked": value, "target": target[region][metric],
                                                     "other": other[region][metric], "as_intended": nearer}
    return out


def sdxl_part(args) -> dict:
    from apg_bench import build_sdxl, interleaved_ms

    import_pack()
    from comfyui_guidance.guiders.saliency import latent_weights, markers_from_points, saliency_map

    model = build_sdxl(args.comfyui)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 128, 128, device="cuda", generator=g) * 14.6
    sigma = torch.full((2,), 14.6, device="cuda")
    context = torch.randn(2, 77, 2048, device="cuda", generator=g, dtype=torch.float16)
    y = torch.randn(2, 2816, device="cuda", generator=g, dtype=torch.float16)
    markers = markers_from_points([(512, 512), (512, 700)], 1024, 1024).unsqueeze(0).cuda()
    torch.cuda.synchronize()
    began = time.perf_counter()
    mask = saliency_map(markers, 0.3 * 1024, 0.08 * 1024)
    torch.cuda.synchronize()
    map_ms = 1000 * (time.perf_counter() - began)

    def denoised():
        return model.apply_model(x, sigma, c_crossattn=context, y=y).chunk(2)

    with torch.no_grad():
        cond, uncond = denoised()
        guided = uncond + 5.0 * (cond - uncond)
        steps = interleaved_ms({"cfg_step": lambda: (lambda c, u: u + 5.0 * (c - u))(*denoised())})
        ops = interleaved_ms({
            "mask_path": lambda: torch.lerp(cond, guided, latent_weights(mask, guided, "bench")),
            "weights_only": lambda: latent_weights(mask, guided, "bench"),
        }, rounds=200)
    return {"model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
            "latent": [1, 4, 128, 128], "cfg_batch": 2, "mask": [1, 1024, 1024], "step_ms": steps, "mask_ms": ops,
            "mask_path_fraction_of_step": ops["mask_path"] / steps["cfg_step"], "saliency_map_1024_ms": map_ms}


def markdown(report: dict) -> str:
    part = report["reference"]
    lines = ["# Guidance per region (bench/mask_bench.py)", "", f"`{report['command']}`", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}.", "",
             f"## Reference model: {part['images']} images per setting, {part['sampler']}, {part['steps']} steps", "",
             f"Mask: markers on a disc of {part['disc']} pixels at the image centre, radius {part['radius']} and "
             f"softness {part['softness']} of the side, background {part['background']:.4f} = ({part['low']:g} − 1)/({part['high']:g} − 1), so that "
             f"the background of a run at {part['high']:g} is guided as at {part['low']:g}. Inside: map ≥ {CORE} "
             f"({part['inside_pixels']} pixels), outside: map ≤ {1 - CORE:g} ({part['outside_pixels']} pixels) of "
             f"{RESOLUTION ** 2}. CFG is APG with "
             "η 1, r 0, β 0 (CFG exactly).", "",
             "| setting | FD | precision | recall | acc. (guide) | acc. (judge) | inside overshoot | inside out of "
             "range | inside contrast | outside overshoot | outside out of range | outside contrast |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        i, o = r["inside"], r["outside"]
        lines.append(f"| {r['setting']} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_accuracy']:.3f} | {r['judge_accuracy']:.3f} | {i['overshoot']:.5f} | "
                     f"{i['out_of_range']:.4f} | {i['contrast']:.4f} | {o['overshoot']:.5f} | "
                     f"{o['out_of_range']:.4f} | {o['contrast']:.4f} |")
    lines += ["", "Movement as intended (the masked run's region nearer its target run than the other run):", ""]
    for key, v in part["movement"].items():
        lines.append(f"- {key}: {'yes' if v['as_intended'] else '**no**'} (masked {v['masked']:.5f}, target "
                     f"{v['target']:.5f}, other {v['other']:.5f})")
    s = report.get("sdxl")
    if s:
        lines += ["", "## Cost of the mask path at 1024² (SDXL-size latent)", "",
                  f"{s['model']}; latent {s['latent']}, CFG batch {s['cfg_batch']}, mask {s['mask']}. Interleaved "
                  "CUDA timings (bench/apg_bench.py's interleaved_ms).", "",
                  f"- CFG step: {s['step_ms']['cfg_step']:.3f} ms",
                  f"- mask path per step (resize the mask to the latent + lerp): {s['mask_ms']['mask_path']:.4f} ms "
                  f"({s['mask_path_fraction_of_step']:.3%} of the step; the resize alone "
                  f"{s['mask_ms']['weights_only']:.4f} ms)",
                  f"- the 1024² saliency map itself, once per prompt: {s['saliency_map_1024_ms']:.1f} ms"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ref.run_record("bench/mask_bench.py", args, device)
    report["reference"] = reference_part(args, device)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))  # kept if part 2 fails
    if not args.skip_sdxl and device.type == "cuda":
        report["sdxl"] = sdxl_part(args)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
