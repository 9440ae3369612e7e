"""Adapter guidance distillation (Jensen and Sadat, arXiv:2503.07274; guiders/agd.py, nodes/agd_patch.py, nodes/agd.py)
inside real ComfyUI sampling on the slim models.

The adapters' attachment is checked against a reference built the way the official code attaches them
(agd/models/attention.py, `CrossAttentionCFGAdapter.forward`: each `attn2` module of the UNet wrapped so that its
output gets the adapter's output on the module's own input added), on a deep copy of the UNet, independent of
ComfyUI's transformer patches that the pack uses; the adapter's own computation there is the official
`_adapter_forward` written out in float64 in this file. The training schedule is checked against torch's own schedulers
as the official `get_opt_scheduler` builds them, the loss against the MSE of the model's raw output computed through
ComfyUI's model_sampling. Training runs for real, on CPU, at a tiny size.
"""

import copy
import gc
import math
import re
import warnings

import comfy.model_management as model_management
import comfy.sample as comfy_sample
import comfy.samplers as comfy_samplers
import folder_paths
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from safetensors.torch import load_file, save_file

import slim_models
from comfyui_guidance.guiders import agd
from comfyui_guidance.guiders.agd import AdapterSpec, GuidanceAdapter
from comfyui_guidance.nodes import agd_patch
from comfyui_guidance.nodes.agd_patch import (DISPLAY_NAME, FOLDER, NODE_ID, TRAIN_DISPLAY_NAME, TRAIN_NODE_ID,
                                              TrainingSettings, apply_agd, new_adapters, train_agd)
from test_pag_sampling import one_torch_thread, rel_err  # noqa: F401 (autouse: one torch thread)

AGD_SCALE = 4.0
STEPS = 3
MODELS = {}


@pytest.fixture(autouse=True, scope="module")
def release_models():
    """Drops the module's models at its end: ComfyUI's model management warns of a leak, in whatever test loads a
    model next, while a model it loaded (through a clone) is still held here."""
    yield
    MODELS.clear()
    gc.collect()
    model_management.cleanup_models_gc()


def model_of(family="sd15", prediction="eps", seed=0):
    """One slim model per family, prediction and weight seed for the module (the node never changes the model)."""
    key = (family, prediction, seed)
    if MODELS.get(key) is None:
        MODELS[key] = slim_models.build_model(family, prediction, seed=seed)
    return MODELS[key]


def setup(family="sd15", prediction="eps", batch=2, seed=0):
    """A model, `batch` different prompts and an empty 32 x 32 latent (a 4 x 4 latent)."""
    positive, negative = slim_models.conditioning(family, batch=batch, seed=seed)
    return (model_of(family, prediction), positive, negative,
            slim_models.empty_latent(family, batch=batch, height=32, width=32))


def sample(model, positive, negative, latent, cfg=1.0, steps=STEPS):
    return slim_models.ksample(model, positive, negative, latent, cfg=cfg, steps=steps)["samples"]


