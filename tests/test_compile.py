"""Every node of the pack on a compiled model: no graph break and no recompilation per step.

Users who care about speed compile the model with the core TorchCompileModel node, which wraps the diffusion model
in `torch.compile` at sampling time (`comfy_api.torch_helpers.set_torch_compile_wrapper`, the node's own function).
A guidance node that puts a per-step Python value (sigma, a step index, a switch) where the compiled region reads
it makes dynamo recompile every step, and one that calls something untraceable inside it breaks the graph; both
cost more than the guidance saves. Here each node samples a slim SD1.5 model compiled through that wrapper with a
counting backend (dynamo's tracing and guards are what is tested; the backend runs the traced graph as it is, so no
compiler runs on CPU): the graphs compiled, and the graph breaks dynamo records, against the same model compiled
without the node. A node may add a compilation per distinct input shape (Adaptive Guidance drops rows from the
call once an image switches; FreCaS samples at two sizes), never one per step.
"""

import pytest
import torch
import torch._dynamo
from comfy_api.torch_helpers import set_torch_compile_wrapper

import slim_models
from test_composition import CFG, MATRIX_STEPS, PATCHES, agd, cfgpp_sample, frecas_sample, setup
from test_pag_sampling import one_torch_thread  # noqa: F401 (autouse: one torch thread, see there)

STEPS = 5  # more steps than any node has distinct input shapes, so a per-step recompilation shows


class CountingBackend:
    """A dynamo backend that runs each traced graph as traced and counts them, with the shapes of their image-like
    inputs (rank 4 or more: the latent and what is made from it; scalars a graph takes as inputs are left out)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() >= 4))
        return graph_module.forward


def compiled(model):
    """`model` compiled as the TorchCompileModel node does, with a fresh dynamo cache; returns (model, backend)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = CountingBackend()
    model = model.clone()
    set_torch_compile_wrapper(model=model, backend=backend)
    return model, backend


def graph_breaks():
    return dict(torch._dynamo.utils.counters["graph_break"])


def ksample_run(model, steps=STEPS):
    _, positive, negative, latent = setup()
    slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=steps)


@pytest.fixture(scope="module", autouse=True)
def pytorch_attention(comfy):
    """ComfyUI's attention as on a GPU (PyTorch's scaled dot-product attention). On CPU it picks sub-quadratic
    attention, which asks psutil for free memory inside the model, a graph break of ComfyUI's own."""
    import comfy.ldm.modules.attention as attention

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "optimized_attention", attention.attention_pytorch)
        patch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
        yield


@pytest.fixture(scope="module")
def baseline(comfy):
    """The plain model's graphs and breaks under the same compilation: what ComfyUI's own model costs."""
    model, backend = compiled(setup()[0])
    ksample_run(model)
    return len(backend.graphs), graph_breaks()


def assert_compiles_once_per_shape(name, backend, breaks, baseline):
    base_graphs, base_breaks = baseline
    assert breaks == base_breaks, f"{name} breaks the compiled graph: {breaks}"
    shapes = set(backend.graphs)
    # at most one compilation per input shape (dynamo compiles a second shape as dynamic, but batch sizes 1 and 0 are
    # always specialised, so a shape may cost one of its own); a guard on a per-step value costs one more
    assert len(backend.graphs) <= base_graphs * len(shapes), (
        f"{name} recompiles the model: {len(backend.graphs)} graphs for {len(shapes)} input shapes in {STEPS} steps "
        f"(the plain model: {base_graphs})")


@pytest.mark.parametrize("name", list(PATCHES))
def test_patch_node_on_a_compiled_model(comfy, baseline, name):
    model, backend = compiled(PATCHES[name].apply(comfy, setup()[0]))
    ksample_run(model, MATRIX_STEPS if name == "LinearAG" else STEPS)  # its coefficients belong to the matrix's steps
    assert_compiles_once_per_shape(name, backend, graph_breaks(), baseline)


def test_agd_on_a_compiled_model(comfy, baseline):
    model, backend = compiled(agd(comfy, setup()[0]))
    _, positive, negative, latent = setup()
    slim_models.ksample(model, positive, negative, latent, cfg=1.0, steps=STEPS)
    assert_compiles_once_per_shape("AGD", backend, graph_breaks(), baseline)


def test_cfgpp_on_a_compiled_model(comfy, baseline):
    model, backend = compiled(setup()[0])
    cfgpp_sample(comfy, model, steps=STEPS)
    assert_compiles_once_per_shape("CFG++ Sampler", backend, graph_breaks(), baseline)


def test_frecas_on_a_compiled_model(comfy, baseline):
    model, backend = compiled(setup()[0])
    frecas_sample(model)
    assert_compiles_once_per_shape("FreCaS Sampler", backend, graph_breaks(), baseline)


def test_mask_on_a_compiled_model(comfy, baseline):
    """A region mask (here on APG) is applied around the model call, not inside it."""
    from comfyui_guidance.guiders.apg import APGConfig
    from comfyui_guidance.nodes.apg_patch import apply_apg

    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    patched = apply_apg(setup()[0], APGConfig(eta=0.0, norm_threshold=1.0, momentum=-0.5), mask)
    model, backend = compiled(patched)
    ksample_run(model)
    assert_compiles_once_per_shape("APG with a mask", backend, graph_breaks(), baseline)


def probe_model(per_step_value):
    """The slim model with an attention patch that reads, inside the compiled region, a value that changes every step:
    `per_step_value(sigma)` put into the transformer options by a wrapper around the model call."""
    model = setup()[0].clone()

    def wrapper(apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = {**c.get("transformer_options", {}), "probe": per_step_value(args["timestep"])}
        return apply_model(args["input"], args["timestep"], **c)

    def attn1_patch(q, k, v, extra_options):
        probe = extra_options["probe"]
        if isinstance(probe, torch.Tensor):
            probe = probe.item()  # a read-back to the host: dynamo breaks the graph here
        return q * (1.0 + 0.0 * probe), k, v

    model.set_model_unet_function_wrapper(wrapper)
    model.set_model_attn1_patch(attn1_patch)
    return model


@pytest.mark.parametrize("per_step_value,caught", [
    (lambda sigma: float(sigma[0]), "recompiles"),  # a Python float the graph specialises on: a guard per step
    (lambda sigma: sigma[:1].clone(), "breaks the compiled graph"),  # .item() inside the region
], ids=["python-float", "item"])
def test_the_check_catches_a_per_step_guard_and_a_break(comfy, baseline, per_step_value, caught):
    """The check itself: a patch that hands the compiled region the step's sigma as a Python float, or reads a tensor
    back to the host inside it, is reported."""
    model, backend = compiled(probe_model(per_step_value))
    ksample_run(model)
    with pytest.raises(AssertionError, match=caught):
        assert_compiles_once_per_shape("probe", backend, graph_breaks(), baseline)
