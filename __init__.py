"""ComfyUI Guidance: diffusion guidance methods (APG, ...) as ComfyUI nodes.

The algorithms live in `guiders/` and `kernels/` (plain torch); `nodes/` wraps them for ComfyUI. The ComfyUI import
happens only in `comfy_entrypoint`, so the algorithms can be imported and tested without a host.
"""

# Served by ComfyUI at /extensions/<this folder>/: the nodes' help pages in docs/<node id>.md, which the frontend's
# Node Info tab fetches. ComfyUI reads it from this module before it looks for comfy_entrypoint (nodes.py,
# load_custom_node, 0.3.75 and 0.33.0 alike).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import GuidanceExtension
    from .nodes.validation import install_filing

    extension = GuidanceExtension()
    # here rather than in on_load, which ComfyUI 0.3.75 never calls: each queue-time problem under its own input
    install_filing(await extension.get_node_list())
    return extension
