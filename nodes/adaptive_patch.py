"""The Adaptive Guidance (AG) and LinearAG patches that the nodes put on a model: ComfyUI hooks around
`guiders/adaptive.py`, and the LinearAG fitting procedure.

Kept apart from the node classes so that scripts (benchmarks, evaluation, fitting from the command line) can patch a
model exactly as the nodes do without importing ComfyUI's node API.

How a skipped pass is really not computed. ComfyUI's sampler evaluates the conditional and unconditional
predictions in one `calc_cond_batch` call. AG's calc-cond-batch hook decides per sample before that call:

- no sample has switched: the call runs as usual (both passes);
- every sample has switched: the call runs with the unconditional list left out (`[cond, None]`), so the model sees
  only the conditional rows;
- some samples have switched: the conditional pass runs for the whole batch and the unconditional pass for the rows
  that still need guidance only (their state, sigma and conditioning rows sliced out). Conditioning that cannot be
  sliced by rows (a ControlNet hint) makes the unconditional pass run for the whole batch instead; the decisions are
  the same, only that step's saving is lost.

For switched samples the hook hands CFG the conditional prediction as the unconditional one, so CFG's
D_u + w (D_c − D_u) is D_c exactly: a conditional-only step. A calc-cond-batch function that was installed before
(PAG's) is called for the conditional pass, so PAG's perturbed pass is unaffected.

The decisions are made by AG's pre-CFG hook, which the calc-cond-batch hook moves to the end of the run's pre-CFG
list (the run's own copy of the model options): it reads the raw predictions of the step, measures γ per sample
against the CFG step at the sampler's scale, and switches the samples that reached γ̄ from the next call on. Being
last, it also restores D_c as the unconditional prediction of switched samples after any other pre-CFG patch (APG),
so APG acts on the guided steps and leaves conditional-only steps alone, in either order of the nodes.

The optional mask weights the guidance per latent position: the pre-CFG hook hands CFG lerp(D_c, D_u, m) as the
unconditional prediction (D_u being the real pass, LinearAG's estimate, or D_c for switched images), so CFG at w gives
D_c + (w − 1) m (D_c − D_u): 1 is the node as is, 0 the conditional prediction. The switch decisions and LinearAG's
history are those of the unweighted predictions, as without a mask.
"""

import dataclasses
import hashlib
import json
import math
import time

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..guiders.adaptive import (AGConfig, AGState, LinearAGFit, denoised_from_noise, estimated_calls,
                                linear_estimate, noise_direction, similarity, uncond_for_cfg)
from ..guiders.saliency import latent_weights
from .run_state import reserve_run_state, run_state

NODE_ID = "GuidanceAdaptiveGuidance"
DISPLAY_NAME = "Adaptive Guidance (AG)"
LINEAR_NODE_ID = "GuidanceLinearAG"
LINEAR_DISPLAY_NAME = "LinearAG (Adaptive Guidance with fitted estimates)"
FIT_NODE_ID = "GuidanceFitLinearAG"
FIT_DISPLAY_NAME = "Fit LinearAG Coefficients"
COEFFICIENTS_FOLDER = "linear_ag"
FORMAT_VERSION = "1"


def apply_ag(model, config: AGConfig, linear: "LinearAGCoefficients | None" = None, node_name: str = DISPLAY_NAME,
             mask: torch.Tensor | None = None):
    """A clone of the ModelPatcher `model` with AG (and LinearAG estimates where `linear` is given); `mask` (a MASK,
    [B, H, W] or [H, W] in [0, 1]) weights the guidance per position (1 = the node as is, 0 = D_c)."""
    patched = model.clone()
    reserve_run_state(patched)
    for earlier in patched.model_options.get("sampler_pre_cfg_function", []):
        if getattr(getattr(earlier, "__self__", None), "skips_unconditional_passes", False):
            # Two AG hooks would both decide which unconditional passes to skip, and the outer one's decisions
            # would silently replace the inner one's.
            raise ValueError(f"{node_name}: this model already has {earlier.__self__.node_name}, which skips the "
                             "same unconditional passes; apply only one of the two nodes.")
    hook = AGHook(config, patched.model_options.get("sampler_calc_cond_batch_function"), linear, node_name, mask)
    patched.set_model_sampler_calc_cond_batch_function(hook.calc_cond_batch)
    patched.set_model_sampler_pre_cfg_function(hook.pre_cfg)
    return patched


