"""Saliency maps from markers (guiders/saliency.py) against a float64 oracle built from scipy's
`distance_transform_edt` and `gaussian_filter` (ComfyUI installs scipy), and their resizing to latents."""

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt, gaussian_filter

from comfyui_guidance.guiders import saliency


def oracle(markers: np.ndarray, radius: float, sigma: float) -> np.ndarray:
    """The map of one image in float64: distance transform, 1 − d/radius clipped at 0, Gaussian, peak 1."""
    closeness = np.clip(1 - distance_transform_edt(~markers) / radius, 0, None)
    blurred = gaussian_filter(closeness, sigma, mode="reflect", truncate=4.0) if sigma else closeness
    return blurred / blurred.max()


def random_markers(batch, height, width, density, seed):
    markers = torch.rand(batch, height, width, generator=torch.Generator().manual_seed(seed)) < density
    markers[:, 0, 0] |= ~markers.flatten(1).any(1)  # at least one per image
    return markers


@pytest.mark.parametrize("height,width,radius,sigma", [(37, 53, 9.0, 2.5), (64, 64, 64.0, 0.0), (20, 90, 4.5, 7.0),
                                                       (48, 32, 200.0, 30.0)])
def test_map_equals_float64_oracle(height, width, radius, sigma):
    markers = random_markers(3, height, width, 0.004, seed=height)
    got = saliency.saliency_map(markers, radius, sigma)
    want = np.stack([oracle(m.numpy(), radius, sigma) for m in markers])
    assert got.shape == (3, height, width)
    assert np.abs(got.double().numpy() - want).max() < 2e-6


def test_distance_transform_is_exact_within_reach():
    markers = random_markers(2, 70, 41, 0.01, seed=3)
    want = np.stack([distance_transform_edt(~m.numpy()) for m in markers])
    full = saliency.squared_distance(markers).double().sqrt().numpy()
    assert np.abs(full - want).max() < 1e-5
    near = saliency.squared_distance(markers, reach=5.0).double().sqrt().numpy()
    assert np.abs(np.where(want <= 5, near - want, 0)).max() < 1e-5 and (near[want > 5] > 5).all()


def test_points_become_markers_and_bad_points_are_refused():
    points = saliency.parse_points("3,4; 10.4, 0\n0,7")
    assert points == [(3.0, 4.0), (10.4, 0.0), (0.0, 7.0)]
    markers = saliency.markers_from_points(points, 8, 12)
    assert markers.sum() == 3 and markers[4, 3] and markers[0, 10] and markers[7, 0]
    for text, message in (("3;4", "is not a point x,y"), ("a,b", "of numbers"), ("", "no marker"),
                          ("nan,1", "not finite")):
        with pytest.raises(ValueError, match=message):
            saliency.parse_points(text)
    with pytest.raises(ValueError, match="outside the 12x8 image"):
        saliency.markers_from_points([(12, 0)], 8, 12)


def test_an_image_without_markers_and_bad_parameters_are_refused():
    markers = random_markers(2, 8, 8, 0.1, seed=1)
    markers[1] = False
    with pytest.raises(ValueError, match="image 1 of the batch has no marker"):
        saliency.saliency_map(markers, 3.0, 1.0)
    for radius, sigma, message in ((0.0, 1.0, "radius"), (float("nan"), 1.0, "radius"), (3.0, -1.0, "sigma")):
        with pytest.raises(ValueError, match=message):
            saliency.saliency_map(random_markers(1, 8, 8, 0.1, seed=2), radius, sigma)


def test_latent_weights_resize_and_broadcast():
    masks = torch.rand(2, 64, 48, generator=torch.Generator().manual_seed(0))
    image = torch.zeros(2, 4, 8, 6)
    weights = saliency.latent_weights(masks, image, "node")
    assert weights.shape == (2, 1, 8, 6)
    assert torch.allclose(weights, masks.view(2, 8, 8, 6, 8).mean(dim=(2, 4)).unsqueeze(1), atol=1e-6)  # area mean
    assert saliency.latent_weights(masks[:1], image, "node").shape == (1, 1, 8, 6)
    video = torch.zeros(2, 16, 3, 8, 6)
    assert saliency.latent_weights(masks[:1], video, "node").shape == (1, 1, 1, 8, 6)
    per_frame = saliency.latent_weights(torch.rand(6, 64, 48), video, "node")
    assert per_frame.shape == (2, 1, 3, 8, 6)
    with pytest.raises(ValueError, match="node: mask has 3 images for a latent batch of 2: give 1"):
        saliency.latent_weights(torch.rand(3, 64, 48), image, "node")
