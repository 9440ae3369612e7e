"""APG's norm threshold at two resolutions on the reference model: `absolute` r against `per-element` r (issue 16).

APG caps the L2 norm of the guidance update at r. The norm grows with the square root of the element count, so the
same `absolute` r binds harder at 64² (4× the elements of 32²) than at 32²; with `threshold_mode="per-element"` the
cap of n elements is r·√(n / 65536) and should mean the same at both sizes. This bench samples the reference model
(reference/model.py: 32² Fashion-MNIST, v-prediction, class-conditional with CFG-style guidance; fully convolutional
apart from attention, so it also samples at 64²) at 32² and 64² with

- APG `absolute`: bench/reference_eval.py's `apg_r2.5` setting as it is (η 0, r 2.5 — its best on this model —,
  momentum −0.75: the APG paper's EDM2 ablation values), read from that bench's own method table;
- APG `per-element`: the same with r_pe = 2.5 / √(3·32·32 / 65536) ≈ 11.55, which is r = 2.5 at 32² (there the two
  settings are the same cap; at 64² per-element caps at 5.0, absolute at 2.5);
- CFG, as context (no cap at all), and the unguided sample (w = 1, the same for every method),

at guidance scales --scales, --per-class images per class ('all classes': image i is class i mod 10), the same
initial noise for every setting of one size (seed --seed), euler/normal, --steps steps, through ComfyUI's sampling
path (bench/reference_eval.py's `sample`). Every image is measured as bench/frecas_bench.py measures images above
the training size: downsampled (area) to 32², then FD, precision, recall and class accuracy in the guide classifier's
features (bench/reference_eval.py's `evaluate`), class accuracy under the independent judge (reference/judge.py) and
the object counts (frecas_bench's `downsampled_quality`). Overshoot (bench/metrics.py: mean of max(|x| − 1, 0) over
pixel values) is also taken on the images at their own size, where it means the same at both sizes; the summary uses
that one. APG's rescale factor s = min(1, cap/‖ΔD‖) of every sample at every step is recorded by observing the
pack's `rescale_factor` (the mean s and the share of capped updates say how hard the cap binds at each size).

--weights chooses the model. The shipped one is trained at 32² only, so 64² is outside its training (its unguided
FD rises twentyfold there: bench/results/apg_resolution.md). A fair comparison needs a model valid at both sizes: the
two-size model (reference/train.py's docstring: the shipped model fine-tuned with every other batch at 64², each image
resized from its 32² form) gives bench/results/apg_resolution_two_size.md. The report names the weights and, from
their metadata, the command that made them.

Summary, for each w and metric: |metric(64²) − metric(32²)| of each method ('gap'), and the same for the guidance
effect, metric(w) − metric(w = 1) at each size ('effect gap': what is left once the model's own change between 32²
and 64², seen in the unguided sample, is taken out). Verdict per metric, from the mean effect gap E over the scales:
a method 'follows' where E is at most FOLLOW_FRACTION of the mean guidance effect at 32² (mean |metric_32(w) −
metric_32(1)|), else it 'drifts'; and per-element follows 32² 'more closely' than absolute where its E is at most
CLOSER_RATIO times absolute's (the reverse likewise), else 'no clear difference'.

    python bench/apg_resolution_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --commit SHA
        [--weights FILE] [--name NAME] [--scales 2,3,5,8,12] [--sizes 32,64] [--per-class 100] [--batch 500]
        [--device cuda|cpu] [--smoke]
    python bench/apg_resolution_bench.py --comfyui COMFYUI_DIR --data DATA_DIR --out OUT_DIR --add-real-row
        (adds the real train subsample's row to OUT_DIR's report: the GPU run may lack the train split)

Writes OUT_DIR/NAME.json (everything) and NAME.md (the tables and verdicts); --name sets NAME (apg_resolution).
"""

import argparse
import dataclasses
import importlib
import json
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from frecas_bench import downsampled_quality, real_train_row  # noqa: E402
from adaptive_bench import ref  # noqa: E402  (bench/reference_eval.py, with a stand-in for matplotlib where missing)
import metrics  # noqa: E402
from pack import PACKAGE, import_pack  # noqa: E402
from reference.data import CLASS_NAMES, RESOLUTION  # noqa: E402
from reference.train import setup_comfyui  # noqa: E402

