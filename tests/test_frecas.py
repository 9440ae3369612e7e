"""FreCaS (guiders/frecas.py, nodes/frecas_patch.py) inside real ComfyUI sampling, against float64 references of the
paper's procedure and transcriptions of the official code (github.com/xtudbxk/FreCaS, utils/scheduler_wrapper.py,
utils/facfg_wrapper.py, utils/camap_wrapper.py):

- the stage plan: timesteps per stage, the next stage's first timestep (VP and flow rules), stage sizes, refusals;
- FA-CFG: the official band split of the update, on any parameterisation's denoised predictions, 4-D and 5-D;
- whole runs (eps, v, flow): every model call's state replayed in float64 from the recorded raw predictions, stage
  by stage (Euler steps, FA-CFG, nearest upsampling, renoising with the stage's seed);
- cross-attention map fusion on UNets, every attn2 call against an explicit softmax(QKᵀ/√d) reference;
- masks, isolation between runs, refusals, interrupt, progress, the VAE transition.
"""

import math

import comfy.model_sampling
import comfy.sd
import comfy.taesd.taesd
from comfy import model_management
from comfy import sample as comfy_sample
from comfy import utils as comfy_utils
import pytest
import torch
import torch.nn.functional as F

import slim_models
from comfyui_guidance.guiders import frecas
from comfyui_guidance.kernels import frequency
from comfyui_guidance.nodes import frecas_patch
from comfyui_guidance.nodes.frecas_patch import FreCaSSettings, sample_frecas
from test_pag_sampling import one_torch_thread, rel_err, slim_model  # noqa: F401 (autouse: one torch thread)

NAME = "FreCaS Sampler"
CFG, CFG_HIGH = 5.0, 20.0


def settings(steps=(3, 2), ends=(300, 0), gamma=3.0, cfg=CFG, cfg_high=CFG_HIGH, attention_fusion=0.0,
             sampler_name="ddim"):
    return FreCaSSettings(tuple(steps), tuple(ends), gamma, cfg, cfg_high, attention_fusion, sampler_name)


def setup(family="sd15", prediction="eps", batch=2, size=32):
    model = slim_model(family, prediction)
    positive, negative = slim_models.conditioning(family, batch=batch)
    return model, positive, negative, slim_models.empty_latent(family, batch=batch, height=size, width=size)


# Transcriptions of the official code (utils/scheduler_wrapper.py), in float64 ---------------------------------------

def official_next_start(alphas_cumprod, ot, os, ts, factor):
    """`get_next_starttimestep`."""
    s = (os / ts) ** factor
    ac = alphas_cumprod.double()
    last = ac[ot]
    target = s * last / (1 + (s - 1) * last)
    return int(ac.shape[0] - torch.searchsorted(torch.flip(ac, dims=(0,)), target, right=True))


def official_next_start_rf(ot, os, ts):
    """`get_next_starttimestep_rf`."""
    toshift = (ts / os) ** 0.5
    return int(1000 * toshift * ot / (1000 + (toshift - 1) * ot))


def official_plan(sizes, steps, ends, next_start):
    """`set_timesteps` of the wrapped scheduler: per stage the DDIM timesteps (1000 steps, linspace spacing, i.e.
    999 … 0) at indices 999 − ⌊linspace(st, et, n)⌋; the next start from the side that grows most."""
    all_timesteps = torch.arange(999, -1, -1)  # DDIMScheduler.set_timesteps(1000), timestep_spacing "linspace"
    plan, st = [], 999
    for si, (et, n) in enumerate(zip(ends, steps)):
        indexs = 999 - torch.linspace(st, et, steps=n).to(torch.int32)
        plan.append(tuple(all_timesteps[indexs].tolist()))
        if si < len(sizes) - 1:
            (osh, osw), (tsh, tsw) = sizes[si], sizes[si + 1]
            os, ts = (osh, tsh) if tsh / osh > tsw / osw else (osw, tsw)
            st = next_start(et, os, ts)
    return plan


