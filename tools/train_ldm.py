#!/usr/bin/env python
"""Train a latent diffusion model on webdataset shards, alone or under torchrun.

    python tools/train_ldm.py --config configs/ldm/tiny.yaml --data 'shards/{000000..000009}.tar' --out runs/ldm
    torchrun --nproc_per_node 2 tools/train_ldm.py --config ... --data ... --out runs/ldm        # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 tools/train_ldm.py ... train.fsdp=true     # sharded (FSDP2; ldm/training/sharded.py)
    python tools/train_ldm.py ... --resume                       # continue from the newest complete checkpoint
    python tools/train_ldm.py ... --latents 'latents/{000000..000009}.tar'   # precomputed latents (encode_latents.py)
    python tools/train_ldm.py --config configs/ldm/tiny-sdxl.yaml ... train.buckets=true   # SDXL layout, buckets
    python tools/train_ldm.py --init default --lora-rank 4 --lora-alpha 4 --data ... --out runs/lora   # LoRA

The autoencoder comes from model.autoencoder_ckpt=PATH (or, for tests and timing runs only, random weights with
model.random_autoencoder=true); latent shards must have been encoded by that same autoencoder.

The algorithm (DDPM Algorithm 1 on autoencoder latents, LDM sec. 3.3), per step:
latents = scale_factor * E(x) -> t, noise -> x_t -> denoiser(x_t, t, text context) -> loss -> step -> EMA.
An SDXL-style model (a conditioner as its text_encoder) also gets y: the pooled text embedding and each sample's
original size, crop and target size (SDXL sec. 2.2). train.buckets=true fits images to aspect-ratio buckets,
each batch of one bucket (ldm/data/buckets.py).
The run folder gets metrics.csv and tensorboard/ (loss, loss per timestep range, lr, images/s, GPU memory), samples/ (grids of fixed prompts and seeds, EMA weights),
checkpoints/step_*/ and, at the end, model.safetensors (EMA weights; ldm.load_model and txt2img --ckpt read it).
With train.eval_every=N, every N steps rank 0 also scores the EMA weights' prompt adherence (a classifier's
eval_accuracy, CLIP's eval_clip_score and eval_clip_accuracy; ldm/training/evaluation.py) into the same logs.
With --lora-rank the model (--init PATH, or the config's) stays frozen and only LoRA adapters train
(ldm/lora/training.py); each checkpoint and the end write lora.safetensors (kohya format; model.load_lora reads it),
and the checkpoints (adapters, their EMA, optimizer, data position) let --resume go on exactly, given the same
--init and LoRA options.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import apply_overrides, check_output_folder, run_cli, training_parser
from ldm.cli.flags import add_lora_arguments, check_lora_arguments
from ldm.training.config import TrainConfig, lr_at

if TYPE_CHECKING:  # torch, the model stack, webdataset and tensorboard load in the functions: --help answers without
    import torch
    from torch import nn

    from ldm.model import LatentDiffusion
    from ldm.training.distributed import Dist
    from ldm.training.ema import EMA
    from ldm.training.noise import Draws
    from ldm.training.trainable import Trainable

def parse_args() -> argparse.Namespace:
    return add_lora_arguments(training_parser(
        __doc__, config="configs/ldm/tiny.yaml", config_help="YAML with model and train sections",
        data_help="image-caption shards, e.g. 'shards/{000000..000009}.tar'", data_required=False,
        other_input=("--latents", "precomputed latent shards from tools/encode_latents.py instead"),
        out_help="run folder", devices="auto, cpu, cuda", override_example="train.lr=2e-4")).parse_args()


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
    if (args.data is None) == (args.latents is None):
        raise InputError("give --data (image-caption shards) or --latents (precomputed latent shards)")
    check_lora_arguments(args)
    check_output_folder(args.out, flag="--out", what="the run's files",
                        subfolders={"checkpoints": "the checkpoints", "samples": "the sample grids",
                                    "tensorboard": "the TensorBoard logs"})
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    train = {**(raw.get("train") or {}), **({"max_steps": args.max_steps} if args.max_steps else {})}
    cfg = TrainConfig.from_dict(train)  # --max-steps stays out of the run's config.yaml
    # torch, the model stack, webdataset and tensorboard load only now: --help and bad flags answer without them
    import torch

    from ldm import diffusion
    from ldm.formats.loading import autoencoder_record
    from ldm.lora.training import attach_lora, save_kohya
    from ldm.training.batches import training_batches, training_buckets, unconditional_for_cache
    from ldm.training.checkpoints import (
        checkpoint_to_resume,
        export_ema,
        restore_lora_checkpoint,
        restore_training_checkpoint,
        save_lora_checkpoint,
        save_training_checkpoint,
        saved_resume,
    )
    from ldm.training.conditioning import conditioned_model_fn
    from ldm.training.distributed import (
        cleanup_distributed,
        gather_per_rank,
        gradient_sync,
        restore_rng,
        rng_state,
        setup_distributed,
    )
    from ldm.training.ema import EMA
    from ldm.training.evaluation import PromptAdherence
    from ldm.training.sharded import ema_weights, restore_sharded_checkpoint, save_sharded_checkpoint
    from ldm.training.trainable import Trainable

    world = setup_distributed(args.device)
    # The evaluation's classifier / CLIP files load first: a missing or unfit one stops the run before any work.
    evaluator = PromptAdherence.from_config(cfg, world.device) if cfg.eval_every and world.is_main else None
    out, ckpt_root = Path(args.out), Path(args.out) / "checkpoints"
    resume_from = checkpoint_to_resume(ckpt_root, resume=args.resume)

    # Setup. The same initial weights on every rank (same seed), then a seed per rank (and resume step) for t and noise.
    torch.manual_seed(cfg.seed)
    model = build_model(raw, cfg, world.device, init=args.init)
    lora = (attach_lora(model, args.lora_rank, args.lora_alpha, text_encoder=args.lora_text_encoder)
            if args.lora_rank else None)  # the model frozen, adapters on it
    train_text = args.lora_text_encoder if lora else bool(getattr(model.text_encoder, "trainable", False))
    trainable = Trainable(model.denoiser, model.text_encoder if train_text else None).to(world.device)
    net = parallel(trainable, cfg, world, lora=lora is not None)
    ema = EMA(trainable, decay=cfg.ema_decay, start_step=cfg.ema_start, warmup=cfg.ema_warmup,
              trained_only=lora is not None)  # FSDP: of shards; LoRA: of the adapters
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, world.device)
    scaler, autocast = mixed_precision(cfg.precision, world.device)
    step, resume = 0, {}
    if resume_from is not None:
        if lora:
            step = restore_lora_checkpoint(resume_from, lora, ema, optimizer, scaler)
        else:
            restore = restore_sharded_checkpoint if cfg.fsdp else restore_training_checkpoint
            step = restore(resume_from, trainable, ema, optimizer, scaler)
        resume = saved_resume(resume_from)  # per rank: the data position and the RNG state
    torch.manual_seed(cfg.seed + 7919 * world.rank + step)  # fresh runs, and resumes on another number of ranks
    # Cached latents must come from this model's autoencoder: each sample's autoencoder.json says which made it.
    autoencoder = autoencoder_record(model, raw.get("model") or {}) if args.latents else None
    buckets = training_buckets(model, cfg)
    if cfg.buckets and world.is_main:
        print(f"{len(buckets)} aspect-ratio buckets (h x w): {', '.join(f'{h}x{w}' for h, w in buckets)}")
    positions = resume.get("data") or []  # rank r's; on another world size the data stream says so and reseeds
    dataset, data = training_batches(data=args.data, latents=args.latents, cfg=cfg, rank=world.rank, step=step,
                                     buckets=buckets, autoencoder=autoencoder,
                                     resume_state=positions[min(world.rank, len(positions) - 1)] if positions else None,
                                     uncond=unconditional_for_cache(model, latents=bool(args.latents),
                                                                    train_text=train_text))
    schedule = model.schedule
    record = RunRecord(out, raw, cfg, world, step, describe_run(step, resume_from, params, train_text, cfg, world))
    if evaluator is not None:
        print(f"{evaluator.describe()}, every {cfg.eval_every} steps")
    rngs = resume.get("rng") or []
    if len(rngs) == world.world_size:  # t and noise go on as in the uninterrupted run (after all setup)
        restore_rng(rngs[world.rank], world.device)

    while step < cfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        losses, timesteps, keys = [], [], []
        for micro in range(cfg.grad_accum):
            batch = next(data)
            # 1. Latents: z = scale_factor * a sample of q(z|x) (encoded now, or from cached mean/std); with
            #    train.per_sample_noise that sample, t and the noise come from the sample's own generator.
            latents, draws = latents_of(model, batch, world.device, cfg=cfg, step=step)
            # 2. Text: the denoiser conditioned on the captions (SDXL: and the sizes), as the loss's model_fn(x_t, t).
            model_fn = conditioned_model_fn(net, model, batch, train_text=train_text, device=world.device)
            # 3. t, noise -> x_t -> the loss (DDPM "simple" objective, per sample) and its gradient; DDP
            #    all-reduces (FSDP reduce-scatters) the gradients of the last micro-batch only.
            with gradient_sync(net, sync=micro == cfg.grad_accum - 1), autocast():
                loss, t = diffusion.diffusion_loss(model_fn, latents, schedule, parameterization=model.parameterization,
                                                   loss_type=cfg.loss_type, min_snr_gamma=cfg.min_snr_gamma,
                                                   offset_noise=cfg.offset_noise, t=draws.t if draws else None,
                                                   noise=draws.noise if draws else None)
                scaler.scale(loss.mean() / cfg.grad_accum).backward()
            losses.append(loss.detach())
            timesteps.append(t)
            keys += batch["key"]
        # 4. Optimizer step with gradient clipping, then the EMA.
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(trainable, step)
        step += 1
        record.step_done(step, keys, params)

        # 5. Now and then: the log, a sample grid and the prompt-adherence evaluation (EMA weights), a checkpoint.
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record.metrics(step, torch.cat(losses), torch.cat(timesteps), grad_norm, schedule.num_timesteps,
                           skipped=dataset.skipped)
        sample_now = step % cfg.sample_every == 0 or step == cfg.max_steps
        eval_now = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.max_steps)
        if sample_now or eval_now:  # rank 0 (FSDP: the EMA weights gathered there first, a collective)
            with ema_weights(model, trainable, ema, is_main=world.is_main) as parts:
                if parts and sample_now:
                    record.samples(step, sample_images(*parts, cfg))
                if parts and eval_now:
                    record.evaluation(step, evaluator.evaluate(*parts))  # no collectives
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            resume = {"data": gather_per_rank(data.state(), world), "rng": gather_per_rank(rng_state(world.device), world)}
            if lora:
                save_lora_checkpoint(ckpt_root, step, lora, ema, optimizer, scaler, keep=cfg.keep_checkpoints,
                                     is_main=world.is_main, resume=resume)
                if world.is_main:
                    save_kohya(out / "lora.safetensors", lora)
            else:
                save = save_sharded_checkpoint if cfg.fsdp else save_training_checkpoint
                save(ckpt_root, step, model, net, ema, optimizer, scaler, keep=cfg.keep_checkpoints,
                     is_main=world.is_main, resume=resume)
    record.close()
    if world.is_main and lora:
        print(f"done: {step} steps; LoRA (rank {lora.rank}, alpha {lora.alpha:g}) in {out / 'lora.safetensors'}")
    elif not lora:
        export_ema(out / "model.safetensors", model, ema, is_main=world.is_main)  # FSDP: gathered, a collective
        if world.is_main:
            print(f"done: {step} steps; EMA weights in {out / 'model.safetensors'} "
                  f"(python tools/txt2img.py --ckpt {out / 'model.safetensors'} --prompt ...)")
    cleanup_distributed()


# Setup.

def build_model(raw: dict, cfg: TrainConfig, device: torch.device, init: str | None = None) -> LatentDiffusion:
    """The config's model (or --init's), its autoencoder loaded (when the config names a checkpoint) and frozen."""
    from ldm.formats.loading import load_model, model_from_training_config
    from ldm.training.conditioning import is_conditioner

    # --init: a full checkpoint to fine-tune; 'default' is the embedded default model
    if init:
        model = load_model(None if init == "default" else init)
    else:
        model = model_from_training_config(raw.get("model") or {})
    if model.denoiser is None or model.text_encoder is None:
        raise InputError("model config: training needs a denoiser and a text_encoder section")
    if is_conditioner(model.text_encoder) and any(p.requires_grad for p in model.text_encoder.parameters()):
        raise InputError("model config: an SDXL-style conditioner's text towers train frozen here; set trainable: "
                         "false on each tower (text_encoder.text)")
    model.autoencoder.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        for module in model.denoiser.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = True
    return model.to(device)


def parallel(trainable: Trainable, cfg: TrainConfig, world: Dist, *, lora: bool = False) -> nn.Module:
    """The trained module as the ranks run it: sharded (train.fsdp: FSDP2 `fully_shard`, CPU or CUDA, any number
    of processes; ldm/training/sharded.py), DDP (several processes), or as is."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.fsdp:
        if lora:
            raise InputError("train.fsdp shards a fully trained model; LoRA (--lora-rank) trains small adapters on a "
                             "frozen one, which DDP handles: drop train.fsdp=true")
        from ldm.training.sharded import shard_trainable
        return shard_trainable(trainable, world)  # in place: `trainable` is the sharded module
    if world.world_size > 1:
        return DistributedDataParallel(trainable, device_ids=[world.device.index] if world.device.type == "cuda"
                                       else None)
    return trainable


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    import torch

    # The fused kernel: one pass over all parameters (CPU: 4.7x faster than the default for 20M parameters); it
    # takes FSDP2's DTensor shards too (each rank steps its own shard).
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused)


