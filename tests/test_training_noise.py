"""ldm/training/noise.py: per-sample training noise, the same for a sample wherever and whenever it is drawn."""
from __future__ import annotations

import torch

from ldm.diffusion import diffusion_loss
from ldm.diffusion.schedule import NoiseSchedule, make_betas
from ldm.training.noise import per_sample_draws, sample_seed

SHAPE = (4, 8, 8)


def draws(keys, step=3, seed=0, **kwargs):
    return per_sample_draws(keys, seed=seed, step=step, shape=SHAPE, num_timesteps=1000, **kwargs)


def test_a_samples_draws_do_not_depend_on_its_batch():
    keys = [f"k{i}" for i in range(6)]
    whole = draws(keys)
    halves = [draws(keys[:3]), draws(keys[3:])]
    reordered = draws(keys[::-1])
    for name in ("t", "posterior_eps", "noise"):
        full = getattr(whole, name)
        assert torch.equal(full, torch.cat([getattr(h, name) for h in halves]))  # split over two ranks
        assert torch.equal(full, getattr(reordered, name).flip(0))  # another position in the batch
    assert not torch.equal(whole.noise, draws(keys, step=4).noise)  # a new step, new noise
    assert not torch.equal(whole.noise, draws(keys, seed=1).noise)  # a new run seed, new noise
    assert not torch.equal(whole.noise, whole.posterior_eps)
    assert sample_seed(0, 3, "k0") == sample_seed(0, 3, "k0") != sample_seed(0, 3, "k1")


def test_the_draws_are_ddpm_algorithm_1s():
    big = draws([f"k{i}" for i in range(400)])
    assert big.t.dtype == torch.int64 and big.t.min() >= 0 and big.t.max() < 1000
    assert 350 < big.t.float().mean() < 650 and len(big.t.unique()) > 300  # ~U{0..999}
    for x in (big.noise, big.posterior_eps):
        assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # N(0, I), 102,400 values
    corr = torch.corrcoef(torch.stack([big.noise.flatten(), big.posterior_eps.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_offset_noise_adds_a_constant_per_channel():
    keys = ["a", "b"]
    plain, offset = draws(keys), draws(keys, offset_noise=0.1)
    diff = offset.noise - plain.noise
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over height and width
    assert 0 < diff.abs().max() < 0.6 and torch.equal(offset.t, plain.t)


def test_the_loss_of_a_sample_is_the_same_on_any_rank_layout():
    """With the per-sample draws, per-sample losses of one batch = those of its halves (two ranks)."""
    schedule = NoiseSchedule.from_betas(make_betas("scaled_linear", 1000))
    torch.manual_seed(0)
    x0 = torch.randn(6, *SHAPE)
    weight = torch.randn(SHAPE[0], SHAPE[0])

    def model_fn(x, t):
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + t.float()[:, None, None, None] / 1000)

    keys = [f"k{i}" for i in range(6)]

    def losses(idx):
        d = draws([keys[i] for i in idx])
        loss, t = diffusion_loss(model_fn, x0[idx], schedule, parameterization="eps", min_snr_gamma=5.0,
                                 t=d.t, noise=d.noise)
        return loss, t

    full, t_full = losses(list(range(6)))
    a, ta = losses([0, 1, 2])
    b, tb = losses([3, 4, 5])
    assert torch.allclose(full, torch.cat([a, b]), rtol=1e-6, atol=0) and torch.equal(t_full, torch.cat([ta, tb]))
    assert full.mean().item() > 0
