#!/usr/bin/env python
"""Train the KL autoencoder (first stage): L1 + LPIPS + KL, then a PatchGAN from `disc_start`.

    python tools/train_autoencoder.py --config configs/autoencoder/tiny.yaml --data IMAGES --out runs/ae
    python tools/train_autoencoder.py ... --resume                 # continue from the newest checkpoint
    python tools/train_autoencoder.py ... train.batch_size=8 loss.disc_start=1000   # overrides

The run folder gets `metrics.csv`, reconstruction grids in `samples/`, checkpoints in
`checkpoints/step_*/` and, at the end, `autoencoder.safetensors` (the EMA weights, config inside),
which `ldm.load_autoencoder` and `ldm.load_model` read.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import yaml

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import apply_overrides, check_output_folder, pick_device, run_cli, training_parser
from ldm.training.config import BaseTrainConfig

if TYPE_CHECKING:  # torch, torchvision and the model stack load in the functions: --help answers without them
    import torch

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from autoencoder.losses import AutoencoderLoss, LossConfig
    from ldm.training.ema import EMA


@dataclass
class AutoencoderTrainConfig(BaseTrainConfig):
    """The `train` section (the fields all trainers share are in BaseTrainConfig)."""

    image_size: int = 256
    batch_size: int = 4
    base_lr: float = 4.5e-6
    scale_lr: bool = True          # lr = base_lr * batch_size (the original scripts' rule)
    adam_betas: tuple[float, float] = (0.5, 0.9)  # the original scripts' Adam betas
    max_steps: int = 100_000
    ema_decay: float = 0.999
    held_out: int = 16
    eval_every: int = 1000
    ckpt_every: int = 2000
    random_crop: bool = True
    random_flip: bool = True

    at_least_one: ClassVar[tuple[str, ...]] = ("batch_size", "log_every", "eval_every", "sample_every", "ckpt_every")
    positive: ClassVar[tuple[str, ...]] = ("base_lr",)
    non_negative: ClassVar[tuple[str, ...]] = (*BaseTrainConfig.non_negative, "held_out")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size if self.scale_lr else self.base_lr


def parse_args() -> argparse.Namespace:
    return training_parser(
        __doc__, config="configs/autoencoder/tiny.yaml", config_help="YAML with model/loss/train sections",
        data_help="image folder, or webdataset shards like 'data/{000000..000009}.tar'", data_required=True,
        other_input=("--val-data", "held-out images (folder or shards); default: split from --data"),
        out_help="run folder (checkpoints, samples, metrics.csv)", devices="auto, cpu, cuda, cuda:N, mps",
        override_example="train.batch_size=8").parse_args()


def load_configs(args: argparse.Namespace) -> tuple[dict, AutoencoderConfig, LossConfig, AutoencoderTrainConfig]:
    from autoencoder import AutoencoderConfig
    from autoencoder.losses import LossConfig

    raw = apply_overrides(read_yaml(args.config), args.overrides)
    for section in ("model", "loss", "train"):
        raw.setdefault(section, {})
    if args.max_steps is not None:
        raw["train"]["max_steps"] = args.max_steps
    model_cfg = AutoencoderConfig.from_dict(raw["model"])
    loss_cfg = LossConfig.from_dict(raw["loss"])
    train_cfg = AutoencoderTrainConfig.from_dict(raw["train"])
    f = model_cfg.downsampling_factor
    if train_cfg.image_size % f:
        raise InputError(f"train.image_size={train_cfg.image_size} is not divisible by the downsampling factor {f}; "
                         f"use {train_cfg.image_size // f * f or f} or {(train_cfg.image_size // f + 1) * f}")
    return raw, model_cfg, loss_cfg, train_cfg


def open_data(args, cfg: AutoencoderTrainConfig):
    """(training dataset, held-out images, the source dataset for skip counts); checks the data first."""
    import torch

    from ldm.data.images import ImageFolder, build_image_dataset, split_held_out

    size = cfg.image_size
    source = train = build_image_dataset(args.data, size, train=True, random_crop=cfg.random_crop,
                                         random_flip=cfg.random_flip)
    held = None
    if isinstance(train, ImageFolder):
        report = train.verify()
        if report:
            name, reason = report.examples[0]
            print(f"skipped {len(report)} unreadable images, e.g. {name}: {reason}")
        if args.val_data is None:
            train, held = split_held_out(train, cfg.held_out, seed=cfg.seed)
        if len(train) < cfg.batch_size:
            raise InputError(f"{args.data} has {len(train)} training images, fewer than one batch of "
                             f"{cfg.batch_size}; add images or lower train.batch_size")
    if args.val_data is not None:
        val = build_image_dataset(args.val_data, size, train=False)
        held = [val[i] for i in range(min(cfg.held_out, len(val)))] if isinstance(val, ImageFolder) else \
            [item for item, _ in zip(val, range(cfg.held_out))]
    elif held is None:  # shards without --val-data: the first images of the stream (also trained on)
        print("note: no --val-data; PSNR/SSIM are measured on the first training images of the shards")
        held = [item for item, _ in zip(build_image_dataset(args.data, size, train=False), range(cfg.held_out))]
    return train, torch.stack([item["image"] for item in held]), source


def batches(train, cfg: AutoencoderTrainConfig, start_step: int):
    """Endless training batches from `start_step` on, the first one read now (so shards with no usable image
    stop the run here, before it starts, with one line).

    A folder's order is a pure function of (seed, step) (see ldm/data/order.py), so a resumed run
    sees the batches an uninterrupted run would; webdataset shards are a stream and are reshuffled.
    """
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from ldm.data.images import endless_batches
    from ldm.data.order import ResumableBatchSampler, SeededItems

    # The loaders get their own generator: a new iterator must not draw from the global RNG.
    generator = torch.Generator().manual_seed(cfg.seed)
    if isinstance(train, IterableDataset):
        loader = DataLoader(train, batch_size=cfg.batch_size, num_workers=cfg.num_workers, generator=generator)
    else:
        sampler = ResumableBatchSampler(len(train), cfg.batch_size, seed=cfg.seed, start_step=start_step)
        loader = DataLoader(SeededItems(train), batch_sampler=sampler, num_workers=cfg.num_workers,
                            generator=generator)
    return endless_batches(loader)  # a finite stream starts again


def evaluate(ae: AutoencoderKL, images: torch.Tensor, device: torch.device, batch_size: int) -> tuple[dict, torch.Tensor]:
    """PSNR / SSIM / L1 of posterior-mode reconstructions of the held-out images."""
    import torch

    from autoencoder.metrics import psnr, ssim

    recs = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            recs.append(ae.decode(ae.encode(chunk.to(device)).mode()).float().clamp(-1, 1).cpu())
    rec = torch.cat(recs)
    return {"val_psnr": psnr(images, rec).mean().item(), "val_ssim": ssim(images, rec).mean().item(),
            "val_l1": (images - rec).abs().mean().item()}, rec


def save_grid(path: Path, images: torch.Tensor, recs: torch.Tensor) -> None:
    """Inputs on the top row(s), reconstructions below, as one PNG."""
    import torch
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(8, len(images))
    grid = make_grid(torch.cat([images[:n], recs[:n]]), nrow=n, normalize=True, value_range=(-1, 1))
    save_image(grid, path)


def main() -> None:
    args = parse_args()
    try:
        train(args)
    except RuntimeError as exc:  # under torchrun: another rank gone (a dead node or worker) or stuck
        from ldm.training.checkpoints import lost_contact

        if (stop := lost_contact(exc, Path(args.out) / "checkpoints")) is None:
            raise
        raise stop from None


def train(args: argparse.Namespace) -> None:
    check_output_folder(args.out, flag="--out", what="the run's files",
                        subfolders={"checkpoints": "the checkpoints", "samples": "the reconstruction grids"})
    raw, model_cfg, loss_cfg, cfg = load_configs(args)
    # torch, torchvision and the model stack load only now: --help and bad flags answer without them
    import torch
    from tqdm import tqdm

    from autoencoder import AutoencoderKL
    from autoencoder.losses import AutoencoderLoss
    from ldm.formats.loading import save_autoencoder
    from ldm.training.checkpoints import checkpoint_to_resume, write_checkpoint_dir
    from ldm.training.ema import EMA
    from ldm.training.metrics_log import MetricsLog
    from ldm.training.precision import describe_precision, training_autocast

    device = pick_device(args.device)
    resolved, autocast = training_autocast(cfg.precision, device, "autoencoder")  # forward and loss under it
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    resume_from = checkpoint_to_resume(ckpt_root, resume=args.resume)
    if args.resume and resume_from is None:
        print(f"--resume: no complete checkpoint in {ckpt_root}; starting from scratch")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    train_data, held_images, source = open_data(args, cfg)
    torch.manual_seed(cfg.seed)

    # Models, loss (with the discriminator), optimizers (Adam, betas (0.5, 0.9) as the original).
    ae = AutoencoderKL(model_cfg).to(device)
    with warnings.catch_warnings():  # the status is printed below
        warnings.filterwarnings("ignore", message="perceptual loss")
        loss_fn = AutoencoderLoss(loss_cfg).to(device)
    opt_ae = torch.optim.Adam(ae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    use_scaler = resolved == "fp16"
    scaler_ae = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_disc = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(ae, decay=cfg.ema_decay, start_step=cfg.ema_start)

    step = 0
    if resume_from is not None:
        step = restore(resume_from, ae, loss_fn, ema, opt_ae, opt_disc, scaler_ae, scaler_disc)
        print(f"resumed from {resume_from} at step {step}")
    data = batches(train_data, cfg, step)

    n_params = sum(p.numel() for p in ae.parameters())
    print(f"autoencoder: {n_params / 1e6:.2f}M parameters, f={model_cfg.downsampling_factor}, "
          f"z={model_cfg.embed_dim}; device {device}, "
          f"precision {describe_precision(cfg.precision, device, 'autoencoder')}; lr {cfg.lr:.3g}; "
          f"batch {cfg.batch_size}; held-out {len(held_images)} images")
    print(loss_fn.perceptual_status)
    log = MetricsLog(out / "metrics.csv", resume_step=step)

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train autoencoder", dynamic_ncols=True)
    t_last, images_since = time.perf_counter(), 0
    while step < cfg.max_steps:
        x = next(data)["image"].to(device, non_blocking=True)

        logs = train_step(x, step, ae, loss_fn, ema, opt_ae, opt_disc, scaler_ae, scaler_disc, autocast)
        step += 1
        images_since += x.shape[0]
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            row = {k: float(v) for k, v in logs.items()}
            row.update(step=step, lr=cfg.lr, images_per_s=images_since / max(now - t_last, 1e-9))
            t_last, images_since = now, 0
            skipped = source.skipped
            if skipped:
                row["skipped_images"] = skipped
            log.write(row)
            bar.set_postfix(loss=f"{row.get('total', 0):.4g}", rec=f"{row.get('rec', 0):.4g}")
        if step % cfg.eval_every == 0 or step % cfg.sample_every == 0 or step == cfg.max_steps:
            ae.eval()
            with ema.applied_to(ae):
                metrics, recs = evaluate(ae, held_images, device, cfg.batch_size)
            ae.train()
            log.write({"step": step, **metrics})
            bar.write(f"step {step}: held-out PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f} (EMA)")
            if step % cfg.sample_every == 0 or step == cfg.max_steps:
                save_grid(out / "samples" / f"step_{step:08d}.png", held_images, recs)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            write_checkpoint_dir(ckpt_root, step, lambda folder: write_state(
                folder, step, ae, loss_fn, ema, opt_ae, opt_disc, scaler_ae, scaler_disc), keep=cfg.keep_checkpoints)
    bar.close()

    final = AutoencoderKL(model_cfg)
    ema.copy_to(final)
    save_autoencoder(final, out / "autoencoder.safetensors", extra_metadata={"step": step})
    print(f"done: {step} steps; EMA weights in {out / 'autoencoder.safetensors'}")


def train_step(x: torch.Tensor, step: int, ae: AutoencoderKL, loss_fn: AutoencoderLoss, ema: EMA, opt_ae, opt_disc,
               scaler_ae, scaler_disc, autocast=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """One training step on the images `x`; -> the losses to log. The forward passes and losses run under
    `autocast()` (train.precision); the posterior's KL and all loss reductions stay float32."""
    from ldm.training.precision import float32_posterior

    # 1. Autoencoder step: reconstruction + KL (+ adaptive-weighted GAN loss after disc_start).
    with autocast():
        xrec, posterior = ae(x)
        g_loss, logs = loss_fn.generator_loss(x, xrec, float32_posterior(posterior), step, ae.last_layer)
    opt_ae.zero_grad(set_to_none=True)
    scaler_ae.scale(g_loss).backward()
    scaler_ae.step(opt_ae)
    scaler_ae.update()

    # 2. Discriminator step (hinge or vanilla), only once it is switched on.
    if step >= loss_fn.config.disc_start and loss_fn.config.disc_factor > 0:
        with autocast():
            d_loss, d_logs = loss_fn.discriminator_loss(x, xrec.detach(), step)
        opt_disc.zero_grad(set_to_none=True)
        scaler_disc.scale(d_loss).backward()
        scaler_disc.step(opt_disc)
        scaler_disc.update()
        logs.update(d_logs)

    # 3. EMA of the autoencoder weights: the weights we ship.
    ema.update(ae, step)
    return logs


