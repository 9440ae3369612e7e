"""A zero-shot CLIP image classifier made from a ComfyUI CLIP vision model, a CLIP text encoder and class prompts.

CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021) embeds
images and texts in one space; its zero-shot classifier scores an image x against class prompts t_k by

    logit_k(x) = s · cos(f(x), g(t_k)),

f the projected image embedding, g the projected text embedding, s the learned logit scale (100 in the released
models, where training clipped it), and softmax over the prompts is the class posterior. The result is an
`ImageClassifier` (space "image") for the classifier-guided nodes, which differentiate log p(y | x) through it.

Image side. The network owns a float32 copy of the CLIP vision transformer and its projection (ComfyUI runs nodes
under torch.inference_mode, and its loaded weights are inference tensors, which cannot be saved for backward), and
runs it differentiably: ComfyUI's own forward adds the residuals in place, which autograd refuses, so the same
layers are applied here with out-of-place residuals; and ComfyUI's `clip_preprocess` rounds pixels to 8 bits, whose
gradient is zero, so the preprocessing here is the same resize, crop and normalisation without the rounding.

Text side. ComfyUI's `encode_from_tokens(tokens, return_pooled=True)` gives CLIP's projected text embedding only for
the text encoders whose checkpoints carry CLIP's text projection: SD2.x's (OpenCLIP ViT-H/14, the pair of
clip_vision_h) and SDXL's CLIP-G (OpenCLIP ViT-bigG/14, the pair of clip_vision_g). SD1.x checkpoints hold the text
transformer of CLIP ViT-L/14 without its projection, and ComfyUI gives their pooled output unprojected (as for the
CLIP-L of Flux and SD3); an unprojected embedding is not in the image embedding's space, so such encoders are
refused, as are pairs whose embedding widths differ (e.g. SDXL's CLIP-G text with clip_vision_l).
"""

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

import comfy.clip_model
from comfy.ldm.modules.attention import attention_pytorch
from comfy_api.latest import io

from ..guiders.classifier import ImageClassifier
from .classifier import GuidanceClassifier
from .validation import Rule, check_widgets

NODE_ID = "GuidanceCLIPVisionClassifier"
DISPLAY_NAME = "CLIP Vision Zero-Shot Classifier"
# CLIP's learned logit scale (temperature 1/100): training clipped it at 100 and the released models sit there.
DEFAULT_LOGIT_SCALE = 100.0
LOGIT_SCALE_MIN = 0.01
LOGIT_SCALE_MAX = 1000.0
DEFAULT_CLASS_PROMPTS = "cat: a photo of a cat\ndog: a photo of a dog\nbird: a photo of a bird"
FIX_PAIR = ("use a CLIP vision model and the text encoder of the same CLIP: an SD2.x checkpoint's CLIP with "
            "clip_vision_h (OpenCLIP ViT-H/14), or an SDXL checkpoint's CLIP with clip_vision_g (OpenCLIP ViT-bigG/14)")


