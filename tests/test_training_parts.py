"""Pieces of the training loop: EMA, the trained module, the train config, the resumable batch order, run
checkpoints, the scale factor."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import ldm
from autoencoder import AutoencoderKL
from autoencoder.scale_factor import estimate_scale_factor
from common.errors import InputError
from ldm.data.order import ResumableBatchSampler, SeededItems
from ldm.training.checkpoints import checkpoint_to_resume, latest_checkpoint, list_checkpoints, write_checkpoint_dir
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.trainable import Trainable

from helpers import REPO, TINY_AE


def test_ema_follows_the_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)
    # shadow = 0.9 * start + 0.1 * (start + 1)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, start + 0.1)
    torch.testing.assert_close(model.weight, start + 1.0)  # restored


def test_ema_warmup_and_start_step():
    ema = EMA(nn.Linear(1, 1), decay=0.999, start_step=5)
    assert ema.current_decay(0) == 0.0  # before start_step the shadow copies the weights
    assert ema.current_decay(5) == pytest.approx(1 / 10)  # LitEma: (1 + n) / (10 + n), n = 0
    ema.num_updates = 10_000
    assert ema.current_decay(5) == 0.999


class _Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x, t, context):
        return x + self.proj(context).mean(dim=1)


def test_trainable_holds_only_the_trained_modules():
    denoiser, text_encoder = _Denoiser(), nn.Embedding(10, 3)
    trained_text = Trainable(denoiser, text_encoder)
    frozen_text = Trainable(denoiser)  # a frozen encoder is neither optimised, nor averaged, nor wrapped by DDP
    # The keys are the model's, so checkpoints and the EMA address LatentDiffusion's parts.
    assert {k.split(".")[0] for k in trained_text.state_dict()} == {"denoiser", "text_encoder"}
    assert {k.split(".")[0] for k in frozen_text.state_dict()} == {"denoiser"}
    x, t, tokens = torch.randn(2, 2), torch.zeros(2), torch.tensor([[1, 2], [3, 4]])
    # Tokens through the trained encoder inside forward == the caller passing the encoder's output.
    torch.testing.assert_close(trained_text(x, t, tokens), frozen_text(x, t, context=text_encoder(tokens)))
    with pytest.raises(ValueError, match="needs `context`"):
        frozen_text(x, t, tokens)


def test_train_config_reads_yaml_values_and_refuses_bad_ones():
    config = TrainConfig.from_dict({"lr": "2e-4", "adam_betas": [0.9, 0.99], "seed": 3.0, "min_snr_gamma": 5})
    assert (config.lr, config.adam_betas, config.seed, config.min_snr_gamma) == (2e-4, (0.9, 0.99), 3, 5.0)
    with pytest.raises(InputError, match="grad_accum must be >= 1, got 0"):
        TrainConfig.from_dict({"grad_accum": 0})
    with pytest.raises(InputError, match=r"caption_dropout must be in \[0, 1\]"):
        TrainConfig.from_dict({"caption_dropout": 1.5})
    with pytest.raises(InputError, match="unknown keys"):
        TrainConfig.from_dict({"batch_sise": 3})


def test_batch_order_is_a_function_of_seed_and_step():
    full = ResumableBatchSampler(10, 3, seed=7)
    it = iter(full)
    first = [next(it) for _ in range(8)]  # crosses two epochs of 3 batches
    resumed = iter(ResumableBatchSampler(10, 3, seed=7, start_step=5))
    assert [next(resumed) for _ in range(3)] == first[5:]
    epoch0 = [i for batch in first[:3] for i, _ in batch]
    assert len(set(epoch0)) == 9  # no repeats within an epoch (drop_last leaves one out)
    assert [i for i, _ in first[3]] != [i for i, _ in first[0]]  # a new permutation each epoch
    assert next(iter(ResumableBatchSampler(10, 3, seed=8))) != first[0]  # the seed matters


def test_seeded_items_make_augmentation_reproducible_without_touching_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item()

    items = SeededItems(Noisy())
    state = torch.get_rng_state()
    assert items[(2, 123)] == items[(2, 123)] != items[(2, 124)]
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_folders_are_complete_or_absent(tmp_path):
    write_checkpoint_dir(tmp_path, 10, lambda d: (d / "w.txt").write_text("10"), keep=2)

    def crash(folder):
        (folder / "w.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_checkpoint_dir(tmp_path, 20, crash)
    assert latest_checkpoint(tmp_path).name == "step_00000010"  # the half-written one is invisible
    for step in (20, 30, 40):
        write_checkpoint_dir(tmp_path, step, lambda d: (d / "w.txt").write_text("x"), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    # A new run refuses a folder that holds checkpoints; --resume takes the newest.
    with pytest.raises(InputError, match="already holds checkpoints"):
        checkpoint_to_resume(tmp_path, resume=False)
    assert checkpoint_to_resume(tmp_path, resume=True).name == "step_00000040"
    assert checkpoint_to_resume(tmp_path / "new", resume=True) is None
    assert checkpoint_to_resume(tmp_path / "new", resume=False) is None


def test_scale_factor_gives_unit_variance_latents():
    ae = AutoencoderKL(TINY_AE).eval()
    images = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
    scale = estimate_scale_factor(ae, images, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = torch.cat([ae.encode(x).sample(torch.Generator().manual_seed(1)) for x in images])
    assert (scale * z).std().item() == pytest.approx(1.0, abs=0.05)


def test_compute_scale_factor_tool_writes_the_checkpoint(tmp_path, real_images):
    ae = AutoencoderKL(TINY_AE)
    ldm.save_autoencoder(ae, tmp_path / "ae.safetensors")
    cmd = [sys.executable, str(REPO / "tools" / "compute_scale_factor.py"), "--ckpt", str(tmp_path / "ae.safetensors"),
           "--data", str(real_images), "--num-images", "16", "--write", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.split("scale_factor = ")[1].split()[0])
    assert ldm.load_autoencoder(tmp_path / "ae.safetensors").config.scale_factor == pytest.approx(value, rel=1e-6)
    # The weights are untouched by --write.
    loaded = ldm.load_autoencoder(tmp_path / "ae.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), loaded.state_dict().values()))
