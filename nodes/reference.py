"""ComfyUI nodes for the project's reference model (reference/): load it, condition it on classes, make its latents.

The reference model is a small class-conditional pixel-space diffusion model trained by the project
(reference/train.py) and shipped in reference/weights/, so every guidance node can be tried and measured on trained
weights with no download. It samples with the stock samplers; its VAE is ComfyUI's `pixel_space` conversion.
"""

import pathlib

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
from comfy_api.latest import io

from ..reference.data import CLASS_NAMES, RESOLUTION
from ..reference.model import class_conditioning, load_reference
from .validation import check_widgets

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "reference" / "weights"
DEFAULT_WEIGHTS = "fashion_diffusion.safetensors"
ALL_CLASSES = "all classes"
LOADER_DISPLAY_NAME = "Load Guidance Reference Model"
ReferenceClasses = io.Custom("GUIDANCE_REFERENCE_CLASSES")


def weight_files() -> list[str]:
    return sorted(p.name for p in WEIGHTS_DIR.glob("*_diffusion.safetensors")) or [DEFAULT_WEIGHTS]


class ReferenceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceReferenceModelLoader",
            display_name=LOADER_DISPLAY_NAME,
            category="sampling/guidance/reference",
            description="Loads the pack's own small class-conditional diffusion model (Fashion-MNIST, 32x32 pixels, "
            "v-prediction; also samples at 64x64), for trying and measuring guidance methods without a download.",
            inputs=[
                io.Combo.Input("weights", options=weight_files(), default=DEFAULT_WEIGHTS,
                               tooltip="Weights file in the pack's reference/weights folder."),
            ],
            outputs=[
                io.Model.Output(tooltip="The diffusion model; patch it with any guidance node."),
                io.Vae.Output(tooltip="ComfyUI's pixel-space VAE: VAE Decode turns the model's latents into images."),
                ReferenceClasses.Output(display_name="classes", tooltip="The model's classes, for Reference Class Conditioning."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        path = WEIGHTS_DIR / weights
        if not path.is_file():
            raise FileNotFoundError(f"{LOADER_DISPLAY_NAME}: {path} does not exist; reinstall the pack or "
                                    f"run reference/train.py to make it.")
        state_dict, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
        names = (metadata or {}).get("class_names", "").split(",")
        if names != CLASS_NAMES:
            raise ValueError(f"{LOADER_DISPLAY_NAME}: {weights} was trained on classes {names}, "
                             f"expected {CLASS_NAMES}.")
        try:
            model, tokens = load_reference(state_dict, names)
        except ValueError as e:
            raise ValueError(f"{LOADER_DISPLAY_NAME}: {weights}: {e}") from e
        vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        return io.NodeOutput(model, vae, {"names": names, "tokens": tokens})


class ReferenceClassConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceReferenceClassConditioning",
            display_name="Reference Class Conditioning",
            category="sampling/guidance/reference",
            description="The prompt of the reference model: a class. 'all classes' conditions each image of the "
            "batch on the next class in turn, for a grid of every class.",
            inputs=[
                ReferenceClasses.Input("classes", tooltip="From Load Guidance Reference Model."),
                io.Combo.Input("class_name", options=[ALL_CLASSES, *CLASS_NAMES], default=ALL_CLASSES,
                               tooltip="The class to generate, or every class in turn."),
                io.Int.Input("images_per_class", default=1, min=1, max=256,
                             tooltip="How many images of each chosen class; sets batch_size."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="One class per image of the batch."),
                io.Conditioning.Output(display_name="negative", tooltip="The empty class (the unconditional model)."),
                io.Int.Output(display_name="batch_size", tooltip="Batch size that matches the conditioning; link it "
                              "to Empty Reference Latent."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, classes, class_name, images_per_class) -> io.NodeOutput:
        indices = range(len(classes["names"])) if class_name == ALL_CLASSES else [classes["names"].index(class_name)]
        rows = [class_conditioning(classes["tokens"], i)[0][0] for i in indices for _ in range(images_per_class)]
        positive = [[torch.cat(rows), {}]]
        negative = class_conditioning(classes["tokens"], None)
        return io.NodeOutput(positive, negative, len(rows))


class EmptyReferenceLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GuidanceEmptyReferenceLatent",
            display_name="Empty Reference Latent",
            category="sampling/guidance/reference",
            description="An empty pixel-space latent (3 channels, full resolution) for the reference model.",
            inputs=[
                io.Int.Input("width", default=RESOLUTION, min=8, max=512, step=8,
                             tooltip="Image width in pixels; the model was trained at 32 and also samples at 64."),
                io.Int.Input("height", default=RESOLUTION, min=8, max=512, step=8, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=10, min=1, max=4096, tooltip="Images in the batch."),
            ],
            outputs=[io.Latent.Output(tooltip="An empty batch of reference-model images (3-channel pixel space): "
                                      "connect it to a sampler's latent_image.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, width, height, batch_size) -> io.NodeOutput:
        device = comfy.model_management.intermediate_device()
        return io.NodeOutput({"samples": torch.zeros([batch_size, 3, height, width], device=device)})
