#!/usr/bin/env python
"""Training throughput of tools/train_ldm.py (tiny config): on-the-fly encoding vs cached latents, 1 vs 2
processes, gradient checkpointing off and on. (The SD-v1-layout UNet: bench/train_sd1.py.)

    python bench/train_throughput.py               # 80 steps per run, about 6 min on 2 CPU cores
    python bench/train_throughput.py --steps 20    # a quick look (under 3 min), noisier

The data is made once in a temp folder: 64 crops of real photographs (32x32, scikit-image's samples,
as the tests use) with captions, in 4 webdataset shards (png + txt). `tools/encode_latents.py`
encodes them once into latent shards (float16 mean and std of q(z|x); no text contexts, because the
tiny config's text encoder trains). Then `tools/train_ldm.py --config configs/ldm/tiny.yaml` trains
for `--steps` steps (per-process batch 16, no workers, no samples or checkpoints before the end) in
four configurations: image shards or latent shards, under 1 process or 2 (torchrun, DDP with gloo).
A fifth run, images in 1 process at batch 32, is the control for 2 processes: their global batch is
32, and a bigger batch alone spreads the per-step costs (optimizer, EMA, Python) over more images.
Two more runs, images and latents in 1 process, turn on gradient checkpointing.

Threads: the runs share the same cores. One process gets OMP_NUM_THREADS = all of them (`--threads`,
default: the cores this process may use); two processes get half each, so no run oversubscribes.

The number is the trainer's own `images_per_s` column of metrics.csv: images of all processes per
second of wall time between two log rows (every 5 steps), measured on rank 0. The first row (process
start-up, shard opening, the shuffle buffer filling) is dropped and the median of the rest is
reported, with the smallest and largest. Writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from machine import RESULTS, machine, write_section  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))  # write_real_images: the tests' real-photo crops

from common.errors import InputError  # noqa: E402
from ldm.cli import run_cli  # noqa: E402

CONFIG = "configs/ldm/tiny.yaml"
IMAGES, SHARDS, BATCH, LOG_EVERY = 64, 4, 16, 5
CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"]
# No samples or checkpoints inside the measured steps (the run still writes both once, after its last log row).
# Random weights throughout (a timing run): the autoencoder too, by the config's explicit opt-in.
TRAIN_OVERRIDES = ["model.random_autoencoder=true", f"train.log_every={LOG_EVERY}", "train.sample_every=100000",
                   "train.ckpt_every=100000", "train.num_workers=0", "train.sample_steps=2"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(cmd: list[str], threads: int, **env: str) -> subprocess.CompletedProcess:
    """Run a repo command with OMP_NUM_THREADS=threads; a failure is an error with the command's last output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **env}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout[-2000:] + "\n" + result.stderr[-3000:]).strip()
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{tail}")
    return result


def make_shards(root: Path) -> str:
    """IMAGES real 32x32 images with captions in SHARDS shards (png + txt); returns the brace pattern."""
    import webdataset as wds

    from helpers import write_real_images

    images = write_real_images(root / "images", IMAGES)
    per_shard = IMAGES // SHARDS
    for shard in range(SHARDS):
        with wds.TarWriter(str(root / f"{shard:06d}.tar")) as sink:
            for k, path in enumerate(images[shard * per_shard:(shard + 1) * per_shard]):
                sink.write({"__key__": f"s{shard}_{k:03d}", "png": path.read_bytes(),
                            "txt": CAPTIONS[k % len(CAPTIONS)]})
    return str(root / f"{{000000..{SHARDS - 1:06d}}}.tar")


