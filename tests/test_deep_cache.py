"""Step caching (DeepCache, ldm/denoisers/deep_cache.py): the full UNet every `interval` calls, the shallow branch
with cached deep features in between, on tiny random models (every weight randomised, so no zero-initialised layer
hides a path)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import pytest
import torch

import ldm
from common.errors import InputError
from ldm.denoisers import build_denoiser
from ldm.denoisers.deep_cache import DeepCacheUNet, disable_deep_cache, enable_deep_cache
from ldm.lora.keys import lora_targets

from helpers import TINY_AE

UNET = {"type": "unet", "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 2, 2], "num_head_channels": 16, "context_dim": 64,
        "use_linear_in_transformer": True}
TEXT = {"kind": "small", "width": 64, "layers": 2, "heads": 4}
PROMPTS = ["a red apple", "a blue car"]
# Latents of a 10-step run with interval 3 against the plain run, relative RMS difference, on this tiny random model
# at guidance 5 (measured): 0.13 (DDIM) and 0.20 (DPM++ 2M Karras) at branch 0, 0.035 and 0.054 at the deepest
# branch. Two plain runs from different noise differ by about 1.4 (sqrt 2).
CLOSE = 0.3


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2
                    else 1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)


@pytest.fixture(scope="module")
def model() -> ldm.LatentDiffusion:
    config = ldm.LDMConfig(autoencoder=dataclasses.replace(TINY_AE, scale_factor=3.0), denoiser=UNET,
                           text_encoder=TEXT, image_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ldm.LatentDiffusion(config).eval()
    _randomize(model.denoiser)
    return model


@pytest.fixture(autouse=True)
def _plain_afterwards(model):
    yield
    disable_deep_cache(model)


def _sample(model, sampler: str = "ddim", steps: int = 10, scale: float = 5.0) -> torch.Tensor:
    context = model.text_encoder.encode(PROMPTS)
    uncond = model.text_encoder.encode([""] * len(PROMPTS))
    x_T = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return model.sample(context, uncond, x_T=x_T, sampler=sampler, steps=steps, guidance_scale=scale)


@contextlib.contextmanager
def deep_calls(model) -> Iterator[list[int]]:
    """A list that gets, per denoiser call, 1 where the middle block (the deep part) ran and 0 where it did not."""
    calls: list[int] = []

    def deep(*_):
        calls[-1] = 1

    hooks = [model.denoiser.register_forward_pre_hook(lambda *_: calls.append(0)),
             model.denoiser.middle_block.register_forward_hook(deep)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def every(interval: int, calls: int) -> list[int]:
    return [int(i % interval == 0) for i in range(calls)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt() / b.square().mean().sqrt())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras", "heun"])
def test_interval_1_is_the_plain_unet_bit_for_bit(model, sampler):
    plain = _sample(model, sampler)
    enable_deep_cache(model, 1)
    assert torch.equal(_sample(model, sampler), plain)
    assert model.denoiser.shallow_passes == 0


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
@pytest.mark.parametrize("branch", [0, 5])  # the input conv alone; the deepest branch (all but the middle block)
def test_interval_3_runs_the_deep_part_on_every_third_step_and_stays_close(model, sampler, branch):
    plain = _sample(model, sampler)
    enable_deep_cache(model, 3, branch=branch)
    wrapper = model.denoiser
    with deep_calls(model) as calls:
        cached = _sample(model, sampler)
    assert calls == every(3, 10) and [i for i, deep in enumerate(calls) if deep] == [0, 3, 6, 9]
    assert wrapper.full_passes == 4 and wrapper.shallow_passes == 6
    assert not torch.equal(cached, plain)
    assert _relative(cached, plain) < CLOSE


def test_a_deeper_branch_or_a_shorter_interval_stays_closer(model):
    plain = _sample(model)
    difference = {}
    for interval, branch in [(2, 0), (3, 0), (5, 0), (3, 2), (3, 5)]:
        enable_deep_cache(model, interval, branch)
        difference[interval, branch] = _relative(_sample(model), plain)
    # measured: 0.080, 0.129, 0.173 (intervals 2, 3, 5 at branch 0); 0.096, 0.035 (branches 2, 5 at interval 3)
    assert difference[2, 0] < difference[3, 0] < difference[5, 0]
    assert difference[3, 5] < difference[3, 2] < difference[3, 0]


def test_guidance_halves_reuse_their_own_features(model):
    """[uncond, cond] in one batch gives what each half gives through a cache of its own."""
    unet = model.denoiser
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 5, 64, generator=gen)
    both, halves = DeepCacheUNet(unet, 3), [DeepCacheUNet(unet, 3), DeepCacheUNet(unet, 3)]
    for t in (900, 850, 800):  # a full pass, then two shallow ones
        t = torch.full((4,), t)
        joint = both(x, t, context)
        apart = torch.cat([h(x[2 * k:2 * k + 2], t[:2], context[2 * k:2 * k + 2]) for k, h in enumerate(halves)])
        torch.testing.assert_close(joint, apart, rtol=1e-4, atol=1e-5)
        x = x - 0.05 * joint
    assert both.shallow_passes == 2


def test_every_generate_call_starts_with_a_full_pass(model):
    enable_deep_cache(model, 3)
    with deep_calls(model) as calls:
        first = model.generate(PROMPTS, seed=7, steps=10, guidance_scale=5.0)
        second = model.generate(PROMPTS, seed=7, steps=10, guidance_scale=5.0)
    assert calls == every(3, 10) * 2
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))


def test_a_new_input_shape_forces_a_full_pass(model):
    enable_deep_cache(model, 3)
    gen = torch.Generator().manual_seed(0)
    t, context = torch.tensor([500]), torch.randn(2, 5, 64, generator=gen)
    with deep_calls(model) as calls:
        for x in (torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen),
                  torch.randn(2, 4, 16, 8, generator=gen), torch.randn(1, 4, 16, 8, generator=gen)):
            model.denoiser(x, t, context[:len(x)])
    assert calls == [1, 0, 1, 1]


def test_channels_last_and_fused_qkv_give_the_same_cached_run(model):
    enable_deep_cache(model, 3)
    reference = _sample(model)
    model.to(memory_format=torch.channels_last)
    model.fuse_qkv_projections()
    try:
        torch.testing.assert_close(_sample(model), reference, rtol=1e-4, atol=1e-4)
        assert model.denoiser.shallow_passes == 12
    finally:
        model.unfuse_qkv_projections()
        model.to(memory_format=torch.contiguous_format)


def test_enable_keeps_names_and_disable_restores_the_module(model):
    unet, targets = model.denoiser, lora_targets(model)
    keys = list(ldm.LatentDiffusion(model.config).state_dict())  # a fresh model's: earlier tests changed nothing
    children = list(unet._modules)
    enable_deep_cache(model, 2)
    assert isinstance(model.denoiser, DeepCacheUNet) and model.denoiser.unet is unet
    assert list(model.state_dict()) == keys and lora_targets(model) == targets  # the UNet's names, unprefixed
    assert list(unet._modules) == children
    enable_deep_cache(model, 4, branch=1)  # again: new settings, one wrapper
    assert model.denoiser.unet is unet and (model.denoiser.interval, model.denoiser.branch) == (4, 1)
    disable_deep_cache(model)
    assert model.denoiser is unet and list(unet._modules) == children
    assert not any(m._forward_hooks for m in unet.modules())
    disable_deep_cache(model)  # a no-op when off
    assert model.denoiser is unet


@pytest.mark.parametrize("interval, branch, message", [
    (0, 0, "interval must be a whole number >= 1"), (2.5, 0, "interval"), (True, 0, "interval"),
    (2, 6, "branch must be a whole number from 0 .* to 5"), (2, -1, "branch")])
def test_bad_settings_are_refused_and_leave_the_model_as_it_was(model, interval, branch, message):
    unet = model.denoiser
    with pytest.raises(InputError, match=message):
        enable_deep_cache(model, interval, branch)
    assert model.denoiser is unet
    enable_deep_cache(model, 2)
    wrapper = model.denoiser
    with pytest.raises(InputError, match=message):
        enable_deep_cache(model, interval, branch)
    assert model.denoiser is wrapper and wrapper.interval == 2


class Holder(torch.nn.Module):
    """Anything with a `denoiser` (enable_deep_cache is duck-typed)."""

    def __init__(self, denoiser: torch.nn.Module):
        super().__init__()
        self.denoiser = denoiser


def test_dit_denoisers_are_refused():
    holder = Holder(build_denoiser({"type": "dit", "size": "DiT-tiny/2", "context_dim": 64, "input_size": 8}))
    dit = holder.denoiser
    with pytest.raises(InputError, match="needs a UNet denoiser.*DiT"):
        enable_deep_cache(holder, 3)
    assert holder.denoiser is dit


def test_a_compiled_unet_is_refused():
    """The wrapper would run the blocks eagerly around it (compiling is lazy: nothing compiles here)."""
    holder = Holder(build_denoiser(UNET))
    holder.denoiser.compile()
    with pytest.raises(InputError, match="torch.compile"):
        enable_deep_cache(holder, 3)