def random_adapters(model, seed=1, hidden=8):
    """Adapters for `model` whose output projections are random, so that they change the prediction visibly."""
    adapters = new_adapters(model, AdapterSpec(hidden_dim=hidden), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.adapters.values():
            adapter.out_proj.weight.normal_(0.0, 1.0, generator=generator)
            adapter.out_proj.bias.normal_(0.0, 0.1, generator=generator)
    return adapters


class AdapterOutputs:
    """Forward hooks on the output projection of every adapter of a set, the adapter's last layer (hooks travel with
    the copies the patch makes for sampling): the output of each adapter call."""

    def __init__(self, adapters):
        self.outputs = []
        self.handles = [a.out_proj.register_forward_hook(lambda m, args, out: self.outputs.append(out.detach().clone()))
                        for a in adapters.adapters.values()]

    def remove(self):
        for handle in self.handles:
            handle.remove()


# 1. Identity at initialisation ---------------------------------------------------------------------------------------


def test_a_fresh_adapter_outputs_exact_zeros():
    """out_proj starts at zero (the official default, zero_init False): the adapter's output is exactly 0, while
    what it attends to is not trivial."""
    generator = torch.Generator().manual_seed(0)
    adapter = GuidanceAdapter(64, AdapterSpec(hidden_dim=16), 256, 768, generator)
    x, prompt = torch.randn(3, 16, 64), torch.randn(3, 77, 768)
    scale, time = torch.tensor([1.0, 4.0, 9.0]), torch.randn(3, 256)
    out = adapter(x, scale, time, prompt)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    tokens = adapter.condition_tokens(scale, time, prompt)
    assert tokens.shape == (3, 2 + 77, 16) and tokens.abs().min(dim=-1).values.max() > 0
    assert not torch.equal(tokens[0, 0], tokens[1, 0])  # the scale's token depends on the scale


def test_fresh_adapters_sample_the_base_model_bit_for_bit(comfy):
    model, positive, negative, latent = setup()
    adapters = new_adapters(model, AdapterSpec(hidden_dim=8), seed=1)
    assert len(adapters.points) == 7  # every cross-attention of the slim SD1.5 UNet
    base = sample(model, positive, negative, latent)
    calls = AdapterOutputs(adapters)
    try:
        patched = sample(apply_agd(model, adapters, AGD_SCALE), positive, negative, latent)
    finally:
        calls.remove()
    assert len(calls.outputs) == STEPS * len(adapters.points)  # the adapters did run, at every layer and step
    assert all(torch.equal(out, torch.zeros_like(out)) for out in calls.outputs)
    assert torch.equal(patched, base)


# 2. The attachment against the official one ------------------------------------------------------------------------


class OfficialAttachment(torch.nn.Module):
    """An `attn2` wrapped as the official `CrossAttentionCFGAdapter.forward` does: the module's output plus the
    official adapter's output (`official_adapter_output`, on the pack adapter's weights) on the module's own input x
    (the normed hidden states), the guidance scale, the timestep's embedding by the UNet's own time embedder, and the
    module's context (the prompt)."""

    def __init__(self, attn2, adapter, condition):
        super().__init__()
        self.attn2, self.adapter, self.condition = attn2, adapter, condition

    def forward(self, x, context=None, value=None, transformer_options={}):
        out = self.attn2(x, context=context, value=value, transformer_options=transformer_options)
        official = official_adapter_output(self.adapter, x, self.condition["scale"], self.condition["time"], context)
        return out + official.to(out.dtype)


def official_positions(hidden_dim, max_len=250, max_period=10000.0):
    """agd/models/attention.py `PositionalEncoding.pe` (cristianpjensen/agd), written out in float64: the sines
    of position · exp(−ln(max_period) · 2i / hidden_dim) in the first half of the channels, the cosines in the
    second."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    div_term = torch.exp(-math.log(max_period) * torch.arange(0, hidden_dim, 2, dtype=torch.float64) / hidden_dim)
    return torch.cat([torch.sin(position * div_term), torch.cos(position * div_term)], dim=-1)


def official_adapter_output(adapter, x, scale, time_embedding, prompt):
    """agd/models/attention.py `CrossAttentionCFGAdapter._adapter_forward` (cristianpjensen/agd) written out in
    float64 on the adapter's weights, sharing no code with guiders/agd.py: tokens [ScalarEncoder(w) (FourierEncoding
    cos(2π(f·w + φ)), Linear, ReLU, Linear, LayerNorm), timestep_proj(t_emb), prompt_proj(prompt)…] plus the
    positional encoding, one head of attention with scale 1/√hidden_dim, out_proj."""
    d, h = torch.float64, adapter.spec.hidden_dim
    tokens = official_tokens(adapter, scale, time_embedding, prompt)
    q = F.linear(x.to(d), *float64_weights(adapter.q_proj))
    k, v = F.linear(tokens, *float64_weights(adapter.k_proj)), F.linear(tokens, *float64_weights(adapter.v_proj))
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h), dim=-1)
    return F.linear(attention @ v, *float64_weights(adapter.out_proj))


def float64_weights(layer):
    return layer.weight.double(), None if layer.bias is None else layer.bias.double()


def official_features(adapter, scale):
    """`FourierEncoding.forward` in float64: cos(2π(f·w + φ))."""
    fourier = adapter.scale_embedding.fourier
    return torch.cos(2 * torch.pi * (fourier.frequencies.double() * scale.double().unsqueeze(-1)
                                     + fourier.phases.double()))


def official_tokens(adapter, scale, time_embedding, prompt):
    """The condition tokens of `_adapter_forward` in float64, positions added: [B, S, hidden_dim]."""
    d, w = torch.float64, float64_weights
    e, h = adapter.scale_embedding, adapter.spec.hidden_dim
    hidden = F.linear(F.relu(F.linear(official_features(adapter, scale), *w(e.fc1))), *w(e.fc2))
    tokens = [F.layer_norm(hidden, (h,), e.norm.weight.to(d), e.norm.bias.to(d), e.norm.eps).unsqueeze(-2)]
    if adapter.spec.use_timestep:
        tokens.append(F.linear(time_embedding.to(d), *w(adapter.time_proj)).unsqueeze(-2))
    if adapter.spec.use_prompt:
        tokens.append(F.linear(prompt.to(d), *w(adapter.prompt_proj)))
    tokens = torch.cat(tokens, dim=-2)
    return tokens + official_positions(h)[:tokens.shape[-2]]


def lone_adapters(hidden=64, seed=3):
    """A set of two adapters (input widths 24 and 40, timestep width 12, prompt width 10) with random output
    projections, and inputs for them: features, scales 1.5 and 12, time embeddings and 7 prompt tokens per row."""
    points = [agd.AttachmentPoint(("input", 1), 0, 24), agd.AttachmentPoint(("middle", 0), 0, 40)]
    adapters = agd.AdapterSet(points, AdapterSpec(hidden_dim=hidden), time_dim=12, prompt_dim=10, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.adapters.values():
            adapter.out_proj.weight.normal_(0.0, 1.0, generator=generator)
            adapter.out_proj.bias.normal_(0.0, 0.1, generator=generator)
    inputs = {"scale": torch.tensor([1.5, 12.0]), "time_embedding": torch.randn(2, 12, generator=generator),
              "prompt": torch.randn(2, 7, 10, generator=generator)}
    return adapters, inputs


def test_an_adapter_and_the_stacked_sampling_path_equal_the_official_adapter_forward():
    """Each adapter (float32), alone and through the stacked keys and values that sampling uses, equals the official
    `_adapter_forward` written out in float64 (cristianpjensen/agd, agd/models/attention.py): same scale token, same
    timestep and prompt tokens, same positions (sines first, then cosines)."""
    adapters, inputs = lone_adapters()
    stacked = agd.StackedConditions(list(adapters.adapters.values()))
    keys, values = stacked.keys_values(**inputs)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i, (name, adapter) in enumerate(adapters.adapters.items()):
            x = torch.randn(2, 5, adapter.q_proj.in_features, generator=generator)
            tokens = official_tokens(adapter, *inputs.values())
            assert rel_err(adapter.condition_tokens(*inputs.values()).double(), tokens) < 1e-5, \
                f"{name}: condition tokens differ from the official ones (scale token, timestep, prompt, positions)"
            official_keys = F.linear(tokens, adapter.k_proj.weight.double())
            assert rel_err(keys[i].double(), official_keys) < 1e-5, f"{name}: stacked keys of the condition tokens"
            want = official_adapter_output(adapter, x, *inputs.values())
            assert rel_err(adapter(x, *inputs.values()).double(), want) < 1e-5, f"{name}: adapter output"
            assert rel_err(adapter.attend(x, keys[i], values[i]).double(), want) < 1e-5, f"{name}: stacked output"


def official_unet(unet, adapters, scale):
    """A deep copy of `unet` with an adapter attached to every `attn2` the official way (agd/sd/adapter.py attaches
    one to every cross-attention of the down, mid and up blocks). The official time token is
    `unet.time_embedding(unet.time_proj(t))`: the time embedding alone, before SDXL's label embedding is added."""
    reference = copy.deepcopy(unet)
    condition = {}
    attached = set()
    for name, module in reference.named_modules():
        if not isinstance(module, SpatialTransformer):
            continue
        found = re.fullmatch(r"(input|output)_blocks\.(\d+)\.\d+|middle_block\.\d+", name)
        kind, block = (found[1], int(found[2])) if found[1] else ("middle", 0)
        siblings = [m for m in reference.get_submodule(name.rsplit(".", 1)[0]) if isinstance(m, SpatialTransformer)]
        assert siblings == [module]  # one transformer stack per block here: the stack's index is the adapter's
        for index, block_module in enumerate(module.transformer_blocks):
            key = f"{kind}_{block}_{index}"
            block_module.attn2 = OfficialAttachment(block_module.attn2, adapters.adapters[key], condition)
            attached.add(key)
    assert attached == set(adapters.adapters)

    def condition_of_call(module, args, kwargs):
        x, timesteps = args[0], args[1]
        condition["time"] = module.time_embed(timestep_embedding(timesteps, module.model_channels).to(x.dtype))
        condition["scale"] = torch.full((x.shape[0],), scale)

    reference.register_forward_pre_hook(condition_of_call, with_kwargs=True)
    return reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_features_stay_float32_in_a_half_precision_model(dtype):
    """At w = 12 the angle f·w + φ needs more digits than half precision has: the sampling copy of the adapters in
    the model's dtype keeps f and φ in float32 and computes the features there (as the official adapters were
    trained and sampled, in float32), so its features equal the float64 official `FourierEncoding` to float32
    precision, and the scale token's stacked keys are off by the rounding of the layers alone (measured 5e-4 in
    float16, 6e-3 in bfloat16; 2 machine epsilons allowed)."""
    adapters, inputs = lone_adapters()
    twin, stacked, _ = agd_patch.AGDPatch(adapters, 12.0).sampling_copy(torch.empty(0, dtype=dtype))
    scale = torch.tensor([12.0, 12.0])
    keys, _ = stacked.keys_values(scale, inputs["time_embedding"].to(dtype), inputs["prompt"].to(dtype))
    assert keys.dtype == dtype
    for i, (name, adapter) in enumerate(twin.adapters.items()):
        official = official_features(adapters.adapters[name], scale)
        features = adapter.scale_embedding.fourier(scale)
        assert (features.double() - official).abs().max() < 1e-4, f"{name}: Fourier features at w = 12 in {dtype}"
        tokens = official_tokens(adapters.adapters[name], scale, inputs["time_embedding"], inputs["prompt"])
        official_keys = F.linear(tokens, adapters.adapters[name].k_proj.weight.double())
        scale_key_error = rel_err(keys[i][:, 0], official_keys[:, 0])
        assert scale_key_error < 2 * torch.finfo(dtype).eps, f"{name}: the scale token's keys at w = 12 in {dtype}"


