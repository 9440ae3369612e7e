"""APG on the GPU: per-step cost against plain CFG, and the bandwidth of the fused projection kernels.

1. Per-step overhead: an SDXL-size UNet (ComfyUI's own `model_base.SDXL` with the SDXL base config, random fp16
   weights) at 1024² (latent 128²), batch 2 (cond + uncond) as ComfyUI runs CFG. A CFG step is the model call plus
   the CFG combination; an APG step adds our pre-CFG hook (`apg_cfg_uncond`, momentum on). The two are timed
   interleaved with CUDA events, and the guidance ops are also timed alone.
2. Bandwidth: the fused (Triton) and torch paths of `sample_dots` and `combine`, and the whole APG op, on a Wan 2.1
   720p video latent [1, 16, 21, 90, 160] in float32 (ComfyUI's denoised outputs are float32), per sample (the clip,
   `video_mode="clip"`) and per latent frame (`video_mode="frame"`), against a device-to-device copy measured in the
   same run. Kernel-only times are CUDA-graph replays of six calls on six input pairs (232 MB, more than the L2 cache
   holds); eager times include the launches from Python.
3. With --sweep, first a tuning sweep: every candidate (block, warps, programs per multiprocessor) of each of the four
   kernels (per-sample and per-frame dots and combine), timed by graph replay on the same latent in two rounds (the
   second in reverse order); the fastest of each becomes `kernels/triton_projection.TUNING` for the rest of the run,
   and with --apply-tuning it is also written into that file.

    python bench/apg_bench.py --comfyui PATH_TO_COMFYUI --out RESULT.json [--md RESULT.md] [--sweep [--apply-tuning]]
    python bench/apg_bench.py --smoke --out /tmp/smoke.json    # CPU check of the bench's logic: tiny latent, the
        Triton kernels under TRITON_INTERPRET=1, host timers, no SDXL part (run with TRITON_INTERPRET=1 set)
"""

import argparse
import datetime
import json
import pathlib
import re
import statistics
import sys
import time

import torch

from pack import import_pack

SDXL_UNET = {  # ComfyUI's SDXL base config (comfy/model_detection.py)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
VIDEO_LATENT = (1, 16, 21, 90, 160)
SMOKE_LATENT = (1, 4, 3, 12, 20)
PAIRS = 6  # input pairs the graph replays rotate over: 232 MB of the video latent, more than any L2 cache
COPY_ELEMENTS = 256 * 2**20  # the copy that sets the peak: 1 GiB read, 1 GiB written
# Sweep candidates: (block, warps) shapes of a program (4 to 16 float32 elements of each input per thread) and, for the
# reductions, programs per multiprocessor.
REDUCTION_SHAPES = ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16))
PROGRAMS_PER_SM = (2, 4, 8, 16, 32)
ELEMENTWISE_SHAPES = ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16))
KERNELS = ("dots", "frame_dots", "combine", "frame_combine")
TARGET_FRACTION = 0.70  # issue 16: each fused primitive at >= 70 % of the copy's bandwidth
GRAPH_REPS, EAGER_ROUNDS = 100, 50  # replays per graph timing, rounds of the eager timings (fewer with --smoke)


def _timed_ms(fn) -> float:
    """One call's time in ms: CUDA events on a GPU machine, the host clock where there is none (--smoke)."""
    if not torch.cuda.is_available():
        began = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - began)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    return statistics.median(_timed_ms(fn) for _ in range(reps))


def graph_ms(fns, reps=100):
    """Kernel time per call without launch overhead: the calls, each on its own inputs so that the working set
    exceeds the L2 cache, captured once in a CUDA graph and replayed (without a GPU: the calls in turn)."""
    for fn in fns:
        fn()  # compile and warm up outside the capture
    if not torch.cuda.is_available():
        return time_ms(lambda: [fn() for fn in fns], warmup=1, reps=reps) / len(fns)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return time_ms(graph.replay, warmup=5, reps=reps) / len(fns)


