"""Every bad value a user can type into a node of the pack, sent to a real server: each is refused at /prompt (HTTP
400) under that node and that input only, naming the node by the name the user sees (or, for text in a number
field, with ComfyUI's own conversion error under that input); a mask whose batch fits nothing stops the run naming
the guidance node, its mask input and the batch sizes that fit; and the server runs a good prompt afterwards.

The nodes are the pack's registered nodes: a node added to the pack without a prompt here fails
`test_every_node_of_the_pack_is_covered`. The bad values are derived from each node's schema: for every number widget
text, NaN, inf and a value beyond its range; for every choice a value that is not offered (a missing file where the
choices are files); for every `mask` input a mask of 3 images for a batch of 10.
"""

import functools
import json
import math

import pytest
from comfy_api.latest import io

from test_validation import (APG, APG_INPUTS, ELUCD, ELUCD_INPUTS, GFCG, GFCG_INPUTS, GOOD_TARGETS, PAG, PAG_INPUTS,
                             reference_prompt)

NAN, INF = math.nan, math.inf
MASK_IMAGES, LATENT_BATCH = 3, 10  # the reference prompt's latent: one image per class, ten classes
NOT_OFFERED = "no such choice"
MISSING_FILE = "no_such_file.safetensors"


def with_node(prompt, key, class_type, inputs):
    return prompt | {key: {"class_type": class_type, "inputs": inputs}}


def sampled_by_ksampler(class_type, inputs, **sampler):
    """Reference model → the node (key "4", a model patch) → KSampler → VAE Decode → Save Image."""
    prompt = reference_prompt(class_type, inputs)
    prompt["5"]["inputs"].update(sampler)
    return prompt, "4"


def upstream_of_apg(key):
    """The reference APG prompt, for the node under test at `key` upstream of it (a loader, the conditioning, the
    latent)."""
    return reference_prompt(APG, APG_INPUTS), key


def with_classifier(key):
    """The reference EluCD prompt: reference classifier (8) → Classifier Target Classes (9) → EluCD (4)."""
    return reference_prompt(ELUCD, ELUCD_INPUTS, GOOD_TARGETS), key


def gfcg():
    """Reference model and classifier, Classifier Target Classes (9) → GFCG (4, the reference model's classes) →
    KSampler → VAE Decode → Save Image."""
    return reference_prompt(GFCG, GFCG_INPUTS, GOOD_TARGETS), "4"


def autoguidance():
    """Reference model and its weak checkpoint (11) → Autoguidance (4) → KSampler → VAE Decode → Save Image."""
    prompt = reference_prompt("GuidanceAutoguidance", {"weak_model": ["11", 0]})
    prompt["11"] = {"class_type": "GuidanceReferenceModelLoader",
                    "inputs": {"weights": "fashion_weak_diffusion.safetensors"}}
    return prompt, "4"


def clip_classifier():
    """The EluCD prompt with CLIP Vision Zero-Shot Classifier (8) in place of the reference classifier, on the CLIP
    vision model and text encoder of a checkpoint loaded by unCLIPCheckpointLoader (validated, never run)."""
    prompt, _ = with_classifier("8")
    prompt["11"] = {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}}
    return with_node(prompt, "8", "GuidanceCLIPVisionClassifier", {
        "clip_vision": ["11", 3], "clip": ["11", 1], "class_prompts": "cat: a photo of a cat\ndog: a photo of a dog",
        "logit_scale": 100.0}), "8"


def saliency(key):
    """Saliency Markers From Points (12) → Saliency Map From Markers (13) → APG's mask."""
    prompt = reference_prompt(APG, APG_INPUTS)
    prompt["12"] = {"class_type": "GuidanceSaliencyMarkersFromPoints",
                    "inputs": {"points": "16,16", "width": 32, "height": 32}}
    prompt["13"] = {"class_type": "GuidanceSaliencyMap",
                    "inputs": {"markers": ["12", 0], "radius": 0.25, "softness": 0.05, "background": 0.0}}
    prompt["4"]["inputs"]["mask"] = ["13", 0]
    return prompt, key


