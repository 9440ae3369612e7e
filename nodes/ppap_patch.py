"""The ComfyUI side of PPAP (`guiders/ppap.py`): distilling noise-range experts from a classifier on a model's own
samples, storing and loading them, and the post-CFG hook that guides with them.

Kept apart from the node classes so that scripts (scripts/train_ppap.py, the benchmark) train, load and patch
exactly as the nodes do without importing ComfyUI's node API.

What an expert reads. The official experts read the model's noisy input x_t (ADM's [-1, 1] pixels, variance-
preserving). Here they read the model's input as ComfyUI feeds the diffusion model, `calculate_input(σ, x)` (x/√(1 + σ²)
for eps and v models, x itself for flow models), in the classifier's image space: for an image classifier on a
pixel-space model, through the affine map that ComfyUI's pixel-space VAE applies to a clean sample (without its clamp:
noisy values leave [0, 1]); for a latent classifier, the latent itself. Noisy latents of a latent-space model are not
images, so an image classifier cannot be distilled for such a model (refused). The expert of a call is chosen from
the model's timestep of σ on the official scale of T = 1000 steps (a discrete schedule's own timestep; a flow
model's, which is linear in σ, with σ_max at T); the same scale picks the training noise levels.

Gradients inside a prompt: as in classifier_patch.py, everything a gradient flows through owns its parameters made
outside inference mode.
"""

import dataclasses
import json
import logging
import pathlib
import time

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.pixel_space_convert

from ..guiders.classifier import ClassifierOnDenoised, ImageClassifier
from ..guiders.ppap import (TIMESTEPS, PPAPConfig, add_adapters, annealed_learning_rate, denoised_shift,
                            distillation_loss, expert_index, expert_ranges, expert_state, load_expert,
                            network_sha256, range_timesteps, trainable_count)
from ..guiders.saliency import latent_weights
from .adaptive_patch import model_fingerprint
from .agd_patch import inputs_digest
from .classifier_patch import DEFAULT_CHUNK, ClassifierTargets, output_map

NODE_ID = "GuidancePPAP"
DISPLAY_NAME = "PPAP Classifier Guidance"
TRAIN_NODE_ID = "GuidancePPAPTrainExperts"
TRAIN_DISPLAY_NAME = "Train PPAP Experts"
LOAD_NODE_ID = "GuidancePPAPLoadExperts"
LOAD_DISPLAY_NAME = "Load PPAP Experts"
FOLDER = "ppap_experts"
FORMAT = "comfyui-guidance/ppap-experts/1"
CHECKPOINT_EVERY = 200  # optimizer steps between resume checkpoints


@dataclasses.dataclass(frozen=True)
class InputMap:
    """How the sampler's state becomes the classifier's input: images = scale · process_out(z) + offset for an image
    classifier on a pixel-space model (the VAE's output map), z itself for a latent classifier."""

    space: str
    scale: float = 1.0
    offset: float = 0.0

    def clean(self, latent_format):
        """The teacher's input from a clean sample: as VAE Decode makes it (clamped to [0, 1])."""
        if self.space == "latent":
            return lambda z: z
        return lambda z: (self.scale * latent_format.process_out(z) + self.offset).clamp(0, 1)

    def clip(self, latent_format):
        """The official `clip_denoised` in the model's space, or None for a latent (no data range): a clean sample
        clamped to the images VAE Decode shows, [0, 1], mapped back (ADM's x̂₀ clamped to [-1, 1] on the reference
        model, whose pixels are (x + 1)/2)."""
        if self.space == "latent":
            return None
        clean = self.clean(latent_format)
        return lambda z: latent_format.process_in((clean(z) - self.offset) / self.scale)

    def noisy(self, latent_format, model_sampling, sigma: torch.Tensor):
        """An expert's input from the sampler's state x at σ (per sample): the model input, mapped, not clamped."""
        def read(x):
            z = model_sampling.calculate_input(sigma.view(-1, *[1] * (x.ndim - 1)).to(x), x)
            return z if self.space == "latent" else self.scale * latent_format.process_out(z) + self.offset
        return read


def noise_schedule(model) -> str:
    """What the experts' noisy inputs depend on: the model's sampling classes (schedule and parameterisation) and its
    noise range."""
    sampling = model.get_model_object("model_sampling")
    kinds = "+".join(c.__name__ for c in type(sampling).__mro__[1:] if c.__module__ == "comfy.model_sampling")
    return f"{kinds}, sigma {float(sampling.sigma_min):.5g} to {float(sampling.sigma_max):.5g}"


