"""A real ComfyUI server in a subprocess, with this repository as a custom-node pack: for the end-to-end tests and
the demo (scripts/demo.py). Bound to 127.0.0.1 only; every wait is bounded."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
PACK = "comfyui_guidance"
# CPU only; deterministic torch algorithms; no API nodes (they want the network).
COMFY_ARGS = ["--cpu", "--deterministic", "--disable-api-nodes"]
SERVER_START_S = 180
# Names a frontend's static folder (e.g. DIR/comfyui_frontend_package/static of `pip install --target DIR --no-deps
# comfyui-frontend-package==X`) for the server to serve instead of the host's own; unset, the host's own.
FRONTEND_ROOT = "GUIDANCE_FRONTEND_ROOT"


def link_pack(custom_nodes):
    """Symlink the repository into `custom_nodes` under the pack's package name; returns the link."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK
    link.symlink_to(REPO, target_is_directory=True)
    return link


class ComfyServer:
    """A ComfyUI server in a subprocess, on 127.0.0.1, with its own base directory; every wait is bounded. It serves
    the frontend that $GUIDANCE_FRONTEND_ROOT names, if set (ComfyUI's --front-end-root; its log then names that folder
    as the web root)."""

    def __init__(self, base, comfyui, args=COMFY_ARGS):
        self.base = base
        self.comfyui = pathlib.Path(comfyui)
        frontend = os.environ.get(FRONTEND_ROOT)
        self.args = [*args, *(["--front-end-root", frontend] if frontend else [])]
        self.log_path = base / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        command = [
            sys.executable, str(self.comfyui / "main.py"), *self.args, "--listen", "127.0.0.1",
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
