#!/usr/bin/env python
"""Compute an autoencoder's latent scale_factor (1 / std of the latents) over a sample of images.

    python tools/compute_scale_factor.py --ckpt runs/ae/autoencoder.safetensors --data IMAGES --write

With --write the value is stored in the checkpoint's config (the file is rewritten atomically: on a full
disk it stays as it was).
"""
from __future__ import annotations

import argparse
import json

from common.errors import InputError
from ldm.cli import HelpFormatter, check_output_file, pick_device, run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="autoencoder checkpoint (ours, .safetensors)")
    p.add_argument("--config", default=None, help="config for an original-format checkpoint")
    p.add_argument("--data", required=True, help="image folder or webdataset shards")
    p.add_argument("--size", type=int, default=None, help="image size (default: the config's resolution)")
    p.add_argument("--num-images", type=int, default=512, help="how many images to pool the std over")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--write", action="store_true", help="store the value in the checkpoint's config")
    args = p.parse_args()
    if args.num_images < 1:
        raise InputError("--num-images must be >= 1")
    if args.write:  # the checkpoint is rewritten in place: checked before anything loads
        check_output_file(args.ckpt, "--ckpt", what="the updated checkpoint (--write)", fix="leave out --write")
    # torch, the model stack and the data loaders load only now: --help and bad flags answer without them
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from autoencoder.scale_factor import estimate_scale_factor
    from common.checkpoint import FORMAT, DiskFullError, read_checkpoint, save_checkpoint
    from ldm.data.images import build_image_dataset
    from ldm.formats.loading import load_autoencoder

    device = pick_device(args.device)
    ae = load_autoencoder(args.ckpt, config=args.config, device=device)
    size = args.size or ae.config.resolution
    data = build_image_dataset(args.data, size, train=False)
    loader = DataLoader(data, batch_size=args.batch_size)
    generator = torch.Generator(device).manual_seed(args.seed)

    def batches():
        seen = 0
        for item in tqdm(loader, desc="encoding", total=None):
            images = item["image"][: args.num_images - seen]
            seen += len(images)
            yield images
            if seen >= args.num_images:
                return

    scale = estimate_scale_factor(ae, batches(), generator=generator)
    print(f"scale_factor = {scale:.6f} (was {ae.config.scale_factor})")
    if args.write:
        tensors, metadata = read_checkpoint(args.ckpt)
        if metadata.get("format") != FORMAT or metadata.get("kind") != "autoencoder":
            raise InputError(f"--write needs one of our autoencoder checkpoints; {args.ckpt} is not")
        config = json.loads(metadata["config"])
        config["scale_factor"] = scale
        metadata = {k: v for k, v in metadata.items() if k != "format"}
        metadata["config"] = json.dumps(config)
        try:
            save_checkpoint(args.ckpt, tensors, metadata)
        except DiskFullError as exc:
            raise DiskFullError(exc.path, exc.needed_bytes, f"free space and rerun; {args.ckpt} is unchanged") from None
        print(f"wrote scale_factor into {args.ckpt}")


if __name__ == "__main__":
    run_cli(main)