def cfgpp(key):
    """Reference model and BasicScheduler (20) → CFG++ Sampler (21) → SamplerCustom (5, cfg 1), or CFG++ DDIM Inversion
    (22) of the empty latent → CFG++ DDIM Sample From Inversion (23); then VAE Decode → Save Image. One output only: a
    prompt with another, good output would be queued for that one."""
    prompt = reference_prompt(APG, APG_INPUTS)
    del prompt["4"]
    conditioning = {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1]}
    prompt["20"] = {"class_type": "BasicScheduler",
                    "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
    if key == "21":
        prompt["21"] = {"class_type": "CFGppSampler", "inputs": {"sampler_name": "ddim", "guidance": 0.6}}
        prompt["5"] = {"class_type": "SamplerCustom", "inputs": conditioning | {
            "add_noise": True, "noise_seed": 1, "cfg": 1.0, "sampler": ["21", 0], "sigmas": ["20", 0],
            "latent_image": ["3", 0]}}
    else:
        del prompt["5"]
        prompt["22"] = {"class_type": "CFGppDDIMInversion", "inputs": conditioning | {
            "latent_image": ["3", 0], "sigmas": ["20", 0], "guidance": 0.6}}
        prompt["23"] = {"class_type": "CFGppDDIMSampleFromInversion", "inputs": conditioning | {
            "inverted": ["22", 0], "sigmas": ["20", 0], "guidance": 0.6}}
        prompt["6"]["inputs"]["samples"] = ["23", 0]
    return prompt, key


def output_node(class_type, inputs, classifier=False):
    """Reference model (and classifier) → the node (key "4"), an output node of its own."""
    prompt = reference_prompt(APG, APG_INPUTS, GOOD_TARGETS if classifier else None)
    for key in ("5", "6", "7", "9"):
        prompt.pop(key, None)
    model = {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0]}
    return with_node(prompt, "4", class_type, model | inputs), "4"


def ppap(key):
    """Reference model and classifier, Classifier Target Classes (9), Load PPAP Experts (10) → PPAP Classifier
    Guidance (4) → KSampler (cfg 1) → VAE Decode → Save Image."""
    prompt = reference_prompt("GuidancePPAP", {"experts": ["10", 0], "targets": ["9", 0], "scale": 7.5, "chunk": 8},
                              GOOD_TARGETS)
    prompt["10"] = {"class_type": "GuidancePPAPLoadExperts",
                    "inputs": {"classifier": ["8", 0], "experts": "fashion_ppap5.safetensors"}}
    prompt["5"]["inputs"]["cfg"] = 1.0
    return prompt, key


def frecas():
    prompt = reference_prompt(APG, APG_INPUTS)
    del prompt["5"]
    prompt["4"] = {"class_type": "GuidanceFreCaSSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "scale_by": 2.0,
        "seed": 0, "steps": "2, 2", "stage_ends": "300, 0", "gamma": 3.0, "cfg": 3.0, "cfg_high": 9.0,
        "attention_fusion": 0.6, "sampler_name": "ddim"}}
    prompt["6"]["inputs"]["samples"] = ["4", 0]
    return prompt, "4"


# Each node of the pack: a prompt in which it takes good values, and the key of the node in that prompt.
PROMPTS = {
    "AdaptiveProjectedGuidance": lambda: sampled_by_ksampler(APG, APG_INPUTS),
    "GuidanceReferenceModelLoader": lambda: upstream_of_apg("1"),
    "GuidanceReferenceClassConditioning": lambda: upstream_of_apg("2"),
    "GuidanceEmptyReferenceLatent": lambda: upstream_of_apg("3"),
    "GuidancePerturbedAttention": lambda: sampled_by_ksampler(PAG, PAG_INPUTS),
    "CFGppSampler": lambda: cfgpp("21"),
    "CFGppDDIMInversion": lambda: cfgpp("22"),
    "CFGppDDIMSampleFromInversion": lambda: cfgpp("23"),
    "GuidanceAdaptiveGuidance": lambda: sampled_by_ksampler(
        "GuidanceAdaptiveGuidance", {"threshold": 0.991, "criterion": "cond_cfg"}),
    # the shipped coefficients are for the reference model with euler, normal, 30 steps
    "GuidanceLinearAG": lambda: sampled_by_ksampler("GuidanceLinearAG", {
        "coefficients": "reference_euler_normal_30steps.safetensors", "threshold": 0.991, "criterion": "cond_cfg"},
        steps=30),
    "GuidanceFitLinearAG": lambda: output_node("GuidanceFitLinearAG", {
        "sampler_name": "euler", "scheduler": "normal", "steps": 2, "cfg": 3.0, "seed": 0, "images": 1,
        "batch_size": 1, "filename": "refusals_linear_ag"}),
    "GuidanceReferenceClassifierLoader": lambda: with_classifier("8"),
    "GuidanceCLIPVisionClassifier": clip_classifier,
    "GuidanceClassifierTargets": lambda: with_classifier("9"),
    "GuidanceEluCD": lambda: with_classifier("4"),
    "GuidanceSaliencyMarkersFromPoints": lambda: saliency("12"),
    "GuidanceSaliencyMap": lambda: saliency("13"),
    # AGD gives the guided prediction itself: the sampler runs at cfg 1
    "GuidanceAGDApply": lambda: sampled_by_ksampler("GuidanceAGDApply", {
        "adapters": "fashion_agd.safetensors", "scale": 4.0, "base_check": "exact weights"}, cfg=1.0),
    "GuidanceAGDTrain": lambda: output_node("GuidanceAGDTrain", {
        "scale_low": 1.0, "scale_high": 12.0, "trajectories": 4, "trajectory_batch": 2, "sampler_name": "euler",
        "scheduler": "normal", "sample_steps": 4, "train_steps": 10, "batch_size": 4, "learning_rate": 1e-4,
        "hidden_dim": 8, "seed": 0, "filename": "refusals_agd"}),
    "GuidanceFreCaSSampler": frecas,
    "GuidancePPAPTrainExperts": lambda: output_node("GuidancePPAPTrainExperts", {
        "classifier": ["8", 0], "vae": ["1", 1], "experts": 3, "rank": 4, "alpha": 8.0, "train_steps": 3,
        "batch_size": 2, "learning_rate": 1e-3, "teacher_temperature": 0.25, "transfer_images": 2,
        "transfer_batch": 2, "sample_steps": 1, "transfer_cfg": 1.0, "seed": 0, "filename": "refusals_ppap"},
        classifier=True),
    "GuidancePPAPLoadExperts": lambda: ppap("10"),
    "GuidancePPAP": lambda: ppap("4"),
    "GuidanceGFCG": gfcg,
    "GuidanceAutoguidance": autoguidance,
}


