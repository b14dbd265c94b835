"""Per-sample training noise (`train.per_sample_noise`): each sample's timestep t, its diffusion noise eps and the
draw of its latent from q(z | x) come from a generator of its own, seeded by (seed, step, sample key).

By default a rank draws a whole batch's noise from its global RNG, reseeded by (seed, rank, step) when a run
starts or resumes, so the numbers depend on how samples are laid out over ranks and on where a run was resumed.
Per-sample noise makes a sample's loss at a step independent of both: 2 ranks with batch B give the same
gradients as 1 process with batch 2B over the same samples (DDP averages the ranks' means), and a resumed run
repeats the uninterrupted one. The draws are the ones DDPM Algorithm 1 makes (t ~ U{0..T-1}, eps ~ N(0, I)),
from another generator; the cost is one small generator per sample and step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Draws:
    """One micro-batch's random numbers: t (B,), the posterior's eps and the diffusion noise (B, C, H, W)."""

    t: torch.Tensor
    posterior_eps: torch.Tensor
    noise: torch.Tensor


def sample_seed(seed: int, step: int, key: str) -> int:
    """A 63-bit seed for (run seed, step, sample key): the same on every rank, process and restart."""
    digest = hashlib.sha256(f"{seed}\x00{step}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def per_sample_draws(keys: list[str], *, seed: int, step: int, shape: tuple[int, ...], num_timesteps: int,
                     offset_noise: float = 0.0, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> Draws:
    """Each sample's t, posterior eps and noise (+ `offset_noise` x a per-channel constant, as
    `ldm.diffusion.loss.diffusion_loss` adds it), drawn in that order from its own generator on the CPU."""
    ts, eps, noises = [], [], []
    for key in keys:
        g = torch.Generator().manual_seed(sample_seed(seed, step, key))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        eps.append(torch.randn(shape, generator=g))
        noise = torch.randn(shape, generator=g)
        if offset_noise:
            noise = noise + offset_noise * torch.randn((shape[0], *([1] * (len(shape) - 1))), generator=g)
        noises.append(noise)
    return Draws(torch.cat(ts).to(device), torch.stack(eps).to(device, dtype), torch.stack(noises).to(device, dtype))