def write_state(folder: Path, step: int, ae, loss_fn, ema, opt_ae, opt_disc, scaler_ae, scaler_disc) -> None:
    """Everything a resumed run needs, in one checkpoint folder."""
    import torch

    from common.checkpoint import save_checkpoint, save_pickle

    meta = {"kind": "autoencoder", "config": json.dumps(ae.config.to_dict()), "step": str(step)}
    save_checkpoint(folder / "autoencoder.safetensors", ae.state_dict(), meta)
    save_checkpoint(folder / "autoencoder_ema.safetensors", {k: v for k, v in ema.shadow.items()}, meta)
    save_checkpoint(folder / "discriminator.safetensors", loss_fn.discriminator.state_dict(), {"step": str(step)})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_pickle(folder / "train_state.pt",
                {"step": step, "opt_ae": opt_ae.state_dict(), "opt_disc": opt_disc.state_dict(),
                 "scaler_ae": scaler_ae.state_dict(), "scaler_disc": scaler_disc.state_dict(),
                 "ema_num_updates": ema.num_updates, "rng": rng})


def restore(folder: Path, ae, loss_fn, ema, opt_ae, opt_disc, scaler_ae, scaler_disc) -> int:
    """Load a checkpoint folder into the run's objects; returns the step it was written at."""
    import torch

    from common.checkpoint import load_state_dict_checked, read_checkpoint

    load_state_dict_checked(ae, read_checkpoint(folder / "autoencoder.safetensors")[0], source=str(folder))
    ema.load_state_dict(read_checkpoint(folder / "autoencoder_ema.safetensors")[0])
    load_state_dict_checked(loss_fn.discriminator, read_checkpoint(folder / "discriminator.safetensors")[0],
                            source=f"{folder} (discriminator)")
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    ema.num_updates = int(state["ema_num_updates"])
    opt_ae.load_state_dict(state["opt_ae"])
    opt_disc.load_state_dict(state["opt_disc"])
    scaler_ae.load_state_dict(state["scaler_ae"])
    scaler_disc.load_state_dict(state["scaler_disc"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


if __name__ == "__main__":
    run_cli(main)
