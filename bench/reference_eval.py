"""Guidance methods on the project's trained reference model: sample quality against guidance scale.

Samples the class-conditional reference model (reference/model.py) through ComfyUI's own sampling path
(`comfy.sample.sample`) with every guidance method at several guidance scales, the same initial noise and the same
balanced classes for every method, and measures in the feature space of the evaluation classifier
(reference/classifier.py) Fréchet distance to the real test split, k-NN precision and recall and class accuracy; in
pixels, colour saturation and chroma, the fraction of pixel values outside [-1, 1] and the mean overshoot past it;
and the model evaluations and wall time per image. bench/metrics.py defines each metric.

    python bench/reference_eval.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR [--commit SHA]
        [--scales 1,1.5,2,3,4,6,8,12] [--per-class 100] [--steps 30] [--device cuda|cpu]

Writes reference_eval.json (everything), reference_eval.md (the table), reference_eval.png (each metric against the
guidance scale) and reference_samples.png (one image per class for each method at guidance scales 1, 3 and 8).
"""

import argparse
import datetime
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402  (bench/, the script's folder)
from pack import import_pack  # noqa: E402
from reference.classifier import load_classifier  # noqa: E402,F401  (also used by the other benches as ref.load_classifier)
from reference.train import setup_comfyui, to_model_space  # noqa: E402

GRID_SCALES = (1.0, 3.0, 8.0)
GRID_UPSCALE = 4
# (key, column header, format, whether real images have a value to compare with)
COLUMNS = [
    ("fd", "FD ↓", "{:.2f}", True),
    ("precision", "precision ↑", "{:.3f}", True),
    ("recall", "recall ↑", "{:.3f}", True),
    ("class_accuracy", "class acc. ↑", "{:.3f}", True),
    ("saturation", "saturation", "{:.4f}", True),
    ("chroma", "chroma", "{:.4f}", True),
    ("out_of_range", "out of [-1,1]", "{:.4f}", True),
    ("overshoot", "overshoot", "{:.4f}", True),
    ("nfe_per_image", "NFE/image", "{:.1f}", False),
    ("ms_per_image", "ms/image", "{:.2f}", False),
]


class Setup(NamedTuple):
    """How a method samples at one guidance scale: the (patched) ModelPatcher, ComfyUI's `cfg` for it, and, for a
    method that is a sampler (CFG++), the ComfyUI SAMPLER object that replaces --sampler."""

    model: Any
    cfg: float
    sampler: Any = None


def guidance_methods() -> dict:
    """Method name → function (ModelPatcher, guidance scale w) → Setup. A new method is one line here."""
    import_pack()
    from comfyui_guidance.guiders.apg import APGConfig
    from comfyui_guidance.guiders.pag import PAGConfig
    from comfyui_guidance.nodes.apg_patch import apply_apg
    from comfyui_guidance.nodes.pag_patch import apply_pag

    edm2 = APGConfig(eta=0.0, norm_threshold=2.5, momentum=-0.75)  # the paper's EDM2 ablation values
    return {
        "cfg": lambda model, w: Setup(model, w),
        "apg": lambda model, w: Setup(apply_apg(model, APGConfig()), w),  # the node's defaults: η 0, r 15, β −0.5
        "apg_r2.5": lambda model, w: Setup(apply_apg(model, edm2), w),
        # the node's defaults: s 3 on the middle block; at w = 1 this is PAG alone
        "pag": lambda model, w: Setup(apply_pag(model, PAGConfig(), "auto"), w),
    }


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI folder")
    p.add_argument("--data", required=True, help="folder for the Fashion-MNIST files (fetched if missing)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--commit", default="unknown", help="the repository commit, recorded in the results")
    p.add_argument("--scales", default="1,1.5,2,3,4,6,8,12", help="comma-separated guidance scales")
    p.add_argument("--per-class", type=int, default=100, help="images per class for each method and scale")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--batch", type=int, default=500, help="images per sampling call")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (the same noise for every method and scale)")
    p.add_argument("--real-seed", type=int, default=0, help="seed of the real-image subsamples")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision and recall")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only for a smoke test")
    return p.parse_args()


