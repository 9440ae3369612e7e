"""ComfyUI nodes for adapter guidance distillation (`guiders/agd.py`; patch and training in `agd_patch.py`)."""

import os
import pathlib
import shutil

import folder_paths
from comfy_api.latest import io

from ..guiders.agd import AdapterSpec, save_adapters
from .agd_patch import (BASE_CHECKS, DISPLAY_NAME, FOLDER, NODE_ID, TRAIN_DISPLAY_NAME, TRAIN_NODE_ID, TrainingSettings,
                        apply_agd, read_adapter_file, train_agd)
from .reference import WEIGHTS_DIR
from .validation import FILENAME_RULE, Rule, check_widgets, prefixed

REFERENCE_ADAPTERS = WEIGHTS_DIR / FOLDER

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
# Adapters shipped for the embedded reference model (bench/agd_bench.py trains them), after the user's folder, which
# stays the first (Train AGD Adapters saves there).
folder_paths.add_model_folder_path(FOLDER, str(REFERENCE_ADAPTERS))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def adapter_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


class AGDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance",
            description=(
                "Adapter guidance distillation (Jensen and Sadat, 2025): small adapters trained for this model (Train "
                "AGD Adapters) make its conditional pass give CFG's prediction at the scale set here, so a KSampler "
                "at cfg 1.0 samples the guided image with one model pass per step instead of two. The base model is "
                "not changed; adapters made for another model are refused."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the adapters were trained for (a UNet: SD1.x, SD2.x, SDXL "
                               "or the pack's reference model)."),
                io.Combo.Input("adapters", options=adapter_files(),
                               tooltip=f"An adapter file in models/{FOLDER}/, made by Train AGD Adapters."),
                io.Float.Input("scale", default=4.0, min=1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The CFG scale whose prediction the adapters give, within the range they were "
                               "trained on (stored in the file; scales outside it are refused). Set the KSampler's "
                               "cfg to 1.0."),
                io.Combo.Input("base_check", options=list(BASE_CHECKS), default=BASE_CHECKS[0],
                               tooltip="exact weights: refuse adapters trained on other weights (another checkpoint, "
                               "or this one with other LoRAs). same architecture: accept a checkpoint derived from "
                               "the adapters' base (fine-tunes, LoRAs), to which the paper reports they carry over; "
                               "another architecture is always refused."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where the adapters act, per position (a MASK at image size, resized "
                              "to each layer; one for all images or one per image). 1 = AGD's guided prediction, 0 = "
                              "the model's plain conditional prediction (exactly, where the whole mask is 0); values "
                              "between weight the adapters. Saliency Map From Markers makes one."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the adapters: sample it at cfg 1.0.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, adapters, scale, base_check, mask=None) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, adapters)
        if path is None:
            raise ValueError(f"{DISPLAY_NAME}: no adapter file {adapters!r} in models/{FOLDER}/; train one with "
                             f"{TRAIN_DISPLAY_NAME}.")
        try:
            return io.NodeOutput(apply_agd(model, read_adapter_file(path), scale, base_check, mask))
        except ValueError as e:
            raise prefixed(DISPLAY_NAME, e) from e


class AGDTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        settings, spec = TrainingSettings(), AdapterSpec()
        return io.Schema(
            node_id=TRAIN_NODE_ID,
            display_name=TRAIN_DISPLAY_NAME,
            category="sampling/guidance",
            is_output_node=True,
            description=(
                "Trains AGD adapters for this model (Jensen and Sadat, 2025): samples CFG-guided trajectories at "
                "scales drawn uniformly from [scale_low, scale_high], then trains the adapters, base frozen, to give "
                "each step's CFG prediction in one conditional pass. Saves the adapters only (safetensors, with the "
                f"model's fingerprint) to models/{FOLDER}/. Interruptible: queued again with the same settings it "
                "resumes where it stopped."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to distill (with its LoRAs: they change its fingerprint)."),
                io.Conditioning.Input("positive", tooltip="The prompts to train on: one prompt, or a batch of "
                                      "prompts (one per image, as the reference model's 'all classes'). The official "
                                      "runs train on thousands of prompts; the adapters learn the prompts they see."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of the CFG being distilled."),
                io.Latent.Input("latent_image", tooltip="An empty latent of the size to train at (one is enough)."),
                io.Float.Input("scale_low", default=settings.scale_low, min=1.0, max=100.0, step=0.1,
                               tooltip="Lowest CFG scale of the trajectories (1 in the paper)."),
                io.Float.Input("scale_high", default=settings.scale_high, min=1.0, max=100.0, step=0.1,
                               tooltip="Highest CFG scale (12 in the paper for Stable Diffusion, 6 for DiT)."),
                io.Int.Input("trajectories", default=settings.trajectories, min=1, max=1_000_000,
                             tooltip="CFG runs sampled for training; every model call of each is a training pair."),
                io.Int.Input("trajectory_batch", default=settings.trajectory_batch, min=1, max=4096,
                             tooltip="Trajectories per sampling run (and per chunk file on disk); a multiple of the "
                             "number of prompts in a batched positive (10 for the reference model's 'all classes')."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default=settings.sampler,
                               tooltip="Sampler of the trajectories: the one you will sample with visits the same "
                               "states."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default=settings.scheduler,
                               tooltip="Scheduler of the trajectories."),
                io.Int.Input("sample_steps", default=settings.sample_steps, min=1, max=1000,
                             tooltip="Steps of each trajectory (the official code samples 999)."),
                io.Int.Input("train_steps", default=settings.train_steps, min=1, max=1_000_000,
                             tooltip="Optimizer steps (5000 in the paper)."),
                io.Int.Input("batch_size", default=settings.batch, min=1, max=4096,
                             tooltip="Training pairs per optimizer step (64 in the paper)."),
                io.Float.Input("learning_rate", default=settings.learning_rate, min=1e-7, max=1.0, step=1e-5,
                               round=1e-7, tooltip="AdamW's rate (1e-4 in the paper), with 10% warm-up and cosine "
                               "decay."),
                io.Int.Input("hidden_dim", default=spec.hidden_dim, min=2, max=4096, step=2,
                             tooltip="Width of each adapter's attention (320 in the paper for Stable Diffusion). "
                             "Adapters grow with it; about 2% of the model's parameters is the paper's size."),
                io.Int.Input("seed", default=settings.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=False,
                             tooltip="Seed of the scales, noise, initialisation and batches (fixed: a run queued "
                             "again with the same seed resumes)."),
                io.String.Input("filename", default="agd_adapters",
                                tooltip=f"File name (without extension) in models/{FOLDER}/."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the adapters were saved.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        def range_rule(v):
            low, high = v.get("scale_low"), v.get("scale_high")
            if low is not None and high is not None and low > high:
                return f"scale_low ({low:g}) is above scale_high ({high:g})"
            return None
        def width_rule(v):
            width = v.get("hidden_dim")
            if width is not None and width % 2:
                return f"hidden_dim is {width}: give an even width (the adapters' positions are sines and cosines)"
            return None
        return check_widgets(cls, values, FILENAME_RULE, Rule(("scale_low", "scale_high"), range_rule),
                             Rule(("hidden_dim",), width_rule))

    @classmethod
    def execute(cls, model, positive, negative, latent_image, scale_low, scale_high, trajectories, trajectory_batch,
                sampler_name, scheduler, sample_steps, train_steps, batch_size, learning_rate, hidden_dim, seed,
                filename) -> io.NodeOutput:
        import comfy.utils

        folder = pathlib.Path(folder_paths.get_folder_paths(FOLDER)[0])
        work = folder / f"{filename}.training"  # trajectories and checkpoint: kept until the run completes
        bar = comfy.utils.ProgressBar(trajectories + train_steps)
        try:
            settings = TrainingSettings(trajectories, scale_low, scale_high, sampler_name, scheduler, sample_steps,
                                        trajectory_batch, train_steps, batch_size, learning_rate, seed=seed)
            adapters = train_agd(model, positive, negative, latent_image["samples"], settings,
                                 AdapterSpec(hidden_dim=hidden_dim), work,
                                 lambda done, total: bar.update_absolute(done, total))
        except ValueError as e:
            raise prefixed(TRAIN_DISPLAY_NAME, e) from e
        path = folder / f"{filename}.safetensors"
        save_adapters(adapters, str(path))
        shutil.rmtree(work, ignore_errors=True)
        return io.NodeOutput(str(path))