class Unsliceable(Exception):
    """Conditioning whose rows cannot be taken apart (e.g. a ControlNet hint)."""


def slice_cond(cond: dict, rows: torch.Tensor, batch: int) -> dict:
    """A copy of one processed cond entry (what `calc_cond_batch` takes) for the batch rows `rows` of a batch of
    `batch`: tensors with one row per image (or one row for all) are expanded to the batch and indexed."""
    if cond.get("control") is not None:
        raise Unsliceable("control")
    out = dict(cond)
    model_conds = {}
    for name, value in cond.get("model_conds", {}).items():
        if type(value).__name__ == "CONDConstant":
            model_conds[name] = value
        elif hasattr(value, "_copy_with") and torch.is_tensor(getattr(value, "cond", None)):
            model_conds[name] = value._copy_with(comfy.utils.repeat_to_batch_size(value.cond, batch)[rows.to(
                value.cond.device)])
        else:
            raise Unsliceable(name)
    out["model_conds"] = model_conds
    if torch.is_tensor(cond.get("mask")):
        mask = cond["mask"]
        if mask.shape[0] not in (1, batch):
            raise Unsliceable("mask")
        out["mask"] = mask if mask.shape[0] == 1 else mask[rows.to(mask.device)]
    return out


def uncond_rows(model, uncond, x, sigma, rows: torch.Tensor, model_options) -> torch.Tensor | None:
    """The unconditional prediction of the rows `rows` (index tensor) only, or None where it cannot be sliced."""
    try:
        sliced = [slice_cond(c, rows, x.shape[0]) for c in uncond]
    except Unsliceable:
        return None
    sigma_rows = sigma[rows] if sigma.ndim and sigma.shape[0] == x.shape[0] else sigma
    return comfy.samplers.calc_cond_batch(model, [sliced], x[rows], sigma_rows, model_options)[0]


@dataclasses.dataclass
class StepRecord:
    """What the calc-cond-batch hook did at one model call, for the pre-CFG hook of the same call."""

    input: torch.Tensor
    cond: torch.Tensor  # raw D_c
    uncond: torch.Tensor  # raw D_u (D_c for switched rows, the LinearAG estimate for estimated rows)
    switched: torch.Tensor  # rows that were conditional-only at this call
    measured: torch.Tensor  # rows whose unconditional prediction is a real network output


@dataclasses.dataclass
class RunMemory:
    """AG's state for one sampling run: the decisions, this call's record, and (LinearAG) the previous call's noise
    directions."""

    ag: AGState = dataclasses.field(default_factory=AGState)
    record: StepRecord | None = None
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the previous call
    checked_schedule: bool = False


