"""LinearAG in real ComfyUI sampling: the fit recovers the regression, the estimate replaces exactly the planned
unconditional rows, saved coefficients round-trip, and coefficients for another schedule, step count or model are
refused with a message that says so."""

import pytest
import torch

import slim_models
from test_adaptive import CFG, Recorder, RowCounter, one_torch_thread, setup  # noqa: F401  (the fixture is autouse there)
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


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd15", "v"), ("flux", "flow")],
                         ids=["sd15-eps", "sd15-v", "flux-flow"])
def test_estimate_matches_float64_reference(comfy, patch_module, family, prediction):
    """At the estimated calls (1 and 3 of 8) CFG is handed D̂_u = x − σ ε̂_u, ε̂_u = a ε_c(i) + b ε_c(i−1) + c ε_u(i−1),
    with the true noise directions ε = (x − D)/σ of this call and the previous one, in float64; every other call is
    CFG's (γ̄ = 1: no AG switch)."""
    from comfyui_guidance.guiders.adaptive import AGConfig

    model, positive, negative, latent = setup(family, prediction)
    fitted = patch_module.fit_linear_ag(model, positive, negative, latent["samples"], "euler", "normal", 8, CFG, 5,
                                        images=2, batch=2)
    rec = Recorder()  # keeps each call's sigma too
    slim_models.ksample(rec.around(model, lambda m: patch_module.apply_ag(m, AGConfig(1.0), fitted)), positive,
                        negative, latent, cfg=CFG, steps=8)
    assert len(rec.guided) == 8

    def eps(i, denoised):
        return (rec.x[i] - denoised) / rec.sigma[i]

    for i, (x, cond, uncond, got) in enumerate(zip(rec.x, rec.cond, rec.uncond, rec.guided)):
        tolerance = 1e-5
        if i in (1, 3):
            # D̂_u = x − σ ε̂_u in float32 at σ ≫ |D| loses about |x|/|D| ulps, which CFG's w − 1 = 5 amplifies: up to
            # 3e-5 here; a wrong coefficient or term is off by the size of that term (≥ 1e-2).
            tolerance = 1e-4
            a, b, c = fitted.coefficients[i].tolist()
            estimate = x - rec.sigma[i] * (a * eps(i, cond) + b * eps(i - 1, rec.cond[i - 1])
                                           + c * eps(i - 1, rec.uncond[i - 1]))
            assert rel_err(estimate, uncond) > 1e-6  # the estimate, not the true pass, is what CFG got
            uncond = estimate
        assert rel_err(got, uncond + CFG * (cond - uncond)) < tolerance, f"call {i}"
