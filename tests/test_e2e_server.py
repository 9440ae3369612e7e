"""End to end through a real ComfyUI server: the shipped API workflows run on the stock checkpoint loader, the
server validates our node's inputs, and the pack imports cleanly and serves its example workflows."""

import copy
import io
import itertools
import json
import pathlib
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

# The UI workflows are ComfyUI's templates of the pack (it lists every .json at the top of the folder); each one's
# API-format twin, same file name, is in api/, which the template browser does not list.
WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"
API_DIR = WORKFLOWS / "api"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
API_WORKFLOWS = sorted(API_DIR.glob("*.json"))
APG = "AdaptiveProjectedGuidance"
# CPU budget: the shipped graphs run at most at this size and step count; everything else stays as shipped (FreCaS
# Sampler's scale_by too: its images are that many times larger).
TEST_SIZE = 64
TEST_STEPS = 3
# Train AGD Adapters at CPU cost: one CFG run of the ten classes and two optimizer steps (tests/test_agd.py checks what
# training does).
AGD_TRAINING_AT_TEST_SIZE = {"trajectories": 10, "trajectory_batch": 10, "sample_steps": TEST_STEPS, "train_steps": 2,
                             "batch_size": 2}
# Train PPAP Experts at CPU cost: a few transfer samples of TEST_STEPS steps and one optimizer step of two images per
# expert (tests/test_ppap.py checks what training does).
PPAP_TRAINING_AT_TEST_SIZE = {"transfer_images": 4, "transfer_batch": 4, "sample_steps": TEST_STEPS, "batch_size": 2}
# The folder in the server's models/ where each training node saves its file, by node type.
TRAINED_FOLDERS = {"GuidanceAGDTrain": "agd_adapters", "GuidancePPAPTrainExperts": "ppap_experts"}
# Image pairs that differ too little at TEST_SIZE to compare: PAG on SDXL perturbs the middle block, which a 64-pixel
# image shrinks to 2x2 tokens (tests/test_pag_sampling.py checks PAG's effect on every family).
ALIKE_AT_TEST_SIZE = {("PAG and PAG + APG vs CFG (SDXL)/cfg", "PAG and PAG + APG vs CFG (SDXL)/pag"),
                      # 3 steps on the slim random-weight checkpoints: the cosine of the conditional and the CFG
                      # prediction stays below AG's default threshold, so AG is CFG there (tests/test_adaptive.py
                      # checks the switch itself)
                      ("AG vs CFG (SD1.5)/ag", "AG vs CFG (SD1.5)/cfg"),
                      ("AG vs CFG (SDXL)/ag", "AG vs CFG (SDXL)/cfg")}
# FreCaS Sampler at CPU cost: its stages kept, with this many steps each (its first stage's latent is capped like
# every empty latent; its scale_by stays).
FRECAS = "GuidanceFreCaSSampler"
FRECAS_STEPS_AT_TEST_SIZE = (2, 1)
# Pixels per latent element of each empty-latent node, for the size of what FreCaS makes from it (in latent units).
LATENT_FACTORS = {"EmptyLatentImage": 8, "EmptySD3LatentImage": 8, "GuidanceEmptyReferenceLatent": 1}
# Image pairs that differ by design by less than the usual bound, with the least mean difference that shows the
# second node acted: LinearAG's estimates are within 0.3% of the unconditional pass they replace on the reference
# model (bench/results/adaptive_bench.md), so its images differ from AG's by about half a grey level.
NEAR = {("AG and LinearAG vs CFG (reference model)/ag", "AG and LinearAG vs CFG (reference model)/linear_ag"): 5e-4}


def load(path):
    return json.loads(path.read_text())


def nodes_of(prompt, class_type):
    return {i: n for i, n in prompt.items() if n["class_type"] == class_type}