def mixed_precision(precision: str, device: torch.device) -> tuple[torch.amp.GradScaler, Callable]:
    """The gradient scaler (on for fp16 only) and the autocast context of `train.precision` (ldm/training/precision.py:
    bf16 autocast runs on CUDA and on the CPU; the weights, optimizer state, EMA and loss reductions stay float32)."""
    import torch

    from ldm.training.precision import training_autocast

    resolved, autocast = training_autocast(precision, device, "ldm")
    scaler = torch.amp.GradScaler(device.type, enabled=resolved == "fp16")
    return scaler, autocast


def describe_run(step: int, resume_from: Path | None, params: list[nn.Parameter], train_text: bool,
                 cfg: TrainConfig, world: Dist) -> str:
    from ldm.training.precision import describe_precision

    n_params = sum(p.numel() for p in params)
    return (f"{'resumed at step ' + str(step) + ' from ' + str(resume_from) if resume_from else 'starting'}: "
            f"{n_params / 1e6:.2f}M trainable parameters ({'denoiser + text encoder' if train_text else 'denoiser'}), "
            f"{world.world_size} process(es) on {world.device}, global batch {cfg.batch_size} x {world.world_size} "
            f"x {cfg.grad_accum} = {cfg.batch_size * world.world_size * cfg.grad_accum}, "
            f"precision {describe_precision(cfg.precision, world.device, 'ldm')}")


