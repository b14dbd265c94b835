"""Samplers: parity with diffusers' schedulers, the seeds' identities, guidance, img2img, bad input."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import ldm
from common.errors import InputError
from ldm import samplers
from ldm.diffusion.parameterization import PARAMETERIZATIONS, model_target
from ldm.diffusion.process import noise_to_level, noise_to_sigma, q_sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas
from ldm.samplers.ddim import ddim_sigmas
from ldm.samplers.denoiser import DiscreteDenoiser
from ldm.samplers.discretization import ddim_timesteps

from helpers import TINY_AE

SD = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)
_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear function of (x, t) standing in for a network; same for ours and diffusers."""
    tt = t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000
    return torch.tanh(torch.einsum("oc,bchw->bohw", _W.to(x.dtype), x)) * (0.5 + tt) + 0.2 * x * torch.cos(3 * tt)


def run_diffusers(scheduler, steps: int, x_T: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), int(round(float(t)))))
        x = scheduler.step(out, t, x).prev_sample
    return x


def diffusers_scheduler(name: str, prediction_type: str):
    import diffusers
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  timestep_spacing="leading", steps_offset=1, prediction_type=prediction_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "ddim": lambda: diffusers.DDIMScheduler(**common, set_alpha_to_one=False, clip_sample=False),
            "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2),
            "dpmpp_2m_karras": lambda: diffusers.DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
            "euler": lambda: diffusers.EulerDiscreteScheduler(**common),
            "heun": lambda: diffusers.HeunDiscreteScheduler(**common),
        }[name]()


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "heun"])
@pytest.mark.parametrize("parameterization,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [1, 5, 10, 20, 50])
def test_parity_with_diffusers(name, parameterization, prediction_type, steps):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    theirs = run_diffusers(diffusers_scheduler(name, prediction_type), steps, x_T)
    ours = samplers.sample(toy_model, x_T, SD, sampler=name, steps=steps, parameterization=parameterization)
    # Both in float32; measured max differences are <= 6e-5 (diffusers keeps its tables in float32).
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_ddim_timesteps_are_the_originals():
    assert ddim_timesteps(1000, 50)[:3].tolist() == [981, 961, 941] and ddim_timesteps(1000, 50)[-1] == 1
    assert ddim_timesteps(1000, 10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert len(ddim_timesteps(1000, 30)) == 31  # as the original: range(0, 1000, 33)
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    alphas_cumprod = samplers.plan("ddim", SD, 10).alphas_cumprod
    assert alphas_cumprod[-1] == SD.alphas_cumprod[0].double()  # the last "previous alpha" is alpha_bar[0], not 1


def _oracle(x0: torch.Tensor, parameterization: str = "eps"):
    """The exact model output for a known x0: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    def model(x, t):
        a = SD.alphas_cumprod.double()[t].to(x.dtype).reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return model_target(x0, eps, a, parameterization)
    return model


@pytest.mark.parametrize("steps", [1, 3, 10, 250])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_with_an_oracle_recovers_x0_in_any_number_of_steps(steps, parameterization):
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    predictions = []
    out = samplers.sample(_oracle(x0, parameterization), x_T, SD, sampler="ddim", steps=steps,
                          parameterization=parameterization, callback=lambda d: predictions.append(d["x0"]))
    for pred in predictions:
        torch.testing.assert_close(pred, x0, rtol=1e-9, atol=1e-9)  # every step predicts x0 exactly
    # Deterministic DDIM keeps the implied noise; the final level is alpha_bar[0] (SD's convention).
    t0 = ddim_timesteps(1000, steps)[0]
    a_T, a_0 = SD.alphas_cumprod.double()[t0], SD.alphas_cumprod.double()[0]
    eps = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    torch.testing.assert_close(out, a_0.sqrt() * x0 + (1 - a_0).sqrt() * eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_a_zero_terminal_snr_schedule_samples_from_snr_0(sampler, steps):
    """Trailing steps start at t = T, where SNR is 0 and x_T is all noise: with a v oracle, DDIM and PLMS (whose
    eps-only step is undefined there) end at sqrt(a_0) x0 + sqrt(1 - a_0) x_T, the exact path's end."""
    zsnr = NoiseSchedule.make(zero_terminal_snr=True)
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)

    def oracle(x, t):
        a = zsnr.alphas_cumprod.double()[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return model_target(x0, (x - a.sqrt() * x0) / (1 - a).sqrt(), a, "v")

    out = samplers.sample(oracle, x_T, zsnr, sampler=sampler, steps=steps, parameterization="v",
                          timestep_spacing="trailing")
    a_0 = zsnr.alphas_cumprod.double()[0]
    torch.testing.assert_close(out, a_0.sqrt() * x0 + (1 - a_0).sqrt() * x_T, rtol=1e-7, atol=1e-7)


def test_ddim_eta_1_is_the_ddpm_posterior_on_all_1000_steps():
    timesteps = ddim_timesteps(1000, 1000)
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)  # float64 throughout
    ac = torch.cumprod(1 - betas, dim=0)
    sigmas = ddim_sigmas(ac[timesteps[:-1]], ac[timesteps[:-1] - 1], eta=1.0)
    # DDIM eq. 16 with eta = 1 equals beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t), DDPM eq. 7, for t >= 1.
    posterior = betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])
    torch.testing.assert_close(sigmas ** 2, posterior.flip(0), rtol=1e-10, atol=0)
    # And whole trajectories agree: DDIM(eta=1) and DDPM ancestral sampling draw the same noise.
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    paths = {}
    for name, kwargs in (("ddim", {"eta": 1.0}), ("ddpm", {})):
        path = []
        samplers.sample(toy_model, x_T, SD, sampler=name, steps=1000, generator=torch.Generator().manual_seed(2),
                        callback=lambda d: path.append(d["x"]), **kwargs)
        paths[name] = torch.stack(path)
    # All but the last step (DDIM ends at alpha_bar[0], DDPM at alpha_bar = 1).
    torch.testing.assert_close(paths["ddim"][:-1], paths["ddpm"][:-1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_every_sampler_any_steps_and_inputs_untouched(name, parameterization):
    x_T = torch.randn(2, 4, 6, 6)
    copy = x_T.clone()
    for steps in (1, 2, 3, 7):
        out = samplers.sample(toy_model, x_T, SD, sampler=name, steps=steps, parameterization=parameterization,
                              generator=torch.Generator().manual_seed(0))
        assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert torch.equal(x_T, copy)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "ddim"])
