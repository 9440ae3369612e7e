"""PAG on the GPU: per-step cost of PAG+CFG against plain CFG, ours (batched and separate) and ComfyUI's core node.

An SDXL-size UNet (ComfyUI's `model_base.SDXL` with the SDXL base config, random fp16 weights, `apg_bench.build_sdxl`)
at 1024² (latent 128²), one image, cfg 5, PAG scale 3 on the middle block (the paper's SDXL layers, 10 transformers;
ComfyUI's core node perturbs the same block). Every variant runs through ComfyUI's own sampling path: a CFGGuider
whose sampler hands out its step, so each timed call is one whole sampler step (`sampling_function`,
`calc_cond_batch` with ComfyUI's batching and memory check, the CFG function, the hooks):

- cfg: the unpatched model (cond and uncond in one batch of 2);
- pag_batched: our node's patch, the perturbed pass in the same model call (one batch of 3);
- pag_separate: our node's patch with batching off (batch of 2, then a call of 1);
- core_pag: ComfyUI's `PerturbedAttentionGuidance` node (comfy_extras/nodes_pag.py), its own code, run unchanged.
  That module imports `comfy_api.latest`, which imports PyAV, absent on the GPU machine; the node itself uses only
  `comfy.model_patcher` and `comfy.samplers`, so a stand-in for the two names it takes from `comfy_api.latest`
  (a base class and the output wrapper) is put in sys.modules before the import (see `import_core_pag`).

The four sampling runs are entered one inside the other, so that all four steps are live at once and can be timed
call by call in turn (CUDA events): drift and interference on the machine hit all variants alike, and each call has
a CFG call next to it to be compared with. The first guided output of each variant is kept to compare batched,
separate and core, and the peak memory of each variant's calls is read.

    python bench/pag_bench.py --comfyui PATH_TO_COMFYUI --commit SHA --out RESULT.json
"""

import argparse
import datetime
import importlib
import json
import statistics
import sys
import types

import torch

from apg_bench import build_sdxl
from pack import PACKAGE, import_pack

SIZE = 128  # latent side: 1024² pixels
CFG = 5.0
PAG_SCALE = 3.0
SIGMA = 14.6  # the first sigma of SDXL's schedule, where PAG acts


def import_core_pag():
    """comfy_extras.nodes_pag.PerturbedAttentionGuidance, imported with stand-ins for comfy_api.latest's
    `ComfyExtension` and `io` (only `io.ComfyNode` as a base class and `io.NodeOutput` are touched by `execute`)."""
    class NodeOutput:
        def __init__(self, *result):
            self.result = result

    stand_in = types.ModuleType("comfy_api.latest")
    stand_in.ComfyExtension = object
    stand_in.io = types.SimpleNamespace(ComfyNode=object, NodeOutput=NodeOutput)
    sys.modules.setdefault("comfy_api", types.ModuleType("comfy_api"))
    sys.modules["comfy_api.latest"] = stand_in
    return importlib.import_module("comfy_extras.nodes_pag").PerturbedAttentionGuidance


def within_sampling_runs(variants: dict, conds, noise, latent, sigmas, measure, steps=None):
    """Calls `measure(steps)` with a live sampler step of every variant: {name: step()}.

    A step is only callable inside its variant's sampling run (ComfyUI sets up the conds and the per-run model
    options there), so the runs are entered one inside the other: each run's sampler records its step and enters
    the next run; the innermost one measures."""
    import comfy.samplers

    steps = {} if steps is None else steps
    if len(steps) == len(variants):
        return measure(steps)
    name = list(variants)[len(steps)]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        sigma = sigmas[0] * x.new_ones([x.shape[0]])
        steps[name] = lambda: model(x, sigma, **extra_args)
        within_sampling_runs(variants, conds, noise, latent, sigmas, measure, steps)
        return x

    guider = comfy.samplers.CFGGuider(variants[name])
    guider.set_conds(*conds)
    guider.set_cfg(CFG)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(sample), sigmas, seed=0)


def interleaved_steps(steps: dict, warmup: int, reps: int, record: dict):
    """Times every variant's step `reps` times, call by call in turn (the order rotating each time), with CUDA
    events; records the times, the peak memory of each variant's calls and each variant's first output."""
    names = list(steps)
    record.update(times={n: [] for n in names}, peak={n: 0.0 for n in names}, outputs={})
    with torch.no_grad():
        for name, step in steps.items():
            record["outputs"][name] = step().float().cpu()
            for _ in range(warmup):
                step()
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[name]()
                end.record()
                end.synchronize()
                record["times"][name].append(start.elapsed_time(end))
                record["peak"][name] = max(record["peak"][name], torch.cuda.max_memory_allocated() / 2**30)