# One training step's inputs.

def latents_of(model: LatentDiffusion, batch: dict, device: torch.device, *, cfg: TrainConfig,
               step: int) -> tuple[torch.Tensor, Draws | None]:
    """The batch's diffusion latents (its images encoded now, or a sample of its cached posterior (mean, std)), and
    with train.per_sample_noise each sample's draws (ldm/training/noise.py), its posterior sample among them."""
    import torch

    from ldm.training.noise import per_sample_draws

    with torch.no_grad():
        if "image" in batch:
            posterior = model.autoencoder.encode(batch["image"].to(device))
            mean, std = posterior.mean, posterior.std
        else:
            mean, std = batch["mean"].to(device).float(), batch["std"].to(device).float()
        draws = None
        if cfg.per_sample_noise:
            draws = per_sample_draws(batch["key"], seed=cfg.seed, step=step, shape=tuple(mean.shape[1:]),
                                     num_timesteps=model.schedule.num_timesteps, offset_noise=cfg.offset_noise,
                                     device=device, dtype=mean.dtype)
        return model.latents_from_posterior(mean, std, eps=draws.posterior_eps if draws else None), draws


# Now and then.

def sample_images(model: LatentDiffusion, trainable: Trainable, ema: EMA, cfg: TrainConfig) -> list:
    """The fixed prompts, from seed 0, with the EMA weights (the trained ones are restored after)."""
    import ldm.pipeline  # noqa: F401  (it attaches LatentDiffusion.generate)

    with ema.applied_to(trainable):
        trainable.eval()
        images = model.generate(cfg.sample_prompts, steps=cfg.sample_steps, guidance_scale=cfg.sample_scale,
                                seed=0, height=cfg.image_size, width=cfg.image_size)
        trainable.train()
    return images


class RunRecord:
    """What the run writes besides checkpoints: config.yaml, metrics.csv, tensorboard/ and samples/ (rank 0),
    the progress bar, and with train.log_sample_keys an audit per rank, sample_keys/rank{r}.tsv."""

    def __init__(self, out: Path, raw: dict, cfg: TrainConfig, world: Dist, step: int, headline: str):
        from tqdm import tqdm

        from ldm.training.metrics_log import MetricsLog, TensorBoardLog

        self.out, self.cfg, self.world = out, cfg, world
        self.key_log = None
        if cfg.log_sample_keys:  # what each rank saw, with a checksum of its weights after each step
            (out / "sample_keys").mkdir(parents=True, exist_ok=True)
            self.key_log = open(out / "sample_keys" / f"rank{world.rank}.tsv", "a")
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            print(headline)
        self.log = MetricsLog(out / "metrics.csv", resume_step=step) if world.is_main else None
        self.board = TensorBoardLog(out / "tensorboard") if world.is_main else None
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc="train ldm", disable=not world.is_main,
                        dynamic_ncols=True)
        self.t_last, self.seen = time.perf_counter(), 0

    def step_done(self, step: int, keys: list[str], params: list[nn.Parameter]) -> None:
        self.seen += len(keys) * self.world.world_size
        self.bar.update(1)
        if self.key_log is not None:
            from ldm.training.distributed import weight_checksum
            checksum = weight_checksum(params)  # FSDP: of the whole weights (a collective)
            self.key_log.write(f"{step}\t{','.join(keys)}\t{checksum:.12e}\n")
            self.key_log.flush()

    def metrics(self, step: int, losses: torch.Tensor, timesteps: torch.Tensor, grad_norm: torch.Tensor,
                num_timesteps: int, *, skipped: int) -> None:
        """On every rank (the loss is averaged over them); rank 0 writes the row."""
        import torch

        from ldm.training.distributed import all_reduce_mean
        from ldm.training.metrics_log import timestep_buckets

        mean_loss = all_reduce_mean(losses.mean()).item()
        if not self.world.is_main:
            return
        now = time.perf_counter()
        row = {"step": step, "loss": mean_loss, "lr": lr_at(step - 1, self.cfg), "grad_norm": float(grad_norm),
               "images_per_s": self.seen / max(now - self.t_last, 1e-9),
               **timestep_buckets(losses.cpu(), timesteps.cpu(), num_timesteps)}
        if skipped:
            row["skipped_samples"] = skipped  # counted in this process (all, with num_workers 0)
        if self.world.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.world.device) / 2 ** 30
        self.log.write(row)
        self.board.write(row)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}")
        self.t_last, self.seen = now, 0

    def samples(self, step: int, images: list) -> None:
        from ldm.images import make_grid

        (self.out / "samples").mkdir(exist_ok=True)
        grid = make_grid(images, columns=len(images))
        grid.save(self.out / "samples" / f"step_{step:08d}.png")
        self.board.add_image("samples", grid, step)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0: the evaluation's row (metrics.csv gains its columns), scalars and one line above the bar."""
        self.log.write({"step": step, **metrics})
        self.board.write({"step": step, **metrics})
        self.bar.write(f"step {step}: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
        self.t_last += metrics["eval_seconds"]  # images/s counts training time only

    def close(self) -> None:
        self.bar.close()
        if self.key_log is not None:
            self.key_log.close()
        if self.board is not None:
            self.board.close()


if __name__ == "__main__":
    run_cli(main)
