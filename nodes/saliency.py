"""ComfyUI nodes that make saliency maps from markers (`guiders/saliency.py`): where the guidance nodes act, as a MASK
for their optional `mask` input."""

import torch

import comfy.model_management
from comfy_api.latest import io

from ..guiders.saliency import DEFAULT_RADIUS, DEFAULT_SIGMA, markers_from_points, parse_points, saliency_map
from .validation import Rule, check_widgets

POINTS_NODE_ID = "GuidanceSaliencyMarkersFromPoints"
MAP_NODE_ID = "GuidanceSaliencyMap"
POINTS_DISPLAY_NAME = "Saliency Markers From Points"
MAP_DISPLAY_NAME = "Saliency Map From Markers"
# A MASK pixel counts as a marker above this value (masks drawn in the editor are 0 or 1, resized ones in between).
MARKER_LEVEL = 0.5


def points_rule(values: dict) -> str | None:
    if values.get("points") is None:
        return None
    try:
        points = parse_points(values["points"])
        if values.get("width") is not None and values.get("height") is not None:
            markers_from_points(points, values["height"], values["width"])
    except ValueError as e:
        return f"points: {e}"
    return None


class SaliencyMarkersFromPoints(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=POINTS_NODE_ID,
            display_name=POINTS_DISPLAY_NAME,
            category="sampling/guidance/saliency",
            description="Marker pixels at the given points, as a MASK for Saliency Map From Markers.",
            inputs=[
                io.String.Input("points", default="256,256", multiline=True,
                                tooltip="Points x,y in pixels from the top-left corner, separated by ';' or new lines, "
                                "e.g. '200,240; 310,250'."),
                io.Int.Input("width", default=512, min=8, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=8, max=4096, step=8, tooltip="Image height in pixels."),
            ],
            outputs=[io.Mask.Output(display_name="markers", tooltip="1 at each point, 0 elsewhere.")],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values, Rule(("points",), points_rule))

    @classmethod
    def execute(cls, points, width, height) -> io.NodeOutput:
        try:
            markers = markers_from_points(parse_points(points), height, width)
        except ValueError as e:
            raise ValueError(f"{POINTS_DISPLAY_NAME}: {e}.") from e
        return io.NodeOutput(markers.float().unsqueeze(0))


class SaliencyMapFromMarkers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=MAP_NODE_ID,
            display_name=MAP_DISPLAY_NAME,
            category="sampling/guidance/saliency",
            description="A saliency map from marker pixels, as SDL-Seg (Kazemimoghadam et al., 2021) makes it: "
            "distance to the nearest marker, turned into closeness (1 on a marker, 0 beyond the radius) and "
            "smoothed by a Gaussian filter, peak 1. Connect it to a guidance node's mask input to guide hard near "
            "the markers and gently away from them.",
            inputs=[
                io.Mask.Input("markers", tooltip="Marker pixels (above 0.5): from Saliency Markers From Points, a "
                              "mask drawn in the mask editor, or an image through Convert Image to Mask. One per "
                              "image, or one for all."),
                io.Float.Input("radius", default=DEFAULT_RADIUS, min=0.001, max=2.0, step=0.005,
                               tooltip="How far the map reaches from a marker, as a fraction of the image's shorter "
                               "side (0.125: an eighth)."),
                io.Float.Input("softness", default=DEFAULT_SIGMA, min=0.0, max=1.0, step=0.005,
                               tooltip="Sigma of the Gaussian filter, as a fraction of the shorter side; 0 leaves "
                               "the map's edge sharp."),
                io.Float.Input("background", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The map's value far from the markers: 0 turns a guidance node off there, "
                               "e.g. 0.3 keeps 30% of its update (with APG at cfg w: an effective scale of "
                               "1 + 0.3 (w - 1) in the background)."),
            ],
            outputs=[
                io.Mask.Output(display_name="saliency", tooltip="The map in [0, 1]: connect it to a guidance node's "
                               "mask input."),
                io.Image.Output(display_name="preview", tooltip="The map as a grey image, for Preview Image."),
            ],
        )

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widgets(cls, values)

    @classmethod
    def execute(cls, markers, radius, softness, background=0.0) -> io.NodeOutput:
        markers = markers if markers.ndim == 3 else markers.unsqueeze(0)
        side = min(markers.shape[1:])
        device = comfy.model_management.get_torch_device()
        try:
            saliency = saliency_map(markers.to(device) > MARKER_LEVEL, radius * side, softness * side)
        except ValueError as e:
            raise ValueError(f"{MAP_DISPLAY_NAME}: {e}.") from e
        saliency = torch.lerp(torch.full_like(saliency, background), torch.ones_like(saliency), saliency)
        saliency = saliency.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(saliency, saliency.unsqueeze(-1).expand(*saliency.shape, 3).contiguous())
