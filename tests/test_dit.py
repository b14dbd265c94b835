"""The DiT denoiser: shapes, adaLN-Zero initialisation, the paper's parameter count, position embedding,
samplers, cross-attention, attention backends, gradient checkpointing, configs, and a short training run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import InputError
from ldm import samplers
from ldm.denoisers import attention as attn
from ldm.denoisers import build_denoiser
from ldm.denoisers.dit import DIT_SIZES, DiT, DiTConfig, sincos_2d_position_embedding
from ldm.diffusion.loss import diffusion_loss
from ldm.diffusion.schedule import NoiseSchedule

CONTEXT_DIM = 16


def _tiny(seed: int = 0, *, perturb: bool = True, **overrides) -> DiT:
    """DiT-tiny/2 with cross-attention; `perturb` fills the zero-initialised weights and biases so the
    output is non-zero and every path (adaLN, cross-attention, final layer) shows."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig.named("DiT-tiny/2", **{"context_dim": CONTEXT_DIM, "input_size": 8, **overrides}))
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _inputs(batch: int = 2, height: int = 8, width: int = 12, tokens: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=gen), torch.tensor([917, 38, 500, 1][:batch]),
            torch.randn(batch, tokens, CONTEXT_DIM, generator=gen))


@pytest.fixture(autouse=True)
def _default_attention():
    with attn.attention_backend("sdpa", upcast=False):
        yield


# --- shapes, initialisation, sizes ------------------------------------------------------------------

@pytest.mark.parametrize("patch_size, height, width", [(1, 4, 6), (2, 8, 8), (2, 16, 24), (4, 8, 16), (8, 16, 8)])
def test_output_shape_for_latent_and_patch_sizes(patch_size, height, width):
    model = _tiny(patch_size=patch_size, input_size=8 * patch_size)
    x, t, context = _inputs(height=height, width=width)
    with torch.no_grad():
        out = model(x, t, context)
        scalar_t = model(x, t[0], context)  # a scalar timestep is broadcast over the batch
    assert out.shape == x.shape and scalar_t.shape == x.shape and out.isfinite().all()
    wide = _tiny(patch_size=patch_size, input_size=8 * patch_size, out_channels=8)
    with torch.no_grad():
        assert wide(x, t, context).shape == (2, 8, height, width)


@pytest.mark.parametrize("overrides", [dict(), dict(context_dim=None), dict(pool_context=True)])
def test_initial_output_is_exactly_zero_and_trainable(overrides):
    """adaLN-Zero (DiT sec. 3.2): zero modulation and a zero final layer give an output of exactly 0."""
    model = _tiny(perturb=False, **overrides).train()
    x, t, context = _inputs()
    out = model(x, t, None if model.config.context_dim is None else context)
    assert torch.equal(out, torch.zeros_like(x))
    (out - x).square().mean().backward()  # the zero layers still receive gradients
    assert model.final_layer.linear.weight.grad.abs().max() > 0


def test_position_embedding_matches_dit_for_square_grids_and_extends_to_any_grid():
    def dit_reference(dim: int, grid_size: int) -> np.ndarray:  # DiT models.py get_2d_sincos_pos_embed
        def one_d(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)
        grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
        grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
        return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)

    ours = sincos_2d_position_embedding(64, 6, 6)
    torch.testing.assert_close(ours, torch.from_numpy(dit_reference(64, 6)).float())
    # On a 4x7 grid, token (row, col) gets the same embedding as (row, col) of a 9x9 grid.
    big = sincos_2d_position_embedding(64, 9, 9).reshape(9, 9, 64)
    torch.testing.assert_close(sincos_2d_position_embedding(64, 4, 7).reshape(4, 7, 64), big[:4, :7])