class AGHook:
    """Calc-cond-batch hook (computes only the passes that are needed) and pre-CFG hook (measures γ, decides, and
    hands CFG D_c for switched samples)."""

    node_name = DISPLAY_NAME
    # Marks the hooks of AG and LinearAG wherever this module was imported from (ComfyUI and scripts import it
    # under different package names, so the class itself is not one object).
    skips_unconditional_passes = True

    def __init__(self, config: AGConfig, replaced_calc_cond_batch, linear=None, node_name: str = DISPLAY_NAME,
                 mask: torch.Tensor | None = None):
        self.config = config
        self.replaced_calc_cond_batch = replaced_calc_cond_batch
        self.linear = linear
        self.node_name = node_name
        self.mask = mask

    def plain_calc_cond_batch(self, args, conds) -> list:
        if self.replaced_calc_cond_batch is not None:
            return self.replaced_calc_cond_batch({**args, "conds": conds})
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"],
                                              args["model_options"])

    def passes_through(self, conds) -> bool:
        return len(conds) < 2 or conds[1] is None or (self.config.never_skips and self.linear is None
                                                      and self.mask is None)

    def put_pre_cfg_last(self, model_options: dict) -> None:
        hooks = model_options.get("sampler_pre_cfg_function", [])
        if hooks and hooks[-1] != self.pre_cfg:
            model_options["sampler_pre_cfg_function"] = [h for h in hooks if h != self.pre_cfg] + [self.pre_cfg]

    def calc_cond_batch(self, args) -> list:
        conds, x, sigma, model, model_options = (args[k] for k in ("conds", "input", "sigma", "model", "model_options"))
        if self.passes_through(conds):
            return self.plain_calc_cond_batch(args, conds)
        self.put_pre_cfg_last(model_options)
        memory = run_state(model_options, self, RunMemory)
        switched = memory.ag.begin_call(x.shape[0]).clone()
        call = memory.ag.calls - 1
        estimate = self.linear is not None and self.linear.estimates(call, sigma, model_options, memory, self.node_name)
        guided = ~switched
        if estimate:
            measured = torch.zeros_like(switched)
            out = self.plain_calc_cond_batch(args, [conds[0], None])
            eps_cond = noise_direction(x, out[0], sigma)
            eps_uncond = linear_estimate(self.linear.coefficients[call], eps_cond, *memory.previous)
            uncond = uncond_for_cfg(out[0], denoised_from_noise(x, eps_uncond, sigma), switched)
        elif not guided.any():
            measured = guided
            out = self.plain_calc_cond_batch(args, [conds[0], None])
            uncond = out[0]
        elif guided.all():
            measured = guided
            out = self.plain_calc_cond_batch(args, conds)
            uncond = out[1]
        else:
            measured = guided
            out = self.plain_calc_cond_batch(args, [conds[0], None])
            rows = torch.nonzero(guided).flatten().to(x.device)
            part = uncond_rows(model, conds[1], x, sigma, rows, model_options)
            if part is None:  # conditioning that cannot be sliced by rows: the whole batch, as CFG would
                part = comfy.samplers.calc_cond_batch(model, [conds[1]], x, sigma, model_options)[0][rows]
            uncond = out[0].clone()
            uncond[rows] = part
        if self.linear is not None:
            memory.previous = (noise_direction(x, out[0], sigma), noise_direction(x, uncond, sigma))
        memory.record = StepRecord(x, out[0], uncond, switched, measured)
        return [out[0], uncond, *out[2:]]

    def pre_cfg(self, args) -> list:
        conds_out = self.decide(args)
        if self.mask is None or self.passes_through(args["conds"]):
            return conds_out
        cond = conds_out[0]
        weight = latent_weights(self.mask, cond, self.node_name)
        return [cond, torch.lerp(cond, conds_out[1], weight), *conds_out[2:]]

    def decide(self, args) -> list:
        """The pre-CFG hook without the mask: measures γ on the raw predictions, switches, and hands CFG D_c as the
        unconditional prediction of switched samples."""
        conds_out = args["conds_out"]
        if self.passes_through(args["conds"]):
            return conds_out
        memory = run_state(args["model_options"], self, RunMemory)
        record, memory.record = memory.record, None
        if record is None or record.input is not args["input"]:
            # This call's predictions did not come through this hook's calc-cond-batch hook (a calc-cond-batch
            # function installed after AG replaced it): nothing was decided, nothing to restore.
            return conds_out
        if not self.config.never_skips and record.measured.any():
            gamma = similarity(args["input"], record.cond, record.uncond, args["cond_scale"], self.config.criterion)
            memory.ag.update(gamma, self.config.threshold, record.measured)
        if not record.switched.any():
            return conds_out
        return [conds_out[0], uncond_for_cfg(conds_out[0], conds_out[1], record.switched), *conds_out[2:]]


