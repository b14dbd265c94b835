#!/usr/bin/env python
"""Training in bf16 autocast vs fp32 on the CPU (train.precision): steps/s and loss curves side by side, on the
default model's recipe (configs/ldm/emoji.yaml and configs/autoencoder/emoji.yaml).

    python bench/train_precision.py                   # 200 LDM + 200 autoencoder steps (+ 20), ~7 min
    python bench/train_precision.py --threads 1       # on cores other work shares (2 threads stall there)
    python bench/train_precision.py --ldm-steps 50 --ae-steps 50   # a quick look (curves too short to judge)
    python bench/train_precision.py --out ''          # print only; write no file

The data: the emoji of the default model (its npm packages in data/emoji, as tools/prepare_emoji.py reads them,
resized to 32x32, all captions), or, where those packages are missing, the tests' crops of real photographs with
4 captions (the results say which). The LDM trains on cached latents, as the recipe does: the images' posterior
moments from the embedded default model's autoencoder (the one configs/autoencoder/emoji.yaml trained), stored as
float16 as tools/encode_latents.py stores them.

What runs: two copies of each model from the same seed, one trained in fp32 and one under
`torch.autocast("cpu", dtype=torch.bfloat16)` (`train.precision=bf16`), alternating step by step in this one
process (which goes first alternates too), on the same batches with the same draws (t, noise, posterior sample,
caption dropout: the global RNG is reseeded before each copy's step). So both see the same load on shared cores.
- LDM: the loop body of tools/train_ldm.py with its helpers (build_model, make_optimizer, mixed_precision,
  latents_of): the emoji recipe's UNet and trainable text encoder, batch 32, lr 3e-4 with warm-up, min-SNR 5,
  caption dropout 0.1, gradient clipping, AdamW (fused), EMA.
- Autoencoder: tools/train_autoencoder.py's `train_step` (autoencoder step, the discriminator step after
  disc_start, EMA) on the emoji recipe (batch 16, lr 3e-4, Adam betas 0.5/0.9). The recipe's discriminator starts
  at step 1500, so the curve steps run without it; then `--ae-disc-steps` more steps with it on time the full step.

Steps/s: 1 / the median wall time of a step (the data already in memory), the first `--warmup` steps of each copy
left out (the first bf16 steps build oneDNN's bf16 kernels). Loss curves: the mean loss of each copy per
`--window` steps (LDM: the diffusion loss; autoencoder: the generator loss `total` = nll + kl_weight * KL) and
their relative difference |bf16 - fp32| / fp32. The curves "agree" when the last window's relative difference is
at most AGREE_REL and no window's exceeds WINDOW_REL. bf16 pays off for a trainer when its curves agree and it is
faster over the recipe (the autoencoder: disc_start steps without the discriminator, the rest with it); the
verdict says so per trainer, next to what `train.precision=auto` picks on this CPU
(ldm/training/precision.py, AUTO_BF16_ON_CPU). Writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from machine import RESULTS, machine, write_section  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tools"))  # the trainers' own step helpers
sys.path.insert(0, str(REPO / "tests"))  # write_real_images: the fallback data

from common.errors import InputError  # noqa: E402
from ldm.cli import run_cli  # noqa: E402

LDM_CONFIG, AE_CONFIG = "configs/ldm/emoji.yaml", "configs/autoencoder/emoji.yaml"
EMOJI = REPO / "data" / "emoji"
AGREE_REL = 0.02   # the last window's mean losses within 2% of each other
WINDOW_REL = 0.05  # and every window's within 5%
SEED = 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# The data.

def emoji_data(folder: Path, size: int):
    """(images [N, 3, size, size] in [-1, 1], captions) of the emoji packages in `folder`, or None without them."""
    import numpy as np
    import torch
    from PIL import Image
    from prepare_emoji import art_images, art_set, emoji_entries, jobs_of

    from ldm.images import open_image, to_rgb

    meta = sorted(folder.glob("emoji-datasource-[0-9]*.tgz"))
    arts = sorted(p for p in folder.glob("emoji-datasource-*.tgz") if p not in meta)
    if not meta or not arts:
        return None
    jobs = jobs_of(emoji_entries(meta[-1]), skin_tones=True)
    pixels, captions = [], []
    for art in arts:
        images = art_images(art, art_set(art))
        for image_name, caption, _, _ in jobs:
            data = images.get(image_name)
            if data is None:
                continue
            image = to_rgb(open_image(io.BytesIO(data))).resize((size, size), Image.LANCZOS)
            pixels.append(np.asarray(image))
            captions.append(caption)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, captions


def photo_data(size: int):
    """The fallback: the tests' 32x32 crops of real photographs (scikit-image), 4 captions in turn."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from helpers import write_real_images

    with tempfile.TemporaryDirectory(prefix="ldm-precision-bench-") as tmp:
        paths = write_real_images(Path(tmp), 512, size=size)
        pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    captions = ["red apple", "grinning face", "yellow star", "blue heart"]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [captions[k % len(captions)] for k in range(len(pixels))]


