"""The float64 reference of APG that the tests compare against."""

import math

import torch

# The latent the paper tuned r = 15 on: SDXL at 1024², 4 channels at 128 × 128. Stated here on its own, not imported
# from guiders/apg.py, so that a wrong constant there is caught.
REFERENCE_ELEMENTS = 4 * 128 * 128


def paper_apg(conds, unconds, w, eta, r, beta, frames=False, per_element=False):
    """Algorithm 1 in float64, step by step as the paper writes it, over a sequence of steps.

    frames: a 5-D latent [B, C, T, H, W] is guided frame by frame: rescaling and projection are done on each latent
    frame [B, C, H, W] on its own (its update projected on that frame's conditional prediction). The running average
    of reverse momentum is kept for the whole tensor, as in clip mode. Latents of other ranks ignore `frames`.
    per_element: r caps each vector (a sample, or a sample's frame) at r·√(n / 65536), n its number of elements.
    """
    running = 0.0
    out = []
    for cond, uncond in zip(conds, unconds):
        cond, uncond = cond.double(), uncond.double()
        diff = cond - uncond
        if beta != 0:
            running = diff + beta * running
            diff = running
        if frames and cond.ndim == 5:
            guided = [paper_guide(cond[:, :, t], diff[:, :, t], w, eta, r, per_element) for t in range(cond.shape[2])]
            out.append(torch.stack(guided, dim=2))
        else:
            out.append(paper_guide(cond, diff, w, eta, r, per_element))
    return out


def paper_guide(cond, diff, w, eta, r, per_element=False):
    """One step of Algorithm 1 after momentum: rescale ΔD_t, project it on D_c, D_c + (w − 1)(ΔD^⊥ + η ΔD^∥); every
    sample of the batch is one vector (all its non-batch dimensions)."""
    dims = list(range(1, cond.ndim))
    if per_element:
        r = r * math.sqrt(cond[0].numel() / REFERENCE_ELEMENTS)
    if r > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), r / norm)
    unit = cond / cond.norm(p=2, dim=dims, keepdim=True)
    parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = diff - parallel
    return cond + (w - 1) * (orthogonal + eta * parallel)
