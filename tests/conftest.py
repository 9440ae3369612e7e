"""Test session setup: the real ComfyUI host, in-process and as a server, with this repository as a custom-node pack.

Nothing of ComfyUI is mocked. $GUIDANCE_COMFYUI (set by scripts/test.sh) names the ComfyUI folder; it goes first on
sys.path and is imported with CPU-only arguments. The repository root is the pack, so a temporary `custom_nodes/`
folder holds a symlink `comfyui_guidance -> <repo>`: that folder on sys.path makes the pack importable as the
package `comfyui_guidance`, and registered as a custom-node folder it is loaded by ComfyUI's own node loader.

ComfyUI loads the pack a second time under a module name of its own (the folder path), so node classes should be
taken from `nodes.NODE_CLASS_MAPPINGS` (what the server runs) and plain code from the `pack` fixture.
"""

import asyncio
import importlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
INIT_LOG = pytest.StashKey[list]()
sys.path.insert(0, str(REPO / "scripts"))
from comfy_server import COMFY_ARGS, PACK, ComfyServer, link_pack  # noqa: E402


def comfyui_dir():
    """The ComfyUI folder under test, or a usage error that says how to run the suite."""
    path = os.environ.get("GUIDANCE_COMFYUI")
    if not path or not (pathlib.Path(path) / "comfyui_version.py").is_file():
        raise pytest.UsageError("GUIDANCE_COMFYUI must name a ComfyUI folder: run the suite with scripts/test.sh")
    return pathlib.Path(path)


class _Records(logging.Handler):
    """Keeps log records; while attached to the root logger it also keeps ComfyUI's import chatter off stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def pytest_configure(config):
    """Import ComfyUI and load all nodes, ours included, before any test module is collected."""
    sys.path.insert(0, str(comfyui_dir()))
    sys.argv = ["main.py", *COMFY_ARGS]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="guidance-tests-"))
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    pack_link = link_pack(scratch / "custom_nodes")
    sys.path.insert(0, str(scratch / "custom_nodes"))
    log = _Records()
    logging.getLogger().addHandler(log)
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.utils
        import folder_paths

        # Imported before `nodes`, as main.py does: nodes.py puts comfy/ first on sys.path, after which `utils` would
        # resolve to comfy/utils.py and comfy_extras/nodes_images.py would fail to import.
        import utils.extra_config  # noqa: F401
        import nodes

        comfy.utils.set_progress_bar_enabled(False)
        folder_paths.add_model_folder_path("custom_nodes", str(scratch / "custom_nodes"))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(log)
    config.stash[INIT_LOG] = [r.getMessage() for r in log.records if str(pack_link) in r.getMessage()]


@pytest.fixture(scope="session")
def comfy(pytestconfig):
    """ComfyUI's `nodes` module with the built-in, extra and custom nodes loaded; fails if our pack did not load."""
    import nodes

    problems = pytestconfig.stash[INIT_LOG]
    if problems:
        pytest.fail("ComfyUI could not load the pack:\n" + "\n".join(problems), pytrace=False)
    return nodes


@pytest.fixture(scope="session")
def pack():
    """This repository imported as the package `comfyui_guidance`."""
    return importlib.import_module(PACK)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI server with the pack in its custom_nodes and the fixture checkpoints in its models."""
    import slim_models

    base = tmp_path_factory.mktemp("comfyui-base")
    link_pack(base / "custom_nodes")
    slim_models.write_checkpoints(base / "models")
    server = ComfyServer(base, comfyui_dir())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def noise_draws(monkeypatch):
    """Every noise tensor drawn from ComfyUI's default noise sampler during the test, in order.

    A float64 replay takes the noise of an ancestral run from here rather than drawing it again from the run's
    seed: how a sampler turns a seed into noise is ComfyUI's to change (0.33 adds 1 to it on CPU).
    """
    import comfy.k_diffusion.sampling as sampling

    draws = []
    make_sampler = sampling.default_noise_sampler

    def recording_noise_sampler(x, seed=None):
        sample = make_sampler(x, seed=seed)

        def draw(sigma, sigma_next):
            noise = sample(sigma, sigma_next)
            draws.append(noise.clone())
            return noise

        return draw

    monkeypatch.setattr(sampling, "default_noise_sampler", recording_noise_sampler)
    return draws