class UNetCalls:
    """Every call of a UNet: its inputs and output."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        y = kwargs.get("y")
        self.calls.append({"x": args[0].clone(), "timesteps": args[1].clone(), "context": kwargs["context"].clone(),
                           "y": None if y is None else y.clone(), "out": output.clone()})


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd15", "v"), ("sdxl", "eps")])
def test_every_model_call_equals_the_official_attachment(comfy, family, prediction):
    """Each UNet call of a cfg-1 run with AGD equals the official attachment on a copy of the UNet, at the same
    inputs (two images with different prompts), and differs from the base UNet's."""
    model, positive, negative, latent = setup(family, prediction)
    adapters = random_adapters(model)
    unet = model.get_model_object("diffusion_model")
    recorder = UNetCalls(unet)
    try:
        sample(apply_agd(model, adapters, AGD_SCALE), positive, negative, latent)
    finally:
        recorder.handle.remove()
    assert len(recorder.calls) == STEPS
    reference = official_unet(unet, adapters, AGD_SCALE)
    with torch.no_grad():
        for call in recorder.calls:
            assert call["x"].shape[0] == 2 and not torch.equal(call["context"][0], call["context"][1])
            assert (call["y"] is not None) == (family == "sdxl")
            inputs = (call["x"], call["timesteps"])
            want = reference(*inputs, context=call["context"], y=call["y"], transformer_options={})
            base = unet(*inputs, context=call["context"], y=call["y"], transformer_options={})
            assert rel_err(call["out"], want) < 1e-5
            assert rel_err(call["out"], base) > 1e-3


