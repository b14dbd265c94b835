"""Training loss of the KL autoencoder: L1 + LPIPS reconstruction, KL, and a PatchGAN with an
adaptive weight. A port of latent-diffusion's `LPIPSWithDiscriminator`
(`ldm/modules/losses/contperceptual.py`) and taming-transformers' `NLayerDiscriminator`.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.distributions import DiagonalGaussian
from autoencoder.lpips import LPIPS
from common.config import check_keys, coerce_numbers
from common.errors import InputError


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: (mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss: (mean softplus(-D(x)) + mean softplus(D(G(z)))) / 2."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`weight` from step `threshold` on, `value` before it (taming's name, kept for grep-ability)."""
    return value if global_step < threshold else weight


def weights_init(module: nn.Module) -> None:
    """DCGAN init as in taming: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, pix2pix), taming's layout: one logit per patch.

    Kernel 4, padding 1; `n_layers` stride-2 convs (the first without BatchNorm), then a stride-1
    conv + BatchNorm and a stride-1 conv to one channel. A 256 px input gives 30x30 logits for n_layers=3.
    """

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            # no conv bias before BatchNorm: its shift would be cancelled anyway
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).float()  # float32 logits (bf16 under autocast): the GAN losses reduce them


@dataclass
class LossConfig:
    """Options of `AutoencoderLoss`; names follow the original `lossconfig.params` where they exist
    (`pixel_weight` is the original `pixelloss_weight`). `lpips_vgg`/`lpips_lin` are local files, see
    `LPIPS.from_files`; without them the perceptual term is off.
    """

    disc_start: int = 50001
    kl_weight: float = 1e-6
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    disc_loss: str = "hinge"
    logvar_init: float = 0.0
    lpips_vgg: str | None = None
    lpips_lin: str | None = None

    def __post_init__(self) -> None:
        coerce_numbers(self, "loss")
        if self.disc_loss not in DISC_LOSSES:
            raise InputError(f"loss config: disc_loss={self.disc_loss!r} is unknown; valid: {sorted(DISC_LOSSES)}")
        for name in ("disc_num_layers", "disc_ndf", "disc_in_channels"):
            if getattr(self, name) < 1:
                raise InputError(f"loss config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_weight", "pixel_weight", "perceptual_weight", "disc_factor", "disc_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"loss config: {name} must be >= 0, got {getattr(self, name)}")
        if self.lpips_lin and not self.lpips_vgg:
            raise InputError("loss config: lpips_lin is set but lpips_vgg is not; LPIPS needs both "
                             "(lpips_vgg: torchvision's vgg16-397923af.pth)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossConfig":
        check_keys(cls, d, "loss")
        return cls(**d)


class AutoencoderLoss(nn.Module):
    """LPIPSWithDiscriminator: the generator and discriminator losses of the KL autoencoder.

    The adaptive GAN weight is Esser et al. 2021 (taming-transformers, eq. 7). `logvar` is a fixed
    buffer (the original's `nn.Parameter` is in no optimizer). Deviations from the original:
    before `disc_start` the generator step does not run the discriminator (same loss, cheaper;
    "g" and "d_weight" log 0); without grad mode d_weight is 0; and `pixel_weight` really scales
    the L1 term (the original stores `pixelloss_weight` but never applies it; equal at 1.0).
    """

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.discriminator = NLayerDiscriminator(in_channels=config.disc_in_channels, ndf=config.disc_ndf,
                                                 n_layers=config.disc_num_layers)
        self.register_buffer("logvar", torch.tensor(float(config.logvar_init)))
        self.perceptual: LPIPS | None = None
        if config.perceptual_weight <= 0:
            self.perceptual_status = "perceptual loss: off (perceptual_weight = 0)"
        elif not config.lpips_vgg:
            self.perceptual_status = ("perceptual loss: off (no LPIPS weights given; "
                                      "set loss.lpips_vgg and loss.lpips_lin to local files)")
            warnings.warn(self.perceptual_status, stacklevel=2)
        else:
            self.perceptual = LPIPS.from_files(config.lpips_vgg, config.lpips_lin)
            self.perceptual_status = f"perceptual loss: on (LPIPS VGG16 from {config.lpips_vgg})"

    def _nll(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel rec = pixel_weight*|x - x_rec| + perceptual_weight*LPIPS; nll = rec/exp(logvar) + logvar."""
        rec = self.config.pixel_weight * torch.abs(inputs - reconstructions)
        if self.perceptual is not None:
            # LPIPS is (B,1,1,1): broadcast to every pixel, as in the original
            rec = rec + self.config.perceptual_weight * self.perceptual(inputs, reconstructions)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / nll.shape[0], rec

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """d_weight = ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to
        [0, 1e4], detached, times disc_weight (Esser et al. 2021, eq. 7)."""
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.config.disc_weight

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussian,
                       global_step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder step: nll + kl_weight*KL + d_weight*disc_factor*(-mean D(x_rec))."""
        nll, rec = self._nll(inputs, reconstructions)
        kl = posterior.kl()
        kl = kl.sum() / kl.shape[0]
        loss = nll + self.config.kl_weight * kl

        disc_factor = adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)
        zero = torch.zeros((), device=nll.device)
        g_loss, d_weight = zero, zero
        if disc_factor > 0:
            g_loss = -torch.mean(self.discriminator(reconstructions))
            if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {"total": loss.detach(), "logvar": self.logvar.detach(), "kl": kl.detach(), "nll": nll.detach(),
                "rec": rec.detach().mean(), "d_weight": d_weight.detach(),
                "disc_factor": torch.tensor(float(disc_factor)), "g": g_loss.detach()}
        return loss, logs

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator step: disc_factor * hinge (or vanilla) loss on real and reconstructed images."""
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        disc_factor = adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)
        loss = disc_factor * DISC_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        logs = {"disc": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return loss, logs
