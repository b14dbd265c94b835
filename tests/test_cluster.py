"""tools/train_ldm.py on a simulated cluster: two torchrun launchers on this machine stand in for two nodes
(`--nnodes 2 --node_rank 0/1`, a rendezvous on 127.0.0.1, gloo), a worker killed under `--max-restarts`, a node
killed outright. The commands are the README's ("Training on a cluster"), with local addresses."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import webdataset as wds

from common.checkpoint import read_checkpoint
from ldm.training.checkpoints import list_checkpoints

from helpers import REPO, write_real_images

CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"]
TINY = ["--config", str(REPO / "configs/ldm/tiny.yaml"), "model.random_autoencoder=true", "train.log_every=1",
        "train.sample_every=1000", "train.warmup_steps=2", "train.num_workers=0", "train.log_sample_keys=true"]


def train_ldm(*args: str) -> list[str]:
    """tools/train_ldm.py and its arguments, the tiny settings included: options first, then the overrides."""
    args = (*TINY, *args)
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return [str(REPO / "tools" / "train_ldm.py"), *[a for a in args if a not in overrides], *overrides]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # several training processes each: minutes on 2 cores


def write_shards(root: Path, groups: dict[str, list[int]], images: list[Path]) -> str:
    """One shard per group name, holding the listed images (keys NAME_INDEX) in that order; -> the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for n, (name, indices) in enumerate(groups.items()):
        with wds.TarWriter(str(root / f"{n:06d}.tar")) as sink:
            for i in indices:
                key = f"{name}_{i:03d}" if isinstance(i, int) else i
                index = int(str(i).rsplit("_", 1)[-1])
                sink.write({"__key__": key, "png": images[index].read_bytes(), "txt": CAPTIONS[index % 4]})
    return str(root / f"{{000000..{len(groups) - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_real_images(tmp_path_factory.mktemp("cluster_images"), 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, nodes: int, workers: int, port: int, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """One node: a torchrun launcher with `workers` processes, static rendezvous at 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(rank),
           "--nproc_per_node", str(workers), "--master_addr", "127.0.0.1", "--master_port", str(port), *launcher,
           *train_ldm(*args)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_node(launcher: subprocess.Popen, rank: int) -> None:
    """SIGKILL a node: its launcher and its workers (found by their RANK: they need not stay the launcher's
    children)."""
    workers = [p for p in psutil.process_iter() if _is_worker(p, launcher, rank)]
    for process in [psutil.Process(launcher.pid), *workers]:
        process.kill()


def _is_worker(process: psutil.Process, launcher: subprocess.Popen, rank: int) -> bool:
    try:
        return "train_ldm.py" in " ".join(process.cmdline()) and process.environ().get("RANK") == str(rank) \
            and str(launcher.args[-1]) in " ".join(process.cmdline())
    except psutil.Error:
        return False


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[:3000] + "\n...\n" + out[-3000:]
    return out


def sample_log(folder: Path, rank: int) -> list[tuple[int, list[str], str]]:
    """train.log_sample_keys' rows of one rank: (step, keys, weight checksum)."""
    rows = []
    for line in (folder / "sample_keys" / f"rank{rank}.tsv").read_text().splitlines():
        step, keys, checksum = line.split("\t")
        rows.append((int(step), keys.split(","), checksum))
    return rows


def losses(folder: Path) -> list[float]:
    with open(folder / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


def test_two_nodes_of_two_workers_read_each_sample_once_and_stay_in_sync(images, tmp_path):
    """4 ranks over 8 shards, one pass (train.resampled=false): every sample read exactly once, identical weights
    on every rank after every step, and only rank 0 writes (node 1's --out receives only its ranks' key logs)."""
    data = write_shards(tmp_path / "data", {f"s{n}": list(range(4 * n, 4 * n + 4)) for n in range(8)}, images)
    port = free_port()
    common = ["--data", data, "--max-steps", "4", "train.batch_size=2", "train.resampled=false",
              "train.shuffle_buffer=20", "train.ckpt_every=2"]
    nodes = [node(r, 2, 2, port, "--out", str(tmp_path / f"node{r}"), *common) for r in (0, 1)]
    outputs = [finish(p) for p in nodes]
    assert "4 process(es)" in outputs[0] and "global batch 2 x 4 x 1 = 8" in outputs[0]
    logs = {r: sample_log(tmp_path / f"node{r // 2}", r) for r in range(4)}
    seen = [key for r in range(4) for _, keys, _ in logs[r] for key in keys]
    assert sorted(seen) == sorted(f"s{n}_{i:03d}" for n in range(8) for i in range(4 * n, 4 * n + 4))  # once each
    for step in range(4):
        assert len({logs[r][step][2] for r in range(4)}) == 1  # the same weight checksum on all 4 ranks
    written = sorted(str(p.relative_to(tmp_path / "node1")) for p in (tmp_path / "node1").rglob("*") if p.is_file())
    assert written == ["sample_keys/rank2.tsv", "sample_keys/rank3.tsv"]
    assert [p.name for p in list_checkpoints(tmp_path / "node0" / "checkpoints")] == ["step_00000002", "step_00000004"]


def test_two_nodes_follow_the_loss_curve_of_one_process_with_the_same_global_batch(images, tmp_path):
    """2 nodes x batch 2 (shard a on rank 0, shard b on rank 1, in order) against 1 process x batch 4 reading the
    same samples per step; per-sample noise makes each sample's t and noise independent of its rank."""
    same = ["train.per_sample_noise=true", "train.precision=fp32", "train.shuffle_buffer=0", "train.resampled=false",
            "train.caption_dropout=0", "train.random_crop=false", "--max-steps", "4", "train.ckpt_every=4"]
    split = write_shards(tmp_path / "split", {"a": list(range(0, 8)), "b": list(range(8, 16))}, images)
    merged = [k for s in range(4) for k in (f"a_{2 * s:03d}", f"a_{2 * s + 1:03d}", f"b_{8 + 2 * s:03d}",
                                             f"b_{8 + 2 * s + 1:03d}")]
    one = write_shards(tmp_path / "one", {"m": merged}, images)
    port = free_port()
    nodes = [node(r, 2, 1, port, "--out", str(tmp_path / "nodes"), "--data", split, "train.batch_size=2", *same)
             for r in (0, 1)]
    for p in nodes:
        finish(p)
    single = subprocess.run([sys.executable, *train_ldm("--data", one, "--out", str(tmp_path / "single"),
                                                        "train.batch_size=4", *same)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = [sample_log(tmp_path / "nodes", r) for r in (0, 1)]
    for step, (_, keys, _) in enumerate(sample_log(tmp_path / "single", 0)):
        assert sorted(keys) == sorted(ranks[0][step][1] + ranks[1][step][1])  # the same global batch
    two, one_curve = losses(tmp_path / "nodes"), losses(tmp_path / "single")
    assert len(two) == len(one_curve) == 4
    worst_loss = max(abs(a - b) / b for a, b in zip(two, one_curve))
    print(f"2 nodes vs 1 process: losses {two} vs {one_curve}, largest relative difference {worst_loss:.1e}")
    assert worst_loss < 1e-5, (two, one_curve)
    a, _ = read_checkpoint(tmp_path / "nodes" / "model.safetensors")
    b, _ = read_checkpoint(tmp_path / "single" / "model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"largest weight difference after 4 steps: {worst:.1e}")
    assert worst < 1e-4, worst


def test_a_killed_worker_is_restarted_and_the_run_ends_at_the_same_step(images, tmp_path):
    """torchrun --max-restarts 1 with --resume from the first start (on an empty folder: a fresh start): SIGKILL
    one worker after the first checkpoint; the workers restart, resume from the newest complete checkpoint, and
    the run ends after exactly --max-steps optimizer steps."""
    data = write_shards(tmp_path / "data", {"a": list(range(16)), "b": list(range(16, 32))}, images)
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "1", *train_ldm("--data", data, "--out", str(run), "--resume", "--max-steps", "8",
                                                  "train.batch_size=2", "train.ckpt_every=2")]
    process = subprocess.Popen(launcher, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(run / "checkpoints"):
        time.sleep(0.1)
    workers = [c for c in psutil.Process(process.pid).children(recursive=True) if "train_ldm.py" in " ".join(c.cmdline())]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    out = finish(process)
    assert "--resume: no checkpoint" in out  # the first start, on an empty folder
    resumed = [int(line.split("resumed at step ")[1].split()[0]) for line in out.splitlines() if "resumed at step" in line]
    assert len(resumed) == 1 and resumed[0] >= 2, out[-3000:]
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_00000008"
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("loss")] == list(range(1, 9))
    assert torch.load(run / "checkpoints" / "step_00000008" / "train_state.pt", weights_only=True)["step"] == 8


def test_a_dead_node_stops_the_others_with_a_message_not_a_hang(images, tmp_path):
    """Node 1 (its launcher and worker) is killed mid-run: node 0 stops within a bounded time and says what
    happened and what to do; its newest complete checkpoint stays usable."""
    data = write_shards(tmp_path / "data", {"a": list(range(16)), "b": list(range(16, 32))}, images)
    port = free_port()
    args = ["--out", str(tmp_path / "run"), "--data", data, "--max-steps", "100000", "train.batch_size=2",
            "train.ckpt_every=2"]
    nodes = [node(r, 2, 1, port, *args) for r in (0, 1)]
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(tmp_path / "run" / "checkpoints"):
        time.sleep(0.1)
    kill_node(nodes[1], rank=1)
    killed = time.time()
    out, _ = nodes[0].communicate(timeout=300)
    took = time.time() - killed
    assert nodes[0].returncode != 0
    assert took < 120, took
    assert "lost contact with another rank" in out, out[-3000:]
    assert "--resume" in out.split("lost contact with another rank")[1].splitlines()[0]
    nodes[1].wait()
