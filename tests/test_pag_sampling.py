"""The PAG node inside real ComfyUI sampling: slim models of every family, the perturbation reaching exactly the
chosen layers and rows, the batched pass against the separate one, ComfyUI's core PAG, APG, masks and areas."""

import functools
import importlib

import comfy.model_patcher
import comfy.samplers
import pytest
import torch

import slim_models
from apg_reference import paper_apg
from comfyui_guidance.nodes import pag_layers
from comfyui_guidance.nodes.run_state import RUN_STATE_KEY

NODE = "GuidancePerturbedAttention"
DEFAULTS = {"scale": 3.0, "adaptive_scale": 0.0, "layers": "auto", "sigma_start": 10000.0, "sigma_end": 0.0,
            "batched": True}
APG_CFG_SETTINGS = {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0, "sigma_start": 10000.0, "sigma_end": 0.0}
ALL_FAMILIES = ["sd15", "sdxl", "flux", "wan21", "sd3"]


def pag(comfy, model, **settings):
    return comfy.NODE_CLASS_MAPPINGS[NODE].execute(model, **(DEFAULTS | settings)).result[0]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The slim models are far too small to gain from a second thread, and on a busy 2-core machine two OpenMP
    threads per process wait on each other: one thread ran a 3-step SD1.5 sampling 20x faster under load here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def slim_model(family, prediction=None):
    """One model per family and prediction for the whole module: ComfyUI's first load of a model is its slowest
    part on CPU, and the node never changes the model it patches (it clones it)."""
    return slim_models.build_model(family, prediction)


def setup(family, prediction=None, batch=1, seed=0, size=32):
    model = slim_model(family, prediction)
    positive, negative = slim_models.conditioning(family, batch=batch, seed=seed)
    return model, positive, negative, slim_models.empty_latent(family, batch=batch, height=size, width=size)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unet_identity(layers):
    """ComfyUI core PAG's own perturbation (attn1 replace returning V) on UNet layers (kind, block, transformer)."""
    def add(options):
        for kind, block, transformer in layers:
            options = comfy.model_patcher.set_model_options_patch_replace(
                options, lambda q, k, v, extra: v, "attn1", kind, block, transformer)
        return options
    return add


def flux_identity(blocks):
    """An independent Flux perturbation: an attention override that returns V in the blocks Flux itself names in
    transformer_options ((block_type, block_index)); Flux attention has q, k, v as [B, heads, N, d]."""
    def override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        if (options.get("block_type"), options.get("block_index")) in blocks:
            v = args[2]
            return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)
        return func(*args, **kwargs)

    def add(options):
        return {**options, "transformer_options": {**options["transformer_options"],
                                                   "optimized_attention_override": override}}
    return add


class Spy:
    """Records per step the raw predictions (a pre-CFG hook placed before the patches under test), the final output
    (a post-CFG hook placed after them), a reference perturbed prediction made at the same input by `reference`
    (model options -> model options), and the plain predictions of the step from an unpatched call."""

    def __init__(self, reference=None):
        self.raw, self.plain, self.guided, self.perturbed, self.sigmas = [], [], [], [], []
        self.reference = reference

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def around(self, model, patch):
        """`patch(model)` with this spy's pre-CFG hook before the patch's hooks and its post-CFG hook after them."""
        before = model.clone()
        before.set_model_sampler_pre_cfg_function(self.pre)
        after = patch(before).clone()
        after.set_model_sampler_post_cfg_function(self.post)
        return after

    def pre(self, args):
        self.raw.append([c.clone() for c in args["conds_out"]])
        self.plain.append(comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                         args["model_options"]))
        self.sigmas.append(args["sigma"])
        return args["conds_out"]

    def post(self, args):
        self.guided.append(args["denoised"].clone())
        if self.reference is not None:
            options = self.reference(args["model_options"].copy())
            [perturbed] = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                         options)
            self.perturbed.append(perturbed)
        return args["denoised"]


