"""The CFG++ example workflows (the shipped graphs themselves run in test_e2e_server.py): real-world settings of the
text-to-image comparison and of the inversion editing graph, and the server's checks of the CFG++ inputs."""

import copy
import json
import math

import pytest

from test_e2e_server import API_DIR, WORKFLOWS, load, nodes_of, shrunk, upstream

from comfyui_guidance.guiders.cfgpp import DEFAULT_GUIDANCE

SD15 = "v1-5-pruned-emaonly.safetensors"
SCHEDULE = {"scheduler": "ddim_uniform", "steps": 50, "denoise": 1.0}  # DDIM's timesteps, the paper's 50 steps


def by_id(prompt, node_ref):
    return prompt[node_ref[0]]


def check_common(name):
    """SD1.5 at 512 px, one shared DDIM schedule and fixed noise seed; returns the API prompt."""
    prompt = load(API_DIR / f"{name}.json")
    [loader] = nodes_of(prompt, "CheckpointLoaderSimple").values()
    assert loader["inputs"]["ckpt_name"] == SD15
    [latent] = nodes_of(prompt, "EmptyLatentImage").values()
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (512, 512)
    [schedule] = nodes_of(prompt, "BasicScheduler").values()
    assert {k: v for k, v in schedule["inputs"].items() if k != "model"} == SCHEDULE
    graph = load(WORKFLOWS / f"{name}.json")
    assert {n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "RandomNoise"} == {"fixed"}
    for node in nodes_of(prompt, "CFGppSampler").values():
        assert node["inputs"] == {"sampler_name": "ddim", "guidance": DEFAULT_GUIDANCE}
    return prompt


def test_text_to_image_comparison_settings():
    """CFG at the paper's 7.5 and CFG++ at its default lambda (cfg 1) from the same noise, schedule and prompts."""
    prompt = check_common("CFG++ vs CFG (SD1.5)")
    saves = {n["inputs"]["filename_prefix"]: n for n in nodes_of(prompt, "SaveImage").values()}
    assert sorted(saves) == ["CFG++ vs CFG (SD1.5)/cfg", "CFG++ vs CFG (SD1.5)/cfgpp"]
    runs = {}
    for prefix, save in saves.items():
        part = upstream(prompt, save["inputs"]["images"][0])
        [sampler] = [n["inputs"] for n in part.values() if n["class_type"] == "SamplerCustomAdvanced"]
        runs[prefix.split("/")[1]] = sampler
    cfg, plus = runs["cfg"], runs["cfgpp"]
    assert {k: cfg[k] for k in ("noise", "sigmas", "latent_image")} == {k: plus[k] for k in ("noise", "sigmas",
                                                                                            "latent_image")}
    cfg_guider, plus_guider = by_id(prompt, cfg["guider"])["inputs"], by_id(prompt, plus["guider"])["inputs"]
    assert (cfg_guider["cfg"], plus_guider["cfg"]) == (7.5, 1.0)
    assert {k: v for k, v in cfg_guider.items() if k != "cfg"} == {k: v for k, v in plus_guider.items() if k != "cfg"}
    assert by_id(prompt, cfg["sampler"])["class_type"] == "KSamplerSelect"
    assert by_id(prompt, cfg["sampler"])["inputs"] == {"sampler_name": "ddim"}
    assert by_id(prompt, plus["sampler"])["class_type"] == "CFGppSampler"


def test_editing_graph_settings():
    """Source image by CFG++, decoded and re-encoded as a loaded image would be, inverted with the source prompt and
    sampled back with the target prompt, all on one schedule and lambda."""
    prompt = check_common("CFG++ image editing (SD1.5)")
    [inversion] = nodes_of(prompt, "CFGppDDIMInversion").values()
    [back] = nodes_of(prompt, "CFGppDDIMSampleFromInversion").values()
    [source_run] = nodes_of(prompt, "SamplerCustomAdvanced").values()
    guider = by_id(prompt, source_run["inputs"]["guider"])["inputs"]
    assert guider["cfg"] == 1.0 and inversion["inputs"]["positive"] == guider["positive"]
    assert back["inputs"]["negative"] == inversion["inputs"]["negative"] == guider["negative"]
    assert back["inputs"]["inverted"][0] in {i for i, n in prompt.items() if n["class_type"] == "CFGppDDIMInversion"}
    assert inversion["inputs"]["sigmas"] == back["inputs"]["sigmas"] == source_run["inputs"]["sigmas"]
    assert inversion["inputs"]["guidance"] == back["inputs"]["guidance"] == DEFAULT_GUIDANCE
    encode = by_id(prompt, inversion["inputs"]["latent_image"])
    assert encode["class_type"] == "VAEEncode"
    assert by_id(prompt, encode["inputs"]["pixels"])["class_type"] == "VAEDecode"
    prompts = (inversion["inputs"]["positive"], back["inputs"]["positive"])
    assert len({by_id(prompt, ref)["inputs"]["text"] for ref in prompts}) == 2
    saves = sorted(n["inputs"]["filename_prefix"] for n in nodes_of(prompt, "SaveImage").values())
    assert saves == ["CFG++ image editing (SD1.5)/edit", "CFG++ image editing (SD1.5)/source"]


@pytest.mark.parametrize("changes, problem", [
    ({"guidance": 1.5}, "lambda (guidance) is 1.5: enter a number between 0 and 1"),
    ({"guidance": math.nan}, "lambda (guidance) is nan: enter a finite number between 0 and 1"),
    ({"sampler_name": "dpmpp_3m_sde"}, "sampler_name is 'dpmpp_3m_sde': choose one of ddim, "),
], ids=["lambda_1.5", "lambda_nan", "unknown_sampler"])
def test_bad_cfgpp_value_is_refused(comfy_server, changes, problem):
    """A lambda outside [0, 1] (the paper's range), NaN or a sampler not in the list is refused by /prompt (400)
    with a node error that names the node and the input."""
    prompt = shrunk(load(API_DIR / "CFG++ vs CFG (SD1.5).json"))
    [sampler_id] = nodes_of(prompt, "CFGppSampler")
    [save_id] = [i for i, n in nodes_of(prompt, "SaveImage").items()
                 if n["inputs"]["filename_prefix"].endswith("/cfgpp")]
    bad = copy.deepcopy(prompt)
    bad[sampler_id]["inputs"].update(changes)
    status, body = comfy_server.request("/prompt", {"prompt": upstream(bad, save_id)})
    assert status == 400
    errors = json.loads(body)["node_errors"][sampler_id]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    assert f"CFG++ Sampler: {problem}" in errors[0]["details"]
