"""CFG++ against CFG on the project's trained reference model: DDIM inversion and sample quality at matched guidance.

    python bench/cfgpp_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR [--commit SHA]
        [--lambdas 0.2,0.4,0.6,0.8,1.0] [--steps 50] [--scheduler ddim_uniform] [--images 1000] [--device cuda|cpu]

1. Inversion (the paper's Sec. on DDIM inversion and editing): held-out test images, each prompted with its own class,
   inverted with DDIM along the schedule and sampled back with the same prompt, schedule and guidance; MSE and PSNR
   of the reconstruction against the original in pixel space ([-1, 1], PSNR peak-to-peak 2).
2. Sample quality: DDIM sampling from the same noise and balanced classes, measured with bench/reference_eval.py's
   metrics (Fréchet distance, precision, recall, class accuracy, saturation in the evaluation classifier's space).

Matched guidance: a CFG++ DDIM step at λ is exactly a CFG DDIM step at ω_i = λ·ρ_i/(ρ_i − ρ_{i+1})
(`guiders/cfgpp.py`, `equivalent_cfg_scales`); CFG runs at their mean ω̄(λ) over the schedule ("cfg"), and at the
official README's rule of thumb ω = 1 + 11.5 λ (λ ∈ [0, 1] ~ ω ∈ [1, 12.5]; "cfg@readme"). All methods use the same
DDIM update, inversion step and model evaluations, differing only in the renoising prediction and the scale.

Writes cfgpp_bench.json (everything) and cfgpp_bench.md (the tables).
"""

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pack import import_pack  # noqa: E402  (bench/, the script's folder)
from reference.train import setup_comfyui, to_model_space  # noqa: E402