def interleaved_ms(fns: dict, warmup=3, rounds=15):
    """Median time of each function, measured round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def build_sdxl(comfyui: str):
    sys.path.insert(0, comfyui)
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(SDXL_UNET, dtype=torch.float16))
    config.set_inference_dtype(torch.float16, None)
    model = comfy.model_base.SDXL(config, device="cuda")
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def step_overhead(comfyui: str, pack) -> dict:
    from_apg = pack.guiders.apg
    model = build_sdxl(comfyui)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 128, 128, device="cuda", generator=g) * 14.6
    sigma = torch.full((2,), 14.6, device="cuda")
    context = torch.randn(2, 77, 2048, device="cuda", generator=g, dtype=torch.float16)
    y = torch.randn(2, 2816, device="cuda", generator=g, dtype=torch.float16)
    w = 7.0
    config = from_apg.APGConfig()
    state = from_apg.APGState(config.momentum)

    def denoised():
        return model.apply_model(x, sigma, c_crossattn=context, y=y).chunk(2)

    def cfg_step():
        cond, uncond = denoised()
        return uncond + w * (cond - uncond)

    def apg_step():
        cond, uncond = denoised()
        uncond = from_apg.apg_cfg_uncond(cond, uncond, config, state, 14.6)
        return uncond + w * (cond - uncond)

    with torch.no_grad():
        steps = interleaved_ms({"cfg_step": cfg_step, "apg_step": apg_step})
        cond, uncond = denoised()
        ops = interleaved_ms({
            "cfg_combine": lambda: uncond + w * (cond - uncond),
            "apg_op_fused": lambda: from_apg.apg_cfg_uncond(cond, uncond, config, state, 14.6, fused=True),
            "apg_op_torch": lambda: from_apg.apg_cfg_uncond(cond, uncond, config, state, 14.6, fused=False),
        }, rounds=200)
    return {
        "model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
        "latent": [2, 4, 128, 128],
        "step_ms": steps,
        "apg_over_cfg_step_ratio": steps["apg_step"] / steps["cfg_step"],
        "guidance_op_ms": ops,
        "apg_op_overhead_ms": ops["apg_op_fused"] - ops["cfg_combine"],
        "apg_op_overhead_fraction_of_cfg_step": (ops["apg_op_fused"] - ops["cfg_combine"]) / steps["cfg_step"],
    }


def projection_modules(pack):
    import importlib

    tp = importlib.import_module(f"{pack.__name__}.kernels.triton_projection")
    return pack.kernels.projection, pack.guiders.apg, tp


def candidates(tp, kernel: str) -> list:
    """The sweep's candidates for one kernel, the file's current setting first."""
    if kernel.endswith("dots"):
        options = [tp.Tuning(b, w, p) for b, w in REDUCTION_SHAPES for p in PROGRAMS_PER_SM]
    else:
        options = [tp.Tuning(b, w) for b, w in ELEMENTWISE_SHAPES]
    current = tp.TUNING[kernel]
    return [current] + [t for t in options if t != current]


class Latent:
    """The bench's tensors: PAIRS (cond, uncond) pairs of the latent for graph replays, one more pair for eager
    timings, and coefficients a, b per group for each mode."""

    def __init__(self, shape, device, seed=1):
        g = torch.Generator(device=device).manual_seed(seed)

        def pair():
            cond = torch.randn(shape, device=device, generator=g)
            return cond, cond + torch.randn(shape, device=device, generator=g)

        self.shape = shape
        self.cond, self.uncond = pair()
        self.pairs = [pair() for _ in range(PAIRS)]
        self.groups = {"clip": shape[0], "frame": shape[0] * shape[2]}
        self.coefficients = {mode: tuple(torch.rand(n, device=device, generator=g) for _ in range(2))
                             for mode, n in self.groups.items()}
        self.nbytes = self.cond.numel() * self.cond.element_size()


def primitive(projection, kernel: str, latent: Latent, pair):
    """The fused primitive that runs `kernel`, as a call on one input pair."""
    mode = "frame" if kernel.startswith("frame") else "clip"
    frames = mode == "frame"
    if kernel.endswith("dots"):
        return lambda: projection.sample_dots(*pair, fused=True, frames=frames)
    a, b = latent.coefficients[mode]
    return lambda: projection.combine(*pair, a, b, fused=True, frames=frames)


def moved_bytes(kernel: str, latent: Latent) -> int:
    """The fewest bytes the primitive must move: x and y read (and, for combine, the output written) once."""
    return (2 if kernel.endswith("dots") else 3) * latent.nbytes


def copy_peak_GBps(device) -> float:
    """Bytes read plus written per second of a large device-to-device copy (1 GiB; 64 MiB without a GPU)."""
    big = torch.empty(COPY_ELEMENTS if device.type == "cuda" else 2**24, device=device, dtype=torch.float32)
    copy_ms = time_ms(lambda: big.clone(), reps=EAGER_ROUNDS)
    return 2 * big.numel() * 4 / copy_ms / 1e6


def sweep(pack, latent: Latent, rounds: int = 2) -> dict:
    """Every candidate of every kernel timed by graph replay, `rounds` rounds (alternate rounds in reverse order);
    returns the rows and the fastest candidate of each kernel (by the mean of the rounds' medians)."""
    projection, _, tp = projection_modules(pack)
    start = dict(tp.TUNING)
    plan = [(kernel, t) for kernel in KERNELS for t in candidates(tp, kernel)]
    times = {item: [] for item in plan}
    began = time.perf_counter()
    with torch.no_grad():
        for r in range(rounds):
            for kernel, tuning in plan if r % 2 == 0 else plan[::-1]:
                tp.TUNING[kernel] = tuning
                calls = [primitive(projection, kernel, latent, p) for p in latent.pairs]
                times[(kernel, tuning)].append(graph_ms(calls, reps=GRAPH_REPS))
                tp.TUNING[kernel] = start[kernel]
    rows = []
    for (kernel, tuning), ms in times.items():
        mean = statistics.fmean(ms)
        rows.append({"kernel": kernel, **tuning._asdict(), "ms_rounds": ms, "ms": mean,
                     "GBps": moved_bytes(kernel, latent) / mean / 1e6, "was_default": tuning == start[kernel]})
    best = {kernel: min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["ms"]) for kernel in KERNELS}
    chosen = {kernel: tp.Tuning(r["block"], r["num_warps"], r["programs_per_sm"]) for kernel, r in best.items()}
    return {"latent": list(latent.shape), "rounds": rounds, "seconds": time.perf_counter() - began,
            "previous": {k: t._asdict() for k, t in start.items()},
            "chosen": {k: t._asdict() for k, t in chosen.items()}, "rows": rows, "_chosen": chosen}


