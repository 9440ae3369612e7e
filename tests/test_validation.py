"""Bad values are stopped when a prompt is queued, with a message that names the node, the input and the fix;
and every input and output of every node says what it is (a tooltip).

ComfyUI compares a widget value with its min and max at queue time, but NaN passes every comparison, and a node's
`validate_inputs` takes those checks over (nodes/validation.py). These tests queue real prompts on a real server.
"""

import asyncio
import json
import math

import pytest

from comfyui_guidance.nodes.extension import GuidanceExtension

NAN, INF = math.nan, math.inf
APG = "AdaptiveProjectedGuidance"
PAG = "GuidancePerturbedAttention"
APG_NAME = "Adaptive Projected Guidance (APG)"
PAG_NAME = "Perturbed-Attention Guidance (PAG)"
APG_INPUTS = {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "sigma_start": 10000.0, "sigma_end": 0.0}
PAG_INPUTS = {"scale": 3.0, "adaptive_scale": 0.0, "layers": "auto", "sigma_start": 10000.0, "sigma_end": 0.0,
              "batched": True}
ELUCD = "GuidanceEluCD"
ELUCD_NAME = "EluCD Classifier Guidance"
TARGETS = "GuidanceClassifierTargets"
TARGETS_NAME = "Classifier Target Classes"
ELUCD_INPUTS = {"targets": ["9", 0], "scale": 1.0, "gamma": 0.3, "softplus_beta": 3.0, "joint_temperature": 1.0,
                "margin_temperature_discount": 0.5, "vae": ["1", 1], "chunk": 8}
GFCG = "GuidanceGFCG"
GFCG_NAME = "Gradient-Free Classifier Guidance (GFCG)"
GFCG_INPUTS = {"targets": ["9", 0], "scale": 2.0, "scale_rule": "adaptive", "reference_rule": "most likely competitor",
               "sigma_start": 10000.0, "sigma_end": 0.0, "classes": ["1", 2], "class_prompt": "a photo of a {}",
               "vae": ["1", 1], "chunk": 8}


def reference_prompt(patch_class, patch_inputs, target_inputs=None):
    """Reference model → the patch node → KSampler (2 steps) → VAE Decode → Save Image, in API format; with
    `target_inputs`, also the reference classifier (node 8) and Classifier Target Classes (node 9) for EluCD."""
    classifier = {} if target_inputs is None else {
        "8": {"class_type": "GuidanceReferenceClassifierLoader",
              "inputs": {"weights": "fashion_classifier.safetensors"}},
        "9": {"class_type": TARGETS, "inputs": {"classifier": ["8", 0], **target_inputs}},
    }
    return classifier | {
        "1": {"class_type": "GuidanceReferenceModelLoader", "inputs": {"weights": "fashion_diffusion.safetensors"}},
        "2": {"class_type": "GuidanceReferenceClassConditioning",
              "inputs": {"classes": ["1", 2], "class_name": "all classes", "images_per_class": 1}},
        "3": {"class_type": "GuidanceEmptyReferenceLatent",
              "inputs": {"width": 32, "height": 32, "batch_size": ["2", 2]}},
        "4": {"class_type": patch_class, "inputs": {"model": ["1", 0], **patch_inputs}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "validation"}},
    }


