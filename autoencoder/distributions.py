"""The diagonal Gaussian posterior q(z|x) of the KL autoencoder (LDM paper, sec. 3 and app. G)."""
from __future__ import annotations

import math

import torch


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from encoder moments [mean, logvar] stacked on dim 1.

    logvar is clamped to [-30, 20] as in the original `DiagonalGaussianDistribution`.
    """

    def __init__(self, moments: torch.Tensor, *, deterministic: bool = False):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (reparameterization trick)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); `other` defaults to N(0, I).

        KL(N(m1,v1) || N(m2,v2)) = 1/2 * sum((m1-m2)^2/v2 + v1/v2 - 1 - log v1 + log v2).
        """
        dims = list(range(1, self.mean.ndim))
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample) per sample, summed over (C, H, W)."""
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)
