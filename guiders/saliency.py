"""Saliency maps from markers, and their use as per-position guidance weights.

SDL-Seg (Kazemimoghadam et al., "Saliency-Guided Deep Learning Network for Automatic Tumor Bed Volume Delineation in
Post-operative Breast Irradiation", Phys. Med. Biol. 66 (2021), arXiv:2105.02771) turns marker positions into a
probability map, "a distance transformation coupled with a Gaussian filter", that tells a network where to look.
Only the paper's abstract is reachable from this project's machines, so the transform's form and parameters are ours,
chosen to keep the abstract's two operations and make the map's reach explicit in pixels:

    d(p)   = min over markers m of ‖p − m‖           (exact Euclidean distance transform)
    s(p)   = max(0, 1 − d(p) / radius)            (1 on a marker, 0 beyond `radius` pixels)
    S      = G_σ * s, divided by its maximum       (Gaussian filter, σ = `sigma` pixels; the map's peak is 1)

`radius` and `sigma` default to an eighth and a sixteenth of the image's shorter side (DEFAULT_RADIUS,
DEFAULT_SIGMA). The map weights a guidance method's update per latent position (`latent_weights`: resized to the
latent by area averaging, one map per image, the same map for every frame of a video latent or one per frame).

Plain torch; the distance transform is exact (Felzenszwalb & Huttenlocher's separable form as two min-plus passes,
"Distance Transforms of Sampled Functions", Theory of Computing 8 (2012): along rows by two scans, along columns as a
min-plus pass windowed to the map's radius) and the filter matches
`scipy.ndimage.gaussian_filter` (mode "reflect", truncate 4), which the tests use as the float64 oracle.
"""

import math
import re

import torch
import torch.nn.functional as F

TRUNCATE = 4.0  # the Gaussian kernel reaches TRUNCATE·σ, as scipy's default
# The map's reach and softness as fractions of the image's shorter side, so one setting fits every size.
DEFAULT_RADIUS = 1 / 8
DEFAULT_SIGMA = 1 / 16


def parse_points(text: str) -> list[tuple[float, float]]:
    """Points "x,y" in pixels, separated by ';' or new lines (e.g. "120,200; 300,210")."""
    points = []
    for item in re.split(r"[;\n]", text):
        item = item.strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split(",")]
        if len(parts) != 2:
            raise ValueError(f"marker {item!r} is not a point x,y: write points as x,y separated by ';'")
        try:
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"marker {item!r} is not a point x,y of numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"marker {item!r} is not finite")
        points.append((x, y))
    if not points:
        raise ValueError("no marker given: write at least one point x,y in pixels")
    return points


def markers_from_points(points: list[tuple[float, float]], height: int, width: int) -> torch.Tensor:
    """A marker mask [H, W] (bool) with the pixel of each point set; points outside the image are refused."""
    markers = torch.zeros(height, width, dtype=torch.bool)
    for x, y in points:
        col, row = int(round(x)), int(round(y))
        if not (0 <= col < width and 0 <= row < height):
            raise ValueError(f"marker {x:g},{y:g} lies outside the {width}x{height} image")
        markers[row, col] = True
    return markers


def _row_distance(markers: torch.Tensor) -> torch.Tensor:
    """Distance along each row to the nearest marker of that row (inf where it has none), by two scans."""
    cols = torch.arange(markers.shape[2], device=markers.device, dtype=torch.float32).view(1, 1, -1)
    left = torch.where(markers, cols, -math.inf).cummax(dim=2).values  # the last marker at or left of each pixel
    right = torch.where(markers, cols, math.inf).flip(2).cummin(dim=2).values.flip(2)  # the first at or right
    return torch.minimum(cols - left, right - cols)


def _min_plus_columns(g: torch.Tensor, reach: int) -> torch.Tensor:
    """min over |k| ≤ reach of k² + g[:, i + k] along dimension 1 (whole rows at a time: contiguous memory)."""
    n = g.shape[1]
    out = g.clone()
    shifted = torch.empty_like(g)
    for k in range(1, min(reach, n - 1) + 1):
        for target, source in ((out[:, :n - k], g[:, k:]), (out[:, k:], g[:, :n - k])):
            torch.add(source, k * k, out=shifted[:, :n - k])
            torch.minimum(target, shifted[:, :n - k], out=target)
    return out


