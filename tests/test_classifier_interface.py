"""guiders/classifier.py, the classifier on the denoised prediction shared by the classifier-guided methods: the
gradient and probabilities equal a float64 reference (a linear softmax classifier, whose gradient is known in closed
form), chunking changes nothing, resizing is differentiated through, no graph survives a call (also under ComfyUI's
inference mode), and bad inputs are refused with messages that say what to fix."""

import pytest
import torch

from comfyui_guidance.guiders.classifier import ClassifierOnDenoised

CLASSES = 10


def linear(seed=0, shape=(3, 8, 8)):
    """A linear softmax classifier on images of `shape`, float64: (network, W [K, D], b [K])."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES, int(torch.tensor(shape).prod()), generator=g, dtype=torch.float64) * 0.1
    bias = torch.randn(CLASSES, generator=g, dtype=torch.float64)
    return (lambda x: x.flatten(1) @ weight.T + bias), weight, bias


def reference(denoised, weight, bias, classes, target, temperature):
    """∇_x log softmax(z/τ)_y = (W_y − Σ_k p_k W_k)/τ over the chosen classes, and log p_y."""
    w, b = weight[list(classes)], bias[list(classes)]
    p = torch.softmax((denoised.flatten(1) @ w.T + b) / temperature, dim=1)
    grad = (w[target] - p @ w) / temperature
    return grad.view_as(denoised), p.gather(1, target.view(-1, 1)).log().squeeze(1), p


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("classes", [None, (2, 5, 7)])
def test_gradient_and_probabilities_equal_float64_reference(chunk, classes):
    network, weight, bias = linear()
    denoised = torch.randn(7, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chosen = classes or tuple(range(CLASSES))
    target = torch.tensor([0, 1, 2, 0, 1, 2, 1]) % len(chosen)
    classifier = ClassifierOnDenoised(network, (3, 8, 8), classes=classes, chunk=chunk)
    grad, log_prob = classifier.log_prob_gradient(denoised, target, temperature=2.0)
    want_grad, want_log_prob, want_p = reference(denoised, weight, bias, chosen, target, 2.0)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(log_prob, want_log_prob, rtol=1e-10)
    assert torch.allclose(classifier.probabilities(denoised, temperature=2.0), want_p, rtol=1e-10)


def test_resized_input_is_differentiated_through():
    """A classifier at 8×8 on 16×16 decoded images: the gradient is that of classifier ∘ resize (float64 autograd of
    the composition, written out independently), with the denoised prediction's shape."""
    network, weight, bias = linear()
    denoised = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([4, 9])
    grad, _ = ClassifierOnDenoised(network, (3, 8, 8)).log_prob_gradient(denoised, target)
    x = denoised.clone().requires_grad_(True)
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    torch.log_softmax(network(small), 1).gather(1, target.view(-1, 1)).sum().backward()
    assert grad.shape == denoised.shape and torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-12)


def test_decoder_is_applied_and_no_graph_survives_inference_mode():
    """Through a decoder (here a fixed linear map from 4 latent channels to 3 image channels), called under
    torch.inference_mode as ComfyUI runs a prompt: results carry no graph and the gradient is the decoder's
    transpose applied to the image gradient."""
    network, weight, bias = linear()
    mix = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def decode(latent):
        return torch.einsum("cl,blhw->bchw", mix, latent)

    latent = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 2, 3])
    classifier = ClassifierOnDenoised(network, (3, 8, 8), decode=decode, chunk=2)
    with torch.inference_mode():
        grad, log_prob = classifier.log_prob_gradient(latent, target)
    image_grad, want_log_prob, _ = reference(decode(latent), weight, bias, range(CLASSES), target, 1.0)
    assert torch.allclose(grad, torch.einsum("cl,bchw->blhw", mix, image_grad), rtol=1e-10, atol=1e-12)
    assert torch.allclose(log_prob, want_log_prob, rtol=1e-10)
    assert grad.grad_fn is None and not grad.requires_grad and log_prob.grad_fn is None


def test_bad_inputs_are_refused_with_the_fix():
    network, _, _ = linear()
    images = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="2 channels, the classifier takes 3; use a classifier made for"):
        ClassifierOnDenoised(network, (3, 8, 8), name="EluCD").probabilities(images[:, :2])
    with pytest.raises(ValueError, match=r"class 12 is out of range: the classifier has 10 classes \(0 to 9\)"):
        ClassifierOnDenoised(network, (3, 8, 8), classes=(1, 12)).probabilities(images)
    with pytest.raises(ValueError, match=r"decoder gave images of shape \(2, 3, 8\)"):
        ClassifierOnDenoised(network, (3, 8, 8), decode=lambda x: x[:, :, 0]).probabilities(images)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        ClassifierOnDenoised(network, (3, 8, 8), chunk=0)
