"""The cross-attention UNet: original SD key layout, parity with the original code and with diffusers,
attention backends, float32 upcast, gradient checkpointing, class labels and config errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.checkpoint import load_state_dict_checked, strip_prefix
from common.errors import InputError
from ldm.denoisers import attention as attn
from ldm.denoisers import build_denoiser
from ldm.denoisers.embeddings import timestep_embedding
from ldm.denoisers.unet import UNetConfig, UNetModel
from ldm.formats.configs import original_unet_config

from helpers import reference_dir

PREFIX = "model.diffusion_model."
# The unet_config params of v1-inference.yaml; v2-inference-v.yaml differs as in `_sd_params`.
SD_V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
             num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
             transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
# A tiny SD-1.x-layout UNet: conv proj_in/proj_out, num_heads, no attention at the last level.
TINY_V1 = dict(SD_V1, image_size=16, model_channels=32, attention_resolutions=[1, 2], channel_mult=[1, 2, 2],
               context_dim=24, use_checkpoint=False)


def _sd_params(version: str) -> dict:
    if version == "v1":
        return dict(SD_V1)
    params = {k: v for k, v in SD_V1.items() if k != "num_heads"}
    return dict(params, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024, use_fp16=True)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter as the tiny-sd2 fixture does, so no zero-initialized layer hides a path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
    return model


def _tiny(seed: int = 0, **overrides) -> UNetModel:
    return _randomize(UNetModel(UNetConfig.from_original(dict(TINY_V1, **overrides))), seed).eval()


def _inputs(batch: int = 2, context_dim: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 24, generator=gen), torch.tensor([917, 38, 500, 1][:batch]),
            torch.randn(batch, 7, context_dim, generator=gen))


@pytest.fixture(autouse=True)
def _default_attention():
    with attn.attention_backend("sdpa", upcast=False):
        yield


# --- the original layout and the original code's outputs ---------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_state_dict_matches_sd_manifest(version):
    """Names, shapes and order equal `model.diffusion_model.*` of the full SD checkpoint manifests."""
    manifest = json.loads((reference_dir("sd-formats") / f"sd-{version}-keys.json").read_text())
    expected = [(k[len(PREFIX):], shape) for k, shape in manifest["keys"].items() if k.startswith(PREFIX)]
    with torch.device("meta"):
        model = UNetModel(UNetConfig.from_original(_sd_params(version)))
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected
    counts = manifest["param_counts"]["model.diffusion_model"]
    assert sum(p.numel() for p in model.parameters()) == counts["parameters"]


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_tiny_sd2_matches_the_original_unet(backend):
    """The fixture's `unet_out` was computed by the original openaimodel.UNetModel (float32, CPU)."""
    folder = reference_dir("tiny-sd2")
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    model = UNetModel(UNetConfig.from_original(raw["model"]["params"]["unet_config"]["params"])).eval()
    load_state_dict_checked(model, strip_prefix(load_file(folder / "model.safetensors"), PREFIX),
                            source="tiny-sd2 model.diffusion_model")
    cases = load_file(folder / "cases.safetensors")
    with attn.attention_backend(backend), torch.no_grad():
        out = model(cases["unet_x"], cases["unet_t"], context=cases["unet_context"])
    assert (out - cases["unet_out"]).abs().max() < 1e-4