def encode(images, autoencoder, batch: int = 256):
    """The posterior moments (mean, std) of each image, float16 as tools/encode_latents.py stores them."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(batch):
            posterior = autoencoder.encode(chunk)
            means.append(posterior.mean.half())
            stds.append(posterior.std.half())
    return torch.cat(means), torch.cat(stds)


def order(n: int, batch: int, steps: int, seed: int) -> list:
    """The sample indices of each step's batch: seeded permutations, one per pass over the data."""
    import torch

    g = torch.Generator().manual_seed(seed)
    flat = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * batch // n))])
    return [flat[k * batch:(k + 1) * batch] for k in range(steps)]


# The two copies of each trainer.

class LDMRun:
    """One copy of the LDM recipe under one precision, stepped as tools/train_ldm.py's loop does."""

    def __init__(self, raw: dict, cfg, precision: str, autoencoder_state: dict):
        import torch
        from train_ldm import build_model, make_optimizer, mixed_precision

        from ldm.training.ema import EMA
        from ldm.training.trainable import Trainable

        self.cfg, self.device = cfg, torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.model = build_model(raw, cfg, self.device)
        self.model.autoencoder.load_state_dict(autoencoder_state)  # the default model's (only its scale is used)
        self.train_text = bool(getattr(self.model.text_encoder, "trainable", False))
        self.trainable = Trainable(self.model.denoiser, self.model.text_encoder if self.train_text else None)
        self.ema = EMA(self.trainable, decay=cfg.ema_decay, start_step=cfg.ema_start)
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        self.scaler, self.autocast = mixed_precision(precision, self.device)

    def step(self, batch: dict, step: int) -> float:
        import torch
        from train_ldm import latents_of

        from ldm import diffusion
        from ldm.training.conditioning import conditioned_model_fn
        from ldm.training.config import lr_at

        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        latents = latents_of(self.model, batch, self.device)
        model_fn = conditioned_model_fn(self.trainable, self.model, batch, train_text=self.train_text,
                                        device=self.device)
        with self.autocast():
            loss, _ = diffusion.diffusion_loss(model_fn, latents, self.model.schedule,
                                               parameterization=self.model.parameterization, loss_type=cfg.loss_type,
                                               min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise)
            self.scaler.scale(loss.mean()).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.trainable, step)
        return loss.mean().item()


class AERun:
    """One copy of the autoencoder recipe under one precision: tools/train_autoencoder.py's train_step."""

    def __init__(self, model_cfg, loss_cfg, cfg, precision: str):
        import warnings

        import torch

        from autoencoder import AutoencoderKL
        from autoencoder.losses import AutoencoderLoss
        from ldm.training.ema import EMA
        from ldm.training.precision import training_autocast

        torch.manual_seed(cfg.seed)
        self.ae = AutoencoderKL(model_cfg)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="perceptual loss")
            self.loss_fn = AutoencoderLoss(loss_cfg)
        self.opt_ae = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.opt_disc = torch.optim.Adam(self.loss_fn.discriminator.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in range(2)]
        self.ema = EMA(self.ae, decay=cfg.ema_decay, start_step=cfg.ema_start)
        _, self.autocast = training_autocast(precision, torch.device("cpu"), "autoencoder")

    def step(self, x, step: int) -> float:
        from train_autoencoder import train_step

        logs = train_step(x, step, self.ae, self.loss_fn, self.ema, self.opt_ae, self.opt_disc, *self.scalers,
                          self.autocast)
        return float(logs["total"])


