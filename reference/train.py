"""Trains the reference diffusion model and the evaluation classifier on one GPU, from the Fashion-MNIST images in
Debian's `dataset-fashion-mnist` package (reference/data.py).

    python reference/train.py --comfyui COMFYUI_DIR --data DATA_DIR --out reference/weights

The defaults are the settings that made the shipped weights (seed 0); the diffusion model and the classifier are
written as reference/weights/fashion_diffusion.safetensors and fashion_classifier.safetensors (float16), and the
same training's EMA weights at step --weak-at as fashion_weak_diffusion.safetensors, the weak model for autoguidance
(`--weak-only` trains just that far and writes just that file; it made the shipped one).

A model valid at two sizes (bench/apg_resolution_bench.py compares guidance at 32² and 64² on one): fine-tune the
shipped model with every other batch at 64², each image resized (bilinear) from its 32² form, so that both sizes hold
the same picture. It is not shipped; the one bench/results/apg_resolution_two_size.md measured came from (2342 steps
in 330 s on an H200, with the first 40000 training images, as much of the split as the GPU machine could be sent):

    python reference/train.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT --name fashion_diffusion_32_64 \
        --init reference/weights/fashion_diffusion.safetensors --sizes 32,64 --steps 2342 --lr 2e-4 --warmup 100 \
        --weak-at 0 --skip-classifier
"""

import argparse
import copy
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI folder (the UNet and its noise schedule come from it)")
    p.add_argument("--data", required=True, help="folder for the Fashion-MNIST files (fetched if missing)")
    p.add_argument("--out", default=str(ROOT / "reference" / "weights"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="classifier-free dropout of the class")
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument("--skip-classifier", action="store_true")
    p.add_argument("--weak-at", type=int, default=1000, help="also save the EMA weights at this step as the weak "
                   "model for autoguidance (fashion_weak_diffusion.safetensors); 0: none")
    p.add_argument("--weak-only", action="store_true", help="train only up to --weak-at and write only the weak model "
                   "(the learning rate is constant after warm-up, so this is the same training stopped early)")
    p.add_argument("--sizes", default="32", help="image sizes, comma-separated: the batches take them in turn, each of "
                   "--batch·(32/size)² images (the same pixels per step), the images resized (bilinear) from 32²")
    p.add_argument("--init", default="", help="start from this weights file (UNet and class tokens), not from random "
                   "weights")
    p.add_argument("--name", default="fashion_diffusion", help="the diffusion weights' file name in --out, without "
                   ".safetensors")
    p.add_argument("--max-seconds", type=float, default=0, help="stop after this much training time (the file records "
                   "the steps made); 0: no limit")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the UNet (the small UNet is launch-bound)")
    return p.parse_args()


def setup_comfyui(path: str, device: str):
    sys.path.insert(0, path)
    sys.path.insert(0, str(ROOT))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    if device == "cpu":
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] uint8 → [N, 3, H, W] float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


