"""ComfyUI nodes of the pack: thin wrappers over `guiders/`."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .apg import AdaptiveProjectedGuidance


class GuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AdaptiveProjectedGuidance]
