"""Training an SDXL-layout model (configs/ldm/tiny-sdxl.yaml): micro-conditioning from each sample's sizes,
aspect-ratio buckets through tools/train_ldm.py, resume, cached latents with the conditioner's text outputs."""
from __future__ import annotations

import copy
import csv
import statistics
import subprocess
import sys

import pytest
import torch

import ldm
from common.config import read_yaml
from common.errors import InputError
from ldm.data.buckets import cover_size, make_buckets, nearest_bucket
from ldm.data.captions import WebDatasetLatents, collate_latents
from ldm.denoisers.embeddings import timestep_embedding
from ldm.formats.loading import model_from_training_config
from ldm.training.batches import unconditional_for_cache
from ldm.training.checkpoints import latest_checkpoint, list_checkpoints
from ldm.training.conditioning import conditioned_model_fn, micro_conditioning
from ldm.training.config import TrainConfig
from ldm.training.trainable import Trainable

from helpers import REPO

CONFIG = REPO / "configs/ldm/tiny-sdxl.yaml"
RANDOM_AE = "model.random_autoencoder=true"
FAST = ["train.batch_size=4", "train.log_every=1", "train.sample_every=1000", "train.sample_steps=2",
        "train.num_workers=0", "train.shuffle_buffer=20", RANDOM_AE]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> str:
    from test_buckets import write_mixed_shards  # the mixed-aspect shards of the bucket tests

    return write_mixed_shards(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return model_from_training_config({**read_yaml(CONFIG)["model"], "random_autoencoder": True}).eval()


def train(*args, config=CONFIG, check=True, launcher=(sys.executable,), env=None):
    cmd = [*launcher, str(REPO / "tools" / "train_ldm.py"), "--config", str(config), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def shape_of_key(key: str) -> tuple[int, int]:
    """(height, width) of a sample of write_mixed_shards, from its key 's{shard}_{k:03d}'."""
    from test_buckets import SHAPES

    width, height = SHAPES[(int(key[1]) * 16 + int(key[3:])) % len(SHAPES)]
    return height, width


BATCH = {"caption": ["red apple", ""], "original_size": torch.tensor([[128, 192], [40, 24]]),
         "crop": torch.tensor([[0, 12], [3, 0]]), "target_size": torch.tensor([[24, 40], [40, 24]]),
         "aesthetic_score": [None, None]}


def test_the_batch_sizes_reach_the_unet_and_dropped_captions_are_zeros(model):
    conditioner = model.text_encoder
    cond = micro_conditioning(conditioner, BATCH, CPU)
    tokens = [tower.tokenize(BATCH["caption"]) for tower in conditioner.towers]
    sizes = {"original_size_as_tuple": BATCH["original_size"].float(), "crop_coords_top_left": BATCH["crop"].float(),
             "target_size_as_tuple": BATCH["target_size"].float()}
    with torch.no_grad():
        full, zeroed = conditioner(tokens, sizes), conditioner(tokens, sizes, zero_text=True)
    # Row 0 is the conditioner's own output for its caption and sizes; row 1 (a dropped caption) its zeroed
    # text outputs (sgm base's unconditional side) with the size features kept.
    torch.testing.assert_close(cond["context"][0], full["context"][0])
    torch.testing.assert_close(cond["y"][0], full["y"][0])
    assert not cond["context"][1].any() and not cond["y"][1, :conditioner.pooled_dim].any()
    torch.testing.assert_close(cond["y"][1], zeroed["y"][1])
    # The size part of y: the Fourier features of (h, w), (top, left), (h, w), in that order (size_dim 8 each).
    numbers = torch.cat([BATCH["original_size"], BATCH["crop"], BATCH["target_size"]], 1).float()
    expected = timestep_embedding(numbers.reshape(-1), 8).reshape(2, -1)
    torch.testing.assert_close(cond["y"][:, conditioner.pooled_dim:], expected)
    # ... and y is what the UNet's label_emb receives when the loss calls the model_fn.
    seen = []
    hook = model.denoiser.label_emb.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model_fn = conditioned_model_fn(Trainable(model.denoiser), model, BATCH, train_text=False, device=CPU)
        with torch.no_grad():
            out = model_fn(torch.randn(2, 4, 6, 10), torch.tensor([10, 500]))
    finally:
        hook.remove()
    assert out.shape == (2, 4, 6, 10)
    torch.testing.assert_close(seen[0], cond["y"])


def test_without_zero_uncond_a_dropped_caption_is_the_empty_prompt_encoded(model):
    conditioner = copy.deepcopy(model.text_encoder)
    conditioner.config.zero_uncond = False  # the refiner's way (sgm's legacy ucg value "")
    cond = micro_conditioning(conditioner, BATCH, CPU)
    empty = conditioner.condition([""], image_size=(40, 24), original_size=(40, 24), crop=(3, 0))
    torch.testing.assert_close(cond["context"][1], empty["context"][0])
    torch.testing.assert_close(cond["y"][1], empty["y"][0])
    assert cond["context"][1].abs().max() > 0


def test_trainable_text_towers_in_a_conditioner_are_refused():
    sys.path.insert(0, str(REPO / "tools"))
    from train_ldm import build_model

    raw = read_yaml(CONFIG)
    raw["model"]["random_autoencoder"] = True
    raw["model"]["text_encoder"]["text"][1]["trainable"] = True
    with pytest.raises(InputError, match="text towers train frozen here; set trainable: false"):
        build_model(raw, TrainConfig.from_dict(raw["train"]), CPU)


def test_tiny_sdxl_trains_with_buckets_loss_falls_and_resumes(mixed_shards, tmp_path):
    run = tmp_path / "run"
    result = train("--data", mixed_shards, "--out", run, "--max-steps", 20, *FAST, "train.ckpt_every=10",
                   "train.log_sample_keys=true")
    assert "3 aspect-ratio buckets (h x w): 24x40, 32x32, 40x24" in result.stdout
    with open(run / "metrics.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 20
    # Measured on this fixed data and seed: 1.03 over steps 1-5 and 0.55 over steps 16-20 (eps loss of a
    # fresh UNet starts near 1: its output is about 0 while eps has unit variance).
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.8 * first, losses
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000010", "step_00000020"]
    buckets = make_buckets(32, multiple=8)
    for line in (run / "sample_keys" / "rank0.tsv").read_text().splitlines():  # every batch from one bucket
        keys = line.split("\t")[1].split(",")
        assert len({nearest_bucket(buckets, *shape_of_key(key)) for key in keys}) == 1, line

    result = train("--data", mixed_shards, "--out", run, "--max-steps", 22, *FAST, "train.ckpt_every=10", "--resume")
    assert "resumed at step 20" in result.stdout
    assert latest_checkpoint(run / "checkpoints").name == "step_00000022"
    trained = ldm.load_model(run / "model.safetensors")
    assert type(trained.text_encoder).__name__ == "Conditioner" and trained.config.denoiser.adm_in_channels == 72
    images = trained.generate(["red apple"], steps=2, seed=0, height=24, width=40)
    assert images[0].size == (40, 24)


def test_cached_latents_and_conditioner_outputs_per_bucket(mixed_shards, tmp_path, model, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents

    from ldm.cli import run_cli

    out = tmp_path / "latents"
    monkeypatch.setattr(sys, "argv", ["encode_latents.py", "--config", str(CONFIG), "--device", "cpu", "--data",
                                      mixed_shards, "--out", str(out / "%06d.tar"), "--dtype", "float32", RANDOM_AE])
    run_cli(encode_latents.main)
    items = list(WebDatasetLatents(str(out / "000000.tar"), caption_dropout=0.0, shuffle_buffer=0, resampled=False))
    assert len(items) == 32
    buckets = make_buckets(32, multiple=8)
    for item in items:  # each image encoded at its own bucket, centre-cropped, its sizes recorded
        height, width = shape_of_key(item["key"])
        bucket = nearest_bucket(buckets, height, width)
        assert item["target_size"] == bucket and tuple(item["mean"].shape) == (4, bucket[0] // 4, bucket[1] // 4)
        resized = cover_size(height, width, bucket)
        assert item["crop"] == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
        assert item["pooled"].shape == (24,) and item["context"].shape == (77, 48)
    # The cached text outputs give the conditioning the captions give when encoded during training.
    group = [item for item in items if item["target_size"] == (24, 40)][:3]
    batch = collate_latents(group)
    cached = micro_conditioning(model.text_encoder, batch, CPU)
    fresh = micro_conditioning(model.text_encoder, {**batch, "context": None, "pooled": None}, CPU)
    for name in ("context", "y"):
        torch.testing.assert_close(cached[name], fresh[name], rtol=1e-5, atol=1e-5)
    # A dropped caption's cached text is the zeros of the unconditional side, sizes kept.
    uncond = unconditional_for_cache(model, latents=True, train_text=False)
    dropped = collate_latents([{**group[0], "caption": "", "context": None, "pooled": None}, group[1]], **uncond)
    cond = micro_conditioning(model.text_encoder, dropped, CPU)
    fresh = micro_conditioning(model.text_encoder, {**dropped, "context": None, "pooled": None}, CPU)
    assert not cond["context"][0].any()
    torch.testing.assert_close(cond["y"], fresh["y"], rtol=1e-5, atol=1e-5)
    # And training runs from them, a bucket per batch.
    run = tmp_path / "run"
    train("--latents", str(out / "000000.tar"), "--out", run, "--max-steps", 3, *FAST, "train.log_sample_keys=true")
    for line in (run / "sample_keys" / "rank0.tsv").read_text().splitlines():
        keys = line.split("\t")[1].split(",")
        assert len({nearest_bucket(buckets, *shape_of_key(key)) for key in keys}) == 1, line


def test_buckets_serve_an_sd_style_model_too(mixed_shards, tmp_path):
    """configs/ldm/tiny.yaml (no vector conditioning, a small trained text encoder) with train.buckets=true."""
    run = tmp_path / "run"
    result = train("--data", mixed_shards, "--out", run, "--max-steps", 2, *FAST, "train.buckets=true",
                   "train.log_sample_keys=true", config=REPO / "configs/ldm/tiny.yaml")
    assert "3 aspect-ratio buckets" in result.stdout
    buckets = make_buckets(32, multiple=8)
    for line in (run / "sample_keys" / "rank0.tsv").read_text().splitlines():
        keys = line.split("\t")[1].split(",")
        assert len({nearest_bucket(buckets, *shape_of_key(key)) for key in keys}) == 1, line


def test_buckets_under_ddp_keep_each_batch_in_one_bucket_and_the_ranks_in_sync(mixed_shards, tmp_path):
    """Two processes (torchrun, gloo): each rank batches its own samples by bucket, so the ranks may train on
    different shapes in one step; the all-reduced gradients keep their weights identical after every step."""
    import os

    run = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    train("--data", mixed_shards, "--out", run, "--max-steps", 4, *FAST, "train.buckets=true",
          "train.log_sample_keys=true", "train.ckpt_every=4", config=REPO / "configs/ldm/tiny.yaml",
          launcher=torchrun, env={**os.environ, "OMP_NUM_THREADS": "1"})
    buckets = make_buckets(32, multiple=8)
    logs = [(run / "sample_keys" / f"rank{r}.tsv").read_text().splitlines() for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == 4
    shapes = []
    for line0, line1 in zip(*logs):
        (step0, keys0, sum0), (step1, keys1, sum1) = line0.split("\t"), line1.split("\t")
        assert step0 == step1 and sum0 == sum1  # the same weights on both ranks after every step
        per_rank = [{nearest_bucket(buckets, *shape_of_key(k)) for k in keys.split(",")} for keys in (keys0, keys1)]
        assert all(len(bucket) == 1 for bucket in per_rank), (line0, line1)  # one bucket per batch
        shapes.append(per_rank)
    assert len({b for pair in shapes for rank in pair for b in rank}) > 1  # more than one shape was trained on
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"


def test_a_lora_on_an_sdxl_model_trains_both_towers_and_the_unet(mixed_shards, tmp_path):
    """train_ldm.py --lora-rank --lora-text-encoder on the SDXL layout: the kohya file names the UNet by sgm's
    paths and both text towers (te1, te2), every adapter trained, and the model loads it back completely."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    result = train("--data", mixed_shards, "--out", run, "--max-steps", 3, "--lora-rank", 2, "--lora-text-encoder",
                   *FAST, "train.lr=1e-2", "train.warmup_steps=1", "train.ckpt_every=3")
    assert "LoRA (rank 2, alpha 2)" in result.stdout
    tensors = load_file(run / "lora.safetensors")
    components = {key.split("_")[1] for key in tensors}
    assert components == {"unet", "te1", "te2"}
    ups = {key: v for key, v in tensors.items() if key.endswith("lora_up.weight")}
    # every adapter moved from its zero start but CLIP-L's last layer, which SDXL does not read (its context is the
    # penultimate layer's, and its pooled vector is bigG's): kohya's files have those at zero too
    unread = {k for k in ups if k.startswith("lora_te1_text_model_encoder_layers_1_")}
    assert len(unread) == 6 and all(not torch.any(ups[k]) for k in unread)
    assert all(torch.any(v) for k, v in ups.items() if k not in unread)
    torch.manual_seed(0)
    model = model_from_training_config({**read_yaml(CONFIG)["model"], "random_autoencoder": True})
    report = model.load_lora(run / "lora.safetensors")
    assert report.matched_keys == report.total_keys == len(tensors) and not report.unmatched
