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

Plain torch: the network, the decoder and the class set come from the caller. The network must treat the images of
a batch independently (BatchNorm in eval mode), since one backward pass serves a whole chunk.
"""

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


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
            # ComfyUI runs a prompt under inference mode, whose tensors cannot enter a graph: the chunk is copied out
            # of it (the network's weights must have been made outside it too).
            with torch.inference_mode(False), torch.enable_grad():
                x = part.detach().clone().requires_grad_(True)
                value = log_prob(self.logits(x), y)
                (grad,) = torch.autograd.grad(value.sum(), x)
            grads.append(grad.detach())
            log_probs.append(value.detach())
        return torch.cat(grads), torch.cat(log_probs)
