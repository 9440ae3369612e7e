"""Fits LinearAG coefficients from the command line, exactly as the Fit LinearAG Coefficients node does.

LinearAG (nodes/adaptive.py) needs coefficients fitted for one model, sampler, scheduler and step count; this command
makes them for a ComfyUI checkpoint and a prompt (or for the pack's embedded reference model and its classes) with
`nodes/adaptive_patch.py` `fit_linear_ag`, the node's procedure, and saves the safetensors file that the LinearAG
node loads from `models/linear_ag/`:

    python scripts/fit_linear_ag.py --comfyui COMFYUI_DIR --checkpoint models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --positive "a photograph of a fox" --negative "blurry" --sampler euler --scheduler normal --steps 20 --cfg 7 \\
        --images 16 --out COMFYUI_DIR/models/linear_ag/sd15_euler_normal_20.safetensors
    python scripts/fit_linear_ag.py --comfyui COMFYUI_DIR --reference --steps 30 --cfg 3 --out FILE

Ctrl-C stops it between batches (nothing is written then).
"""

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def add_model_arguments(p: argparse.ArgumentParser, positive: str, negative: str) -> None:
    """The arguments of the model and prompts that the pack's commands share."""
    p.add_argument("--comfyui", required=True, help="ComfyUI folder (scripts/setup_host.sh prints it)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a ComfyUI checkpoint file (model and text encoder)")
    model.add_argument("--reference", action="store_true", help="the pack's embedded reference model, every class")
    p.add_argument("--positive", default="", help=f"{positive} (checkpoint only)")
    p.add_argument("--negative", default="", help=f"{negative} (checkpoint only)")
    p.add_argument("--width", type=int, default=None, help="image width (default: 512, or 32 for --reference)")
    p.add_argument("--height", type=int, default=None, help="image height (default: 512, or 32 for --reference)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, "the prompt the coefficients are fitted on", "the negative prompt you sample with")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="CFG scale of the fitting runs (default: 7, or 3 for "
                   "--reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=None, help="images sampled for the fit (default: 16, or 20 for "
                   "--reference)")
    p.add_argument("--batch", type=int, default=None, help="images per sampling run (default: 4, or 10 for "
                   "--reference: one image per class)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--out", required=True, help="the coefficients file to write (.safetensors)")
    return p.parse_args(argv)


def load_comfyui(path: str, cpu: bool):
    """ComfyUI imported from `path` (its own argument parsing off) and this repository as the pack."""
    sys.path.insert(0, str(ROOT))
    from reference.train import setup_comfyui

    setup_comfyui(path, "cpu" if cpu else "cuda")
    sys.path.insert(0, str(ROOT / "bench"))
    from pack import import_pack

    import_pack()


def reference_inputs(width: int, height: int):
    """(model, positive, negative, latent) of the embedded reference model: one image per class, in turn."""
    from comfyui_guidance.nodes.reference import (ALL_CLASSES, DEFAULT_WEIGHTS, EmptyReferenceLatent,
                                                  ReferenceClassConditioning, ReferenceModelLoader)

    model, _, classes = ReferenceModelLoader.execute(DEFAULT_WEIGHTS).result
    positive, negative, _ = ReferenceClassConditioning.execute(classes, ALL_CLASSES, 1).result
    [latent] = EmptyReferenceLatent.execute(width, height, 1).result
    return model, positive, negative, latent["samples"]


def checkpoint_inputs(path: str, positive: str, negative: str, width: int, height: int):
    import comfy.sd
    import torch

    model, clip = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)[:2]
    if clip is None:
        sys.exit(f"{path} has no text encoder; LinearAG is fitted on prompts encoded by the checkpoint's own.")

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    latent_format = model.get_model_object("latent_format")
    downscale = getattr(latent_format, "spacial_downscale_ratio", 8)
    latent = torch.zeros(1, latent_format.latent_channels, height // downscale, width // downscale)
    return model, encode(positive), encode(negative), latent


def main(argv=None):
    args = parse_args(argv)
    load_comfyui(args.comfyui, args.cpu)
    from comfyui_guidance.nodes.adaptive_patch import fit_linear_ag

    # The reference model's defaults: its 32x32 images, the bench's scale, and one image per class in each run.
    side, cfg, images, batch = (32, 3.0, 20, 10) if args.reference else (512, 7.0, 16, 4)
    width, height = args.width or side, args.height or side
    cfg = cfg if args.cfg is None else args.cfg
    images = images if args.images is None else args.images
    batch = batch if args.batch is None else args.batch
    if args.reference:
        model, positive, negative, latent = reference_inputs(width, height)
    else:
        model, positive, negative, latent = checkpoint_inputs(args.checkpoint, args.positive, args.negative, width,
                                                              height)
    began = time.perf_counter()

    def progress(done, total):
        print(f"fit_linear_ag: {done}/{total} images, {time.perf_counter() - began:.1f} s", flush=True)

    try:
        fitted = fit_linear_ag(model, positive, negative, latent, args.sampler, args.scheduler, args.steps, cfg,
                               args.seed, images, batch, progress)
    except ValueError as e:
        sys.exit(str(e))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fitted.save(out)
    residuals = ", ".join(f"call {k}: {v:.4f}" for k, v in fitted.info["relative_residual"].items())
    print(f"fit_linear_ag: wrote {out} ({fitted.describe()}, model {fitted.info['model_fingerprint']}); relative "
          f"residual per estimated call {residuals}")


if __name__ == "__main__":
    main()