def shrunk(prompt):
    """The shipped graph at CPU cost, the only change the tests make to it: every `steps` input at TEST_STEPS (a FreCaS
    Sampler's steps per stage at FRECAS_STEPS_AT_TEST_SIZE, the last repeated for further stages) and every empty
    latent no larger than TEST_SIZE (a family's native size below it, e.g. 32 px, is kept), Train AGD Adapters at
    AGD_TRAINING_AT_TEST_SIZE and Train PPAP Experts at PPAP_TRAINING_AT_TEST_SIZE with one optimizer step per expert.
    A graph with LinearAG keeps its step count: its coefficients belong to one (and LinearAG refuses another)."""
    prompt = copy.deepcopy(prompt)
    fixed_steps = any(node["class_type"] == "GuidanceLinearAG" for node in prompt.values())
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int) and not fixed_steps:
            inputs["steps"] = TEST_STEPS
        if node["class_type"] == FRECAS and isinstance(inputs.get("steps"), str):
            stages = len(inputs["steps"].replace(",", " ").split())
            caps = FRECAS_STEPS_AT_TEST_SIZE + FRECAS_STEPS_AT_TEST_SIZE[-1:] * stages
            inputs["steps"] = ", ".join(str(n) for n in caps[:stages])
        if node["class_type"] == "GuidanceAGDTrain":
            inputs.update(AGD_TRAINING_AT_TEST_SIZE)
        if node["class_type"] == "GuidancePPAPTrainExperts":
            inputs.update(PPAP_TRAINING_AT_TEST_SIZE, train_steps=inputs["experts"])
        if node["class_type"].startswith("Empty") or node["class_type"] == "GuidanceEmptyReferenceLatent":
            for side in ("width", "height"):
                if isinstance(inputs.get(side), int):
                    inputs[side] = min(inputs[side], TEST_SIZE)
    return prompt


