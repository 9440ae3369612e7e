"""The weak reference model for autoguidance (reference/weights/fashion_weak_diffusion.safetensors): the same model
and training as the shipped one, stopped at step 1000 of 5000. The loader offers it, and it denoises real images it
never saw worse than the full model at every noise level, which is what autoguidance needs from it."""

import argparse

import torch

from reference.data import ensure_fashion_mnist, load_split
from reference.train import batch_sizes, to_model_space
from test_reference_judge import DATA, metadata

WEAK, FULL = "fashion_weak_diffusion.safetensors", "fashion_diffusion.safetensors"


def test_weak_model_is_the_same_training_stopped_early():
    weak, full = metadata(WEAK), metadata(FULL)
    assert (weak["steps"], weak["of_steps"]) == ("1000", full["steps"])
    assert weak["seed"] == full["seed"] and weak["class_names"] == full["class_names"]


def test_weak_model_loads_and_denoises_worse_than_the_full_model(comfy):
    loader = comfy.NODE_CLASS_MAPPINGS["GuidanceReferenceModelLoader"]
    assert WEAK in loader.define_schema().inputs[0].options
    images, labels = load_split(ensure_fashion_mnist(DATA, ("test",)), "test")
    x0 = to_model_space(torch.from_numpy(images[:64]))
    y = torch.from_numpy(labels[:64])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in (WEAK, FULL):
        model, _, classes = loader.execute(name).result
        tokens = classes["tokens"].float()
        errors[name] = []
        for sigma in (0.3, 1.0, 3.0, 10.0):
            s = torch.full((len(x0),), sigma)
            with torch.no_grad():
                denoised = model.model.apply_model(x0 + sigma * noise, s, c_crossattn=tokens[y]).float()
            errors[name].append(float((denoised - x0).square().mean()))
    assert all(w > f for w, f in zip(errors[WEAK], errors[FULL])), errors
    assert all(torch.isfinite(torch.tensor(errors[WEAK]))), errors


def test_two_size_training_gives_every_batch_the_same_pixels():
    """reference/train.py --sizes 32,64 (the two-size model of bench/apg_resolution_bench.py): 64² batches hold a
    quarter of the images."""
    assert batch_sizes(argparse.Namespace(sizes="32,64", batch=1024)) == [(32, 1024), (64, 256)]
    assert batch_sizes(argparse.Namespace(sizes="32", batch=1024)) == [(32, 1024)]
