"""APG on the GPU: per-step cost against plain CFG, and the bandwidth of the fused projection kernels.

1. Per-step overhead: an SDXL-size UNet (ComfyUI's own `model_base.SDXL` with the SDXL base config, random fp16
   weights) at 1024² (latent 128²), batch 2 (cond + uncond) as ComfyUI runs CFG. A CFG step is the model call plus
   the CFG combination; an APG step adds our pre-CFG hook (`apg_cfg_uncond`, momentum on). The two are timed
   interleaved with CUDA events, and the guidance ops are also timed alone.
2. Bandwidth: the fused (Triton) and torch paths of `sample_dots` and `combine`, and the whole APG op, on a Wan 2.1
   720p video latent [1, 16, 21, 90, 160] in float32 (ComfyUI's denoised outputs are float32), against a
   device-to-device copy measured in the same run.

    python bench/apg_bench.py --comfyui PATH_TO_COMFYUI --out RESULT.json
"""

import argparse
import datetime
import json
import statistics
import sys

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


def time_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fns, reps=100):
    """Kernel time per call without launch overhead: the calls, each on its own inputs so that the working set
    exceeds the L2 cache, captured once in a CUDA graph and replayed."""
    for fn in fns:
        fn()  # compile and warm up outside the capture
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
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
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


def bandwidth(pack) -> dict:
    projection = pack.kernels.projection
    apg = pack.guiders.apg
    g = torch.Generator(device="cuda").manual_seed(1)
    cond = torch.randn(VIDEO_LATENT, device="cuda", generator=g)
    uncond = cond + torch.randn(VIDEO_LATENT, device="cuda", generator=g)
    a, b = torch.rand(1, device="cuda"), torch.rand(1, device="cuda")
    nbytes = cond.numel() * cond.element_size()
    big = torch.empty(256 * 2**20, device="cuda", dtype=torch.float32)
    copy_ms = time_ms(lambda: big.clone(), reps=50)
    peak = 2 * big.numel() * 4 / copy_ms / 1e6  # GB/s, read + write
    config = apg.APGConfig()
    state = apg.APGState(config.momentum)
    with torch.no_grad():
        times = interleaved_ms({
            "sample_dots_fused": lambda: projection.sample_dots(cond, uncond, fused=True),
            "sample_dots_torch": lambda: projection.sample_dots(cond, uncond, fused=False),
            "combine_fused": lambda: projection.combine(cond, uncond, a, b, fused=True),
            "combine_torch": lambda: projection.combine(cond, uncond, a, b, fused=False),
            "apg_op_fused": lambda: apg.apg_cfg_uncond(cond, uncond, config, state, 1.0, fused=True),
            "apg_op_torch": lambda: apg.apg_cfg_uncond(cond, uncond, config, state, 1.0, fused=False),
        }, rounds=50)
        pairs = [(torch.randn_like(cond), torch.randn_like(cond)) for _ in range(6)]
        kernel_only = {
            "sample_dots_fused": graph_ms([lambda p=p: projection.sample_dots(*p, fused=True) for p in pairs]),
            "combine_fused": graph_ms([lambda p=p: projection.combine(*p, a, b, fused=True) for p in pairs]),
        }
    moved = {"sample_dots": 2 * nbytes, "combine": 3 * nbytes}
    return {
        "latent": list(VIDEO_LATENT),
        "dtype": "float32",
        "copy_peak_GBps": peak,
        "ms": times,
        "GBps": {f"{op}_{path}": moved[op] / times[f"{op}_{path}"] / 1e6 for op in moved for path in ("fused", "torch")},
        "fraction_of_copy_peak": {
            f"{op}_fused": moved[op] / times[f"{op}_fused"] / 1e6 / peak for op in moved
        },
        "graph_replay_ms": kernel_only,
        "graph_replay_GBps": {f"{op}_fused": moved[op] / kernel_only[f"{op}_fused"] / 1e6 for op in moved},
        "graph_replay_fraction_of_copy_peak": {
            f"{op}_fused": moved[op] / kernel_only[f"{op}_fused"] / 1e6 / peak for op in moved
        },
        "apg_op_speedup_fused_over_torch": times["apg_op_torch"] / times["apg_op_fused"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI folder (for the SDXL UNet classes)")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pack = import_pack()
    result = {
        "bench": "bench/apg_bench.py",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "torch": torch.__version__,
        "step_overhead": step_overhead(args.comfyui, pack),
        "video_latent_bandwidth": bandwidth(pack),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