def test_stochastic_samplers_follow_the_generator(name):
    x_T = torch.randn(1, 4, 4, 4)
    run = lambda seed: samplers.sample(toy_model, x_T, SD, sampler=name, steps=10, eta=0.5,
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_ddpm_variance_choices():
    """sigma^2 = beta_t vs beta~_t: with a zero model, one step from x_t to the second-to-last visited t."""
    x_T = torch.zeros(4000, 1, 1, 1)
    out = {}
    for variance in ("posterior", "beta"):
        path = []
        samplers.sample(lambda x, t: torch.zeros_like(x), x_T, SD, sampler="ddpm", steps=2, ddpm_variance=variance,
                        generator=torch.Generator().manual_seed(0), callback=lambda d: path.append(d["x"]))
        out[variance] = path[0].std().item()
    a_t, a_prev = SD.alphas_cumprod.double()[501].item(), SD.alphas_cumprod.double()[1].item()
    beta = 1 - a_t / a_prev  # respaced beta between t=501 and t=1
    assert out["beta"] == pytest.approx(beta ** 0.5, rel=0.05)
    assert out["posterior"] == pytest.approx((beta * (1 - a_prev) / (1 - a_t)) ** 0.5, rel=0.05)
    with pytest.raises(InputError, match="ddpm_variance"):
        samplers.sample(toy_model, x_T[:1], SD, sampler="ddpm", ddpm_variance="large")


def test_guidance_is_one_batched_call_with_optional_rescale():
    calls = []

    def denoiser(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 5])
    cond, uncond = torch.full((2, 7, 8), 2.0), torch.full((2, 7, 8), 0.5)
    out = samplers.guided_model_fn(denoiser, cond, uncond, guidance_scale=3.0)(x, t)
    assert calls == [4]  # [uncond, cond] in one batch
    torch.testing.assert_close(out, x * 0.5 + 3.0 * (x * 2.0 - x * 0.5))
    rescaled = samplers.guided_model_fn(denoiser, cond, uncond, guidance_scale=3.0, guidance_rescale=0.7)(x, t)
    std = lambda v: v.std(dim=(1, 2, 3), keepdim=True)
    expected = 0.7 * out * std(x * 2.0) / std(out) + 0.3 * out  # Lin et al. 2023, eqs. 15-16
    torch.testing.assert_close(rescaled, expected)
    calls.clear()
    samplers.guided_model_fn(denoiser, cond, uncond, guidance_scale=1.0)(x, t)
    assert calls == [2]  # scale 1: the conditional output alone