# 3. Files ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_folder(tmp_path, monkeypatch):
    """models/agd_adapters pointed at a fresh folder for the nodes (restored after the test)."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(folder)], {".safetensors"}))
    return folder


def test_save_and_load_round_trip(comfy, adapter_folder):
    model, positive, negative, latent = setup()
    adapters = random_adapters(model)
    adapters.info.update(scale_low="1.0", scale_high="8.0", settings='{"seed": 3}')
    path = adapter_folder / "round_trip.safetensors"
    agd.save_adapters(adapters, str(path))
    loaded = agd_patch.read_adapter_file(str(path))
    state, loaded_state = adapters.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(loaded_state[k].dtype == torch.float32 and torch.equal(loaded_state[k], state[k]) for k in state)
    assert loaded.layout() == adapters.layout() and loaded.info == adapters.info
    assert loaded.info["base_fingerprint"] == adapters.info["base_fingerprint"]
    want = sample(apply_agd(model, adapters, AGD_SCALE), positive, negative, latent)
    assert torch.equal(sample(apply_agd(model, loaded, AGD_SCALE), positive, negative, latent), want)
    node = comfy.NODE_CLASS_MAPPINGS[NODE_ID]
    [patched] = node.execute(model, path.name, AGD_SCALE, "exact weights").result
    assert torch.equal(sample(patched, positive, negative, latent), want)
    assert not torch.equal(want, sample(model, positive, negative, latent))


def test_a_file_of_another_format_is_refused(comfy, adapter_folder):
    model = model_of()
    node = comfy.NODE_CLASS_MAPPINGS[NODE_ID]
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(adapter_folder / "a_lora.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError) as refusal:
        agd_patch.read_adapter_file(str(adapter_folder / "a_lora.safetensors"))
    assert f"{DISPLAY_NAME}: a_lora.safetensors: not an AGD adapter file" in str(refusal.value)
    with pytest.raises(ValueError) as refusal:
        node.execute(model, "a_lora.safetensors", AGD_SCALE, "exact weights")
    assert str(refusal.value).startswith(f"{DISPLAY_NAME}: ") and "not an AGD adapter file" in str(refusal.value)
    with pytest.raises(ValueError) as refusal:
        node.execute(model, "missing.safetensors", AGD_SCALE, "exact weights")
    assert str(refusal.value).startswith(f"{DISPLAY_NAME}: ") and TRAIN_DISPLAY_NAME in str(refusal.value)


# 4. Apply and remove -------------------------------------------------------------------------------------------------


def test_the_base_model_is_untouched(comfy):
    """Sampling the base after sampling the AGD model gives the base's samples of before, bit for bit; the UNet's
    weights and the base ModelPatcher's options are unchanged."""
    model, positive, negative, latent = setup()
    unet = model.get_model_object("diffusion_model")
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    options = copy.copy(model.model_options)
    before = sample(model, positive, negative, latent)
    guided = sample(apply_agd(model, random_adapters(model), AGD_SCALE), positive, negative, latent)
    assert rel_err(guided, before) > 1e-3
    assert torch.equal(sample(model, positive, negative, latent), before)
    after = unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert model.model_options == options
    assert not model.model_options.get("transformer_options", {}).get("patches")


# 5. Refusals ---------------------------------------------------------------------------------------------------------


def test_adapters_of_another_architecture_are_refused(comfy):
    sdxl = model_of("sdxl")
    adapters = random_adapters(model_of())
    for base_check in agd_patch.BASE_CHECKS:
        with pytest.raises(ValueError) as refusal:
            apply_agd(sdxl, adapters, AGD_SCALE, base_check)
        message = str(refusal.value)
        assert message.startswith(f"{DISPLAY_NAME}: ") and "another architecture" in message
        assert f"Train adapters for this model with {TRAIN_DISPLAY_NAME}" in message


def test_other_weights_refused_under_exact_weights_accepted_under_same_architecture(comfy):
    model, positive, negative, latent = setup()
    other = model_of(seed=1)  # the same architecture with other weights (a fine-tune, say)
    adapters = random_adapters(model)
    with pytest.raises(ValueError) as refusal:
        apply_agd(other, adapters, AGD_SCALE, "exact weights")
    message = str(refusal.value)
    assert message.startswith(f"{DISPLAY_NAME}: ") and "trained on other weights" in message
    assert "set base_check to 'same architecture'" in message
    patched = apply_agd(other, adapters, AGD_SCALE, "same architecture")
    assert rel_err(sample(patched, positive, negative, latent), sample(other, positive, negative, latent)) > 1e-3
    with pytest.raises(ValueError, match=f"{re.escape(DISPLAY_NAME)}: base_check must be one of"):
        apply_agd(model, adapters, AGD_SCALE, "any")


