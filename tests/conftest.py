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
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACK = "comfyui_guidance"
# CPU only; deterministic torch algorithms; no API nodes (they want the network).
COMFY_ARGS = ["--cpu", "--deterministic", "--disable-api-nodes"]
INIT_LOG = pytest.StashKey[list]()
SERVER_START_S = 180


def comfyui_dir():
    """The ComfyUI folder under test, or a usage error that says how to run the suite."""
    path = os.environ.get("GUIDANCE_COMFYUI")
    if not path or not (pathlib.Path(path) / "comfyui_version.py").is_file():
        raise pytest.UsageError("GUIDANCE_COMFYUI must name a ComfyUI folder: run the suite with scripts/test.sh")
    return pathlib.Path(path)


def link_pack(custom_nodes):
    """Symlink the repository into `custom_nodes` under the pack's package name; returns the link."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK
    link.symlink_to(REPO, target_is_directory=True)
    return link


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


class ComfyServer:
    """A ComfyUI server in a subprocess, on 127.0.0.1, with its own base directory; every wait is bounded."""

    def __init__(self, base):
        self.base = base
        self.log_path = base / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        command = [
            sys.executable, str(comfyui_dir() / "main.py"), *COMFY_ARGS, "--listen", "127.0.0.1",
            "--port", str(self.port), "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.base, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not serve within {SERVER_START_S} s:\n{self.log_tail()}")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines=60):
        return "\n".join(self.log().splitlines()[-lines:])

    def request(self, path, body=None, timeout=30):
        """(status, body bytes) of a GET, or of a POST of `body` as JSON; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path, timeout=30):
        """GET `path` and decode JSON; raises on any status but 200."""
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {body[:500]!r}")
        return json.loads(body)

    def run_prompt(self, prompt, timeout_s=600):
        """Queue an API-format prompt, wait for it to finish, and return its /history entry."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": "guidance-tests"})
        assert status == 200, f"/prompt refused the graph: {status} {body[:2000]!r}"
        prompt_id = json.loads(body)["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None:
                return entry
            assert self.process.poll() is None, f"ComfyUI died:\n{self.log_tail()}"
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout_s} s:\n{self.log_tail()}")

    def view(self, image):
        """The bytes of an output image named in a /history entry."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        status, body = self.request(f"/view?{query}")
        assert status == 200, f"/view {query}: {status}"
        return body


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyUI server with the pack in its custom_nodes and the fixture checkpoints in its models."""
    import slim_models

    base = tmp_path_factory.mktemp("comfyui-base")
    link_pack(base / "custom_nodes")
    slim_models.write_checkpoints(base / "models")
    server = ComfyServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
