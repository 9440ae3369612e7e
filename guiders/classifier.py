"""A classifier applied to the denoised prediction: the interface shared by the classifier-guided methods.

Off-the-shelf classifiers are trained on clean images, never on noisy ones. EluCD (Ma et al., arXiv:2310.11311) and
GFCG (Shenoy et al., arXiv:2411.15393) therefore both read the classifier on the denoised estimate D(x_t, σ), the
model's x0 prediction (what ComfyUI's CFG step combines), in the classifier's own input space: images obtained by a
`decode` function (ComfyUI's VAE decode for a latent model, the identity for a pixel-space one), resized to the
classifier's resolution. EluCD needs the gradient of a class log-probability with respect to D; GFCG needs only the
class probabilities (no back-propagation).

`ClassifierOnDenoised` does both, batched in chunks of `chunk` images so that a large batch or a large decoder fits
in memory, and keeps no autograd graph past the call: `probabilities` runs under `torch.no_grad`, and
`log_prob_gradient` builds the graph of one chunk at a time, takes its gradient and drops it, so a sampler's state
never carries a graph from one step to the next. `classes` restricts the logits to a chosen class set (the softmax is
then over that set).

`ImageClassifier` is what a classifier loader hands the classifier-guided nodes (the reference classifier, a
zero-shot CLIP vision classifier): the network, its input, its class names; `target_classes` turns a user's list of
classes into one target per image.

Plain torch: the network, the decoder and the class set come from the caller. The network must treat the images of
a batch independently (BatchNorm in eval mode), since one backward pass serves a whole chunk.
"""

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The target list meaning every class of the classifier in turn (as the reference model's class conditioning does).
ALL_CLASSES = "all classes"


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclasses.dataclass(frozen=True)
class ImageClassifier:
    """A classifier as the classifier-guided nodes receive it.

    network: inputs [N, C, H, W] → logits [N, len(class_names)], in eval mode, float32, its parameters made outside
    torch.inference_mode (ComfyUI runs nodes under it; inference tensors cannot enter a gradient graph);
    input_shape: its (C, H, W); space: "image" if it reads RGB images in [0, 1] (ComfyUI's IMAGE range, channels
    first), decoded from the model's latent by the VAE, or "latent" if it reads the model's denoised latent itself."""

    network: nn.Module
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    space: str = "image"
    name: str = "classifier"

    def __post_init__(self):
        if self.space not in ("image", "latent"):
            raise ValueError(f"{self.name}: space must be 'image' or 'latent', not {self.space!r}")
        if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
            raise ValueError(f"{self.name}: class names must be distinct and at least one")


def target_classes(text: str, class_names: tuple[str, ...], images_per_class: int) -> tuple[int, ...]:
    """One target class index per image: `text` lists classes by name or index, separated by commas (or is
    ALL_CLASSES: every class in turn); each is repeated `images_per_class` times, in order, as the reference model's
    class conditioning orders its batch."""
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, not {images_per_class}")
    if text.strip().lower() == ALL_CLASSES:
        chosen = list(range(len(class_names)))
    else:
        chosen = [class_index(item.strip(), class_names) for item in text.split(",")]
    return tuple(index for index in chosen for _ in range(images_per_class))


def class_index(item: str, class_names: tuple[str, ...]) -> int:
    """The index of one class given by name (case-insensitive) or by number."""
    if not item:
        raise ValueError("a class is empty: list classes separated by single commas")
    if item.lstrip("-").isdigit():
        index = int(item)
        if not 0 <= index < len(class_names):
            raise ValueError(f"class {index} is out of range: the classifier has {len(class_names)} classes "
                             f"(0 to {len(class_names) - 1})")
        return index
    lowered = [name.lower() for name in class_names]
    if item.lower() not in lowered:
        shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
        raise ValueError(f"the classifier has no class {item!r}; its classes are {shown}")
    return lowered.index(item.lower())


@dataclasses.dataclass(frozen=True)
class ClassifierOnDenoised:
    """network: images [N, C, H, W] in the classifier's input range → logits [N, K]; input_shape: its (C, H, W);
    decode: denoised predictions [B, ...] (model space) → images [B, C', H', W'] in the classifier's input range;
    classes: the logit columns kept, in order (None: all); chunk: images per forward pass."""

    network: Callable[[torch.Tensor], torch.Tensor]
    input_shape: tuple[int, int, int]
    decode: Callable[[torch.Tensor], torch.Tensor] = identity
    classes: tuple[int, ...] | None = None
    chunk: int = 64
    name: str = "classifier"

    def __post_init__(self):
        if self.chunk < 1:
            raise ValueError(f"{self.name}: chunk must be at least 1, not {self.chunk}")

    def images(self, denoised: torch.Tensor) -> torch.Tensor:
        """The classifier's input for `denoised`: decoded, checked, resized to its resolution."""
        images = self.decode(denoised)
        channels, height, width = self.input_shape
        if images.ndim != 4 or images.shape[0] != denoised.shape[0]:
            raise ValueError(f"{self.name}: the decoder gave images of shape {tuple(images.shape)} for a batch of "
                             f"{denoised.shape[0]}; it must give [batch, channels, height, width]")
        if images.shape[1] != channels:
            raise ValueError(f"{self.name}: the model's decoded images have {images.shape[1]} channels, the "
                             f"classifier takes {channels}; use a classifier made for this model's images")
        if images.shape[2:] != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images

    def logits(self, denoised: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of the (chosen) classes, in float32 or wider, differentiable with respect to `denoised`."""
        out = self.network(self.images(denoised))
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # a half-precision softmax loses the tails
        if out.ndim != 2:
            raise ValueError(f"{self.name}: the network returned shape {tuple(out.shape)}, not [batch, classes]")
        if self.classes is not None:
            if max(self.classes) >= out.shape[1] or min(self.classes) < 0:
                raise ValueError(f"{self.name}: class {max(self.classes)} is out of range: the classifier has "
                                 f"{out.shape[1]} classes (0 to {out.shape[1] - 1})")
            out = out[:, list(self.classes)]
        return out

    def probabilities(self, denoised: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / temperature) [B, K], chunked, without an autograd graph."""
        with torch.no_grad():
            return torch.cat([torch.softmax(self.logits(part) / temperature, dim=1)
                              for part in denoised.split(self.chunk)])

    def log_prob_gradient(self, denoised: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                          log_prob: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇_D log p(y | D), log p(y | D)) per sample, with p = softmax(logits / temperature) and y = `target`
        (indices into the chosen classes, [B]), or the per-sample `log_prob(logits, target)` given (a method's own
        calibrated form); chunked; the returned tensors carry no graph."""
        if log_prob is None:
            def log_prob(logits, y):
                return torch.log_softmax(logits / temperature, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        grads, log_probs = [], []
        for part, y in zip(denoised.split(self.chunk), target.split(self.chunk)):
            # ComfyUI runs a prompt under inference mode, whose tensors cannot enter a graph: the chunk and its targets
            # are copied out of it (the network's weights must have been made outside it too).
            with torch.inference_mode(False), torch.enable_grad():
                x = part.detach().clone().requires_grad_(True)
                value = log_prob(self.logits(x), y.clone())
                (grad,) = torch.autograd.grad(value.sum(), x)
            grads.append(grad.detach())
            log_probs.append(value.detach())
        return torch.cat(grads), torch.cat(log_probs)
