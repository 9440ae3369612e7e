"""ComfyUI nodes of the pack: thin wrappers over `guiders/`.

Nothing is imported here, so that the ComfyUI-free parts (`*_patch.py`) can be used without ComfyUI's node API;
the extension lives in `extension.py`.
"""