def image_size(prompt, save_id):
    """(height, width) of the images of Save Image node `save_id`: those of the latent node with width and height
    widgets that its image comes from (through decoders, samplers and encoders; a saliency markers node has its own
    width and height, which `shrunk` leaves as shipped), times the scale_by of each FreCaS Sampler on the way, which
    scales the latent's side in latent units."""
    node, scales = prompt[save_id], []
    while not (isinstance(node["inputs"].get("width"), int) and isinstance(node["inputs"].get("height"), int)):
        if node["class_type"] == FRECAS:
            scales.append(node["inputs"]["scale_by"])
        [source] = [value[0] for name, value in node["inputs"].items()
                    if name in ("images", "samples", "pixels", "latent_image", "inverted") and isinstance(value, list)]
        node = prompt[source]
    assert "Latent" in node["class_type"], node["class_type"]
    size = (node["inputs"]["height"], node["inputs"]["width"])
    factor = LATENT_FACTORS[node["class_type"]]
    for scale_by in scales:
        size = tuple(round(side // factor * scale_by) * factor for side in size)
    return size


def saved_images(server, entry):
    """{filename_prefix: [N, H, W, 3] float array} for every SaveImage output of a finished prompt (Preview Image
    outputs, e.g. a saliency map's, are left out)."""
    images = {}
    for node_id, output in entry["outputs"].items():
        if entry["prompt"][2][node_id]["class_type"] != "SaveImage":
            continue
        prefix = entry["prompt"][2][node_id]["inputs"]["filename_prefix"]
        batch = []
        for image in output["images"]:
            assert f"{image['subfolder']}/{image['filename']}".startswith(prefix)
            with Image.open(io.BytesIO(server.view(image))) as png:
                batch.append(np.asarray(png.convert("RGB"), dtype=np.float32) / 255.0)
        images[prefix] = np.stack(batch)
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
    """The shipped graph runs and saves its images (for APG: CFG ones and APG ones): right size, finite,
    non-constant, and different between outputs, since each graph compares guidance settings on the same seed. A
    training node saves its file in the server's own (temporary) models folder, and leaves no working folder (the file
    is removed again: the server's models folder keeps only the fixtures)."""
    prompt = shrunk(load(path))
    entry = comfy_server.run_prompt(prompt)
    trained = [comfy_server.base / "models" / folder / f"{node['inputs']['filename']}.safetensors"
               for kind, folder in TRAINED_FOLDERS.items() for node in nodes_of(prompt, kind).values()]
    saved = [file.is_file() and not file.with_suffix(".training").exists() for file in trained]
    for file in trained:
        file.unlink(missing_ok=True)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert all(saved), trained
    images = saved_images(comfy_server, entry)
    assert sorted(images) == sorted(n["inputs"]["filename_prefix"] for n in nodes_of(prompt, "SaveImage").values())
    saves = {n["inputs"]["filename_prefix"]: i for i, n in nodes_of(prompt, "SaveImage").items()}
    for prefix, batch in images.items():
        assert batch.shape[1:] == (*image_size(prompt, saves[prefix]), 3), prefix
        assert np.isfinite(batch).all() and batch.std(axis=(1, 2, 3)).min() > 0.01, prefix
    for first, second in itertools.combinations(sorted(images), 2):
        if (first, second) in ALIKE_AT_TEST_SIZE:
            continue
        if images[first].shape != images[second].shape:  # FreCaS's sizes, each checked above: different by design
            continue
        least = NEAR.get((first, second), 0.005)
        assert np.abs(images[first] - images[second]).mean() > least, f"{first} and {second} look the same"


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
    prompt = shrunk(load(API_DIR / "APG vs CFG (SD1.5).json"))
    [apg_id] = nodes_of(prompt, APG)
    [apg_save] = [i for i, n in nodes_of(prompt, "SaveImage").items()
                  if n["inputs"]["filename_prefix"].endswith("/apg")]
    bad = copy.deepcopy(prompt)
    bad[apg_id]["inputs"]["eta"] = 5.0

    status, body = comfy_server.request("/prompt", {"prompt": upstream(bad, apg_save)})
    assert status == 400
    reply = json.loads(body)
    assert reply["error"]["type"] == "prompt_outputs_failed_validation"
    # the top-level details name only the outputs' own errors; the node's problem is filed under its input only
    errors = reply["node_errors"][apg_id]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    assert {e["extra_info"]["input_name"] for e in errors} == {"eta"}
    assert "Adaptive Projected Guidance (APG): eta is 5: enter a number between 0 and 1" in errors[0]["details"]

    status, body = comfy_server.request("/prompt", {"prompt": bad})
    assert status == 200
    assert json.loads(body)["node_errors"][apg_id]["dependent_outputs"] == [apg_save]

    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success" and len(entry["outputs"]) == 2


def test_apg_prompt_from_before_the_mode_inputs_runs_as_before(comfy_server):
    """An API prompt saved before APG had threshold_mode and video_mode (optional inputs) is accepted and makes the
    same images as the shipped one, which names today's behaviour (absolute, clip)."""
    shipped = shrunk(load(API_DIR / "APG vs CFG (reference model).json"))
    old = copy.deepcopy(shipped)
    for node in nodes_of(old, APG).values():
        assert (node["inputs"].pop("threshold_mode"), node["inputs"].pop("video_mode")) == ("absolute", "clip")
    entries = [comfy_server.run_prompt(prompt) for prompt in (shipped, old)]
    assert [e["status"]["status_str"] for e in entries] == ["success", "success"], [e["status"] for e in entries]
    images = [saved_images(comfy_server, e) for e in entries]
    assert sorted(images[0]) == sorted(images[1]) and len(images[0]) == 2
    for prefix, batch in images[0].items():
        assert np.array_equal(batch, images[1][prefix]), prefix


def test_example_workflows_are_served(comfy_server):
    """ComfyUI's template browser lists exactly the UI workflows under the pack (no API-format ones, which it could
    not open) and serves each unchanged, with its thumbnail."""
    listed = comfy_server.get("/api/workflow_templates")["comfyui_guidance"]
    assert sorted(listed) == [path.stem for path in UI_WORKFLOWS]
    for path in UI_WORKFLOWS:
        assert comfy_server.get(f"/api/workflow_templates/comfyui_guidance/{quote(path.name)}") == load(path)
        status, body = comfy_server.request(f"/api/workflow_templates/comfyui_guidance/{quote(path.stem)}.jpg")
        assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG", path.stem