def encode_latents(data: str, out: Path, threads: int) -> dict:
    """Run tools/encode_latents.py once: its wall time (start-up included) and the time of its encoding loop."""
    start = time.perf_counter()
    # tqdm reads TQDM_* defaults from the environment: its bar then prints the loop's exact elapsed seconds.
    result = run([sys.executable, "tools/encode_latents.py", "--config", CONFIG, "--data", data,
                  "--out", str(out / "%06d.tar"), "--shard-size", str(IMAGES // SHARDS), "--batch-size", str(BATCH),
                  "--device", "cpu", "model.random_autoencoder=true"], threads, TQDM_BAR_FORMAT="{desc}: {n} {unit} in {elapsed_s:.3f} s")
    wall = time.perf_counter() - start
    loop = float(re.findall(r"encoding: \d+ batch in ([\d.]+) s", result.stderr)[-1])
    return {"wall_s": wall, "loop_s": loop, "images_per_s": IMAGES / loop}


def train(source: tuple[str, str], processes: int, batch: int, steps: int, out: Path, threads: int,
          checkpointing: bool = False) -> list[float]:
    """One short training run (`batch` per process); the images_per_s column of its metrics.csv."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    run([*launcher, "tools/train_ldm.py", "--config", CONFIG, *source, "--out", str(out), "--max-steps", str(steps),
         "--device", "cpu", f"train.batch_size={batch}", *TRAIN_OVERRIDES,
         f"train.gradient_checkpointing={str(checkpointing).lower()}"], threads)
    with open(out / "metrics.csv", newline="") as f:
        return [float(row["images_per_s"]) for row in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help=f"training steps per run, >= {2 * LOG_EVERY} (default: 80)")
    p.add_argument("--threads", type=int, default=available_cores(),
                   help="OMP threads of a 1-process run; each of 2 processes gets half (default: the usable cores, "
                        f"{available_cores()} here)")
    p.add_argument("--out", default=str(RESULTS),
                   help="where the Markdown results go; '' writes nothing (default: bench/RESULTS.md)")
    args = p.parse_args()
    if args.steps < 2 * LOG_EVERY:
        raise InputError(f"--steps must be >= {2 * LOG_EVERY} (a log row every {LOG_EVERY} steps, the first dropped), "
                         f"got {args.steps}")
    if args.threads < 2:
        raise InputError(f"--threads must be >= 2 (two processes get half each), got {args.threads}")
    import torch

    started, load = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # (data, processes, batch per process). The control, 1 process at batch 32, has the global batch of 2
    # processes: it separates what DDP gives from what the bigger batch gives.
    # Gradient checkpointing (train.gradient_checkpointing=true) recomputes each block's forward in the backward.
    configs = [("images", 1, BATCH, False), ("images", 2, BATCH, False), ("images", 1, 2 * BATCH, False),
               ("cached latents", 1, BATCH, False), ("cached latents", 2, BATCH, False),
               ("images", 1, BATCH, True), ("cached latents", 1, BATCH, True)]
    threads_of = {1: args.threads, 2: args.threads // 2}
    bar = tqdm(total=2 + len(configs), desc="train throughput", dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="ldm-train-bench-") as tmp:
        root = Path(tmp)
        data = make_shards(root / "shards")
        bar.update()
        encoded = encode_latents(data, root / "latents", args.threads)
        n_latent_shards = len(list((root / "latents").glob("*.tar")))
        latents = str(root / "latents" / f"{{000000..{n_latent_shards - 1:06d}}}.tar")
        bar.update()
        rates = {}
        for name, processes, batch, checkpointing in configs:
            source = ("--data", data) if name == "images" else ("--latents", latents)
            bar.set_postfix_str(f"{name}, {processes} process(es), batch {batch}, checkpointing {checkpointing}")
            rows = train(source, processes, batch, args.steps,
                         root / f"run-{name.split()[-1]}-{processes}x{batch}-{checkpointing}", threads_of[processes],
                         checkpointing)
            rates[name, processes, batch, checkpointing] = rows[1:]  # the first row holds start-up
            bar.update()
    bar.close()

    base = statistics.median(rates["images", 1, BATCH, False])
    lines = ["| data | gradient checkpointing | processes | threads each | global batch | images/s (median) "
             f"| log rows: min-max | speed-up vs images, 1 process, batch {BATCH} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, processes, batch, checkpointing in configs:
        values = rates[name, processes, batch, checkpointing]
        median = statistics.median(values)
        lines.append(f"| {name} | {'on' if checkpointing else 'off'} | {processes} | {threads_of[processes]} "
                     f"| {batch * processes} | {median:.0f} | "
                     f"{min(values):.0f}-{max(values):.0f} | {median / base:.2f}x |")
    table = "\n".join(lines)
    encoding = (f"Encoding the latents once (tools/encode_latents.py, {IMAGES} images, {args.threads} threads): "
                f"{encoded['wall_s']:.1f} s for the whole command (start-up and model build included), "
                f"{encoded['loop_s']:.2f} s for the encoding loop = {encoded['images_per_s']:.0f} images/s.")
    print(table, "", encoding, sep="\n")
    if args.out:
        command = "python bench/train_throughput.py" + (f" --steps {args.steps}" if args.steps != 80 else "") + \
            (f" --threads {args.threads}" if args.threads != available_cores() else "")
        text = [
            "## Training throughput (tiny config): on-the-fly encoding vs cached latents, 1 vs 2 processes, gradient checkpointing", "",
            f"- command: `{command}`, {time.perf_counter() - started:.0f} s",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine()}; load average {load:.2f} when it started (other work shares the cores)",
            f"- python {platform.python_version()}, torch {torch.__version__}",
            f"- run: `tools/train_ldm.py --config {CONFIG} --max-steps {args.steps} train.batch_size={BATCH} "
            f"{' '.join(TRAIN_OVERRIDES)}` (one control run at batch {2 * BATCH}) "
            f"on {IMAGES} real 32x32 images with captions in {SHARDS} shards (or their cached latents), CPU; "
            "2 processes under `torch.distributed.run --standalone --nproc_per_node 2` (DDP, gloo)",
            f"- threads: OMP_NUM_THREADS={threads_of[1]} for 1 process, {threads_of[2]} for each of 2",
            f"- images/s: metrics.csv `images_per_s` (all processes, between log rows every {LOG_EVERY} steps), first "
            "row dropped; median and range of the rest; see bench/README.md", "",
            table, "", encoding, "",
        ]
        write_section("train_throughput tiny", "\n".join(text), args.out)


if __name__ == "__main__":
    run_cli(main)