SAMPLE_COLUMNS = [("fd", "FD ↓", "{:.2f}"), ("precision", "precision ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
                  ("class_accuracy", "class acc. ↑", "{:.3f}"), ("saturation", "saturation", "{:.4f}"),
                  ("out_of_range", "out of [-1,1]", "{:.4f}")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI folder")
    p.add_argument("--data", required=True, help="folder for the Fashion-MNIST files (fetched if missing)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--commit", default="unknown", help="the repository commit, recorded in the results")
    p.add_argument("--lambdas", default="0.2,0.4,0.6,0.8,1.0", help="comma-separated CFG++ guidance values")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (the paper's inversion and T2I setting)")
    p.add_argument("--scheduler", default="ddim_uniform", help="ComfyUI scheduler (ddim_uniform: DDIM's timesteps)")
    p.add_argument("--images", type=int, default=1000, help="test images to invert (class-balanced)")
    p.add_argument("--per-class", type=int, default=100, help="generated images per class for sample quality")
    p.add_argument("--batch", type=int, default=500, help="images per sampling call")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of the image subsamples")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision and recall")
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only for a smoke test")
    return p.parse_args()


def class_prompts(tokens, labels):
    """(positive with one class per image, the empty-class negative) as ComfyUI CONDITIONING."""
    from reference.model import class_conditioning

    positive = [[torch.cat([class_conditioning(tokens, int(c))[0][0] for c in labels]), {}]]
    return positive, class_conditioning(tokens, None)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of per-image MSEs of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(4.0 / mse)


def invert_and_reconstruct(model, tokens, images, labels, sigmas, guidance, manifold_constrained, batch):
    """(reconstructions, inverted latents, seconds): inversion and sampling back with each image's own class."""
    from comfyui_guidance.nodes.cfgpp_patch import invert, sample_back

    recon, inverted, seconds = [], [], 0.0
    for start in range(0, len(labels), batch):
        positive, negative = class_prompts(tokens, labels[start : start + batch])
        latent = {"samples": images[start : start + batch]}
        began = time.perf_counter()
        noise = invert(model, positive, negative, latent, sigmas, guidance, manifold_constrained)
        back = sample_back(model, positive, negative, noise, sigmas, guidance, manifold_constrained)
        seconds += time.perf_counter() - began
        recon.append(back["samples"].float().cpu())
        inverted.append(noise["samples"].float().cpu())
    return torch.cat(recon), torch.cat(inverted), seconds


def inversion_row(method, guidance, cfg_scale, original, recon, inverted, seconds, sigma_max) -> dict:
    mse = (recon.clamp(-1, 1) - original).square().flatten(1).mean(1)
    return {"method": method, "lambda": guidance, "cfg": cfg_scale, "mse": float(mse.mean()),
            "psnr": float(psnr(mse).mean()), "psnr_median": float(psnr(mse).median()),
            "inverted_std_over_sigma": float(inverted.std() / sigma_max), "seconds": seconds}


def generate(model, tokens, labels, noise, sampler, cfg, sigmas, batch, seed):
    """Images [N, 3, H, W] (unclamped) from the same initial noise for every method, in batches."""
    import comfy.sample

    images = []
    for start in range(0, len(labels), batch):
        positive, negative = class_prompts(tokens, labels[start : start + batch])
        chunk = noise[start : start + len(positive[0][0])]
        images.append(comfy.sample.sample_custom(model, chunk, cfg, sampler, sigmas, positive, negative,
                                                 torch.zeros_like(chunk), seed=seed + start, disable_pbar=True))
    return torch.cat(images).float()


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        "# CFG++ against CFG on the reference model", "",
        f"`{report['command']}`", "",
        f"{report['device']}, {report['date']}, commit {report['commit']}, ComfyUI {report['comfyui']}, torch "
        f"{report['torch']}; DDIM, {a['steps']} steps, scheduler {a['scheduler']}. Each λ is compared with CFG at "
        "ω̄(λ), the mean over the schedule of the per-step CFG scales that equal CFG++ at λ (cfg), and at the "
        "official README's pairing ω = 1 + 11.5 λ (cfg@readme).", "",
        f"## DDIM inversion and reconstruction ({report['inversion_images']} held-out test images, own class as the "
        "prompt)", "",
        "| method | λ | cfg ω | MSE ↓ | PSNR dB ↑ | median PSNR | inverted std / σ_max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["inversion"]:
        lam = "" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['method']} | {lam} | {r['cfg']:.2f} | {r['mse']:.5f} | {r['psnr']:.2f} | "
                     f"{r['psnr_median']:.2f} | {r['inverted_std_over_sigma']:.3f} |")
    lines += ["", f"## Sample quality ({report['images_per_setting']} images per row, balanced classes, same noise)",
              "", "| method | λ | cfg ω | " + " | ".join(t for _, t, _ in SAMPLE_COLUMNS) + " |",
              "|---|---|---|" + "---|" * len(SAMPLE_COLUMNS)]
    for r in report["samples"]:
        lam = "" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['method']} | {lam} | {r['cfg']:.2f} | "
                     + " | ".join(f.format(r[k]) for k, _, f in SAMPLE_COLUMNS) + " |")
    train = report["reference"]["train_subsample"]
    lines.append("| real (train subsample) | | | " + " | ".join(f.format(train[k]) for k, _, f in SAMPLE_COLUMNS)
                 + " |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    lambdas = [float(s) for s in args.lambdas.split(",")]
    setup_comfyui(args.comfyui, args.device)
    import_pack()
    import comfy.samplers
    import comfyui_version
    from comfy.sample import prepare_noise

    import reference_eval
    from comfyui_guidance.guiders.cfgpp import equivalent_cfg_scales, readme_cfg_scale
    from comfyui_guidance.nodes.cfgpp_patch import cfgpp_sampler, sigma_space
    from reference.data import CLASS_NAMES, RESOLUTION, ensure_fashion_mnist, load_split

    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_folder = ensure_fashion_mnist(pathlib.Path(args.data))
    model, tokens = reference_eval.load_diffusion(args.weights)
    classifier = reference_eval.load_classifier(args.classifier, len(CLASS_NAMES), device)
    space = sigma_space(model)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), args.scheduler, args.steps)
    matched = {lam: float(equivalent_cfg_scales(lam, sigmas, space).mean()) for lam in lambdas}
    started = time.time()

    images, labels = (torch.from_numpy(a) for a in load_split(data_folder, "test"))
    pick = reference_eval.balanced_subsample(labels, args.images // len(CLASS_NAMES), args.seed)
    originals, original_labels = to_model_space(images[pick]), labels[pick]
    inversion = []
    def settings(lam):
        """(method, λ or None, CFG scale (1 for CFG++), guidance passed on, manifold-constrained) per row."""
        return [("cfg++", lam, 1.0, lam, True), ("cfg", None, matched[lam], matched[lam], False),
                ("cfg@readme", None, readme_cfg_scale(lam), readme_cfg_scale(lam), False)]

    for lam in lambdas:
        for method, shown_lambda, cfg, guidance, constrained in settings(lam):
            recon, inverted, seconds = invert_and_reconstruct(model, tokens, originals, original_labels, sigmas,
                                                              guidance, constrained, args.batch)
            row = inversion_row(method, shown_lambda, cfg, originals, recon, inverted, seconds, float(sigmas[0]))
            inversion.append(row)
            print(f"inversion {method:>10} λ={lam:<4g} ω={cfg:6.2f}  MSE {row['mse']:.5f}  PSNR {row['psnr']:6.2f}",
                  flush=True)

    real = reference_eval.RealReference(classifier, data_folder, args.per_class, args.seed, device)
    reference = reference_eval.real_reference_metrics(classifier, real, data_folder, args.per_class, args.seed,
                                                      args.k, device)
    gen_labels = reference_eval.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(gen_labels), 3, RESOLUTION, RESOLUTION), args.seed)
    samples = []
    plain_ddim = comfy.samplers.sampler_object("euler")  # core's DDIM is this Euler step
    for lam in lambdas:
        for method, shown_lambda, cfg, _, constrained in settings(lam):
            sampler = cfgpp_sampler("ddim", lam) if constrained else plain_ddim
            generated = generate(model, tokens, gen_labels, noise, sampler, cfg, sigmas, args.batch, args.seed)
            row = {"method": method, "lambda": shown_lambda, "cfg": cfg,
                   **reference_eval.evaluate(generated, gen_labels, classifier, real, args.k, device)}
            samples.append(row)
            print(f"samples   {method:>10} λ={lam:<4g} ω={cfg:6.2f}  FD {row['fd']:8.2f}  P {row['precision']:.3f}  "
                  f"R {row['recall']:.3f}  acc {row['class_accuracy']:.3f}", flush=True)

    report = {
        "bench": "bench/cfgpp_bench.py",
        "command": " ".join(["python", "bench/cfgpp_bench.py"] + sys.argv[1:]),
        "device": reference_eval.device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "torch": torch.__version__,
        "comfyui": comfyui_version.__version__,
        "weights": reference_eval.file_record(args.weights),
        "classifier": reference_eval.file_record(args.classifier),
        "args": vars(args),
        "sigmas": [float(s) for s in sigmas],
        "matched_cfg": {f"{lam:g}": matched[lam] for lam in lambdas},
        "equivalent_cfg_per_step": {f"{lam:g}": equivalent_cfg_scales(lam, sigmas, space).tolist() for lam in lambdas},
        "inversion_images": len(original_labels),
        "inversion": inversion,
        "images_per_setting": len(gen_labels),
        "samples": samples,
        "reference": reference,
        "total_seconds": time.time() - started,
    }
    if any(math.isnan(r["mse"]) for r in inversion):
        print("warning: NaN in the inversion results", flush=True)
    (out / "cfgpp_bench.json").write_text(json.dumps(report, indent=2))
    (out / "cfgpp_bench.md").write_text(markdown(report))
    print()
    print(markdown(report))


if __name__ == "__main__":
    main()