def test_a_model_without_a_unet_is_refused_by_name(comfy, tmp_path):
    """Slim Flux: applying, making adapters and training are refused naming the node and the denoiser; training
    refuses before it samples a single trajectory."""
    flux = model_of("flux", "flow")
    with pytest.raises(ValueError) as refusal:
        apply_agd(flux, random_adapters(model_of()), AGD_SCALE)
    assert str(refusal.value).startswith(f"{DISPLAY_NAME}: ") and "Flux" in str(refusal.value)
    with pytest.raises(ValueError) as refusal:
        new_adapters(flux, AdapterSpec(hidden_dim=8), 0)
    assert str(refusal.value).startswith(f"{TRAIN_DISPLAY_NAME}: ") and "Flux" in str(refusal.value)
    positive, negative = slim_models.conditioning("flux")
    latent = slim_models.empty_latent("flux", height=32, width=32)["samples"]
    settings = TrainingSettings(trajectories=1, sample_steps=1, train_steps=1, batch=1)
    with pytest.raises(ValueError) as refusal:
        train_agd(flux, positive, negative, latent, settings, AdapterSpec(hidden_dim=8), tmp_path / "work")
    assert str(refusal.value).startswith(f"{TRAIN_DISPLAY_NAME}: ") and "Flux" in str(refusal.value)
    assert not list(tmp_path.rglob("chunk_*"))


def test_a_scale_outside_the_trained_range_is_refused(comfy):
    model = model_of()
    adapters = random_adapters(model)
    adapters.info.update(scale_low="1.5", scale_high="6.0")
    for scale in (1.0, 6.5):
        with pytest.raises(ValueError) as refusal:
            apply_agd(model, adapters, scale)
        message = str(refusal.value)
        assert message.startswith(f"{DISPLAY_NAME}: ") and "trained on guidance scales 1.5 to 6" in message
        assert f"scale {scale:g} is outside" in message
    for scale in (1.5, 6.0):
        apply_agd(model, adapters, scale)


def test_a_cfg_other_than_one_stops_the_run(comfy):
    model, positive, negative, latent = setup()
    patched = apply_agd(model, random_adapters(model), AGD_SCALE)
    with pytest.raises(ValueError) as refusal:
        sample(patched, positive, negative, latent, cfg=4.0)
    message = str(refusal.value)
    assert message.startswith(f"{DISPLAY_NAME}: ")
    assert "cfg is 4" in message and "Set cfg to 1.0" in message


# 6, 7. Training and resuming -----------------------------------------------------------------------------------------

SPEC = AdapterSpec(hidden_dim=8)
# Two chunks of two trajectories, 4 steps each: 16 training pairs. 110 steps: past the checkpoint at step 100.
SETTINGS = TrainingSettings(trajectories=4, scale_low=4.0, scale_high=6.0, sample_steps=4, trajectory_batch=2,
                            train_steps=110, batch=4, learning_rate=1e-3, seed=3)
INTERRUPT_AFTER = 105


def training_setup():
    model = model_of()
    positive, negative = slim_models.conditioning("sd15", batch=2, seed=5)
    return model, positive, negative, slim_models.empty_latent("sd15", batch=1, height=32, width=32)["samples"]


@pytest.fixture(scope="module")
def trained(comfy, tmp_path_factory):
    """Adapters trained without interruption, their work folder (trajectories, checkpoint with the losses), and the
    guidance scales that each adapter call of the training got."""
    work = tmp_path_factory.mktemp("agd_trained")
    scales = []
    forward = GuidanceAdapter.forward

    def recording_forward(self, x, scale, *args, **kwargs):
        scales.append(scale.detach().clone())
        return forward(self, x, scale, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuidanceAdapter, "forward", recording_forward)
        adapters = train_agd(*training_setup(), SETTINGS, SPEC, work)
    return adapters, work, scales


def training_pairs(work):
    """The recorded training pairs of a work folder, every chunk."""
    return [load_file(str(path)) for path in sorted((work / "trajectories").glob("chunk_*.safetensors"))]


def one_pass_errors(model, adapters, chunk):
    """Per trajectory of a chunk, at its recorded states and its own scale: the training objective (mean squared
    error in the model's output space) of the AGD model's one pass against the recorded CFG target, and of the base
    model's conditional pass (which is what the adapters give before training)."""
    model_sampling = model.get_model_object("model_sampling")
    errors = []
    for row in chunk["row"].unique().tolist():
        rows = chunk["row"] == row
        x, sigma, target = chunk["x"][rows].float(), chunk["sigma"][rows], chunk["target"][rows].float()
        [scale] = chunk["scale"][rows].unique().tolist()
        context = chunk["cond.c_crossattn"][row:row + 1].expand(x.shape[0], -1, -1)
        patched = apply_agd(model, adapters, scale)
        with torch.no_grad():
            one_pass = patched.model.apply_model(x, sigma, c_crossattn=context,
                                                 transformer_options=dict(patched.model_options["transformer_options"]))
            conditional = model.model.apply_model(x, sigma, c_crossattn=context, transformer_options={})
        b = agd_patch.output_scale(model_sampling, sigma)
        errors.append((agd.distillation_loss(one_pass, target, b).item(),
                       agd.distillation_loss(conditional, target, b).item()))
    return errors


