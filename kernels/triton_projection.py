"""Fused CUDA paths of `kernels/projection.py`, in Triton.

`sample_dots_triton` reads x and y once and produces all three per-group inner products in one launch: each program
reduces a strided share of one group in float32 and writes its partial sums (as float64, an exact widening), then
draws a ticket; the group's last program adds the partials in float64 in program order. Only the ticket is atomic, so
the result does not depend on scheduling. `combine_triton` is one read of x and y and one write.
Inputs are made contiguous and viewed as [B, N]; per frame, a 5-D latent is viewed as [B, C, T, H·W] and each
(sample, frame) group gathers its C rows of H·W (one pass still, the partial sums per group; where H·W is a multiple
of 16 the compiler proves the runs contiguous and loads 16 bytes at a time, as in the per-sample kernels).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Tuning(NamedTuple):
    block: int  # elements of each input a program loads per step (a power of two)
    num_warps: int
    programs_per_sm: int = 0  # reductions: programs per multiprocessor in all, shared among the groups


# Per kernel, the fastest candidate of `python bench/apg_bench.py --sweep` on an H200 (graph-replay timings of every
# candidate on the Wan 2.1 720p latent in float32: bench/results/apg_bench_sweep.md, swept before the three sums of
# the reductions shared one reduction tree). The reductions keep enough loads in flight to fill the memory system for
# batch 1 and few enough programs that the last program's sum of the partials stays short; the top few candidates of
# each kernel lie within about 0.3 µs (2%) of one another.
TUNING = {
    "dots": Tuning(2048, 8, 4),
    "frame_dots": Tuning(2048, 8, 4),
    "combine": Tuning(1024, 8),
    "frame_combine": Tuning(512, 4),
}


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _dots_kernel(x_ptr, y_ptr, partial_ptr, ticket_ptr, out_ptr, channels, frames, hw, programs,
                 BLOCK: tl.constexpr, PROGRAMS: tl.constexpr, PER_FRAME: tl.constexpr):
    """One program's strided share of one group's ⟨x,x⟩, ⟨x,y⟩, ⟨y,y⟩; the group's last program to finish adds the
    shares. Per sample (PER_FRAME false) a group is a row of n = hw elements (channels = frames = 1); per frame it is
    the C rows of H·W of one (sample, frame) of the [B, C, T, H·W] view."""
    group = tl.program_id(0)  # sample · frames + frame
    part = tl.program_id(1)
    sample = (group // frames).to(tl.int64)
    frame = group % frames
    n = channels * hw
    offsets = tl.arange(0, BLOCK)
    xx = tl.zeros([BLOCK], dtype=tl.float32)
    xy = tl.zeros([BLOCK], dtype=tl.float32)
    yy = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(part * BLOCK, n, programs * BLOCK):
        idx = start + offsets
        mask = idx < n
        if PER_FRAME:
            channel = idx // hw
            address = ((sample * channels + channel) * frames + frame) * hw + (idx - channel * hw)
            x = tl.load(x_ptr + address, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + address, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptr + sample * n + idx, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + sample * n + idx, mask=mask, other=0.0).to(tl.float32)
        xx += x * x
        xy += x * y
        yy += y * y
    # the three sums in one reduction tree (one exchange between warps, not three)
    sxx, sxy, syy = tl.reduce((xx, xy, yy), 0, _add3)
    slot = partial_ptr + (group * programs + part) * 3
    tl.store(slot, sxx.to(tl.float64))  # the float32 partial, exactly, in the float64 buffer
    tl.store(slot + 1, sxy.to(tl.float64))
    tl.store(slot + 2, syy.to(tl.float64))
    # Every thread's stores before the ticket; the ticket's release makes them visible to the program that draws
    # the last one, whose acquire (and L2-only loads) sees them all.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + group, 1, sem="acq_rel", scope="gpu")
    if ticket == programs - 1:
        rows = tl.arange(0, PROGRAMS)
        valid = rows < programs
        shares = partial_ptr + (group * programs + rows) * 3
        pxx = tl.load(shares, mask=valid, other=0.0, cache_modifier=".cg")
        pxy = tl.load(shares + 1, mask=valid, other=0.0, cache_modifier=".cg")
        pyy = tl.load(shares + 2, mask=valid, other=0.0, cache_modifier=".cg")
        txx, txy, tyy = tl.reduce((pxx, pxy, pyy), 0, _add3)  # float64, always in the same order
        tl.store(out_ptr + group * 3, txx)
        tl.store(out_ptr + group * 3 + 1, txy)
        tl.store(out_ptr + group * 3 + 2, tyy)
        tl.store(ticket_ptr + group, 0)  # ready for the next call on this stream


@triton.jit
def _combine_kernel(x_ptr, y_ptr, a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    sample = tl.program_id(1)
    base = sample.to(tl.int64) * n
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(a_ptr + sample)
    b = tl.load(b_ptr + sample)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + idx, (a * x + b * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _frame_combine_kernel(x_ptr, y_ptr, a_ptr, b_ptr, out_ptr, channels, frames, hw, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # (sample · channels + channel) · frames + frame
    block = tl.program_id(1)
    group = (row // (channels * frames)) * frames + row % frames
    base = row.to(tl.int64) * hw
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < hw
    a = tl.load(a_ptr + group)
    b = tl.load(b_ptr + group)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + idx, (a * x + b * y).to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(t.shape[0], -1)


def _programs(x: torch.Tensor, groups: int, blocks: int, programs_per_sm: int) -> int:
    """Programs per group for a reduction over `blocks` blocks per group: about programs_per_sm per multiprocessor in
    all, each taking the same number of blocks (the last few one fewer), so that no program runs a step longer
    than most."""
    blocks = max(1, blocks)
    target = min(blocks, max(1, triton.cdiv(programs_per_sm * _multiprocessors(_device_index(x)), groups)))
    return triton.cdiv(blocks, triton.cdiv(blocks, target))


# Per (device, stream): int32 tickets, one per group, zero between calls (each group's last program resets its own),
# so no call pays a launch to clear them; calls on one stream run one after another and never share them.
_TICKETS: dict[tuple[int, int], torch.Tensor] = {}


def _tickets(x: torch.Tensor, groups: int) -> torch.Tensor:
    key = (_device_index(x), torch.cuda.current_stream(x.device).cuda_stream) if x.is_cuda else (-1, 0)
    tickets = _TICKETS.get(key)
    if tickets is None or tickets.numel() < groups:
        tickets = _TICKETS[key] = torch.zeros(max(groups, 64), device=x.device, dtype=torch.int32)
    return tickets


def sample_dots_triton(x: torch.Tensor, y: torch.Tensor, frames: bool = False) -> torch.Tensor:
    """[groups, 3] float64: ⟨x,x⟩, ⟨x,y⟩, ⟨y,y⟩ per sample, or per (sample, frame) of a 5-D latent when `frames`."""
    if frames:
        batch, channels, count = x.shape[:3]
        hw = x[0, 0, 0].numel()
        xf, yf = x.contiguous(), y.contiguous()
        tuning = TUNING["frame_dots"]
    else:
        xf, yf = _flat(x), _flat(y)
        batch, channels, count, hw = xf.shape[0], 1, 1, xf.shape[1]
        tuning = TUNING["dots"]
    groups = batch * count
    programs = _programs(x, groups, triton.cdiv(channels * hw, tuning.block), tuning.programs_per_sm)
    partial = torch.empty(groups, programs, 3, device=x.device, dtype=torch.float64)
    out = torch.empty(groups, 3, device=x.device, dtype=torch.float64)
    _dots_kernel[(groups, programs)](xf, yf, partial, _tickets(x, groups), out, channels, count, hw, programs,
                                     BLOCK=tuning.block, PROGRAMS=triton.next_power_of_2(programs),
                                     PER_FRAME=frames, num_warps=tuning.num_warps)
    return out


def combine_triton(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   frames: bool = False) -> torch.Tensor:
    """a[g]·x[g] + b[g]·y[g] per sample, or per (sample, frame) of a 5-D latent when `frames`."""
    a32 = a.to(device=x.device, dtype=torch.float32).contiguous()
    b32 = b.to(device=x.device, dtype=torch.float32).contiguous()
    if frames:
        batch, channels, count = x.shape[:3]
        hw = x[0, 0, 0].numel()
        xf, yf = x.contiguous(), y.contiguous()
        out = torch.empty_like(xf)
        tuning = TUNING["frame_combine"]
        _frame_combine_kernel[(batch * channels * count, triton.cdiv(hw, tuning.block))](
            xf, yf, a32, b32, out, channels, count, hw, BLOCK=tuning.block, num_warps=tuning.num_warps)
        return out
    xf, yf = _flat(x), _flat(y)
    batch, n = xf.shape
    out = torch.empty_like(xf)
    tuning = TUNING["combine"]
    # blocks on the first grid axis (up to 2³¹ − 1 programs), samples on the second (up to 65535)
    _combine_kernel[(triton.cdiv(n, tuning.block), batch)](xf, yf, a32, b32, out, n, BLOCK=tuning.block,
                                                          num_warps=tuning.num_warps)
    return out.view(x.shape)