BAD_VALUES = [
    # node, its display name, inputs changed, what the message must say
    (APG, APG_NAME, {"eta": NAN}, "eta is nan: enter a finite number between 0 and 1 (default 0)"),
    (APG, APG_NAME, {"momentum": NAN}, "momentum is nan"),
    (APG, APG_NAME, {"norm_threshold": INF}, "norm_threshold is inf"),
    (APG, APG_NAME, {"sigma_start": NAN}, "sigma_start is nan"),
    (APG, APG_NAME, {"sigma_end": -INF}, "sigma_end is -inf"),
    (APG, APG_NAME, {"eta": 2.0}, "eta is 2: enter a number between 0 and 1"),
    (APG, APG_NAME, {"sigma_start": 1.0, "sigma_end": 2.0}, "set sigma_start >= sigma_end"),
    (APG, APG_NAME, {"threshold_mode": "relative"},
     "threshold_mode is 'relative': choose one of absolute, per-element"),
    (APG, APG_NAME, {"video_mode": "frames"}, "video_mode is 'frames': choose one of clip, frame"),
    (APG, APG_NAME, {"threshold_mode": "per_element"}, "threshold_mode is 'per_element'"),
    (PAG, PAG_NAME, {"scale": NAN}, "scale is nan"),
    (PAG, PAG_NAME, {"adaptive_scale": INF}, "adaptive_scale is inf"),
    (PAG, PAG_NAME, {"sigma_start": 0.5, "sigma_end": 3.0}, "set sigma_start >= sigma_end"),
    (PAG, PAG_NAME, {"layers": "midle.0, output.1"}, "layers has midle.0, which is no layer name"),
    (ELUCD, ELUCD_NAME, {"scale": NAN}, "scale is nan"),
    (ELUCD, ELUCD_NAME, {"gamma": -1.0}, "gamma is -1: enter a number between 0 and 10"),
    (ELUCD, ELUCD_NAME, {"softplus_beta": INF}, "softplus_beta is inf"),
    (ELUCD, ELUCD_NAME, {"margin_temperature_discount": 0.0}, "margin_temperature_discount is 0"),
    (GFCG, GFCG_NAME, {"scale": NAN}, "scale is nan"),
    (GFCG, GFCG_NAME, {"scale": -1.0}, "scale is -1: enter a number between 0 and 100"),
    (GFCG, GFCG_NAME, {"sigma_end": INF}, "sigma_end is inf"),
    (GFCG, GFCG_NAME, {"sigma_start": 1.0, "sigma_end": 2.0}, "set sigma_start >= sigma_end"),
    (GFCG, GFCG_NAME, {"scale_rule": "linear"}, "scale_rule is 'linear': choose one of adaptive, constant"),
    (GFCG, GFCG_NAME, {"reference_rule": "best"}, "reference_rule is 'best'"),
    (GFCG, GFCG_NAME, {"class_prompt": "a photo"}, "class_prompt 'a photo' has no {}"),
    (GFCG, GFCG_NAME, {"chunk": 0}, "chunk is 0"),
]
DEFAULT_INPUTS = {APG: APG_INPUTS, PAG: PAG_INPUTS, ELUCD: ELUCD_INPUTS, GFCG: GFCG_INPUTS}
GOOD_TARGETS = {"classes": "all classes", "images_per_class": 1}
BAD_TARGETS = [
    ({"classes": "sneaker,,bag"}, "has an empty entry"),
    ({"classes": "-1"}, "classes has -1: class numbers start at 0"),
    ({"images_per_class": 0}, "images_per_class is 0"),
]


def prompt_for(node, changes):
    return reference_prompt(node, DEFAULT_INPUTS[node] | changes, GOOD_TARGETS if node in (ELUCD, GFCG) else None)


# The nodes' rules on two inputs: a problem either input causes is filed under both.
PAIRED = [{"sigma_start", "sigma_end"}, {"scale_low", "scale_high"}, {"steps", "stage_ends"},
          {"train_steps", "experts"}]


def assert_refused_at_queue_time(comfy_server, prompt, name, changes, message):
    """/prompt answers 400 before anything runs; every error of the patch node (id 4) names the node and the fix, and
    the errors are filed under the changed inputs (and, for a rule on two inputs, its other input) only."""
    status, body = comfy_server.request("/prompt", {"prompt": prompt})
    assert status == 400, body[:500]
    errors = json.loads(body)["node_errors"]["4"]["errors"]
    details = {e["details"] for e in errors}
    assert all(f"{name}: " in d and message in d for d in details), details
    names = {e["extra_info"]["input_name"] for e in errors}
    assert set(changes) <= names <= set(changes).union(*(pair for pair in PAIRED if pair & set(changes))), names