def step_costs(comfyui: str, reps: int) -> dict:
    import comfy.model_management
    import comfy.model_patcher

    import_pack()
    pag = importlib.import_module(f"{PACKAGE}.nodes.pag_patch")
    config = importlib.import_module(f"{PACKAGE}.guiders.pag").PAGConfig(scale=PAG_SCALE)
    model = build_sdxl(comfyui)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    negative = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    noise = torch.randn(1, 4, SIZE, SIZE, generator=g)
    latent = torch.zeros(1, 4, SIZE, SIZE)
    sigmas = torch.tensor([SIGMA, 0.0])
    variants = {
        "cfg": patcher,
        "pag_batched": pag.apply_pag(patcher, config, "auto", batched=True),
        "pag_separate": pag.apply_pag(patcher, config, "auto", batched=False),
        "core_pag": import_core_pag().execute(patcher, PAG_SCALE).result[0],
    }
    record = {}
    within_sampling_runs(variants, (positive, negative), noise, latent, sigmas,
                         lambda steps: interleaved_steps(steps, 3, reps, record))
    times, outputs = record["times"], record["outputs"]
    step_ms = {name: statistics.median(t) for name, t in times.items()}

    def rel(a, b):
        return ((outputs[a] - outputs[b]).norm() / outputs[b].norm()).item()

    batch3_fits = pag.batch_fits(model, noise.cuda(), 3)
    return {
        "model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
        "latent": [1, 4, SIZE, SIZE],
        "cfg": CFG,
        "pag_scale": PAG_SCALE,
        "pag_layers": "middle.0 (10 transformers), ours and core",
        "sigma": SIGMA,
        "calls_per_variant": reps,
        "step_ms": step_ms,
        "step_ms_min": {name: min(t) for name, t in times.items()},
        "step_ms_all": times,
        "ratio_to_cfg": {name: ms / step_ms["cfg"] for name, ms in step_ms.items()},
        "ratio_to_cfg_paired_median": {
            name: statistics.median(t / c for t, c in zip(times[name], times["cfg"])) for name in times},
        "peak_memory_GiB": record["peak"],
        "batched_pass_fits_by_comfyui_estimate": batch3_fits,
        "free_memory_GiB_at_end": comfy.model_management.get_free_memory(torch.device("cuda")) / 2**30,
        "agreement_rel_err": {
            "pag_batched_vs_pag_separate": rel("pag_batched", "pag_separate"),
            "pag_batched_vs_core_pag": rel("pag_batched", "core_pag"),
            "pag_separate_vs_core_pag": rel("pag_separate", "core_pag"),
            "pag_batched_vs_cfg": rel("pag_batched", "cfg"),
        },
    }


def markdown(result: dict) -> str:
    s = result["step_overhead"]
    lines = [
        "# PAG per-step cost (bench/pag_bench.py)",
        "",
        f"Device: {result['device']}; date {result['date']}; commit {result['commit']}; torch {result['torch']}.",
        "",
        f"{s['model']}, latent {s['latent']} (1024² pixels), cfg {s['cfg']}, PAG scale {s['pag_scale']} on "
        f"{s['pag_layers']}. One timed call is one whole sampler step through ComfyUI's sampling_function; "
        f"{s['calls_per_variant']} calls per variant, interleaved call by call; medians (and minima).",
        "",
        "| variant | ms per step (median) | ms per step (min) | × CFG step | × CFG step (paired) | peak memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = {"cfg": "CFG (batch 2)", "pag_batched": "ours, batched (batch 3)",
             "pag_separate": "ours, separate pass (2 + 1)", "core_pag": "ComfyUI core PerturbedAttentionGuidance"}
    for name, label in names.items():
        lines.append(f"| {label} | {s['step_ms'][name]:.1f} | {s['step_ms_min'][name]:.1f} | "
                     f"{s['ratio_to_cfg'][name]:.3f} | {s['ratio_to_cfg_paired_median'][name]:.3f} | "
                     f"{s['peak_memory_GiB'][name]:.2f} |")
    agree = s["agreement_rel_err"]
    lines += [
        "",
        "× CFG step is the ratio of the medians; (paired) is the median over the interleaved turns of each call's "
        "time over the CFG call's time in the same turn. ComfyUI's memory estimate lets the batch of 3 run in one "
        f"call: {s['batched_pass_fits_by_comfyui_estimate']}.",
        "",
        f"First guided output, relative L2 (fp16 model): ours separate vs core {agree['pag_separate_vs_core_pag']:.2e} "
        f"(the same computation); batched vs separate {agree['pag_batched_vs_pag_separate']:.2e}, the rounding of "
        f"fp16 kernels at another batch size. On these random weights PAG moves the output by only "
        f"{agree['pag_batched_vs_cfg']:.2e} (PAG vs CFG), so this run cannot resolve the agreement of the PAG update "
        "itself; the float32 CPU tests (tests/test_pag_sampling.py) show batched = separate = core to 1e-5.",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI folder")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--reps", type=int, default=40, help="timed calls per variant")
    parser.add_argument("--out", required=True, help="result JSON; a Markdown summary is written beside it")
    args = parser.parse_args()
    sys.path.insert(0, args.comfyui)  # the pack's ComfyUI-side modules import comfy
    result = {
        "bench": "bench/pag_bench.py",
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "torch": torch.__version__,
        "core_pag_import": "comfy_extras.nodes_pag imported unchanged, with a stand-in for comfy_api.latest (no PyAV)",
        "step_overhead": step_costs(args.comfyui, args.reps),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
