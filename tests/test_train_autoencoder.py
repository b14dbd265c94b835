"""tools/train_autoencoder.py end to end on real images: it learns, it resumes exactly, bad input is one line."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ldm

from helpers import REPO, write_real_images

SCRIPT = REPO / "tools" / "train_autoencoder.py"
# Small and fast: the tiny config, batch 8, the discriminator switched on early so resume covers it.
FAST = ["train.batch_size=8", "train.held_out=8", "train.log_every=1", "train.eval_every=10",
        "train.sample_every=10", "loss.disc_start=6"]


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--config", str(REPO / "configs/autoencoder/tiny.yaml"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_reconstruction_loss_and_writes_outputs(real_images, tmp_path):
    run = tmp_path / "run"
    # The GAN stays off here (as for the first 50k steps of a real run): this checks that it learns.
    train("--data", str(real_images), "--out", str(run), "--max-steps", "40", *FAST, "train.ckpt_every=20",
          "loss.disc_start=1000")
    log = rows(run)
    rec = [float(r["rec"]) for r in log if r.get("rec")]
    val_rows = [r for r in log if r.get("val_psnr")]
    # Mean L1 of the last 10 batches vs the first 10 (measured: 0.405 vs 0.507).
    assert sum(rec[-10:]) < 0.88 * sum(rec[:10])
    assert float(val_rows[-1]["val_l1"]) < float(val_rows[0]["val_l1"])
    assert float(val_rows[-1]["val_psnr"]) > float(val_rows[0]["val_psnr"])  # held-out, EMA weights
    assert 0 < float(val_rows[-1]["val_ssim"]) <= 1
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000010.png", "step_00000020.png",
                                                                   "step_00000030.png", "step_00000040.png"]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000020", "step_00000040"]
    # The exported EMA autoencoder loads through the public API and reconstructs.
    ae = ldm.load_autoencoder(run / "autoencoder.safetensors")
    assert ae.config.downsampling_factor == 4
    ema = load_file(run / "checkpoints" / "step_00000040" / "autoencoder_ema.safetensors")
    assert all(torch.equal(ema[k], v) for k, v in ae.state_dict().items())


def test_resume_continues_exactly(real_images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--data", str(real_images), *FAST, "train.ckpt_every=8"]
    train(*common, "--out", str(straight), "--max-steps", "16")
    train(*common, "--out", str(resumed), "--max-steps", "8")
    result = train(*common, "--out", str(resumed), "--max-steps", "16", "--resume")
    assert "resumed from" in result.stdout and "at step 8" in result.stdout
    assert float([r for r in rows(straight) if r.get("disc")][-1]["disc"]) > 0  # the discriminator trained too
    a, b = straight / "checkpoints" / "step_00000016", resumed / "checkpoints" / "step_00000016"
    for name in ("autoencoder.safetensors", "autoencoder_ema.safetensors", "discriminator.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")
    sa = torch.load(a / "train_state.pt", weights_only=True)
    sb = torch.load(b / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 16 and sa["ema_num_updates"] == sb["ema_num_updates"]
    exp_a = sa["opt_ae"]["state"][0]["exp_avg"]
    torch.testing.assert_close(exp_a, sb["opt_ae"]["state"][0]["exp_avg"], rtol=0, atol=1e-6)
    assert torch.equal(sa["rng"]["cpu"], sb["rng"]["cpu"])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    write_real_images(data, 20)
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    result = train("--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", *FAST)
    assert "skipped 2 unreadable images" in result.stdout


@pytest.mark.parametrize("extra,message", [
    (["--data", "{empty}"], "no images found in"),
    (["--data", "{missing}"], "is neither an existing folder of images nor .tar shards"),
    (["--data", "{images}", "train.image_size=30"], "image_size=30 is not divisible by the downsampling factor 4; use 28 or 32"),
    (["--data", "{images}", "train.batch_sise=4"], "train config: unknown keys ['batch_sise']"),
    (["--data", "{images}", "loss.disc_loss=square"], "disc_loss"),
    (["--data", "{images}", "train.batch_size=64"], "fewer than one batch of 64"),
    (["--data", "{images}", "train.eval_every=0"], "train config: eval_every must be >= 1, got 0"),
])
def test_bad_input_is_one_line(tmp_path, real_images, extra, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "images": real_images}
    extra = [e.format(**paths) for e in extra]
    result = train(*extra, "--out", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line


def test_existing_run_needs_resume(real_images, tmp_path):
    run = tmp_path / "run"
    train("--data", str(real_images), "--out", str(run), "--max-steps", "1", *FAST)
    result = train("--data", str(real_images), "--out", str(run), "--max-steps", "2", check=False)
    assert result.returncode == 2 and "pass --resume" in result.stderr


def test_training_from_webdataset_shards(real_images, tmp_path):
    import webdataset as wds

    images = sorted(real_images.iterdir())
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"{shard:06d}.tar")) as sink:
            for path in images[shard * 16:(shard + 1) * 16]:
                sink.write({"__key__": path.stem, "png": path.read_bytes(), "txt": "a photo"})
    run = tmp_path / "run"
    result = train("--data", str(tmp_path / "shards" / "{000000..000001}.tar"), "--val-data", str(real_images),
                   "--out", str(run), "--max-steps", "3", *FAST)
    assert "held-out 8 images" in result.stdout
    assert [r["step"] for r in rows(run) if r.get("rec")] == ["1", "2", "3"]
    assert ldm.load_autoencoder(run / "autoencoder.safetensors").config.embed_dim == 4


@pytest.mark.parametrize("data,workers", [("garbage", 0), ("latents", 2)])
def test_shards_without_a_usable_image_stop_with_one_line(real_images, tmp_path, data, workers):
    """A shard of random bytes (read first for the held-out images), or latent shards given as --data (found by
    the loader's worker processes, with --val-data): a bounded search, then one line."""
    import io
    import os

    import numpy as np
    import webdataset as wds

    shard = tmp_path / f"{data}.tar"
    if data == "garbage":
        shard.write_bytes(os.urandom(3000))
        extra = []
    else:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((4, 8, 8), np.float16))
        with wds.TarWriter(str(shard)) as sink:
            for i in range(4):
                sink.write({"__key__": f"z{i}", "mean.npy": buffer.getvalue(), "std.npy": buffer.getvalue(),
                            "txt": "a caption"})
        extra = ["--val-data", str(real_images)]
    result = train("--data", str(shard), *extra, "--out", str(tmp_path / "run"), "--max-steps", "2", *FAST,
                   f"train.num_workers={workers}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0  # one line
    if data == "garbage":  # one pass over the shards for the held-out images
        assert result.stderr.strip() == (
            f"error: no usable sample in {shard} after a full pass over its 1 shard(s): 1 skipped (e.g. {shard}: "
            "ReadError: invalid header); no shard held a sample webdataset can read: give .tar shards as "
            "tools/make_shards.py (images) or tools/encode_latents.py (latents) write them")
    else:  # the endless training stream
        error = result.stderr.strip()
        assert error.startswith(f"error: no usable sample in {shard} after 1000 shard reads and skipped samples in 1 "
                                f"shard(s): 4 skipped (e.g. {shard}:z")  # z0 .. z3, as the shuffle buffer gives them
        assert error.endswith(": no image in sample (looked for .jpg, .jpeg, .png, .webp)); these look like latent "
                              "shards from tools/encode_latents.py: pass them to tools/train_ldm.py as --latents; "
                              "--data takes image shards")