@pytest.mark.parametrize("node,name,changes,message", BAD_VALUES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, _, c, _ in BAD_VALUES])
def test_bad_value_is_refused_at_queue_time(comfy_server, node, name, changes, message):
    assert_refused_at_queue_time(comfy_server, prompt_for(node, changes), name, changes, message)


@pytest.mark.parametrize("changes,message", BAD_TARGETS, ids=[str(c) for c, _ in BAD_TARGETS])
def test_bad_target_classes_are_refused_at_queue_time(comfy_server, changes, message):
    prompt = reference_prompt(ELUCD, ELUCD_INPUTS, GOOD_TARGETS | changes)
    status, body = comfy_server.request("/prompt", {"prompt": prompt})
    assert status == 400, body[:500]
    details = {e["details"] for e in json.loads(body)["node_errors"]["9"]["errors"]}
    assert all(f"{TARGETS_NAME}: " in d and message in d for d in details), details


def test_unknown_class_name_stops_the_run_naming_the_classes(comfy_server):
    """A class name the classifier lacks can only be checked against the loaded classifier: the run stops with the
    node's name and the classifier's classes."""
    entry = comfy_server.run_prompt(reference_prompt(ELUCD, ELUCD_INPUTS, GOOD_TARGETS | {"classes": "sneakers"}))
    assert entry["status"]["status_str"] == "error"
    message = next(m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert message.startswith(f"{TARGETS_NAME}: ") and "no class 'sneakers'" in message and "sneaker, bag" in message


def test_good_values_still_run(comfy_server):
    """The same prompts with good values run, so the checks refuse only what is wrong."""
    for node in (APG, PAG):
        entry = comfy_server.run_prompt(reference_prompt(node, DEFAULT_INPUTS[node] | {"sigma_start": 5.0,
                                                                                       "sigma_end": 5.0}))
        assert entry["status"]["status_str"] == "success"
    entry = comfy_server.run_prompt(prompt_for(ELUCD, {"scale": 0.0, "softplus_beta": 0.0, "gamma": 0.0}))
    assert entry["status"]["status_str"] == "success"
    entry = comfy_server.run_prompt(prompt_for(GFCG, {}))
    assert entry["status"]["status_str"] == "success"


def test_autoguidance_and_gfcg_run_with_the_weak_checkpoint(comfy_server):
    """Autoguidance takes the reference model's weak checkpoint from a second loader, GFCG goes after it."""
    prompt = prompt_for(GFCG, {"model": ["10", 0]})
    prompt["10"] = {"class_type": "GuidanceAutoguidance", "inputs": {"model": ["1", 0], "weak_model": ["11", 0]}}
    prompt["11"] = {"class_type": "GuidanceReferenceModelLoader",
                    "inputs": {"weights": "fashion_weak_diffusion.safetensors"}}
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_apg_prompts_with_and_without_the_mode_inputs_run(comfy_server):
    """An API prompt from before threshold_mode and video_mode (neither input present) still validates and runs, APG
    acting at every step; so does one that sets them."""
    assert "threshold_mode" not in APG_INPUTS and "video_mode" not in APG_INPUTS
    for changes in ({}, {"threshold_mode": "per-element", "video_mode": "frame"}):
        entry = comfy_server.run_prompt(reference_prompt(APG, APG_INPUTS | changes))
        assert entry["status"]["status_str"] == "success", entry["status"]


# Adapter guidance distillation: Apply (a model patch, before the KSampler) and Train (an output node of its own) -----

AGD_APPLY, AGD_APPLY_NAME = "GuidanceAGDApply", "Adapter Guidance Distillation (AGD)"
AGD_TRAIN, AGD_TRAIN_NAME = "GuidanceAGDTrain", "Train AGD Adapters"
AGD_FILE = "validation_agd.safetensors"
AGD_APPLY_INPUTS = {"adapters": AGD_FILE, "scale": 4.0, "base_check": "exact weights"}
AGD_TRAIN_INPUTS = {"scale_low": 1.0, "scale_high": 12.0, "trajectories": 4, "trajectory_batch": 2,
                    "sampler_name": "euler", "scheduler": "normal", "sample_steps": 4, "train_steps": 10,
                    "batch_size": 4, "learning_rate": 1e-4, "hidden_dim": 8, "seed": 0, "filename": "validation_agd"}
AGD_BAD_VALUES = [
    (AGD_APPLY, AGD_APPLY_NAME, {"scale": NAN}, "scale is nan: enter a finite number between 1 and 100 (default 4)"),
    (AGD_APPLY, AGD_APPLY_NAME, {"scale": INF}, "scale is inf"),
    (AGD_APPLY, AGD_APPLY_NAME, {"scale": 0.5}, "scale is 0.5: enter a number between 1 and 100"),
    (AGD_APPLY, AGD_APPLY_NAME, {"base_check": "any weights"},
     "base_check is 'any weights': choose one of exact weights, same architecture"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"scale_low": NAN}, "scale_low is nan"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"scale_high": INF}, "scale_high is inf"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"learning_rate": NAN}, "learning_rate is nan"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"scale_low": 0.5}, "scale_low is 0.5: enter a number between 1 and 100"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"learning_rate": 2.0}, "learning_rate is 2: enter a number between 1e-07 and 1"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"trajectories": 0}, "trajectories is 0: enter a number between 1 and"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"scale_low": 8.0, "scale_high": 4.0}, "scale_low (8) is above scale_high (4)"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"filename": "runs/adapters"},
     "filename is 'runs/adapters': give a plain file name, no folders"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"filename": "../adapters"}, "give a plain file name, no folders"),
    (AGD_TRAIN, AGD_TRAIN_NAME, {"filename": " "}, "give a plain file name, no folders"),
]


