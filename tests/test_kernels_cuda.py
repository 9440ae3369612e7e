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


# Per-frame grouping of 5-D video latents (issue 16): the Triton frame kernels against the torch path -----------------

from comfyui_guidance.kernels.projection import group_count  # noqa: E402

# [B, C, T, H, W]: a Wan 2.1 720p clip (81 frames at 1280 × 720), a 480p-like batch of 2, odd sizes (a frame smaller
# than one block, frames of one element, one frame, one channel)
FRAME_SHAPES = [(1, 16, 21, 90, 160), (2, 16, 21, 60, 104), (2, 5, 3, 33, 17), (2, 4, 7, 1, 1), (1, 3, 1, 129, 65),
                (3, 1, 5, 45, 47)]
FRAME_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def frame_pair(shape, dtype, seed=0):
    """x, y with a different size in every (sample, frame), so that a group mixed up with another shows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = torch.linspace(0.1, 4.0, shape[0] * shape[2], device="cuda").view(shape[0], 1, shape[2], 1, 1)
    x = (torch.randn(shape, device="cuda", generator=g) * sizes).to(dtype)
    y = (torch.randn(shape, device="cuda", generator=g) + 0.5 * x.float()).to(dtype)
    return x, y


def float64_frame_dots(x, y):
    xd, yd = x.double(), y.double()
    return torch.stack([torch.einsum("bcthw,bcthw->bt", p, q).reshape(-1) for p, q in ((xd, xd), (xd, yd), (yd, yd))],
                       dim=1)


def assert_dots_close(got, expected, rtol):
    """Each group's inner products within rtol of the float64 ones, <x,y> relative to ‖x‖‖y‖ (it can be near 0)."""
    assert got.shape == expected.shape and got.dtype == torch.float64
    scale = torch.stack([expected[:, 0], (expected[:, 0] * expected[:, 2]).sqrt(), expected[:, 2]], dim=1)
    worst = ((got - expected).abs() / scale.clamp_min(1e-30)).max().item()
    assert worst < rtol, worst