def test_dit_xl2_has_the_papers_parameter_count():
    """DiT-XL/2 (no cross-attention) against the paper's 675M parameters (Peebles & Xie 2023).

    The official models.py builds 675,129,632 parameters. Ours differ by what we leave out on
    purpose: the class-label table (1001 x 1152, no class labels here), the fixed position embedding
    (256 x 1152, a non-trainable nn.Parameter there, computed per grid size here), the q/k/v biases
    (28 blocks x 3 x 1152; ldm.denoisers.attention's CrossAttention has none), and the learned-sigma half of
    the output (1152 x 16 + 16; we predict eps/v only).
    """
    with torch.device("meta"):
        model = DiT(DiTConfig.named("DiT-XL/2"))
    count = sum(p.numel() for p in model.parameters())
    official = 675_129_632
    assert count == official - 1001 * 1152 - 256 * 1152 - 28 * 3 * 1152 - (1152 * 16 + 16) == 673_566_352
    assert abs(count - 675e6) / 675e6 < 0.01
    assert DIT_SIZES["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert DIT_SIZES["DiT-S/8"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)


# --- conditioning, samplers, attention ---------------------------------------------------------------

def test_output_depends_on_the_context_through_cross_attention():
    model = _tiny()
    x, t, context = _inputs()
    other = torch.randn(2, 9, CONTEXT_DIM)  # any number of tokens
    with torch.no_grad():
        a, b = model(x, t, context), model(x, t, other)
        assert (a - b).abs().max() > 1e-3
        for block in model.blocks:  # with the cross-attention closed, the context is not seen
            block.cross_attn.to_out[0].weight.zero_()
            block.cross_attn.to_out[0].bias.zero_()
        torch.testing.assert_close(model(x, t, context), model(x, t, other))
    pooled = _tiny(pool_context=True)  # the pooled context also reaches the adaLN conditioning
    for block in pooled.blocks:
        block.cross_attn = None
    with torch.no_grad():
        assert (pooled(x, t, context) - pooled(x, t, other)).abs().max() > 1e-3


def test_works_with_the_samplers_and_guidance():
    model = _tiny()
    x_T, _, context = _inputs(seed=2)
    schedule = NoiseSchedule.make()
    guided = samplers.guided_model_fn(model, context, torch.zeros_like(context), guidance_scale=4.0)
    for sampler in ("ddim", "dpmpp_2m", "euler_a"):
        model_fn = lambda x, t: model(x, t, context)  # noqa: E731
        outs = [samplers.sample(fn, x_T, schedule, sampler=sampler, steps=4,
                                generator=torch.Generator().manual_seed(3)) for fn in (model_fn, model_fn, guided)]
        assert outs[0].shape == x_T.shape and outs[0].isfinite().all()
        assert torch.equal(outs[0], outs[1])  # deterministic for a seed
        assert (outs[2] - outs[0]).abs().max() > 1e-3  # guidance changes the sample


def test_attention_backends_agree():
    model = _tiny()
    x, t, context = _inputs()
    outs = {}
    for backend in ("sdpa", "math"):
        with attn.attention_backend(backend), torch.no_grad():
            outs[backend] = model(x, t, context)
    assert outs["sdpa"].abs().max() > 1e-2 and (outs["sdpa"] - outs["math"]).abs().max() < 1e-5
    if not (attn.xformers_available() and torch.cuda.is_available()):
        pytest.skip("xformers needs the package and a CUDA device")
    with attn.attention_backend("xformers"), torch.no_grad():
        out = model.cuda()(x.cuda(), t.cuda(), context.cuda()).cpu()
    assert (out - outs["sdpa"]).abs().max() < 1e-4


@pytest.mark.parametrize("width", [None, 64])  # 64: the context as wide as the tokens, so [Wq; Wk; Wv] is sliced
def test_fused_qkv_gives_the_same_output(width):
    model = _tiny(**({} if width is None else {"context_dim": width}))
    x, t, context = _inputs()
    if width is not None:
        context = torch.randn(2, 5, width)
    with torch.no_grad():
        expected = model(x, t, context)
        assert attn.fuse_qkv_projections(model) == 2 * len(model.blocks)
        out = model(x, t, context)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_model_keeps_the_input_dtype():
    model = _tiny().to(torch.bfloat16)
    x, t, context = _inputs()
    with torch.no_grad():
        out = model(x, t, context)
    assert out.dtype == torch.float32 and out.isfinite().all()


# --- training --------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_identical_gradients():
    plain, checkpointed = _tiny(), _tiny(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    checkpointed.blocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    x, t, context = _inputs()
    grads = []
    for model in (plain, checkpointed):
        model.train()
        context_grad = context.clone().requires_grad_()
        model(x, t, context_grad).square().mean().backward()
        grads.append([p.grad for p in model.parameters()] + [context_grad.grad])
    assert len(calls) == 2  # the checkpointed block ran again during backward
    for a, b in zip(*grads):  # bitwise equal here; the tolerance allows another summation order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def _structured_latents(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n 4x8x8 plane waves (frequency and per-channel phase vary by sample) and one random 3-token
    context per sample, which identifies it."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(8.0)[:, None], torch.arange(8.0)[None]
    freq = torch.randint(1, 3, (n, 2, 1, 1, 1), generator=gen).float()
    phase = torch.rand(n, 4, 1, 1, generator=gen) * 2 * math.pi
    amplitude = torch.tensor([1.0, -1.0, 0.5, 1.5])[None, :, None, None]
    latents = amplitude * torch.cos(2 * math.pi * (freq[:, 0] * cols + freq[:, 1] * rows) / 8 + phase)
    return latents, torch.randn(n, 3, CONTEXT_DIM, generator=gen)


@pytest.fixture
def _one_thread():
    # Tiny matmuls: on 2 shared cores the thread pool's overhead dominated (5x slower, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_dit_trains(_one_thread):
    """200 Adam steps of the eps loss (DDPM Algorithm 1) on 16 fixed latents lower the loss, and the
    trained model uses its context: each latent's own context beats a neighbour's."""
    latents, contexts = _structured_latents()
    schedule = NoiseSchedule.make("linear", 1000, 1e-4, 2e-2)  # DDPM's schedule
    model = _tiny(perturb=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(200):
        loss, _ = diffusion_loss(lambda x, t: model(x, t, contexts), latents, schedule, parameterization="eps",
                                 generator=gen)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first  # measured: 0.82 -> 0.10

    model.eval()
    gen = torch.Generator().manual_seed(5)
    t, noise = torch.randint(200, 800, (16,), generator=gen), torch.randn(latents.shape, generator=gen)
    with torch.no_grad():
        own, neighbour = (diffusion_loss(lambda x, tt: model(x, tt, c), latents, schedule, parameterization="eps",
                                         t=t, noise=noise)[0].mean() for c in (contexts, contexts.roll(1, 0)))
    assert own < 0.75 * neighbour  # measured: 0.080 vs 0.154


# --- configs and errors ------------------------------------------------------------------------------

def test_configs_round_trip_and_build_through_build_denoiser():
    config = DiTConfig.named("DiT-S/4", context_dim=1024)
    assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (12, 384, 6, 4)
    assert config.out_channels == config.in_channels == 4
    assert DiTConfig.from_dict(config.to_dict()) == config
    assert DiTConfig.from_dict({"size": "DiT-S/4", "context_dim": 1024}) == config
    model = build_denoiser({"type": "dit", "size": "DiT-tiny/2", "context_dim": CONTEXT_DIM, "input_size": 8})
    assert isinstance(model, DiT) and model.config == _tiny().config
    again = build_denoiser({"type": "dit", **model.config.to_dict()})
    assert again.config == model.config
    assert DiTConfig.from_dict({"hidden_size": 64, "depth": "2", "num_heads": 4.0}).depth == 2  # YAML strings


@pytest.mark.parametrize("fields, message", [
    ({"size": "DiT-S/2", "hiden_size": 64}, r"unknown keys \['hiden_size'\]"),
    ({"size": "DiT-M/2"}, "size 'DiT-M/2' is unknown"),
    ({"context_dim": 16}, "give size"),
    ({"size": "DiT-S/4", "input_size": 30}, "not divisible by patch_size"),
    ({"size": "DiT-S/2", "num_heads": 5}, "multiple of num_heads"),
    ({"hidden_size": 6, "depth": 1, "num_heads": 1}, "divisible by 4"),
    ({"size": "DiT-S/2", "depth": 0}, "depth must be >= 1"),
    ({"size": "DiT-S/2", "depth": "two"}, "depth must be a whole number"),
    ({"size": "DiT-S/2", "mlp_ratio": 0}, "mlp_ratio"),
    ({"size": "DiT-S/2", "context_dim": 0}, "context_dim"),
    ({"size": "DiT-S/2", "pool_context": True}, "pool_context needs context_dim"),
    ({"size": "DiT-S/2", "use_checkpoint": "yes"}, "true or false"),
])
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(InputError, match=message):
        build_denoiser({"type": "dit", **fields})


def test_bad_inputs_are_refused():
    model = _tiny(perturb=False)
    x, t, context = _inputs()
    with pytest.raises(InputError, match="context"):
        model(x, t)
    with pytest.raises(InputError, match=f"context \\[B, T, {CONTEXT_DIM}\\]"):
        model(x, t, context[..., :8])
    with pytest.raises(InputError, match="no cross-attention"):
        _tiny(perturb=False, context_dim=None)(x, t, context)
    with pytest.raises(InputError, match="divisible by the patch size 2"):
        model(x[..., :11], t, context)
    with pytest.raises(InputError, match="DiT-tiny/2"):
        DiTConfig.named("DiT-tiny/4")
