"""PPAP on the GPU: noise-range experts distilled without labels, against one noise-aware classifier, the clean
classifier used naively and EluCD.

PPAP (Go et al., CVPR 2023; guiders/ppap.py) claims that (a) several parameter-efficient experts, each for one range
of noise levels, guide better than one classifier fine-tuned on every noise level, and (b) the experts can be
distilled from an off-the-shelf classifier on the diffusion model's own samples, with no labels and no dataset. This
bench measures both on the reference model (reference/model.py) with the reference classifier (reference/weights/
fashion_classifier.safetensors) as the off-the-shelf classifier, as the paper guides an unconditional model:

- the unconditional model (the empty class as the prompt, cfg 1), --sampler ddim with the ddim_uniform scheduler,
  --steps 25 (the official sampling: DDIM 25), --per-class images per class (1000 in all), the same initial noise
  (seed --seed) for every setting, through ComfyUI's sampling path (`comfy.sample.sample`) as in
  bench/reference_eval.py; each image guided towards its balanced label (nodes/classifier_patch.ClassifierTargets);
- one transfer set, the model's own unconditional samples (nodes/ppap_patch.make_transfer_set: --transfer-images,
  25 DDIM steps, seed --transfer-seed, distinct from the evaluation noise), made once and shared by every trained
  method; no label is used anywhere in their training;
- the methods: unguided; naive (the clean classifier read on the noisy input through PPAP's own hook, as one expert
  with fresh adapters - LoRA B = 0, so exactly the backbone: plain classifier guidance with an off-the-shelf
  classifier); EluCD (nodes/elucd_patch.apply_elucd at its defaults, the classifier on the denoised prediction);
  a single noise-aware classifier (one expert over all timesteps, its LoRA rank chosen so that its trainable
  parameters match PPAP-5's five experts together); PPAP-1, PPAP-3 and PPAP-5 (rank --rank, alpha --alpha, teacher
  temperature --teacher-temperature). Every trained method is trained by the node's own procedure
  (nodes/ppap_patch.train_ppap: AdamW, linear annealing per expert, experts trained one after another) with the same
  total optimizer steps (--train-steps), batch (--train-batch) and learning rate (--lr);
- each guided method at every scale of its sweep (--scales; the naive classifier --naive-scales, EluCD
  --elucd-scales): FD, precision and recall against the real test split in the guide's feature space and class
  accuracy under the guide (bench/reference_eval.py's `evaluate`), class accuracy under the independent judge
  (reference/judge.py), ms per image and peak memory of the sampling calls. A guidance method that is merely stronger
  at one scale is not rewarded: each claim compares two methods on the judge-accuracy/FD trade-off their sweeps trace
  up to each one's most accurate scale (bench/classifier_bench.py's `matched`: at each judge accuracy one method
  reaches, the other's FD interpolated to it; where the sweeps share no judge accuracy, whether one setting beats
  every setting of the other on both counts), and says "reproduced", "not reproduced" or "mixed" from the numbers;
- what the experts learn, without sampling: accuracy on the real test split (10000 images, which neither the guide nor
  the experts saw) noised to timesteps uniform in each fifth of the 1000 diffusion timesteps, each image read by the
  expert of its timestep, against the clean classifier on the same noisy images - the noise-aware accuracy PPAP aims
  at;
- the cost: trainable parameters, training wall time (synchronised: the node's loop reads the loss every step), the
  KD loss at the end of each expert (mean of its last 100 steps), and ms per sampling step at --timing-batches images
  (the difference of whole sampling runs of the two --timing-steps step counts over the steps between them, CUDA
  events, median of --timing-reps after --timing-warmup warm-ups, settings interleaved), guided against unguided,
  with peak memory.

The learning rate and step budget were chosen by a probe: this bench with --methods PPAP-5 at each --lr
(bench/results/ppap_bench_probe_lr*.md). --save-experts writes the PPAP-5 experts (train_ppap's file, with its info:
backbone hash, model fingerprint, noise schedule), shipped as reference/weights/ppap_experts/fashion_ppap5.safetensors.

    python bench/ppap_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA --save-experts DIR
    python bench/ppap_bench.py ... --methods PPAP-5 --lr 1e-4 --name ppap_bench_probe_lr1e-4 --work DIR  (probe)
    python bench/ppap_bench.py ... --device cpu --per-class 1 --steps 3 --train-steps 10 --transfer-images 32 \\
        --transfer-batch 16 --train-batch 8 --batch 10 --scales 1,8 --naive-scales 8 --elucd-scales 1 \\
        --noisy-images 100 --timing-batches 10 --timing-steps 1,2  (smoke test)

DATA_DIR needs the Fashion-MNIST test split files (t10k-*); writes NAME.json and NAME.md (--name, default ppap_bench).
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# bench/reference_eval.py (as ref) with a stand-in for matplotlib where it is missing, and the EluCD bench's helpers
from adaptive_bench import ref  # noqa: E402  (bench/, the script's folder)
from classifier_bench import accuracy, fmt, matched, measure, peak_mib, verdict  # noqa: E402
from pack import import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui, to_model_space  # noqa: E402

WEIGHTS = ROOT / "reference" / "weights"
UNGUIDED, NAIVE, ELUCD, SINGLE = "unguided", "naive", "EluCD", "single noise-aware"
PPAP_EXPERTS = (1, 3, 5)
METHODS = (NAIVE, ELUCD, SINGLE, *(f"PPAP-{n}" for n in PPAP_EXPERTS))
SHIPPED = "PPAP-5"  # the experts --save-experts writes
SHIPPED_FILE = "fashion_ppap5.safetensors"
MATCHED_EXPERTS = 5  # the single classifier's trainable parameters match this many experts of --rank
NOISY_RANGES = 5  # the held-out noisy accuracy is read on the timesteps of PPAP-5's ranges
LAST_STEPS = 100  # an expert's final KD loss: the mean over its last steps


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scheduler", default="ddim_uniform")
    p.add_argument("--scales", default="0.5,1,2,4,8,16,32,64", help="scales of the trained experts")
    p.add_argument("--naive-scales", default="2,8,32,128,512")
    p.add_argument("--elucd-scales", default="0.5,1,2,4,8,16")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500, help="images per sampling call (and per classifier pass)")
    p.add_argument("--seed", type=int, default=0, help="the evaluation's initial noise")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--train-steps", type=int, default=5000, help="optimizer steps of each trained method")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--teacher-temperature", type=float, default=0.25)
    p.add_argument("--transfer-images", type=int, default=20000)
    p.add_argument("--transfer-batch", type=int, default=1000)
    p.add_argument("--transfer-seed", type=int, default=1,
                   help="seed of the transfer samples and of the training (not --seed: the transfer set holds none "
                   "of the evaluation's trajectories)")
    p.add_argument("--noisy-images", type=int, default=10000, help="test images of the held-out noisy accuracy")
    p.add_argument("--noisy-seed", type=int, default=0)
    p.add_argument("--recommend-accuracy", type=float, default=0.9,
                   help="the recommended scale: PPAP-5's lowest FD among the scales whose judge accuracy reaches this")
    p.add_argument("--timing-batches", default="100,1000")
    p.add_argument("--timing-steps", default="5,25", help="the short and the long run of the per-step timing")
    p.add_argument("--timing-scale", type=float, default=8.0, help="the guided settings' scale in the timing")
    p.add_argument("--timing-reps", type=int, default=3)
    p.add_argument("--timing-warmup", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the transfer set and checkpoints (default: a temporary "
                   "one); runs sharing it share the transfer set")
    p.add_argument("--save-experts", default="", help=f"folder to write the {SHIPPED} experts to ({SHIPPED_FILE})")
    p.add_argument("--name", default="ppap_bench", help="file name of the results (.json and .md) in --out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default=str(WEIGHTS / "fashion_diffusion.safetensors"))
    p.add_argument("--judge", default=str(WEIGHTS / "fashion_judge.safetensors"))
    args = p.parse_args()
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.scales = [float(s) for s in args.scales.split(",")]
    args.naive_scales = [float(s) for s in args.naive_scales.split(",")]
    args.elucd_scales = [float(s) for s in args.elucd_scales.split(",")]
    args.timing_batches = [int(b) for b in args.timing_batches.split(",")]
    args.timing_steps = [int(n) for n in args.timing_steps.split(",")]
    if len(args.timing_steps) != 2 or args.timing_steps[0] >= args.timing_steps[1]:
        p.error("--timing-steps takes two step counts, the shorter first")
    images = len(CLASS_NAMES) * args.per_class
    if images % min(args.batch, images) or min(args.batch, images) % len(CLASS_NAMES):
        p.error("--batch must split the images into equal sampling calls of whole class rounds")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def experts_of(method: str) -> int:
    return 1 if method == SINGLE else int(method.removeprefix("PPAP-"))


def matched_rank(backbone, target: int, alpha: float) -> tuple[int, int]:
    """(rank, trainable parameters) of the one expert whose trainable parameters come nearest `target` (they grow
    linearly with the rank: LoRA's A and B; the normalisation and bias parameters are fixed)."""
    from comfyui_guidance.guiders.ppap import add_adapters, trainable_count

    with torch.inference_mode(False):
        one, two = (trainable_count(add_adapters(backbone, r, alpha)) for r in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    rank = max(1, round((target - fixed) / per_rank))
    return rank, fixed + per_rank * rank


def train_method(args, method, rank, model, classifier, vae, empty, transfer, work: pathlib.Path, device) -> tuple:
    """(experts, record) of one trained method by the node's procedure (train_ppap), the transfer set taken from the
    shared cache `work`/transfer."""
    from comfyui_guidance.guiders.ppap import PPAPConfig
    from comfyui_guidance.nodes.ppap_patch import train_ppap

    config = PPAPConfig(experts_of(method), rank, args.alpha, args.train_steps, args.train_batch, args.lr,
                        teacher_temperature=args.teacher_temperature)
    folder = work / args.name / method.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "transfer").exists():
        (folder / "transfer").symlink_to(work / "transfer", target_is_directory=True)

    def log(line):  # train_ppap logs every 100 steps; every 1000th is shown
        if "000/" in line:
            print(f"{method}: {line}", flush=True)

    synchronize(device)
    began = time.perf_counter()
    experts = train_ppap(model, classifier, empty, empty, torch.zeros(1, 3, RESOLUTION, RESOLUTION), vae, transfer,
                         config, folder, log=log)
    synchronize(device)
    seconds = time.perf_counter() - began
    losses = torch.load(folder / "training.pt", weights_only=True)["losses"]
    per = config.steps_per_expert
    final = [statistics.fmean(losses[(i + 1) * per - min(LAST_STEPS, per):(i + 1) * per])
             for i in range(config.experts)]
    per_expert = int(experts.info["trainable_parameters_per_expert"])
    record = {"experts": config.experts, "rank": rank, "alpha": args.alpha, "steps_per_expert": per,
              "optimizer_steps": per * config.experts, "trainable_per_expert": per_expert,
              "trainable_total": per_expert * config.experts,
              "training_seconds": float(experts.info["training_seconds"]), "wall_seconds": seconds,
              "final_kd_loss": final, "loss_curve": losses[::max(1, len(losses) // 200)]}
    print(f"{method}: {seconds:.1f} s, {per_expert:,} trainable parameters per expert, final KD loss per expert "
          f"{', '.join(f'{v:.5f}' for v in final)}", flush=True)
    return experts, record


def clean_experts(classifier, space, model, rank: int, alpha: float):
    """The clean classifier as one PPAP expert: fresh adapters (LoRA B = 0: exactly the backbone, its own
    normalisation statistics), made for this model, so that PPAP's hook guides with the off-the-shelf classifier."""
    from comfyui_guidance.guiders.ppap import add_adapters, expert_state, network_sha256
    from comfyui_guidance.nodes.adaptive_patch import model_fingerprint
    from comfyui_guidance.nodes.ppap_patch import PPAPExperts, noise_schedule

    with torch.inference_mode(False):
        state = expert_state(add_adapters(classifier.network, rank, alpha))
    info = {"backbone_sha256": network_sha256(classifier.network), "backbone_name": classifier.name,
            "model_fingerprint": model_fingerprint(model), "noise_schedule": noise_schedule(model)}
    return PPAPExperts(classifier, [state], rank, alpha, space, info)


@torch.no_grad()
def noisy_accuracy(methods: dict, model, images, labels, seed: int, device, batch: int = 2000) -> dict:
    """method → accuracy on `images` (model space) noised to timesteps uniform in each of NOISY_RANGES equal ranges,
    each image read by its method's expert of that timestep through the experts' own input map; the same noise and
    timesteps for every method."""
    from comfyui_guidance.guiders.classifier import ClassifierOnDenoised
    from comfyui_guidance.guiders.ppap import expert_index, expert_ranges, range_timesteps
    from comfyui_guidance.nodes.ppap_patch import position_sigmas

    sampling, latent_format = model.get_model_object("model_sampling"), model.get_model_object("latent_format")
    generator = torch.Generator().manual_seed(seed)
    x0 = model.model.process_latent_in(images)
    result = {name: [] for name in methods}
    for span in expert_ranges(NOISY_RANGES):
        t = range_timesteps(span, len(labels), generator)
        sigma = position_sigmas(sampling, t)
        x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), torch.randn(x0.shape, generator=generator), x0)
        for name, experts in methods.items():
            index = torch.tensor([expert_index(float(s), experts.count) for s in t])
            predicted = torch.empty_like(labels)
            for expert in index.unique().tolist():
                network = experts.network(expert, device)
                for part in torch.nonzero(index == expert).flatten().split(batch):
                    read = experts.input_map.noisy(latent_format, sampling, sigma[part].to(device))
                    logits = ClassifierOnDenoised(network, experts.classifier.input_shape, read).logits(
                        x[part].to(device))
                    predicted[part] = logits.argmax(1).cpu()
            result[name].append(float((predicted == labels).double().mean()))
    return {"ranges": expert_ranges(NOISY_RANGES), "accuracy": result}


def guided_setups(args, methods: dict, model, targets, vae, chunk: int) -> list:
    """[(method, scale, Setup)] of every guided setting: the PPAP hook for the experts (the naive classifier
    included), EluCD's own patch."""
    from comfyui_guidance.guiders.elucd import EluCDConfig
    from comfyui_guidance.nodes.elucd_patch import apply_elucd
    from comfyui_guidance.nodes.ppap_patch import apply_ppap

    setups = []
    for method in args.methods:
        if method == ELUCD:
            setups += [(method, s, ref.Setup(apply_elucd(model, targets, EluCDConfig(s), vae, chunk=chunk), 1.0))
                       for s in args.elucd_scales]
        else:
            setups += [(method, s, ref.Setup(apply_ppap(model, methods[method], targets, s, chunk=chunk), 1.0))
                       for s in (args.naive_scales if method == NAIVE else args.scales)]
    return setups


def sweep(args, settings, prompts, labels, noise, guide, judge, real, device) -> list:
    """One row per (method, scale, Setup) of `settings`: the sample metrics, after a 2-step warm-up of the setting."""
    rows = []
    for method, scale, setup in settings:
        ref.sample(setup, prompts, labels, noise, args, steps=2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        images, seconds = ref.sample(setup, prompts, labels, noise, args)
        name = UNGUIDED if method == UNGUIDED else f"{method} s={scale:g}"
        rows.append({"setting": name, "variant": method, "scale": scale, "peak_mib": peak_mib(device),
                     **ref.evaluate(images, labels, guide, real, args.k, device),
                     "judge_accuracy": accuracy(judge, images, labels, device),
                     "ms_per_image": 1000 * seconds / len(labels), "seconds": seconds})
        r = rows[-1]
        print(f"{name:>28}  {seconds:6.2f}s  FD {r['fd']:8.3f}  P {r['precision']:.3f} R {r['recall']:.3f}  "
              f"acc guide {r['class_accuracy']:.3f} judge {r['judge_accuracy']:.3f}", flush=True)
    return rows


def step_costs(args, methods: dict, model, classifier, vae, empty_row, device) -> dict:
    """batch → setting → ms per sampling step: the difference of whole sampling runs of the two --timing-steps step
    counts over the difference of the counts (what a run's fixed costs - conditioning, model placement, the copies
    of noise and samples - add is left out), with the long run's ms; interleaved CUDA timings
    (classifier_bench.measure), guided settings at --timing-scale, the classifier on the whole batch in one pass;
    with each one's ratio to the unguided step."""
    from comfyui_guidance.nodes.classifier_patch import ClassifierTargets

    from reference.model import class_conditioning

    timed_methods = [m for m in (NAIVE, ELUCD, SINGLE, SHIPPED) if m in args.methods]
    negative = class_conditioning(empty_row, None)
    result = {}
    for batch in args.timing_batches:
        targets = ClassifierTargets(classifier, tuple((torch.arange(batch) % len(CLASS_NAMES)).tolist()))
        timing = argparse.Namespace(**{**vars(args), "methods": timed_methods, "scales": [args.timing_scale],
                                       "naive_scales": [args.timing_scale], "elucd_scales": [args.timing_scale]})
        settings = [(UNGUIDED, 0.0, ref.Setup(model, 1.0))]
        settings += guided_setups(timing, methods, model, targets, vae, chunk=batch)
        noise = torch.randn(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(args.seed))
        positive = [[empty_row.repeat(batch, 1, 1), {}]]
        entries = {}
        for method, _, setup in settings:
            for steps in args.timing_steps:
                run = ref.sampling_call(setup, steps, args)
                entries[(method, steps)] = (None, lambda _, run=run: run(noise, positive, negative, args.seed))
        measured = measure(entries, device, args.timing_warmup, args.timing_reps)
        short, long = args.timing_steps
        per_step = {m: (measured[(m, long)]["ms"] - measured[(m, short)]["ms"]) / (long - short)
                    for m, _, _ in settings}
        result[batch] = {m: {"ms_per_step": ms, "over_unguided": ms / per_step[UNGUIDED],
                             "run_ms": measured[(m, long)]["ms"], "peak_mib": measured[(m, long)]["peak_mib"]}
                         for m, ms in per_step.items()}
        print(f"batch {batch}: " + ", ".join(f"{m} {v['ms_per_step']:.2f} ms/step" for m, v in result[batch].items()),
              flush=True)
    return result


def recommended_scale(rows: list, level: float) -> dict | None:
    """PPAP-5's row of the lowest FD among those whose judge accuracy reaches `level` (the highest-accuracy row if
    none does)."""
    sweep_rows = [r for r in rows if r["variant"] == SHIPPED]
    if not sweep_rows:
        return None
    reaching = [r for r in sweep_rows if r["judge_accuracy"] >= level]
    return min(reaching, key=lambda r: r["fd"]) if reaching else max(sweep_rows, key=lambda r: r["judge_accuracy"])


MATCHED_CLAIMS = {  # claim → (the method the paper says is better, the other)
    "multiple experts beat one model (PPAP-5 vs a single noise-aware classifier of the same trainable parameters)":
        ("PPAP-5", SINGLE),
    "five experts beat one of the same rank (PPAP-5 vs PPAP-1)": ("PPAP-5", "PPAP-1"),
    "five experts beat three (PPAP-5 vs PPAP-3)": ("PPAP-5", "PPAP-3"),
    "data-free transfer works (PPAP-5 vs the clean classifier used naively)": ("PPAP-5", NAIVE),
    "data-free transfer alone works (single noise-aware classifier vs the clean classifier used naively)":
        (SINGLE, NAIVE),
    "PPAP-5 beats EluCD (the clean classifier on the denoised prediction)": ("PPAP-5", ELUCD),
}
NOISY_CLAIMS = {  # claim → (better, worse) on the held-out noisy accuracy, range by range
    "the experts read noisy images better than the clean classifier (PPAP-5 vs clean)": ("PPAP-5", NAIVE),
    "the distilled single classifier reads noisy images better than the clean one": (SINGLE, NAIVE),
    "five experts read noisy images better than one model of the same trainable parameters": ("PPAP-5", SINGLE),
}


def rising(rows: list) -> list:
    """Each method's sweep up to its most accurate scale under the judge: past it a larger scale lowers the accuracy
    and raises FD (no trade-off), and a sweep that turns back would put a second FD at the same accuracy into the
    interpolation of `matched`."""
    kept = []
    for method in dict.fromkeys(r["variant"] for r in rows):
        sweep = sorted((r for r in rows if r["variant"] == method), key=lambda r: r["scale"])
        peak = max(range(len(sweep)), key=lambda i: sweep[i]["judge_accuracy"])
        kept += sweep[:peak + 1]
    return kept


def compare(rows: list, better: str, worse: str) -> dict:
    """classifier_bench's `matched` on the rising sweeps; where the two share no judge accuracy, whether one setting
    of one method beats every setting of the other on both counts (higher judge accuracy, lower FD)."""
    rows = rising(rows)
    result = matched(rows, better, worse)
    if result["points"]:
        return result
    sweeps = {m: [r for r in rows if r["variant"] == m] for m in (better, worse)}
    for winner, loser, word in ((better, worse, "reproduced"), (worse, better, "not reproduced")):
        beating = [r for r in sweeps[winner] if all(r["judge_accuracy"] > o["judge_accuracy"] and r["fd"] < o["fd"]
                                                    for o in sweeps[loser])]
        if beating:
            best = min(beating, key=lambda r: r["fd"])
            result.update(verdict=f"{word} (no common judge accuracy; one setting beats every one of the other)",
                          dominant={"setting": best["setting"], "judge_accuracy": best["judge_accuracy"],
                                    "fd": best["fd"], "other": loser,
                                    "other_judge_accuracy_max": max(o["judge_accuracy"] for o in sweeps[loser]),
                                    "other_fd_min": min(o["fd"] for o in sweeps[loser])})
            break
    return result


def range_verdict(accuracy: dict, better: str, worse: str) -> dict:
    higher = sum(a > b for a, b in zip(accuracy[better], accuracy[worse]))
    count = len(accuracy[better])
    word = ("reproduced" if higher == count else "not reproduced" if higher == 0
            else f"mixed ({higher} of {count} ranges)")
    return {"verdict": word, "better": better, "worse": worse,
            "accuracy": [accuracy[better], accuracy[worse]]}


def directions(rows: list, noisy: dict, recommended: dict | None, sampled: set) -> dict:
    """The paper's claims, each judged from the numbers (only those whose methods were sampled, or read)."""
    unguided = next(r for r in rows if r["variant"] == UNGUIDED)
    return {
        "matched": {claim: compare(rows, *pair) for claim, pair in MATCHED_CLAIMS.items() if set(pair) <= sampled},
        "noisy": {claim: range_verdict(noisy["accuracy"], *pair) for claim, pair in NOISY_CLAIMS.items()
                  if set(pair) <= set(noisy["accuracy"])},
        "pairs": ({"PPAP-5 makes the unconditional model class-conditional (recommended scale vs unguided)":
                   verdict(recommended, unguided)} if recommended else {}),
    }


def reference_part(args, device, work: pathlib.Path) -> dict:
    import comfy.sd
    from comfy.sample import prepare_noise

    from comfyui_guidance.guiders.ppap import add_adapters, trainable_count
    from comfyui_guidance.nodes.classifier_patch import ClassifierTargets, reference_classifier
    from comfyui_guidance.nodes.ppap_patch import TransferSettings, input_map, make_transfer_set
    from reference.data import load_split
    from reference.judge import judge_split, load_judge
    from reference.model import class_conditioning

    model, tokens = ref.load_diffusion(args.weights)
    empty = class_conditioning(tokens, None)
    unconditional = tokens[-1:].expand_as(tokens).clone()  # ref.sample's per-image prompts, all the empty class
    classifier = reference_classifier()
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # the reference loader's VAE (nodes/reference.py)
    space = input_map(model, classifier, vae, "ppap_bench")
    guide = ref.load_classifier(WEIGHTS / "fashion_classifier.safetensors", len(CLASS_NAMES), device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(guide, pathlib.Path(args.data), args.per_class, 0, device)
    _, (held_images, held_labels) = judge_split(real.images, real.labels)
    held_out = {"images": len(held_labels), "guide_accuracy": accuracy(guide, held_images, held_labels, device),
                "judge_accuracy": accuracy(judge, held_images, held_labels, device)}

    transfer = TransferSettings(args.transfer_images, args.transfer_batch, args.steps, args.sampler, args.scheduler,
                                seed=args.transfer_seed)
    synchronize(device)
    began = time.perf_counter()
    make_transfer_set(model, empty, empty, torch.zeros(1, 3, RESOLUTION, RESOLUTION), transfer, work / "transfer")
    transfer_seconds = time.perf_counter() - began
    print(f"transfer set: {args.transfer_images} images in {transfer_seconds:.1f} s", flush=True)

    with torch.inference_mode(False):
        per_expert = trainable_count(add_adapters(classifier.network, args.rank, args.alpha))
    single_rank, single_count = matched_rank(classifier.network, MATCHED_EXPERTS * per_expert, args.alpha)
    # the clean classifier: the naive method, and the baseline of the noisy accuracy
    methods, training = {NAIVE: clean_experts(classifier, space, model, args.rank, args.alpha)}, {}
    for method in args.methods:
        if method in (NAIVE, ELUCD):
            continue
        rank = single_rank if method == SINGLE else args.rank
        methods[method], training[method] = train_method(args, method, rank, model, classifier, vae, empty, transfer,
                                                         work, device)
    if args.save_experts and SHIPPED in methods:
        folder = pathlib.Path(args.save_experts)
        folder.mkdir(parents=True, exist_ok=True)
        # train_ppap timed the transfer set it loaded from the shared cache: the file records what making it took
        methods[SHIPPED].info["transfer_seconds"] = f"{transfer_seconds:.1f}"
        methods[SHIPPED].save(str(folder / SHIPPED_FILE))

    test_images, test_labels = (torch.from_numpy(a) for a in load_split(pathlib.Path(args.data), "test"))
    test_labels = test_labels.long()
    noisy = noisy_accuracy(methods, model, to_model_space(test_images[:args.noisy_images]),
                           test_labels[:args.noisy_images], args.noisy_seed, device)
    for name, values in noisy["accuracy"].items():
        print(f"noisy accuracy {name:>20}: " + " ".join(f"{v:.3f}" for v in values), flush=True)

    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)
    batch = min(args.batch, len(labels))
    targets = ClassifierTargets(classifier, tuple(labels[:batch].tolist()))  # every call holds these classes
    settings = [(UNGUIDED, 0.0, ref.Setup(model, 1.0))] + guided_setups(args, methods, model, targets, vae, batch)
    rows = sweep(args, settings, unconditional, labels, noise, guide, judge, real, device)
    recommended = recommended_scale(rows, args.recommend_accuracy)
    costs = step_costs(args, methods, model, classifier, vae, tokens, device)
    return {"images": len(labels), "batch": batch, "unet_dtype": str(model.model.get_dtype()), "steps": args.steps,
            "sampler": args.sampler, "scheduler": args.scheduler, "held_out": held_out,
            "test_split_guide_accuracy": real.test_accuracy, "transfer": {"images": args.transfer_images,
                                                                         "batch": args.transfer_batch,
                                                                         "seed": args.transfer_seed,
                                                                         "seconds": transfer_seconds},
            "trainable_per_expert_rank": per_expert, "single_rank": single_rank, "single_trainable": single_count,
            "training": training, "noisy": noisy, "rows": rows,
            "recommended": recommended and {"scale": recommended["scale"], "fd": recommended["fd"],
                                            "judge_accuracy": recommended["judge_accuracy"]},
            "step_costs": costs, "directions": directions(rows, noisy, recommended, set(args.methods))}


def markdown(report: dict) -> str:
    part, a = report["reference"], report["args"]
    held = part["held_out"]
    lines = ["# PPAP classifier guidance (bench/ppap_bench.py)", "", f"`{report['command']}`", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"ComfyUI {report['comfyui']}.", "",
             f"## Reference model: {part['images']} images per setting, {part['sampler']}/{part['scheduler']}, "
             f"{part['steps']} steps, UNet {part['unet_dtype']}", "",
             "The unconditional model (the empty class as the prompt, cfg 1) guided towards each image's balanced "
             "label, the same initial noise for every setting. The guide is reference/weights/fashion_classifier."
             "safetensors, which is also the feature network of FD, precision and recall (bench/reference_eval.py's "
             "evaluation space), so its accuracy and those metrics favour what it guides towards; the judge "
             "(reference/judge.py) is an independent classifier. The classifier reads the whole sampling batch in "
             f"one pass (chunk {part['batch']}). ms/image: synchronised wall time of the sampling calls after a "
             "2-step warm-up of the same setting; peak memory: torch.cuda.max_memory_allocated over the sampling "
             "calls, model weights included.", "",
             f"Real held-out images (the judge's held-out part of the test split, {held['images']} images): guide "
             f"accuracy {held['guide_accuracy']:.4f}, judge accuracy {held['judge_accuracy']:.4f} (guide on the "
             f"whole test split {part['test_split_guide_accuracy']:.4f}).", ""]
    t = part["transfer"]
    if part["training"]:
        lines += [f"Transfer set: {t['images']} unconditional samples of the model ({part['steps']} DDIM steps, "
                  f"seed {t['seed']}, in runs of {t['batch']}), made once in {t['seconds']:.1f} s and shared by every "
                  f"trained method; no label is used. Training (nodes/ppap_patch.train_ppap, the node's procedure): "
                  f"{a['train_steps']} optimizer steps of batch {a['train_batch']} per method, split evenly over its "
                  f"experts, AdamW lr {a['lr']:g} (weight decay 0.05) annealed linearly to 0 over each expert's "
                  f"steps, LoRA alpha {a['alpha']:g}, teacher temperature {a['teacher_temperature']:g}. The single "
                  f"noise-aware classifier's rank ({part['single_rank']}) makes its trainable parameters "
                  f"({part['single_trainable']:,}) nearest {MATCHED_EXPERTS} experts of rank {a['rank']} "
                  f"({MATCHED_EXPERTS} × {part['trainable_per_expert_rank']:,} = "
                  f"{MATCHED_EXPERTS * part['trainable_per_expert_rank']:,}); the naive classifier and EluCD train "
                  "nothing (0 trainable parameters). Training time: the node's training loop, "
                  "synchronised (it reads the loss every step); KD loss: mean of each expert's last "
                  f"{LAST_STEPS} steps.", "",
                  "| method | experts | LoRA rank | trainable per expert | trainable total | steps per expert | "
                  "training (s) | final KD loss per expert |", "|---|---|---|---|---|---|---|---|"]
        for method, r in part["training"].items():
            lines.append(f"| {method} | {r['experts']} | {r['rank']} | {r['trainable_per_expert']:,} | "
                         f"{r['trainable_total']:,} | {r['steps_per_expert']} | {r['training_seconds']:.1f} | "
                         f"{', '.join(f'{v:.4f}' for v in r['final_kd_loss'])} |")
        lines.append("")
    noisy = part["noisy"]
    if noisy["accuracy"]:
        spans = [f"t {lo}-{hi}" for lo, hi in noisy["ranges"]]
        lines += ["Held-out noise-aware accuracy: the real test split (never seen by the guide or the experts, "
                  f"{a['noisy_images']} images) noised to timesteps uniform in each range, each image read by its "
                  "method's expert of its timestep (naive: the clean classifier).", "",
                  "| method | " + " | ".join(spans) + " | mean |", "|---|" + "---|" * (len(spans) + 1)]
        for name, values in noisy["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) +
                         f" | {statistics.fmean(values):.3f} |")
        lines.append("")
    lines += ["| setting | FD ↓ | precision | recall | class acc. (guide) | class acc. (judge) | ms/image | "
              "peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        lines.append(f"| {r['setting']} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_accuracy']:.3f} | {r['judge_accuracy']:.3f} | {r['ms_per_image']:.3f} | "
                     f"{fmt(r['peak_mib'], '.0f')} |")
    rec = part["recommended"]
    if rec:
        lines += ["", f"Recommended scale for the reference model ({SHIPPED}'s lowest FD among its scales whose judge "
                  f"accuracy reaches {a['recommend_accuracy']:g}, about the judge's accuracy on real images): "
                  f"**{rec['scale']:g}** (FD {rec['fd']:.3f}, judge accuracy {rec['judge_accuracy']:.3f})."]
    d = part["directions"]
    if d["matched"]:
        lines += ["", "The claims on the accuracy-FD trade-off: each method's scale sweep up to its most accurate "
                  "scale (larger scales lower the judge accuracy and raise FD), and at each judge accuracy that the "
                  "first method reaches, its FD against the other's sweep interpolated to the same accuracy (a method "
                  "that is merely stronger at one scale is not rewarded for it); where the sweeps share no judge "
                  "accuracy, whether one setting beats every setting of the other on both counts:", ""]
        for claim, v in d["matched"].items():
            points = "; ".join(f"{p['judge_accuracy']:.3f}: {p['fd'][0]:.2f} vs {p['fd'][1]:.2f}" for p in v["points"])
            detail = f"judge accuracy: FD of {v['better']} vs {v['worse']}: {points or 'none'}"
            if "dominant" in v:
                w = v["dominant"]
                detail = (f"{w['setting']}: judge accuracy {w['judge_accuracy']:.3f}, FD {w['fd']:.2f}; {w['other']} "
                          f"at every scale: judge accuracy at most {w['other_judge_accuracy_max']:.3f}, FD at least "
                          f"{w['other_fd_min']:.2f}")
            lines.append(f"- {claim}: **{v['verdict']}** ({detail})")
    if d["noisy"]:
        lines += ["", "On the held-out noisy accuracy (higher in every range):", ""]
        for claim, v in d["noisy"].items():
            pairs = ", ".join(f"{x:.3f} vs {y:.3f}" for x, y in zip(*v["accuracy"]))
            lines.append(f"- {claim}: **{v['verdict']}** ({v['better']} vs {v['worse']} by range: {pairs})")
    for claim, v in d["pairs"].items():
        lines += ["", f"- {claim}: **{v['verdict']}** ({v['better']} vs {v['worse']}: judge accuracy "
                  f"{v['judge_accuracy'][0]:.3f} vs {v['judge_accuracy'][1]:.3f}, FD {v['fd'][0]:.3f} vs "
                  f"{v['fd'][1]:.3f})"]
    costs = part["step_costs"]
    if costs:
        short, long = a["timing_steps"]
        lines += ["", "## Guidance cost per sampling step", "",
                  f"Whole sampling runs ({part['sampler']}/{part['scheduler']}) of {short} and {long} steps, the "
                  f"unconditional model at cfg 1, guided settings at scale {a['timing_scale']:g} with the classifier "
                  f"on the whole batch in one pass; CUDA events, settings interleaved, median of {a['timing_reps']} "
                  f"after {a['timing_warmup']} warm-up round(s). ms/step: the difference of the two runs over the "
                  f"{long - short} steps between them (a run's fixed costs left out); the {long}-step run whole, and "
                  "its peak memory, model weights included.", "",
                  f"| images | setting | ms/step | × unguided | {long}-step run (ms) | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for batch, settings in costs.items():
            for name, c in settings.items():
                lines.append(f"| {batch} | {name} | {c['ms_per_step']:.2f} | {c['over_unguided']:.2f} | "
                             f"{c['run_ms']:.1f} | {fmt(c['peak_mib'], '.0f')} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    import_pack()
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {**ref.run_record("bench/ppap_bench.py", args, device),
              "weights": {"diffusion": ref.file_record(args.weights), "judge": ref.file_record(args.judge),
                          "guide": ref.file_record(str(WEIGHTS / "fashion_classifier.safetensors"))}}
    with tempfile.TemporaryDirectory() as temporary:
        report["reference"] = reference_part(args, device, pathlib.Path(args.work or temporary))
    report["total_seconds"] = time.time() - started
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