def batch_sizes(args) -> list[tuple[int, int]]:
    """(image size, images per batch) of each batch in turn: the same number of pixels at every size."""
    from reference.data import RESOLUTION

    sizes = [int(s) for s in args.sizes.split(",")]
    return [(s, max(1, args.batch * RESOLUTION**2 // s**2)) for s in sizes]


def train_diffusion(args, images, labels, num_classes, device):
    from reference.data import RESOLUTION
    from reference.model import build_base_model, class_tokens_parameter, initialise_for_training, unet_state

    model = build_base_model(device=device, dtype=torch.float32)
    tokens = class_tokens_parameter(num_classes, device)
    if args.init:
        from safetensors.torch import load_file

        state = load_file(args.init, device=str(device))
        model.diffusion_model.load_state_dict({k: v.float() for k, v in unet_state(state).items()})
        with torch.no_grad():
            tokens.copy_(state["class_tokens"].float())
    else:
        initialise_for_training(model)
    model.diffusion_model.train()
    schedule = batch_sizes(args)
    # Compiled for one size only: ComfyUI's UNet compiles in pieces (graph breaks), and every piece recompiles for
    # every shape, which at two sizes runs into torch's recompile limit and costs more than it saves.
    if not args.no_compile and len(schedule) == 1:
        model.diffusion_model.compile()
    params = list(model.diffusion_model.parameters()) + [tokens]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    sigmas = model.model_sampling.sigmas.to(device)
    null = num_classes
    g = torch.Generator(device=device).manual_seed(args.seed)
    start = time.time()
    weak = None
    steps = args.weak_at if args.weak_only else args.steps
    done = 0
    for step in range(steps):
        size, batch = schedule[step % len(schedule)]
        idx = torch.randint(0, images.shape[0], (batch,), device=device, generator=g)
        x0 = augment(to_model_space(images[idx]))
        if size != RESOLUTION:
            x0 = torch.nn.functional.interpolate(x0, size=(size, size), mode="bilinear", align_corners=False)
        y = torch.where(torch.rand(batch, device=device, generator=g) < args.uncond_prob, null, labels[idx])
        sigma = sigmas[torch.randint(0, sigmas.shape[0], (batch,), device=device, generator=g)]
        noise = torch.randn(x0.shape, device=device, generator=g)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            denoised = model.apply_model(x, sigma, c_crossattn=tokens[y])
        # v-prediction loss written on the denoised output: ‖v̂ − v‖² = ‖D̂ − x0‖² (σ² + 1) / σ²  (σ_data = 1)
        weight = (sigma**2 + 1) / sigma**2
        loss = ((denoised.float() - x0) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # the usual EMA warm-up, so the average does not keep a share of the random initialisation
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            print(f"diffusion step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step + 1 == args.weak_at:
            weak = ema_state(model, ema)
        done = step + 1
        if args.max_seconds and time.time() - start > args.max_seconds:
            print(f"stopped by --max-seconds after step {step}", flush=True)
            break
    return (None if args.weak_only else ema_state(model, ema)), weak, done, time.time() - start


def ema_state(model, ema) -> dict:
    """The float16 state dict of the EMA weights: the UNet's state with each parameter replaced by its average
    (`ema` holds the averages in parameter order, then the class tokens)."""
    names = [name for name, _ in model.diffusion_model.named_parameters()]
    averaged = {**model.diffusion_model.state_dict(), **dict(zip(names, ema))}
    state = {f"diffusion_model.{k}": v.detach().half().contiguous() for k, v in averaged.items()}
    state["class_tokens"] = ema[len(names)].detach().half().contiguous()
    return state


def classification_accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Class accuracy of `net` on uint8 images, in batches of 1000."""
    with torch.no_grad():
        pred = torch.cat([net(to_model_space(images[i: i + 1000])).argmax(1) for i in range(0, len(images), 1000)])
    return (pred == labels).float().mean().item()


def train_classifier(args, images, labels, test_images, test_labels, num_classes, device):
    from reference.classifier import Classifier

    torch.manual_seed(args.seed)
    net = Classifier(num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = args.classifier_epochs * (images.shape[0] // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (256,), device=device, generator=g)
        x = augment(to_model_space(images[idx]))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    accuracy = classification_accuracy(net, test_images, test_labels)
    print(f"classifier test accuracy {accuracy:.4f} ({time.time() - start:.0f}s)", flush=True)
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in net.state_dict().items()}
    return state, accuracy


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    from safetensors.torch import save_file

    from reference.data import CLASS_NAMES, ensure_fashion_mnist, load_split

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    classifier = not args.skip_classifier and not args.weak_only
    folder = ensure_fashion_mnist(pathlib.Path(args.data), ("train", "test") if classifier else ("train",))
    train_x, train_y = (torch.from_numpy(a).to(device) for a in load_split(folder, "train"))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "reference/train.py"] + sys.argv[1:])
    meta = {"class_names": ",".join(CLASS_NAMES), "seed": str(args.seed), "command": command, "sizes": args.sizes,
            "train_images": str(len(train_x)),
            "data": "Fashion-MNIST from Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1 (MIT)"}
    state, weak, steps_done, seconds = train_diffusion(args, train_x, train_y, len(CLASS_NAMES), device)
    if state is not None:
        save_file(state, out / f"{args.name}.safetensors", metadata=dict(meta, steps=str(steps_done), train_seconds=f"{seconds:.0f}"))
    if weak is not None:
        # Autoguidance's weak model (Karras et al. 2024): the same model and training, stopped early.
        save_file(weak, out / "fashion_weak_diffusion.safetensors",
                  metadata=dict(meta, steps=str(args.weak_at), of_steps=str(args.steps), role="weak model for autoguidance"))
    report = {"diffusion_train_seconds": seconds, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "command": command}
    if classifier:
        test_x, test_y = (torch.from_numpy(a).to(device) for a in load_split(folder, "test"))
        cstate, accuracy = train_classifier(args, train_x, train_y, test_x, test_y, len(CLASS_NAMES), device)
        save_file(cstate, out / "fashion_classifier.safetensors", metadata=dict(meta, test_accuracy=f"{accuracy:.4f}"))
        report["classifier_test_accuracy"] = accuracy
    print(json.dumps(report))


if __name__ == "__main__":
    main()
