"""The autoencoder training loss: PatchGAN shapes and layout, GAN losses, adaptive weight, warm-up, LPIPS on/off."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from autoencoder import AutoencoderConfig, AutoencoderKL
from autoencoder.losses import (
    AutoencoderLoss,
    LossConfig,
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from autoencoder.lpips import LPIPS
from common.errors import InputError


@pytest.mark.parametrize("n_layers, size, logits", [
    # stride-2 convs (k4, p1) halve the size n_layers times, the two stride-1 convs take 1 px each
    (3, 32, 2), (3, 64, 6), (2, 32, 6), (2, 64, 14),
])
def test_discriminator_output_shape(n_layers, size, logits):
    disc = NLayerDiscriminator(n_layers=n_layers, ndf=8)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, logits, logits)


def test_discriminator_layout_and_init():
    state = NLayerDiscriminator().state_dict()
    # taming's NLayerDiscriminator(n_layers=3): conv, lrelu, (conv, bn, lrelu) x 3, conv; no conv bias before BN
    params = [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params == ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.bias",
                      "main.5.weight", "main.6.weight", "main.6.bias", "main.8.weight", "main.9.weight",
                      "main.9.bias", "main.11.weight", "main.11.bias"]
    assert state["main.0.weight"].shape == (64, 3, 4, 4)
    assert state["main.8.weight"].shape == (512, 256, 4, 4)
    assert state["main.11.weight"].shape == (1, 512, 4, 4)
    # weights_init: conv N(0, 0.02), BN weight N(1, 0.02), BN bias 0 (512*256*16 samples: std within 2%)
    assert abs(state["main.8.weight"].std().item() - 0.02) < 0.0004
    assert abs(state["main.9.weight"].mean().item() - 1.0) < 0.01
    assert torch.equal(state["main.9.bias"], torch.zeros(512))


def test_gan_losses_on_hand_computed_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    # vanilla: softplus(t) = log(1 + e^t)
    softplus = lambda t: math.log1p(math.exp(t))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_adopt_weight():
    assert adopt_weight(1.0, 9, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0
    assert adopt_weight(0.7, 3, threshold=10, value=0.2) == 0.2


@pytest.fixture
def autoencoder_batch():
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32,
                                            z_channels=4, embed_dim=4))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reconstruction, posterior = model(x)
    return model, x, reconstruction, posterior


def make_loss(**options) -> AutoencoderLoss:
    options = {"perceptual_weight": 0.0, "disc_ndf": 16, **options}
    return AutoencoderLoss(LossConfig(**options))


def test_adaptive_weight_is_the_ratio_of_gradient_norms(autoencoder_batch):
    model, x, reconstruction, posterior = autoencoder_batch
    loss_fn = make_loss(disc_start=0, kl_weight=1e-3, disc_weight=0.5, logvar_init=0.3)
    loss, logs = loss_fn.generator_loss(x, reconstruction, posterior, global_step=5, last_layer=model.last_layer)

    # by hand, following contperceptual.py: nll = sum(|x - x_rec| / e^logvar + logvar) / B
    nll = ((x - reconstruction).abs() / math.exp(0.3) + 0.3).sum() / 2
    g_loss = -loss_fn.discriminator(reconstruction).mean()  # train-mode BN: same logits as inside the loss
    nll_grad, = torch.autograd.grad(nll, model.last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)
    d_weight = 0.5 * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4)
    kl = posterior.kl().sum() / 2

    assert d_weight.item() > 0
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["g"], g_loss.detach())
    torch.testing.assert_close(loss, nll + 1e-3 * kl + d_weight * 1.0 * g_loss)
    assert logs["disc_factor"].item() == 1.0
    loss.backward()  # d_weight is detached: the graph stays usable for the optimiser step
    assert model.last_layer.grad is not None


def test_no_grad_gives_zero_adaptive_weight(autoencoder_batch):
    model, x, _, _ = autoencoder_batch
    loss_fn = make_loss(disc_start=0)
    with torch.no_grad():
        reconstruction, posterior = model(x)
        loss, logs = loss_fn.generator_loss(x, reconstruction, posterior, global_step=1, last_layer=model.last_layer)
    assert logs["d_weight"].item() == 0.0
    torch.testing.assert_close(loss, logs["nll"] + 1e-6 * logs["kl"])


def test_before_disc_start_no_gan_terms(autoencoder_batch):
    model, x, reconstruction, posterior = autoencoder_batch
    loss_fn = make_loss(disc_start=100, kl_weight=1e-6)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    loss, logs = loss_fn.generator_loss(x, reconstruction, posterior, global_step=99, last_layer=model.last_layer)
    nll = (x - reconstruction).abs().sum() / 2  # logvar 0: nll = |x - x_rec| summed over pixels / B
    kl = posterior.kl().sum() / 2
    assert torch.equal(loss, nll + 1e-6 * kl)
    assert calls == []  # the discriminator is skipped while its factor is 0
    assert logs["disc_factor"].item() == 0.0 and logs["g"].item() == 0.0

    d_loss, d_logs = loss_fn.discriminator_loss(x, reconstruction, global_step=99)
    assert d_loss.item() == 0.0
    d_loss, d_logs = loss_fn.discriminator_loss(x, reconstruction, global_step=100)
    assert d_loss.item() > 0  # hinge loss of an untrained discriminator is about 1
    assert set(d_logs) == {"disc", "logits_real", "logits_fake"}


def test_pixel_weight_scales_l1(autoencoder_batch):
    model, x, reconstruction, posterior = autoencoder_batch
    _, logs = make_loss(pixel_weight=2.0).generator_loss(x, reconstruction, posterior, 0, model.last_layer)
    torch.testing.assert_close(logs["rec"], 2.0 * (x - reconstruction).abs().mean().detach())


def test_perceptual_off_status_and_warning():
    with pytest.warns(UserWarning, match="no LPIPS weights given"):
        loss_fn = AutoencoderLoss(LossConfig(disc_ndf=8))
    assert loss_fn.perceptual is None
    assert loss_fn.perceptual_status == ("perceptual loss: off (no LPIPS weights given; "
                                         "set loss.lpips_vgg and loss.lpips_lin to local files)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # perceptual_weight=0 is a choice, not a problem: no warning
        assert make_loss().perceptual_status == "perceptual loss: off (perceptual_weight = 0)"


def test_perceptual_on_adds_lpips_to_rec(autoencoder_batch, tmp_path):
    model, x, reconstruction, posterior = autoencoder_batch
    lpips = LPIPS()  # random weights; lin weights positive like the real ones
    for k in range(5):
        getattr(lpips, f"lin{k}").model[1].weight.uniform_(0.0, 1.0)
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(path))

    loss_fn = make_loss(perceptual_weight=0.7, lpips_vgg=str(path))
    assert loss_fn.perceptual_status == f"perceptual loss: on (LPIPS VGG16 from {path})"
    _, logs = loss_fn.generator_loss(x, reconstruction, posterior, 0, model.last_layer)
    # rec = |x - x_rec| + 0.7 * LPIPS broadcast over pixels, so its mean is mean|x - x_rec| + 0.7 * mean LPIPS
    p = lpips(x, reconstruction).detach()
    assert p.min().item() > 0
    torch.testing.assert_close(logs["rec"], ((x - reconstruction).abs().mean() + 0.7 * p.mean()).detach())
    torch.testing.assert_close(logs["nll"], ((x - reconstruction).abs() + 0.7 * p).sum().detach() / 2)


def test_loss_config_errors():
    with pytest.raises(InputError, match=r"unknown keys \['disc_lr'\].*disc_start"):
        LossConfig.from_dict({"disc_lr": 1.0})
    with pytest.raises(InputError, match=r"disc_loss='wasserstein'.*\['hinge', 'vanilla'\]"):
        LossConfig.from_dict({"disc_loss": "wasserstein"})
    with pytest.raises(InputError, match="lpips_lin is set but lpips_vgg is not"):
        LossConfig(lpips_lin="vgg.pth")
    with pytest.raises(InputError, match="kl_weight must be a number"):
        LossConfig(kl_weight="small")
    # YAML 1.1 reads 1e-6 as the string "1e-6"
    config = LossConfig.from_dict({"kl_weight": "1e-6", "disc_start": 10})
    assert config.kl_weight == 1e-6 and LossConfig.from_dict(config.to_dict()) == config
