"""The slim test models behave like the real families: they sample through ComfyUI and the fixture checkpoints
load with the stock loader, text encoders and VAE included."""

import logging

import comfy.model_sampling
import comfy.sd
import comfy.supported_models
import pytest
import slim_models
import torch

PREDICTION_CLASSES = {"eps": comfy.model_sampling.EPS, "v": comfy.model_sampling.V_PREDICTION,
                      "flow": comfy.model_sampling.CONST}
CASES = [(f, p) for f, spec in slim_models.FAMILIES.items() for p in spec.predictions]


@pytest.mark.parametrize(("family", "prediction"), CASES)
def test_family_samples_per_prompt(family, prediction):
    """Every family/prediction samples a batch of two prompts to finite latents that differ per prompt."""
    model = slim_models.build_model(family, prediction)
    assert isinstance(model.model.model_sampling, PREDICTION_CLASSES[prediction])
    positive, negative = slim_models.conditioning(family, batch=2)
    latent = slim_models.empty_latent(family, batch=2)
    out = slim_models.ksample(model, positive, negative, latent, cfg=5.0, steps=3)["samples"]
    assert out.shape == latent["samples"].shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_video_latent_is_5d():
    """Wan latents are [B, 16, T, H, W], with T = 1 + (frames - 1) / 4."""
    assert slim_models.empty_latent("wan21", batch=2, height=64, width=96, length=9)["samples"].shape == (
        2, 16, 3, 8, 12)


def test_custom_advanced_matches_ksampler():
    """The SamplerCustomAdvanced graph with CFGGuider gives the KSampler result, bit for bit."""
    model = slim_models.build_model("sd15")
    positive, negative = slim_models.conditioning("sd15")
    latent = slim_models.empty_latent("sd15")
    args = dict(cfg=6.0, steps=3, sampler="euler", scheduler="normal", seed=7)
    plain = slim_models.ksample(model, positive, negative, latent, **args)["samples"]
    custom = slim_models.sample_custom_advanced(model, positive, negative, latent, **args)["samples"]
    assert torch.equal(plain, custom)


def test_weights_follow_seed():
    """Same seed, same weights; another seed, other weights."""
    first, again, other = (slim_models.build_model("sdxl", seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="flux supports"):
        slim_models.build_model("flux", "eps")


@pytest.mark.parametrize(("name", "config_class"), [
    ("v1-5-pruned-emaonly.safetensors", comfy.supported_models.SD15),
    ("sd_xl_base_1.0.safetensors", comfy.supported_models.SDXL),
])
def test_checkpoint_loads_with_stock_loader(caplog, name, config_class):
    """The stock loader detects exactly SD1.5 / SDXL, finds every weight it wants (UNet, text encoders, VAE) and
    none it does not, and all three parts run."""
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(slim_models.cached_checkpoint(name)))
    assert type(model.model.model_config) is config_class
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a red fox in the snow"), return_pooled=True)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all() and cond.std() > 0
    latent = slim_models.ksample(model, [[cond, {"pooled_output": pooled}]], [[cond * 0, {"pooled_output": pooled}]],
                                 {"samples": torch.zeros(1, 4, 8, 8)}, cfg=5.0, steps=2)
    image = vae.decode(latent["samples"])
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and image.std() > 0