METHODS = ("cfg", "apg_absolute", "apg_per_element")
# (key, header, format): the table's columns; SUMMARY: the metrics the verdicts are taken on
COLUMNS = [("fd", "FD ↓", "{:.2f}"), ("precision", "precision ↑", "{:.3f}"), ("recall", "recall ↑", "{:.3f}"),
           ("class_accuracy", "acc. guide ↑", "{:.3f}"), ("judge_accuracy", "acc. judge ↑", "{:.3f}"),
           ("overshoot_native", "overshoot", "{:.4f}"), ("multi_object_fraction", ">1 object", "{:.3f}")]
SUMMARY = ("fd", "precision", "recall", "class_accuracy", "judge_accuracy", "overshoot_native")
FOLLOW_FRACTION = 0.25
CLOSER_RATIO = 0.8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--data", required=True, help="folder with the Fashion-MNIST test split (train split optional)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="apg_resolution")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--tree-note", default="", help="a note on the working tree, e.g. 'uncommitted changes'")
    p.add_argument("--scales", default="2,3,5,8,12")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--batch", type=int, default=500, help="images per sampling call")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (the same noise for every setting)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--weights", default=str(ROOT / "reference" / "weights" / "fashion_diffusion.safetensors"))
    p.add_argument("--classifier", default=str(ROOT / "reference" / "weights" / "fashion_classifier.safetensors"))
    p.add_argument("--judge", default=str(ROOT / "reference" / "weights" / "fashion_judge.safetensors"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="a CPU check: 4 images per class, 4 steps, scales 3 and 8")
    p.add_argument("--add-real-row", action="store_true", help="only add the real train row to an existing report")
    args = p.parse_args()
    if args.smoke:
        args.per_class, args.steps, args.batch, args.scales = 4, 4, 20, "3,8"
    args.scales = [float(s) for s in args.scales.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def apg_configs(model):
    """(absolute, per-element) APG configs: reference_eval's `apg_r2.5` setting as its method table builds it, and
    the same with threshold_mode per-element and the r that gives the same cap at 32²."""
    apg = importlib.import_module(f"{PACKAGE}.guiders.apg")
    patched = ref.guidance_methods()["apg_r2.5"](model, 2.0).model
    absolute = patched.model_options["sampler_pre_cfg_function"][-1].config
    if absolute.threshold_mode != "absolute":
        raise ValueError(f"reference_eval's apg_r2.5 is no longer absolute: {absolute}")
    at_32 = 3 * RESOLUTION * RESOLUTION
    r_pe = absolute.norm_threshold / math.sqrt(at_32 / apg.REFERENCE_ELEMENTS)
    per_element = dataclasses.replace(absolute, threshold_mode="per-element", norm_threshold=r_pe)
    return absolute, per_element


def method_table(absolute, per_element) -> dict:
    """Method name → function (ModelPatcher, w) → reference_eval Setup."""
    patch = importlib.import_module(f"{PACKAGE}.nodes.apg_patch")
    return {
        "cfg": lambda model, w: ref.Setup(model, w),
        "apg_absolute": lambda model, w: ref.Setup(patch.apply_apg(model, absolute), w),
        "apg_per_element": lambda model, w: ref.Setup(patch.apply_apg(model, per_element), w),
    }


class RescaleRecorder:
    """Observes guiders/apg.py's `rescale_factor` while sampling: every s = min(1, cap/‖ΔD‖) (one per sample and
    step), ‖ΔD‖ and the cap it was given. Returns what it wraps unchanged."""

    def __init__(self):
        self.module = importlib.import_module(f"{PACKAGE}.guiders.apg")
        self.inner = self.module.rescale_factor
        self.scales, self.norms, self.caps = [], [], set()

    def __enter__(self):
        self.module.rescale_factor = self
        return self

    def __exit__(self, *exc):
        self.module.rescale_factor = self.inner

    def __call__(self, squared_norm, max_norm):
        scale = self.inner(squared_norm, max_norm)
        self.scales.append(scale.detach().float().flatten())
        self.norms.append(squared_norm.detach().double().sqrt().flatten())
        self.caps.add(float(max_norm))
        return scale

    def summary(self, elements: int) -> dict | None:
        if not self.scales:
            return None
        s, norms = torch.cat(self.scales).cpu(), torch.cat(self.norms).cpu()
        return {"updates": len(s), "cap": sorted(self.caps), "mean_scale": float(s.mean()),
                "capped_fraction": float((s < 1).double().mean()), "median_norm": float(norms.median()),
                "median_rms_per_element": float(norms.median()) / math.sqrt(elements)}


def run_size(size, args, model, tokens, labels, methods, guide, judge, real, device, report, write):
    from comfy.sample import prepare_noise

    noise = prepare_noise(torch.zeros(len(labels), 3, size, size), args.seed)
    ref.warm_up(methods, model, tokens, labels, noise, args.scales, args)
    entry = report["sizes"][str(size)] = {"rows": []}
    settings = [("none", 1.0)] + [(name, w) for w in args.scales for name in methods]
    for name, w in settings:
        setup = ref.Setup(model, 1.0) if name == "none" else methods[name](model, w)
        setup, counter = ref.with_counter(setup)
        with RescaleRecorder() as recorder:
            images, seconds = ref.sample(setup, tokens, labels, noise, args)
        row = {"method": name, "scale": w, **downsampled_quality(images, labels, guide, judge, real, args.k, device),
               "overshoot_native": metrics.overshoot(images),
               "out_of_range_native": metrics.out_of_range_fraction(images),
               "nfe_per_image": counter.rows / len(labels), "ms_per_image": 1000 * seconds / len(labels),
               "rescale": recorder.summary(3 * size * size)}
        entry["rows"].append(row)
        cap = row["rescale"]
        print(f"{size}² {name:>16} w={w:<4g} FD {row['fd']:7.2f} P {row['precision']:.3f} R {row['recall']:.3f} "
              f"acc {row['class_accuracy']:.3f}/{row['judge_accuracy']:.3f} over {row['overshoot_native']:.4f}"
              + (f"  s {cap['mean_scale']:.3f} capped {cap['capped_fraction']:.2f}" if cap else "")
              + f"  {seconds:.1f}s", flush=True)
        write()


def find(report, size, method, w):
    rows = report["sizes"].get(str(size), {}).get("rows", [])
    if w == 1.0:
        method = "none"
    return next((r for r in rows if r["method"] == method and r["scale"] == w), None)


def ratio(a: float, b: float) -> float:
    """a / b, with 0 / 0 = 0 (no gap where there is no effect) and a / 0 = inf."""
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


def percent(x: float) -> str:
    return "∞" if math.isinf(x) else f"{100 * x:.0f}%"


def summarise(report) -> dict | None:
    """Gaps between the sizes and the verdicts, computed from the rows (see the module docstring)."""
    small, large = report["args"]["sizes"][:2]
    scales = report["args"]["scales"]
    base = {size: find(report, size, "none", 1.0) for size in (small, large)}
    if None in base.values():
        return None
    out = {"sizes": [small, large], "follow_fraction": FOLLOW_FRACTION, "closer_ratio": CLOSER_RATIO, "metrics": {}}
    for key in SUMMARY:
        per_method = {}
        for method in METHODS:
            gaps, effect_gaps, effects = [], [], []
            for w in scales:
                a, b = find(report, small, method, w), find(report, large, method, w)
                if a is None or b is None:
                    continue
                gaps.append(abs(b[key] - a[key]))
                effect_gaps.append(abs((b[key] - base[large][key]) - (a[key] - base[small][key])))
                effects.append(abs(a[key] - base[small][key]))
            if not gaps:
                continue
            mean_effect = sum(effects) / len(effects)
            mean_effect_gap = sum(effect_gaps) / len(effect_gaps)
            per_method[method] = {
                "gap": gaps, "effect_gap": effect_gaps, "mean_gap": sum(gaps) / len(gaps),
                "mean_effect_gap": mean_effect_gap, "mean_effect_at_small": mean_effect,
                "effect_gap_over_effect": ratio(mean_effect_gap, mean_effect),
            }
            per_method[method]["follows"] = per_method[method]["effect_gap_over_effect"] <= FOLLOW_FRACTION
        entry = {"methods": per_method, "unguided_gap": abs(base[large][key] - base[small][key])}
        if "apg_absolute" in per_method and "apg_per_element" in per_method:
            ea = per_method["apg_absolute"]["mean_effect_gap"]
            ep = per_method["apg_per_element"]["mean_effect_gap"]
            wins = sum(p < a for p, a in zip(per_method["apg_per_element"]["effect_gap"],
                                             per_method["apg_absolute"]["effect_gap"]))
            if ep == ea:
                closer = "neither"
            elif ep <= CLOSER_RATIO * ea:
                closer = "per-element"
            elif ea <= CLOSER_RATIO * ep:
                closer = "absolute"
            else:
                closer = "neither"
            entry.update({"closer": closer, "per_element_over_absolute": ratio(ep, ea),
                          "per_element_smaller_at": wins, "scales": len(scales)})
        out["metrics"][key] = entry
    closer = [e.get("closer") for e in out["metrics"].values()]
    out["count"] = {c: closer.count(c) for c in ("per-element", "absolute", "neither")}
    out["cap"] = cap_summary(report, small, large, scales)
    out["unguided"] = {str(size): {k: base[size][k] for k in ("fd", "class_accuracy", "multi_object_fraction")}
                       for size in (small, large)}
    return out


def cap_summary(report, small, large, scales) -> dict:
    """How hard the cap binds at each size, per APG method: |mean s(large) − mean s(small)| and the same for the
    capped share, per w; the growth of ‖ΔD‖'s median and of its RMS per element from small to large; which method's
    cap binds more alike at the two sizes (the one with the smaller mean gap of mean s, where it is at most
    CLOSER_RATIO times the other's)."""
    out = {}
    for method in ("apg_absolute", "apg_per_element"):
        pairs = [(find(report, small, method, w), find(report, large, method, w)) for w in scales]
        pairs = [(a["rescale"], b["rescale"]) for a, b in pairs if a and b and a.get("rescale") and b.get("rescale")]
        if not pairs:
            continue
        scale_gap = [abs(b["mean_scale"] - a["mean_scale"]) for a, b in pairs]
        capped_gap = [abs(b["capped_fraction"] - a["capped_fraction"]) for a, b in pairs]
        out[method] = {"mean_scale": [[a["mean_scale"], b["mean_scale"]] for a, b in pairs],
                       "capped_fraction": [[a["capped_fraction"], b["capped_fraction"]] for a, b in pairs],
                       "mean_scale_gap": scale_gap, "capped_gap": capped_gap,
                       "mean_of_mean_scale_gap": sum(scale_gap) / len(scale_gap),
                       "mean_of_capped_gap": sum(capped_gap) / len(capped_gap),
                       "rms_growth": [b["median_rms_per_element"] / a["median_rms_per_element"] for a, b in pairs],
                       "norm_growth": [b["median_norm"] / a["median_norm"] for a, b in pairs]}
    if len(out) == 2:
        ga, gp = out["apg_absolute"]["mean_of_mean_scale_gap"], out["apg_per_element"]["mean_of_mean_scale_gap"]
        out["closer"] = ("per-element" if gp <= CLOSER_RATIO * ga else "absolute" if ga <= CLOSER_RATIO * gp
                         else "neither")
        out["per_element_over_absolute"] = ratio(gp, ga)
    return out


def mechanism_lines(report) -> list:
    lines = ["| size | method | w | cap | mean s | capped | median ‖ΔD‖ | median RMS/element |",
             "|---|---|---|---|---|---|---|---|"]
    for size in report["args"]["sizes"]:
        for row in report["sizes"].get(str(size), {}).get("rows", []):
            c = row.get("rescale")
            if c:
                lines.append(f"| {size}² | {row['method']} | {row['scale']:g} | "
                             f"{', '.join(f'{x:.3g}' for x in c['cap'])} | {c['mean_scale']:.3f} | "
                             f"{c['capped_fraction']:.3f} | {c['median_norm']:.3g} | "
                             f"{c['median_rms_per_element']:.4f} |")
    return lines


def weights_line(record: dict) -> str:
    """Which diffusion weights made the report: the shipped 32² model, or a model trained at several sizes with the
    command in its metadata."""
    meta = record.get("metadata") or {}
    name = pathlib.Path(record["path"]).name
    sizes = meta.get("sizes", "32")
    if "," not in sizes:
        return (f"Diffusion weights: `{name}` (SHA-256 {record['sha256'][:12]}…), trained at 32² only: 64² is outside "
                "its training.")
    return (f"Diffusion weights: `{name}` (SHA-256 {record['sha256'][:12]}…), trained at {sizes.replace(',', '² and ')}² "
            f"({meta.get('steps', '?')} steps on {meta.get('train_images', '?')} training images): "
            f"`{meta.get('command', '?')}`.")


def markdown(report) -> str:
    args = report["args"]
    abs_cfg, pe_cfg = report["apg"]["absolute"], report["apg"]["per_element"]
    lines = ["# APG's norm threshold at 32² and 64²: absolute against per-element (bench/apg_resolution_bench.py)",
             "",
             f"`{report['command']}`; {report['device']}, {report['date']}, commit {report['commit']}"
             + (f" ({report['tree_note']})" if report.get("tree_note") else "")
             + f", torch {report['torch']}, ComfyUI {report['comfyui']}, UNet {report['unet_dtype']}."
             + (f" Real (train subsample) row: `{report['real_row_run']['command']}`; "
                f"{report['real_row_run']['device']}, {report['real_row_run']['date']}."
                if report.get("real_row_run") else ""), "",
             weights_line(report["weights"]["diffusion"]), "",
             f"Reference model, {report['images']} images per setting ({args['per_class']} per class, 'all classes'), "
             f"{args['sampler']}/{args['scheduler']}, {args['steps']} steps, the same noise (seed {args['seed']}) for "
             f"every setting of a size. APG absolute: reference_eval's apg_r2.5 (η {abs_cfg['eta']:g}, r "
             f"{abs_cfg['norm_threshold']:g}, momentum {abs_cfg['momentum']:g}). APG per-element: the same with r = "
             f"{pe_cfg['norm_threshold']:.4f} = 2.5/√(3·32·32/65536), the cap r·√(n/65536): "
             + ", ".join(f"{s}²: {report['apg']['per_element_cap'][str(s)]:.3f}" for s in args["sizes"])
             + " (absolute: 2.5 at every size). Every image is downsampled (area) to 32² before FD, precision, "
             "recall (k-NN, k = 3) and class accuracy (guide and judge) are measured; overshoot (mean of max(|x| − 1, "
             "0) per pixel value) on the images at their own size; '>1 object' as bench/frecas_bench.py counts it. "
             "w = 1 is the unguided sample (every method is the conditional prediction there).", ""]
    header = "| method | w | " + " | ".join(h for _, h, _ in COLUMNS) + " | ms/image |"
    for size in args["sizes"]:
        rows = report["sizes"].get(str(size), {}).get("rows", [])
        lines += [f"## {size}²", "", header, "|" + "---|" * (len(COLUMNS) + 3)]
        for r in rows:
            lines.append(f"| {r['method']} | {r['scale']:g} | " + " | ".join(f.format(r[k]) for k, _, f in COLUMNS)
                         + f" | {r['ms_per_image']:.2f} |")
        if report.get("real_train_subsample"):
            t = report["real_train_subsample"]
            lines.append("| real (train subsample, 32²) | | " + " | ".join(
                f.format(t[k]) if k in t else "" for k, _, f in COLUMNS) + " | |")
        lines.append("")
    lines += ["## How hard the cap binds", "",
              "APG's rescale factor s = min(1, cap/‖ΔD‖) over every sample and step (ΔD after momentum); 'capped': "
              "the share of updates with s < 1. RMS/element = ‖ΔD‖/√n.", ""] + mechanism_lines(report) + [""]
    s = report.get("summary")
    if s:
        small, large = s["sizes"]
        lines += [f"## {large}² against {small}²", "",
                  f"Per w: gap = |m({large}²) − m({small}²)|; effect gap = |(m_{large}(w) − m_{large}(1)) − "
                  f"(m_{small}(w) − m_{small}(1))|, the gap once the model's own change between the sizes (the "
                  f"unguided sample's) is taken out. A method follows where its mean effect gap is at most "
                  f"{100 * s['follow_fraction']:.0f}% of the mean guidance effect at {small}² (|m_{small}(w) − "
                  f"m_{small}(1)|); per-element is closer than absolute where its mean effect gap is at most "
                  f"{s['closer_ratio']:g}× absolute's (and the reverse).", "",
                  "| metric | unguided gap | method | gap per w | mean gap | effect gap per w | mean effect gap | "
                  "÷ effect at 32² | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for key, e in s["metrics"].items():
            for method, m in e["methods"].items():
                verdict = "follows" if m["follows"] else "drifts"
                lines.append(f"| {key} | {e['unguided_gap']:.4g} | {method} | "
                             f"{', '.join(f'{g:.3g}' for g in m['gap'])} | {m['mean_gap']:.3g} | "
                             f"{', '.join(f'{g:.3g}' for g in m['effect_gap'])} | {m['mean_effect_gap']:.3g} | "
                             f"{percent(m['effect_gap_over_effect'])} | {verdict} |")
        lines += ["", "| metric | closer to 32² | per-element ÷ absolute (mean effect gap) | per-element smaller at |",
                  "|---|---|---|---|"]
        for key, e in s["metrics"].items():
            if "closer" in e:
                r = e["per_element_over_absolute"]
                lines.append(f"| {key} | {e['closer']} | {'∞' if math.isinf(r) else f'{r:.2f}'} | "
                             f"{e['per_element_smaller_at']} of {e['scales']} scales |")
        c = s["count"]
        u = s["unguided"]
        lines += ["", f"Per-element follows {small}² more closely on {c['per-element']} of {len(s['metrics'])} "
                  f"metrics, absolute on {c['absolute']}, neither clearly on {c['neither']}. The model's own change "
                  f"between the sizes (unguided): FD {u[str(small)]['fd']:.2f} → {u[str(large)]['fd']:.2f}, guide "
                  f"accuracy {u[str(small)]['class_accuracy']:.3f} → {u[str(large)]['class_accuracy']:.3f}, images "
                  f"with more than one object {u[str(small)]['multi_object_fraction']:.3f} → "
                  f"{u[str(large)]['multi_object_fraction']:.3f}.", ""]
        cap = s.get("cap", {})
        if "closer" in cap:
            lines += ["How alike the cap binds at the two sizes (from 'How hard the cap binds'; per w, |value at "
                      f"{large}² − value at {small}²|):", "",
                      "| method | mean s per w (32² → 64²) | its gap, mean | capped share per w (32² → 64²) | "
                      "its gap, mean | ‖ΔD‖ RMS/element growth 32² → 64² |", "|---|---|---|---|---|---|"]
            for method in ("apg_absolute", "apg_per_element"):
                m = cap[method]
                lines.append(
                    f"| {method} | {', '.join(f'{a:.2f}→{b:.2f}' for a, b in m['mean_scale'])} | "
                    f"{m['mean_of_mean_scale_gap']:.3f} | "
                    f"{', '.join(f'{a:.2f}→{b:.2f}' for a, b in m['capped_fraction'])} | "
                    f"{m['mean_of_capped_gap']:.3f} | {', '.join(f'{g:.2f}×' for g in m['rms_growth'])} |")
            lines += ["", f"The cap binds more alike at {small}² and {large}² with: {cap['closer']} (per-element's "
                      f"mean gap of mean s is {cap['per_element_over_absolute']:.2f}× absolute's).", ""]
        growth = [g for m in ("apg_absolute", "apg_per_element") for g in cap.get(m, {}).get("norm_growth", [])]
        follows = {method: [key for key, e in s["metrics"].items() if e["methods"].get(method, {}).get("follows")]
                   for method in METHODS}
        lines += ["## Verdict", "",
                  f"Image metrics at {large}² that follow {small}² (effect gap ≤ {100 * s['follow_fraction']:.0f}% of "
                  f"the effect): per-element {len(follows['apg_per_element'])} of {len(s['metrics'])}"
                  f"{' (' + ', '.join(follows['apg_per_element']) + ')' if follows['apg_per_element'] else ''}, "
                  f"absolute {len(follows['apg_absolute'])}"
                  f"{' (' + ', '.join(follows['apg_absolute']) + ')' if follows['apg_absolute'] else ''}, CFG (no "
                  f"cap) {len(follows['cfg'])}; per-element is the closer of the two on {c['per-element']}, absolute "
                  f"on {c['absolute']}, neither on {c['neither']}. "
                  + (f"The cap itself binds {'more' if cap['closer'] == 'per-element' else 'not more'} alike with "
                     f"per-element (mean s gap {cap['apg_per_element']['mean_of_mean_scale_gap']:.3f} against "
                     f"{cap['apg_absolute']['mean_of_mean_scale_gap']:.3f}). From {small}² to {large}² the median "
                     f"‖ΔD‖ grows {min(growth):.2f}–{max(growth):.2f}× on this model: absolute's cap assumes 1×, "
                     f"per-element's {large / small:.2f}× (its RMS per element unchanged)."
                     if "closer" in cap else ""), ""]
    return "\n".join(lines)


def add_real_row(args):
    out = pathlib.Path(args.out)
    report = json.loads((out / f"{args.name}.json").read_text())

    class Holder:  # what frecas_bench.real_train_row needs of its Reference: quality() and the real features
        def __init__(self):
            from reference.judge import load_judge

            device = torch.device(args.device)
            self.guide = ref.load_classifier(args.classifier, len(CLASS_NAMES), device)
            self.judge = load_judge(args.judge, device)
            self.real = ref.RealReference(self.guide, pathlib.Path(args.data), args.per_class, 0, device)
            self.device = device

        def quality(self, images, labels, real):
            row = downsampled_quality(images, labels, self.guide, self.judge, real, args.k, self.device)
            row["overshoot_native"] = metrics.overshoot(images)
            return row

    report["real_train_subsample"] = real_train_row(Holder(), args)
    report["real_row_run"] = ref.run_record("bench/apg_resolution_bench.py", args, torch.device(args.device))
    report["summary"] = summarise(report)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))


def main():
    args = parse_args()
    setup_comfyui(args.comfyui, args.device)
    if args.add_real_row:
        return add_real_row(args)
    from reference.judge import load_judge

    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import_pack()
    apg = importlib.import_module(f"{PACKAGE}.guiders.apg")
    model, tokens = ref.load_diffusion(args.weights)
    absolute, per_element = apg_configs(model)
    methods = method_table(absolute, per_element)
    guide = ref.load_classifier(args.classifier, len(CLASS_NAMES), device)
    judge = load_judge(args.judge, device)
    real = ref.RealReference(guide, pathlib.Path(args.data), args.per_class, 0, device)
    labels = ref.balanced_labels(len(CLASS_NAMES), args.per_class)
    report = {**ref.run_record("bench/apg_resolution_bench.py", args, device), "tree_note": args.tree_note,
              "unet_dtype": str(model.model.get_dtype()),
              "weights": {"diffusion": ref.file_record(args.weights), "classifier": ref.file_record(args.classifier),
                          "judge": ref.file_record(args.judge)},
              "images": len(labels),
              "apg": {"absolute": dataclasses.asdict(absolute), "per_element": dataclasses.asdict(per_element),
                      "per_element_cap": {str(s): per_element.threshold(3 * s * s) for s in args.sizes},
                      "absolute_cap": {str(s): absolute.threshold(3 * s * s) for s in args.sizes},
                      "reference_elements": apg.REFERENCE_ELEMENTS},
              "sizes": {}}
    began = time.time()

    def write():
        report["seconds"] = time.time() - began
        if len(args.sizes) >= 2 and all(str(s) in report["sizes"] for s in args.sizes[:2]):
            report["summary"] = summarise(report)
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        (out / f"{args.name}.md").write_text(markdown(report))

    for size in args.sizes:
        run_size(size, args, model, tokens, labels, methods, guide, judge, real, device, report, write)
    write()
    print(markdown(report))


if __name__ == "__main__":
    main()