def check_model(model, node_name: str) -> None:
    sampling = model.get_model_object("model_sampling")
    discrete = (isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
                and not isinstance(sampling, (comfy.model_sampling.ModelSamplingDiscreteEDM,
                                              comfy.model_sampling.StableCascadeSampling)))
    flow = isinstance(sampling, (comfy.model_sampling.ModelSamplingDiscreteFlow,
                                 comfy.model_sampling.ModelSamplingFlux))
    if not (discrete or flow) or not isinstance(sampling, (comfy.model_sampling.EPS, comfy.model_sampling.CONST)):
        raise ValueError(f"{node_name}: PPAP's experts cover ranges of a model's diffusion timesteps; this model's "
                         f"sampling ({noise_schedule(model)}) has no such range (use an eps, v or flow model with a "
                         "discrete or flow schedule)")


def input_map(model, classifier: ImageClassifier, vae, node_name: str) -> InputMap:
    """The map of a classifier on this model's states, or a refusal naming the fix."""
    check_model(model, node_name)
    if classifier.space == "latent":
        return InputMap("latent")
    if vae is None:
        raise ValueError(f"{node_name}: {classifier.name} reads images: connect the model's VAE to the vae input")
    if not isinstance(vae.first_stage_model, comfy.pixel_space_convert.PixelspaceConversionVAE):
        raise ValueError(f"{node_name}: PPAP's experts read the model's noisy input, and this model's latents are not "
                         f"images ({type(vae.first_stage_model).__name__} VAE), so {classifier.name}, which reads "
                         "images, cannot learn them. Use a pixel-space model (the reference model) or a classifier "
                         "that reads this model's latents")
    scale, offset = output_map(vae)
    return InputMap("image", scale, offset)


def model_position(model_sampling, sigma: float) -> float:
    """The timestep of σ on the official T = 1000 scale (clamped to it): a discrete schedule's own timestep (LCM's
    included, whose timesteps are on the scale of the 1000 it was distilled from); a flow model's timestep is linear
    in σ, σ_max at T."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        position = float(model_sampling.timestep(torch.tensor([sigma]))) * TIMESTEPS / model_sampling.num_timesteps
    else:
        position = sigma / float(model_sampling.sigma_max) * TIMESTEPS
    return min(max(position, 0.0), float(TIMESTEPS))


def position_sigmas(model_sampling, positions: torch.Tensor) -> torch.Tensor:
    """σ at timesteps of the T = 1000 scale: the inverse of `model_position`."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return model_sampling.sigma((positions * model_sampling.num_timesteps / TIMESTEPS).float()).float()
    return (positions / TIMESTEPS * float(model_sampling.sigma_max)).float()


class PPAPExperts:
    """Experts distilled from one classifier: the backbone (an ImageClassifier), each expert's tensors, the LoRA shape,
    the input map and what they were made for (`info`). One adapted copy of the backbone is made on first use and the
    expert of each call loaded into it (experts are small; the backbone is kept once)."""

    def __init__(self, classifier: ImageClassifier, states: list[dict], rank: int, alpha: float, space: InputMap,
                 info: dict[str, str]):
        self.classifier, self.states, self.rank, self.alpha = classifier, list(states), rank, alpha
        self.input_map, self.info = space, dict(info)
        self._network, self._loaded = None, None

    def __deepcopy__(self, memo):  # read-only once made; ModelPatcher.clone deep-copies model_options
        return self

    @property
    def count(self) -> int:
        return len(self.states)

    def network(self, index: int, device) -> torch.nn.Module:
        """The adapted backbone holding expert `index`, on `device`, in eval mode."""
        with torch.inference_mode(False):
            if self._network is None:
                self._network = add_adapters(self.classifier.network, self.rank, self.alpha).eval()
                self._network.requires_grad_(False)
            self._network.to(device)
            if self._loaded != index:
                load_expert(self._network, self.states[index])
                self._loaded = index
        return self._network

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"expert.{i}.{name}": value.contiguous().cpu() for i, state in enumerate(self.states)
                for name, value in state.items()}

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        metadata = {**self.info, "format": FORMAT, "experts": str(self.count), "rank": str(self.rank),
                    "alpha": repr(self.alpha), "space": self.input_map.space,
                    "input_map": json.dumps([self.input_map.scale, self.input_map.offset]),
                    "class_names": json.dumps(list(self.classifier.class_names))}
        save_file(self.tensors(), path, metadata=metadata)


