"""Trains the independent judge (reference/judge.py) on the part of the Fashion-MNIST test split that the guiding
classifier never saw, and checks it on the rest:

    python reference/train_judge.py --data DATA_DIR --out reference/weights

The defaults made the shipped reference/weights/fashion_judge.safetensors (float16; its metadata holds the split,
the seed, the held-out accuracy and the command). A minute on one GPU; `--device cpu` works, slowly.
"""

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reference.data import CLASS_NAMES, ensure_fashion_mnist, load_split  # noqa: E402
from reference.judge import JUDGE_SEED, JUDGE_TRAIN, Judge, judge_split  # noqa: E402
from reference.train import augment, classification_accuracy, to_model_space  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder for the Fashion-MNIST files (fetched if missing)")
    p.add_argument("--out", default=str(ROOT / "reference" / "weights"))
    p.add_argument("--seed", type=int, default=JUDGE_SEED)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda")
    return p.parse_args()


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (zero fill): with only 8,000 images the judge needs more than flips."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, (dy, dx), dims=(2, 3))


def train(args, images, labels, device):
    torch.manual_seed(args.seed)
    net = Judge(len(CLASS_NAMES)).to(device)
    steps = args.epochs * (len(images) // args.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed + 1)
    for step in range(steps):
        idx = torch.randint(0, len(images), (args.batch,), generator=g).to(device)
        x = shift(augment(to_model_space(images[idx])), g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"judge step {step}/{steps} loss {loss.item():.4f}", flush=True)
    return net.eval()


def main():
    from safetensors.torch import save_file

    args = parse_args()
    device = torch.device(args.device)
    folder = ensure_fashion_mnist(pathlib.Path(args.data), ("test",))
    test_x, test_y = (torch.from_numpy(a).to(device) for a in load_split(folder, "test"))
    (train_x, train_y), (held_x, held_y) = judge_split(test_x, test_y)
    began = time.time()
    net = train(args, train_x, train_y, device)
    seconds = time.time() - began
    held_out = classification_accuracy(net, held_x, held_y)
    command = " ".join(["python", "reference/train_judge.py"] + sys.argv[1:])
    meta = {"class_names": ",".join(CLASS_NAMES), "seed": str(args.seed), "command": command,
            "data": "Fashion-MNIST from Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1 (MIT)",
            "train_images": f"test split [0, {JUDGE_TRAIN})", "held_out_images": f"test split [{JUDGE_TRAIN}, 10000)",
            "held_out_accuracy": f"{held_out:.4f}", "train_seconds": f"{seconds:.0f}",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    save_file(state, out / "fashion_judge.safetensors", metadata=meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