# LinearAG coefficients ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearAGCoefficients:
    """Fitted coefficients for one model, sampler, schedule and step count.

    coefficients: [calls, 3] float64, NaN for calls that are not estimated; call_sigmas: the sigma of each model
    call of the fitting runs; schedule: the scheduler's sigmas (steps + 1 values); info: model fingerprint, sampler,
    scheduler, steps, cfg, images, fitting time and the fit's relative residual per estimated call."""

    coefficients: torch.Tensor
    call_sigmas: torch.Tensor
    schedule: torch.Tensor
    info: dict

    def describe(self) -> str:
        return (f"{self.info.get('sampler', '?')} / {self.info.get('scheduler', '?')}, {len(self.schedule) - 1} "
                f"steps (sigma {float(self.schedule[0]):.4g} to {float(self.schedule[-1]):.4g})")

    def check_schedule(self, model_options: dict, node_name: str) -> None:
        """Refuses a run whose schedule (ComfyUI's `sample_sigmas`) is not the fitted one."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return
        sigmas = sigmas.detach().double().cpu().flatten()
        same = len(sigmas) == len(self.schedule) and torch.allclose(sigmas, self.schedule, rtol=1e-4, atol=1e-6)
        if not same:
            raise ValueError(
                f"{node_name}: these coefficients were fitted for {self.describe()}, but this run samples "
                f"{len(sigmas) - 1} steps from sigma {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}. LinearAG's "
                "coefficients belong to one schedule and step count: set the sampler, scheduler, steps and denoise "
                "they were fitted with, or fit new ones with Fit LinearAG Coefficients for this schedule.")

    def estimates(self, call: int, sigma: torch.Tensor, model_options: dict, memory: RunMemory,
                  node_name: str) -> bool:
        """Whether model call `call` gets the estimate; refuses calls that are not those of the fitted runs."""
        if not memory.checked_schedule:
            self.check_schedule(model_options, node_name)
            memory.checked_schedule = True
        value = float(sigma.max())
        if call >= len(self.call_sigmas) or not math.isclose(value, float(self.call_sigmas[call]), rel_tol=1e-4,
                                                             abs_tol=1e-6):
            raise ValueError(
                f"{node_name}: model call {call + 1} of this run is at sigma {value:.4g}, but the coefficients were "
                f"fitted on {len(self.call_sigmas)} model calls of {self.describe()}. Use the sampler and schedule "
                "they were fitted with, or fit new ones with Fit LinearAG Coefficients.")
        return not bool(torch.isnan(self.coefficients[call]).any()) and memory.previous is not None

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {"coefficients": self.coefficients.contiguous(), "call_sigmas": self.call_sigmas.contiguous(),
                   "schedule": self.schedule.contiguous()}
        save_file(tensors, str(path), metadata={"format": f"linear_ag/{FORMAT_VERSION}",
                                                "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path) -> "LinearAGCoefficients":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != f"linear_ag/{FORMAT_VERSION}":
                raise ValueError(f"{path} is not a LinearAG coefficients file (format {metadata.get('format')!r})")
            tensors = {k: f.get_tensor(k).double() for k in ("coefficients", "call_sigmas", "schedule")}
        return cls(info=json.loads(metadata["info"]), **tensors)


def model_fingerprint(model) -> str:
    """A fingerprint of the diffusion model's weights: SHA-256 over every tensor's name, shape and up to 4096 evenly
    spaced values (as float32), and the names and strengths of the patches (LoRAs) on the ModelPatcher. Reading
    every value of a multi-gigabyte UNet would take seconds per check; the sample tells models apart as well in
    practice. The values are hashed rounded to bfloat16, so the load dtype is left out: ComfyUI loads the same file as
    float32 on a CPU and float16 or bfloat16 on a GPU, and what was fitted or trained on one holds on the others."""
    digest = hashlib.sha256()
    state = model.get_model_object("diffusion_model").state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().flatten()
        if flat.numel():
            step = max(1, flat.numel() // 4096)
            digest.update(flat[::step].to(torch.bfloat16).float().cpu().numpy().tobytes())
    for key in sorted(getattr(model, "patches", {})):
        strengths = [(p[0], p[2]) for p in model.patches[key]]
        digest.update(f"{key}:{strengths}".encode())
    return digest.hexdigest()[:16]


def check_model(coefficients: LinearAGCoefficients, model, node_name: str) -> None:
    fitted, this = coefficients.info.get("model_fingerprint"), model_fingerprint(model)
    if fitted != this:
        raise ValueError(f"{node_name}: these coefficients were fitted for another model (fingerprint {fitted}; this "
                         f"model's is {this}). Fit coefficients for this model (and its LoRAs) with Fit LinearAG "
                         "Coefficients.")


class FitRecorder:
    """Pre-CFG hook of a fitting run: per model call, adds the LinearAG regression terms of the estimated calls."""

    def __init__(self, fit: LinearAGFit):
        self.fit = fit
        self.call_sigmas: list[float] = []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model options; keep accumulating here
        return self

    def __call__(self, args):
        cond, uncond = args["conds_out"][:2]
        if args["conds"][1] is None:
            raise ValueError(f"{FIT_DISPLAY_NAME}: fitting needs the unconditional prediction; set cfg above 1 and "
                             "give a negative prompt.")
        memory = run_state(args["model_options"], self, lambda: {"call": 0, "previous": None})
        x, sigma = args["input"], args["sigma"]
        call = memory["call"]
        if call >= self.fit.calls:
            raise ValueError(f"{FIT_DISPLAY_NAME}: the sampler made more model calls ({call + 1}) than the fitting "
                             f"runs were planned for ({self.fit.calls}).")
        eps_c, eps_u = noise_direction(x, cond, sigma), noise_direction(x, uncond, sigma)
        if call in self.fit.estimated:
            self.fit.add(call, eps_c, *memory["previous"], eps_u)
        if len(self.call_sigmas) <= call:
            self.call_sigmas.append(float(sigma.max()))
        memory["previous"], memory["call"] = (eps_c, eps_u), call + 1
        return args["conds_out"]


class CallCounter:
    """Pre-CFG hook that counts model calls (of one run)."""

    def __init__(self):
        self.calls = 0

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        self.calls += 1
        return args["conds_out"]


def count_model_calls(model, positive, negative, latent, sampler_name, scheduler, steps, cfg, seed) -> int:
    """Model calls per run of the sampler: one run of one image, counted."""
    import comfy.sample

    counter = CallCounter()
    counting = model.clone()
    counting.set_model_sampler_pre_cfg_function(counter)
    empty = latent[:1]
    comfy.sample.sample(counting, comfy.sample.prepare_noise(empty, seed), steps, cfg, sampler_name, scheduler,
                        positive, negative, empty, seed=seed, disable_pbar=True)
    return counter.calls


def fit_linear_ag(model, positive, negative, latent: torch.Tensor, sampler_name: str, scheduler: str, steps: int,
                  cfg: float, seed: int, images: int, batch: int, progress=None) -> LinearAGCoefficients:
    """LinearAG coefficients for `model`, fitted by least squares on CFG runs (the sampler, scheduler, steps and cfg
    given) of `images` images in batches of `batch`, the conditioning `positive` / `negative` and latents shaped
    like `latent` (one image), with noise from seeds seed, seed + 1, ... (one per batch). `progress(done, total)`
    is called after each batch; ComfyUI's interrupt stops the fit between batches."""
    import comfy.sample

    if cfg <= 1.0:
        raise ValueError(f"{FIT_DISPLAY_NAME}: cfg is {cfg:g}; fitting needs CFG's unconditional pass (cfg above 1).")
    began = time.perf_counter()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    calls = count_model_calls(model, positive, negative, latent, sampler_name, scheduler, steps, cfg, seed)
    fit = LinearAGFit(calls)
    recorder = FitRecorder(fit)
    recording = model.clone()
    recording.set_model_sampler_pre_cfg_function(recorder)
    done = 0
    while done < images:
        comfy.model_management.throw_exception_if_processing_interrupted()
        n = min(batch, images - done)
        empty = latent[:1].repeat(n, *[1] * (latent.ndim - 1))
        noise = comfy.sample.prepare_noise(empty, seed + done)
        comfy.sample.sample(recording, noise, steps, cfg, sampler_name, scheduler, positive, negative, empty,
                            seed=seed + done, disable_pbar=True)
        done += n
        if progress is not None:
            progress(done, images)
    if len(recorder.call_sigmas) != calls:
        raise ValueError(f"{FIT_DISPLAY_NAME}: sampler {sampler_name} made {len(recorder.call_sigmas)} model calls "
                         f"per run, not {calls}; LinearAG needs a sampler with a fixed number of model calls.")
    coefficients = fit.coefficients()
    info = {"model_fingerprint": model_fingerprint(model), "sampler": sampler_name, "scheduler": scheduler,
            "steps": steps, "cfg": cfg, "images": images, "seed": seed, "estimated_calls": fit.estimated,
            "terms": ["cond", "previous_cond", "previous_uncond"],
            "relative_residual": {str(k): v for k, v in fit.relative_residuals(coefficients).items()},
            "fit_seconds": time.perf_counter() - began}
    return LinearAGCoefficients(coefficients, torch.tensor(recorder.call_sigmas, dtype=torch.float64),
                                sigmas.double(), info)