def test_trajectories_are_cfg_runs_at_their_own_scales(comfy, trained):
    """Each recorded trajectory is a CFG-guided Euler run at its own scale: its targets are CFG of the base model at
    the recorded states with that scale, and each next state is the Euler step along that target."""
    _, work, _ = trained
    model = model_of()
    _, _, negative, _ = training_setup()
    chunks = training_pairs(work)
    assert len(chunks) == 2
    scales = torch.cat([c["scale"][:2] for c in chunks])
    assert len(set(scales.tolist())) == 4
    assert all(SETTINGS.scale_low <= s <= SETTINGS.scale_high for s in scales.tolist())
    for chunk in chunks:
        x, sigma, scale, rows = chunk["x"].float(), chunk["sigma"], chunk["scale"], chunk["row"]
        with torch.no_grad():
            cond = model.model.apply_model(x, sigma, c_crossattn=chunk["cond.c_crossattn"][rows],
                                           transformer_options={})
            uncond = model.model.apply_model(x, sigma, c_crossattn=negative[0][0][rows], transformer_options={})
        target = uncond + scale.view(-1, 1, 1, 1) * (cond - uncond)
        assert rel_err(chunk["target"], target) < 2e-3  # stored as float16
        calls = x.view(SETTINGS.sample_steps, 2, *x.shape[1:])
        targets, sigmas = target.view_as(calls), sigma.view(SETTINGS.sample_steps, 2, 1, 1, 1)
        for k in range(SETTINGS.sample_steps - 1):
            euler = calls[k] + (sigmas[k + 1] - sigmas[k]) * (calls[k] - targets[k]) / sigmas[k]
            assert rel_err(calls[k + 1], euler) < 2e-3


def test_training_gives_each_pair_its_own_scale(comfy, trained):
    """Every adapter call of the training gets, per row of the batch, the scale of the trajectory the row comes
    from; over the run, every trajectory's scale."""
    _, work, seen = trained
    recorded = {round(v, 6) for chunk in training_pairs(work) for v in chunk["scale"].tolist()}
    assert len(seen) == SETTINGS.train_steps * 7 and all(s.shape == (SETTINGS.batch,) for s in seen)
    used = {round(v, 6) for s in seen for v in s.tolist()}
    assert used == recorded and len(recorded) == SETTINGS.trajectories


def test_training_lowers_the_objective_and_moves_the_one_pass_towards_cfg(comfy, trained):
    """Over every recorded training pair, the objective of the trained adapters' one pass (the user's path: Apply AGD
    at the trajectory's scale) is well below that of the untrained start, the base model's conditional pass.

    (The per-step losses are those of 4 random pairs, whose losses range over two orders of magnitude with the
    pair's sigma, so a window of them measures mostly which pairs were drawn; the whole set is measured instead.)"""
    adapters, work, _ = trained
    losses = torch.load(work / "training.pt", weights_only=False)["losses"]
    assert len(losses) == SETTINGS.train_steps and all(math.isfinite(v) for v in losses)
    assert adapters.info["scale_low"] == "4.0" and adapters.info["scale_high"] == "6.0"
    assert adapters.info["base_fingerprint"] == new_adapters(model_of(), SPEC, 0).info["base_fingerprint"]
    errors = [e for chunk in training_pairs(work) for e in one_pass_errors(model_of(), adapters, chunk)]
    assert len(errors) == SETTINGS.trajectories
    assert all(one_pass < 0.85 * conditional for one_pass, conditional in errors), errors
    assert sum(e[0] for e in errors) < 0.75 * sum(e[1] for e in errors), errors


def test_an_interrupted_training_resumes_to_the_same_adapters(comfy, trained, tmp_path, monkeypatch):
    """Cancelled after step 105 (the last checkpoint is step 100's), queued again with the same work folder: no
    trajectory is sampled again, training goes on from the checkpoint, and the adapters equal an uninterrupted
    run's."""
    uninterrupted, _, _ = trained
    work = tmp_path / "work"
    sampled = []
    real_sample = comfy_sample.sample
    monkeypatch.setattr(comfy_sample, "sample", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
    reports = []

    def cancel_after_step(done, total):
        reports.append(done)
        if done == SETTINGS.trajectories + INTERRUPT_AFTER:
            model_management.interrupt_current_processing(True)  # what ComfyUI's Cancel does

    try:
        with pytest.raises(model_management.InterruptProcessingException):
            train_agd(*training_setup(), SETTINGS, SPEC, work, progress=cancel_after_step)
    finally:
        model_management.interrupt_current_processing(False)
    assert reports[-1] == SETTINGS.trajectories + INTERRUPT_AFTER
    assert len(sampled) == 2  # one sampling run per chunk
    assert torch.load(work / "training.pt", weights_only=False)["step"] == 100
    chunks = sorted((work / "trajectories").glob("chunk_*.safetensors"))
    written = {p: p.stat().st_mtime_ns for p in chunks}
    assert len(chunks) == 2

    sampled.clear()
    reports.clear()
    resumed = train_agd(*training_setup(), SETTINGS, SPEC, work, progress=lambda done, total: reports.append(done))
    assert sampled == [] and {p: p.stat().st_mtime_ns for p in chunks} == written
    steps = [done - SETTINGS.trajectories for done in reports if done > SETTINGS.trajectories]
    assert steps == list(range(101, SETTINGS.train_steps + 1))
    want, got = uninterrupted.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in want) <= 1e-6


