"""Adapter guidance distillation on the GPU: AGD at one model pass per step against CFG at two.

Part 1, the reference model (reference/model.py). Adapters are trained with the pack's own training
(`nodes/agd_patch.train_agd`, what Train AGD Adapters runs), on the model's classes ('all classes' conditioning,
empty-class negative), twice with the same settings: on CFG-guided trajectories (--trajectories runs of euler,
--steps steps, scales uniform in [--scale-low, --scale-high], as the paper trains) and, the paper's ablation, on
ordinary diffusion trajectories (the same number of Fashion-MNIST training images, class-balanced, noised forward at
the same sigmas, the CFG prediction as target). Then, per scale w of --scales, --per-class images per class from the
same initial noise through ComfyUI's sampling path (bench/reference_eval.py): CFG at w (KSampler at cfg w), AGD at
w (Apply AGD, KSampler at cfg 1), AGD trained on ordinary trajectories, alternating within each scale; FD, precision,
recall and class accuracy in the guide classifier's features (reference_eval.evaluate), accuracy under the
independent judge (reference/train_judge.py), model rows per image (ComfyUI's UNet calls, counted), and images per
second. The CFG-trajectory adapters are written to --adapters (the pack ships them as
reference/weights/agd_adapters/fashion_agd.safetensors).

Part 2, an SDXL-size UNet at 1024² (bench/apg_bench.py's `build_sdxl`, fp16, random weights) with adapters of the
paper's size (hidden 320 at every cross-attention, random non-zero weights): one AGD step (one pass, batch 1, with
the adapters) against one CFG step (batch 2 and the combination), interleaved CUDA timings in one run; adapter
parameters and bytes against the UNet's.

    python bench/agd_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA

DATA_DIR needs the Fashion-MNIST files of both splits (train: the ablation's images; test: the FD reference).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from classifier_bench import accuracy  # noqa: E402  (stands in for matplotlib where it is missing)
import reference_eval as ref  # noqa: E402
from pack import import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui, to_model_space  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--steps", type=int, default=30, help="sampling steps, of the trajectories and of the evaluation")
    p.add_argument("--scales", default="2,3,4,6")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--trajectories", type=int, default=500)
    p.add_argument("--trajectory-batch", type=int, default=50)
    p.add_argument("--scale-low", type=float, default=1.0)
    p.add_argument("--scale-high", type=float, default=6.0, help="6: the paper's range for its class-conditional "
                   "model (DiT)")
    p.add_argument("--train-steps", type=int, default=5000)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=16, help="adapter width: 16 makes the adapters a few percent of the "
                   "reference UNet, the paper's proportion")
    p.add_argument("--variants", default="cfg_trajectories,ordinary_trajectories")
    p.add_argument("--adapters", default="", help="write the CFG-trajectory adapters here")
    p.add_argument("--name", default="agd_bench")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--judge", default=str(ROOT / "reference" / "weights" / "fashion_judge.safetensors"))
    args = p.parse_args()
    args.sampler, args.scheduler = "euler", "normal"
    return args


def class_interleaved(images: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """`count` images, image i of class i mod C (what an 'all classes' conditioning asks of image i)."""
    classes = len(CLASS_NAMES)
    per_class = [images[labels == c][: (count + classes - 1) // classes] for c in range(classes)]
    return torch.stack(per_class, dim=1).flatten(0, 1)[:count]


def train_variant(args, model, tokens, ordinary: bool) -> tuple:
    from reference.data import load_split
    from reference.model import class_conditioning

    from comfyui_guidance.guiders.agd import AdapterSpec
    from comfyui_guidance.nodes.agd_patch import TrainingSettings, train_agd

    settings = TrainingSettings(args.trajectories, args.scale_low, args.scale_high, args.sampler, args.scheduler,
                                args.steps, args.trajectory_batch, args.train_steps, args.train_batch, args.lr,
                                seed=args.seed, ordinary=ordinary)
    positive = [[tokens[: len(CLASS_NAMES)].clone(), {}]]
    negative = class_conditioning(tokens, None)
    clean = None
    if ordinary:
        images, labels = (torch.from_numpy(a) for a in load_split(pathlib.Path(args.data), "train"))
        clean = class_interleaved(to_model_space(images), labels, args.trajectories)
    log = []

    def report(line):
        log.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as work:
        began = time.perf_counter()
        adapters = train_agd(model, positive, negative, torch.zeros(1, 3, RESOLUTION, RESOLUTION), settings,
                             AdapterSpec(hidden_dim=args.hidden), pathlib.Path(work), log=report, clean=clean)
        seconds = time.perf_counter() - began
    return adapters, seconds, log


def reference_part(args, device) -> dict:
    from comfy.sample import prepare_noise

    from reference.judge import load_judge

    import_pack()
    from comfyui_guidance.guiders.agd import save_adapters
    from comfyui_guidance.nodes.agd_patch import apply_agd

    model, tokens = ref.load_diffusion(args.weights)
    base_parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    variants = {}
    for name in args.variants.split(","):
        adapters, seconds, log = train_variant(args, model, tokens, ordinary=name == "ordinary_trajectories")
        variants[name] = {"adapters": adapters, "training_seconds": seconds, "log": log,
                          "trajectory_seconds": float(adapters.info["trajectory_seconds"]),
                          "train_loop_seconds": float(adapters.info["training_seconds"]),
                          "final_loss": float(adapters.info["final_loss"])}
        print(f"{name}: {seconds:.1f} s, final loss {adapters.info['final_loss']}", flush=True)
    if args.adapters and "cfg_trajectories" in variants:
        save_adapters(variants["cfg_trajectories"]["adapters"], args.adapters)
    guide = ref.load_classifier(ROOT / "reference" / "weights" / "fashion_classifier.safetensors", len(CLASS_NAMES),
                                device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(guide, pathlib.Path(args.data), args.per_class, 0, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    noise = prepare_noise(torch.zeros(len(labels), 3, RESOLUTION, RESOLUTION), args.seed)

    def setups(w):
        yield "CFG", ref.Setup(model, w)
        for name, v in variants.items():
            yield f"AGD ({name.replace('_', ' ')})", ref.Setup(apply_agd(model, v["adapters"], w), 1.0)

    for w in (min(args.scales), max(args.scales)):  # loading, kernel choice and allocator growth stay out of the times
        for _, setup in setups(w):
            ref.sample(setup, tokens, labels, noise, args, steps=2)
    rows = []
    cond_only = ref.Setup(model, 1.0)
    for w in [1.0, *args.scales]:
        for method, setup in ([("conditional only", cond_only)] if w == 1.0 else setups(w)):
            counted, counter = ref.with_counter(setup)
            images, seconds = ref.sample(counted, tokens, labels, noise, args)
            row = {"method": method, "scale": w, **ref.evaluate(images, labels, guide, real, args.k, device),
                   "judge_accuracy": accuracy(judge, images, labels, device),
                   "passes_per_step": counter.rows / len(labels) / args.steps,
                   "images_per_second": len(labels) / seconds}
            rows.append(row)
            print(f"w {w:g} {method:>36}  FD {row['fd']:.3f}  P {row['precision']:.3f}  R {row['recall']:.3f}  "
                  f"acc {row['class_accuracy']:.3f}/{row['judge_accuracy']:.3f}  {row['images_per_second']:.0f} img/s  "
                  f"{row['passes_per_step']:.2f} passes", flush=True)
    # CUDA event timings: on the CPU (a smoke test) there are none
    step_ms = (reference_step_ms(model, tokens, variants, max(args.scales), args.batch) if device.type == "cuda"
               else None)
    for name, v in variants.items():
        adapters = v.pop("adapters")
        v.update({"parameters": adapters.parameter_count(), "base_parameters": base_parameters,
                  "fraction_of_base": adapters.parameter_count() / base_parameters,
                  "bytes": sum(t.numel() * 4 for t in adapters.state_dict().values())})
    return {"images": len(labels), "steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler,
            "scales": args.scales, "variants": variants, "rows": rows, "speedup": speedups(rows), "step_ms": step_ms}


def reference_step_ms(model, tokens, variants, w, batch) -> dict:
    """One model step of --batch images outside ComfyUI's sampling loop: CFG (batch 2N and the combination), AGD
    (batch N with the adapters) and the conditional pass alone, interleaved CUDA timings."""
    from apg_bench import interleaved_ms

    from comfyui_guidance.nodes.agd_patch import AGDPatch, attach

    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    base, device = model.model, comfy.model_management.get_torch_device()
    dtype = base.get_dtype()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2 * batch, 3, RESOLUTION, RESOLUTION, device=device, generator=g) * 10
    sigma = torch.full((2 * batch,), 10.0, device=device)
    context = torch.cat([tokens[torch.arange(batch) % len(CLASS_NAMES)],
                         tokens[-1:].expand(batch, -1, -1)]).to(device, dtype)
    adapters = next(iter(variants.values()))["adapters"]
    patched = model.clone()
    attach(patched, AGDPatch(adapters, w))
    options = patched.model_options["transformer_options"]

    def cfg_step():
        cond, uncond = base.apply_model(x, sigma, c_crossattn=context).chunk(2)
        return uncond + w * (cond - uncond)

    with torch.no_grad():
        return interleaved_ms({
            "cfg_step": cfg_step,
            "agd_step": lambda: base.apply_model(x[:batch], sigma[:batch], c_crossattn=context[:batch],
                                                 transformer_options={**options, "cond_or_uncond": [0]}),
            "conditional_step": lambda: base.apply_model(x[:batch], sigma[:batch], c_crossattn=context[:batch]),
        }, rounds=30)


def speedups(rows: list) -> dict:
    """Images per second of each AGD variant over CFG's at the same scale."""
    cfg = {r["scale"]: r["images_per_second"] for r in rows if r["method"] == "CFG"}
    return {f"{r['method']} at {r['scale']:g}": r["images_per_second"] / cfg[r["scale"]]
            for r in rows if r["method"].startswith("AGD")}


