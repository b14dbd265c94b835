"""bench/cluster_model.py: its arithmetic (ring all-reduce volume, the MFU behind MosaicML's figure, overlap,
bottlenecks) with the SD-v2 numbers it measures, and its loader measurement on tiny shards."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import cluster_model  # noqa: E402

# What `count_flops` gives for the SD-v2 UNet at 256 px (32x32 latents), per image; and its parameter count.
SD2_256 = {"forward": 181.09e9, "backward": 358.22e9, "vae": 272.72e9, "text": 45.13e9}
SD2_PARAMS = 865_910_724


def row(gpus: int, per_gpu: int, micro: int = 32, **changes) -> dict:
    options = dict(size=SD2_256, params=SD2_PARAMS, grad_bytes=4, latent_rate=700.0, jpeg_rate=200.0,
                   mfu=cluster_model.implied_mfu(137.0, SD2_256["forward"] + SD2_256["backward"]))
    return cluster_model.model_row(gpus, per_gpu, micro, **{**options, **changes})


def test_ring_all_reduce_sends_2_n_minus_1_over_n_of_the_payload():
    payload = SD2_PARAMS * 4  # fp32 gradients: 3.46 GB
    assert cluster_model.ring_allreduce_bytes(payload, 1) == 0  # alone: nothing to send
    assert cluster_model.ring_allreduce_bytes(payload, 2) == pytest.approx(payload)  # 2 * 1/2
    assert cluster_model.ring_allreduce_bytes(payload, 8) == pytest.approx(2 * 7 / 8 * payload)  # 6.06 GB
    assert cluster_model.ring_allreduce_bytes(payload, 512) == pytest.approx(6.914e9, rel=1e-3)  # -> 2x payload


def test_links_are_nvlink_within_a_node_and_the_nodes_nics_across():
    assert cluster_model.link_bandwidth(8) == (300e9, "intra-node comm")
    assert cluster_model.link_bandwidth(16) == (8 * 25e9, "inter-node comm")  # 8 x 200 Gb/s HDR per node


def test_the_implied_mfu_reproduces_mosaicmls_137_images_per_second():
    mfu = cluster_model.implied_mfu(137.0, SD2_256["forward"] + SD2_256["backward"])
    assert mfu == pytest.approx(137 * 539.31e9 / 312e12)  # 23.7%
    eight = row(8, 32)  # the all-reduce (20 ms) hides behind the last backward (155 ms): compute-bound
    assert eight["per_s"] == pytest.approx(137.0)
    assert eight["comm_s"] == pytest.approx(2 * 7 / 8 * SD2_PARAMS * 4 / 300e9)
    assert eight["bottleneck"] == "compute"


def test_overlap_hides_the_all_reduce_up_to_the_last_backward():
    assert cluster_model.step_seconds(0.234, 0.155, 0.035) == pytest.approx((0.234, 0.269))  # hidden; serial: sum
    assert cluster_model.step_seconds(0.234, 0.155, 0.300) == pytest.approx((0.379, 0.534))  # forward + comm
    assert cluster_model.split_batch(256, 32) == (8, 32)  # 8 GPUs at global batch 2048: accumulate 8
    assert cluster_model.split_batch(100, 32) == (4, 4)
    assert cluster_model.split_batch(4, 32) == (1, 4)


def test_bottlenecks_at_8_64_and_512_gpus_at_global_batch_2048():
    assert cluster_model.bottleneck({"compute": 0.029, "inter-node comm": 0.035, "data loading": 0.001}) \
        == "inter-node comm"
    assert row(8, 256)["bottleneck"] == "compute" and row(8, 256)["accum"] == 8
    assert row(64, 32)["bottleneck"] == "compute"
    tiny = row(512, 4)  # 4 images per GPU: 29 ms of compute against 35 ms of all-reduce
    assert tiny["bottleneck"] == "inter-node comm" and tiny["per_s"] < 100
    assert row(512, 4, grad_bytes=2)["per_s"] > tiny["per_s"]  # bf16 gradients halve the traffic
    starved = row(8, 32, latent_rate=5.0)  # 5 samples/s per core x 16 cores < 137 img/s
    assert starved["bottleneck"] == "data loading" and starved["per_s"] == pytest.approx(80.0)


def test_loader_rates_are_measured_on_shards_it_writes(tmp_path):
    latents = cluster_model.write_latent_shards(tmp_path / "latents", 64, latent_side=4, context=(77, 8),
                                                per_shard=32)
    assert len(latents) == 2
    assert cluster_model.loader_rate(latents, latents=True, seconds=0.5, batch=8) > 0
    jpegs = cluster_model.write_jpeg_shards(tmp_path / "jpeg", 16, short_side=40)
    assert cluster_model.loader_rate(jpegs, latents=False, seconds=0.5, batch=8, image_size=32) > 0


def test_bad_options_are_one_line_errors():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "cluster_model.py"), "--sizes", "100"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --sizes must be positive multiples of 64 px (8x8 UNet latents), got [100]"]