def agd_train_prompt(inputs):
    """Reference model → Train AGD Adapters (node 4, an output node), in API format."""
    prompt = reference_prompt(APG, APG_INPUTS)
    for node in ("5", "6", "7"):
        del prompt[node]
    prompt["4"] = {"class_type": AGD_TRAIN, "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                        "latent_image": ["3", 0], **inputs}}
    return prompt


@pytest.fixture(scope="module")
def agd_adapter_file(comfy, comfy_server):
    """Adapters for the reference model, in the server's models/agd_adapters, where Apply AGD lists them."""
    from comfyui_guidance.guiders.agd import AdapterSpec, save_adapters
    from comfyui_guidance.nodes.agd_patch import FOLDER, new_adapters

    loader = comfy.NODE_CLASS_MAPPINGS["GuidanceReferenceModelLoader"]
    model = loader.execute(weights="fashion_diffusion.safetensors").result[0]
    folder = comfy_server.base / "models" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_adapters(new_adapters(model, AdapterSpec(hidden_dim=8), 0), str(folder / AGD_FILE))
    return AGD_FILE


def agd_prompt_for(node, changes):
    if node == AGD_TRAIN:
        return agd_train_prompt(AGD_TRAIN_INPUTS | changes)
    return reference_prompt(AGD_APPLY, AGD_APPLY_INPUTS | changes)


@pytest.mark.parametrize("node,name,changes,message", AGD_BAD_VALUES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, _, c, _ in AGD_BAD_VALUES])
def test_agd_bad_value_is_refused_at_queue_time(comfy_server, agd_adapter_file, node, name, changes, message):
    assert_refused_at_queue_time(comfy_server, agd_prompt_for(node, changes), name, changes, message)


