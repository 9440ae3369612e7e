"""The PAG example workflows (the shipped graphs themselves run in test_e2e_server.py): real-world settings for a
CFG-vs-PAG comparison, and a server run that names a layer the model lacks fails with the layers it has."""

import pytest
from test_e2e_server import API_DIR, WORKFLOWS, load, nodes_of, shrunk, upstream

PAG = "GuidancePerturbedAttention"
# What each PAG workflow must look like: checkpoint, latent node, image size, cfg, images it saves.
PAG_COMPARISONS = {
    "PAG vs CFG (SD1.5)": ("v1-5-pruned-emaonly.safetensors", "EmptyLatentImage", 512, 4.0, ["cfg", "pag"]),
    "PAG and PAG + APG vs CFG (SDXL)": ("sd_xl_base_1.0.safetensors", "EmptyLatentImage", 1024, 4.0,
                                        ["cfg", "pag", "pag_apg"]),
    "PAG vs CFG (SD3)": ("sd3_medium_incl_clips.safetensors", "EmptySD3LatentImage", 1024, 4.5, ["cfg", "pag"]),
}
PAPER_SETTINGS = {"scale": 3.0, "adaptive_scale": 0.0, "layers": "auto", "sigma_start": 10000.0, "sigma_end": 0.0,
                  "batched": True}


def model_chain(prompt, node_id):
    """The class types between a KSampler's model input and the checkpoint loader, nearest first."""
    chain, current = [], prompt[node_id]["inputs"]["model"][0]
    while prompt[current]["class_type"] != "CheckpointLoaderSimple":
        chain.append(prompt[current]["class_type"])
        current = prompt[current]["inputs"]["model"][0]
    return chain


@pytest.mark.parametrize("name", sorted(PAG_COMPARISONS))
def test_pag_comparison_settings(name):
    """CFG vs PAG (and PAG + APG) on the same checkpoint, prompts, latent, seed and sampler settings at the family's
    native resolution; PAG with the paper's settings; the UI twin fixes the seed."""
    ckpt, latent_node, size, cfg, labels = PAG_COMPARISONS[name]
    prompt = load(API_DIR / f"{name}.json")
    [loader] = nodes_of(prompt, "CheckpointLoaderSimple").values()
    assert loader["inputs"]["ckpt_name"] == ckpt
    [latent] = nodes_of(prompt, latent_node).values()
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (size, size)
    for node in nodes_of(prompt, PAG).values():
        assert {k: v for k, v in node["inputs"].items() if k != "model"} == PAPER_SETTINGS
    samplers = nodes_of(prompt, "KSampler")
    shared = [{k: v for k, v in s["inputs"].items() if k != "model"} for s in samplers.values()]
    assert all(s == shared[0] for s in shared) and shared[0]["cfg"] == cfg and shared[0]["denoise"] == 1.0
    saves = {n["inputs"]["filename_prefix"]: n for n in nodes_of(prompt, "SaveImage").values()}
    assert sorted(saves) == [f"{name}/{label}" for label in labels]
    chains = {}
    for prefix, save in saves.items():
        sampler = upstream(prompt, save["inputs"]["images"][0])
        [sampler_id] = [i for i in sampler if prompt[i]["class_type"] == "KSampler"]
        chains[prefix.split("/")[1]] = model_chain(prompt, sampler_id)
    assert chains == {"cfg": [], "pag": [PAG], **({"pag_apg": [PAG, "AdaptiveProjectedGuidance"]}
                                                   if "pag_apg" in labels else {})}
    graph = load(WORKFLOWS / f"{name}.json")
    assert {n["widgets_values"][1] for n in graph["nodes"] if n["type"] == "KSampler"} == {"fixed"}


def test_unknown_layer_fails_naming_the_models_layers(comfy_server):
    """The layer check needs the loaded model, so it runs when the node executes: the run fails with an error that
    names the node, the missing layer and the layers the checkpoint has."""
    prompt = shrunk(load(API_DIR / "PAG vs CFG (SD1.5).json"))
    [pag_id] = nodes_of(prompt, PAG)
    [save_id] = [i for i, n in nodes_of(prompt, "SaveImage").items() if n["inputs"]["filename_prefix"].endswith("/pag")]
    prompt[pag_id]["inputs"]["layers"] = "middle.0, output.30"
    entry = comfy_server.run_prompt(upstream(prompt, save_id))
    assert entry["status"]["status_str"] == "error"
    [error] = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_id"] == pag_id
    message = error["exception_message"]
    assert message.startswith("Perturbed-Attention Guidance (PAG): ") and "output.30" in message and "middle.0.0" in message and "input.1.0" in message
