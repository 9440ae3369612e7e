"""What bounds a sampling step on a fast GPU: wall time against GPU-busy time, eager and compiled.

An SDXL-size UNet (ComfyUI's model_base.SDXL, base config, random fp16 weights: bench/apg_bench.build_sdxl) at 1024²,
sampled through ComfyUI's own path (`comfy.sample.sample`, euler) as the KSampler node does, at 1, 2 and 4 UNet rows
per call (one image without CFG, one image with CFG, two images with CFG). For each setting:

- wall time per step: the median of whole runs of --steps steps, divided by the steps (a warm-up run first);
- GPU-busy time per step: the sum of the CUDA kernels' device time that torch.profiler records over one run, divided
  by the steps; busy = GPU time / wall time. Where busy is well below 1 the GPU waits on the host: rows dropped from a
  call then save little time;
- where the host time goes: the top CPU operators by self time (torch.profiler) and the top Python functions by
  cumulative time (cProfile) of one eager run at 1 row, grouped by file, so ComfyUI's per-module weight casting, the
  model patcher's wrappers and Python are told apart.

Modes: `eager`; `eager+autotune` (cuDNN benchmark on: ComfyUI's `--fast autotune`); `compiled` (core
TorchCompileModel's own wrapper, `comfy_api.torch_helpers.set_torch_compile_wrapper`, backend inductor, its default
mode), whose compile time is reported apart (the first run of each row count).

    python bench/step_bound.py --comfyui COMFYUI_DIR --out OUT_DIR --commit SHA [--steps 20] [--reps 3]

Writes step_bound.json and step_bound.md (--name). Needs a CUDA GPU.
"""

import argparse
import collections
import cProfile
import datetime
import json
import pathlib
import pstats
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# (label, images per batch, cfg): the UNet rows per call are images × (2 if cfg > 1 else 1)
SETTINGS = [("1 row (1 image, no CFG)", 1, 1.0), ("2 rows (1 image, CFG)", 1, 5.0), ("4 rows (2 images, CFG)", 2, 5.0)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="eager,eager+autotune,compiled")
    p.add_argument("--name", default="step_bound")
    return p.parse_args()


def sdxl_patcher(comfyui: str):
    import comfy.model_management
    import comfy.model_patcher

    from apg_bench import build_sdxl

    model = build_sdxl(comfyui)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def conditioning(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def sampler_run(patcher, images: int, cfg: float, steps: int):
    """A function that samples `steps` euler steps of `images` 1024² latents through comfy.sample.sample and returns
    its wall time in seconds (synchronised)."""
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images, 4, 128, 128, generator=g)
    latent = torch.zeros_like(noise)
    positive, negative = conditioning(1), conditioning(2)  # ComfyUI repeats a cond over the batch

    def run():
        torch.cuda.synchronize()
        began = time.perf_counter()
        comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True)
        torch.cuda.synchronize()
        return time.perf_counter() - began

    return run


def gpu_busy_seconds(run) -> float:
    """The CUDA kernels' summed device time over one call of `run`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    return sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA"
               and e.device_time_total > 0 and not e.key.startswith(("cudaDeviceSynchronize", "ProfilerStep"))) / 1e6


def host_profile(run, top: int = 12) -> dict:
    """Where an eager run's host time goes: the top CPU operators by self time, and the Python files whose functions
    take the most time of their own (cProfile tottime, grouped by file)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ops = sorted((e for e in prof.key_averages()), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    profiler = cProfile.Profile()
    profiler.enable()
    wall = run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_file = collections.Counter()
    by_function = collections.Counter()
    for (filename, line, function), (_, _, tottime, _, _) in stats.stats.items():
        short = filename.split("comfyui-0.3.75/")[-1].split("site-packages/")[-1]
        by_file[short] += tottime
        by_function[f"{short}:{line} {function}"] += tottime
    return {"cpu_ops_self_ms": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in ops],
            "cprofile_wall_s": wall,
            "python_files_self_s": by_file.most_common(top),
            "python_functions_self_s": by_function.most_common(top)}


def measure(patcher, mode: str, args) -> dict:
    results = {}
    for label, images, cfg in SETTINGS:
        run = sampler_run(patcher, images, cfg, args.steps)
        first = run()  # warm-up; for the compiled mode, the compilation of this shape
        walls = [run() for _ in range(args.reps)]
        wall = statistics.median(walls) / args.steps
        gpu = gpu_busy_seconds(run) / args.steps
        results[label] = {"rows": images * (2 if cfg > 1 else 1), "images": images, "cfg": cfg,
                          "wall_ms_per_step": wall * 1e3, "gpu_ms_per_step": gpu * 1e3, "busy": gpu / wall,
                          "first_run_s": first, "walls_s": walls}
        print(f"{mode} {label}: {results[label]}", flush=True)
    return results


def markdown(report: dict) -> str:
    lines = ["# What bounds a step (bench/step_bound.py)", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"ComfyUI {report['comfyui']}.", "",
             f"SDXL-size UNet (random fp16 weights) at 1024², {report['steps']} euler steps through "
             "`comfy.sample.sample`; wall time is the median of whole runs per step, GPU time the summed kernel time "
             "(torch.profiler) per step.", "",
             "| mode | UNet rows per call | wall ms/step | GPU ms/step | GPU busy | first run (s) |",
             "|---|---|---|---|---|---|"]
    for mode, results in report["modes"].items():
        for label, r in results.items():
            lines.append(f"| {mode} | {label} | {r['wall_ms_per_step']:.1f} | {r['gpu_ms_per_step']:.1f} | "
                         f"{r['busy']:.0%} | {r['first_run_s']:.1f} |")
    lines += ["", "Time per step relative to the 2-row (CFG) step of the same mode:", "",
              "| mode | 1 row / 2 rows | 4 rows / 2 rows |", "|---|---|---|"]
    for mode, results in report["modes"].items():
        walls = [r["wall_ms_per_step"] for r in results.values()]
        lines.append(f"| {mode} | {walls[0] / walls[1]:.2f} | {walls[2] / walls[1]:.2f} |")
    host = report["host_profile"]
    lines += ["", f"## Where the host time goes (eager, 1 row, one run of {report['steps']} steps, "
              f"{host['cprofile_wall_s']:.2f} s under cProfile)", "",
              "Python time of its own, by file:", "", "| file | s |", "|---|---|"]
    lines += [f"| `{f}` | {s:.3f} |" for f, s in host["python_files_self_s"]]
    lines += ["", "Python functions:", "", "| function | s |", "|---|---|"]
    lines += [f"| `{f}` | {s:.3f} |" for f, s in host["python_functions_self_s"]]
    lines += ["", "CPU operators by self time (torch.profiler):", "", "| operator | ms | calls |", "|---|---|---|"]
    lines += [f"| `{k}` | {ms:.1f} | {n} |" for k, ms, n in host["cpu_ops_self_ms"]]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    sys.path.insert(0, args.comfyui)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfyui_version
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    patcher = sdxl_patcher(args.comfyui)
    report = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": args.commit, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
        "steps": args.steps, "reps": args.reps, "modes": {}}
    for mode in args.modes.split(","):
        torch.backends.cudnn.benchmark = mode == "eager+autotune"
        model = patcher
        if mode == "compiled":
            model = patcher.clone()
            set_torch_compile_wrapper(model=model, backend="inductor")
        report["modes"][mode] = measure(model, mode, args)
    torch.backends.cudnn.benchmark = False
    report["host_profile"] = host_profile(sampler_run(patcher, 1, 1.0, args.steps))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
