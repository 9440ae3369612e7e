"""The ComfyUI side of a classifier on the denoised prediction (`guiders/classifier.py`): the reference classifier,
target classes bound to a classifier, and the decode that takes a model's denoised latent to the classifier's input.

Kept apart from the node classes so that scripts (benchmarks) build classifiers and decoders exactly as the nodes do
without importing ComfyUI's node API.

Gradients inside a prompt. ComfyUI runs every node under `torch.inference_mode`, and its loaders make (and its model
management moves) weights there; an inference tensor cannot be saved for backward. So everything a gradient flows
through here owns its parameters made outside inference mode: the classifier network (made so by its loader) and a
copy of the VAE's decoder (`differentiable_decoder`). The copy costs the decoder's memory once per patched model.
"""

import copy
import dataclasses
import pathlib

import torch
from torch import nn

from ..guiders.classifier import ClassifierOnDenoised, ImageClassifier
from ..reference.classifier import load_classifier
from ..reference.data import CLASS_NAMES, RESOLUTION

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "reference" / "weights"
DEFAULT_CLASSIFIER = "fashion_classifier.safetensors"
# Images per classifier pass: bounds the memory of the decode and of its backward pass on large latents.
DEFAULT_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class ClassifierTargets:
    """A classifier and the class each image of the batch is guided towards (one entry: every image)."""

    classifier: ImageClassifier
    targets: tuple[int, ...]

    def for_batch(self, batch: int, node_name: str, device: torch.device) -> torch.Tensor:
        """The target of each of `batch` images, or a clear refusal when the list does not fit the batch."""
        if len(self.targets) not in (1, batch):
            raise ValueError(
                f"{node_name}: Classifier Target Classes gives {len(self.targets)} targets for a batch of {batch} "
                "images. Give one class (for every image), or classes x images_per_class equal to the batch size, "
                "in the order of the batch.")
        targets = self.targets * batch if len(self.targets) == 1 else self.targets
        return torch.tensor(targets, device=device)


class UnitRangeInput(nn.Module):
    """Feeds a network that reads RGB in [-1, 1] (the reference classifiers) with images in [0, 1]."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images * 2 - 1)


def classifier_files() -> list[str]:
    # *_classifier files only: the judge (fashion_judge) judges the benches and never guides
    return sorted(p.name for p in WEIGHTS_DIR.glob("*_classifier.safetensors")) or [DEFAULT_CLASSIFIER]


def reference_classifier(weights: str = DEFAULT_CLASSIFIER) -> ImageClassifier:
    """The reference model's classifier as an ImageClassifier, its parameters made outside inference mode."""
    path = WEIGHTS_DIR / weights
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reinstall the pack or run reference/train.py to make it")
    with torch.inference_mode(False):
        network = UnitRangeInput(load_classifier(path, len(CLASS_NAMES), torch.device("cpu")))
    network.requires_grad_(False)
    return ImageClassifier(network, (3, RESOLUTION, RESOLUTION), tuple(CLASS_NAMES), "image",
                           f"reference classifier {weights}")


def straight_through_clamp(images: torch.Tensor) -> torch.Tensor:
    """Images clamped to [0, 1] in value, with the gradient of the identity: as the official EluCD code, which takes
    the classifier's gradient at the clamped prediction and applies it to every pixel."""
    return images + (images.clamp(0, 1) - images).detach()


def output_map(vae) -> tuple[float, float]:
    """(a, b) of the VAE's output map before its clamp, image = clamp(a·decoded + b): ComfyUI's image VAEs use
    (x + 1)/2 or the identity; probed at 0 and 0.5, where neither clamps."""
    probe = vae.process_output(torch.tensor([0.0, 0.5]))
    a = float(probe[1] - probe[0]) / 0.5
    return a, float(probe[0])


def differentiable_decoder(vae, latent_format, node_name: str):
    """decode(denoised latent in the sampler's space) → RGB images [B, 3, H, W] in [0, 1], differentiable: a copy of
    the VAE's decoder with its own parameters (see the module docstring), the model's latent scaling undone first."""
    with torch.inference_mode(False):
        decoder = copy.deepcopy(vae.first_stage_model)
    decoder.eval().requires_grad_(False)
    dtype = vae.vae_dtype
    a, b = output_map(vae)

    def decode(denoised: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):  # moved under inference mode, its weights could not enter the graph
            decoder.to(denoised.device)
        images = decoder.decode(latent_format.process_out(denoised).to(dtype)).float()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{node_name}: the VAE decodes this model's latents to shape {tuple(images.shape)}, "
                             "not to RGB images [batch, 3, height, width]; image classifiers guide image models "
                             "only (use a classifier that reads latents)")
        return straight_through_clamp(a * images + b)

    return decode


def classifier_on_denoised(classifier: ImageClassifier, network: nn.Module, model, vae, node_name: str,
                           chunk: int = DEFAULT_CHUNK) -> ClassifierOnDenoised:
    """The classifier (its `network` possibly a method's modified copy) on the denoised prediction of the
    ModelPatcher `model`: through a differentiable copy of `vae`'s decoder for an image classifier, directly on the
    latent for a latent classifier."""
    if classifier.space == "latent":
        decode = None
    elif vae is None:
        raise ValueError(f"{node_name}: {classifier.name} reads images: connect the model's VAE to the vae input "
                         "(the reference model's loader has one)")
    else:
        decode = differentiable_decoder(vae, model.get_model_object("latent_format"), node_name)
    options = {} if decode is None else {"decode": decode}
    return ClassifierOnDenoised(network, classifier.input_shape, chunk=chunk, name=f"{node_name}: {classifier.name}",
                                **options)
