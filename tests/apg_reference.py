"""The float64 reference of APG that the tests compare against."""

import torch


def paper_apg(conds, unconds, w, eta, r, beta):
    """Algorithm 1 in float64, step by step as the paper writes it, over a sequence of steps."""
    running = 0.0
    out = []
    for cond, uncond in zip(conds, unconds):
        cond, uncond = cond.double(), uncond.double()
        dims = list(range(1, cond.ndim))
        diff = cond - uncond
        if beta != 0:
            running = diff + beta * running
            diff = running
        if r > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), r / norm)
        unit = cond / cond.norm(p=2, dim=dims, keepdim=True)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = diff - parallel
        out.append(cond + (w - 1) * (orthogonal + eta * parallel))
    return out
