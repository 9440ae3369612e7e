"""The fused Triton kernels of kernels/triton_projection.py on CPU, under Triton's interpreter (TRITON_INTERPRET=1),
against float64 in CI, which has no GPU: their addressing per sample and per frame, the float64 sum of the partials,
and the tickets returning to zero. Which program the tickets elect is not seen here: a group's sum comes out right
under the interpreter even when the first program to finish is elected (tried by hand), so that, speed and the GPU
memory model are left to test_kernels_cuda.py on the device.

The interpreter is chosen when Triton is imported, so the kernels run in a subprocess of their own."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (torch's CUDA wheel)")

SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
import importlib
import torch
from pack import import_pack

pack = import_pack()
kernels = importlib.import_module(pack.__name__ + ".kernels.triton_projection")
projection = pack.kernels.projection
kernels._multiprocessors = lambda index: 4  # a made-up GPU of 4 multiprocessors: several programs per group
kernels._device_index = lambda x: 0
g = torch.Generator().manual_seed(0)
# per sample (4-D, 3-D, 5-D) and per frame (5-D, and frames of one element); the interpreter runs each program in
# Python, so the shapes are small (more groups than the first ticket buffer holds: test_kernels_cuda.py)
cases = [((3, 4, 33, 17), False), ((2, 3, 7), False), ((2, 3, 3, 9, 7), True), ((2, 4, 3, 1, 1), True),
         ((1, 4, 3, 8, 8), False)]
for shape, frames in cases:
    sizes = torch.linspace(0.1, 4.0, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    x = torch.randn(shape, generator=g) * sizes
    y = torch.randn(shape, generator=g) + 0.5 * x
    expected = projection.sample_dots_torch(x.double(), y.double(), frames)
    first = kernels.sample_dots_triton(x, y, frames)
    scale = torch.stack([expected[:, 0], (expected[:, 0] * expected[:, 2]).sqrt(), expected[:, 2]], dim=1)
    worst = ((first - expected).abs() / scale).max().item()
    assert first.dtype == torch.float64 and first.shape == expected.shape, (shape, first.shape)
    assert worst < 1e-5, (shape, frames, worst)
    # the tickets are back at zero after a call, so a second call elects its last programs again, and sums alike
    assert torch.equal(kernels.sample_dots_triton(x, y, frames), first), shape
    assert all(int(t.abs().sum()) == 0 for t in kernels._TICKETS.values()), shape
    groups = expected.shape[0]
    a = torch.linspace(-2.0, 3.0, groups, dtype=torch.float64)
    b = torch.linspace(1.5, -0.5, groups, dtype=torch.float64)
    combined = kernels.combine_triton(x, y, a, b, frames)
    reference = projection.combine_torch(x.double(), y.double(), a, b, frames)
    assert ((combined.double() - reference).norm() / reference.norm()).item() < 1e-6, shape
print("ok", len(cases))
"""


def test_fused_kernels_match_float64_under_the_interpreter():
    script = SCRIPT.format(bench=str(REPO / "bench"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("ok 5")