def diffusers_sd_alphas_cumprod():
    """The SD/SDXL DDPM schedule as diffusers builds it (scaled_linear, float32)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def comfy_alphas_cumprod(model):
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    return 1.0 / (1.0 + sigmas**2)


# 1. The stage plan ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("end", [0, 1, 50, 100, 200, 300, 400, 600, 850, 998])
@pytest.mark.parametrize("ratio,gamma", [(2.0, 1.5), (2.0, 2.0), (2.0, 3.0), (1.5, 3.0), (4.0, 1.0), (1.25, 0.0)])
def test_next_start_matches_official_rules(comfy, end, ratio, gamma):
    """VP: the official `get_next_starttimestep` on the model's own DDPM schedule; flow: `get_next_starttimestep_rf`
    (γ = 1), on sizes of that ratio."""
    alphas = comfy_alphas_cumprod(slim_model("sd15", "eps"))
    os, ts = 64, round(64 * ratio)
    want = min(official_next_start(alphas, end, os, ts, gamma), 999)
    assert frecas.next_start_vp(alphas, end, ts / os, gamma) == want
    if gamma == 1.0:
        assert frecas.next_start_flow(end, ts / os) == min(official_next_start_rf(end, os, ts), 999)
    # the VP rule keeps the noise per low-frequency component: SNR' = (os/ts)^γ SNR at the start, above at the step
    if gamma > 0 and want < 999:
        snr = alphas / (1 - alphas)
        assert snr[want] <= (os / ts) ** gamma * snr[end] * (1 + 1e-9) < snr[want - 1]


def test_flow_rule_scales_by_gamma():
    """γ ≠ 1 shifts by k = ratio^(γ/2); γ = 0 keeps the end timestep."""
    assert frecas.next_start_flow(300, 4.0, 2.0) == int(1000 * 4 * 300 / (1000 + 3 * 300))
    assert frecas.next_start_flow(300, 4.0, 0.0) == 300


@pytest.mark.parametrize("steps,ends,gamma,pixels", [
    ((40, 10), (200, 0), 1.5, [(1024, 1024), (2048, 2048)]),  # SDXL 2048
    ((30, 5, 15), (400, 200, 0), 2.0, [(1024, 1024), (2048, 2048), (4096, 4096)]),  # SDXL 4096
    ((40, 10), (100, 0), 3.0, [(512, 512), (1024, 1024)]),  # SD2.1 1024
    ((30, 10, 10), (200, 200, 0), 3.0, [(512, 512), (1024, 1024), (2048, 2048)]),  # SD2.1 2048
])
def test_official_plans_give_the_official_timesteps(comfy, steps, ends, gamma, pixels):
    """The official test.sh settings: the plan from ComfyUI's schedule is the wrapped DDIM scheduler's `timesteps`
    on diffusers' float32 schedule (stage i: ⌊linspace(t_start, t_end, n)⌋), at latent sizes /8."""
    sizes = frecas.stage_sizes((pixels[0][0] // 8, pixels[0][1] // 8), (pixels[-1][0] // 8, pixels[-1][1] // 8),
                               len(steps))
    assert sizes == [(h // 8, w // 8) for h, w in pixels]
    stages = frecas.plan_stages(sizes, steps, ends, gamma, comfy_alphas_cumprod(slim_model("sd15", "eps")))
    alphas = diffusers_sd_alphas_cumprod()
    want = official_plan(pixels, steps, ends, lambda et, os, ts: official_next_start(alphas, et, os, ts, gamma))
    assert [s.timesteps for s in stages] == want
    assert [s.size for s in stages] == sizes
    assert [len(s.timesteps) for s in stages] == list(steps)
    if ends == (200, 0):
        assert stages[0].timesteps[:3] == (999, 978, 958) and stages[0].timesteps[-1] == 200


def test_sd3_official_plan(comfy):
    """SD3 1024→2048 (20, 8 steps, ends 50, 0): the second stage starts at `get_next_starttimestep_rf`."""
    stages = frecas.plan_stages([(128, 128), (256, 256)], (20, 8), (50, 0), 1.0, None)
    start = official_next_start_rf(50, 1024, 2048)
    assert [s.timesteps for s in stages] == official_plan([(1024, 1024), (2048, 2048)], (20, 8), (50, 0),
                                                          lambda et, os, ts: official_next_start_rf(et, os, ts))
    assert stages[1].timesteps[0] == start == 69  # ⌊1000·√2·50 / (1000 + (√2 − 1)·50)⌋


def test_stage_sizes_are_geometric():
    assert frecas.stage_sizes((64, 64), (256, 256), 3) == [(64, 64), (128, 128), (256, 256)]
    assert frecas.stage_sizes((64, 96), (128, 192), 2) == [(64, 96), (128, 192)]
    assert frecas.stage_sizes((64, 64), (90, 90), 3) == [(64, 64), (76, 76), (90, 90)]  # 64·(90/64)^½ = 75.9
    with pytest.raises(ValueError, match="must be larger"):
        frecas.stage_sizes((64, 64), (64, 64), 2)
    with pytest.raises(ValueError, match="must be larger"):
        frecas.stage_sizes((64, 64), (128, 32), 2)


@pytest.mark.parametrize("steps,ends,message", [
    ((40, 10), (200,), "steps gives 2 stages and stage_ends 1"),
    ((40,), (0,), "at least two stages"),
    ((40, 0), (200, 0), "at least one step"),
    ((40, 10), (200, 10), "must end at timestep 0"),
    ((40, 10, 5), (1000, 200, 0), "stage_ends are timesteps in [0, 999)"),
    ((40, 10, 5), (200, 300, 0), "must not rise from stage to stage"),
])
def test_bad_plans_are_refused(steps, ends, message):
    with pytest.raises(ValueError) as refusal:
        frecas.check_plan(steps, ends)
    assert message in str(refusal.value)


def test_plan_refuses_a_stage_that_would_not_fall(comfy):
    """γ = 0 on flow: stage 2 would start at timestep 300 and end there."""
    with pytest.raises(ValueError, match="stage 2 would start at timestep 300, not above its end 300"):
        frecas.plan_stages([(4, 4), (8, 8), (16, 16)], (3, 2, 2), (300, 300, 0), 0.0, None)
    # the same ends at γ > 0 (the official SD2.1 2048 plan has equal ends): stage 2 starts above 300
    stages = frecas.plan_stages([(4, 4), (8, 8), (16, 16)], (3, 2, 2), (300, 300, 0), 1.0, None)
    assert stages[1].timesteps[0] > 300


def test_parse_int_list():
    assert frecas.parse_int_list("40, 10", "steps") == (40, 10)
    assert frecas.parse_int_list(" 30 5,15 ", "steps") == (30, 5, 15)
    for bad in ("", "4o, 10", "1.5, 2"):
        with pytest.raises(ValueError, match="steps"):
            frecas.parse_int_list(bad, "steps")


# 2. FA-CFG ------------------------------------------------------------------------------------------------------------

def official_fa_cfg(cond, uncond, size, w_low, w_high):
    """`facfg_forward` in float64: each prediction split by `freq_decompose` (bilinear down to `size` and back)
    into [high, low], then Σ_band u + w_band (c − u)."""
    def decompose(x):
        low = F.interpolate(F.interpolate(x, size=size, mode="bilinear"), size=x.shape[-2:], mode="bilinear")
        return [x - low, low]
    return sum(u + w * (c - u) for u, c, w in zip(decompose(uncond.double()), decompose(cond.double()),
                                                  (w_high, w_low)))


@pytest.mark.parametrize("shape,low", [((2, 4, 8, 8), (4, 4)), ((1, 4, 12, 16), (6, 8)), ((2, 16, 10, 6), (7, 4))])
def test_fa_cfg_equals_the_official_formula(shape, low):
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    got = frecas.fa_cfg(cond, uncond, low, 7.5, 35.0)
    assert rel_err(got, official_fa_cfg(cond, uncond, low, 7.5, 35.0)) < 1e-12
    assert rel_err(frecas.fa_cfg(cond.float(), uncond.float(), low, 7.5, 35.0), got) < 1e-6
    assert rel_err(got, uncond + 7.5 * (cond - uncond)) > 1e-2  # the high band is weighted apart
    # w_l = w_h: CFG
    assert rel_err(frecas.fa_cfg(cond, uncond, low, 6.0, 6.0), uncond + 6.0 * (cond - uncond)) < 1e-6
    # low band: what survives the round trip; high: the rest (float64 for an exact split)
    delta = cond - uncond
    low_band = frequency.low_pass(delta, low)
    assert rel_err(low_band, official_fa_cfg(cond, uncond, low, 1.0, 0.0) - uncond.double()) < 1e-12
    assert rel_err(frequency.weight_bands(delta, low, 0.0, 1.0), delta - low_band) < 1e-12


def test_fa_cfg_acts_per_frame_on_video_latents():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 16, 3, 8, 10, generator=g), torch.randn(2, 16, 3, 8, 10, generator=g)
    got = frecas.fa_cfg(cond, uncond, (4, 5), 3.0, 11.0)
    assert got.shape == cond.shape
    for t in range(3):
        want = official_fa_cfg(cond[:, :, t], uncond[:, :, t], (4, 5), 3.0, 11.0)
        assert rel_err(got[:, :, t], want) < 1e-6
    with pytest.raises(ValueError, match="4-D"):
        frequency.low_pass(torch.zeros(2, 3, 4), (2, 2))


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd15", "v"), ("sd3", "flow")])
def test_fa_cfg_on_denoised_is_fa_cfg_on_the_model_output(comfy, family, prediction):
    """The official code weights the bands of the model's output (ε); FA-CFG on the denoised predictions
    D = a(σ)·x + b(σ)·output (ComfyUI's own `calculate_denoised`) is the same guided prediction."""
    sampling = slim_model(family, prediction).get_model_object("model_sampling")
    g = torch.Generator().manual_seed(2)
    channels = 16 if family == "sd3" else 4
    x, out_c, out_u = (torch.randn(2, channels, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for sigma in (float(sampling.sigma_max) * 0.9, 1.0, 0.3):
        s = torch.tensor([sigma, sigma], dtype=torch.float64)
        d_c, d_u = sampling.calculate_denoised(s, out_c, x), sampling.calculate_denoised(s, out_u, x)
        on_outputs = sampling.calculate_denoised(s, official_fa_cfg(out_c, out_u, (4, 4), 7.5, 35.0), x)
        assert rel_err(frecas.fa_cfg(d_c, d_u, (4, 4), 7.5, 35.0), on_outputs) < 1e-9


# 3. Whole runs against the paper's procedure -------------------------------------------------------------------------

class Recorder:
    """A pre-CFG hook (raw predictions of each model call: state, sigma, D_c, D_u) and a post-CFG hook (the guided
    prediction), placed on the model before FreCaS patches it."""

    def __init__(self):
        self.calls, self.guided = [], []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; keep recording here
        return self

    def pre(self, args):
        cond, uncond = args["conds_out"][:2]
        self.calls.append((args["input"].double(), float(args["sigma"][0]), cond.double(), uncond.double()))
        return args["conds_out"]

    def post(self, args):
        self.guided.append(args["denoised"].double())
        return args["denoised"]

    def around(self, model):
        recorded = model.clone()
        recorded.set_model_sampler_pre_cfg_function(self.pre)
        recorded.set_model_sampler_post_cfg_function(self.post)
        return recorded


def reference_sigmas(model, timesteps):
    """σ of each planned timestep: VP σ_t = √((1 − ᾱ_t)/ᾱ_t) of the model's DDPM schedule; flow: the shifted σ at
    (t + 1)/1000 (the official SD3 scheduler's sigma at index 999 − t)."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        shift = float(sampling.shift)
        s = [(t + 1) / 1000 for t in timesteps]
        return [shift * v / (1 + (shift - 1) * v) for v in s]
    alphas = comfy_alphas_cumprod(model)
    return [math.sqrt((1 - alphas[t].item()) / alphas[t].item()) for t in timesteps]


def nearest_up(x, size):
    fh, fw = size[0] // x.shape[-2], size[1] // x.shape[-1]
    assert (fh * x.shape[-2], fw * x.shape[-1]) == tuple(size)
    return x.repeat_interleave(fh, dim=-2).repeat_interleave(fw, dim=-1)


def replay(model, recorder, plan, sizes, seed, guidance, flow, tol=1e-5):
    """The paper's run in float64 on the recorded predictions: per stage Euler (= DDIM) steps over the stage's
    sigmas down to 0 with the guided prediction `guidance(stage, cond, uncond)`, then the clean estimate upsampled
    (nearest) and diffused to the next stage's first sigma with the noise of seed + stage; checks every recorded
    state on the way and returns the final clean latent (ComfyUI's internal latent space)."""
    calls = iter(recorder.calls)
    batch = recorder.calls[0][0].shape[0]
    channels = recorder.calls[0][0].shape[1]
    x0 = None
    for i, (timesteps, size) in enumerate(zip(plan, sizes)):
        sigmas = reference_sigmas(model, timesteps) + [0.0]
        noise = comfy_sample.prepare_noise(torch.zeros(batch, channels, *size), seed + i).double()
        if i == 0:
            x = noise * (sigmas[0] if flow else math.sqrt(1 + sigmas[0] ** 2))  # ComfyUI's full-noise start
        else:
            up = nearest_up(x0, size)
            x = (1 - sigmas[0]) * up + sigmas[0] * noise if flow else up + sigmas[0] * noise
        for sigma, sigma_next in zip(sigmas, sigmas[1:]):
            state, called_sigma, cond, uncond = next(calls)
            assert called_sigma == pytest.approx(sigma, rel=1e-5)
            assert rel_err(state, x) < tol
            denoised = guidance(i, cond, uncond)
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
        x0 = x
    assert next(calls, None) is None
    return x0


def frecas_guidance(plan_sizes, cfg=CFG, cfg_high=CFG_HIGH):
    def guide(stage, cond, uncond):
        if stage == 0:
            return uncond + cfg * (cond - uncond)
        return official_fa_cfg(cond, uncond, plan_sizes[stage - 1], cfg, cfg_high)
    return guide


RUN_CASES = [
    # family, prediction, sampler, steps, ends, gamma
    ("sd15", "eps", "ddim", (3, 2), (300, 0), 3.0),
    ("sd15", "v", "euler", (3, 2), (200, 0), 3.0),
    ("sd15", "eps", "euler", (2, 2, 2), (400, 200, 0), 2.0),
    ("sd3", "flow", "euler", (3, 2), (150, 0), 1.0),
]


@pytest.mark.parametrize("family,prediction,sampler,steps,ends,gamma", RUN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{len(c[3])}stages" for c in RUN_CASES])
def test_run_equals_float64_reference_of_the_paper(comfy, family, prediction, sampler, steps, ends, gamma):
    model, positive, negative, latent = setup(family, prediction)
    recorder = Recorder()
    target = (16, 16) if len(steps) == 3 else (8, 8)
    seed = 7
    out = sample_frecas(recorder.around(model), positive, negative, latent, seed,
                        settings(steps, ends, gamma, sampler_name=sampler), target, progress=False)
    flow = prediction == "flow"
    sizes = [(4, 4), (8, 8)] if len(steps) == 2 else [(4, 4), (8, 8), (16, 16)]
    alphas = comfy_alphas_cumprod(model)
    plan = official_plan(sizes, steps, ends, official_next_start_rf if flow else
                         (lambda et, os, ts: official_next_start(alphas, et, os, ts, gamma)))
    assert out.shape == (2, latent["samples"].shape[1], *target)
    assert [c[0].shape[-2:] for c in recorder.calls] == [torch.Size(s) for s, n in zip(sizes, steps) for _ in range(n)]
    final = replay(model, recorder, plan, sizes, seed, frecas_guidance(sizes), flow)
    assert rel_err(model.model.process_latent_in(out), final) < 1e-5
    # the guided predictions are FA-CFG's in the later stages, CFG's in the first
    guide = frecas_guidance(sizes)
    stage_of = [i for i, n in enumerate(steps) for _ in range(n)]
    for (_, _, cond, uncond), guided, stage in zip(recorder.calls, recorder.guided, stage_of):
        assert rel_err(guided, guide(stage, cond, uncond)) < 1e-5
    # the high band's own weight matters: plain CFG in every stage gives other guided predictions
    assert max(rel_err(g, u + CFG * (c - u)) for (_, _, c, u), g in zip(recorder.calls[steps[0]:],
                                                                         recorder.guided[steps[0]:])) > 1e-2


def test_stage_sigmas_are_the_planned_timesteps(comfy):
    """The sigmas of every stage (and the trailing 0) are the model's σ at the planned discrete timesteps."""
    for family, prediction in (("sd15", "eps"), ("sd3", "flow")):
        sampling = slim_model(family, prediction).get_model_object("model_sampling")
        stage = frecas.Stage((8, 8), (567, 321, 100, 0))
        got = frecas_patch.stage_schedule(sampling, stage)
        want = reference_sigmas(slim_model(family, prediction), stage.timesteps) + [0.0]
        assert got.tolist() == pytest.approx(want, rel=1e-5)


# 4. Cross-attention map fusion ---------------------------------------------------------------------------------------

class AttentionRecorder:
    """Records q, k, v and the attention output (the input of to_out) of every cross-attention (attn2) of a UNet,
    whichever path ComfyUI takes (the module's own forward or a replace patch), with the latent size, sigma and
    chunk kinds of the model call it belongs to."""

    def __init__(self, model):
        from comfy.ldm.modules.attention import CrossAttention

        unet = model.get_model_object("diffusion_model")
        self.calls, self.current, self.handles = [], None, []
        self.handles.append(unet.register_forward_pre_hook(self.enter, with_kwargs=True))
        self.modules = [m for name, m in unet.named_modules() if name.endswith("attn2")
                        and isinstance(m, CrossAttention)]
        assert self.modules
        for module in self.modules:
            parts = {}
            for name in ("to_q", "to_k", "to_v"):
                self.handles.append(getattr(module, name).register_forward_hook(
                    lambda m, a, out, name=name, parts=parts: parts.__setitem__(name, out.detach().double())))
            self.handles.append(module.to_out.register_forward_pre_hook(
                lambda m, a, parts=parts, module=module: self.record(module, parts, a[0])))

    def enter(self, module, args, kwargs):
        options = kwargs["transformer_options"]
        self.current = (tuple(args[0].shape[-2:]), float(options["sigmas"].max()), list(options["cond_or_uncond"]))

    def record(self, module, parts, out):
        self.calls.append({"module": module, **parts, "out": out.detach().double(), "call": self.current})

    def remove(self):
        for handle in self.handles:
            handle.remove()


def explicit_attention(q, k, v, heads):
    """Per head softmax(QKᵀ/√d)V in float64, and the head-averaged probabilities."""
    b, nq, width = q.shape
    d = width // heads
    qh, kh, vh = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, nq, width), probs.mean(dim=1)


def grid_of(latent_size, tokens):
    factor = math.isqrt(latent_size[0] * latent_size[1] // tokens)
    return latent_size[0] // factor, latent_size[1] // factor


def resize_grid(maps, grid, size):
    b, _, nk = maps.shape
    images = maps.transpose(1, 2).reshape(b, nk, *grid)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).reshape(b, nk, -1).transpose(1, 2)


def chunks_of(call, rows_total):
    kinds = call[2]
    rows = rows_total // len(kinds)
    seen = {}
    for i, kind in enumerate(kinds):
        yield (kind, seen.get(kind, 0)), slice(i * rows, (i + 1) * rows)
        seen[kind] = seen.get(kind, 0) + 1


def fused_reference(calls):
    """The docstring's fusion of the maps of the stage's last step: per chunk, the mean per resolution, each resized
    (2-D bilinear) to the largest grid and averaged."""
    per_key = {}
    for c in calls:
        _, probs = explicit_attention(c["to_q"], c["to_k"], c["to_v"], c["module"].heads)
        grid = grid_of(c["call"][0], c["to_q"].shape[1])
        for key, rows in chunks_of(c["call"], probs.shape[0]):
            per_key.setdefault(key, {}).setdefault(grid, []).append(probs[rows])
    fused = {}
    for key, grids in per_key.items():
        largest = max(grids, key=lambda g: g[0] * g[1])
        fused[key] = (torch.stack([resize_grid(torch.stack(m).mean(0), g, largest) for g, m in grids.items()]).mean(0),
                      largest)
    return fused


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_attention_fusion_equals_explicit_reference(comfy, family):
    """Stage 1's attn2 calls are plain attention; every attn2 call of stage 2 is (1 − w)·softmax(QKᵀ/√d)V +
    w·up(M̄)V, M̄ the fused map of stage 1's last step per chunk (conditional, unconditional) recomputed from the
    recorded q, k; every attn2 layer takes part; the run differs from one without fusion."""
    model, positive, negative, latent = setup(family)
    w = 0.6
    plan_settings = settings(attention_fusion=w)
    recorder = AttentionRecorder(model)
    try:
        out = sample_frecas(model, positive, negative, latent, 3, plan_settings, (8, 8), progress=False)
    finally:
        recorder.remove()
    alphas = comfy_alphas_cumprod(model)
    plan = official_plan([(4, 4), (8, 8)], (3, 2), (300, 0), lambda et, os, ts: official_next_start(alphas, et, os,
                                                                                                    ts, 3.0))
    last_sigma = reference_sigmas(model, plan[0])[-1]
    first = [c for c in recorder.calls if c["call"][0] == (4, 4)]
    second = [c for c in recorder.calls if c["call"][0] == (8, 8)]
    assert len(first) == 3 * len(recorder.modules)  # conditional and unconditional passes in one call per step
    assert len({c["call"][1] for c in first}) == 3 and len({c["call"][1] for c in second}) == 2
    assert {id(c["module"]) for c in second} == {id(m) for m in recorder.modules}
    collected = [c for c in first if c["call"][1] == pytest.approx(last_sigma, rel=1e-5)]
    assert len(collected) == len([c for c in first if c["call"] == collected[0]["call"]]) > 0
    fused = fused_reference(collected)
    assert {kind for kind, _ in fused} == {0, 1}
    for c in first:
        plain, _ = explicit_attention(c["to_q"], c["to_k"], c["to_v"], c["module"].heads)
        assert rel_err(c["out"], plain) < 1e-5
    for c in second:
        plain, _ = explicit_attention(c["to_q"], c["to_k"], c["to_v"], c["module"].heads)
        grid = grid_of(c["call"][0], c["to_q"].shape[1])
        want = plain.clone()
        for key, rows in chunks_of(c["call"], plain.shape[0]):
            maps, own = fused[key]
            want[rows] = (1 - w) * plain[rows] + w * resize_grid(maps, own, grid) @ c["to_v"][rows]
        assert rel_err(c["out"], want) < 1e-5
        assert rel_err(c["out"], plain) > 1e-3
    without = sample_frecas(model, positive, negative, latent, 3, settings(attention_fusion=0.0), (8, 8),
                            progress=False)
    assert rel_err(out, without) > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_attention_fusion_refused_on_transformers(comfy, family):
    model, positive, negative, latent = setup(family, "flow")
    with pytest.raises(ValueError) as refusal:
        sample_frecas(model, positive, negative, latent, 0, settings(attention_fusion=0.5, gamma=1.0), (8, 8),
                      progress=False)
    assert NAME in str(refusal.value) and "attention_fusion" in str(refusal.value)


# 5. Composition with other guidance nodes (the matrix is in test_composition.py) -------------------------------------

def test_patches_that_replace_cfg_or_need_its_passes_are_refused_naming_both(comfy):
    from comfyui_guidance.guiders.adaptive import AGConfig
    from comfyui_guidance.nodes.adaptive_patch import apply_ag

    model, positive, negative, latent = setup()
    cases = [
        (comfy.NODE_CLASS_MAPPINGS["RescaleCFG"]().patch(model, 0.7)[0] if hasattr(
            comfy.NODE_CLASS_MAPPINGS["RescaleCFG"], "patch") else
         comfy.NODE_CLASS_MAPPINGS["RescaleCFG"].execute(model, 0.7).result[0], "RescaleCFG"),
        (apply_ag(model, AGConfig()), "Adaptive Guidance (AG)"),
    ]
    for patched, name in cases:
        with pytest.raises(ValueError) as refusal:
            sample_frecas(patched, positive, negative, latent, 0, settings(), (8, 8), progress=False)
        assert NAME in str(refusal.value) and name in str(refusal.value)


def test_foreign_cross_attention_patch_refused_only_with_fusion(comfy):
    model, positive, negative, latent = setup()
    patched = model.clone()
    from comfy.ldm.modules.attention import optimized_attention

    patched.set_model_attn2_replace(lambda q, k, v, extra: optimized_attention(q, k, v, extra["n_heads"]), "middle",
                                    0)
    with pytest.raises(ValueError) as refusal:
        sample_frecas(patched, positive, negative, latent, 0, settings(attention_fusion=0.5), (8, 8), progress=False)
    assert NAME in str(refusal.value) and "attention_fusion" in str(refusal.value)
    sample_frecas(patched, positive, negative, latent, 0, settings(), (8, 8), progress=False)


# 6. Masks, isolation, refusals, interrupt, progress ------------------------------------------------------------------

def test_mask_zero_gives_the_conditional_prediction_and_one_changes_nothing(comfy):
    model, positive, negative, latent = setup()
    recorder = Recorder()
    sample_frecas(recorder.around(model), positive, negative, latent, 1, settings(), (8, 8),
                  mask=torch.zeros(1, 32, 32), progress=False)
    assert len(recorder.guided) == 5
    for (_, _, cond, _), guided in zip(recorder.calls, recorder.guided):
        assert rel_err(guided, cond) < 1e-6
    ones = sample_frecas(model, positive, negative, latent, 1, settings(), (8, 8), mask=torch.ones(1, 32, 32),
                         progress=False)
    plain = sample_frecas(model, positive, negative, latent, 1, settings(), (8, 8), progress=False)
    assert rel_err(ones, plain) < 1e-6


def test_half_mask_blends_per_position(comfy):
    """Left half 1, right half 0 (in pixels): per latent position FA-CFG on the left, D_c on the right."""
    model, positive, negative, latent = setup()
    recorder = Recorder()
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    sample_frecas(recorder.around(model), positive, negative, latent, 1, settings(), (8, 8), mask=mask,
                  progress=False)
    guide = frecas_guidance([(4, 4), (8, 8)])
    stage_of = [0, 0, 0, 1, 1]
    for (_, _, cond, uncond), guided, stage in zip(recorder.calls, recorder.guided, stage_of):
        half = guided.shape[-1] // 2
        assert rel_err(guided[..., half:], cond[..., half:]) < 1e-6
        assert rel_err(guided[..., :half], guide(stage, cond, uncond)[..., :half]) < 1e-5


def test_runs_are_isolated(comfy):
    """Two identical runs agree; a run with attention fusion leaves the model as it was for the next run; the
    model's options are untouched."""
    model, positive, negative, latent = setup()
    options = repr(model.model_options)
    plain = sample_frecas(model, positive, negative, latent, 2, settings(), (8, 8), progress=False)
    again = sample_frecas(model, positive, negative, latent, 2, settings(), (8, 8), progress=False)
    assert torch.equal(plain, again)
    sample_frecas(model, positive, negative, latent, 2, settings(attention_fusion=0.6), (8, 8), progress=False)
    after = sample_frecas(model, positive, negative, latent, 2, settings(), (8, 8), progress=False)
    assert torch.equal(plain, after)
    assert repr(model.model_options) == options


def test_noise_mask_refused(comfy):
    model, positive, negative, latent = setup()
    with pytest.raises(ValueError) as refusal:
        sample_frecas(model, positive, negative, {**latent, "noise_mask": torch.ones(1, 32, 32)}, 0, settings(),
                      (8, 8), progress=False)
    assert NAME in str(refusal.value) and "noise mask" in str(refusal.value)


def test_bad_settings_refused_naming_the_node(comfy):
    model, positive, negative, latent = setup()
    for bad, message in ((settings(steps=(3,), ends=(0,)), "at least two stages"),):
        with pytest.raises(ValueError) as refusal:
            sample_frecas(model, positive, negative, latent, 0, bad, (8, 8), progress=False)
        assert str(refusal.value).startswith(f"{NAME}: ") and message in str(refusal.value)
    with pytest.raises(ValueError, match="must be larger"):
        sample_frecas(model, positive, negative, latent, 0, settings(), (4, 4), progress=False)
    for kwargs in ({"cfg": math.nan}, {"attention_fusion": 1.5}):
        with pytest.raises(ValueError):
            settings(**kwargs)
    with pytest.raises(ValueError, match="unknown sampler"):
        settings(sampler_name="no_such_sampler")


def test_interrupt_stops_the_run_and_resets_the_flag(comfy):
    model, positive, negative, latent = setup()
    try:
        model_management.interrupt_current_processing(True)
        with pytest.raises(model_management.InterruptProcessingException):
            sample_frecas(model, positive, negative, latent, 0, settings(), (8, 8))
        assert not model_management.processing_interrupted()
    finally:
        model_management.interrupt_current_processing(False)


def test_interrupt_between_steps_stops_before_the_next_stage(comfy):
    """Cancel at the last step of stage 1 (the flag set, as the server does): no call of stage 2 is made."""
    model, positive, negative, latent = setup()
    recorder = Recorder()
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            sample_frecas(slim_models.interrupting(recorder.around(model), 3), positive, negative, latent, 0,
                          settings(), (8, 8))
        assert len(recorder.calls) == 3
        assert not model_management.processing_interrupted()
    finally:
        model_management.interrupt_current_processing(False)


def test_one_progress_bar_over_every_stage(comfy, monkeypatch):
    """Each step of every stage advances one bar of all the steps. The updates are recorded where the sampler makes
    them, on ComfyUI's ProgressBar: which of them reach the progress hook is the host's choice (0.33 throttles)."""
    model, positive, negative, latent = setup()
    updates = []
    update_absolute = comfy_utils.ProgressBar.update_absolute

    def recorded(bar, value, total=None, preview=None):
        updates.append((value, bar.total if total is None else total))
        return update_absolute(bar, value, total, preview)

    monkeypatch.setattr(comfy_utils.ProgressBar, "update_absolute", recorded)
    sample_frecas(model, positive, negative, latent, 0, settings(steps=(3, 2, 2), ends=(400, 200, 0)), (16, 16))
    assert updates == [(v, 7) for v in range(1, 8)]


# 7. The VAE transition -----------------------------------------------------------------------------------------------

def tiny_vae(latent_channels=4):
    """A real ComfyUI VAE (comfy.sd.VAE) from a TAESD state dict with random weights: cheap on CPU."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    slim_models.randomize_(taesd, 5)
    return comfy.sd.VAE(sd=taesd.state_dict())


def test_vae_transition_is_decode_nearest_upsample_encode(comfy):
    vae = tiny_vae()
    latent = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    got = frecas_patch.transition(latent, (8, 8), vae)
    images = vae.decode(latent)
    assert images.shape == (2, 32, 32, 3)
    pixels = images.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    want = vae.encode(pixels)
    assert got.shape == (2, 4, 8, 8)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, nearest_up(latent, (8, 8))) > 1e-2  # not the latent upsampling


def test_run_with_vae_carries_stages_through_pixels(comfy):
    """A run with a VAE: the second stage's first state is the VAE transition of the first stage's clean
    estimate, diffused with the seed's next noise."""
    model, positive, negative, latent = setup()
    vae = tiny_vae()
    recorder = Recorder()
    out = sample_frecas(recorder.around(model), positive, negative, latent, 4, settings(), (8, 8), vae=vae,
                        progress=False)
    assert out.shape == (2, 4, 8, 8)
    first_stage_end = recorder.guided[2]  # Euler's last step lands on the guided prediction
    carried = model.model.process_latent_in(
        frecas_patch.transition(model.model.process_latent_out(first_stage_end.float()), (8, 8), vae)).double()
    alphas = comfy_alphas_cumprod(model)
    start = official_next_start(alphas, 300, 4, 8, 3.0)
    sigma = reference_sigmas(model, [start])[0]
    noise = comfy_sample.prepare_noise(torch.zeros(2, 4, 8, 8), 5).double()
    assert rel_err(recorder.calls[3][0], carried + sigma * noise) < 1e-5


def test_video_latent_with_vae_refused_before_sampling(comfy):
    model, positive, negative, latent = setup("wan21", "flow", size=64)
    recorder = Recorder()
    with pytest.raises(ValueError) as refusal:
        sample_frecas(recorder.around(model), positive, negative, latent, 0, settings(gamma=1.0), (16, 16),
                      vae=tiny_vae(16), progress=False)
    assert NAME in str(refusal.value) and "VAE" in str(refusal.value)
    assert recorder.calls == []


def test_video_latent_runs_per_frame(comfy):
    """Wan 2.1 (5-D latents): the run's later stage is FA-CFG per frame and the latent grows in height and width
    only."""
    model, positive, negative, latent = setup("wan21", "flow", size=64)
    recorder = Recorder()
    out = sample_frecas(recorder.around(model), positive, negative, latent, 0,
                        settings(gamma=1.0, sampler_name="euler"), (16, 16), progress=False)
    assert out.shape == (2, 16, 2, 16, 16)
    for (_, _, cond, uncond), guided in zip(recorder.calls[3:], recorder.guided[3:]):
        for t in range(cond.shape[2]):
            want = official_fa_cfg(cond[:, :, t], uncond[:, :, t], (8, 8), CFG, CFG_HIGH)
            assert rel_err(guided[:, :, t], want) < 1e-5


# 8. Size conditioning of the later stages ----------------------------------------------------------------------------

def official_sdxl_time_ids(height, width, dim=256):
    """diffusers' StableDiffusionXLPipeline `_get_add_time_ids` (original size, crop (0, 0), target size) for the
    size the official FreCaS pipeline conditions every stage on (xtudbxk/FreCaS main.py passes no size: the
    pipeline's default, the first stage's 1024²), each id through the UNet's `add_time_proj`, a sinusoidal embedding
    (flip_sin_to_cos: cosines first, downscale_freq_shift 0), in float64."""
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float64)
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    angles = ids[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).flatten()


@pytest.mark.parametrize("given", [None, (96, 80)])
def test_sdxl_stages_keep_the_first_stage_size_conditioning(comfy, given):
    """On (slim) SDXL every model call of every stage carries the size time-ids of the first stage (32² pixels here,
    ComfyUI's 8 pixels per latent cell), not the stage's own (64² in the second), as the official pipeline computes
    them once; a size the conditioning gives itself (CLIPTextEncodeSDXL's) is kept."""
    model, positive, negative, latent = setup("sdxl")
    if given is not None:
        positive, negative = ([[t, {**o, "height": given[0], "width": given[1]}] for t, o in c]
                              for c in (positive, negative))
    unet = model.get_model_object("diffusion_model")
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0].shape[-1], kwargs["y"])),
                                            with_kwargs=True)
    try:
        sample_frecas(model, positive, negative, latent, 0, settings(), (8, 8), progress=False)
    finally:
        handle.remove()
    assert sorted({size for size, _ in calls}) == [4, 8]
    want = official_sdxl_time_ids(*(given or (32, 32)))
    for size, y in calls:
        for row in y:
            assert rel_err(row[1280:], want) < 1e-6, f"latent {size}²: not the first stage's size time-ids"
