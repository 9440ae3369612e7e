"""Which self-attention layers PAG perturbs: readable layer names, the layers a loaded model has, and parsing.

Layer names follow ComfyUI's own structure of each family:

- UNet (SD1.x, SD2.x, SDXL): `input.B.T`, `middle.0.T`, `output.B.T`: block B of the input, middle or output side
  (the index ComfyUI uses in its `input_blocks`/`output_blocks`, as in attn1 patches), transformer T inside it.
  `input.B` selects every transformer of the block.
- SD3 (MMDiT): `joint.N`, joint block N.
- Flux: `double.N` and `single.N`, the double- and single-stream blocks.
- Wan: `block.N`.

An index may be a range, `single.0-37` or `input.4-8` (the layers that exist in it), and names are separated by
commas or spaces. `auto` is the paper's choice for the family (see FAMILY_DEFAULTS).
"""

import dataclasses
import re

from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.wan.model import WanModel

AUTO = "auto"
FAMILY_NAMES = {"unet": "UNet", "mmdit": "SD3 (MMDiT)", "flux": "Flux", "wan": "Wan"}
UNET_KINDS = ("input", "middle", "output")
# The kind of each DiT layer name and the key of ComfyUI's "dit" block patches for it.
DIT_BLOCK_KEYS = {"joint": "double_block", "double": "double_block", "single": "single_block", "block": "double_block"}
# Per family: the layers `auto` selects.
# UNet: the official code perturbs the middle block's self-attention, `m0` for SD1.5
# (hyoungwoncho/sd_perturbed_attention_guidance) and `mid` for SDXL (every transformer of the middle block, 10 in
# SDXL); `middle.0` is both. DiTs have no published PAG layer from the paper's authors: diffusers' SD3 PAG pipeline
# perturbs the second transformer block (`blocks.1`), and the same position is used for Flux and Wan.
FAMILY_DEFAULTS = {"unet": "middle.0", "mmdit": "joint.1", "flux": "double.1", "wan": "block.1"}


@dataclasses.dataclass(frozen=True, order=True)
class Layer:
    """One perturbable self-attention: a UNet transformer (kind, block, transformer) or a DiT block (kind, index)."""

    kind: str
    index: int
    transformer: int | None = None

    def __str__(self):
        return f"{self.kind}.{self.index}" + ("" if self.transformer is None else f".{self.transformer}")

    @property
    def is_unet(self) -> bool:
        return self.kind in UNET_KINDS


def model_family(diffusion_model) -> str:
    for family, cls in (("unet", UNetModel), ("mmdit", MMDiT), ("flux", Flux), ("wan", WanModel)):
        if isinstance(diffusion_model, cls):
            return family
    raise ValueError(f"PAG supports UNet (SD1.x, SD2.x, SDXL), SD3, Flux and Wan models, not "
                     f"{type(diffusion_model).__name__}: connect one of those")


def layer_modules(diffusion_model) -> dict[Layer, object]:
    """Every self-attention layer of a diffusion model that PAG can perturb, in model order, with the transformer
    block (UNet) or DiT block that holds it."""
    family = model_family(diffusion_model)
    if family == "unet":
        layers = {}
        sides = [("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
                 ("output", diffusion_model.output_blocks)]
        for kind, blocks in sides:
            for index, block in enumerate(blocks):
                for module in block or []:
                    if isinstance(module, SpatialTransformer):
                        layers.update({Layer(kind, index, t): b for t, b in enumerate(module.transformer_blocks)})
        return layers
    if family == "mmdit":
        return {Layer("joint", i): block for i, block in enumerate(diffusion_model.joint_blocks)}
    if family == "flux":
        return ({Layer("double", i): block for i, block in enumerate(diffusion_model.double_blocks)}
                | {Layer("single", i): block for i, block in enumerate(diffusion_model.single_blocks)})
    return {Layer("block", i): block for i, block in enumerate(diffusion_model.blocks)}


def describe(layers: list[Layer]) -> str:
    """Layers in short form, consecutive indices as ranges: `input.4.0-1, middle.0.0-9, double.0-18`."""
    groups: dict[str, list[int]] = {}
    for layer in layers:
        if layer.transformer is None:
            groups.setdefault(layer.kind, []).append(layer.index)
        else:
            groups.setdefault(f"{layer.kind}.{layer.index}", []).append(layer.transformer)
    parts = []
    for prefix, indices in groups.items():
        start = previous = indices[0]
        for current in indices[1:] + [None]:
            if current != previous + 1:
                parts.append(f"{prefix}.{start}" if start == previous else f"{prefix}.{start}-{previous}")
                start = current
            previous = current
    return ", ".join(parts)


TOKEN = re.compile(r"^(?P<kind>[a-z]+)\.(?P<first>\d+)(?:-(?P<last>\d+))?(?:\.(?P<sub>\d+)(?:-(?P<sub_last>\d+))?)?$")


def _indices(first, last):
    first = int(first)
    return range(first, (first if last is None else int(last)) + 1)


def layer_tokens(spec: str) -> list[str]:
    """The names in a `layers` setting (separated by commas or spaces), lower case."""
    return [t for t in re.split(r"[,\s]+", spec.strip().lower()) if t]


def malformed_layer_names(spec: str) -> list[str]:
    """The names in `spec` that no model has, whatever its family: neither `auto` nor a kind and index."""
    known = {*UNET_KINDS, *DIT_BLOCK_KEYS}
    return [t for t in layer_tokens(spec)
            if t != AUTO and ((match := TOKEN.match(t)) is None or match["kind"] not in known)]


def select_layers(spec: str, diffusion_model) -> tuple[Layer, ...]:
    """The layers named by `spec` in this model, or a ValueError that names the layers it has."""
    available = list(layer_modules(diffusion_model))
    family = model_family(diffusion_model)
    tokens = layer_tokens(spec)
    if tokens == [AUTO]:
        tokens = [FAMILY_DEFAULTS[family]]
    if not tokens:
        raise ValueError(f"no layers given; this model has {describe(available)}: set 'layers' to some of them, or "
                         "to 'auto'")
    chosen, unknown = set(), []
    for token in tokens:
        match = TOKEN.match(token)
        if match is None:
            unknown.append(token)
            continue
        kind, sub = match["kind"], match["sub"]
        wanted = {layer for layer in available if layer.kind == kind
                  and layer.index in _indices(match["first"], match["last"])
                  and (sub is None or layer.transformer in _indices(sub, match["sub_last"]))}
        # A range takes the layers that exist in it (UNet blocks without attention leave gaps, e.g. SDXL's input.6);
        # a name, or a range, that selects nothing is an error.
        if not wanted:
            unknown.append(token)
        chosen |= wanted
    if unknown:
        raise ValueError(f"this {FAMILY_NAMES[family]} model has no layer {', '.join(unknown)}; its layers are "
                         f"{describe(available)}: set 'layers' to some of them, or to 'auto'")
    return tuple(sorted(chosen))