def test_agd_good_values_run_and_cfg_is_checked_when_sampling(comfy_server, agd_adapter_file):
    """The same Apply AGD prompt passes the queue-time checks; its KSampler at cfg 3 stops the run naming the node
    and the fix, and at cfg 1 it runs (fresh adapters: the reference model's own conditional images)."""
    prompt = agd_prompt_for(AGD_APPLY, {})
    entry = comfy_server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "error"
    message = next(m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert message.startswith(f"{AGD_APPLY_NAME}: ") and "cfg is 3" in message and "Set cfg to 1.0" in message
    prompt["5"]["inputs"]["cfg"] = 1.0
    assert comfy_server.run_prompt(prompt)["status"]["status_str"] == "success"


def pack_nodes():
    return asyncio.run(GuidanceExtension().get_node_list())


@pytest.mark.parametrize("node", pack_nodes(), ids=lambda node: node.__name__)
def test_every_input_and_output_has_a_tooltip(node):
    schema = node.GET_SCHEMA()
    assert schema.description
    for port in [*schema.inputs, *schema.outputs]:
        assert port.tooltip and len(port.tooltip) > 10, f"{schema.node_id}: {port.id or port.display_name}"


# FreCaS Sampler: a sampler node whose plan comes as two strings -----------------------------------------------------

FRECAS, FRECAS_NAME = "GuidanceFreCaSSampler", "FreCaS Sampler"
FRECAS_INPUTS = {"scale_by": 2.0, "seed": 0, "steps": "2, 2", "stage_ends": "300, 0", "gamma": 3.0, "cfg": 3.0,
                 "cfg_high": 9.0, "attention_fusion": 0.6, "sampler_name": "ddim"}
FRECAS_BAD_VALUES = [
    ({"steps": "2, two"}, "steps must be whole numbers separated by commas, like '40, 10'; got '2, two'"),
    ({"steps": "2.5, 2"}, "steps must be whole numbers"),
    ({"stage_ends": ""}, "stage_ends is empty"),
    ({"steps": "2, 2, 2"}, "steps gives 3 stages and stage_ends 2"),
    ({"steps": "4", "stage_ends": "0"}, "at least two stages"),
    ({"stage_ends": "300, 100"}, "the last stage must end at timestep 0"),
    ({"steps": "2, 0"}, "every stage needs at least one step"),
    ({"stage_ends": "100, 300, 0", "steps": "2, 2, 2"}, "stage_ends must not rise from stage to stage"),
    ({"gamma": NAN}, "gamma is nan"),
    ({"cfg": NAN}, "cfg is nan"),
    ({"cfg_high": INF}, "cfg_high is inf"),
    ({"attention_fusion": NAN}, "attention_fusion is nan"),
    ({"attention_fusion": 1.5}, "attention_fusion is 1.5: enter a number between 0 and 1"),
    ({"scale_by": NAN}, "scale_by is nan"),
    ({"sampler_name": "no_such_sampler"}, "sampler_name is 'no_such_sampler'"),
]


def frecas_prompt(changes):
    """Reference model → FreCaS Sampler (node 4) → VAE Decode → Save Image, in API format."""
    prompt = reference_prompt(APG, APG_INPUTS)
    del prompt["5"]
    prompt["4"] = {"class_type": FRECAS, "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                     "latent_image": ["3", 0], **FRECAS_INPUTS, **changes}}
    prompt["6"]["inputs"]["samples"] = ["4", 0]
    return prompt


@pytest.mark.parametrize("changes,message", FRECAS_BAD_VALUES,
                         ids=["-".join(f"{k}={v}" for k, v in c.items()) for c, _ in FRECAS_BAD_VALUES])
def test_frecas_bad_value_is_refused_at_queue_time(comfy_server, changes, message):
    assert_refused_at_queue_time(comfy_server, frecas_prompt(changes), FRECAS_NAME, changes, message)


def test_frecas_good_values_run(comfy_server):
    """The same prompt with good values runs (and the official SD2.1 2048 plan's equal stage ends pass)."""
    for changes in ({}, {"steps": "2, 1, 1", "stage_ends": "300, 300, 0", "attention_fusion": 0.0}):
        entry = comfy_server.run_prompt(frecas_prompt(changes))
        assert entry["status"]["status_str"] == "success", entry["status"]


# PPAP: Train PPAP Experts (an output node), Load PPAP Experts (a file list) and PPAP Classifier Guidance (a model
# patch on the loaded experts and Classifier Target Classes) --------------------------------------------------------

PPAP, PPAP_NAME = "GuidancePPAP", "PPAP Classifier Guidance"
PPAP_TRAIN, PPAP_TRAIN_NAME = "GuidancePPAPTrainExperts", "Train PPAP Experts"
PPAP_LOAD = "GuidancePPAPLoadExperts"
PPAP_FILE = "validation_ppap.safetensors"
PPAP_INPUTS = {"experts": ["10", 0], "targets": ["9", 0], "scale": 7.5, "chunk": 8}
PPAP_TRAIN_INPUTS = {"experts": 3, "rank": 4, "alpha": 8.0, "train_steps": 3, "batch_size": 2, "learning_rate": 1e-3,
                     "teacher_temperature": 0.25, "transfer_images": 2, "transfer_batch": 2, "sample_steps": 1,
                     "transfer_cfg": 1.0, "seed": 0, "filename": "validation_ppap_trained"}
PPAP_BAD_VALUES = [
    (PPAP, PPAP_NAME, {"scale": NAN}, "scale is nan: enter a finite number between 0 and 1000 (default 7.5)"),
    (PPAP, PPAP_NAME, {"scale": INF}, "scale is inf"),
    (PPAP, PPAP_NAME, {"scale": -1.0}, "scale is -1: enter a number between 0 and 1000"),
    (PPAP, PPAP_NAME, {"scale": 2000.0}, "scale is 2000: enter a number between 0 and 1000"),
    (PPAP, PPAP_NAME, {"chunk": 0}, "chunk is 0: enter a number between 1 and 4096"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"train_steps": 2}, "train_steps (2) is below experts (3): every expert needs at "
     "least one step"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"experts": 0}, "experts is 0: enter a number between 1 and 50"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"experts": 51}, "experts is 51: enter a number between 1 and 50"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"rank": 0}, "rank is 0: enter a number between 1 and 1024"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"alpha": NAN}, "alpha is nan"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"alpha": 0.0}, "alpha is 0: enter a number between 0.01 and 1024"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"learning_rate": NAN}, "learning_rate is nan"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"learning_rate": 2.0}, "learning_rate is 2: enter a number between 1e-07 and 1"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"teacher_temperature": INF}, "teacher_temperature is inf"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"teacher_temperature": 0.0}, "teacher_temperature is 0: enter a number between "
     "0.01 and 10"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"batch_size": 0}, "batch_size is 0: enter a number between 1 and 4096"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"transfer_images": 0}, "transfer_images is 0: enter a number between 1 and"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"transfer_batch": 0}, "transfer_batch is 0: enter a number between 1 and 4096"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"sample_steps": 0}, "sample_steps is 0: enter a number between 1 and 1000"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"transfer_cfg": NAN}, "transfer_cfg is nan"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"transfer_cfg": 0.5}, "transfer_cfg is 0.5: enter a number between 1 and 100"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"filename": "runs/experts"},
     "filename is 'runs/experts': give a plain file name, no folders"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"filename": "../experts"}, "give a plain file name, no folders"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"filename": " "}, "give a plain file name, no folders"),
    (PPAP_TRAIN, PPAP_TRAIN_NAME, {"filename": ".hidden"}, "give a plain file name, no folders"),
]