def test_cached_trajectories_are_made_anew_for_other_prompts_or_weights(comfy, tmp_path):
    """The trajectories kept in a work folder (so that an interrupted training resumes) are reused only for the same
    model and prompts: for other prompts, or for other weights, under the same settings and file name, they are
    sampled anew rather than trained on as if they were this model's CFG."""
    model, positive, negative, latent = training_setup()
    settings = TrainingSettings(trajectories=2, trajectory_batch=2, sample_steps=2, seed=0)
    agd_patch.make_trajectories(model, positive, negative, latent, settings, tmp_path)
    other_positive, _ = slim_models.conditioning("sd15", batch=2, seed=9)
    [path] = agd_patch.make_trajectories(model, other_positive, negative, latent, settings, tmp_path)
    assert torch.equal(load_file(str(path))["cond.c_crossattn"], other_positive[0][0])
    other = model_of(seed=1)
    [path] = agd_patch.make_trajectories(other, other_positive, negative, latent, settings, tmp_path)
    chunk = load_file(str(path))
    x, sigma, rows = chunk["x"].float(), chunk["sigma"], chunk["row"]
    with torch.no_grad():
        cond = other.model.apply_model(x, sigma, c_crossattn=chunk["cond.c_crossattn"][rows], transformer_options={})
        uncond = other.model.apply_model(x, sigma, c_crossattn=negative[0][0][rows], transformer_options={})
    want = uncond + chunk["scale"].view(-1, 1, 1, 1) * (cond - uncond)
    assert rel_err(chunk["target"], want) < 2e-3


def test_a_trajectory_batch_that_would_drop_prompts_is_refused(comfy, tmp_path):
    """ComfyUI cuts a batched positive to the latent batch: with 2 prompts and trajectories of 3, one prompt would be
    trained on twice as often as the other, so the training stops before sampling and says what to set."""
    model, positive, negative, latent = training_setup()
    settings = TrainingSettings(trajectories=3, trajectory_batch=3, sample_steps=1, seed=0)
    with pytest.raises(ValueError, match="batch of 2 prompts.*multiple of 2"):
        agd_patch.make_trajectories(model, positive, negative, latent, settings, tmp_path)
    assert not list(tmp_path.glob("chunk_*"))


# 8. Ordinary trajectories (the paper's ablation) ---------------------------------------------------------------------


def test_ordinary_trajectories_are_clean_latents_noised_forward(comfy, tmp_path):
    """With `clean` latents (three, for four trajectories in chunks of two: taken in turn, from the first again when
    they run out), each model call is at its clean latent noised forward to the schedule's sigma with fresh noise,
    x = x0 + σ ε (eps), and its target is CFG of the model at that state with the trajectory's scale."""
    model, positive, negative, _ = setup()
    clean = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    settings = TrainingSettings(trajectories=4, trajectory_batch=2, scale_low=2.0, scale_high=8.0, sample_steps=4,
                                seed=1, ordinary=True)
    paths = agd_patch.make_trajectories(model, positive, negative, clean, settings, tmp_path, clean=clean)
    assert len(paths) == 2
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy_samplers.calculate_sigmas(model_sampling, "normal", 4)
    clean_in = model.model.process_latent_in(clean)
    scales = []
    for path, images in zip(paths, ([0, 1], [2, 0])):
        chunk = load_file(str(path))
        rows = chunk["row"]
        assert rows.tolist() == [0, 1] * 4
        assert torch.allclose(chunk["sigma"], sigmas[:-1].repeat_interleave(2))
        x, sigma, scale = chunk["x"].float(), chunk["sigma"], chunk["scale"]
        noise = (x - clean_in[torch.tensor(images)][rows]) / sigma.view(-1, 1, 1, 1)
        assert abs(noise.std().item() - 1) < 0.15 and abs(noise.mean().item()) < 0.15
        assert abs(torch.corrcoef(noise[rows == 0].flatten(1))[0, 1]) < 0.5  # fresh noise at each call
        with torch.no_grad():
            cond = model.model.apply_model(x, sigma, c_crossattn=chunk["cond.c_crossattn"][rows],
                                           transformer_options={})
            uncond = model.model.apply_model(x, sigma, c_crossattn=negative[0][0][rows], transformer_options={})
        want = uncond + scale.view(-1, 1, 1, 1) * (cond - uncond)
        assert rel_err(chunk["target"], want) < 2e-3  # stored as float16
        scales += scale[:2].tolist()
    assert len(set(scales)) == 4 and all(2 <= s <= 8 for s in scales)


# 9. Mask -------------------------------------------------------------------------------------------------------------


