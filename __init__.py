"""ComfyUI Guidance: diffusion guidance methods (APG, ...) as ComfyUI nodes.

The algorithms live in `guiders/` and `kernels/` (plain torch); `nodes/` wraps them for ComfyUI. The ComfyUI import
happens only in `comfy_entrypoint`, so the algorithms can be imported and tested without a host.
"""


async def comfy_entrypoint():
    from .nodes.extension import GuidanceExtension

    return GuidanceExtension()
