"""The KL autoencoder: parity with the original code, SD key layout, posterior math, tiling, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ldm
from autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from common.errors import InputError
from ldm.formats.configs import from_original_config

from helpers import REPO, reference_dir

# first_stage_config of Stable Diffusion's v1-inference.yaml / v2-inference-v.yaml (identical).
SD_FIRST_STAGE = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "scale_factor": 0.18215,
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                 "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                 "attn_resolutions": [], "dropout": 0.0},
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
        },
    }
}


def test_parity_with_original_tiny_sd2():
    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml")
    cases = load_file(ref / "cases.safetensors")
    assert model.scale_factor == pytest.approx(0.18215)
    assert model.parameterization == "v"
    with torch.no_grad():
        posterior = model.autoencoder.encode(cases["ae_image"])
        decoded = model.autoencoder.decode(posterior.mean)
    torch.testing.assert_close(posterior.mean, cases["ae_posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.logvar, cases["ae_posterior_logvar"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, cases["ae_decoded"], atol=1e-4, rtol=0)
    # The schedule computed from the config equals the original's buffer.
    original = load_file(ref / "model.safetensors")["alphas_cumprod"]
    rebuilt = ldm.LatentDiffusion(model.config).alphas_cumprod
    torch.testing.assert_close(rebuilt, original, atol=1e-7, rtol=0)


def test_channels_last_matches_the_original_fixture_too():
    """model.to(memory_format=channels_last) keeps the original code's numbers; inputs may be either layout."""
    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml").to(memory_format=torch.channels_last)
    cases = load_file(ref / "cases.safetensors")
    with torch.no_grad():
        posterior = model.autoencoder.encode(cases["ae_image"])
        decoded = model.autoencoder.decode(posterior.mean.contiguous(memory_format=torch.channels_last))
    assert model.autoencoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert decoded.is_contiguous()
    torch.testing.assert_close(posterior.mean, cases["ae_posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, cases["ae_decoded"], atol=1e-4, rtol=0)


def test_inference_reuses_memory_and_keeps_the_numbers(tiny_ae_config):
    """Without autograd the ResnetBlocks run SiLU and the residual add in place: same numbers as with
    autograd, and the caller's tensors are left as they were."""
    model = AutoencoderKL(tiny_ae_config).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    kept = images.clone()
    expected = model.decode(model.encode(images).mean).detach()  # autograd on: the out-of-place path
    with torch.inference_mode():
        latents = model.encode(images).mean
        latents_kept = latents.clone()
        decoded = model.decode(latents)
    assert torch.equal(images, kept) and torch.equal(latents, latents_kept)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mid_block_attention_runs_on_the_flash_kernel(channels_last):
    """The AttnBlock hands SDPA channels-contiguous q, k, v: on the CPU a strided view falls back to the
    math kernel, whose hw x hw matrix alone is 16 GiB for a 2048 px decode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from autoencoder.modules import AttnBlock

    block = AttnBlock(64).eval()
    x = torch.randn(1, 64, 12, 16)
    if channels_last:
        block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            expected = block(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" on strided q, k, v
            out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_first_stage_keys_match_sd_manifest(version):
    manifest = json.loads((reference_dir("sd-formats") / f"sd-{version}-keys.json").read_text())
    expected = [(k[len("first_stage_model."):], shape) for k, shape in manifest["keys"].items()
                if k.startswith("first_stage_model.")]
    for config in (from_original_config(SD_FIRST_STAGE).autoencoder,
                   AutoencoderConfig.from_dict(yaml.safe_load((REPO / "configs/autoencoder/kl-f8.yaml").read_text())["model"])):
        with torch.device("meta"):
            ae = AutoencoderKL(config)
        got = [(k, list(v.shape)) for k, v in ae.state_dict().items()]
        assert got == expected  # same names, same shapes, same order
    assert from_original_config(SD_FIRST_STAGE).autoencoder.scale_factor == manifest["scale_factor"]


@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
@pytest.mark.parametrize("z", [3, 8])
def test_any_factor_and_latent_channels(ch_mult, f, z):
    config = AutoencoderConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1, resolution=64, z_channels=z, embed_dim=z,
                               attn_resolutions=(64 // f,))
    ae = AutoencoderKL(config).eval()
    assert ae.downsampling_factor == f
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = ae.encode(x)
        assert posterior.mean.shape == (2, z, 32 // f, 48 // f)
        assert ae.decode(posterior.sample()).shape == x.shape


# -- posterior math ---------------------------------------------------------------------------------
def test_kl_of_standard_normal_is_zero():
    moments = torch.zeros(3, 8, 5, 7)  # mean 0, logvar 0
    assert torch.equal(DiagonalGaussian(moments).kl(), torch.zeros(3))


def test_kl_matches_torch_distributions():
    moments = torch.randn(2, 8, 4, 4)
    p, q = DiagonalGaussian(moments), DiagonalGaussian(torch.randn(2, 8, 4, 4))
    normal = torch.distributions.Normal
    ref_std = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    ref_pq = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(q.mean, q.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(), ref_std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.kl(q), ref_pq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.kl(p), torch.zeros(2), rtol=0, atol=1e-5)
    nll_ref = -normal(p.mean, p.std).log_prob(p.mean + 0.3).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.nll(p.mean + 0.3), nll_ref, rtol=1e-5, atol=1e-4)


def test_sampling_moments_and_determinism():
    mean, logvar = torch.full((1, 2, 200, 200), 0.7), torch.full((1, 2, 200, 200), -1.0)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = posterior.sample(torch.Generator().manual_seed(1))
    # 80,000 draws: the standard error of the mean is std/283 ~ 0.0021, so 0.01 is ~5 sigma.
    assert z.mean().item() == pytest.approx(0.7, abs=0.01)
    assert z.std().item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), abs=0.01)
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(posterior.mode(), mean)


def test_logvar_is_clamped_as_in_original():
    moments = torch.cat([torch.zeros(1, 1, 2, 2), torch.tensor([[[[-100.0, 100.0], [0.0, 5.0]]]])], dim=1)
    assert DiagonalGaussian(moments).logvar.flatten().tolist() == [-30.0, 20.0, 0.0, 5.0]


# -- bad input --------------------------------------------------------------------------------------
def test_size_not_divisible_names_nearest_sizes(tiny_ae_config):
    ae = AutoencoderKL(tiny_ae_config)
    with pytest.raises(InputError, match=r"33x48.*divisible.*factor 2.*height 32 or 34"):
        ae.encode(torch.zeros(1, 3, 33, 48))


def test_wrong_channel_counts(tiny_ae_config):
    ae = AutoencoderKL(tiny_ae_config)
    with pytest.raises(InputError, match="expects 3 input channels, got 4.*RGB"):
        ae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(InputError, match=r"latents must have shape \(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="batch of images"):
        ae.encode(torch.zeros(3, 32, 32))


def test_bad_configs():
    with pytest.raises(InputError, match="divisible by 32"):
        AutoencoderConfig(ch=48)
    with pytest.raises(InputError, match="unknown keys"):
        AutoencoderConfig.from_dict({"ch": 32, "chmult": [1, 2]})
    with pytest.raises(InputError, match="tanh_out"):
        AutoencoderConfig.from_dict({"ch": 32, "tanh_out": True})


# -- half precision ---------------------------------------------------------------------------------
def test_half_precision_overflow_falls_back_to_float32(tiny_ae_config):
    ae = AutoencoderKL(tiny_ae_config).eval()
    with torch.no_grad():
        ae.post_quant_conv.weight.mul_(3e3)  # activations far beyond float16's 65504
    z = torch.randn(1, 4, 8, 8) * 30
    with torch.no_grad():
        reference = ae.decode(z)
        half = AutoencoderKL(tiny_ae_config).eval()
        half.load_state_dict(ae.state_dict())
        half.half()
        assert not torch.isfinite(half._decode_raw(z.half())).all()  # the plain half decode overflows
        with pytest.warns(UserWarning, match="float32"):
            out = half.decode(z.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert next(half.parameters()).dtype == torch.float16  # weights restored to half afterwards
    # The fallback ran float32 math on the half-rounded weights: close to the float32 model.
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
