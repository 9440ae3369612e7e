"""Adaptive Guidance's switching criterion on the reference model: ours against the public implementations'.

The criteria (guiders/adaptive.py): cond_cfg, cos(D_c, D_cfg) per image (the pack's default, at 0.991);
cond_uncond, cos(D_c, D_u) per image; cond_uncond_batch, cos(D_c, D_u) of the whole sampling batch at once, one
switch for the batch (asagi4/ComfyUI-Adaptive-Guidance and its fork, at 0.990; its decisions depend on --batch, the
images per sampling run). Each criterion at a sweep of thresholds, on the reference model (reference/model.py),
--per-class images per class, euler, --steps steps at --scale, the same initial noise for every setting, through
ComfyUI's sampling path (bench/reference_eval.py): the share of unconditional passes saved (from the UNet rows
counted), FD / precision / recall against the real test split and class accuracy under the guide classifier
(reference_eval's `evaluate`), class accuracy under the independent judge (reference/judge.py), and the PSNR to the
CFG image of the same seed. CFG at --steps is the baseline (0 saved). One plot: FD and judge accuracy against the
saved share, a line per criterion, each point labelled with its threshold.

    python bench/ag_criterion_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
    python bench/ag_criterion_bench.py ... --quick --device cpu   # a smoke test: a few images, steps, thresholds
    python bench/ag_criterion_bench.py ... --replot   # the plot from NAME.json, where matplotlib is installed

DATA_DIR holds the Fashion-MNIST files (t10k-*, train-*); writes NAME.json, NAME.md and NAME.png (--name, default
ag_criterion_bench) to OUT_DIR.
"""

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adaptive_bench import deviation, pack_modules  # noqa: E402  (stands in for matplotlib where it is missing)
from classifier_bench import accuracy  # noqa: E402
import reference_eval as ref  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402