def parse_class_prompts(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, prompts) from one class per line: "name: prompt" (the text before the first colon is the
    name), or a prompt that is also its name; blank lines are skipped. Names are what Classifier Target Classes
    matches (without case, separated by commas, numbers meaning indices), so they must be distinct and usable there;
    two classes with one prompt could not be told apart."""
    names, prompts = [], []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        name, colon, prompt = (part.strip() for part in line.partition(":"))
        if not colon:
            prompt = name
        if not name or not prompt:
            raise ValueError(f"the line {line!r} has an empty class name or prompt: write 'name: prompt'")
        if "," in name:
            raise ValueError(f"the class name {name!r} has a comma, which Classifier Target Classes reads as a "
                             f"separator: give the line a short name, as in 'name: {prompt}'")
        if name.lstrip("-").isdigit():
            raise ValueError(f"the class name {name!r} is a number, which Classifier Target Classes reads as a class "
                             "index: give the class a name")
        names.append(name)
        prompts.append(prompt)
    if not names:
        raise ValueError("class_prompts lists no class: write one class per line, as 'name: prompt' or a prompt")
    repeated_names = repeated([name.lower() for name in names])
    if repeated_names:
        raise ValueError(f"the class names {', '.join(repeated_names)} appear more than once (names are matched "
                         "without case): give each class its own name")
    check_prompts(prompts)
    return tuple(names), tuple(prompts)


def repeated(items: list[str]) -> list[str]:
    """The items that occur more than once, each once, in order of first occurrence."""
    return [item for i, item in enumerate(items) if items.count(item) > 1 and items.index(item) == i]


def check_prompts(prompts: list[str] | tuple[str, ...]):
    """Refuses an empty prompt list, a blank prompt and a repeated prompt (two classes that cannot be told apart)."""
    if not prompts:
        raise ValueError("there are no class prompts: give at least one")
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("a class prompt is empty: give every class some text")
    repeated_prompts = repeated(list(prompts))
    if repeated_prompts:
        raise ValueError(f"the prompts {', '.join(map(repr, repeated_prompts))} appear more than once: two classes "
                         "with one prompt cannot be told apart; make each prompt different")


def class_prompts_rule(values: dict) -> str | None:
    """Queue-time check of the class list (needs no model)."""
    if values.get("class_prompts") is None:
        return None
    try:
        parse_class_prompts(values["class_prompts"])
    except ValueError as e:
        return str(e)
    return None


def text_embeddings(clip, prompts: tuple[str, ...]) -> torch.Tensor:
    """CLIP's projected text embedding of each prompt [K, D]: the pooled output of ComfyUI's text encoder, which
    is the projected one exactly when it differs from the unprojected pooled output that ComfyUI also gives (an
    encoder whose family carries no projection gives the same tensor for both)."""
    rows = []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        _, projected = clip.encode_from_tokens(tokens, return_pooled=True)
        _, unprojected = clip.encode_from_tokens(tokens, return_pooled="unprojected")
        if projected is None:
            raise ValueError(f"the text encoder gives no pooled text embedding (it is no CLIP text encoder); "
                             f"{FIX_PAIR}")
        if torch.equal(projected, unprojected):
            raise ValueError("the text encoder gives its pooled output without CLIP's text projection (ComfyUI does "
                             "so for SD1.x, whose checkpoints lack the projection, and for the CLIP-L of Flux and "
                             "SD3), so its embeddings are not in the image embeddings' space; " + FIX_PAIR)
        rows.append(projected[0])
    return torch.stack(rows)


def clip_vision_transformer(clip_vision) -> comfy.clip_model.CLIPVisionModelProjection:
    """The CLIP vision transformer of a CLIP_VISION, refused when it has no class-token image projection (SigLIP,
    DINOv2), which CLIP's zero-shot rule needs."""
    model = clip_vision.model
    if not (isinstance(model, comfy.clip_model.CLIPVisionModelProjection)
            and isinstance(model.visual_projection, nn.Module)
            and model.vision_model.embeddings.class_embedding is not None):
        raise ValueError(f"the CLIP vision model is a {type(model).__name__} without CLIP's image projection (SigLIP "
                         f"and DINOv2 encoders have none); {FIX_PAIR}")
    return model


def owned_copy(module: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of `module` in eval mode whose parameters and buffers are new tensors (floating ones float32) on
    `device`, made outside inference mode so that gradients can flow through them. Each tensor is copied straight to
    `device`, so a source that ComfyUI holds on the GPU costs no second GPU copy."""
    with torch.inference_mode(False), torch.no_grad():
        memo = {}
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            owned = tensor.to(device=device, dtype=dtype, copy=True)
            memo[id(tensor)] = nn.Parameter(owned, requires_grad=False) if isinstance(tensor, nn.Parameter) else owned
        return copy.deepcopy(module, memo).eval()


def clip_pixels(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """CLIP's input from images [N, 3, H, W] in [0, 1], as ComfyUI's `clip_preprocess` makes it (antialiased bicubic
    resize of the short side to `size`, centre crop, clamp, normalisation by `mean` and `std` [1, 3, 1, 1]) but
    without its rounding to 8 bits, whose gradient is zero; the values differ from ComfyUI's by at most half a level."""
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        images = F.interpolate(images, size=(round(scale * height), round(scale * width)), mode="bicubic",
                               antialias=True)
        top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
        images = images[:, :, top:top + size, left:left + size]
    return (images.clamp(0, 1) - mean) / std


def image_embeddings(vision: comfy.clip_model.CLIPVision, projection: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embedding [N, D]: ComfyUI's CLIPVision forward (class token after the post layer
    norm, through the projection) with out-of-place residuals, which autograd can differentiate, and PyTorch's
    scaled-dot-product attention, which has a backward on every device (ComfyUI may pick a kernel without one)."""
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer in vision.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention_pytorch)
        x = x + layer.mlp(layer.layer_norm2(x))
    return projection(vision.post_layernorm(x[:, 0]))


def zero_shot_logits(image_embeds: torch.Tensor, text_directions: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """s · cos(image embedding, text embedding k) [N, K], the text embeddings given as unit vectors [K, D]."""
    return logit_scale * F.normalize(image_embeds, dim=1) @ text_directions.T


class CLIPZeroShotNetwork(nn.Module):
    """images [N, 3, H, W] in [0, 1] → CLIP zero-shot logits [N, K]. A plain module: the caller moves it to the
    images' device with `.to(device)` (it is made on ComfyUI's offload device for CLIP vision)."""

    def __init__(self, vision: nn.Module, projection: nn.Module, text_directions: torch.Tensor, image_size: int,
                 mean: torch.Tensor, std: torch.Tensor, logit_scale: float):
        super().__init__()
        self.vision = vision
        self.projection = projection
        self.image_size = image_size
        self.logit_scale = logit_scale
        self.register_buffer("text_directions", text_directions)
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a VAE may decode in half precision; the network computes in its own (float32) precision
        pixels = clip_pixels(images.to(self.mean.dtype), self.image_size, self.mean, self.std)
        return zero_shot_logits(image_embeddings(self.vision, self.projection, pixels), self.text_directions,
                                self.logit_scale)


def clip_vision_classifier(clip_vision, clip, class_prompts: list[str] | tuple[str, ...],
                           logit_scale: float = DEFAULT_LOGIT_SCALE, name: str = "CLIP zero-shot classifier",
                           class_names: list[str] | tuple[str, ...] | None = None) -> ImageClassifier:
    """The zero-shot CLIP classifier of `class_prompts` (class names: `class_names`, else the prompts) from a
    ComfyUI CLIP_VISION and CLIP (see the module docstring); refuses, saying what to change, a non-positive or
    non-finite logit scale, empty or repeated prompts, a vision model without CLIP's projection, a text encoder
    without CLIP's projected pooled output, and text and image embeddings of different widths."""
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale is {logit_scale}: give a positive finite number ({DEFAULT_LOGIT_SCALE:g} is "
                         "CLIP's own)")
    check_prompts(class_prompts)
    class_names = tuple(class_prompts if class_names is None else class_names)
    if len(class_names) != len(class_prompts):
        raise ValueError(f"there are {len(class_names)} class names for {len(class_prompts)} prompts: give one each")
    model = clip_vision_transformer(clip_vision)
    texts = text_embeddings(clip, tuple(class_prompts))
    width = model.visual_projection.out_features
    if texts.shape[1] != width:
        raise ValueError(f"the text encoder's embeddings have {texts.shape[1]} dimensions and the CLIP vision "
                         f"model's {width}, so they are not one CLIP (e.g. SDXL's CLIP-G text with clip_vision_l); "
                         + FIX_PAIR)
    device = clip_vision.patcher.offload_device
    with torch.inference_mode(False):
        network = CLIPZeroShotNetwork(
            owned_copy(model.vision_model, device), owned_copy(model.visual_projection, device),
            F.normalize(texts.to(device, torch.float32), dim=1), clip_vision.image_size,
            torch.tensor(clip_vision.image_mean, dtype=torch.float32, device=device),
            torch.tensor(clip_vision.image_std, dtype=torch.float32, device=device), float(logit_scale))
    network.eval().requires_grad_(False)
    size = clip_vision.image_size
    return ImageClassifier(network, (3, size, size), class_names, "image", name)


class CLIPVisionZeroShotClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category="sampling/guidance/classifier",
            description=(
                "A zero-shot image classifier from CLIP (Radford et al., ICML 2021): each class is a text prompt, and "
                "an image's class logits are logit_scale x the cosine similarity of its CLIP image embedding with "
                "each prompt's CLIP text embedding. Guides any model whose VAE decodes RGB images, with EluCD. The "
                "vision model and text encoder must be one CLIP: an SD2.x checkpoint's CLIP with clip_vision_h, or an "
                "SDXL checkpoint's CLIP with clip_vision_g. SD1.x checkpoints lack CLIP's text projection and are "
                "refused. Keeps a float32 copy of the vision model."
            ),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="From Load CLIP Vision: a CLIP vision model (clip_vision_h "
                                    "or clip_vision_g; SigLIP and DINOv2 encoders have no CLIP image projection)."),
                io.Clip.Input("clip", tooltip="The text encoder of the same CLIP: an SD2.x checkpoint's CLIP for "
                              "clip_vision_h, an SDXL checkpoint's CLIP for clip_vision_g."),
                io.String.Input(
                    "class_prompts", default=DEFAULT_CLASS_PROMPTS, multiline=True, dynamic_prompts=False,
                    tooltip="One class per line: 'name: prompt' (the text before the first colon is the short name "
                    "that Classifier Target Classes uses), or just a prompt, which is then also the name. Names and "
                    "prompts must differ between classes; CLIP's paper prompts with 'a photo of a {class}'.",
                ),
                io.Float.Input(
                    "logit_scale", default=DEFAULT_LOGIT_SCALE, min=LOGIT_SCALE_MIN, max=LOGIT_SCALE_MAX, step=0.01,
                    tooltip="s: logits are s x cosine similarity. 100 is CLIP's learned value; lower makes the class "
                    "probabilities softer.",
                ),
            ],
            outputs=[GuidanceClassifier.Output(display_name="classifier",
                                               tooltip="The zero-shot classifier; choose its target classes next.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, Rule(("class_prompts",), class_prompts_rule))

    @classmethod
    def execute(cls, clip_vision, clip, class_prompts, logit_scale) -> io.NodeOutput:
        try:
            names, prompts = parse_class_prompts(class_prompts)
            return io.NodeOutput(clip_vision_classifier(clip_vision, clip, prompts, logit_scale,
                                                        f"CLIP zero-shot classifier ({len(names)} classes)", names))
        except ValueError as e:
            raise ValueError(f"{DISPLAY_NAME}: {e}.") from e