def read_experts(path: str, classifier: ImageClassifier, node_name: str = LOAD_DISPLAY_NAME) -> PPAPExperts:
    """Experts from a file, onto `classifier`, which must be the backbone they were distilled from."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{node_name}: {path} is not a PPAP expert file (made by {TRAIN_DISPLAY_NAME})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    made_for, this = metadata.get("backbone_sha256", ""), network_sha256(classifier.network)
    if made_for != this:
        raise ValueError(f"{node_name}: these experts were distilled from another classifier (backbone sha256 "
                         f"{made_for[:12]}, {metadata.get('backbone_name', 'unnamed')}), not from {classifier.name} "
                         f"(sha256 {this[:12]}). Load them onto the classifier they were trained from, or train "
                         f"experts for this one with {TRAIN_DISPLAY_NAME}")
    count = int(metadata["experts"])
    states = [{} for _ in range(count)]
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        states[int(index)][name] = value
    scale, offset = json.loads(metadata["input_map"])
    with torch.inference_mode(False):
        states = [{name: value.clone() for name, value in state.items()} for state in states]
    return PPAPExperts(classifier, states, int(metadata["rank"]), float(metadata["alpha"]),
                       InputMap(metadata["space"], scale, offset), metadata)


class PPAPHook:
    """Post-CFG hook: D + s ρ² α ∇ₓ log p_φᵢ(y | x), φᵢ the expert of the call's noise level (module docstring), D
    clipped to the data range first on a pixel-space model when `clip_denoised` (the official DDIM guidance,
    `condition_score` after `p_mean_variance(clip_denoised=True)`, forms its ε from the clipped x̂₀)."""

    node_name = DISPLAY_NAME
    guides_denoised = True  # a term on the guided prediction alone, whatever made it (AGD's one-pass one included)

    def __init__(self, experts: PPAPExperts, targets: ClassifierTargets, scale: float, chunk: int,
                 mask: torch.Tensor | None = None, clip_denoised: bool = True):
        self.experts, self.targets, self.scale, self.chunk, self.mask = experts, targets, scale, chunk, mask
        self.clip_denoised = clip_denoised

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if self.scale == 0:
            return denoised
        # the sampling objects of the model as it runs (a node applied after PPAP may have replaced them)
        model_sampling, latent_format = args["model"].model_sampling, args["model"].latent_format
        x, level = args["input"], float(args["sigma"].max())  # one noise level per call, as the samplers step
        index = expert_index(model_position(model_sampling, level), self.experts.count)
        network = self.experts.network(index, x.device)
        with torch.inference_mode(False):  # an inference tensor cannot be saved for the backward pass
            sigma = torch.tensor([level], device=x.device)
        read = self.experts.input_map.noisy(latent_format, model_sampling, sigma)
        classifier = ClassifierOnDenoised(network, self.experts.classifier.input_shape, read, chunk=self.chunk,
                                          name=f"{DISPLAY_NAME}: {self.experts.classifier.name}")
        target = self.targets.for_batch(x.shape[0], DISPLAY_NAME, x.device)
        gradient, _ = classifier.log_prob_gradient(x.float(), target)
        if not torch.isfinite(gradient).all():
            raise ValueError(f"{DISPLAY_NAME}: the expert's gradient is not finite at sigma {level:.4g}; check the "
                             "model's output (run it in float32, e.g. --force-fp32).")
        flow = isinstance(model_sampling, comfy.model_sampling.CONST)
        clip = self.experts.input_map.clip(latent_format) if self.clip_denoised else None
        base = denoised if clip is None else clip(denoised)
        guided = base + denoised_shift(gradient, level, flow, self.scale).to(denoised.dtype)
        if self.mask is None:
            return guided
        return torch.lerp(denoised, guided, latent_weights(self.mask, guided, DISPLAY_NAME))


def apply_ppap(model, experts: PPAPExperts, targets: ClassifierTargets, scale: float, chunk: int = DEFAULT_CHUNK,
               mask: torch.Tensor | None = None, clip_denoised: bool = True):
    """A clone of the ModelPatcher `model` with PPAP's guidance added after the CFG step; `mask` weights its shift
    per position (1: PPAP, 0: the prediction without it); `clip_denoised` clips the prediction it guides to the
    data range on a pixel-space model, as the official sampling does (no effect on a latent model)."""
    check_model(model, DISPLAY_NAME)
    if network_sha256(targets.classifier.network) != experts.info.get("backbone_sha256"):
        raise ValueError(f"{DISPLAY_NAME}: the target classes are of {targets.classifier.name}, but these experts were "
                         f"distilled from {experts.info.get('backbone_name', 'another classifier')}; choose the "
                         "classes with the classifier the experts were loaded onto")
    made_for, schedule = experts.info.get("noise_schedule"), noise_schedule(model)
    if made_for != schedule:
        raise ValueError(f"{DISPLAY_NAME}: these experts were distilled for a model with {made_for}, and this model "
                         f"has {schedule}: its noisy inputs differ. Train experts for this model with "
                         f"{TRAIN_DISPLAY_NAME}")
    if experts.info.get("model_fingerprint") != model_fingerprint(model):
        logging.warning("%s: these experts were distilled on the samples of other weights (fingerprint %s, this "
                        "model's %s); they guide, but best on the model they were trained for.", DISPLAY_NAME,
                        experts.info.get("model_fingerprint"), model_fingerprint(model))
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(PPAPHook(experts, targets, scale, chunk, mask, clip_denoised))
    return patched


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """The transfer set: the model's own samples (the official: 500,000 from the unconditional ADM, 25 DDIM steps)."""

    images: int = 20000  # the shipped reference experts' (bench/ppap_bench.py)
    batch: int = 256  # images per sampling run (and per file on disk)
    sample_steps: int = 25
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"  # the official respacing "ddim25": uniform over the 1000 steps
    cfg: float = 1.0  # the official model is unconditional; 1 samples the model's conditional as it is
    seed: int = 0

    def __post_init__(self):
        for name in ("images", "batch", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


def make_transfer_set(model, positive, negative, latent: torch.Tensor, settings: TransferSettings,
                      cache: pathlib.Path, progress=None) -> torch.Tensor:
    """The model's samples (in the sampler's space), made in runs of `settings.batch` and kept as files in `cache`,
    so that an interrupted run resumes; `latent`: one empty latent of the size to sample."""
    import comfy.sample
    from safetensors.torch import load_file, save_file

    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / "transfer.json"
    fields = json.dumps({**dataclasses.asdict(settings), "model": model_fingerprint(model),
                         "inputs": inputs_digest(positive, negative, latent[:1])}, sort_keys=True)
    if manifest.exists() and manifest.read_text() != fields:
        for old in cache.glob("samples_*.safetensors"):
            old.unlink()
    manifest.write_text(fields)
    parts = []
    for start in range(0, settings.images, settings.batch):
        comfy.model_management.throw_exception_if_processing_interrupted()
        path = cache / f"samples_{start:07d}.safetensors"
        count = min(settings.batch, settings.images - start)
        if not path.exists():
            empty = latent[:1].repeat(count, *[1] * (latent.ndim - 1))
            seed = settings.seed + start
            noise = comfy.sample.prepare_noise(empty, seed)
            samples = comfy.sample.sample(model, noise, settings.sample_steps, settings.cfg, settings.sampler,
                                          settings.scheduler, positive, negative, empty, seed=seed,
                                          disable_pbar=True)
            save_file({"samples": samples.float().cpu().contiguous()}, str(path))
        parts.append(load_file(str(path))["samples"])
        if progress is not None:
            progress(start + count)
    return model.model.process_latent_in(torch.cat(parts))


def distill_experts(model, classifier: ImageClassifier, clean: torch.Tensor, space: InputMap, config: PPAPConfig,
                    seed: int, checkpoint: pathlib.Path | None = None, progress=None, log=None
                    ) -> tuple[list[dict], list[float]]:
    """Trains the experts one after another on one set of adapters (the official script), each on its range's noise
    levels of the transfer set `clean` (the model's samples, sampler space), the teacher the clean classifier. With
    `checkpoint`, saves everything every CHECKPOINT_EVERY steps and resumes from it. Returns each expert's state and
    the loss of every step."""
    ranges = expert_ranges(config.experts)
    device = comfy.model_management.get_torch_device()
    model_sampling = model.get_model_object("model_sampling")
    latent_format = model.get_model_object("latent_format")
    shape, per_expert = classifier.input_shape, config.steps_per_expert
    total = per_expert * config.experts
    with torch.inference_mode(False), torch.enable_grad():
        teacher = ClassifierOnDenoised(classifier.network.to(device).eval(), shape, space.clean(latent_format),
                                       chunk=config.batch)
        generator = torch.Generator().manual_seed(seed)
        student = add_adapters(classifier.network, config.rank, config.alpha, generator).to(device).train()
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                      lr=config.learning_rate, weight_decay=config.weight_decay)
        states, losses, done = [], [], 0
        if checkpoint is not None and checkpoint.exists():
            saved = torch.load(checkpoint, map_location=device, weights_only=True)
            student.load_state_dict(saved["student"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            losses, done = saved["losses"], int(saved["done"])
            states = [{k[len(f"{i}."):]: v for k, v in saved["states"].items() if k.startswith(f"{i}.")}
                      for i in range(done // per_expert)]
        began, resumed = time.perf_counter(), done
        while done < total:
            comfy.model_management.throw_exception_if_processing_interrupted()
            expert, step = divmod(done, per_expert)
            for group in optimizer.param_groups:
                group["lr"] = annealed_learning_rate(config.learning_rate, step, per_expert)
            x0 = clean[torch.randint(clean.shape[0], (config.batch,), generator=generator)].to(device)
            if config.flip:
                flip = (torch.rand(config.batch, generator=generator) < 0.5).to(device)
                x0 = torch.where(flip.view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
            sigma = position_sigmas(model_sampling, range_timesteps(ranges[expert], config.batch, generator))
            sigma = sigma.to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x = model_sampling.noise_scaling(sigma.view(-1, *[1] * (x0.ndim - 1)), noise, x0)
            with torch.no_grad():
                teacher_logits = teacher.logits(x0)
            reader = ClassifierOnDenoised(student, shape, space.noisy(latent_format, model_sampling, sigma))
            loss = distillation_loss(reader.logits(x), teacher_logits, config.teacher_temperature)
            if not torch.isfinite(loss):
                raise ValueError(f"{TRAIN_DISPLAY_NAME}: the loss became {loss.item()} at step {step + 1} of expert "
                                 f"{expert + 1}; lower the learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            done += 1
            if done % per_expert == 0:
                states.append({k: v.cpu() for k, v in expert_state(student).items()})
            if checkpoint is not None and (done % CHECKPOINT_EVERY == 0 or done == total):
                torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(), "losses": losses, "done": done,
                            "states": {f"{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}},
                           checkpoint)
            if progress is not None:
                progress(done)
            if log is not None and (done % 100 == 0 or done == total):
                rate = (done - resumed) / (time.perf_counter() - began)
                log(f"expert {expert + 1}/{config.experts}, step {done}/{total}: loss "
                    f"{sum(losses[-100:]) / len(losses[-100:]):.5f} ({rate:.1f} steps/s)")
    return states, losses


def train_ppap(model, classifier: ImageClassifier, positive, negative, latent: torch.Tensor, vae,
               transfer: TransferSettings, config: PPAPConfig, work: pathlib.Path, progress=None, log=None
               ) -> PPAPExperts:
    """The transfer set, then the experts; `work` holds the samples and the training checkpoint, so that a run
    interrupted at any point resumes where it stopped (with the same settings). Progress: one count per transfer
    image and per optimizer step."""
    space = input_map(model, classifier, vae, TRAIN_DISPLAY_NAME)
    total = transfer.images + config.steps_per_expert * config.experts
    began = time.perf_counter()
    clean = make_transfer_set(model, positive, negative, latent, transfer, work / "transfer",
                              (lambda done: progress(done, total)) if progress else None)
    made = time.perf_counter()
    key = json.dumps({"transfer": dataclasses.asdict(transfer), "config": dataclasses.asdict(config),
                      "model": model_fingerprint(model), "inputs": inputs_digest(positive, negative, latent[:1]),
                      "backbone": network_sha256(classifier.network)}, sort_keys=True)
    checkpoint, manifest = work / "training.pt", work / "training.json"
    if manifest.exists() and manifest.read_text() != key:
        checkpoint.unlink(missing_ok=True)
    manifest.write_text(key)
    states, losses = distill_experts(model, classifier, clean, space, config, transfer.seed, checkpoint,
                                     (lambda done: progress(transfer.images + done, total)) if progress else None,
                                     log)
    with torch.inference_mode(False):
        trainable = trainable_count(add_adapters(classifier.network, config.rank, config.alpha))
    info = {"backbone_sha256": network_sha256(classifier.network), "backbone_name": classifier.name,
            "model_fingerprint": model_fingerprint(model), "noise_schedule": noise_schedule(model),
            "ranges": json.dumps(expert_ranges(config.experts)), "config": json.dumps(dataclasses.asdict(config)),
            "transfer": json.dumps(dataclasses.asdict(transfer)), "trainable_parameters_per_expert": str(trainable),
            "transfer_seconds": f"{made - began:.1f}", "training_seconds": f"{time.perf_counter() - made:.1f}",
            "final_loss": f"{sum(losses[-100:]) / len(losses[-100:]):.6g}"}
    return PPAPExperts(classifier, states, config.rank, config.alpha, space, info)