@functools.cache
def pack_nodes():
    """The pack's registered nodes (the classes ComfyUI runs), by node id."""
    import nodes

    from test_validation import pack_nodes as extension_nodes

    ids = [node.GET_SCHEMA().node_id for node in extension_nodes()]
    return {node_id: nodes.NODE_CLASS_MAPPINGS[node_id] for node_id in ids}


def schema_of(node_id):
    return pack_nodes()[node_id].define_schema()


def is_file_choice(spec):
    return any(str(option).endswith(".safetensors") for option in spec.options)


def beyond(spec):
    """A value just outside the input's range, or None if it has none."""
    step = 1 if isinstance(spec, io.Int.Input) else 1.0
    if spec.max is not None:
        return spec.max + step
    return spec.min - step if spec.min is not None else None


def bad_values(schema, inputs):
    """(kind, input id, value, whose refusal: "pack" or the type ComfyUI fails to convert to) for each widget input
    of `schema` that the prompt does not link."""
    for spec in schema.inputs:
        if isinstance(inputs.get(spec.id), list):
            continue
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            number = "FLOAT" if isinstance(spec, io.Float.Input) else "INT"
            yield "text in a number", spec.id, "abc", number
            # int() refuses NaN and inf: ComfyUI's conversion refuses them for an INT input
            yield "NaN", spec.id, NAN, "pack" if number == "FLOAT" else number
            yield "inf", spec.id, INF, "pack" if number == "FLOAT" else number
            if beyond(spec) is not None:
                yield "out of range", spec.id, beyond(spec), "pack"
        elif isinstance(spec, io.Combo.Input):
            if is_file_choice(spec):
                yield "missing file", spec.id, MISSING_FILE, "pack"
            else:
                yield "bad choice", spec.id, NOT_OFFERED, "pack"


def refusal(server, prompt):
    status, body = server.request("/prompt", {"prompt": prompt})
    return status, json.loads(body)


def assert_refused_under(server, prompt, key, display_name, kind, input_id, value, whose):
    """/prompt answers 400 with errors for node `key` only, each filed under `input_id` only, naming it (and the node,
    where the refusal is the pack's)."""
    status, body = refusal(server, prompt)
    case = f"{display_name}, {kind}: {input_id} = {value!r}"
    assert status == 400, f"{case}: accepted ({status})"
    # no other node has an error: the rest of the prompt is good
    assert set(body["node_errors"]) == {key}, f"{case}: {body['node_errors']}"
    errors = body["node_errors"][key]["errors"]
    assert errors and {e["extra_info"]["input_name"] for e in errors} == {input_id}, f"{case}: {errors}"
    for error in errors:
        if whose == "pack":
            assert error["details"].startswith(f"{input_id} - {display_name}: "), f"{case}: {error}"
            assert f"{input_id}) is " in error["details"] or f"{input_id} is " in error["details"], f"{case}: {error}"
        else:
            assert error["type"] == "invalid_input_type", f"{case}: {error}"
            assert error["message"] == f"Failed to convert an input value to a {whose} value", f"{case}: {error}"
            assert error["details"].startswith(f"{input_id}, "), f"{case}: {error}"


