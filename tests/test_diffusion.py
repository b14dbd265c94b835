"""The noise process: schedules, q(x_t|x_0), the posterior, parameterizations, the training loss."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from common.errors import InputError
from ldm.diffusion.loss import diffusion_loss, min_snr_weight
from ldm.diffusion.parameterization import model_target, predict_eps, predict_x0
from ldm.diffusion.process import q_posterior, q_sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr

from helpers import reference_dir

SD = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)


def test_tables_match_the_original_checkpoint_buffers():
    """All 10 derived tables equal the original register_schedule's buffers in the tiny-sd2 checkpoint."""
    buffers = load_file(reference_dir("tiny-sd2") / "model.safetensors")
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(SD, name), buffers[name], rtol=1e-6, atol=1e-8, msg=name)
        assert getattr(SD, name).dtype == torch.float32
    # From float32 alpha_bar alone, betas (ratios of neighbours) come back to ~1e-4 relative.
    rebuilt = NoiseSchedule.from_alphas_cumprod(buffers["alphas_cumprod"])
    torch.testing.assert_close(rebuilt.alphas_cumprod, buffers["alphas_cumprod"], rtol=1e-6, atol=0)
    torch.testing.assert_close(rebuilt.posterior_variance, buffers["posterior_variance"], rtol=2e-4, atol=1e-9)