@pytest.mark.parametrize("shape", FRAME_SHAPES, ids=["x".join(map(str, s)) for s in FRAME_SHAPES])
@pytest.mark.parametrize("dtype", FRAME_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_frame_dots_match_torch_path_and_float64(shape, dtype):
    x, y = frame_pair(shape, dtype)
    expected = float64_frame_dots(x, y)
    fused = sample_dots(x, y, fused=True, frames=True)
    assert fused.shape == (shape[0] * shape[2], 3)
    assert_dots_close(fused, expected, 1e-5)
    assert_dots_close(fused, sample_dots(x, y, fused=False, frames=True), 1e-5)


@pytest.mark.parametrize("shape", FRAME_SHAPES, ids=["x".join(map(str, s)) for s in FRAME_SHAPES])
@pytest.mark.parametrize("dtype", FRAME_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_frame_combine_matches_torch_path_and_float64(shape, dtype):
    x, y = frame_pair(shape, dtype, seed=1)
    groups = group_count(x, True)
    a = torch.linspace(-2.0, 3.0, groups, device="cuda", dtype=torch.float64)  # one pair per (sample, frame)
    b = torch.linspace(1.5, -0.5, groups, device="cuda", dtype=torch.float64)
    fused = combine(x, y, a, b, fused=True, frames=True)
    assert fused.dtype == dtype and fused.shape == shape and torch.isfinite(fused).all()
    view = (shape[0], 1, shape[2], 1, 1)
    expected = a.view(view) * x.double() + b.view(view) * y.double()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(fused, expected) < tolerance
    torch_path = combine(x, y, a, b, fused=False, frames=True)
    if dtype == torch.float32:
        assert rel_err(fused, torch_path) < 1e-6
    else:  # the same float32 formula rounded to dtype: one unit of dtype apart at most, plus what a fused
        # multiply-add changes in float32 (it shows where a·x and b·y cancel)
        view32 = (shape[0], 1, shape[2], 1, 1)
        terms = (a.float().view(view32) * x.float()).abs() + (b.float().view(view32) * y.float()).abs()
        bound = torch.finfo(dtype).eps * torch_path.float().abs() * 1.01 + 4 * torch.finfo(torch.float32).eps * terms
        assert ((fused.float() - torch_path.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_fused_frame_kernels_handle_non_contiguous_input(dtype):
    """A latent laid out [B, T, C, H, W] in memory and viewed as [B, C, T, H, W] (as some video models produce)."""
    x = torch.randn(2, 7, 16, 30, 52, device="cuda", dtype=dtype).transpose(1, 2)
    y = torch.randn(2, 16, 7, 30, 52, device="cuda", dtype=dtype)
    assert not x.is_contiguous()
    assert_dots_close(sample_dots(x, y, fused=True, frames=True), float64_frame_dots(x, y), 1e-5)
    a = torch.linspace(-1.0, 1.0, 14, device="cuda", dtype=torch.float64)
    b = torch.linspace(2.0, 0.5, 14, device="cuda", dtype=torch.float64)
    fused = combine(x, y, a, b, fused=True, frames=True)
    assert rel_err(fused, combine(x, y, a, b, fused=False, frames=True)) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_fused_frames_leave_image_latents_to_the_sample_kernels():
    x, y = torch.randn(2, 4, 64, 64, device="cuda"), torch.randn(2, 4, 64, 64, device="cuda")
    assert torch.equal(sample_dots(x, y, fused=True, frames=True), sample_dots(x, y, fused=True))
    a, b = torch.rand(2, device="cuda", dtype=torch.float64), torch.rand(2, device="cuda", dtype=torch.float64)
    assert torch.equal(combine(x, y, a, b, fused=True, frames=True), combine(x, y, a, b, fused=True))


@pytest.mark.parametrize("shape", [(1, 16, 21, 90, 160), (2, 16, 5, 33, 17)], ids=["wan-720p", "odd-batch2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("threshold_mode", ["absolute", "per-element"])
def test_apg_frame_mode_fused_equals_torch_path(shape, dtype, threshold_mode):
    """Three steps of frame-mode APG with reverse momentum, the fused path against the torch path."""
    config = APGConfig(threshold_mode=threshold_mode, video_mode="frame")
    fused_state, torch_state = APGState(config.momentum), APGState(config.momentum)
    g = torch.Generator(device="cuda").manual_seed(2)
    sizes = torch.logspace(-2, 0.5, shape[0] * shape[2], device="cuda").view(shape[0], 1, shape[2], 1, 1)
    for sigma in (14.0, 3.0, 0.3):
        cond = torch.randn(shape, device="cuda", generator=g)
        uncond = (cond + torch.randn(shape, device="cuda", generator=g) * sizes).to(dtype)
        cond = cond.to(dtype)
        fused = apg_guided(cond, uncond, 9.0, config, fused_state, sigma, fused=True)
        reference = apg_guided(cond, uncond, 9.0, config, torch_state, sigma, fused=False)
        assert fused.dtype == dtype
        assert rel_err(fused, reference) < (1e-6 if dtype == torch.float32 else 1e-2)


# One launch per sample_dots: the group's last program (by an atomic ticket) adds the partials -----------------------

from comfyui_guidance.kernels import triton_projection  # noqa: E402

# per sample and per frame, a few groups and more groups than the first ticket buffer holds (8 · 40 = 320 frames)
TICKET_CASES = [((2, 16, 21, 60, 104), False), ((2, 16, 21, 60, 104), True), ((8, 4, 40, 8, 8), True)]


@pytest.mark.parametrize("shape,frames", TICKET_CASES, ids=["clip", "frame", "320-frames"])
def test_fused_dots_are_bitwise_repeatable_and_leave_the_tickets_at_zero(shape, frames):
    x, y = frame_pair(shape, torch.float32, seed=3)
    first = sample_dots(x, y, fused=True, frames=frames)
    assert_dots_close(first, sample_dots(x, y, fused=False, frames=frames), 1e-5)
    for _ in range(20):  # whichever program finishes last, the sum runs in the same order
        assert torch.equal(sample_dots(x, y, fused=True, frames=frames), first)
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in triton_projection._TICKETS.values())


def test_fused_dots_on_two_streams_at_once():
    """Calls queued on two streams overlap on the GPU; each stream has its own tickets, so neither sees the other's."""
    pairs = [frame_pair((1, 16, 21, 90, 160), torch.float32, seed=s) for s in (4, 5)]
    expected = [sample_dots(x, y, fused=False, frames=True) for x, y in pairs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    results = [[], []]
    for _ in range(10):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                results[i].append(sample_dots(*pairs[i], fused=True, frames=True))
    torch.cuda.synchronize()
    for got, want in zip(results, expected):
        for r in got:
            assert_dots_close(r, want, 1e-5)


@pytest.mark.parametrize("frames", [False, True], ids=["clip", "frame"])
def test_fused_dots_replay_in_a_cuda_graph(frames):
    """Captured once and replayed on new inputs (the tickets reset within each replay), as compiled samplers run."""
    x, y = frame_pair((2, 16, 9, 30, 52), torch.float32, seed=6)
    sample_dots(x, y, fused=True, frames=frames)  # compiled and the tickets made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample_dots(x, y, fused=True, frames=frames)
    for seed in (7, 8, 9):
        new_x, new_y = frame_pair(x.shape, torch.float32, seed=seed)
        x.copy_(new_x)
        y.copy_(new_y)
        graph.replay()
        assert_dots_close(captured, sample_dots(new_x, new_y, fused=False, frames=frames), 1e-5)