class _ToyDenoiser(nn.Module):
    def forward(self, x, t, context):
        return toy_model(x, t) * (1 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1))


def test_latent_diffusion_sample_and_img2img():
    model = ldm.LatentDiffusion(ldm.LDMConfig(autoencoder=TINY_AE, parameterization="v"))
    model.denoiser = _ToyDenoiser()
    cond, uncond = torch.randn(2, 77, 8), torch.zeros(2, 77, 8)
    x_T = torch.randn(2, 4, 8, 8)
    out = model.sample(cond, uncond, x_T=x_T, sampler="ddim", steps=10, guidance_scale=3.0)
    guided = samplers.guided_model_fn(model.denoiser, cond, uncond, guidance_scale=3.0)
    torch.testing.assert_close(out, samplers.sample(guided, x_T, SD, sampler="ddim", steps=10, parameterization="v"))
    seen = []
    init = torch.randn(2, 4, 8, 8)
    model.sample(cond, x_T=x_T, steps=10, init_latent=init, strength=0.5, callback=lambda d: seen.append(d["t"]))
    assert seen == [401, 301, 201, 101, 1]  # the last int(0.5 * 10) steps


def test_img2img_starts_from_the_noised_latent():
    init, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    first = {}

    def model(x, t):
        first.setdefault("x", x.clone())
        first.setdefault("t", int(t[0]))
        return torch.zeros_like(x)

    samplers.sample(model, noise, SD, sampler="ddim", steps=20, init_latent=init, strength=0.3)
    a = SD.alphas_cumprod[first["t"]]
    assert first["t"] == 251  # 20 steps: 951, 901, ..., 1; strength 0.3 keeps the last 6
    torch.testing.assert_close(first["x"], a.sqrt() * init + (1 - a).sqrt() * noise)


def _as_parameterization(x0_model, parameterization: str):
    """The network that predicts x0 = x0_model(x_t, t), rewritten to output eps, v or x0 (its training target)."""
    def model(x, t):
        a = SD.alphas_cumprod.double()[t].to(x.dtype).reshape(-1, 1, 1, 1)
        x0 = x0_model(x, t)
        return model_target(x0, (x - a.sqrt() * x0) / (1 - a).sqrt(), a, parameterization)
    return model


