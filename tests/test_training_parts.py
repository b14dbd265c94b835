"""Pieces of the training loop: EMA, the resumable batch order, run checkpoints, the scale factor."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import ldm
from autoencoder import AutoencoderKL
from autoencoder.scale_factor import estimate_scale_factor
from ldm.data.order import ResumableBatchSampler, SeededItems
from ldm.training.ema import EMA
from ldm.training.checkpoints import latest_checkpoint, list_checkpoints, write_checkpoint_dir

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
