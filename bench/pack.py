"""Imports this repository as the package `comfyui_guidance`, as ComfyUI would load it from custom_nodes/."""

import importlib
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_guidance"


def import_pack():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    for sub in ("guiders.apg", "kernels.projection"):
        importlib.import_module(f"{PACKAGE}.{sub}")
    return sys.modules[PACKAGE]
