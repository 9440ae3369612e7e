"""Sample-quality metrics of bench/reference_eval.py, in plain torch.

Images are RGB in [-1, 1], [N, 3, H, W], as the reference model produces them; features are the evaluation
classifier's penultimate activations ([N, 256]). Distances and covariances are computed in float64, so results do
not depend on the device or on TF32 settings.
"""

import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    ‖μa − μb‖² + tr(Σa) + tr(Σb) − 2 tr((Σa Σb)^½).

    tr((Σa Σb)^½) is taken as Σ √λ over the eigenvalues λ of √Σa Σb √Σa, which has the same spectrum as Σa Σb but
    is symmetric: its eigenvalues come out real, and the tiny negative ones that rounding leaves on a rank-deficient
    covariance (fewer images than feature dimensions) can be clipped to zero instead of producing complex roots.
    """
    a, b = features_a.double(), features_b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2 * cross)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-noise eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019, arXiv:1904.06991).

    Each set's manifold is the union of balls around its points with radius the distance to the point's k-th nearest
    neighbour in its own set. Precision: the fraction of generated points inside the real manifold (are the images
    realistic?). Recall: the fraction of real points inside the generated manifold (is the variety covered?). The
    two sets should have the same size, since the radii shrink as a set grows.
    """
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    real, generated = real.double(), generated.double()
    return {
        "precision": _manifold_coverage(generated, real, k),
        "recall": _manifold_coverage(real, generated, k),
    }


def _manifold_coverage(points: torch.Tensor, manifold: torch.Tensor, k: int) -> float:
    """Fraction of `points` within the k-NN radius of at least one point of `manifold`."""
    # k + 1: each manifold point's smallest distance is the zero distance to itself
    radii = torch.cdist(manifold, manifold).kthvalue(k + 1, dim=1).values
    inside = torch.cdist(points, manifold) <= radii[None, :]
    return float(inside.any(dim=1).double().mean())


def to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space → [0, 1] display space, clamped as an image viewer or ComfyUI's VAE Decode clamps it."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def hsv_saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation (max − min) / max over all pixels of the clamped images; 0 for black pixels.

    Note that near-black pixels carry large saturation for tiny channel differences, so on dark backgrounds this
    measure also counts faint colour noise; `chroma` does not.
    """
    rgb = to_unit_rgb(images)
    high, low = rgb.amax(dim=1), rgb.amin(dim=1)
    return float(((high - low) / high.clamp(min=torch.finfo(high.dtype).tiny)).mean())


def chroma(images: torch.Tensor) -> float:
    """Mean HSV chroma max − min over all pixels of the clamped images: colourfulness in absolute units, not
    amplified on dark pixels as saturation is."""
    rgb = to_unit_rgb(images)
    return float((rgb.amax(dim=1) - rgb.amin(dim=1)).mean())


def out_of_range_fraction(images: torch.Tensor) -> float:
    """Fraction of pixel values (every channel of every pixel) outside [-1, 1] before clamping: the part of the
    sample that a viewer clips, the pixel-space trace of over-saturation at high guidance."""
    return float((images.abs() > 1).double().mean())


def overshoot(images: torch.Tensor) -> float:
    """Mean of max(|x| − 1, 0) over all pixel values: how far past [-1, 1] the sample goes, on average, in model
    units. Unlike the out-of-range fraction it is not filled up by the faint jitter of backgrounds that sit at −1."""
    return float((images.double().abs() - 1).clamp(min=0).mean())


def foreground_components(images: torch.Tensor, threshold: float = 0.1, min_area: int = 8) -> torch.Tensor:
    """Number of foreground objects in each image: 8-connected components of the pixels whose grey value (the channel
    mean of the clamped image, in [0, 1]) is above `threshold`, counting only components of at least `min_area`
    pixels. [N, 3, H, W] in [-1, 1] → [N] (int64).

    A Fashion-MNIST image holds one garment on a black background, so a count above 1 marks an image with repeated or
    broken-up objects (what direct sampling above the training size is known for), 0 an empty one. At 32² with the
    defaults, 2.4 % of the real test split count more than one (mostly sneakers and sandals, whose soles and straps
    separate) and none count zero; a higher threshold splits dark garments into pieces.

    Labels spread by 3×3 max-pooling within the foreground until nothing changes (each component ends up labelled
    with its largest pixel index), in plain torch."""
    grey = to_unit_rgb(images).mean(dim=1)  # [N, H, W]
    n, h, w = grey.shape
    foreground = grey > threshold
    # float32 holds every pixel index exactly up to 2^24 pixels per image
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=grey.device).view(1, h, w).expand(n, h, w)
    zero = torch.zeros((), dtype=torch.float32, device=grey.device)
    labels = torch.where(foreground, index, zero)[:, None]
    mask = foreground[:, None]
    active = torch.arange(n, device=grey.device)  # images whose labels still change
    while len(active):
        part, part_mask = labels[active], mask[active]
        previous = part
        for _ in range(8):  # converged labels stay put, so checking every 8 rounds changes nothing
            part = torch.where(part_mask, torch.nn.functional.max_pool2d(part, 3, stride=1, padding=1), zero)
        labels[active] = part
        active = active[(part != previous).flatten(1).any(dim=1)]
    labels = labels[:, 0]
    labels = labels.long().view(n, -1)
    offset = torch.arange(n, device=labels.device).view(n, 1) * (h * w + 1)
    sizes = torch.bincount((labels + offset).flatten(), minlength=n * (h * w + 1)).view(n, h * w + 1)
    sizes[:, 0] = 0  # the background
    return (sizes >= min_area).sum(dim=1).cpu()


def object_counts(images: torch.Tensor, threshold: float = 0.1, min_area: int = 8) -> dict:
    """Summary of `foreground_components`: the mean count, the fraction of images with more than one object (repeated
    or broken objects) and with none (empty images)."""
    counts = foreground_components(images, threshold, min_area).double()
    return {"components_mean": float(counts.mean()), "multi_object_fraction": float((counts > 1).double().mean()),
            "empty_fraction": float((counts == 0).double().mean())}