def file_record(path: str) -> dict:
    """Path, SHA-256 and safetensors metadata of a weights file, so a result names the weights that made it."""
    from safetensors import safe_open

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: make it with reference/train.py or pass its path")

    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    return {"path": path, "sha256": hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest(), "metadata": metadata}


def load_diffusion(path: str):
    """(ModelPatcher, class tokens) of the reference model, checked to use the data's class order."""
    import comfy.utils

    from reference.data import CLASS_NAMES
    from reference.model import load_reference

    state_dict, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    names = (metadata or {}).get("class_names", "").split(",")
    if names != CLASS_NAMES:
        raise ValueError(f"{path} was trained on classes {names}, expected {CLASS_NAMES}")
    return load_reference(state_dict, names)


@torch.no_grad()
def classify(classifier, images: torch.Tensor, device: torch.device, batch: int = 1000):
    """(penultimate features, logits) on the CPU of images in [-1, 1], clamped first as any viewer would show them."""
    features, logits = [], []
    for chunk in images.split(batch):
        f = classifier.features(chunk.to(device).float().clamp(-1, 1))
        features.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(features), torch.cat(logits)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0, 1, …, C−1, 0, 1, …: every sampling batch holds the classes in equal shares."""
    return torch.arange(num_classes).repeat(per_class)


def balanced_subsample(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` random items of every class, the class mix of the generated set."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {int(c)} has {len(members)} real images, fewer than --per-class {per_class}")
        picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(picks)


class RealReference:
    """Classifier features of the real test split (all of them for the Fréchet distance; a class-balanced subsample
    the size of a generated set for precision and recall, since k-NN radii depend on the set size)."""

    def __init__(self, classifier, data_folder: pathlib.Path, per_class: int, seed: int, device: torch.device):
        from reference.data import load_split

        images, labels = (torch.from_numpy(a) for a in load_split(data_folder, "test"))
        self.images = to_model_space(images)
        self.labels = labels
        self.features, logits = classify(classifier, self.images, device)
        self.test_accuracy = float((logits.argmax(1) == labels).double().mean())
        self.subsample = self.features[balanced_subsample(labels, per_class, seed)]


def evaluate(images: torch.Tensor, labels: torch.Tensor, classifier, real: RealReference, k: int, device) -> dict:
    """Every image metric of one set of images with the classes they were asked for."""
    features, logits = classify(classifier, images, device)
    return {
        "fd": metrics.frechet_distance(features, real.features),
        **metrics.precision_recall(real.subsample, features, k),
        "class_accuracy": float((logits.argmax(1) == labels).double().mean()),
        "saturation": metrics.hsv_saturation(images),
        "chroma": metrics.chroma(images),
        "out_of_range": metrics.out_of_range_fraction(images),
        "overshoot": metrics.overshoot(images),
    }


def real_reference_metrics(classifier, real: RealReference, data_folder, per_class, seed, k, device) -> dict:
    """The metrics of real images in place of generated ones: a class-balanced subsample of the train split, the
    size of a generated set, gives the best value each metric can reach at this sample size (FD is biased upwards
    by small sets); the whole test split gives saturation, chroma and classifier accuracy of the data itself."""
    from reference.data import load_split

    images, labels = (torch.from_numpy(a) for a in load_split(data_folder, "train"))
    pick = balanced_subsample(labels, per_class, seed + 1)
    return {
        "train_subsample": evaluate(to_model_space(images[pick]), labels[pick], classifier, real, k, device),
        "test": {
            "images": len(real.labels),
            "class_accuracy": real.test_accuracy,
            "saturation": metrics.hsv_saturation(real.images),
            "chroma": metrics.chroma(real.images),
            "out_of_range": metrics.out_of_range_fraction(real.images),
            "overshoot": metrics.overshoot(real.images),
        },
    }


class RowCounter:
    """ComfyUI UNet function wrapper that counts the batch rows the UNet processes. ComfyUI batches the conditional
    and unconditional passes (and any extra pass a method adds) into UNet calls, so rows / images is the number of
    model evaluations per image. A wrapper the method had set already is kept and called."""

    def __init__(self, inner=None):
        self.inner = inner
        self.rows = 0

    def __call__(self, apply_model, args: dict):
        self.rows += args["input"].shape[0]
        if self.inner is not None:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])


def with_counter(setup: Setup) -> tuple[Setup, RowCounter]:
    """(the setup with a clone of its ModelPatcher that has a RowCounter as UNet function wrapper, the counter)."""
    counter = RowCounter(setup.model.model_options.get("model_function_wrapper"))
    counted = setup.model.clone()
    counted.set_model_unet_function_wrapper(counter)
    return setup._replace(model=counted), counter


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sampling_call(setup: Setup, steps: int, args):
    """ComfyUI's sampling entry point for a setup, as f(noise, positive, negative, seed): `comfy.sample.sample` with
    --sampler by name (what the KSampler node calls) or, for a method that brings its own SAMPLER,
    `comfy.sample.sample_custom` on the sigmas of --scheduler (what the SamplerCustom node calls)."""
    import comfy.sample
    import comfy.samplers

    if setup.sampler is None:
        return lambda noise, positive, negative, seed: comfy.sample.sample(
            setup.model, noise, steps, setup.cfg, args.sampler, args.scheduler, positive, negative,
            torch.zeros_like(noise), seed=seed, disable_pbar=True)
    sigmas = comfy.samplers.calculate_sigmas(setup.model.get_model_object("model_sampling"), args.scheduler, steps)
    return lambda noise, positive, negative, seed: comfy.sample.sample_custom(
        setup.model, noise, setup.cfg, setup.sampler, sigmas, positive, negative, torch.zeros_like(noise), seed=seed,
        disable_pbar=True)


def sample(setup: Setup, tokens, labels, noise, args, steps=None):
    """(images [N, 3, H, W] unclamped, seconds) from ComfyUI's sampling path, in batches of --batch images.

    Image i starts from noise[i] and is conditioned on class labels[i] (a conditioning tensor with one row per image);
    the negative is the empty class. Each batch passes its own seed to the sampler, for samplers that add noise.
    """
    from reference.model import class_conditioning

    device = torch.device(args.device)
    run = sampling_call(setup, steps or args.steps, args)
    negative = class_conditioning(tokens, None)
    images, seconds = [], 0.0
    for start in range(0, len(labels), args.batch):
        batch_labels = labels[start : start + args.batch]
        positive = [[torch.cat([class_conditioning(tokens, int(c))[0][0] for c in batch_labels]), {}]]
        batch_noise = noise[start : start + len(batch_labels)]
        synchronize(device)
        began = time.perf_counter()
        images.append(run(batch_noise, positive, negative, args.seed + start))
        synchronize(device)
        seconds += time.perf_counter() - began
    return torch.cat(images).float(), seconds


def warm_up(methods: dict, model, tokens, labels, noise, scales: list[float], args):
    """Short sampling runs (2 steps, every batch) of each method at the lowest and highest scale before anything is
    timed, so that model loading, kernel selection and allocator growth for every batch shape the UNet will see
    (cond only at w = 1, cond + uncond above; a last, smaller batch) stay out of the per-image times."""
    for method in methods.values():
        for scale in sorted({min(scales), max(scales)}):
            sample(method(model, scale), tokens, labels, noise, args, steps=2)


def grid_scales(scales: list[float]) -> list[float]:
    """The sampled scales nearest to 1, 3 and 8, without repeats."""
    return sorted({min(scales, key=lambda s: abs(s - target)) for target in GRID_SCALES})


def first_of_each_class(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.stack([images[torch.nonzero(labels == c)[0, 0]] for c in range(num_classes)])


def run(args, methods, model, tokens, classifier, real) -> tuple[list, dict]:
    """(results, {(scale, method): one image per class}) over every scale and method: methods alternate within each
    scale, so slow drift of the machine does not favour one method's times."""
    from comfy.sample import prepare_noise

    from reference.data import RESOLUTION

    device = torch.device(args.device)
    num_classes = tokens.shape[0] - 1
    labels = balanced_labels(num_classes, args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    warm_up(methods, model, tokens, labels, noise, args.scales, args)
    shown = grid_scales(args.scales)
    results, grid = [], {}
    for scale in args.scales:
        for name, method in methods.items():
            setup, counter = with_counter(method(model, scale))
            images, seconds = sample(setup, tokens, labels, noise, args)
            row = {"method": name, "scale": scale,
                   **evaluate(images, labels, classifier, real, args.k, device),
                   "nfe_per_image": counter.rows / len(labels),
                   "ms_per_image": 1000 * seconds / len(labels), "seconds": seconds}
            results.append(row)
            if scale in shown:
                grid[(scale, name)] = first_of_each_class(images, labels, num_classes)
            print(f"{name:>10}  w={scale:<5g} {seconds:7.1f}s  FD {row['fd']:8.2f}  P {row['precision']:.3f}  "
                  f"R {row['recall']:.3f}  acc {row['class_accuracy']:.3f}  NFE {row['nfe_per_image']:.1f}", flush=True)
    return results, grid


def markdown_table(results: list, reference: dict) -> str:
    header = ["method", "w"] + [title for _, title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [row["method"], f"{row['scale']:g}"] + [fmt.format(row[key]) for key, _, fmt, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    train = reference["train_subsample"]
    cells = ["real (train subsample)", ""] + [fmt.format(train[key]) if real else "" for key, _, fmt, real in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: pathlib.Path, report: dict):
    test = report["reference"]["test"]
    text = [
        "# Guidance methods on the reference model",
        "",
        f"`{report['command']}`",
        "",
        f"{report['device']}, {report['date']}, commit {report['commit']}, UNet {report['unet_dtype']}; "
        f"{report['images_per_setting']} images per method and scale ({report['args']['per_class']} per class), "
        f"{report['args']['sampler']}/{report['args']['scheduler']}, {report['args']['steps']} steps, noise seed "
        f"{report['seeds']['noise']}.",
        "",
        markdown_table(report["results"], report["reference"]),
        "",
        f"Real test split ({test['images']} images): classifier accuracy {test['class_accuracy']:.4f}, saturation "
        f"{test['saturation']:.4f}, chroma {test['chroma']:.4f}, out of [-1,1] {test['out_of_range']:.4f}, "
        f"overshoot {test['overshoot']:.4f}.",
        "",
        "FD, precision and recall are measured in the evaluation classifier's 256-d penultimate features against the "
        "real test split (FD: all of it; precision/recall: a class-balanced subsample of the generated set's size, "
        f"k = {report['args']['k']}). The real-train row is the same measurement of real images: the best reachable "
        "at this sample size.",
        "",
    ]
    path.write_text("\n".join(text))


def plot_metrics(path: pathlib.Path, results: list, reference: dict, methods: list[str]):
    """One subplot per metric against the guidance scale (log axis), one line per method, real images dashed."""
    cols = 5
    rows = -(-len(COLUMNS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title, _, has_real) in zip(axes.flat, COLUMNS):
        for method in methods:
            points = [(r["scale"], r[key]) for r in results if r["method"] == method]
            ax.plot(*zip(*points), marker="o", label=method)
        if has_real:
            ax.axhline(reference["train_subsample"][key], color="gray", linestyle="--", label="real (train subsample)")
        scales = sorted({r["scale"] for r in results})
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("guidance scale w")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(COLUMNS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(path: pathlib.Path, grid: dict, class_names: list[str]):
    """Rows of one image per class for each (scale, method) in the order sampled, upscaled ×4 nearest, labelled."""
    keys = list(grid)
    rows = [torch.cat(list(grid[key]), dim=2) for key in keys]  # [3, H, classes·W] each
    image = metrics.to_unit_rgb(torch.cat(rows, dim=1))
    image = image.repeat_interleave(GRID_UPSCALE, 1).repeat_interleave(GRID_UPSCALE, 2).permute(1, 2, 0).numpy()
    cell = image.shape[0] / len(keys)
    dpi = 100
    fig = plt.figure(figsize=(image.shape[1] / dpi, image.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])  # the image fills the figure pixel for pixel; labels widen the saved canvas
    ax.imshow(image, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * cell for i in range(len(keys))], [f"{m}  w={s:g}" for s, m in keys])
    ax.set_xticks([(i + 0.5) * cell for i in range(len(class_names))], class_names, fontsize=8)
    ax.xaxis.tick_top()
    for i in range(1, len(keys)):
        if keys[i][0] != keys[i - 1][0]:
            ax.axhline(i * cell - 0.5, color="red", linewidth=1.5)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def run_record(script: str, args, device: torch.device) -> dict:
    """The header of a bench's report: which bench, the command line, device, date, commit, torch and ComfyUI
    versions, and its arguments (ComfyUI must be set up first)."""
    import comfyui_version

    return {"bench": script, "command": " ".join(["python", script] + sys.argv[1:]), "device": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": args.commit, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
            "args": vars(args)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main():
    args = parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]
    setup_comfyui(args.comfyui, args.device)
    import comfyui_version

    from reference.data import CLASS_NAMES, ensure_fashion_mnist

    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = guidance_methods()
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    weights = {"diffusion": file_record(args.weights), "classifier": file_record(args.classifier)}
    data_folder = ensure_fashion_mnist(pathlib.Path(args.data))
    model, tokens = load_diffusion(args.weights)
    classifier = load_classifier(args.classifier, len(CLASS_NAMES), device)
    began = time.time()
    real = RealReference(classifier, data_folder, args.per_class, args.real_seed, device)
    reference = real_reference_metrics(classifier, real, data_folder, args.per_class, args.real_seed, args.k, device)
    floor = reference["train_subsample"]
    print(f"real reference {time.time() - began:.1f}s: test accuracy {real.test_accuracy:.4f}, train subsample FD "
          f"{floor['fd']:.2f} P {floor['precision']:.3f} R {floor['recall']:.3f}", flush=True)
    started = time.time()
    results, grid = run(args, methods, model, tokens, classifier, real)
    report = {
        "bench": "bench/reference_eval.py",
        "command": " ".join(["python", "bench/reference_eval.py"] + sys.argv[1:]),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "torch": torch.__version__,
        "comfyui": comfyui_version.__version__,
        "unet_dtype": str(model.model.get_dtype()),
        "weights": weights,
        "seeds": {"noise": args.seed, "real_subsample": args.real_seed, "train_subsample": args.real_seed + 1,
                  "sampler": f"{args.seed} + index of the batch's first image"},
        "args": vars(args),
        "classes": CLASS_NAMES,
        "images_per_setting": args.per_class * len(CLASS_NAMES),
        "methods": list(methods),
        "results": results,
        "reference": reference,
        "total_seconds": time.time() - started,
    }
    (out / "reference_eval.json").write_text(json.dumps(report, indent=2))
    write_markdown(out / "reference_eval.md", report)
    plot_metrics(out / "reference_eval.png", results, reference, list(methods))
    plot_samples(out / "reference_samples.png", grid, CLASS_NAMES)
    print()
    print(markdown_table(results, reference))
    print(f"\nwrote {out}/reference_eval.{{json,md,png}} and reference_samples.png")


if __name__ == "__main__":
    main()