def apply_tuning(path: pathlib.Path, tuning: dict) -> str:
    """Writes `tuning` (kernel → Tuning) into the TUNING table of kernels/triton_projection.py; returns the text."""
    text = path.read_text()
    for kernel, t in tuning.items():
        line = re.compile(rf'^(    "{kernel}": )Tuning\([^)]*\),$', re.M)
        args = f"{t.block}, {t.num_warps}" + (f", {t.programs_per_sm}" if kernel.endswith("dots") else "")
        text, count = line.subn(rf"\g<1>Tuning({args}),", text)
        if count != 1:
            raise ValueError(f"{path}: expected one TUNING line for {kernel!r}, found {count}")
    path.write_text(text)
    return text


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bandwidth(pack, latent: Latent, peak: float) -> dict:
    projection, apg, tp = projection_modules(pack)
    cond, uncond = latent.cond, latent.uncond
    configs = {mode: apg.APGConfig(video_mode=mode) for mode in ("clip", "frame")}
    states = {(mode, path): apg.APGState(configs[mode].momentum) for mode in configs for path in ("fused", "torch")}
    eager = {}
    for mode in ("clip", "frame"):
        frames = mode == "frame"
        a, b = latent.coefficients[mode]
        for path in ("fused", "torch"):
            fused = path == "fused"
            eager[f"sample_dots_{mode}_{path}"] = (
                lambda f=frames, u=fused: projection.sample_dots(cond, uncond, fused=u, frames=f))
            eager[f"combine_{mode}_{path}"] = (
                lambda f=frames, u=fused, a=a, b=b: projection.combine(cond, uncond, a, b, fused=u, frames=f))
            eager[f"apg_op_{mode}_{path}"] = (
                lambda m=mode, u=fused, s=states[(mode, path)]: apg.apg_cfg_uncond(cond, uncond, configs[m], s, 1.0,
                                                                                  fused=u))
    with torch.no_grad():
        eager_ms = interleaved_ms(eager, rounds=EAGER_ROUNDS)
        graph = {}
        for mode in ("clip", "frame"):
            frames = mode == "frame"
            kernel = "frame_" if frames else ""
            graph[f"sample_dots_{mode}"] = graph_ms([primitive(projection, kernel + "dots", latent, p)
                                                     for p in latent.pairs], reps=GRAPH_REPS)
            graph[f"combine_{mode}"] = graph_ms([primitive(projection, kernel + "combine", latent, p)
                                                 for p in latent.pairs], reps=GRAPH_REPS)
        # a copy of one latent (x read, the copy written), rotating like the primitives: what these sizes allow
        targets = [torch.empty_like(cond) for _ in latent.pairs]
        graph["copy_latent"] = graph_ms([lambda p=p, t=t: t.copy_(p[0]) for p, t in zip(latent.pairs, targets)],
                                        reps=GRAPH_REPS)
        # correctness on this latent: the fused primitives against float64 references
        checks = {}
        for mode in ("clip", "frame"):
            frames = mode == "frame"
            a, b = latent.coefficients[mode]
            reference = projection.sample_dots(cond.double(), uncond.double(), fused=False, frames=frames)
            checks[f"sample_dots_{mode}"] = rel_err(projection.sample_dots(cond, uncond, fused=True, frames=frames),
                                                    reference)
            view = (cond.shape[0], 1, cond.shape[2], 1, 1) if frames else (-1, 1, 1, 1, 1)
            reference = a.double().view(view) * cond.double() + b.double().view(view) * uncond.double()
            checks[f"combine_{mode}"] = rel_err(projection.combine(cond, uncond, a, b, fused=True, frames=frames),
                                                reference)
    rows = []
    for mode in ("clip", "frame"):
        for op, kernel in (("sample_dots", "dots"), ("combine", "combine")):
            name = f"{op}_{mode}"
            moved = moved_bytes(kernel, latent)
            rows.append({"primitive": op, "mode": mode, "bytes": moved,
                         "eager_ms_fused": eager_ms[f"{name}_fused"], "eager_ms_torch": eager_ms[f"{name}_torch"],
                         "graph_ms": graph[name], "graph_GBps": moved / graph[name] / 1e6,
                         "fraction_of_copy_peak": moved / graph[name] / 1e6 / peak,
                         "meets_target": moved / graph[name] / 1e6 / peak >= TARGET_FRACTION,
                         "rel_err_vs_float64": checks[name],
                         "tuning": tp.TUNING[("frame_" if mode == "frame" else "") + kernel]._asdict()})
    return {
        "latent": list(latent.shape),
        "dtype": str(cond.dtype).replace("torch.", ""),
        "copy_peak_GBps": peak,
        "copy_latent_graph_GBps": 2 * latent.nbytes / graph["copy_latent"] / 1e6,
        "target_fraction": TARGET_FRACTION,
        "rows": rows,
        "eager_ms": eager_ms,
        "graph_replay_ms": graph,
        "apg_op_speedup_fused_over_torch": {mode: eager_ms[f"apg_op_{mode}_torch"] / eager_ms[f"apg_op_{mode}_fused"]
                                            for mode in ("clip", "frame")},
        "tuning": {k: t._asdict() for k, t in tp.TUNING.items()},
    }


