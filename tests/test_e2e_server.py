"""End to end through a real ComfyUI server: the shipped API workflows run on the stock checkpoint loader, the
server validates our node's inputs, and the pack imports cleanly and serves its example workflows."""

import copy
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"
API_WORKFLOWS = sorted(WORKFLOWS.glob("*_api.json"))
UI_WORKFLOWS = sorted(set(WORKFLOWS.glob("*.json")) - set(API_WORKFLOWS))
APG = "AdaptiveProjectedGuidance"
# CPU budget: the shipped graphs run at this size and step count; everything else stays as shipped.
TEST_SIZE = 64
TEST_STEPS = 3


def load(path):
    return json.loads(path.read_text())


def nodes_of(prompt, class_type):
    return {i: n for i, n in prompt.items() if n["class_type"] == class_type}


def shrunk(prompt):
    """The shipped graph at TEST_SIZE and TEST_STEPS: the only changes the tests make to it."""
    prompt = copy.deepcopy(prompt)
    for node in nodes_of(prompt, "EmptyLatentImage").values():
        node["inputs"].update(width=TEST_SIZE, height=TEST_SIZE)
    for node in nodes_of(prompt, "KSampler").values():
        node["inputs"]["steps"] = TEST_STEPS
    return prompt


def saved_images(server, entry):
    """{filename_prefix: decoded RGB float array} for every SaveImage output of a finished prompt."""
    images = {}
    for node_id, output in entry["outputs"].items():
        prefix = entry["prompt"][2][node_id]["inputs"]["filename_prefix"]
        [image] = output["images"]
        assert f"{image['subfolder']}/{image['filename']}".startswith(prefix)
        with Image.open(io.BytesIO(server.view(image))) as png:
            images[prefix] = np.asarray(png.convert("RGB"), dtype=np.float32) / 255.0
    return images


def test_pack_imports_cleanly(comfy_server):
    """The server log lists the pack's import without failure and without errors naming it; our node is served."""
    pack_dir = str(comfy_server.base / "custom_nodes" / "comfyui_guidance")
    lines = [line for line in comfy_server.log().splitlines() if pack_dir in line]
    assert any("seconds:" in line for line in lines), comfy_server.log_tail()
    assert not [line for line in lines if "IMPORT FAILED" in line or "Cannot import" in line or "Error" in line]
    assert APG in comfy_server.get(f"/object_info/{APG}")


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_runs(comfy_server, path):
    """The shipped graph runs and saves one CFG and one APG image: right size, finite, non-constant, different."""
    prompt = shrunk(load(path))
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = saved_images(comfy_server, entry)
    assert sorted(images) == sorted(n["inputs"]["filename_prefix"] for n in nodes_of(prompt, "SaveImage").values())
    for prefix, image in images.items():
        assert image.shape == (TEST_SIZE, TEST_SIZE, 3), prefix
        assert np.isfinite(image).all() and image.std() > 0.01, prefix
    [cfg] = [image for prefix, image in images.items() if prefix.endswith("/cfg")]
    [apg] = [image for prefix, image in images.items() if prefix.endswith("/apg")]
    assert np.abs(cfg - apg).mean() > 0.005


def upstream(prompt, node_id):
    """The part of `prompt` that node `node_id` depends on, itself included."""
    part, todo = {}, [node_id]
    while todo:
        current = todo.pop()
        if current not in part:
            part[current] = prompt[current]
            todo += [value[0] for value in prompt[current]["inputs"].values() if isinstance(value, list)]
    return part


def test_out_of_range_value_is_refused(comfy_server):
    """eta=5 is refused by /prompt with a 400 whose node error names the input; the server still runs a valid prompt.

    ComfyUI refuses a prompt only when no output survives validation: in the comparison graph the CFG half stays
    valid, so that graph is queued (200) with the APG error in node_errors and only the CFG image is made.
    """
    prompt = shrunk(load(API_WORKFLOWS[0]))
    [apg_id] = nodes_of(prompt, APG)
    [apg_save] = [i for i, n in nodes_of(prompt, "SaveImage").items() if n["inputs"]["filename_prefix"].endswith("/apg")]
    bad = copy.deepcopy(prompt)
    bad[apg_id]["inputs"]["eta"] = 5.0

    status, body = comfy_server.request("/prompt", {"prompt": upstream(bad, apg_save)})
    assert status == 400
    reply = json.loads(body)
    assert reply["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = reply["node_errors"][apg_id]["errors"]  # the top-level details name only the outputs' own errors
    assert error["type"] == "value_bigger_than_max" and error["details"] == "eta"
    assert error["extra_info"]["input_name"] == "eta" and error["extra_info"]["received_value"] == 5.0

    status, body = comfy_server.request("/prompt", {"prompt": bad})
    assert status == 200
    assert json.loads(body)["node_errors"][apg_id]["dependent_outputs"] == [apg_save]

    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success" and len(entry["outputs"]) == 2


def test_example_workflows_are_served(comfy_server):
    """ComfyUI's template browser lists the UI workflows under the pack and serves them unchanged."""
    listed = comfy_server.get("/api/workflow_templates")["comfyui_guidance"]
    for path in UI_WORKFLOWS:
        assert path.stem in listed
        assert comfy_server.get(f"/api/workflow_templates/comfyui_guidance/{path.name}") == load(path)
