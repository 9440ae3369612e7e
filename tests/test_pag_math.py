"""PAG's combination against a float64 transcription of the paper's rule, its scale schedule, and the identity
attention against attention whose map is forced to the identity."""

import pytest
import torch

from comfyui_guidance.guiders.pag import PAGConfig, identity_attention, pag_guided


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def predictions(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=g) * 3
    return cond, cond + torch.randn(shape, generator=g), cond + 0.5 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 16, 3, 8, 8)], ids=["4d-image", "5d-video"])
@pytest.mark.parametrize("w,s", [(7.5, 3.0), (4.0, 5.0), (1.0, 3.0), (6.0, 0.0)])
def test_matches_float64_paper_rule(shape, w, s):
    """ε̃ = ε_u + w (ε_c − ε_u) + s (ε_c − ε̂), and ε_c + s (ε_c − ε̂) for PAG alone (the CFG result at w = 1)."""
    cond, uncond, perturbed = predictions(shape)
    c, u, p = cond.double(), uncond.double(), perturbed.double()
    expected = (c + s * (c - p)) if w == 1.0 else (u + w * (c - u) + s * (c - p))
    cfg = cond if w == 1.0 else uncond + w * (cond - uncond)
    assert rel_err(pag_guided(cfg, cond, perturbed, s), expected) < 1e-6


def test_denoised_form_is_the_papers_noise_form():
    """On denoised predictions D = x − σ ε the rule gives exactly x − σ ε̃ (what ComfyUI's samplers combine)."""
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 5, 4.2
    eps_c, eps_u, eps_p = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    w, s = 5.0, 3.0
    eps_guided = eps_u + w * (eps_c - eps_u) + s * (eps_c - eps_p)
    d_c, d_u, d_p = (x - sigma * e for e in (eps_c, eps_u, eps_p))
    got = pag_guided(d_u + w * (d_c - d_u), d_c, d_p, s)
    assert torch.allclose(got, x - sigma * eps_guided, rtol=0, atol=1e-12)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        pag_guided(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 8, 8), 3.0)


@pytest.mark.parametrize("sigma,timestep,expected", [
    (14.6, 999.0, 3.0 - 0.004 * 1.0),  # first step: almost the full scale
    (1.0, 500.0, 3.0 - 0.004 * 500.0),
    (0.1, 100.0, 0.0),  # the schedule has reached 0 (3 - 0.004 * 900 < 0) and stays there
    (20.0, 999.0, 0.0),  # above sigma_start
    (0.01, 10.0, 0.0),  # below sigma_end
])
def test_adaptive_scale_and_sigma_range(sigma, timestep, expected):
    config = PAGConfig(scale=3.0, adaptive_scale=0.004, sigma_start=15.0, sigma_end=0.05)
    assert config.scale_at(sigma, timestep) == pytest.approx(expected)


def test_constant_scale_by_default():
    config = PAGConfig()
    assert (config.scale, config.adaptive_scale) == (3.0, 0.0)
    assert config.scale_at(14.6, 999.0) == config.scale_at(0.03, 2.0) == 3.0


@pytest.mark.parametrize("settings,message", [
    ({"sigma_start": 1.0, "sigma_end": 2.0}, "sigma_start"),
    ({"scale": -1.0}, "negative"),
    ({"adaptive_scale": -0.1}, "negative"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PAGConfig(**settings)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_identity_attention_is_attention_with_the_identity_map(skip_reshape, skip_output_reshape):
    """V laid out as an attention output equals scaled-dot-product attention whose map is masked to the diagonal
    (softmax of a row with one finite logit is that row of the identity), in every layout attention functions use."""
    g = torch.Generator().manual_seed(5)
    batch, heads, tokens, dim = 3, 4, 10, 8
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64) for _ in range(3))
    diagonal_only = torch.full((tokens, tokens), float("-inf"), dtype=torch.float64).fill_diagonal_(0.0)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=diagonal_only)  # [B, H, N, d]
    if not skip_output_reshape:
        reference = reference.transpose(1, 2).reshape(batch, tokens, heads * dim)
    v_in = v if skip_reshape else v.transpose(1, 2).reshape(batch, tokens, heads * dim)
    got = identity_attention(v_in, heads, skip_reshape, skip_output_reshape)
    assert got.shape == reference.shape
    assert torch.allclose(got, reference, rtol=0, atol=1e-12)


def test_identity_attention_takes_per_head_values():
    """MMDiT passes V as [B, N, heads, d] without skip_reshape; the output is still [B, N, heads·d]."""
    v = torch.randn(2, 6, 4, 8)
    assert torch.equal(identity_attention(v, 4), v.reshape(2, 6, 32))