@pytest.mark.parametrize("t", [1, 500, 999])
def test_the_denoiser_adapter_absorbs_the_parameterization(t):
    """One underlying model in each parameterization: the adapter gives the same x0 and eps, in both views."""
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    a = SD.alphas_cumprod.double()[t]
    x0 = toy_model(x, torch.full((2,), t))
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # DDPM eq. 4 solved for eps
    sigma = SD.sigmas[t].item()
    for parameterization in PARAMETERIZATIONS:
        denoiser = DiscreteDenoiser(_as_parameterization(toy_model, parameterization), SD,
                                    parameterization=parameterization)
        x0_pred, eps_pred = denoiser.predict(x, torch.tensor(t))
        torch.testing.assert_close(x0_pred, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_pred, eps, rtol=1e-9, atol=1e-9)
        # The VE view of the same state, x_ve = x_vp * sqrt(sigma^2 + 1), denoises to the same x0.
        torch.testing.assert_close(denoiser(x * (sigma ** 2 + 1) ** 0.5, sigma, t), x0, rtol=1e-9, atol=1e-9)
    with pytest.raises(InputError, match="parameterization 'score' is not one of eps, v, x0"):
        DiscreteDenoiser(toy_model, SD, parameterization="score")
    with pytest.raises(InputError, match="parameterization 'score' is not one of eps, v, x0"):
        samplers.sample(toy_model, x, SD, parameterization="score")


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_has_the_one_signature_and_declares_its_options(name):
    spec = samplers.SAMPLERS[name]
    params = inspect.signature(spec.function).parameters
    assert [p.name for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD] == ["denoiser", "x", "plan"]
    keyword = [p for p in params.values() if p.kind is p.KEYWORD_ONLY]
    assert {p.name for p in keyword} == {"generator", "callback", "blend", *spec.options}
    assert all(p.default is not p.empty for p in keyword)
    assert set(spec.options.values()) <= set(inspect.signature(samplers.sample).parameters)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_plans_give_every_level_as_sigma_and_as_alpha_bar(name):
    plan = samplers.plan(name, SD, 10)
    assert plan[0] is plan.timesteps  # a tuple: the CLI and bench count steps as len(plan(...)[0])
    assert plan.sigmas.shape == plan.alphas_cumprod.shape == (len(plan.timesteps) + 1,)
    torch.testing.assert_close(plan.alphas_cumprod, 1 / (plan.sigmas ** 2 + 1), rtol=1e-12, atol=0)
    if name != "dpmpp_2m_karras":  # Karras levels lie between the schedule's (Karras et al. 2022, eq. 5)
        assert torch.equal(plan.sigmas[:-1], SD.sigmas[plan.timesteps])
    # DDIM and PLMS end at alpha_bar[0] (SD's convention); DDPM and the sigma-space samplers at the clean latent.
    assert plan.alphas_cumprod[-1] == (SD.alphas_cumprod[0].double() if name in ("ddim", "plms") else 1.0)
    skipped = plan.skip(7)
    assert torch.equal(skipped.timesteps, plan.timesteps[7:]) and torch.equal(skipped.sigmas, plan.sigmas[7:])


def test_noising_to_one_level_is_ddpm_eq_4_in_both_views():
    x0, noise = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = 321
    a = SD.alphas_cumprod.double()[t].item()
    torch.testing.assert_close(noise_to_level(x0, noise, a), q_sample(SD, x0, torch.full((2,), t), noise),
                               rtol=1e-7, atol=1e-7)  # q_sample reads the float32 sqrt tables
    sigma = ((1 - a) / a) ** 0.5
    torch.testing.assert_close(noise_to_sigma(x0, noise, sigma), noise_to_level(x0, noise, a) * (sigma ** 2 + 1) ** 0.5,
                               rtol=1e-12, atol=1e-12)


def test_bad_input_messages():
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(InputError, match="unknown sampler 'dpm'; valid: ddim, plms, ddpm, dpmpp_2m, dpmpp_2m_karras, euler, euler_a, heun"):
        samplers.sample(toy_model, x, SD, sampler="dpm")
    for steps in (0, 1001, 2.5):
        with pytest.raises(InputError, match="steps must be a whole number from 1 to 1000"):
            samplers.sample(toy_model, x, SD, steps=steps)
    with pytest.raises(InputError, match=r"eta must be in \[0, 1\]"):
        samplers.sample(toy_model, x, SD, eta=1.5)
    for strength in (0.0, 1.2):
        with pytest.raises(InputError, match=r"strength must be in \(0, 1\]"):
            samplers.sample(toy_model, x, SD, init_latent=x, strength=strength)
    with pytest.raises(InputError, match="guidance scale must be >= 0"):
        samplers.guided_model_fn(lambda *a: a[0], torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), guidance_scale=-1)
    with pytest.raises(InputError, match="cond and uncond must have the same shape"):
        samplers.guided_model_fn(lambda *a: a[0], torch.zeros(1, 77, 8), torch.zeros(1, 77, 16), guidance_scale=7)
    model = ldm.LatentDiffusion(ldm.LDMConfig(autoencoder=TINY_AE))
    with pytest.raises(InputError, match="has no denoiser"):
        model.sample(torch.zeros(1, 77, 8), x_T=x)
    model.denoiser = _ToyDenoiser()
    with pytest.raises(InputError, match="cond has batch 2 but x_T has batch 1"):
        model.sample(torch.zeros(2, 77, 8), x_T=x)