def rounds_us(row: dict) -> str:
    return f"{row['ms'] * 1000:.1f} ({', '.join(f'{m * 1000:.1f}' for m in row['ms_rounds'])})"


def tuning_name(t: dict) -> str:
    return f"{t['block']}/{t['num_warps']}" + (f"/{t['programs_per_sm']}" if t.get("programs_per_sm") else "")


def markdown(result: dict) -> str:
    """The report: step overhead, the bandwidth table (clip and frame rows beside the copy), the sweep's summary."""
    lines = ["# APG cost on the GPU", "",
             f"`{result['command']}` (the raw output is `{result['json_name']}`). {result['device']}, torch "
             f"{result['torch']}, {result['date']}, commit {result['commit']}"
             + (f" ({result['tree_note']})" if result.get("tree_note") else "") + ".", ""]
    s = result.get("step_overhead")
    if s:
        ops = s["guidance_op_ms"]
        lines += ["## Per-step overhead against plain CFG: SDXL-size UNet at 1024²", "",
                  "ComfyUI's `model_base.SDXL` with the SDXL base config (fp16, random weights), latent "
                  f"{s['latent']} (cond and uncond in one batch, as ComfyUI runs CFG). Steps timed interleaved with "
                  "CUDA events, median of 15 rounds.", "", "| | ms |", "| --- | --- |",
                  f"| CFG step (model call + CFG combination) | {s['step_ms']['cfg_step']:.2f} |",
                  f"| APG step (model call + APG pre-CFG hook, momentum on + CFG combination) | "
                  f"{s['step_ms']['apg_step']:.2f} |",
                  f"| ratio APG / CFG | {s['apg_over_cfg_step_ratio']:.3f} |",
                  f"| CFG combination alone | {ops['cfg_combine']:.3f} |",
                  f"| APG op alone (fused path) | {ops['apg_op_fused']:.3f} |",
                  f"| APG op alone (torch path) | {ops['apg_op_torch']:.3f} |", "",
                  f"The APG op costs {s['apg_op_overhead_ms']:.2f} ms more than the CFG combination, "
                  f"{100 * s['apg_op_overhead_fraction_of_cfg_step']:.1f}% of a CFG step.", ""]
    b = result["video_latent_bandwidth"]
    elements = 1
    for d in b["latent"]:
        elements *= d
    lines += ["## Fused projection kernels on a video-size latent, per clip and per frame", "",
              f"Latent {b['latent']} ({elements / 1e6:.2f} M elements per tensor), {b['dtype']}; clip = one group "
              f"per sample ({b['latent'][0]}), frame = one group per (sample, latent frame) "
              f"({b['latent'][0] * b['latent'][2]}). Device-to-device copy in the same run: "
              f"{b['copy_peak_GBps']:.0f} GB/s (1 GiB, bytes read + written); a copy of one latent, graph-replayed "
              f"like the kernels: {b['copy_latent_graph_GBps']:.0f} GB/s. Kernel-only times are CUDA-graph replays "
              f"rotating over {PAIRS} input pairs; 'of copy' is the graph-replay bandwidth over the 1 GiB copy's "
              f"(issue 16's target: ≥ {100 * b['target_fraction']:.0f}%). Tuning is block/warps[/programs per "
              "SM].", "",
              "| primitive | mode | bytes moved | eager fused ms | eager torch ms | graph replay ms | GB/s | of copy | "
              "≥ target | rel. err. vs float64 | tuning |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        lines.append(f"| `{r['primitive']}` | {r['mode']} | {r['bytes'] / 1e6:.1f} MB | {r['eager_ms_fused']:.3f} | "
                     f"{r['eager_ms_torch']:.3f} | {r['graph_ms'] * 1000:.1f} µs | {r['graph_GBps']:.0f} | "
                     f"{100 * r['fraction_of_copy_peak']:.0f}% | {'yes' if r['meets_target'] else 'NO'} | "
                     f"{r['rel_err_vs_float64']:.1e} | {tuning_name(r['tuning'])} |")
    g, e = b["graph_replay_ms"], b["eager_ms"]
    lines += ["",
              "`sample_dots` is one launch: each program's partial sums, and the group's last program (elected by "
              "an atomic ticket) adds them in float64 in program order.", "",
              "The whole APG op (difference, momentum, dots, coefficients with a finiteness check, combine), eager: "
              + "; ".join(f"{mode} {e[f'apg_op_{mode}_fused']:.3f} ms fused, {e[f'apg_op_{mode}_torch']:.3f} ms torch"
                          for mode in ("clip", "frame")) + ".", ""]
    sw = result.get("sweep")
    if sw:
        lines += ["## Tuning sweep", "",
                  f"Every candidate timed by graph replay on the same latent, {sw['rounds']} rounds (the second in "
                  f"reverse order), mean of the rounds' medians ({sw['seconds']:.0f} s in all). Best and previous "
                  "setting of each kernel, and the spread of the previous setting's rounds:", "",
                  "| kernel | previous | its µs (rounds) | chosen | its µs (rounds) | GB/s |",
                  "|---|---|---|---|---|---|"]
        for kernel in KERNELS:
            rows = [r for r in sw["rows"] if r["kernel"] == kernel]
            prev = next(r for r in rows if r["was_default"])
            best = min(rows, key=lambda r: r["ms"])
            lines.append(f"| {kernel} | {tuning_name(prev)} | {rounds_us(prev)} | {tuning_name(best)} | "
                         f"{rounds_us(best)} | "
                         f"{best['GBps']:.0f} |")
        lines += ["", "All candidates, µs (mean of rounds):", ""]
        for kernel in KERNELS:
            rows = sorted((r for r in sw["rows"] if r["kernel"] == kernel), key=lambda r: r["ms"])
            lines.append(f"- {kernel}: " + ", ".join(f"{tuning_name(r)} {r['ms'] * 1000:.1f}" for r in rows))
        lines.append("")
    return "\n".join(lines)