def alternate(runs: dict, batches: list, first_step: int, seed: int, bar, label: str) -> tuple[dict, dict]:
    """Step every copy through `batches`, alternating which goes first; -> ({precision: losses}, {precision: s})."""
    import torch

    losses = {name: [] for name in runs}
    seconds = {name: [] for name in runs}
    names = list(runs)
    for k, batch in enumerate(batches):
        for name in (names if k % 2 == 0 else names[::-1]):
            torch.manual_seed(seed * 1_000_003 + first_step + k)  # the same t, noise, samples for both copies
            start = time.perf_counter()
            losses[name].append(runs[name].step(batch, first_step + k))
            seconds[name].append(time.perf_counter() - start)
        bar.update()
        bar.set_postfix_str(f"{label} step {first_step + k + 1}")
    return losses, seconds


def windows(losses: dict, size: int) -> list[tuple[int, float, float, float]]:
    """(last step, fp32 mean, bf16 mean, relative difference) per window of `size` steps."""
    rows = []
    for end in range(size, len(losses["fp32"]) + 1, size):
        a = statistics.fmean(losses["fp32"][end - size:end])
        b = statistics.fmean(losses["bf16"][end - size:end])
        rows.append((end, a, b, abs(b - a) / abs(a)))
    return rows


def rate(seconds: list[float], warmup: int) -> float:
    return 1.0 / statistics.median(seconds[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm-steps", type=int, default=200, help="LDM steps per precision (default: 200)")
    p.add_argument("--ae-steps", type=int, default=200,
                   help="autoencoder steps per precision, before the recipe's disc_start (default: 200)")
    p.add_argument("--ae-disc-steps", type=int, default=20,
                   help="then autoencoder steps with the discriminator on, for its steps/s (default: 20)")
    p.add_argument("--window", type=int, default=25, help="steps per loss-curve window (default: 25)")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each copy left out of steps/s (default: 3)")
    p.add_argument("--threads", type=int, default=available_cores(),
                   help=f"torch threads (default: the usable cores, {available_cores()} here)")
    p.add_argument("--out", default=str(RESULTS),
                   help="where the Markdown results go; '' writes nothing (default: bench/RESULTS.md)")
    args = p.parse_args()
    for name in ("ldm_steps", "ae_steps", "window"):
        if getattr(args, name) < args.window:
            raise InputError(f"--{name.replace('_', '-')} must be >= --window ({args.window}), "
                             f"got {getattr(args, name)}")
    if args.ae_disc_steps <= args.warmup or args.threads < 1 or args.window < 1:
        raise InputError(f"--ae-disc-steps must be > --warmup ({args.warmup}); --threads and --window >= 1")
    import torch
    from train_autoencoder import AutoencoderTrainConfig

    from autoencoder import AutoencoderConfig
    from autoencoder.losses import LossConfig
    from common.config import read_yaml
    from ldm.formats.loading import load_model
    from ldm.training.config import TrainConfig
    from ldm.training.precision import cpu_bf16_feature, describe_precision

    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = torch.device("cpu")
    bar = tqdm(total=2 + args.ldm_steps + args.ae_steps + args.ae_disc_steps, desc="train precision",
               dynamic_ncols=True)

    # Data: images and captions, and their latents' moments from the default model's autoencoder.
    data = emoji_data(EMOJI, 32)
    source = (f"the {len(data[0])} emoji of data/emoji (Twemoji + Noto, all captions), resized to 32x32"
              if data else None)
    if data is None:
        data = photo_data(32)
        source = f"{len(data[0])} crops of real photographs (the tests' data, 32x32) with 4 captions"
    images, captions = data
    default_ae = load_model(None).autoencoder.float().eval()
    mean, std = encode(images, default_ae)
    bar.update()

    # The LDM recipe, with the default model's autoencoder in place of runs/emoji-ae (its config and weights).
    raw = read_yaml(REPO / LDM_CONFIG)
    raw["model"].pop("autoencoder_ckpt", None)
    raw["model"].update(autoencoder=default_ae.config.to_dict(), random_autoencoder=True)
    ldm_cfg = TrainConfig.from_dict(raw["train"])
    ldm_runs = {name: LDMRun(raw, ldm_cfg, name, default_ae.state_dict()) for name in ("fp32", "bf16")}
    n_params = sum(p.numel() for p in ldm_runs["fp32"].params)
    drop = torch.Generator().manual_seed(SEED + 1)
    ldm_batches = []
    for idx in order(len(images), ldm_cfg.batch_size, args.ldm_steps, SEED):
        keep = torch.rand(len(idx), generator=drop) >= ldm_cfg.caption_dropout
        ldm_batches.append({"mean": mean[idx], "std": std[idx], "key": [str(int(i)) for i in idx],
                            "caption": [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]})
    ae_raw = read_yaml(REPO / AE_CONFIG)
    model_cfg, loss_cfg = AutoencoderConfig.from_dict(ae_raw["model"]), LossConfig.from_dict(ae_raw["loss"])
    ae_cfg = AutoencoderTrainConfig.from_dict(ae_raw["train"])
    bar.update()

    ldm_losses, ldm_seconds = alternate(ldm_runs, ldm_batches, 0, SEED, bar, "LDM")
    del ldm_runs
    ae_runs = {name: AERun(model_cfg, loss_cfg, ae_cfg, name) for name in ("fp32", "bf16")}
    ae_batches = [images[idx] for idx in order(len(images), ae_cfg.batch_size, args.ae_steps + args.ae_disc_steps,
                                               SEED)]
    ae_losses, ae_seconds = alternate(ae_runs, ae_batches[:args.ae_steps], 0, SEED, bar, "autoencoder")
    # The discriminator on: the same copies go on from step disc_start (the step number switches it on).
    disc_losses, disc_seconds = alternate(ae_runs, ae_batches[args.ae_steps:], loss_cfg.disc_start, SEED, bar,
                                          "autoencoder + discriminator")
    bar.close()

    # Tables.
    speed = [("LDM (emoji recipe: UNet + text encoder, "
              f"{n_params / 1e6:.1f}M trained, batch {ldm_cfg.batch_size}, cached latents)", ldm_seconds),
             (f"autoencoder, before disc_start (batch {ae_cfg.batch_size})", ae_seconds),
             (f"autoencoder + discriminator, after disc_start (batch {ae_cfg.batch_size})", disc_seconds)]
    lines = ["| training step | fp32 steps/s | bf16 autocast steps/s | bf16 / fp32 | first bf16 step (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    rates = []
    for label, seconds in speed:
        fp32, bf16 = rate(seconds["fp32"], args.warmup), rate(seconds["bf16"], args.warmup)
        rates.append({"fp32": fp32, "bf16": bf16})
        lines.append(f"| {label} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}x | {seconds['bf16'][0]:.1f} |")
    speed_table = "\n".join(lines)

    curves = {"LDM": windows(ldm_losses, args.window), "autoencoder": windows(ae_losses, args.window)}
    n_rows = max(len(rows) for rows in curves.values())
    lines = ["| steps | LDM fp32 | LDM bf16 | rel. diff | autoencoder fp32 | autoencoder bf16 | rel. diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in range(n_rows):
        cells = []
        for name in curves:
            if r < len(curves[name]):
                end, a, b, rel = curves[name][r]
                cells += [f"{a:.4g}", f"{b:.4g}", f"{rel:.2%}"]
            else:
                cells += ["", "", ""]
        end = max(rows[min(r, len(rows) - 1)][0] for rows in curves.values())
        lines.append(f"| {end - args.window + 1}-{end} | " + " | ".join(cells) + " |")
    curve_table = "\n".join(lines)

    agree = {name: rows[-1][3] <= AGREE_REL and max(row[3] for row in rows) <= WINDOW_REL
             for name, rows in curves.items()}
    first = {name: abs(losses["bf16"][0] - losses["fp32"][0]) / abs(losses["fp32"][0])
             for name, losses in (("LDM", ldm_losses), ("autoencoder", ae_losses))}
    disc_rel = abs(statistics.fmean(disc_losses["bf16"]) - statistics.fmean(disc_losses["fp32"])) / \
        abs(statistics.fmean(disc_losses["fp32"]))
    # Over the whole recipe: the LDM's steps are all alike; the autoencoder's first disc_start steps run without
    # the discriminator and the rest with it.
    ldm_speedup = rates[0]["bf16"] / rates[0]["fp32"]
    ae_time = {name: loss_cfg.disc_start / rates[1][name] + (ae_cfg.max_steps - loss_cfg.disc_start) / rates[2][name]
               for name in ("fp32", "bf16")}
    ae_speedup = ae_time["fp32"] / ae_time["bf16"]
    feature = cpu_bf16_feature()
    verdict = [f"Curves agree (last window within {AGREE_REL:.0%}, every window within {WINDOW_REL:.0%}): "
               + ", ".join(f"{name} {'yes' if ok else 'NO'} (last window {curves[name][-1][3]:.2%})"
                           for name, ok in agree.items())
               + f". First step, same weights and batch: relative loss difference LDM {first['LDM']:.2e}, "
               f"autoencoder {first['autoencoder']:.2e}; with the discriminator on ({args.ae_disc_steps} steps): "
               f"{disc_rel:.2%}.",
               f"Speed over the recipe, bf16 / fp32: LDM {ldm_speedup:.2f}x; autoencoder {ae_speedup:.2f}x "
               f"({loss_cfg.disc_start} steps without the discriminator, {ae_cfg.max_steps - loss_cfg.disc_start} "
               f"with it: {ae_time['fp32'] / 60:.1f} min fp32, {ae_time['bf16'] / 60:.1f} min bf16 at these rates)."]
    for name, trainer, ok, speedup in (("LDM", "ldm", agree["LDM"], ldm_speedup),
                                       ("autoencoder", "autoencoder", agree["autoencoder"], ae_speedup)):
        pays = ok and speedup > 1.0
        auto = describe_precision("auto", cpu, trainer)
        consistent = auto.startswith("bf16") == pays
        verdict.append(f"{name}: bf16 {'pays off' if pays else 'does not pay off'} here; `train.precision=auto` "
                       f"picks {auto}" + ("." if consistent else
                                          " -- this measurement disagrees (ldm/training/precision.py, "
                                          "AUTO_BF16_ON_CPU)."))
    verdict = "\n".join(f"- {line}" for line in [f"This CPU's native bf16: {feature or 'none'}.", *verdict])
    print(speed_table, "", curve_table, "", verdict, sep="\n")
    if args.out:
        command = "python bench/train_precision.py" + "".join(
            f" --{name.replace('_', '-')} {getattr(args, name)}" for name, default in
            (("ldm_steps", 200), ("ae_steps", 200), ("ae_disc_steps", 20), ("window", 25), ("warmup", 3))
            if getattr(args, name) != default) + \
            (f" --threads {args.threads}" if args.threads != available_cores() else "")
        text = [
            "## Training precision on the CPU: bf16 autocast vs fp32 (default model's recipe)", "",
            f"- command: `{command}`, {time.perf_counter() - started:.0f} s",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine()}; native bf16: {feature or 'none'}; {args.threads} torch threads; load average "
            f"{load:.2f} when it started (other work shares the cores)",
            f"- python {platform.python_version()}, torch {torch.__version__}",
            f"- data: {source}; LDM on their cached latents (posterior moments from the default model's "
            "autoencoder, float16)",
            f"- run: {LDM_CONFIG} ({args.ldm_steps} steps) and {AE_CONFIG} ({args.ae_steps} steps, then "
            f"{args.ae_disc_steps} with the discriminator on), each as two copies from seed {SEED}, fp32 and bf16 "
            "autocast, alternating step by step in one process on the same batches and draws",
            f"- steps/s: 1 / median step time, the first {args.warmup} steps of each copy left out; loss: mean per "
            f"{args.window} steps (LDM: diffusion loss; autoencoder: generator loss `total`); see bench/README.md",
            "", speed_table, "", curve_table, "", verdict, "",
        ]
        write_section("train_precision cpu", "\n".join(text), args.out)


if __name__ == "__main__":
    run_cli(main)