def ppap_prompt(changes):
    """Reference model, reference classifier (8), Classifier Target Classes (9), Load PPAP Experts (10) → PPAP
    Classifier Guidance (node 4) → KSampler (2 steps, cfg 1, the empty class) → VAE Decode → Save Image."""
    prompt = reference_prompt(PPAP, PPAP_INPUTS | changes, GOOD_TARGETS)
    prompt["10"] = {"class_type": PPAP_LOAD, "inputs": {"classifier": ["8", 0], "experts": PPAP_FILE}}
    prompt["5"]["inputs"].update(cfg=1.0, positive=["2", 1])
    return prompt


def ppap_train_prompt(changes):
    """Reference model and classifier → Train PPAP Experts (node 4, an output node), the empty class as the transfer
    prompt, in API format."""
    prompt = reference_prompt(APG, APG_INPUTS, GOOD_TARGETS)
    for node in ("5", "6", "7", "9"):
        del prompt[node]
    prompt["4"] = {"class_type": PPAP_TRAIN, "inputs": {
        "model": ["1", 0], "classifier": ["8", 0], "positive": ["2", 1], "negative": ["2", 1],
        "latent_image": ["3", 0], "vae": ["1", 1], **PPAP_TRAIN_INPUTS, **changes}}
    return prompt


