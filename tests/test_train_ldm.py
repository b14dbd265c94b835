"""tools/train_ldm.py end to end: one process, two under torchrun, SIGKILL and resume, latent caching."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ldm
from autoencoder import AutoencoderConfig, AutoencoderKL
from common.checkpoint import read_checkpoint
from common.config import read_yaml
from common.errors import InputError
from ldm.cli import run_cli
from ldm.data.captions import WebDatasetLatents
from ldm.formats.loading import (
    autoencoder_fingerprint,
    autoencoder_record,
    model_from_training_config,
    save_autoencoder,
)
from ldm.training.checkpoints import latest_checkpoint, list_checkpoints

from helpers import REPO, write_caption_shards

CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"]
RANDOM_AE = "model.random_autoencoder=true"  # configs/ldm/tiny.yaml's autoencoder section, random weights
FAST_DATA = ["train.batch_size=4", "train.log_every=1", "train.sample_every=1000", "train.warmup_steps=2",
             "train.num_workers=0", "train.shuffle_buffer=20"]
FAST = [*FAST_DATA, RANDOM_AE]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of 16 real images with captions."""
    return write_caption_shards(tmp_path_factory.mktemp("ldm_data"), CAPTIONS[:4])


def train(*args, launcher=(sys.executable,), check=True, **kwargs):
    cmd = [*launcher, str(REPO / "tools" / "train_ldm.py"), "--config", str(REPO / "configs/ldm/tiny.yaml"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_one_process_trains_and_the_model_generates(shards, tmp_path):
    run = tmp_path / "run"
    result = train("--data", shards, "--out", str(run), "--max-steps", "4", *FAST, "train.ckpt_every=2",
                   "train.sample_every=4", "train.sample_steps=2")
    assert "global batch 4 x 1 x 1 = 4" in result.stdout
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert any(k.startswith("loss_t") for k in rows[0])  # loss by timestep bucket
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert (run / "samples" / "step_00000004.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert "samples" in events.Tags()["images"]
    model = ldm.load_model(run / "model.safetensors")  # the final EMA checkpoint
    ema = ldm.load_model(run / "checkpoints" / "step_00000004" / "ema.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    images = model.generate(["red apple"], steps=2, seed=0)
    assert images[0].size == (32, 32)
    out = subprocess.run([sys.executable, "tools/txt2img.py", "--ckpt", str(run / "model.safetensors"), "--prompt",
                          "red apple", "--steps", "2", "--outdir", str(tmp_path / "t2i")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t2i" / "samples" / "00000.png").is_file()


def test_two_processes_see_different_samples_and_stay_in_sync(shards, tmp_path):
    run = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    train("--data", shards, "--out", str(run), "--max-steps", "3", *FAST, "train.ckpt_every=3",
          "train.log_sample_keys=true", "train.resampled=false", launcher=torchrun, env={**os.environ, "OMP_NUM_THREADS": "1"})
    logs = [(run / "sample_keys" / f"rank{r}.tsv").read_text().splitlines() for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == 3
    for line0, line1 in zip(*logs):
        step0, keys0, sum0 = line0.split("\t")
        step1, keys1, sum1 = line1.split("\t")
        assert step0 == step1
        # split_by_node: each rank reads its own shard, so the samples differ
        assert set(keys0.split(",")).isdisjoint(keys1.split(","))
        assert {k[:2] for k in keys0.split(",")} != {k[:2] for k in keys1.split(",")}
        assert sum0 == sum1  # identical weights after every step (gradients all-reduced)
    assert latest_checkpoint(run / "checkpoints").name == "step_00000003"


def test_sigkill_then_resume(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "train_ldm.py"), "--config", str(REPO / "configs/ldm/tiny.yaml"),
           "--data", shards, "--out", str(run), "--max-steps", "1000", *FAST, "train.ckpt_every=2"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list_checkpoints(run / "checkpoints")) < 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # at an arbitrary moment, possibly mid-checkpoint
    process.wait()
    before = list_checkpoints(run / "checkpoints")
    assert len(before) >= 2
    for folder in before:  # every visible checkpoint is complete and loads
        ldm.load_model(folder / "ema.safetensors")
        torch.load(folder / "train_state.pt", weights_only=True)
    resumed_from = int(before[-1].name.split("_")[1])
    result = train("--data", shards, "--out", str(run), "--max-steps", str(resumed_from + 2), *FAST,
                   "train.ckpt_every=2", "--resume")
    assert f"resumed at step {resumed_from}" in result.stdout
    assert latest_checkpoint(run / "checkpoints").name == f"step_{resumed_from + 2:08d}"


def test_latent_caching_gives_the_same_loss(shards, tmp_path):
    """The same batch, the same RNG state: cached mean/std reproduce the on-the-fly encoding's loss."""
    from ldm.data.captions import WebDatasetCaptions, WebDatasetLatents
    from ldm.diffusion.loss import diffusion_loss

    out = tmp_path / "latents"
    result = subprocess.run([sys.executable, "tools/encode_latents.py", "--config", "configs/ldm/tiny.yaml", "--data",
                             shards, "--out", str(out / "%06d.tar"), "--dtype", "float32", "--device", "cpu",
                             RANDOM_AE],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(REPO / "tools"))
    from encode_latents import build_model

    model, _ = build_model(str(REPO / "configs/ldm/tiny.yaml"), [RANDOM_AE], torch.device("cpu"))
    images = [s for _, s in zip(range(4), WebDatasetCaptions(shards, 32, caption_dropout=0.0, random_crop=False,
                                                                random_flip=False, shuffle_buffer=0, resampled=False))]
    cached = {s["key"]: s for s in WebDatasetLatents(str(out / "000000.tar"), caption_dropout=0.0, shuffle_buffer=0,
                                                      resampled=False)}
    batch = torch.stack([s["image"] for s in images])
    mean = torch.stack([cached[s["key"]]["mean"] for s in images])
    std = torch.stack([cached[s["key"]]["std"] for s in images])
    context = model.text_encoder.encode([s["caption"] for s in images])
    model_fn = lambda x, t: model.denoiser(x, t, context)
    with torch.no_grad():
        torch.manual_seed(5)
        on_the_fly = diffusion_loss(model_fn, model.encode_images(batch), model.schedule, parameterization="eps")[0]
        torch.manual_seed(5)
        latents = model.scale_factor * (mean + std * torch.randn_like(mean))
        from_cache = diffusion_loss(model_fn, latents, model.schedule, parameterization="eps")[0]
    torch.testing.assert_close(from_cache, on_the_fly, rtol=1e-5, atol=1e-6)
    # And training runs from the cache.
    train("--latents", str(out / "000000.tar"), "--out", str(tmp_path / "run"), "--max-steps", "2", *FAST)


def test_a_frozen_text_encoder_stays_as_built(shards, tmp_path):
    """A frozen encoder conditions the denoiser (without gradients) and is neither trained nor averaged."""
    frozen = "model.text_encoder={kind: small, width: 128, layers: 2, heads: 4, trainable: false}"
    run = tmp_path / "run"
    result = train("--data", shards, "--out", str(run), "--max-steps", "2", *FAST, frozen)
    assert "trainable parameters (denoiser)," in result.stdout
    sys.path.insert(0, str(REPO / "tools"))
    from encode_latents import build_model

    initial, _ = build_model(str(REPO / "configs/ldm/tiny.yaml"), [frozen, RANDOM_AE], torch.device("cpu"))  # same seed
    trained = ldm.load_model(run / "model.safetensors")
    before, after = initial.state_dict(), trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("denoiser."))


def test_bad_input(tmp_path, shards):
    result = train("--out", str(tmp_path / "run"), check=False)
    assert result.returncode == 2 and "give --data" in result.stderr
    result = train("--data", str(tmp_path / "missing-{000000..000001}.tar"), "--out", str(tmp_path / "run"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = train("--data", shards, "--out", str(tmp_path / "run"), "train.batch_sise=3", check=False)
    assert result.returncode == 2 and "unknown keys ['batch_sise']" in result.stderr


def test_the_dit_trains_with_the_same_script(shards, tmp_path):
    run = tmp_path / "run"
    train("--data", shards, "--out", str(run), "--max-steps", "2", *FAST,
          "model.denoiser={type: dit, size: DiT-tiny/2, in_channels: 4, input_size: 8, context_dim: 128}")
    model = ldm.load_model(run / "model.safetensors")
    assert type(model.denoiser).__name__ == "DiT"


# --- the autoencoder behind the latents, and data with nothing usable ------------------------------------

def encode_latents_tool():
    """tools/encode_latents.py as a module (run in-process below, saving a Python start)."""
    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents

    return encode_latents


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run that stopped on bad input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def encode_in_process(monkeypatch, *args: str) -> int:
    """tools/encode_latents.py's main under run_cli, as the script runs it; the exit code."""
    monkeypatch.setattr(sys, "argv", ["encode_latents.py", "--config", str(REPO / "configs/ldm/tiny.yaml"),
                                      "--device", "cpu", *args])
    try:
        run_cli(encode_latents_tool().main)
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_a_random_first_stage_needs_the_opt_in(shards, tmp_path, monkeypatch, capsys):
    fix = "pass model.autoencoder_ckpt=PATH (a trained autoencoder, e.g. runs/ae/autoencoder.safetensors"
    error = one_line_error(train("--data", shards, "--out", str(tmp_path / "run"), *FAST_DATA, check=False))
    assert error.startswith("error: model config: autoencoder_ckpt is not set, so the autoencoder would have random "
                            "weights") and fix in error and error.endswith("or model.random_autoencoder=true for a "
                                                                           "test or timing run")
    assert not (tmp_path / "run" / "metrics.csv").exists()
    assert encode_in_process(monkeypatch, "--data", shards, "--out", str(tmp_path / "lat" / "%06d.tar")) == 2
    assert fix in capsys.readouterr().err
    section = read_yaml(REPO / "configs/ldm/tiny.yaml")["model"]
    with pytest.raises(InputError, match="random_autoencoder is true or false, got 'yes'"):
        model_from_training_config({**section, "random_autoencoder": "yes"})
    with pytest.raises(InputError, match="autoencoder_ckpt=ae.safetensors and random_autoencoder=true contradict"):
        model_from_training_config({**section, "autoencoder_ckpt": "ae.safetensors", "random_autoencoder": True})


@pytest.fixture(scope="module")
def two_autoencoders(tmp_path_factory):
    """Two tiny autoencoders of configs/ldm/tiny.yaml's shape with different (random) weights: A and B."""
    root = tmp_path_factory.mktemp("autoencoders")
    config = AutoencoderConfig.from_dict(read_yaml(REPO / "configs/ldm/tiny.yaml")["model"]["autoencoder"])
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_autoencoder(AutoencoderKL(config), root / f"ae{seed}.safetensors")
        paths.append(root / f"ae{seed}.safetensors")
    return paths


def test_latents_are_refused_by_a_model_with_another_autoencoder(shards, two_autoencoders, tmp_path, monkeypatch):
    ae_a, ae_b = two_autoencoders
    out = tmp_path / "latents"
    assert encode_in_process(monkeypatch, "--data", shards, "--out", str(out / "%06d.tar"),
                             f"model.autoencoder_ckpt={ae_a}") == 0
    sha_a = autoencoder_fingerprint(ldm.load_autoencoder(ae_a))
    sha_b = autoencoder_fingerprint(ldm.load_autoencoder(ae_b))
    assert sha_a != sha_b
    record = {"sha256": sha_a, "scale_factor": 1.0, "checkpoint": str(ae_a)}
    assert json.loads((out / "latents_summary.json").read_text())["autoencoder"] == record
    # Training with B: refused before the first step, naming both autoencoders and the fix.
    result = train("--latents", str(out / "000000.tar"), "--out", str(tmp_path / "run"), "--max-steps", "1",
                   *FAST_DATA, f"model.autoencoder_ckpt={ae_b}", check=False)
    assert one_line_error(result) == (
        f"error: {out / '000000.tar'} holds latents of autoencoder {sha_a[:12]} ({ae_a}, scale_factor 1.0), but this "
        f"model's autoencoder is {sha_b[:12]} ({ae_b}, scale_factor 1.0): pass model.autoencoder_ckpt={ae_a} (the "
        "one tools/encode_latents.py used), or re-encode the shards with this model's autoencoder")
    assert "starting" not in result.stdout
    # With A: the check train_ldm.py makes passes (test_latent_caching_gives_the_same_loss trains from latents).
    model, raw = encode_latents_tool().build_model(str(REPO / "configs/ldm/tiny.yaml"),
                                                   [f"model.autoencoder_ckpt={ae_a}"], torch.device("cpu"))
    assert autoencoder_record(model, raw["model"]) == record
    dataset = WebDatasetLatents(str(out / "000000.tar"), resampled=False, autoencoder=record)
    assert len(list(dataset)) == 32 and dataset.autoencoder_record == record


@pytest.mark.parametrize("data,workers", [("garbage", 0), ("images", 2)])
def test_unusable_latents_stop_with_one_line(shards, tmp_path, data, workers):
    """A shard of random bytes, or image shards given as --latents: a bounded search, then one line (also when
    the loader's worker processes find it)."""
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))
    latents = str(tmp_path / "garbage.tar") if data == "garbage" else shards
    start = time.perf_counter()
    result = train("--latents", latents, "--out", str(tmp_path / "run"), "--max-steps", "2", *FAST,
                   f"train.num_workers={workers}", check=False)
    assert time.perf_counter() - start < 60
    hint = ("no shard held a sample webdataset can read" if data == "garbage" else
            "these look like image shards: pass them as --data, not --latents")
    skipped = "1 skipped (e.g. " if data == "garbage" else "32 skipped (e.g. "
    error = one_line_error(result)
    shards = 1 if data == "garbage" else 2
    assert error.startswith(f"error: no usable sample in {latents} after 1000 shard reads and skipped samples in "
                            f"{shards} shard(s): {skipped}")
    assert error.endswith(hint + (" (tools/encode_latents.py turns them into latent shards)" if data == "images" else
                                  ": give .tar shards as tools/make_shards.py (images) or tools/encode_latents.py "
                                  "(latents) write them"))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2 loader workers: ~1 min
def test_a_resumed_run_repeats_the_uninterrupted_one_bitwise(shards, tmp_path, workers):
    """Stop at a checkpoint and --resume: the same samples at every step and the same weights after every step as
    a run that never stopped (each rank's data position and RNG state are in the checkpoint)."""
    common = ["--data", shards, *FAST, f"train.num_workers={workers}", "train.ckpt_every=2",
              "train.log_sample_keys=true", "train.caption_dropout=0.5"]
    train("--out", str(tmp_path / "straight"), "--max-steps", "5", *common)
    train("--out", str(tmp_path / "resumed"), "--max-steps", "2", *common)
    result = train("--out", str(tmp_path / "resumed"), "--max-steps", "5", "--resume", *common)
    assert "resumed at step 2" in result.stdout and "data position:" not in result.stdout + result.stderr
    straight = (tmp_path / "straight" / "sample_keys" / "rank0.tsv").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "sample_keys" / "rank0.tsv").read_text().splitlines()
    assert len(straight) == 5 and resumed == straight  # keys and weight checksums, line for line
    a, _ = read_checkpoint(tmp_path / "straight" / "model.safetensors")
    b, _ = read_checkpoint(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