def test_ddim_matches_the_original_ddimsampler_on_tiny_sd2():
    """The original DDIMSampler's output (eta 0, 10 steps, guidance 3, v-model) from the fixture, to 1e-4."""
    from safetensors.torch import load_file

    from helpers import reference_dir

    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml")
    cases = load_file(ref / "cases.safetensors")
    out = model.sample(cases["ddim_cond"], cases["ddim_uncond"], x_T=cases["ddim_x_T"], sampler="ddim", steps=10,
                       guidance_scale=3.0, eta=0.0)
    torch.testing.assert_close(out, cases["ddim_out"], atol=1e-4, rtol=0)
    unet = model.denoiser(cases["unet_x"], cases["unet_t"], cases["unet_context"])
    torch.testing.assert_close(unet, cases["unet_out"], atol=1e-4, rtol=0)


def _original_plms(model, x, alphas_cumprod, S, parameterization):
    """A line-by-line transcription of the original SD PLMSSampler loop (ldm/models/diffusion/plms.py)."""
    from ldm.diffusion.parameterization import predict_eps

    ddim_timesteps = torch.arange(0, 1000, 1000 // S) + 1
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    time_range = ddim_timesteps.flip(0)
    total_steps = len(ddim_timesteps)
    b = x.shape[0]

    def get_model_output(x, t):
        return predict_eps(x, model(x, t), alphas_cumprod[t].reshape(-1, 1, 1, 1), parameterization)

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * e_t, pred_x0

    old_eps = []
    for i, step in enumerate(time_range):
        index = total_steps - i - 1
        ts = torch.full((b,), int(step))
        ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]))
        e_t = get_model_output(x, ts)
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(x, e_t, index)
            e_t_prime = (e_t + get_model_output(x_prev, ts_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = get_x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_plms_matches_the_original_plms_sampler(steps, parameterization):
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    reference = _original_plms(toy_model, x_T, SD.alphas_cumprod.double(), steps, parameterization)
    ours = samplers.sample(toy_model, x_T, SD, sampler="plms", steps=steps, parameterization=parameterization)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_sampling_loop_never_reads_device_tensors(sampler):
    """No host sync in the loop: run on meta-device tensors, which have no values, so any .item(), bool(),
    float() or .cpu() of the latents, the model output or the timesteps it hands the model would raise.
    The schedule's tables stay on the CPU (scalars read from them cost no device sync)."""
    schedule = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)
    x_T = torch.empty(1, 4, 8, 8, device="meta")
    seen = []

    def denoiser(x, t, context):
        seen.append(t.device.type)
        return torch.empty_like(x)

    context = torch.empty(1, 5, 8, device="meta")
    model_fn = samplers.guided_model_fn(denoiser, context, context, guidance_scale=7.5)
    generator = torch.Generator().manual_seed(0)
    for extra in ({}, {"init_latent": torch.empty_like(x_T), "strength": 0.6},
                  {"init_latent": torch.empty_like(x_T), "keep_mask": torch.empty(1, 1, 8, 8, device="meta")}):
        out = samplers.sample(model_fn, x_T, schedule, sampler=sampler, steps=5, generator=generator, **extra)
        assert out.device.type == "meta" and out.shape == x_T.shape
    assert seen and set(seen) == {"meta"}
