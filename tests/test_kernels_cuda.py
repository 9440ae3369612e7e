"""The fused Triton path of kernels/projection.py against its torch path and a float64 reference (CUDA only)."""

import pytest
import torch

from comfyui_guidance.guiders.apg import APGConfig, APGState, apg_guided
from comfyui_guidance.kernels.projection import combine, sample_dots

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")

SHAPES = [(1, 4, 128, 128), (3, 4, 64, 64), (2, 16, 21, 60, 104), (1, 4, 33, 17), (5, 3, 7)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_dots_and_combine_match_float64(shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    y = torch.randn(shape, device="cuda", dtype=dtype) + 0.5 * x
    xd, yd = x.double(), y.double()
    dims = tuple(range(1, x.ndim))
    expected = torch.stack([(xd * xd).sum(dims), (xd * yd).sum(dims), (yd * yd).sum(dims)], dim=1)
    assert rel_err(sample_dots(x, y, fused=True), expected) < 1e-5
    a = torch.randn(shape[0], device="cuda", dtype=torch.float64)
    b = torch.randn(shape[0], device="cuda", dtype=torch.float64)
    view = (-1,) + (1,) * (x.ndim - 1)
    fused = combine(x, y, a, b, fused=True)
    assert fused.dtype == dtype and torch.isfinite(fused).all()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(fused, a.view(view) * xd + b.view(view) * yd) < tolerance
    assert rel_err(fused, combine(x, y, a, b, fused=False)) < tolerance


def test_fused_combine_handles_non_contiguous_input():
    x = torch.randn(2, 8, 64, 64, device="cuda").transpose(2, 3)
    y = torch.randn(2, 8, 64, 64, device="cuda")
    a, b = torch.rand(2, device="cuda"), torch.rand(2, device="cuda")
    assert rel_err(combine(x, y, a, b, fused=True), combine(x, y, a, b, fused=False)) < 1e-6


@pytest.mark.parametrize("shape", [(2, 4, 128, 128), (1, 16, 21, 60, 104)])
def test_apg_fused_equals_torch_path(shape):
    config = APGConfig()
    fused_state, torch_state = APGState(config.momentum), APGState(config.momentum)
    for sigma in (14.0, 3.0, 0.3):
        cond = torch.randn(shape, device="cuda")
        uncond = cond + torch.randn(shape, device="cuda")
        fused = apg_guided(cond, uncond, 9.0, config, fused_state, sigma, fused=True)
        reference = apg_guided(cond, uncond, 9.0, config, torch_state, sigma, fused=False)
        assert rel_err(fused, reference) < 1e-6