def assert_a_good_prompt_runs(server, seed):
    """The reference APG prompt (a new seed, so that it samples) runs to success."""
    prompt = reference_prompt(APG, APG_INPUTS)
    prompt["5"]["inputs"]["seed"] = seed
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_every_node_of_the_pack_is_covered():
    missing = set(pack_nodes()) - set(PROMPTS)
    assert not missing, f"nodes with no prompt in PROMPTS of {__name__}, so not covered: {sorted(missing)}"
    assert not set(PROMPTS) - set(pack_nodes()), "PROMPTS names nodes the pack does not register"


@pytest.mark.parametrize("node_id", sorted(PROMPTS))
def test_every_bad_value_is_refused_under_its_input(comfy_server, node_id):
    schema = schema_of(node_id)
    prompt, key = PROMPTS[node_id]()
    cases = list(bad_values(schema, prompt[key]["inputs"]))
    assert cases or not any(isinstance(s, (io.Float.Input, io.Int.Input, io.Combo.Input)) for s in schema.inputs)
    for kind, input_id, value, whose in cases:
        bad = json.loads(json.dumps(prompt))
        bad[key]["inputs"][input_id] = value
        assert_refused_under(comfy_server, bad, key, schema.display_name, kind, input_id, value, whose)
    assert_a_good_prompt_runs(comfy_server, seed=sorted(PROMPTS).index(node_id) + 100)


def with_mask_of(prompt, key, images):
    """`prompt` with a mask of `images` images (SolidMask, repeated) at the `mask` input of node `key`."""
    prompt = prompt | {
        "30": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "31": {"class_type": "MaskToImage", "inputs": {"mask": ["30", 0]}},
        "32": {"class_type": "RepeatImageBatch", "inputs": {"image": ["31", 0], "amount": images}},
        "33": {"class_type": "ImageToMask", "inputs": {"image": ["32", 0], "channel": "red"}},
    }
    prompt[key]["inputs"]["mask"] = ["33", 0]
    return prompt


MASKED = sorted(node_id for node_id in PROMPTS
                if any(isinstance(s, io.Mask.Input) and s.id == "mask" for s in schema_of(node_id).inputs))


def test_the_guidance_nodes_with_a_mask_are_found():
    assert len(MASKED) >= 9, MASKED


@pytest.mark.parametrize("node_id", MASKED)
def test_a_mask_that_fits_no_batch_names_the_node_and_the_sizes_that_fit(comfy_server, node_id):
    """The run stops where the mask meets the latent (the sampler), with a message that names the guidance node as
    the user sees it, its mask input, and the batch sizes that fit."""
    schema = schema_of(node_id)
    prompt, key = PROMPTS[node_id]()
    entry = comfy_server.run_prompt(with_mask_of(prompt, key, MASK_IMAGES))
    assert entry["status"]["status_str"] == "error", entry["status"]
    message = next(m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert (f"{schema.display_name}: mask has {MASK_IMAGES} images for a latent batch of {LATENT_BATCH}: give 1 (for "
            f"every image) or {LATENT_BATCH} (one per image)") in message, message
    assert_a_good_prompt_runs(comfy_server, seed=MASKED.index(node_id) + 200)


def test_a_gfcg_class_prompt_without_the_placeholder_is_refused_under_it(comfy_server):
    """GFCG's own rule on a text widget (which the schema-derived bad values leave out): a class prompt with no {} is
    refused at /prompt under class_prompt only, naming the node as the user sees it."""
    prompt, key = gfcg()
    prompt[key]["inputs"]["class_prompt"] = "a photo"
    status, body = refusal(comfy_server, prompt)
    assert status == 400, f"accepted ({status})"
    assert set(body["node_errors"]) == {key}, body["node_errors"]
    errors = body["node_errors"][key]["errors"]
    assert errors and {e["extra_info"]["input_name"] for e in errors} == {"class_prompt"}, errors
    name = schema_of("GuidanceGFCG").display_name
    assert all(e["details"].startswith(f"class_prompt - {name}: class_prompt 'a photo' has no {{}}") for e in errors), \
        errors