def test_matches_diffusers_unet_through_its_own_converter():
    """An SD-1.x-layout UNet converted by diffusers' single-file converter gives the same output."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    model = _tiny()
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}  # as an original file holds them
    original = {"model": {"params": {"unet_config": {"params": TINY_V1},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates passing image_size
        config = create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=128)
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    x, t, context = _inputs()
    with torch.no_grad():
        out, expected = model(x, t, context), reference(x, t, encoder_hidden_states=context).sample
    assert (out - expected).abs().max() < 1e-4


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)  # exp(-ln(1e4) i / half)
    args = t[:, None].float() * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    assert timestep_embedding(t, 7).shape == (3, 7)  # odd widths are zero-padded, as the original


# --- attention backends and precision ----------------------------------------------------------------

def test_attention_backends_agree():
    model = _tiny()
    x, t, context = _inputs()
    outs = {}
    for backend in ("sdpa", "math"):
        with attn.attention_backend(backend), torch.no_grad():
            outs[backend] = model(x, t, context)
    assert (outs["sdpa"] - outs["math"]).abs().max() < 1e-5
    if not attn.xformers_available():
        with pytest.raises(InputError, match="xformers"):
            attn.set_attention_backend("xformers")
        pytest.skip("xformers is not installed")
    with attn.attention_backend("xformers"):
        with pytest.raises(InputError, match="CUDA"):
            model(x, t, context)
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device for xformers")
        with torch.no_grad():
            out = model.cuda()(x.cuda(), t.cuda(), context.cuda()).cpu()
    assert (out - outs["sdpa"]).abs().max() < 1e-4


def test_attention_backend_settings():
    assert attn.get_attention_backend() == "sdpa" and not attn.get_attention_upcast()
    with attn.attention_backend("math", upcast=True):
        assert attn.get_attention_backend() == "math" and attn.get_attention_upcast()
    assert attn.get_attention_backend() == "sdpa" and not attn.get_attention_upcast()
    with pytest.raises(InputError, match="unknown"):
        attn.set_attention_backend("flash")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_upcast_computes_half_precision_attention_in_float32(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 4 * 16, generator=gen).half() for _ in range(3))
    q, k = q * 100, k * 100  # logits up to ~1e5: beyond float16's 65504 before the scale is applied
    with attn.attention_backend("math"):
        expected = attn.attention(q.float(), k.float(), v.float(), heads=4)
    with attn.attention_backend(backend, upcast=True):
        out = attn.attention(q, k, v, heads=4)
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max() < 5e-3  # the float16 rounding of the output
    if backend == "math":  # without upcast the float16 logits overflow: the reason SD 2.x needs it
        with attn.attention_backend(backend, upcast=False):
            assert not attn.attention(q, k, v, heads=4).isfinite().all()


# --- training ----------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _tiny(), _tiny(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, context = _inputs()
    calls = []
    checkpointed.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.append(1))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        context_grad = context.clone().requires_grad_()
        model(x, t, context_grad).square().mean().backward()
        grads.append([p.grad for p in model.parameters()] + [context_grad.grad])
    assert len(calls) == 2  # the checkpointed block ran again during backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- variants and errors ----------------------------------------------------------------------------

def test_class_labels_add_an_embedding():
    model = _tiny(num_classes=10)
    assert model.state_dict()["label_emb.weight"].shape == (10, 128)  # time_embed width = 4 * model_channels
    x, t, context = _inputs()
    with torch.no_grad():
        a, b = model(x, t, context, y=torch.tensor([0, 1])), model(x, t, context, y=torch.tensor([2, 3]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(InputError, match="class labels"):
        model(x, t, context)
    with pytest.raises(InputError, match="class labels"):
        _tiny()(x, t, context, y=torch.tensor([0, 1]))


@pytest.mark.parametrize("overrides", [dict(resblock_updown=True), dict(use_scale_shift_norm=True),
                                       dict(transformer_depth=2, num_res_blocks=1),
                                       dict(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)])
def test_variants_run(overrides):
    model = _tiny(**overrides)
    x, t, context = _inputs()
    with torch.no_grad():
        out = model(x.half().float(), t[0], context)  # a scalar timestep is broadcast over the batch
    assert out.shape == x.shape and out.isfinite().all()


def test_half_precision_model_keeps_the_input_dtype():
    model = _tiny().half()
    x, t, context = _inputs()
    with attn.attention_backend(upcast=True), torch.no_grad():
        out = model(x, t, context)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_config_round_trips_and_builds():
    config = UNetConfig.from_original(TINY_V1)
    assert UNetConfig.from_dict(config.to_dict()) == config
    ours = build_denoiser({"type": "unet", **config.to_dict()})
    original = build_denoiser(original_unet_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                    "params": TINY_V1}))
    assert ours.config == original.config == config


@pytest.mark.parametrize("params, message", [
    (dict(TINY_V1, use_fp32_magic=True), r"unknown keys \['use_fp32_magic'\]"),
    ({k: v for k, v in TINY_V1.items() if k != "use_spatial_transformer"}, "use_spatial_transformer"),
    (dict(TINY_V1, disable_self_attentions=[True, True, True]), "disable_self_attentions"),
    (dict(TINY_V1, context_dim=None), "context_dim"),
    (dict(TINY_V1, num_heads=-1), "num_heads"),
    (dict(TINY_V1, num_heads=3), "whole heads"),
    (dict(TINY_V1, num_heads=0), "num_heads must be"),
    (dict(TINY_V1, num_classes="sequential"), "num_classes"),
    (dict(TINY_V1, model_channels=48), "divisible by 32"),
    (dict(TINY_V1, num_res_blocks=[2, 2, 2]), "one number"),
    (dict(TINY_V1, dims=3), "dims=2"),
])
def test_bad_original_configs_are_refused(params, message):
    with pytest.raises(InputError, match=message):
        UNetConfig.from_original(params)


def test_bad_denoiser_configs_and_inputs_are_refused():
    with pytest.raises(InputError, match="not supported"):
        original_unet_config({"target": "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel"})
    with pytest.raises(InputError, match="unknown"):
        build_denoiser({"type": "dit"})
    with pytest.raises(InputError, match="unknown keys"):
        UNetConfig.from_dict({"model_channel": 32})
    model = _tiny()
    x, t, context = _inputs()
    with pytest.raises(InputError, match="context"):
        model(x, t)
    with pytest.raises(InputError, match="divisible by 4"):
        model(x[..., :22], t, context)


@pytest.mark.parametrize("overrides", [{}, dict(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)])
def test_channels_last_model_gives_the_same_output(overrides):
    """model.to(memory_format=channels_last): the layout is kept through the transformers, the numbers are not changed."""
    model = _tiny(**overrides)
    x, t, context = _inputs()
    with torch.no_grad():
        expected = model(x, t, context)
        model.to(memory_format=torch.channels_last)
        layouts = []
        model.output_blocks[-1][0].in_layers[-1].register_forward_pre_hook(
            lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        out = model(x, t, context)
    assert layouts == [True]  # the last output block's conv still sees a channels-last map
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, size", [(dict(kernel_size=3, padding=1), 8), (dict(kernel_size=3, padding=1), 4),
                                          (dict(kernel_size=3, stride=2, padding=1), 16),
                                          (dict(kernel_size=1, bias=False), 8), (dict(kernel_size=3, padding=1), 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_matches_nn_conv2d(kwargs, size, channels_last, monkeypatch):
    """ldm.denoisers.conv.Conv2d: maps of <= 8x8 output pixels go through im2col + matmul on the CPU without autograd."""
    from ldm.denoisers import conv

    layer = conv.Conv2d(24, 40, **kwargs)
    if channels_last:
        layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 24, size, size)
    expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    calls, as_matmul = [], conv.Conv2d._as_matmul
    monkeypatch.setattr(conv.Conv2d, "_as_matmul", lambda self, *args: calls.append(1) or as_matmul(self, *args))
    with torch.no_grad():
        out = layer(x)
    small = out.shape[-1] * out.shape[-2] <= conv.SMALL_MAP_PIXELS
    assert calls == ([1] if small else [])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out = layer(x)  # with autograd: always nn.Conv2d's own path
    assert out.requires_grad and len(calls) == int(small)
    assert list(layer.state_dict()) == list(torch.nn.Conv2d(24, 40, **kwargs).state_dict())


# --- fused Q/K/V projections ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)])
def test_fused_qkv_gives_the_same_output(overrides, monkeypatch):
    """One GEMM for Q, K, V (self-attention) and one for K, V (cross-attention); state_dict unchanged."""
    model = _tiny(**overrides)
    keys = list(model.state_dict())
    x, t, context = _inputs()
    with torch.no_grad():
        expected = model(x, t, context)
        blocks = sum(isinstance(m, attn.BasicTransformerBlock) for m in model.modules())
        assert attn.fuse_qkv_projections(model) == 2 * blocks  # attn1 and attn2 of every transformer block
        gemms = []
        fused_weight = attn.CrossAttention._fused_weight
        monkeypatch.setattr(attn.CrossAttention, "_fused_weight", lambda self: gemms.append(1) or fused_weight(self))
        out = model(x, t, context)
    assert len(gemms) == 2 * blocks
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    block = model.input_blocks[1][1].transformer_blocks[0]
    inner = block.attn1.to_q.out_features
    assert block.attn1._fused_cache[1].shape == (3 * inner, inner)  # [Wq; Wk; Wv]
    assert block.attn2._fused_cache[1].shape == (2 * inner, 24)  # [Wk; Wv] over the context width
    attn.fuse_qkv_projections(model, fuse=False)
    assert block.attn1._fused_cache is None
    with torch.no_grad():
        model(x, t, context)
    assert len(gemms) == 2 * blocks  # unfused: the fused path is not taken


def test_fused_qkv_follows_changed_weights_and_devices():
    """The fused copy is remade after load_state_dict, in-place writes and .to(dtype): it never goes stale."""
    model, other = _tiny(seed=0), _tiny(seed=3)
    attn.fuse_qkv_projections(model)
    x, t, context = _inputs()
    with torch.no_grad():
        model(x, t, context)  # fused copies of seed 0's weights
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x, t, context), other(x, t, context), rtol=1e-5, atol=1e-6)
        model.input_blocks[1][1].transformer_blocks[0].attn1.to_v.weight.mul_(2)
        other.input_blocks[1][1].transformer_blocks[0].attn1.to_v.weight.mul_(2)
        torch.testing.assert_close(model(x, t, context), other(x, t, context), rtol=1e-5, atol=1e-6)
        model.double()
        out = model(x.double(), t, context.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), other(x, t, context).detach(), rtol=1e-4, atol=1e-5)


def test_fused_qkv_on_weights_made_under_inference_mode():
    """Inference tensors keep no version counter; load_state_dict still refreshes the fused copy."""
    with torch.inference_mode():
        model, other = _tiny(seed=0), _tiny(seed=3)
    attn.fuse_qkv_projections(model)
    x, t, context = _inputs()
    with torch.inference_mode():
        torch.testing.assert_close(model(x, t, context), _tiny(seed=0)(x, t, context), rtol=1e-5, atol=1e-6)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x, t, context), other(x, t, context), rtol=1e-5, atol=1e-6)


def test_fused_qkv_leaves_training_to_the_separate_projections():
    """With autograd on, the separate to_q / to_k / to_v run, so their gradients are the unfused ones."""
    fused, plain = _tiny(), _tiny()
    attn.fuse_qkv_projections(fused)
    x, t, context = _inputs()
    for model in (fused, plain):
        model(x, t, context).square().mean().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_fused_qkv_on_a_model_without_attention_is_refused():
    from ldm import LatentDiffusion, LDMConfig

    from helpers import TINY_AE

    model = LatentDiffusion(LDMConfig(autoencoder=TINY_AE))
    with pytest.raises(InputError, match="no denoiser"):
        model.fuse_qkv_projections()
    model.denoiser = torch.nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(InputError, match="no attention layers"):
        model.fuse_qkv_projections()