def sdxl_part(args) -> dict:
    import comfy.model_patcher
    from apg_bench import build_sdxl, interleaved_ms

    import_pack()
    from comfyui_guidance.guiders.agd import AdapterSpec
    from comfyui_guidance.nodes.agd_patch import AGDPatch, attach, new_adapters

    model = build_sdxl(args.comfyui)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device="cuda", offload_device="cuda")
    adapters = new_adapters(patcher, AdapterSpec(), seed=0)
    with torch.no_grad():
        for adapter in adapters.adapters.values():
            adapter.out_proj.weight.normal_(0.0, 0.02)
    base_parameters = sum(p.numel() for p in model.diffusion_model.parameters())
    patched = patcher.clone()
    attach(patched, AGDPatch(adapters, 5.0))
    options = patched.model_options["transformer_options"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 128, 128, device="cuda", generator=g) * 14.6
    sigma = torch.full((2,), 14.6, device="cuda")
    context = torch.randn(2, 77, 2048, device="cuda", generator=g, dtype=torch.float16)
    y = torch.randn(2, 2816, device="cuda", generator=g, dtype=torch.float16)

    def cfg_step():
        cond, uncond = model.apply_model(x, sigma, c_crossattn=context, y=y).chunk(2)
        return uncond + 5.0 * (cond - uncond)

    def agd_step():
        return model.apply_model(x[:1], sigma[:1], c_crossattn=context[:1], y=y[:1],
                                 transformer_options={**options, "cond_or_uncond": [0]})

    def conditional_step():
        return model.apply_model(x[:1], sigma[:1], c_crossattn=context[:1], y=y[:1])

    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        times = interleaved_ms({"cfg_step": cfg_step, "agd_step": agd_step, "conditional_step": conditional_step},
                               rounds=30)
    return {"model": "SDXL-size UNet (ComfyUI model_base.SDXL, base config), fp16 weights, random",
            "latent": [1, 4, 128, 128], "adapters": len(adapters.points), "hidden_dim": adapters.spec.hidden_dim,
            "adapter_parameters": adapters.parameter_count(), "base_parameters": base_parameters,
            "fraction_of_base": adapters.parameter_count() / base_parameters,
            "adapter_bytes_float32": adapters.parameter_count() * 4, "step_ms": times,
            "agd_speedup": times["cfg_step"] / times["agd_step"],
            "adapter_overhead": times["agd_step"] / times["conditional_step"] - 1}


