"""Pieces of the training loop: EMA, the trained module, the train config, the resumable batch order, run
checkpoints (and resuming past a damaged one), the metrics log, the scale factor."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from torch import nn

import ldm
from autoencoder import AutoencoderKL
from autoencoder.scale_factor import estimate_scale_factor
from common.checkpoint import save_checkpoint, save_pickle
from common.errors import InputError
from ldm.data.order import ResumableBatchSampler, SeededItems
from ldm.training.checkpoints import (
    checkpoint_problem,
    checkpoint_to_resume,
    latest_checkpoint,
    list_checkpoints,
    lost_contact,
    write_checkpoint_dir,
)
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.metrics_log import MetricsLog
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


def test_ema_of_the_trained_parameters_only():
    """A LoRA run's EMA (`trained_only`): the frozen weights get no shadow, are never touched, and the trained
    ones follow the same formula as in a full EMA."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    full, trained = EMA(model, decay=0.9, warmup=False), EMA(model, decay=0.9, warmup=False, trained_only=True)
    assert set(trained.shadow) == {"1.weight", "1.bias"} and len(full.shadow) == 4
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    full.update(model, step=0)
    trained.update(model, step=0)
    assert torch.equal(trained.shadow["1.weight"], full.shadow["1.weight"])
    with trained.applied_to(model):
        assert torch.equal(model[1].weight, full.shadow["1.weight"]) and torch.equal(model[0].weight, frozen)
    assert torch.equal(model[0].weight, frozen)


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
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]  # and removed
    for step in (20, 30, 40):
        write_checkpoint_dir(tmp_path, step, lambda d: (d / "w.txt").write_text("x"), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    # A new run refuses a folder that holds checkpoints; --resume takes the newest.
    with pytest.raises(InputError, match="already holds checkpoints"):
        checkpoint_to_resume(tmp_path, resume=False)
    assert checkpoint_to_resume(tmp_path, resume=True).name == "step_00000040"
    assert checkpoint_to_resume(tmp_path / "new", resume=True) is None
    assert checkpoint_to_resume(tmp_path / "new", resume=False) is None


def _write_state(folder, step: int) -> None:
    """A training checkpoint's files: two safetensors of 1,000,000 bytes of tensor data and a train state."""
    weights = {"w": torch.full((250_000,), float(step))}  # float32: 1,000,000 bytes
    save_checkpoint(folder / "model.safetensors", weights, {"step": step})
    save_checkpoint(folder / "ema.safetensors", weights, {"step": step})
    save_pickle(folder / "train_state.pt", {"step": step, "optimizer": {"exp_avg": torch.ones(1000)}})


def test_resume_skips_damaged_checkpoints_and_says_why(tmp_path, capsys):
    for step in (10, 20, 30):
        write_checkpoint_dir(tmp_path, step, lambda d, step=step: _write_state(d, step), keep=3)
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(tmp_path))
    newest = tmp_path / "step_00000030" / "model.safetensors"
    size = newest.stat().st_size  # 1,000,000 bytes of data + 8 + the JSON header
    with open(newest, "r+b") as f:  # the header survives, the data is cut short (a copy or disk that gave out)
        f.truncate(600)
    garbage = tmp_path / "step_00000020" / "train_state.pt"
    garbage.write_bytes(b"\0" * garbage.stat().st_size)  # the right size, but not a zip any more
    assert checkpoint_to_resume(tmp_path, resume=True).name == "step_00000010"
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --resume skips {tmp_path / 'step_00000030'}: model.safetensors is truncated (600 of {size} bytes)",
        f"warning: --resume skips {tmp_path / 'step_00000020'}: train_state.pt is unreadable (truncated or not a "
        "PyTorch file)"]
    # The run goes on from step 10: its next checkpoint replaces the damaged ones past it.
    write_checkpoint_dir(tmp_path, 15, lambda d: _write_state(d, 15), keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000015"]
    # Nothing intact: one line naming each and why.
    (tmp_path / "step_00000010" / "ema.safetensors").unlink()
    with open(tmp_path / "step_00000015" / "ema.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(InputError) as error:
        checkpoint_to_resume(tmp_path, resume=True)
    assert str(error.value) == (
        f"--resume: no intact checkpoint in {tmp_path} (step_00000015: ema.safetensors has changed ({size + 1} bytes, "
        f"written as {size}); step_00000010: ema.safetensors is missing); remove the damaged folders to start over, "
        "or choose a new --out")


@pytest.mark.parametrize("tool", ["train_ldm", "train_autoencoder"])
def test_a_lost_rank_ends_both_trainers_with_one_line(tool, tmp_path, monkeypatch):
    """A peer's death as gloo reports it becomes the one line naming the newest checkpoint (tests/test_cluster.py
    kills a real node); alone, or for any other error, the exception goes through unchanged."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    module = importlib.import_module(tool)
    write_checkpoint_dir(tmp_path / "checkpoints", 20, lambda d: _write_state(d, 20), keep=3)
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41231")

    def dies(args):
        raise gone

    monkeypatch.setattr(module, "train", dies)
    monkeypatch.setattr(module, "parse_args", lambda: type("Args", (), {"out": str(tmp_path)})())
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError) as error:
        module.main()
    assert str(error.value) == (
        "rank 2: lost contact with another rank ([../gloo/transport/tcp/pair.cc:534] Connection closed by peer "
        "[127.0.0.1]:41231): a node or worker died or stopped answering; the newest complete checkpoint is "
        f"{tmp_path / 'checkpoints' / 'step_00000020'}: relaunch the same command with --resume (torchrun "
        "--max-restarts N relaunches by itself)")
    assert lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_contact(gone, tmp_path) is None
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        module.main()


def test_checkpoints_written_before_the_size_manifest_are_checked_file_by_file(tmp_path, capsys):
    for step in (1, 2):
        folder = tmp_path / f"step_{step:08d}"
        folder.mkdir()
        _write_state(folder, step)
        (folder / "COMPLETE").write_text(f"{step}\n")  # the old marker: the step alone
    with open(tmp_path / "step_00000002" / "ema.safetensors", "r+b") as f:
        f.truncate(1000)
    (tmp_path / ".tmp-step_00000003").mkdir()  # left by a run killed while writing
    assert checkpoint_to_resume(tmp_path, resume=True).name == "step_00000001"
    assert not (tmp_path / ".tmp-step_00000003").exists()
    assert capsys.readouterr().err == (f"warning: --resume skips {tmp_path / 'step_00000002'}: ema.safetensors is "
                                       f"truncated (1000 of {(tmp_path / 'step_00000001' / 'ema.safetensors').stat().st_size}"
                                       " bytes)\n")


def _steps(path) -> list[str]:
    with open(path, newline="") as f:
        return [row["step"] for row in csv.DictReader(f)]


def test_metrics_log_keeps_one_run_per_step_after_a_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(1, 7):  # killed after step 6; the newest checkpoint is at step 4
        log.write({"step": step, "loss": 1.0 / step})
    resumed = MetricsLog(path, resume_step=4)
    assert _steps(path) == ["1", "2", "3", "4"]  # dropped on opening, before the first new row
    resumed.write({"step": 5, "loss": 0.5, "grad_norm": 2.0})  # a new column rewrites the file
    resumed.write({"step": 6, "loss": 0.4, "grad_norm": 1.0})
    assert _steps(path) == ["1", "2", "3", "4", "5", "6"]
    with open(path, newline="") as f:
        assert [r["loss"] for r in csv.DictReader(f)][4:] == ["0.5", "0.4"]  # the resumed run's rows
    # Without resume_step (the old call) the earlier run's rows at and after the first new row's step go at
    # that row. The autoencoder writes two rows at a step with a held-out evaluation: both stay.
    def autoencoder_rows(log, steps):
        for step in steps:
            log.write({"step": step, "loss": 0.1})
            if step % 2 == 0:
                log.write({"step": step, "val_psnr": 20.0 + step})

    path.unlink()
    autoencoder_rows(MetricsLog(path), range(1, 5))  # killed after step 4, the checkpoint at step 2
    autoencoder_rows(MetricsLog(path), range(3, 5))
    assert _steps(path) == ["1", "2", "2", "3", "4", "4"]
    MetricsLog(path, resume_step=0)  # a fresh run in the same folder
    assert _steps(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


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
