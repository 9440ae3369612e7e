"""Run state (nodes/run_state.py) lives exactly as long as one sampling run of a patched model.

ComfyUI runs one patched model many times: the server caches a guidance node's output and hands the same MODEL to
every later prompt, and a two-stage graph (KSamplerAdvanced with end_at_step, then start_at_step) runs it twice in one
prompt. APG forgets its momentum when sigma rises, which hides shared state whenever the next run starts from the top
of the schedule; the tests here start the next run below the last sigma of the previous one, where only state that
really belongs to one run gives the fresh model's result.
"""

import gc
import weakref

import comfy.model_management
import nodes
import pytest
import torch

import slim_models
import test_pag_sampling as pag_sampling
from comfyui_guidance.guiders.apg import APGConfig
from comfyui_guidance.guiders.pag import PAGConfig
from comfyui_guidance.nodes.apg_patch import apply_apg
from comfyui_guidance.nodes.pag_patch import apply_pag
from comfyui_guidance.nodes.run_state import run_state
from test_pag_sampling import one_torch_thread  # noqa: F401 (autouse fixture: one torch thread for this module too)

STEPS = 6
SPLIT = 3  # the first run ends after this many steps; the second starts at this step, at a lower sigma
CFG = 6.0
# Momentum and a binding norm threshold: state carried from one run into another changes the result.
APG = APGConfig(eta=0.0, norm_threshold=1.0, momentum=-0.75)
# Each method that keeps run state: how it patches a model, and where its hook object (the state's owner) sits in
# the model options of a run.
METHODS = {
    "apg": (lambda model: apply_apg(model, APG),
            lambda options: options["sampler_pre_cfg_function"][-1]),
    "pag": (lambda model: apply_pag(model, PAGConfig(), "auto"),
            lambda options: options["sampler_calc_cond_batch_function"].__self__),
}


def sample(model, latent=None, start_step=None, last_step=None):
    """KSamplerAdvanced on the slim SD1.5 model: noise added at the first step's sigma, leftover noise returned when
    the run stops early; returns the samples."""
    _, positive, negative, empty = pag_sampling.setup("sd15")
    return nodes.common_ksampler(model, 0, STEPS, CFG, "euler", "normal", positive, negative,
                                 empty if latent is None else latent, start_step=start_step,
                                 last_step=last_step)[0]["samples"]


def run_interrupted(model):
    """`sample` on `model`, interrupted after SPLIT steps as the server does on /interrupt."""
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(slim_models.interrupting(model, SPLIT))
    finally:
        comfy.model_management.interrupt_current_processing(False)


FIRST_RUNS = {
    "stopped at end_at_step": lambda model: sample(model, last_step=SPLIT),
    "interrupted": run_interrupted,
}


@pytest.mark.parametrize("first_run", FIRST_RUNS)
def test_run_below_the_previous_runs_last_sigma_is_that_of_a_fresh_model(first_run):
    """A run of a patched model that starts at a lower sigma than the last step of its previous run (the second stage
    of a two-stage graph; a resumed run after an interrupt) gives what the same run of a fresh model gives."""
    model = pag_sampling.slim_model("sd15")
    used = apply_apg(model, APG)
    FIRST_RUNS[first_run](used)
    assert torch.equal(sample(used, start_step=SPLIT), sample(apply_apg(model, APG), start_step=SPLIT))


def test_the_same_run_after_an_interrupt_is_the_uninterrupted_run():
    model = pag_sampling.slim_model("sd15")
    used = apply_apg(model, APG)
    run_interrupted(used)
    assert torch.equal(sample(used), sample(apply_apg(model, APG)))


@pytest.mark.parametrize("ending", ["completed", "interrupted"])
@pytest.mark.parametrize("method", METHODS)
def test_no_run_state_outlives_its_run(method, ending):
    """Every state object a run made is freed once the run is over, however it ended."""
    patch, owner_of = METHODS[method]
    states = []

    def missing():
        raise AssertionError(f"{method} made no run state in this step")

    def record(args):  # post-CFG: each hook has made its state for the step by now
        options = args["model_options"]
        states.append(weakref.ref(run_state(options, owner_of(options), missing)))
        return args["denoised"]

    spied = pag_sampling.slim_model("sd15").clone()
    spied.set_model_sampler_post_cfg_function(record)
    patched = patch(spied)
    if ending == "completed":
        sample(patched)
    else:
        run_interrupted(patched)
    gc.collect()
    assert len(states) == (STEPS if ending == "completed" else SPLIT)
    assert [ref() for ref in states] == [None] * len(states)