def expected_steps(spy, cfg, scale):
    """The paper's rule in float64 on the recorded predictions."""
    for (cond, uncond), perturbed in zip(spy.raw, spy.perturbed):
        c, u, p = cond.double(), uncond.double(), perturbed.double()
        yield (c if cfg == 1.0 else u + cfg * (c - u)) + scale * (c - p)


REFERENCE_CASES = [
    # family, prediction, layers named for the node, the same layers for the independent reference, cfg, batch
    ("sd15", "eps", "input.1, middle.0, output.3", unet_identity([("input", 1, 0), ("middle", 0, 0),
                                                                 ("output", 3, 0)]), 6.0, 3),
    ("sd15", "v", "auto", unet_identity([("middle", 0, 0)]), 1.0, 2),
    ("sdxl", "eps", "middle.0, output.1.0", unet_identity([("middle", 0, 0), ("output", 1, 0)]), 5.0, 2),
    ("flux", "flow", "double.1, single.0", flux_identity({("double", 1), ("single", 0)}), 3.5, 2),
    ("flux", "flow", "auto", flux_identity({("double", 1)}), 1.0, 1),
]


@pytest.mark.parametrize("family,prediction,layers,reference,cfg,batch", REFERENCE_CASES,
                         ids=[f"{c[0]}-{c[1]}-cfg{c[4]:g}" for c in REFERENCE_CASES])
def test_guided_output_matches_float64_reference(comfy, family, prediction, layers, reference, cfg, batch):
    """Every step's output is the paper's rule on the raw predictions and an independently perturbed prediction;
    the conditional and unconditional predictions of the batched call are those of an unpatched call."""
    model, positive, negative, latent = setup(family, prediction, batch=batch)
    spy = Spy(reference)
    slim_models.ksample(spy.around(model, lambda m: pag(comfy, m, layers=layers, scale=2.5)), positive, negative,
                        latent, cfg=cfg, steps=3)
    assert len(spy.guided) == 3 and spy.guided[0].shape[0] == batch
    for got, want in zip(spy.guided, expected_steps(spy, cfg, 2.5)):
        assert rel_err(got, want) < 1e-5
    for raw, plain in zip(spy.raw, spy.plain):
        assert len(raw) == 2 and all(rel_err(r, p) < 1e-5 for r, p in zip(raw, plain) if p.abs().max() > 0)


class IdentityCalls:
    """Which layer each identity attention of a run came from, and for how many rows: the current layer is set by a
    forward pre-hook on every layer's block, and the identity function of the patch module the node uses (ComfyUI
    loads the pack under a module name of its own) is wrapped."""

    def __init__(self, comfy, monkeypatch, model):
        self.calls, self.current = [], None
        modules = pag_layers.layer_modules(model.get_model_object("diffusion_model"))
        self.handles = [module.register_forward_pre_hook(lambda m, a, layer=layer: self.enter(layer))
                        for layer, module in modules.items()]
        node_package = importlib.import_module(comfy.NODE_CLASS_MAPPINGS[NODE].__module__).__package__
        patch_module = importlib.import_module(f"{node_package}.pag_patch")
        identity = patch_module.identity_attention
        monkeypatch.setattr(patch_module, "identity_attention", lambda v, *a: self.record(v) or identity(v, *a))

    def enter(self, layer):
        self.current = layer

    def record(self, v):
        self.calls.append((str(self.current), v.shape[0]))

    def remove(self):
        for handle in self.handles:
            handle.remove()