def test_mask_ones_zeros_half_and_a_batch_that_fits_nothing(comfy):
    model, positive, negative, latent = setup()
    adapters = random_adapters(model)
    plain = sample(apply_agd(model, adapters, AGD_SCALE), positive, negative, latent)
    ones = sample(apply_agd(model, adapters, AGD_SCALE, mask=torch.ones(1, 32, 32)), positive, negative, latent)
    assert torch.equal(ones, plain)
    zeros = sample(apply_agd(model, adapters, AGD_SCALE, mask=torch.zeros(2, 32, 32)), positive, negative, latent)
    base = sample(model, positive, negative, latent)
    assert torch.equal(zeros, base)
    half = torch.zeros(1, 32, 32)
    half[..., :16] = 1
    split = sample(apply_agd(model, adapters, AGD_SCALE, mask=half), positive, negative, latent)
    assert rel_err(split, plain) > 1e-3 and rel_err(split, base) > 1e-3
    with pytest.raises(ValueError) as refusal:
        sample(apply_agd(model, adapters, AGD_SCALE, mask=torch.ones(3, 32, 32)), positive, negative, latent)
    assert f"{DISPLAY_NAME}: mask has 3 images for a latent batch of 2: give 1" in str(refusal.value)


def test_mask_weights_follow_the_token_order_of_each_layer():
    """At a layer of 4 x 4 tokens (row-major, as SpatialTransformer flattens them), a left-half mask weighs the
    first two tokens of every row; with the batch's chunks (cond, uncond) each chunk gets the images' masks."""
    half = torch.zeros(2, 32, 32)
    half[0, :, :16] = 1
    patch = agd_patch.AGDPatch(None, AGD_SCALE, half)
    weights = patch.token_weights({"activations_shape": [4, 64, 4, 4], "cond_or_uncond": [0, 1]}, {},
                                  torch.empty(4, 16, 64))
    assert weights.shape == (4, 16, 1)
    left = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(4)
    for row, image in enumerate([0, 1, 0, 1]):
        assert torch.equal(weights[row, :, 0], left if image == 0 else torch.zeros(16))


# 10. Schedule and loss against their definitions ---------------------------------------------------------------------


@pytest.mark.parametrize("total", [10, 37, 120])
def test_learning_rate_schedule_equals_the_official_torch_schedulers(total):
    """The official `get_opt_scheduler`: LinearLR(start 1e-4) over the first total // 10 steps, then
    CosineAnnealingLR(T_max = total − warm-up, eta_min = lr · 1e-4), joined by SequentialLR; the rate of every
    step."""
    lr = 3e-4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warmup = total // 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's own deprecated call of step(epoch)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[
            torch.optim.lr_scheduler.LinearLR(optimizer, 1e-4, 1, warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total - warmup, eta_min=lr * 1e-4)],
            milestones=[warmup])
        for step in range(total):
            official = optimizer.param_groups[0]["lr"]
            assert lr * agd.learning_rate_factor(step, total) == pytest.approx(official, rel=1e-6, abs=1e-12), step
            optimizer.step()
            scheduler.step()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_distillation_loss_is_the_mse_of_the_raw_output(comfy, prediction):
    """On denoised predictions made by ComfyUI's model_sampling from raw outputs, the loss weighted by
    output_scale is the plain mean squared error of the raw outputs (ε for eps models, v for v models)."""
    model_sampling = model_of("sd15", prediction).get_model_object("model_sampling")
    generator = torch.Generator().manual_seed(0)
    x, student, target = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.05, 1.3, 14.0])
    loss = agd.distillation_loss(model_sampling.calculate_denoised(sigma, student, x),
                                 model_sampling.calculate_denoised(sigma, target, x),
                                 agd_patch.output_scale(model_sampling, sigma))
    assert loss.item() == pytest.approx((student - target).square().mean().item(), rel=1e-5)


# The nodes -----------------------------------------------------------------------------------------------------------


def test_train_node_saves_adapters_that_the_apply_node_loads(comfy, adapter_folder):
    """Train AGD Adapters (a minute run) saves its file in models/agd_adapters and removes its work folder; Adapter
    Guidance Distillation loads it by name, within its trained scale range."""
    model, positive, negative, latent = setup()
    train = comfy.NODE_CLASS_MAPPINGS[TRAIN_NODE_ID]
    [path] = train.execute(model, positive, negative, latent, 2.0, 5.0, 2, 2, "euler", "normal", 2, 2, 2, 1e-3, 8, 0,
                           "tiny").result
    assert path == str(adapter_folder / "tiny.safetensors") and not (adapter_folder / "tiny.training").exists()
    loaded = agd_patch.read_adapter_file(path)
    assert loaded.info["scale_low"] == "2.0" and loaded.info["scale_high"] == "5.0" and loaded.spec == SPEC
    apply = comfy.NODE_CLASS_MAPPINGS[NODE_ID]
    [patched] = apply.execute(model, "tiny.safetensors", 3.0, "exact weights").result
    assert rel_err(sample(patched, positive, negative, latent), sample(model, positive, negative, latent)) > 0
    trained_range = f"^{re.escape(DISPLAY_NAME)}: these adapters were trained on guidance scales 2 to 5"
    with pytest.raises(ValueError, match=trained_range):
        apply.execute(model, "tiny.safetensors", 6.0, "exact weights")