@pytest.fixture(scope="module")
def ppap_expert_file(comfy, comfy_server):
    """Two fresh experts (the backbone itself) of the reference classifier for the reference model, in the server's
    models/ppap_experts, where Load PPAP Experts lists them."""
    from comfyui_guidance.guiders.ppap import add_adapters, expert_state, network_sha256
    from comfyui_guidance.nodes.adaptive_patch import model_fingerprint
    from comfyui_guidance.nodes.classifier_patch import reference_classifier
    from comfyui_guidance.nodes.ppap_patch import FOLDER, PPAPExperts, input_map, noise_schedule

    loader = comfy.NODE_CLASS_MAPPINGS["GuidanceReferenceModelLoader"]
    model, vae, _ = loader.execute(weights="fashion_diffusion.safetensors").result
    classifier = reference_classifier()
    space = input_map(model, classifier, vae, PPAP_NAME)
    network = add_adapters(classifier.network, 4, 8.0)
    info = {"backbone_sha256": network_sha256(classifier.network), "backbone_name": classifier.name,
            "noise_schedule": noise_schedule(model), "model_fingerprint": model_fingerprint(model)}
    folder = comfy_server.base / "models" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    PPAPExperts(classifier, [expert_state(network) for _ in range(2)], 4, 8.0, space, info).save(str(folder / PPAP_FILE))
    yield PPAP_FILE
    (folder / PPAP_FILE).unlink(missing_ok=True)


def ppap_prompt_for(node, changes):
    return ppap_train_prompt(changes) if node == PPAP_TRAIN else ppap_prompt(changes)


@pytest.mark.parametrize("node,name,changes,message", PPAP_BAD_VALUES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, _, c, _ in PPAP_BAD_VALUES])
def test_ppap_bad_value_is_refused_at_queue_time(comfy_server, ppap_expert_file, node, name, changes, message):
    assert_refused_at_queue_time(comfy_server, ppap_prompt_for(node, changes), name, changes, message)


def test_ppap_unknown_expert_file_is_refused_at_queue_time(comfy_server, ppap_expert_file):
    """Load PPAP Experts lists the files of models/ppap_experts; another name is refused when queued, naming the node,
    the input and the files there (ComfyUI 0.3.75 checks no combo of a schema node itself: the node's
    validate_inputs must)."""
    prompt = ppap_prompt({})
    prompt["10"]["inputs"]["experts"] = "no_such_experts.safetensors"
    status, body = comfy_server.request("/prompt", {"prompt": prompt})
    assert status == 400, body[:500]
    errors = json.loads(body)["node_errors"]["10"]["errors"]
    assert "experts" in {e["extra_info"]["input_name"] for e in errors}
    message = "Load PPAP Experts: experts is 'no_such_experts.safetensors': choose one of "
    assert all(message in e["details"] and PPAP_FILE in e["details"] for e in errors), errors


def test_ppap_good_values_run(comfy_server, ppap_expert_file):
    """The same prompts with good values run: PPAP on the listed experts (and at scale 0), and Train PPAP Experts,
    at the fewest steps, saves its file to the server's models/ppap_experts (removed again) and its working folder
    is gone."""
    for changes in ({}, {"scale": 0.0, "chunk": 1}):
        entry = comfy_server.run_prompt(ppap_prompt(changes))
        assert entry["status"]["status_str"] == "success", entry["status"]
    trained = comfy_server.base / "models" / "ppap_experts" / f"{PPAP_TRAIN_INPUTS['filename']}.safetensors"
    try:
        entry = comfy_server.run_prompt(ppap_train_prompt({}))
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert trained.is_file() and not trained.with_suffix(".training").exists()
    finally:
        trained.unlink(missing_ok=True)
