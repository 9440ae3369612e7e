"""LinearAG in real ComfyUI sampling: the fit recovers the regression, the estimate replaces exactly the planned
unconditional rows, saved coefficients round-trip, and coefficients for another schedule, step count or model are
refused with a message that says so."""

import pytest
import torch

import slim_models
from test_adaptive import CFG, RowCounter, one_torch_thread, setup  # noqa: F401  (the fixture is autouse there)
from test_pag_sampling import rel_err


@pytest.fixture(scope="module")
def patch_module(pack):
    import importlib

    return importlib.import_module("comfyui_guidance.nodes.adaptive_patch")


@pytest.fixture(scope="module")
def fitted(patch_module):
    model, positive, negative, latent = setup()
    return patch_module.fit_linear_ag(model, positive, negative, latent["samples"], "euler", "normal", 8, CFG, 3,
                                      images=4, batch=2)


def test_fit_describes_its_schedule_and_model(fitted, patch_module):
    assert fitted.coefficients.shape == (8, 3)
    assert fitted.info["estimated_calls"] == [1, 3]
    assert not torch.isnan(fitted.coefficients[[1, 3]]).any() and torch.isnan(fitted.coefficients[[0, 2, 4]]).all()
    assert len(fitted.schedule) == 9 and len(fitted.call_sigmas) == 8
    assert fitted.info["model_fingerprint"] == patch_module.model_fingerprint(setup()[0])
    assert all(r < 0.5 for r in fitted.info["relative_residual"].values())


def test_estimated_calls_skip_exactly_their_unconditional_rows(comfy, monkeypatch, fitted, patch_module, tmp_path):
    """Rows per call at γ̄ = 1 (estimates only), batch of 2: 4 everywhere but calls 1 and 3, where only the
    conditional rows run; the result stays near CFG's; coefficients survive saving and loading."""
    model, positive, negative, latent = setup()
    from comfyui_guidance.guiders.adaptive import AGConfig

    path = tmp_path / "c.safetensors"
    fitted.save(path)
    loaded = patch_module.LinearAGCoefficients.load(path)
    assert torch.equal(loaded.coefficients.nan_to_num(), fitted.coefficients.nan_to_num())
    counter = RowCounter(monkeypatch, model)
    out = slim_models.ksample(patch_module.apply_ag(model, AGConfig(1.0), loaded), positive, negative, latent,
                              cfg=CFG, steps=8)["samples"]
    assert counter.rows == [4, 2, 4, 2, 4, 4, 4, 4]
    plain = slim_models.ksample(model, positive, negative, latent, cfg=CFG, steps=8)["samples"]
    assert 0 < rel_err(out, plain) < 0.5


def test_other_schedule_or_model_is_refused(comfy, fitted, patch_module):
    from comfyui_guidance.guiders.adaptive import AGConfig

    model, positive, negative, latent = setup()
    patched = patch_module.apply_ag(model, AGConfig(), fitted, patch_module.LINEAR_DISPLAY_NAME)
    with pytest.raises(ValueError, match=r"fitted for euler / normal, 8 steps.*this run samples 6 steps"):
        slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=6)
    with pytest.raises(ValueError, match="fitted for euler / normal, 8 steps"):
        slim_models.ksample(patched, positive, negative, latent, cfg=CFG, steps=8, scheduler="karras")
    other = slim_models.build_model("sd15", "eps", seed=1)
    with pytest.raises(ValueError, match="fitted for another model"):
        patch_module.check_model(fitted, other, patch_module.LINEAR_DISPLAY_NAME)
    patch_module.check_model(fitted, model, patch_module.LINEAR_DISPLAY_NAME)
