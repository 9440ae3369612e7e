"""The AGD workflows through a real ComfyUI server, as their groups and notes tell a user to use them: the shipped
adapters make CFG's images with one model pass per step, and the file the training workflow saves is the one its
second part then picks (after a refresh of the node list), with the training cached on the second run."""

import copy

import numpy as np
from test_e2e_server import API_DIR, load, nodes_of, saved_images, shrunk

COMPARISON = "AGD vs CFG (reference model)"
TRAINING = "Train AGD adapters (reference model)"
APPLY, TRAIN = "GuidanceAGDApply", "GuidanceAGDTrain"


def test_shipped_adapters_give_cfg_images(comfy_server):
    """On the same seed, AGD's images (Apply AGD at scale 4, KSampler at cfg 1) are much nearer CFG's at cfg 4 than
    the conditional pass alone is (KSampler at cfg 1, no adapters): the adapters do CFG's work."""
    prompt = shrunk(load(API_DIR / f"{COMPARISON}.json"))
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = saved_images(comfy_server, entry)
    agd, cfg, cond = (images[f"{COMPARISON}/{name}"] for name in ("agd", "cfg", "cond"))
    agd_error, cond_error = np.abs(agd - cfg).mean(), np.abs(cond - cfg).mean()
    assert agd_error < 0.5 * cond_error, (agd_error, cond_error)


def test_trained_adapters_are_listed_and_sampled(comfy_server):
    """The training workflow saves its file in models/agd_adapters/, which Apply AGD then lists; the workflow queued
    again with that file picked samples with it and leaves the training cached (the file is not written again)."""
    prompt = shrunk(load(API_DIR / f"{TRAINING}.json"))
    for sampler in nodes_of(prompt, "KSampler").values():
        sampler["inputs"]["steps"] = 1  # the images only show that the file samples
    [train] = nodes_of(prompt, TRAIN).values()
    train["inputs"]["filename"] = "agd_server_test"  # not the shipped workflow's, which other tests train
    adapters = comfy_server.base / "models" / "agd_adapters" / "agd_server_test.safetensors"
    try:
        entry = comfy_server.run_prompt(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        written = adapters.stat().st_mtime_ns
        kind, options = comfy_server.get(f"/object_info/{APPLY}")[APPLY]["input"]["required"]["adapters"]
        assert kind == "COMBO" and {"fashion_agd.safetensors", adapters.name} <= set(options["options"])
        picked = copy.deepcopy(prompt)
        [apply] = nodes_of(picked, APPLY).values()
        apply["inputs"]["adapters"] = adapters.name
        entry = comfy_server.run_prompt(picked)
        assert entry["status"]["status_str"] == "success", entry["status"]
        [batch] = saved_images(comfy_server, entry).values()
        assert batch.shape == (10, 32, 32, 3) and np.isfinite(batch).all()
        assert adapters.stat().st_mtime_ns == written
    finally:
        adapters.unlink(missing_ok=True)
