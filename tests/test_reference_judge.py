"""The independent judge (reference/judge.py): other architecture, other seed, other data than the guiding
classifier, and the shipped weights do what their metadata says on the images they never saw."""

import os
import pathlib

import torch
from safetensors import safe_open

from conftest import REPO
from reference.classifier import Classifier, load_classifier
from reference.data import CLASS_NAMES, ensure_fashion_mnist, load_split
from reference.judge import JUDGE_TRAIN, Judge, judge_split, load_judge
from reference.train import to_model_space

WEIGHTS = REPO / "reference" / "weights"
DATA = pathlib.Path(os.environ.get("GUIDANCE_CACHE", "~/.cache/comfyui-guidance")).expanduser() / "fashion-mnist"


def metadata(name):
    with safe_open(str(WEIGHTS / name), "pt") as f:
        return f.metadata()


def layer_types(net):
    return {type(m) for m in net.modules() if not list(m.children())}


def test_judge_shares_no_design_with_the_guide():
    judge, guide = layer_types(Judge()), layer_types(Classifier())
    assert {torch.nn.BatchNorm2d, torch.nn.MaxPool2d, torch.nn.ReLU} <= guide
    assert not judge & {torch.nn.BatchNorm2d, torch.nn.MaxPool2d, torch.nn.ReLU}
    assert {torch.nn.GroupNorm, torch.nn.SiLU} <= judge
    ours, theirs = metadata("fashion_judge.safetensors"), metadata("fashion_classifier.safetensors")
    assert ours["seed"] != theirs["seed"] and ours["class_names"] == theirs["class_names"]
    assert ours["train_images"] == f"test split [0, {JUDGE_TRAIN})"  # the guide trained on the train split


def test_shipped_judge_reaches_its_recorded_accuracy_on_images_it_never_saw():
    images, labels = (torch.from_numpy(a) for a in load_split(ensure_fashion_mnist(DATA, ("test",)), "test"))
    _, (held_x, held_y) = judge_split(images, labels)
    judge = load_judge(WEIGHTS / "fashion_judge.safetensors", torch.device("cpu"))
    guide = load_classifier(WEIGHTS / "fashion_classifier.safetensors", len(CLASS_NAMES), torch.device("cpu"))
    with torch.no_grad():
        x = to_model_space(held_x)
        judged, guided = judge(x).argmax(1), guide(x).argmax(1)
    accuracy = (judged == held_y).float().mean().item()
    assert abs(accuracy - float(metadata("fashion_judge.safetensors")["held_out_accuracy"])) < 0.005
    assert accuracy > 0.88
    # Two classifiers that err on different images: each is right where the other is wrong somewhere.
    assert ((judged == held_y) & (guided != held_y)).sum() > 10 and ((guided == held_y) & (judged != held_y)).sum() > 10