def test_schedules():
    linear = make_betas("linear", 1000, 1e-4, 2e-2)
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(2e-2)
    scaled = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert scaled.sqrt()[1:].diff().std() < 1e-12  # linear in sqrt(beta)
    cosine = NoiseSchedule.from_betas(make_betas("cosine", 1000))
    # alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), Nichol & Dhariwal eq. 17, at t = 500.
    f = lambda t: torch.cos(torch.tensor((t / 1000 + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2
    assert cosine.alphas_cumprod[499].item() == pytest.approx((f(500) / f(0)).item(), rel=1e-5)
    zsnr = NoiseSchedule.from_betas(rescale_zero_terminal_snr(scaled))
    assert zsnr.alphas_cumprod[-1].item() == 0.0  # SNR 0 at the last step (Lin et al. 2023)
    assert zsnr.alphas_cumprod[0].item() == pytest.approx(SD.alphas_cumprod[0].item(), rel=1e-6)  # first kept
    with pytest.raises(InputError, match="unknown beta schedule 'quadratic'; valid: linear, scaled_linear, cosine"):
        make_betas("quadratic", 10)


def test_closed_form_forward_process_matches_iterating_one_step():
    """q(x_t|x_0) in closed form (DDPM eq. 4) vs applying q(x_s|x_{s-1}) = N(sqrt(1-b_s) x, b_s) t+1 times."""
    schedule = NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012)
    x0 = torch.full((200_000,), 0.8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    t = 300
    x = x0.clone()
    for s in range(t + 1):
        beta = schedule.betas[s].double()
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = q_sample(schedule, x0[:, None], torch.full((x0.shape[0],), t), torch.randn(x0.shape[0], 1, generator=g, dtype=torch.float64))
    a = schedule.alphas_cumprod[t].double()
    # Means and stds agree with each other and with sqrt(a) x0, sqrt(1 - a): 200k samples, ~0.2% error.
    for sample in (x, closed.flatten()):
        assert sample.mean().item() == pytest.approx((a.sqrt() * 0.8).item(), abs=0.005)
        assert sample.std().item() == pytest.approx((1 - a).sqrt().item(), rel=0.01)


def test_posterior_matches_bayes_numerically():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): evaluate both Gaussians on a grid and normalise."""
    t = 400
    x0, xt = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    mean, var, log_var = q_posterior(SD, x0[:, None], xt[:, None], torch.tensor([t]))
    beta, a_prev = SD.betas[t].double(), SD.alphas_cumprod[t - 1].double()
    grid = torch.linspace(-3, 3, 200_001, dtype=torch.float64)
    log_p = (-(xt - (1 - beta).sqrt() * grid) ** 2 / (2 * beta)) + (-(grid - a_prev.sqrt() * x0) ** 2 / (2 * (1 - a_prev)))
    p = (log_p - log_p.max()).exp()
    p = p / p.sum()
    bayes_mean = (p * grid).sum()
    bayes_var = (p * (grid - bayes_mean) ** 2).sum()
    assert mean.item() == pytest.approx(bayes_mean.item(), abs=1e-6)
    assert var.item() == pytest.approx(bayes_var.item(), rel=1e-4)
    assert log_var.item() == pytest.approx(var.log().item(), rel=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_parameterizations_round_trip(parameterization):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 250, 700, 999])
    a = SD.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = model_target(x0, eps, a, parameterization)
    torch.testing.assert_close(predict_x0(xt, output, a, parameterization), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(predict_eps(xt, output, a, parameterization), eps, rtol=1e-9, atol=1e-9)
    if parameterization == "v":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho)
        torch.testing.assert_close(output, a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_training_loss_of_the_oracle_is_zero_and_per_sample():
    x0 = torch.randn(6, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 100, 500, 900, 999])
    for p in ("eps", "v", "x0"):
        oracle = lambda xt, tt: model_target(x0, noise, SD.alphas_cumprod[tt].reshape(-1, 1, 1, 1), p)
        loss, t_out = diffusion_loss(oracle, x0, SD, parameterization=p, t=t, noise=noise)
        assert loss.shape == (6,) and torch.equal(t_out, t)
        assert loss.abs().max() < 1e-10
    zero = lambda xt, tt: torch.zeros_like(xt)
    loss, _ = diffusion_loss(zero, x0, SD, parameterization="eps", t=t, noise=noise)
    torch.testing.assert_close(loss, noise.pow(2).mean(dim=(1, 2, 3)))  # MSE against the noise
    l1, _ = diffusion_loss(zero, x0, SD, parameterization="eps", t=t, noise=noise, loss_type="l1")
    torch.testing.assert_close(l1, noise.abs().mean(dim=(1, 2, 3)))
    weighted, _ = diffusion_loss(zero, x0, SD, parameterization="eps", t=t, noise=noise, min_snr_gamma=5.0)
    snr = SD.alphas_cumprod[t] / (1 - SD.alphas_cumprod[t])
    torch.testing.assert_close(weighted, loss * snr.clamp(max=5.0) / snr)


def test_random_draws_offset_noise_and_min_snr_weights():
    x0 = torch.zeros(512, 4, 2, 2)
    captured = {}

    def model(xt, t):
        captured["xt"], captured["t"] = xt, t
        return torch.zeros_like(xt)

    diffusion_loss(model, x0, SD, parameterization="eps", offset_noise=1.0, generator=torch.Generator().manual_seed(0))
    assert captured["t"].min() >= 0 and captured["t"].max() < 1000 and captured["t"].unique().numel() > 300
    noise = captured["xt"] / SD.sqrt_one_minus_alphas_cumprod[captured["t"]].reshape(-1, 1, 1, 1)
    # Offset noise adds one constant per (sample, channel): the per-channel mean has variance 1 + 1/4.
    assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(1.25, rel=0.1)
    a = torch.tensor([0.5, 0.9, 0.99])  # SNR 1, 9, 99
    torch.testing.assert_close(min_snr_weight(a, 5.0, "eps"), torch.tensor([1.0, 5 / 9, 5 / 99]))
    torch.testing.assert_close(min_snr_weight(a, 5.0, "v"), torch.tensor([0.5, 5 / 10, 5 / 100]))
    with pytest.raises(InputError, match="parameterization 'score'"):
        diffusion_loss(model, x0, SD, parameterization="score")


def test_a_zero_terminal_snr_schedule_trains_v_and_refuses_eps():
    """At SNR 0 the min-SNR eps weight is its limit 1 (not 0 / 0 = NaN), the v weight 0 (Hang et al. eq. 9), and
    an eps model with that schedule is refused: its x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by 0."""
    import ldm

    zsnr = NoiseSchedule.make(zero_terminal_snr=True)
    last = zsnr.alphas_cumprod[-2:].float()
    assert last[-1].item() == 0.0 and last[0].item() > 0
    torch.testing.assert_close(min_snr_weight(last, 5.0, "eps"), torch.tensor([1.0, 1.0]))
    snr = last[0] / (1 - last[0])  # ~2e-7, below gamma
    torch.testing.assert_close(min_snr_weight(last, 5.0, "v"), torch.stack([snr / (snr + 1), torch.tensor(0.0)]))
    x0, t = torch.randn(2, 4, 2, 2), torch.tensor([998, 999])
    loss, _ = diffusion_loss(lambda xt, t: torch.zeros_like(xt), x0, zsnr, parameterization="v", t=t,
                             noise=torch.randn(2, 4, 2, 2), min_snr_gamma=5.0)
    assert torch.isfinite(loss).all()
    with pytest.raises(InputError, match="zero_terminal_snr needs parameterization v"):
        ldm.LDMConfig(zero_terminal_snr=True, parameterization="eps")
    assert ldm.LDMConfig(zero_terminal_snr=True, parameterization="v").zero_terminal_snr
