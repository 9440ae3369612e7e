"""The sigma range of every guidance method that takes one, at its exact ends, through ComfyUI sampling.

A method acts while sigma_end <= sigma <= sigma_start, so a step whose sigma equals either end is guided. The ranges
below are set to sigmas of the sampler's own schedule, and each step is classified from what the sampler produced:
plain CFG of that step's raw predictions (the method left it alone) or not (the method acted).
"""

import pytest
from comfy.samplers import calculate_sigmas

import slim_models
import test_pag_sampling as pag_sampling
from test_pag_sampling import one_torch_thread  # noqa: F401 (autouse fixture: one torch thread for this module too)

STEPS = 6
CFG = 5.0
# Every node that takes a sigma range, with its other inputs set so that it changes each step it acts on: a method
# added to the pack adds its entry here.
RANGE_METHODS = [
    pytest.param("AdaptiveProjectedGuidance", {"eta": 0.0, "norm_threshold": 0.05, "momentum": -0.5}, id="apg"),
    pytest.param("GuidancePerturbedAttention", {"scale": 3.0, "adaptive_scale": 0.0, "layers": "auto",
                                                "batched": True}, id="pag"),
]
# (first, last): the range runs from the sigma of step `first` down to the sigma of step `last`, both included.
RANGES = [(1, 4), (2, 2), (0, STEPS - 1)]
# How far a step's prediction is from CFG of its raw predictions, relative to the size of CFG's own update
# (w - 1)(D_c - D_u), which shrinks with sigma as every method's effect does: a step the method left alone is CFG to
# rounding, and each method here changes a step it acts on by far more than this (10% or more on the slim model).
PLAIN_CFG = 1e-5
GUIDED = 1e-2


def change_from_cfg(cond, uncond, guided):
    """How far `guided` is from CFG of (cond, uncond), relative to CFG's update."""
    cfg = uncond + CFG * (cond - uncond)
    return float((guided - cfg).norm() / (cfg - cond).norm())


@pytest.mark.parametrize("first,last", RANGES)
@pytest.mark.parametrize("node,settings", RANGE_METHODS)
def test_steps_on_the_range_ends_are_guided(comfy, node, settings, first, last):
    model, positive, negative, latent = pag_sampling.setup("sd15")
    schedule = calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).tolist()

    def patch(m):
        return comfy.NODE_CLASS_MAPPINGS[node].execute(m, sigma_start=schedule[first], sigma_end=schedule[last],
                                                       **settings).result[0]

    spy = pag_sampling.Spy()
    slim_models.ksample(spy.around(model, patch), positive, negative, latent, cfg=CFG, steps=STEPS)
    assert [float(sigma.max()) for sigma in spy.sigmas] == schedule[:STEPS]
    changes = [change_from_cfg(*raw, guided) for raw, guided in zip(spy.raw, spy.guided, strict=True)]
    assert all(c < PLAIN_CFG or c > GUIDED for c in changes), changes
    assert [c > GUIDED for c in changes] == [first <= step <= last for step in range(STEPS)], changes