def markdown(report: dict) -> str:
    lines = ["# Adapter guidance distillation (bench/agd_bench.py)", "", f"`{report['command']}`", "",
             f"{report['device']}, {report['date']}, commit {report['commit']}, torch {report['torch']}.", ""]
    part = report.get("reference")
    if part:
        a = report["args"]
        lines += [f"## Reference model: {part['images']} images per setting, {part['sampler']}, {part['steps']} steps",
                  "", f"Training (each variant): {a['trajectories']} trajectories at scales uniform in "
                  f"[{a['scale_low']:g}, {a['scale_high']:g}], {a['train_steps']} steps of batch {a['train_batch']}, "
                  f"AdamW lr {a['lr']:g} with the paper's warm-up and cosine decay, adapter width {a['hidden']}.", "",
                  "| variant | adapter parameters | of the UNet | bytes (float32) | trajectories (s) | training (s) | "
                  "final loss |", "|---|---|---|---|---|---|---|"]
        for name, v in part["variants"].items():
            lines.append(f"| {name.replace('_', ' ')} | {v['parameters']:,} | {v['fraction_of_base']:.2%} | "
                         f"{v['bytes']:,} | {v['trajectory_seconds']:.1f} | {v['train_loop_seconds']:.1f} | "
                         f"{v['final_loss']:.5f} |")
        lines += ["", "| w | method | FD | precision | recall | acc. (guide) | acc. (judge) | passes per step | "
                  "images/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            lines.append(f"| {r['scale']:g} | {r['method']} | {r['fd']:.3f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {r['class_accuracy']:.3f} | {r['judge_accuracy']:.3f} | "
                         f"{r['passes_per_step']:.2f} | {r['images_per_second']:.0f} |")
        lines += ["", "Images per second over CFG's at the same scale:", ""]
        lines += [f"- {k}: {v:.2f}×" for k, v in part["speedup"].items()]
        t = part["step_ms"]
        if t:
            lines += ["", f"One model step of {a['batch']} images outside the sampling loop (interleaved CUDA "
                      f"timings): CFG {t['cfg_step']:.2f} ms, AGD {t['agd_step']:.2f} ms "
                      f"({t['cfg_step'] / t['agd_step']:.2f}× faster), the conditional pass alone {t['conditional_step']:.2f} ms."]
    s = report.get("sdxl")
    if s:
        lines += ["", "## SDXL-size UNet at 1024²", "",
                  f"{s['model']}; {s['adapters']} adapters of width {s['hidden_dim']}: {s['adapter_parameters']:,} "
                  f"parameters, {s['fraction_of_base']:.2%} of the UNet's {s['base_parameters']:,} "
                  f"({s['adapter_bytes_float32'] / 2 ** 20:.0f} MiB in float32). Interleaved CUDA timings "
                  "(bench/apg_bench.py's interleaved_ms).", "",
                  f"- CFG step (batch 2 and the combination): {s['step_ms']['cfg_step']:.2f} ms",
                  f"- AGD step (batch 1 with the adapters): {s['step_ms']['agd_step']:.2f} ms "
                  f"({s['agd_speedup']:.2f}× faster)",
                  f"- conditional step without adapters: {s['step_ms']['conditional_step']:.2f} ms (the adapters "
                  f"add {s['adapter_overhead']:.1%})"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]
    setup_comfyui(args.comfyui, args.device)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ref.run_record("bench/agd_bench.py", args, device)
    if not args.skip_reference:
        report["reference"] = reference_part(args, device)
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))  # kept if part 2 fails
    if not args.skip_sdxl and device.type == "cuda":
        report["sdxl"] = sdxl_part(args)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