LAYER_CASES = [
    ("sd15", "input.3, output.0.0", ["input.3.0", "output.0.0"]),
    ("sdxl", "auto", ["middle.0.0"]),
    ("flux", "double.0, single.0-1", ["double.0", "single.0", "single.1"]),
    ("wan21", "auto", ["block.1"]),
    ("sd3", "joint.0", ["joint.0"]),  # block 0 also has an image self-attention: only the joint attention is hit
]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "separate"])
@pytest.mark.parametrize("family,layers,expected", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_identity_reaches_exactly_the_chosen_layers(comfy, monkeypatch, family, layers, expected, batched):
    """Per step, each chosen layer applies the identity once, to the rows of one batch (the perturbed chunk) and
    to no others; no other layer applies it; a plain run afterwards applies it nowhere."""
    model, positive, negative, latent = setup(family, batch=2)
    spy = IdentityCalls(comfy, monkeypatch, model)
    try:
        slim_models.ksample(pag(comfy, model, layers=layers, batched=batched), positive, negative, latent, cfg=4.0,
                            steps=3)
        assert sorted(spy.calls) == sorted((layer, 2) for layer in expected for _ in range(3))
        spy.calls.clear()
        slim_models.ksample(model, positive, negative, latent, cfg=4.0, steps=2)
        assert spy.calls == []
    finally:
        spy.remove()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_equals_separate_pass(comfy, family):
    """The perturbed pass batched with cond and uncond gives the separate call's result, over a whole run."""
    model, positive, negative, latent = setup(family, batch=2)
    batched = slim_models.ksample(pag(comfy, model, batched=True), positive, negative, latent, cfg=4.0, steps=3)
    separate = slim_models.ksample(pag(comfy, model, batched=False), positive, negative, latent, cfg=4.0, steps=3)
    plain = slim_models.ksample(model, positive, negative, latent, cfg=4.0, steps=3)
    assert rel_err(batched["samples"], separate["samples"]) < 1e-4
    assert rel_err(batched["samples"], plain["samples"]) > 1e-3


def test_batched_call_counts(comfy, monkeypatch):
    """Batched: one model call per step, of three chunks; separate: two calls per step (cond + uncond, perturbed)."""
    model, positive, negative, latent = setup("sd15", batch=2)
    calls = []
    apply_model = model.model.apply_model

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return apply_model(x, *args, **kwargs)

    monkeypatch.setattr(model.model, "apply_model", counting)
    slim_models.ksample(pag(comfy, model, batched=True), positive, negative, latent, cfg=4.0, steps=3)
    assert calls == [6, 6, 6]
    calls.clear()
    slim_models.ksample(pag(comfy, model, batched=False), positive, negative, latent, cfg=4.0, steps=3)
    assert calls == [4, 2] * 3


def core_pag(comfy, model, scale):
    out = comfy.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"].execute(model, scale)
    return out.result[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_defaults_equal_comfyui_core_pag(comfy, family):
    """On UNets `auto` is the middle block, as in ComfyUI's core node: the same images, at cfg 6 and cfg 1."""
    model, positive, negative, latent = setup(family, batch=2)
    for cfg in (6.0, 1.0):
        ours = slim_models.ksample(pag(comfy, model), positive, negative, latent, cfg=cfg, steps=3)["samples"]
        core = slim_models.ksample(core_pag(comfy, model, 3.0), positive, negative, latent, cfg=cfg, steps=3)
        assert rel_err(ours, core["samples"]) < 1e-4


def area_and_mask_conditioning(comfy, family, size):
    """A positive prompt made of an area cond (left half) and a masked cond (a centred square) over a full one."""
    positive, negative = slim_models.conditioning(family, seed=1)
    other, _ = slim_models.conditioning(family, seed=2)
    third, _ = slim_models.conditioning(family, seed=3)
    area = comfy.NODE_CLASS_MAPPINGS["ConditioningSetArea"]().append(other, size // 2, size, 0, 0, 1.0)[0]
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    masked = comfy.NODE_CLASS_MAPPINGS["ConditioningSetMask"]().append(third, mask, "default", 0.8)[0]
    combine = comfy.NODE_CLASS_MAPPINGS["ConditioningCombine"]()
    return combine.combine(combine.combine(positive, area)[0], masked)[0], negative


def test_masks_and_area_conds_keep_working(comfy):
    """Area and mask conds are batched by ComfyUI into calls of their own shapes; PAG perturbs the right rows in
    each: batched, separate, core PAG and the float64 reference agree."""
    size = 64
    model = slim_model("sd15")
    positive, negative = area_and_mask_conditioning(comfy, "sd15", size)
    latent = slim_models.empty_latent("sd15", batch=2, height=size, width=size)
    spy = Spy(unet_identity([("middle", 0, 0)]))
    batched = slim_models.ksample(spy.around(model, lambda m: pag(comfy, m)), positive, negative, latent, cfg=5.0,
                                  steps=3)["samples"]
    for got, want in zip(spy.guided, expected_steps(spy, 5.0, 3.0)):
        assert rel_err(got, want) < 1e-5
    separate = slim_models.ksample(pag(comfy, model, batched=False), positive, negative, latent, cfg=5.0, steps=3)
    core = slim_models.ksample(core_pag(comfy, model, 3.0), positive, negative, latent, cfg=5.0, steps=3)
    assert rel_err(batched, separate["samples"]) < 1e-4 and rel_err(batched, core["samples"]) < 1e-4


def test_patches_are_gone_after_the_run(comfy):
    """The node adds two sampler hooks to a clone and nothing else: no attention patches stay on any model, the
    clone's reserved run-state store (nodes/run_state.py) is still empty after the run (each run fills a copy of its
    own), and the original model samples as before."""
    model, positive, negative, latent = setup("flux", batch=1)
    before = slim_models.ksample(model, positive, negative, latent, cfg=3.0, steps=2)["samples"]
    patched = pag(comfy, model, layers="double.0-1, single.1")
    slim_models.ksample(patched, positive, negative, latent, cfg=3.0, steps=2)
    for m in (model, patched):
        options = m.model_options.get("transformer_options", {})
        assert "patches_replace" not in options and "optimized_attention_override" not in options
        assert set(options) <= {"patches", RUN_STATE_KEY} and not options.get("patches")
        assert options.get(RUN_STATE_KEY, {}) == {}
    assert "sampler_calc_cond_batch_function" not in model.model_options
    assert torch.equal(slim_models.ksample(model, positive, negative, latent, cfg=3.0, steps=2)["samples"], before)


def apg(comfy, model, **settings):
    defaults = {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "sigma_start": 10000.0, "sigma_end": 0.0}
    return comfy.NODE_CLASS_MAPPINGS["AdaptiveProjectedGuidance"].execute(model, **(defaults | settings)).result[0]


def test_composes_with_apg(comfy):
    """PAG and APG in one graph, either order: APG's guided result plus s (D_c − D̂), in float64; APG with its CFG
    settings leaves PAG alone."""
    model, positive, negative, latent = setup("sdxl", batch=2)
    for stack in (lambda m: pag(comfy, apg(comfy, m, norm_threshold=1.0)),
                  lambda m: apg(comfy, pag(comfy, m), norm_threshold=1.0)):
        spy = Spy(unet_identity([("middle", 0, 0)]))
        slim_models.ksample(spy.around(model, stack), positive, negative, latent, cfg=6.0, steps=3)
        conds, unconds = [c for c, _ in spy.raw], [u for _, u in spy.raw]
        apg_steps = paper_apg(conds, unconds, 6.0, 0.0, 1.0, -0.5)
        for got, apg_step, cond, perturbed in zip(spy.guided, apg_steps, conds, spy.perturbed):
            assert rel_err(got, apg_step + 3.0 * (cond.double() - perturbed.double())) < 1e-5
    alone = slim_models.ksample(pag(comfy, model), positive, negative, latent, cfg=6.0, steps=3)["samples"]
    with_cfg_apg = slim_models.ksample(pag(comfy, apg(comfy, model, **APG_CFG_SETTINGS)), positive, negative, latent,
                                       cfg=6.0, steps=3)["samples"]
    assert rel_err(with_cfg_apg, alone) < 1e-5


def test_adaptive_scale_follows_the_schedule(comfy):
    """With adaptive_scale a, step t uses max(0, s − a (1000 − t)) at the model's timestep of that step's sigma."""
    model, positive, negative, latent = setup("sd15", batch=1)
    spy = Spy(unet_identity([("middle", 0, 0)]))
    slim_models.ksample(spy.around(model, lambda m: pag(comfy, m, adaptive_scale=0.004)), positive, negative, latent,
                        cfg=5.0, steps=4)
    scales = [max(0.0, 3.0 - 0.004 * (1000.0 - float(model.model.model_sampling.timestep(s)[0]))) for s in spy.sigmas]
    assert scales[0] > 2.9 and scales[-1] == 0.0
    for (cond, uncond), perturbed, scale, got in zip(spy.raw, spy.perturbed, scales, spy.guided):
        want = uncond.double() + 5.0 * (cond.double() - uncond.double()) + scale * (cond.double() - perturbed.double())
        assert rel_err(got, want) < 1e-5


def test_outside_the_sigma_range_no_perturbed_pass_runs(comfy, monkeypatch):
    """Steps outside [sigma_end, sigma_start], and a scale of 0, are plain CFG, without the perturbed pass."""
    model, positive, negative, latent = setup("sd15", batch=1)
    plain = slim_models.ksample(model, positive, negative, latent, cfg=5.0, steps=3)["samples"]
    spy = IdentityCalls(comfy, monkeypatch, model)
    try:
        for settings in ({"sigma_start": 0.001, "sigma_end": 0.0}, {"scale": 0.0}):
            out = slim_models.ksample(pag(comfy, model, **settings), positive, negative, latent, cfg=5.0, steps=3)
            assert torch.equal(out["samples"], plain) and spy.calls == []
    finally:
        spy.remove()


def test_dual_cfg_guider_gets_pag_through_the_post_cfg_hook(comfy):
    """A guider that calls calc_cond_batch itself (DualCFGGuider) bypasses the batching hook; PAG then runs its
    separate pass from the post-CFG hook, as ComfyUI's core node does: the same images as core PAG."""
    model, positive, negative, latent = setup("sd15", batch=1)
    middle, _ = slim_models.conditioning("sd15", seed=7)
    dual = comfy.NODE_CLASS_MAPPINGS["DualCFGGuider"]

    def sample(m):
        guider = dual.execute(m, positive, middle, negative, 5.0, 2.0, "regular").result[0]
        return slim_models.sample_custom_advanced(m, positive, negative, latent, cfg=1.0, steps=3,
                                                  guider=guider)["samples"]

    ours, core, plain = sample(pag(comfy, model)), sample(core_pag(comfy, model, 3.0)), sample(model)
    assert rel_err(ours, core) < 1e-5 and rel_err(ours, plain) > 1e-3


@pytest.mark.parametrize("family,layers,listed", [
    ("sd15", "middle.3", "input.1.0, input.3.0, middle.0.0, output.0.0, output.1.0, output.2.0, output.3.0"),
    ("sdxl", "input.1", "input.3.0, middle.0.0, output.0.0, output.1.0"),
    ("flux", "middle.0", "double.0-1, single.0-1"),
    ("sd3", "joint.2, joint.x", "joint.0-1"),
    ("wan21", "", "block.0-1"),
])
def test_unknown_layers_name_the_layers_that_exist(comfy, family, layers, listed):
    model = slim_model(family)
    with pytest.raises(ValueError) as error:
        pag(comfy, model, layers=layers)
    assert str(error.value).startswith("Perturbed-Attention Guidance (PAG): ") and listed in str(error.value)


def test_layer_names_resolve(comfy):
    """Whole blocks, single transformers, ranges and `auto` (the paper's choice per family)."""
    resolve = pag_layers.select_layers
    sd15 = slim_model("sd15").get_model_object("diffusion_model")
    assert [str(x) for x in resolve("output.0-2, input.1.0", sd15)] == ["input.1.0", "output.0.0", "output.1.0",
                                                                         "output.2.0"]
    assert [str(x) for x in resolve("input.0-3", sd15)] == ["input.1.0", "input.3.0"]  # blocks 0, 2 have none
    expected_auto = {"sd15": ["middle.0.0"], "sdxl": ["middle.0.0"], "flux": ["double.1"], "wan21": ["block.1"],
                     "sd3": ["joint.1"]}
    for family, layers in expected_auto.items():
        diffusion_model = slim_model(family).get_model_object("diffusion_model")
        assert [str(x) for x in resolve("auto", diffusion_model)] == layers
