"""Faults in a real ComfyUI server: a prompt interrupted or failing in the middle of an APG run with momentum leaves
nothing behind that changes the next prompt.

The server caches node outputs between prompts, so a later prompt samples with the very MODEL that the APG node made
for the earlier one (the tests check that it did, from the prompt's execution_cached message). Each test saves the
image of a clean run first; then a prompt on the same patched model fails in the middle of sampling; then the clean
prompt, queued again, must re-sample (the failure evicted or never stored its sampler's output) and give the same
image, to the bit.
"""

import asyncio
import copy
import json
import uuid

import aiohttp
import numpy as np

from test_e2e_server import API_WORKFLOWS, load, nodes_of, saved_images, upstream

STEPS = 10
# The reference model is convolutional: 16x16 images cost a quarter of its native 32x32 and carry momentum the same.
SIZE = 16
# Conditioning that fails in the middle of sampling: active from half-way through the schedule (ComfyUI's
# ConditioningSetTimestepRange), with an area that starts outside the image, which ComfyUI's cond batching cannot
# cut out of the latent ("narrow(): length must be non-negative") the first time the conditioning is active.
FAILING_FROM = 0.5
OFF_IMAGE = 512  # pixels
RUN_TIMEOUT_S = 300
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_close=10)  # receiving is bounded per call, by the run's deadline
END_EVENTS = {"execution_success", "execution_error", "execution_interrupted"}


def apg_prompt(seed):
    """The APG half of the reference workflow with one SIZE image, STEPS steps and `seed`; with the ids of its APG
    node (momentum -0.5, the node default) and its KSampler."""
    [path] = [p for p in API_WORKFLOWS if p.stem.startswith("APG vs CFG (reference model)")]
    full = load(path)
    [save] = [i for i, n in nodes_of(full, "SaveImage").items() if n["inputs"]["filename_prefix"].endswith("/apg")]
    prompt = upstream(full, save)
    [apg] = nodes_of(prompt, "AdaptiveProjectedGuidance")
    [sampler] = nodes_of(prompt, "KSampler")
    [conditioning] = nodes_of(prompt, "GuidanceReferenceClassConditioning").values()
    conditioning["inputs"].update(class_name="trouser", images_per_class=1)
    [latent] = nodes_of(prompt, "GuidanceEmptyReferenceLatent").values()
    latent["inputs"].update(width=SIZE, height=SIZE)
    prompt[sampler]["inputs"].update(steps=STEPS, seed=seed)
    prompt[save]["inputs"]["filename_prefix"] = f"faults/seed{seed}"
    return prompt, apg, sampler


def failing_mid_run(prompt, sampler):
    """`prompt` with conditioning added to the sampler's positive input that fails once FAILING_FROM of the schedule
    has run."""
    prompt = copy.deepcopy(prompt)
    positive = prompt[sampler]["inputs"]["positive"]
    prompt["off_image_area"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": positive, "width": 64, "height": 64, "x": OFF_IMAGE, "y": OFF_IMAGE, "strength": 1.0}}
    prompt["late_off_image_area"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {
        "conditioning": ["off_image_area", 0], "start": FAILING_FROM, "end": 1.0}}
    prompt["positive_and_late_area"] = {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": positive, "conditioning_2": ["late_off_image_area", 0]}}
    prompt[sampler]["inputs"]["positive"] = ["positive_and_late_area", 0]
    return prompt


def with_steps(prompt, sampler, steps):
    prompt = copy.deepcopy(prompt)
    prompt[sampler]["inputs"]["steps"] = steps
    return prompt


async def _watch(server, prompt, interrupt):
    client_id = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}", timeout=WS_TIMEOUT) as ws:
            status, body = server.request("/prompt", {"prompt": prompt, "client_id": client_id})
            assert status == 200, f"/prompt refused the graph: {status} {body[:2000]!r}"
            prompt_id = json.loads(body)["prompt_id"]
            progress = []
            while True:
                message = await ws.receive(timeout=max(deadline - loop.time(), 0.0))
                if message.type == aiohttp.WSMsgType.BINARY:  # previews
                    continue
                assert message.type == aiohttp.WSMsgType.TEXT, f"websocket: {message}\n{server.log_tail()}"
                event = json.loads(message.data)
                if event["data"].get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress":
                    if interrupt and not progress:
                        server.request("/interrupt", {"prompt_id": prompt_id})
                    progress.append(event["data"]["value"])
                elif event["type"] in END_EVENTS:
                    return progress, event


def watch(server, prompt, interrupt=False):
    """Run `prompt`, if `interrupt` interrupting it (POST /interrupt, as the UI's cancel button does) at its
    sampler's first progress report; returns the sampler steps reported done and the prompt's final event.

    Only the first report is relied on: every ComfyUI sends it, while which later steps are reported depends on the
    host (0.33 throttles them to one per 0.1 s). The interrupt lands at the sampler's next step, well before the last.
    """
    return asyncio.run(_watch(server, prompt, interrupt))


def cached_nodes(entry):
    [cached] = [data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached"]
    return cached


def assert_resampled_to_the_clean_image(server, entry, apg, sampler, clean):
    """The prompt of `entry` succeeded, sampled again with the patched model it found cached, and saved `clean`."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert apg in cached_nodes(entry) and sampler not in cached_nodes(entry)
    images = saved_images(server, entry)
    assert images.keys() == clean.keys()
    for prefix, image in images.items():
        assert np.array_equal(image, clean[prefix]), prefix


def test_interrupted_apg_run_then_the_same_prompt_gives_the_uninterrupted_image(comfy_server):
    prompt, apg, sampler = apg_prompt(seed=1)
    uninterrupted = saved_images(comfy_server, comfy_server.run_prompt(prompt))
    # one step on the same patched model evicts the sampler's cached output, so that the prompt samples again
    comfy_server.run_prompt(with_steps(prompt, sampler, 1))

    progress, end = watch(comfy_server, prompt, interrupt=True)
    assert end["type"] == "execution_interrupted", end
    assert progress and max(progress) < STEPS, progress

    assert_resampled_to_the_clean_image(comfy_server, comfy_server.run_prompt(prompt), apg, sampler, uninterrupted)


def test_prompt_failing_inside_sampling_leaves_nothing_for_the_next(comfy_server):
    prompt, apg, sampler = apg_prompt(seed=2)
    clean = saved_images(comfy_server, comfy_server.run_prompt(prompt))

    progress, end = watch(comfy_server, failing_mid_run(prompt, sampler))
    assert end["type"] == "execution_error" and end["data"]["node_id"] == sampler, end
    assert "narrow()" in end["data"]["exception_message"], end
    assert progress and max(progress) < STEPS, progress

    assert_resampled_to_the_clean_image(comfy_server, comfy_server.run_prompt(prompt), apg, sampler, clean)
