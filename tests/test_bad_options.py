"""Nonsense options and absurd sizes get one line naming the problem and the fix (exit 2), before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

import ldm
from ldm.pipeline import check_memory
from ldm.training.checkpoints import checkpoint_to_resume
from ldm.training.config import TrainConfig

from helpers import REPO


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("args, message", [
    (["--H", "0"], "--H must be a positive number of pixels, got 0; leave it out for the model's native size"),
    (["--seed", str(2 ** 70)], "--seed must be a whole number from 0 to 2**63 - 1"),
    (["--H", "100000", "--W", "100000"], "100000x100000 needs about"),
    (["--H", "2"], "height 2 is too small: use at least 16 pixels"),  # f 4 x UNet 4
])
def test_txt2img_refuses_nonsense_sizes_and_seeds(tmp_path, args, message):
    result = run("txt2img.py", "--prompt", "red apple", "--outdir", tmp_path / "out", *args)
    assert_one_line_error(result, message)
    assert not list((tmp_path / "out").rglob("*.png"))  # nothing written


def test_absurd_size_is_refused_from_an_estimate_before_any_allocation():
    model = ldm.load_model()
    with pytest.raises(ldm.InputError, match=r"needs about [\d.]+ GiB to decode one image but .* use --vae-tiling"):
        model.generate("red apple", height=400_000, width=400_000, steps=1, seed=0)
    model.autoencoder.enable_tiling()  # tiles bound the decoder's memory: no refusal from the estimate
    check_memory(model, 400_000, 400_000, model.alphas_cumprod.device, next(model.parameters()).dtype)


def test_seed_range_is_checked_for_every_image():
    model = ldm.load_model()
    last = 2 ** 63 - 1
    assert len(model.generate("red apple", seed=last, steps=1)) == 1
    with pytest.raises(ldm.InputError, match=r"seed must be a whole number from 0 to 9223372036854775806"):
        model.generate("red apple", seed=last, n_samples=2, steps=1)  # the second image would use 2**63
    with pytest.raises(ldm.InputError, match="seed must be a whole number"):
        model.generate("red apple", seed=-1, steps=1)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train config: lr must be a number > 0, got -1.0"),
    ("train.weight_decay=.nan", "train config: weight_decay must be a finite number, got nan"),
    ("train.weight_decay=-0.1", "train config: weight_decay must be a number >= 0, got -0.1"),
    ("train.ema_decay=2", "train config: ema_decay must be in [0, 1], got 2.0"),
    ("train.min_snr_gamma=0", "train config: min_snr_gamma must be a number > 0"),
    ("train.adam_betas=[0.9,1.5]", "train config: adam_betas must be two numbers in [0, 1)"),
])
def test_train_ldm_refuses_nonsense_train_values(tmp_path, override, message):
    result = run("train_ldm.py", "--data", tmp_path / "none.tar", "--out", tmp_path / "run",
                 "model.random_autoencoder=true", override)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_train_autoencoder_refuses_a_zero_learning_rate(tmp_path):
    result = run("train_autoencoder.py", "--data", tmp_path, "--out", tmp_path / "run", "train.base_lr=0")
    assert_one_line_error(result, "train config: base_lr must be a number > 0, got 0.0")


def test_train_config_accepts_the_documented_defaults():
    config = TrainConfig.from_dict({})
    assert config.lr > 0 and config.min_snr_gamma is None
    assert TrainConfig.from_dict({"min_snr_gamma": "5", "offset_noise": 0.1}).min_snr_gamma == 5.0


def test_resume_on_an_empty_run_folder_says_it_starts_fresh(tmp_path, capsys):
    assert checkpoint_to_resume(tmp_path / "run" / "checkpoints", resume=True) is None
    out = capsys.readouterr().out
    assert "--resume: no checkpoint in" in out and "this run starts at step 0" in out


@pytest.mark.parametrize("script, args, message", [
    ("encode_latents.py", ["--config", "configs/ldm/tiny.yaml", "--data", "x.tar", "--out", "OUT/%06d.tar",
                           "--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
    ("eval_text_to_image.py", ["--data", "x.tar", "--feature-size", "0"], "--feature-size must be a whole number >= 1"),
    ("make_shards.py", ["IMAGES", "OUT/%06d.tar", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
])
def test_count_options_below_one_are_refused(tmp_path, script, args, message):
    (tmp_path / "IMAGES").mkdir()
    args = [a.replace("OUT", str(tmp_path / "out")).replace("IMAGES", str(tmp_path / "IMAGES")) for a in args]
    assert_one_line_error(run(script, *args), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, outdir, message", [
    ("file", "out", "is a file, but the images go into a folder there: remove it or choose another --outdir"),
    ("samples-file", "out", "samples is a file, but the images go into a folder there"),
    ("file", "out/deeper", "is a file, so"),
])
def test_bad_output_locations_are_refused_before_the_model_loads(tmp_path, layout, outdir, message):
    if layout == "file":
        (tmp_path / "out").write_text("not a folder")
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "samples").write_text("not a folder")
    result = run("txt2img.py", "--prompt", "red apple", "--outdir", tmp_path / outdir, "--ckpt",
                 tmp_path / "missing.safetensors")  # the missing model is never reached: the folder is checked first
    assert_one_line_error(result, message)


def test_train_ldm_hint_names_shards_not_image_folders(tmp_path):
    result = run("train_ldm.py", "--data", tmp_path / "missing.tar", "--out", tmp_path / "run",
                 "model.random_autoencoder=true")
    assert_one_line_error(result, "point --data at webdataset shards like 'shards/{000000..000009}.tar' "
                                  "(tools/make_shards.py packs a folder of images into shards)")


def test_sizes_are_multiples_of_what_the_whole_model_needs():
    """The default model: f = 4 autoencoder x a UNet with 3 levels (4) = 16 px; 20 px would give a 5-latent
    map that the UNet's skip connections cannot meet again (it crashed deep in torch before)."""
    model = ldm.load_model()
    assert model.size_multiple == model.autoencoder.downsampling_factor * 2 ** (len(model.config.denoiser.channel_mult) - 1)
    multiple = model.size_multiple
    with pytest.raises(ldm.InputError, match=f"height {multiple + 4} is not a multiple of {multiple}; use {multiple} "
                                             f"or {2 * multiple}"):
        model.generate("red apple", height=multiple + 4, width=multiple, steps=1, seed=0)
    assert model.generate("red apple", height=2 * multiple, width=multiple, steps=1, seed=0)[0].size == (multiple, 2 * multiple)
