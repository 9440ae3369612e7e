"""ComfyUI nodes for PPAP (`guiders/ppap.py`; training, files and the patch in `ppap_patch.py`)."""

import os
import pathlib
import shutil

import folder_paths
from comfy_api.latest import io

from ..guiders.ppap import PPAPConfig
from .classifier import GuidanceClassifier, GuidanceClassifierTargets
from .classifier_patch import DEFAULT_CHUNK
from .reference import WEIGHTS_DIR
from .ppap_patch import (DISPLAY_NAME, FOLDER, LOAD_DISPLAY_NAME, LOAD_NODE_ID, NODE_ID, TRAIN_DISPLAY_NAME,
                         TRAIN_NODE_ID, TransferSettings, apply_ppap, read_experts, train_ppap)
from .validation import FILENAME_RULE, Rule, check_widgets, prefixed

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
# Experts shipped for the embedded reference model and its classifier (bench/ppap_bench.py trains them), after the
# user's folder, which stays the first (Train PPAP Experts saves there).
folder_paths.add_model_folder_path(FOLDER, str(WEIGHTS_DIR / FOLDER))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")
GuidancePPAPExperts = io.Custom("GUIDANCE_PPAP_EXPERTS")
# Training a node run does by default: the official 300,000 steps at lr 1e-4 (ImageNet, ResNet-50) would hold a
# prompt for hours; the shipped reference experts were trained with 5000 steps at 1e-3, which beat 1e-4 at that budget
# (bench/results/ppap_bench_probe_lr1e-3.md).
NODE_TRAIN_STEPS = 5000
NODE_LEARNING_RATE = 1e-3


def expert_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


class PPAPTrainExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        config, transfer = PPAPConfig(), TransferSettings()
        return io.Schema(
            node_id=TRAIN_NODE_ID,
            display_name=TRAIN_DISPLAY_NAME,
            category="sampling/guidance/classifier",
            is_output_node=True,
            description=(
                "Distills PPAP experts (Go et al., CVPR 2023) from an off-the-shelf classifier, without labels or a "
                "dataset: samples the model (the transfer set), then trains one LoRA expert per range of noise "
                "levels to read the noisy samples as the classifier reads the clean ones. Saves the experts only "
                f"(safetensors, with the classifier's hash and the model's fingerprint) to models/{FOLDER}/. "
                "Interruptible: queued again with the same settings it resumes where it stopped."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to guide later: a pixel-space model for an image "
                               "classifier (the reference model), any eps, v or flow model for a latent classifier."),
                GuidanceClassifier.Input("classifier", tooltip="The clean classifier to distill (the teacher and "
                                         "the experts' shared backbone)."),
                io.Conditioning.Input("positive", tooltip="What to sample the transfer set from: the empty prompt "
                                      "(the reference model's empty class) samples the model unconditionally, as "
                                      "the paper does."),
                io.Conditioning.Input("negative", tooltip="The negative prompt; used only when transfer_cfg is "
                                      "above 1."),
                io.Latent.Input("latent_image", tooltip="An empty latent of the size to sample at (one is enough)."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE, needed by classifiers that read images."),
                io.Int.Input("experts", default=config.experts, min=1, max=50,
                             tooltip="N: equal ranges of the 1000 diffusion timesteps, one expert each (5 in the "
                             "paper; 1 is a single noise-aware classifier)."),
                io.Int.Input("rank", default=config.rank, min=1, max=1024,
                             tooltip="LoRA rank r of each expert (16 in the official code)."),
                io.Float.Input("alpha", default=config.alpha, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha: the update is scaled by alpha/rank (8 in the official code)."),
                io.Int.Input("train_steps", default=NODE_TRAIN_STEPS, min=1, max=10_000_000,
                             tooltip="Optimizer steps over all experts, split evenly; the official run takes 300000 "
                             "(ImageNet)."),
                io.Int.Input("batch_size", default=config.batch, min=1, max=4096,
                             tooltip="Transfer images per step (256 in the official code)."),
                io.Float.Input("learning_rate", default=NODE_LEARNING_RATE, min=1e-7, max=1.0, step=1e-5,
                               round=1e-7, tooltip="AdamW's rate, annealed linearly to 0 over each expert's steps. "
                               "The official 1e-4 is for its 300000 steps; over 5000, 1e-3 trains the reference "
                               "classifier's experts better."),
                io.Float.Input("teacher_temperature", default=config.teacher_temperature, min=0.01, max=10.0,
                               step=0.01, tooltip="The clean classifier's softmax temperature in the distillation "
                               "target (0.25 in the official code: a sharper target)."),
                io.Int.Input("transfer_images", default=TransferSettings().images, min=1, max=10_000_000,
                             tooltip="Samples of the model to learn from (the paper's ImageNet run: 500000)."),
                io.Int.Input("transfer_batch", default=transfer.batch, min=1, max=4096,
                             tooltip="Images per sampling run (and per file kept for resuming)."),
                io.Int.Input("sample_steps", default=transfer.sample_steps, min=1, max=1000,
                             tooltip="DDIM steps per transfer sample (25 in the paper)."),
                io.Float.Input("transfer_cfg", default=transfer.cfg, min=1.0, max=100.0, step=0.1,
                               tooltip="CFG of the transfer samples; 1 samples the model as it is (the paper's model "
                               "is unconditional)."),
                io.Int.Input("seed", default=transfer.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=False,
                             tooltip="Seed of the samples, noise, LoRA initialisation and batches (fixed: a run "
                             "queued again with the same seed resumes)."),
                io.String.Input("filename", default="ppap_experts",
                                tooltip=f"File name (without extension) in models/{FOLDER}/."),
            ],
            outputs=[GuidancePPAPExperts.Output(display_name="experts", tooltip="The trained experts, for PPAP "
                                                "Classifier Guidance."),
                     io.String.Output(display_name="path", tooltip="Where the experts were saved.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        def steps_rule(v):
            steps, experts = v.get("train_steps"), v.get("experts")
            if steps is not None and experts is not None and steps < experts:
                return f"train_steps ({steps}) is below experts ({experts}): every expert needs at least one step"
            return None
        return check_widgets(cls, values, FILENAME_RULE, Rule(("train_steps", "experts"), steps_rule))

    @classmethod
    def execute(cls, model, classifier, positive, negative, latent_image, experts, rank, alpha, train_steps,
                batch_size, learning_rate, teacher_temperature, transfer_images, transfer_batch, sample_steps,
                transfer_cfg, seed, filename, vae=None) -> io.NodeOutput:
        import comfy.utils

        folder = pathlib.Path(folder_paths.get_folder_paths(FOLDER)[0])
        work = folder / f"{filename}.training"  # transfer samples and checkpoint: kept until the run completes
        try:
            config = PPAPConfig(experts, rank, alpha, train_steps, batch_size, learning_rate,
                                teacher_temperature=teacher_temperature)
            transfer = TransferSettings(transfer_images, transfer_batch, sample_steps, cfg=transfer_cfg, seed=seed)
            bar = comfy.utils.ProgressBar(transfer_images + config.steps_per_expert * experts)
            trained = train_ppap(model, classifier, positive, negative, latent_image["samples"], vae, transfer,
                                 config, work, lambda done, total: bar.update_absolute(done, total))
        except ValueError as e:
            raise prefixed(TRAIN_DISPLAY_NAME, e) from e
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{filename}.safetensors"
        trained.save(str(path))
        shutil.rmtree(work, ignore_errors=True)
        return io.NodeOutput(trained, str(path))


class PPAPLoadExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LOAD_NODE_ID,
            display_name=LOAD_DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description="Loads PPAP experts onto the classifier they were distilled from (another classifier is "
            "refused).",
            inputs=[
                GuidanceClassifier.Input("classifier", tooltip="The classifier the experts were trained from."),
                io.Combo.Input("experts", options=expert_files(),
                               tooltip=f"An expert file in models/{FOLDER}/, made by {TRAIN_DISPLAY_NAME}."),
            ],
            outputs=[GuidancePPAPExperts.Output(display_name="experts", tooltip="For PPAP Classifier Guidance.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, classifier, experts) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, experts)
        if path is None:
            raise ValueError(f"{LOAD_DISPLAY_NAME}: no expert file {experts!r} in models/{FOLDER}/; train experts with "
                             f"{TRAIN_DISPLAY_NAME}.")
        try:
            return io.NodeOutput(read_experts(path, classifier))
        except ValueError as e:
            raise prefixed(LOAD_DISPLAY_NAME, e) from e


class PPAPClassifierGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description=(
                "PPAP (Go et al., CVPR 2023): classifier guidance by noise-range experts distilled from an "
                "off-the-shelf classifier (Train PPAP Experts). Each step the expert of the current noise level reads "
                "the noisy image and its class gradient moves the prediction towards the target class. Works with "
                "the stock KSampler and with CFG (any cfg, 1 included), APG, PAG and AG; one expert pass with a "
                "backward pass per model call."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the experts were distilled for (eps, v or flow)."),
                GuidancePPAPExperts.Input("experts", tooltip="From Train PPAP Experts or Load PPAP Experts."),
                GuidanceClassifierTargets.Input("targets", tooltip="From Classifier Target Classes, on the classifier "
                                                "the experts were distilled from: the class each image is guided "
                                                "towards."),
                io.Float.Input("scale", default=7.5, min=0.0, max=1000.0, step=0.1,
                               tooltip="s: classifier guidance scale (7.5 in the official sampling script); 0 "
                               "disables PPAP."),
                io.Int.Input("chunk", default=DEFAULT_CHUNK, min=1, max=4096,
                             tooltip="Images per expert pass (forward and backward). Lower it if the pass runs out of "
                             "memory; the result is the same."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where PPAP guides, per position (a MASK at image size, resized to "
                              "the latent; one for all images or one per image). 1 = PPAP as is, 0 = the prediction "
                              "without PPAP's shift, values between blend the two. Saliency Map From Markers makes "
                              "one."),
                io.Boolean.Input("clip_denoised", default=True, optional=True,
                                 tooltip="On a pixel-space model, clip the prediction PPAP guides to the image range "
                                 "first, as the official sampling does (clip_denoised=True). No effect on a latent "
                                 "model. Off: the sampler's prediction as it is."),
            ],
            outputs=[io.Model.Output(tooltip="The model with PPAP added to the sampler's guidance.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, model, experts, targets, scale, chunk=DEFAULT_CHUNK, mask=None,
                clip_denoised=True) -> io.NodeOutput:
        try:
            return io.NodeOutput(apply_ppap(model, experts, targets, scale, chunk, mask, clip_denoised))
        except ValueError as e:
            raise prefixed(DISPLAY_NAME, e) from e