def squared_distance(markers: torch.Tensor, reach: float = math.inf) -> torch.Tensor:
    """Squared Euclidean distance [B, H, W] of every pixel to the nearest marker of its image, exact wherever it is
    at most `reach`² (elsewhere larger than `reach`², which is all a map that ends at `reach` needs, and much faster);
    float32, whose integers are exact up to 2²⁴ (images up to 4096 pixels on a side); markers [B, H, W] bool, at
    least one per image."""
    if markers.ndim != 3:
        raise ValueError(f"markers must be [batch, height, width], not {tuple(markers.shape)}")
    empty = [i for i in range(markers.shape[0]) if not markers[i].any()]
    if empty:
        raise ValueError(f"image {empty[0]} of the batch has no marker: mark at least one pixel per image")
    side = max(markers.shape[1:])
    window = side if reach >= side else math.ceil(reach)
    cap = float((window + 1) ** 2)  # beyond the window every distance is at least this: no need to tell them apart
    row = _row_distance(markers).clamp(max=window + 1)
    # the nearest marker within `reach` is within `reach` rows, so the windowed pass finds it
    return _min_plus_columns(row.square(), window).clamp(max=cap)


def gaussian_kernel(sigma: float, dtype=torch.float32) -> torch.Tensor:
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """scipy's "reflect" (half-sample symmetric: d c b a | a b c d | d c b a), repeated as often as `pad` needs."""
    while pad > 0:
        step = min(pad, x.shape[dim])
        before = x.narrow(dim, 0, step).flip(dim)
        after = x.narrow(dim, x.shape[dim] - step, step).flip(dim)
        x = torch.cat([before, x, after], dim=dim)
        pad -= step
    return x


def gaussian_filter(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of [B, H, W] images, as scipy.ndimage.gaussian_filter(mode="reflect")."""
    if sigma == 0:
        return images
    kernel = gaussian_kernel(sigma, images.dtype).to(images.device)
    radius = (kernel.numel() - 1) // 2
    out = images.unsqueeze(1)
    for dim, shape in ((2, (1, 1, -1, 1)), (3, (1, 1, 1, -1))):
        out = F.conv2d(_reflect_pad(out, radius, dim), kernel.view(shape))
    return out.squeeze(1)


def saliency_map(markers: torch.Tensor, radius: float, sigma: float) -> torch.Tensor:
    """The saliency map [B, H, W] in [0, 1] (float32) of marker masks [B, H, W] (see the module docstring)."""
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a positive number of pixels, not {radius}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a number of pixels >= 0, not {sigma}")
    if max(markers.shape[1:]) > 4096:  # squared distances must stay exact in float32
        raise ValueError(f"markers of {markers.shape[2]}x{markers.shape[1]} pixels: at most 4096 on a side")
    closeness = (1 - squared_distance(markers, radius).sqrt() / radius).clamp(min=0)
    blurred = gaussian_filter(closeness, sigma)
    peak = blurred.flatten(1).amax(dim=1).view(-1, 1, 1)
    return blurred / peak


def latent_weights(masks: torch.Tensor, latent: torch.Tensor, node_name: str) -> torch.Tensor:
    """Per-position weights broadcastable to `latent` ([B, C, H, W] or [B, C, T, H, W]) from masks [M, H', W']:
    resized by area averaging (bilinear where the latent is larger); M = 1 serves every image, M = B one per image,
    and for a video latent M = B·T (or T with B = 1) one per frame; any other M is refused."""
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise ValueError(f"{node_name}: mask has shape {tuple(masks.shape)}: give a MASK, [batch, height, width]")
    batch, size = latent.shape[0], latent.shape[-2:]
    frames = latent.shape[2] if latent.ndim == 5 else 1
    if masks.shape[0] not in (1, batch, batch * frames):
        per_frame = f", or {batch * frames} (one per frame)" if frames > 1 else ""
        raise ValueError(f"{node_name}: mask has {masks.shape[0]} images for a latent batch of {batch}: give 1 (for "
                         f"every image) or {batch} (one per image){per_frame}")
    m = masks.to(device=latent.device, dtype=torch.float32).unsqueeze(1)
    if tuple(m.shape[-2:]) != tuple(size):
        shrink = m.shape[-2] >= size[0] and m.shape[-1] >= size[1]
        m = F.interpolate(m, size=size, mode="area") if shrink else F.interpolate(m, size=size, mode="bilinear",
                                                                                   align_corners=False)
    if latent.ndim == 5:
        if m.shape[0] == batch * frames and frames > 1:
            m = m.view(batch, frames, 1, *size).transpose(1, 2)  # [B, 1, T, h, w]
        else:
            m = m.unsqueeze(2)  # one map for every frame
    return m.to(latent.dtype)
