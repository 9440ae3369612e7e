"""Trains PPAP experts from the command line, exactly as the Train PPAP Experts node does.

PPAP (nodes/ppap.py) guides with experts distilled from a clean classifier on one model's own samples; this command
distills them with `nodes/ppap_patch.py` `train_ppap`, the node's procedure, and saves the safetensors file that Load
PPAP Experts reads from `models/ppap_experts/`:

    python scripts/train_ppap.py --comfyui COMFYUI_DIR --out FILE
    python scripts/train_ppap.py --comfyui COMFYUI_DIR --experts 3 --steps 3000 --out FILE

The model is the pack's embedded reference model (a pixel-space model: PPAP's experts read the noisy image, which a
latent model's latents are not), the teacher its reference classifier, the transfer set the model's unconditional
samples (the empty class at cfg 1, as the paper samples its unconditional model). Ctrl-C stops it; run again with the
same --work folder and settings, it resumes (transfer samples kept, training from its last checkpoint). The defaults
are those of the shipped experts (bench/ppap_bench.py).
"""

import argparse
import pathlib
import shutil
import sys
import time

from fit_linear_ag import load_comfyui


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI folder (scripts/setup_host.sh prints it)")
    p.add_argument("--classifier", default="fashion_classifier.safetensors",
                   help="the teacher: a classifier file in reference/weights/")
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps over all experts")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--teacher-temperature", type=float, default=0.25)
    p.add_argument("--transfer-images", type=int, default=20000)
    p.add_argument("--transfer-batch", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=1, help="seed of the transfer samples, noise, LoRA and batches (1: "
                   "the shipped experts'; the bench samples its evaluation images from seed 0)")
    p.add_argument("--work", default=None, help="folder for transfer samples and checkpoints (default: OUT.training)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--out", required=True, help="the expert file to write (.safetensors)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load_comfyui(args.comfyui, args.cpu)
    from comfyui_guidance.guiders.ppap import PPAPConfig
    from comfyui_guidance.nodes.classifier_patch import reference_classifier
    from comfyui_guidance.nodes.ppap_patch import TransferSettings, train_ppap
    from comfyui_guidance.nodes.reference import (ALL_CLASSES, DEFAULT_WEIGHTS, EmptyReferenceLatent,
                                                  ReferenceClassConditioning, ReferenceModelLoader)

    model, vae, classes = ReferenceModelLoader.execute(DEFAULT_WEIGHTS).result
    _, unconditional, _ = ReferenceClassConditioning.execute(classes, ALL_CLASSES, 1).result
    [latent] = EmptyReferenceLatent.execute(32, 32, 1).result
    try:
        config = PPAPConfig(args.experts, args.rank, args.alpha, args.steps, args.batch, args.lr,
                            teacher_temperature=args.teacher_temperature)
        transfer = TransferSettings(args.transfer_images, args.transfer_batch, args.sample_steps, seed=args.seed)
        classifier = reference_classifier(args.classifier)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train_ppap: {e}")
    out = pathlib.Path(args.out)
    work = pathlib.Path(args.work) if args.work else out.with_suffix(".training")
    began = time.perf_counter()

    def progress(done, total):
        if done % 500 == 0 or done == total:
            print(f"train_ppap: {done}/{total} (transfer images, then steps), {time.perf_counter() - began:.1f} s",
                  flush=True)

    try:
        experts = train_ppap(model, classifier, unconditional, unconditional, latent["samples"], vae, transfer,
                             config, work, progress, print)
    except ValueError as e:
        sys.exit(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    experts.save(str(out))
    shutil.rmtree(work, ignore_errors=True)
    print(f"train_ppap: wrote {out} ({experts.count} experts, "
          f"{int(experts.info['trainable_parameters_per_expert']):,} parameters each; final loss "
          f"{experts.info['final_loss']})")


if __name__ == "__main__":
    main()