def smoke_setup(pack):
    """--smoke on a machine without a GPU: the Triton kernels under TRITON_INTERPRET=1 on CPU tensors (the fused path
    is let through for them and the multiprocessor count is made up); only the bench's logic is checked."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    projection, _, tp = projection_modules(pack)
    projection.use_fused = lambda x, fused: bool(fused) if fused is not None else False
    tp._multiprocessors = lambda index: 4
    tp._device_index = lambda x: 0
    global REDUCTION_SHAPES, PROGRAMS_PER_SM, ELEMENTWISE_SHAPES, GRAPH_REPS, EAGER_ROUNDS
    REDUCTION_SHAPES, PROGRAMS_PER_SM, ELEMENTWISE_SHAPES = ((256, 4), (512, 4)), (2, 4), ((256, 4), (512, 4))
    GRAPH_REPS, EAGER_ROUNDS = 1, 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI folder (for the SDXL UNet classes); needed unless --smoke")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--tree-note", default="", help="a note on the working tree, e.g. 'uncommitted changes'")
    parser.add_argument("--out", required=True, help="the JSON result")
    parser.add_argument("--md", default="", help="also write the markdown report here")
    parser.add_argument("--sweep", action="store_true", help="tune the four kernels first and use the fastest")
    parser.add_argument("--apply-tuning", action="store_true", help="with --sweep: write the chosen tuning into "
                        "kernels/triton_projection.py")
    parser.add_argument("--skip-step-overhead", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the logic (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    pack = import_pack()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        smoke_setup(pack)
        args.skip_step_overhead = True
    elif not args.comfyui and not args.skip_step_overhead:
        parser.error("--comfyui is needed for the step overhead (or pass --skip-step-overhead)")
    result = {
        "bench": "bench/apg_bench.py",
        "command": " ".join(["python", "bench/apg_bench.py"] + sys.argv[1:]),
        "json_name": pathlib.Path(args.out).name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke, Triton interpreter)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "tree_note": args.tree_note,
        "torch": torch.__version__,
    }

    def write():
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
        if args.md:
            pathlib.Path(args.md).write_text(markdown(result))

    latent = Latent(SMOKE_LATENT if args.smoke else VIDEO_LATENT, device)
    if args.sweep:
        _, _, tp = projection_modules(pack)
        found = sweep(pack, latent)
        chosen = found.pop("_chosen")
        tp.TUNING.update(chosen)
        result["sweep"] = found
        if args.apply_tuning:
            apply_tuning(pathlib.Path(tp.__file__), chosen)
            found["applied_to"] = "kernels/triton_projection.py"
        print("sweep: " + ", ".join(f"{k} {tuning_name(t._asdict())}" for k, t in chosen.items()), flush=True)
    peak = copy_peak_GBps(device)
    result["video_latent_bandwidth"] = bandwidth(pack, latent, peak)
    write()
    if not args.skip_step_overhead:
        result["step_overhead"] = step_overhead(args.comfyui, pack)
        write()
    print(markdown(result))


if __name__ == "__main__":
    main()
