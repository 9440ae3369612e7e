"""Fused CUDA paths of `kernels/projection.py`, in Triton.

`sample_dots_triton` reads x and y once and produces all three per-sample inner products: each program reduces a
strided share of one sample in float32 and writes its partial sums; the partials are added in float64 by torch, so the
result does not depend on scheduling (no atomics). `combine_triton` is one read of x and y and one write.
Inputs are made contiguous and viewed as [B, N].
"""

import functools

import torch
import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 8
# Reduction programs per GPU multiprocessor, shared among the samples: enough loads in flight to fill the memory
# system for batch 1, few enough that the float64 sum of the partials stays negligible.
PROGRAMS_PER_SM = 4


@triton.jit
def _sample_dots_kernel(x_ptr, y_ptr, partial_ptr, n, programs, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    part = tl.program_id(1)
    base = sample.to(tl.int64) * n
    offsets = tl.arange(0, BLOCK)
    xx = tl.zeros([BLOCK], dtype=tl.float32)
    xy = tl.zeros([BLOCK], dtype=tl.float32)
    yy = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(part * BLOCK, n, programs * BLOCK):
        idx = start + offsets
        mask = idx < n
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xx += x * x
        xy += x * y
        yy += y * y
    out = partial_ptr + (sample * programs + part) * 3
    tl.store(out, tl.sum(xx, axis=0))
    tl.store(out + 1, tl.sum(xy, axis=0))
    tl.store(out + 2, tl.sum(yy, axis=0))


@triton.jit
def _combine_kernel(x_ptr, y_ptr, a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    block = tl.program_id(1)
    base = sample.to(tl.int64) * n
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(a_ptr + sample)
    b = tl.load(b_ptr + sample)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + idx, (a * x + b * y).to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(t.shape[0], -1)


def sample_dots_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xf, yf = _flat(x), _flat(y)
    batch, n = xf.shape
    sms = _multiprocessors(x.device.index if x.device.index is not None else torch.cuda.current_device())
    programs = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, batch), triton.cdiv(n, BLOCK)))
    partial = torch.empty(batch, programs, 3, device=x.device, dtype=torch.float32)
    _sample_dots_kernel[(batch, programs)](xf, yf, partial, n, programs, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum(dim=1, dtype=torch.float64)


def combine_triton(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    xf, yf = _flat(x), _flat(y)
    batch, n = xf.shape
    out = torch.empty_like(xf)
    a32 = a.to(device=x.device, dtype=torch.float32).contiguous()
    b32 = b.to(device=x.device, dtype=torch.float32).contiguous()
    _combine_kernel[(batch, triton.cdiv(n, BLOCK))](xf, yf, a32, b32, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out.view(x.shape)