THRESHOLDS = {
    "cond_cfg": "0.95,0.98,0.99,0.991,0.995,0.998,0.999",
    "cond_uncond": "0.9,0.95,0.97,0.98,0.99,0.995,0.999",
    "cond_uncond_batch": "0.9,0.95,0.97,0.98,0.99,0.995,0.999",
}
QUICK = {"per_class": 1, "steps": 6, "batch": 10, "thresholds": {k: "0.95,0.999" for k in THRESHOLDS}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=30)
    for criterion, default in THRESHOLDS.items():
        p.add_argument(f"--thresholds-{criterion.replace('_', '-')}", dest=f"thresholds_{criterion}", default=default)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500, help="images per sampling run (cond_uncond_batch decides per run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke test: " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items() if k != "thresholds") + ", two thresholds per criterion")
    p.add_argument("--name", default="ag_criterion_bench")
    p.add_argument("--replot", action="store_true", help="only draw the plot from OUT/NAME.json (where the machine "
                   "that ran the bench lacked matplotlib)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    p.add_argument("--judge", default=str(ROOT / "reference" / "weights" / "fashion_judge.safetensors"))
    args = p.parse_args()
    if args.quick:
        args.per_class, args.steps, args.batch = QUICK["per_class"], QUICK["steps"], QUICK["batch"]
    args.thresholds = {c: [float(t) for t in (QUICK["thresholds"][c] if args.quick else
                                              getattr(args, f"thresholds_{c}")).split(",")] for c in THRESHOLDS}
    args.sampler, args.scheduler = "euler", "normal"
    return args


def reference_part(args, device) -> dict:
    from comfy.sample import prepare_noise

    from reference.data import CLASS_NAMES, RESOLUTION, ensure_fashion_mnist
    from reference.judge import load_judge

    adaptive, patch, _ = pack_modules()
    model, tokens = ref.load_diffusion(args.weights)
    classifier = ref.load_classifier(args.classifier, len(CLASS_NAMES), device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(classifier, ensure_fashion_mnist(pathlib.Path(args.data)), args.per_class, 0, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    w = args.scale
    # every batch shape the UNet will see (cond + uncond, cond only, subsets) once, out of the measured runs
    ref.sample(ref.Setup(patch.apply_ag(model, adaptive.AGConfig(0.99)), w), tokens, labels, noise, args, steps=3)

    def measure(name, setup, extra, baseline=None):
        counted, counter = ref.with_counter(setup)
        images, seconds = ref.sample(counted, tokens, labels, noise, args)
        nfe = counter.rows / len(labels)
        row = {"method": name, **extra, **ref.evaluate(images, labels, classifier, real, args.k, device),
               "judge_accuracy": accuracy(judge, images, labels, device), "nfe_per_image": nfe,
               "saved_uncond_share": (2 * args.steps - nfe) / args.steps, "seconds": seconds}
        row.update(deviation(images, images if baseline is None else baseline, classifier, device))
        print(f"{name:>30}  saved {row['saved_uncond_share']:6.1%}  FD {row['fd']:7.3f}  "
              f"acc {row['class_accuracy']:.3f}/{row['judge_accuracy']:.3f}  PSNR {row['psnr_db']:6.2f}", flush=True)
        return row, images

    cfg_row, cfg_images = measure("cfg", ref.Setup(model, w), {"criterion": None, "threshold": None})
    rows = [cfg_row]
    for criterion, thresholds in args.thresholds.items():
        for threshold in thresholds:
            setup = ref.Setup(patch.apply_ag(model, adaptive.AGConfig(threshold, criterion)), w)
            row, _ = measure(f"ag {criterion} γ̄={threshold:g}", setup,
                             {"criterion": criterion, "threshold": threshold}, cfg_images)
            rows.append(row)
    return {"scale": w, "steps": args.steps, "images": len(labels), "batch": args.batch, "rows": rows}


def plot(report: dict, path: pathlib.Path) -> bool:
    """FD and judge accuracy against the saved share of unconditional passes, one line per criterion; False where
    matplotlib is missing."""
    import matplotlib  # adaptive_bench leaves a stand-in without a file where the package is missing

    if getattr(matplotlib, "__file__", None) is None:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["reference"]["rows"]
    cfg = next(r for r in rows if r["criterion"] is None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "fd", "FD ↓"), (axes[1], "judge_accuracy", "class accuracy (judge) ↑")):
        ax.axhline(cfg[key], color="grey", linestyle=":", label="CFG")
        for criterion in THRESHOLDS:
            points = sorted((r for r in rows if r["criterion"] == criterion), key=lambda r: r["saved_uncond_share"])
            xs, ys = [100 * r["saved_uncond_share"] for r in points], [r[key] for r in points]
            ax.plot(xs, ys, marker="o", label=criterion)
            for r, x, y in zip(points, xs, ys):
                ax.annotate(f"{r['threshold']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("unconditional passes saved (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"AG criteria on the reference model: w = {report['reference']['scale']:g}, "
                 f"{report['reference']['steps']} euler steps, {report['reference']['images']} images, "
                 f"batch {report['reference']['batch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def markdown(report: dict) -> str:
    r = report["reference"]
    lines = [f"# AG criteria on the reference model ({report['device']}, commit {report['commit']})", "",
             f"w = {r['scale']:g}, {r['steps']} euler steps, {r['images']} images, batch {r['batch']} "
             "(cond_uncond_batch decides once per batch). Saved: the share of unconditional passes not computed.", "",
             "| criterion | γ̄ | saved | FD | precision | recall | acc. (guide) | acc. (judge) | PSNR to CFG (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        threshold = "" if row["threshold"] is None else f"{row['threshold']:g}"
        lines.append(f"| {row['criterion'] or 'CFG'} | {threshold} "
                     f"| {row['saved_uncond_share']:.1%} | {row['fd']:.3f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['class_accuracy']:.3f} | {row['judge_accuracy']:.3f} | "
                     f"{row['psnr_db']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    out = pathlib.Path(args.out)
    if args.replot:
        drawn = plot(json.loads((out / f"{args.name}.json").read_text()), out / f"{args.name}.png")
        print("plotted" if drawn else "matplotlib is missing: no plot")
        return
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    report = ref.run_record("bench/ag_criterion_bench.py", args, device)
    report["reference"] = reference_part(args, device)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(report))
    if not plot(report, out / f"{args.name}.png"):
        print("matplotlib is missing: no plot")
    print(markdown(report))


if __name__ == "__main__":
    main()
