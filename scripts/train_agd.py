"""Trains AGD adapters from the command line, exactly as the Train AGD Adapters node does.

Adapter guidance distillation (nodes/agd.py) needs adapters trained for one base model; this command trains them
for a ComfyUI checkpoint and a prompt (or for the pack's embedded reference model and its classes) with
`nodes/agd_patch.py` `train_agd`, the node's procedure, and saves the safetensors file that Apply AGD loads from
`models/agd_adapters/`:

    python scripts/train_agd.py --comfyui COMFYUI_DIR --reference --out FILE
    python scripts/train_agd.py --comfyui COMFYUI_DIR --checkpoint models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --positive "a photograph of a fox" --negative "blurry" --out COMFYUI_DIR/models/agd_adapters/sd15.safetensors

Ctrl-C stops it; run again with the same --work folder and settings, it resumes (trajectories kept, training from
its last checkpoint). The reference model's defaults are those of the shipped adapters (bench/agd_bench.py).
"""

import argparse
import pathlib
import sys
import time

from fit_linear_ag import add_model_arguments, checkpoint_inputs, load_comfyui, reference_inputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, "the prompt to train on", "the negative prompt of the CFG distilled")
    p.add_argument("--scale-low", type=float, default=1.0)
    p.add_argument("--scale-high", type=float, default=None, help="default: 12, or 6 for --reference")
    p.add_argument("--trajectories", type=int, default=None, help="default: 256, or 500 for --reference")
    p.add_argument("--trajectory-batch", type=int, default=None, help="default: 8, or 50 for --reference")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--train-steps", type=int, default=None, help="default: 5000, or 1500 for --reference")
    p.add_argument("--batch", type=int, default=None, help="default: 64, or 256 for --reference")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4, or 1e-3 for --reference")
    p.add_argument("--hidden", type=int, default=None, help="adapter width (default: 320, or 16 for --reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for trajectories and checkpoints (default: OUT.training)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--out", required=True, help="the adapter file to write (.safetensors)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load_comfyui(args.comfyui, args.cpu)
    import shutil

    from comfyui_guidance.guiders.agd import AdapterSpec, save_adapters
    from comfyui_guidance.nodes.agd_patch import TrainingSettings, train_agd

    defaults = dict(side=32, high=6.0, trajectories=500, trajectory_batch=50, steps=1500, batch=256, lr=1e-3,
                    hidden=16) if args.reference else dict(side=512, high=12.0, trajectories=256, trajectory_batch=8,
                                                           steps=5000, batch=64, lr=1e-4, hidden=320)
    pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
    width, height = pick(args.width, "side"), pick(args.height, "side")
    if args.reference:
        model, positive, negative, latent = reference_inputs(width, height)
    else:
        model, positive, negative, latent = checkpoint_inputs(args.checkpoint, args.positive, args.negative, width,
                                                              height)
    try:
        settings = TrainingSettings(pick(args.trajectories, "trajectories"), args.scale_low,
                                    pick(args.scale_high, "high"), args.sampler, args.scheduler, args.sample_steps,
                                    pick(args.trajectory_batch, "trajectory_batch"), pick(args.train_steps, "steps"),
                                    pick(args.batch, "batch"), pick(args.lr, "lr"), seed=args.seed)
        spec = AdapterSpec(hidden_dim=pick(args.hidden, "hidden"))
    except ValueError as e:
        sys.exit(f"train_agd: {e}")
    out = pathlib.Path(args.out)
    work = pathlib.Path(args.work) if args.work else out.with_suffix(".training")
    began = time.perf_counter()

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"train_agd: {done}/{total} (trajectories, then steps), {time.perf_counter() - began:.1f} s",
                  flush=True)

    try:
        adapters = train_agd(model, positive, negative, latent, settings, spec, work, progress, print)
    except ValueError as e:
        sys.exit(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_adapters(adapters, str(out))
    shutil.rmtree(work, ignore_errors=True)
    print(f"train_agd: wrote {out} ({adapters.parameter_count():,} parameters; final loss "
          f"{adapters.info['final_loss']}, base {adapters.info['base_fingerprint']})")


if __name__ == "__main__":
    main()
