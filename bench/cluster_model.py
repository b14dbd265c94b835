#!/usr/bin/env python
"""Training throughput on paper: images/s of the SD-v2 UNet per A100 and on 8, 64 and 512 of them.

    python bench/cluster_model.py                      # 256 and 512 px, 8 / 64 / 512 GPUs; writes bench/RESULTS.md
    python bench/cluster_model.py --seconds 3 --out '' # shorter loader measurements; print only
    python bench/cluster_model.py --gpus 8 16 128 --batch 16 --global-batch 0 --grad-dtype bf16

What is measured here, on this machine:
- FLOPs per training image: `torch.utils.flop_counter.FlopCounterMode` around a forward and a backward (batch 1,
  meta device: exact counts, no arithmetic) of our `ldm.denoisers.unet.UNetModel` built from the full-size SD-v2
  config (`ldm.formats.original_configs.SD_V2`, 866M parameters, no gradient checkpointing), at 32x32 latents
  (256 px) and 64x64 (512 px). Also the forward of the kl-f8 VAE encoder and of the OpenCLIP ViT-H text encoder,
  the work that cached latents remove. Matmuls, convolutions and attention are counted; norms and elementwise
  ops are not (their time is in the MFU below).
- Loader samples/s per CPU core: tools/train_ldm.py's own data path (`ldm.training.batches.training_batches`,
  DataLoader with num_workers=0, batch 32, one torch thread) for `--seconds` each, after the first batch, on
  shards written to a temp folder: cached latents as tools/encode_latents.py writes them (float16 mean and std,
  4 x h x w, and the SD-2 text context 77 x 1024), and JPEGs (4:3, short side 1.25x the training size, quality
  90) decoded, resized and randomly cropped (`WebDatasetCaptions`). Shards are in the page cache: CPU cost only.

What is modelled (constants below, each with its source): GPU compute per step = images x FLOPs / (A100 bf16
peak x MFU), the MFU being the one MosaicML's 137 img/s per A100 (256 px, cached latents) implies for our FLOP
count; DDP's ring all-reduce of the fp32 gradients, 2 (N-1)/N x parameters x 4 bytes per GPU, over NVLink within
a node and InfiniBand between nodes, overlapped with the backward of the last micro-batch (DDP's buckets) or not;
loader cores per GPU = images/s per GPU / the measured rate. Rows come at `--batch` per GPU and at
`--global-batch` (split over the GPUs, with gradient accumulation in micro-batches of `--batch`). Memory is not
modelled. The bottleneck of a row is the resource busiest per step: GPU compute, the slowest link, or the
loader cores (cached latents) of the host's share per GPU.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import RESULTS, machine, write_section  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from common.errors import InputError  # noqa: E402
from ldm.cli import run_cli  # noqa: E402

# The hardware (assumptions, with their sources).
A100_BF16_PEAK = 312e12  # FLOP/s, dense bf16 tensor cores (NVIDIA A100 datasheet; 624 is with 2:4 sparsity)
NVLINK_BUS = 300e9  # B/s each way per A100: NVLink3, 12 links x 25 GB/s (600 GB/s both ways; A100 datasheet)
NIC_PER_GPU = 25e9  # B/s: one 200 Gb/s HDR InfiniBand adapter per GPU (DGX A100: 8 per node; DGX A100 datasheet)
GPUS_PER_NODE = 8  # DGX A100 / HGX A100 8-GPU baseboard
CORES_PER_GPU = 16  # DGX A100: 2 x AMD EPYC 7742, 128 cores, for 8 GPUs (DGX A100 datasheet)
# The reference: MosaicML's SD-2 base replication ("Training Stable Diffusion from Scratch for <$50k", parts 2 and
# 3, 2023), as issue #21 quotes it: 137 img/s per A100 at 256 px with precomputed latents; 2048 global batch.
MOSAIC_IMAGES_PER_S = 137.0
MOSAIC_SIZE = 256
GRAD_BYTES = {"fp32": 4, "bf16": 2}  # DDP reduces gradients in the parameters' dtype: fp32 in train_ldm (autocast)
CONTEXT_SHAPE = (77, 1024)  # SD-2's cached text context: 77 tokens of OpenCLIP ViT-H width (SD_V2 context_dim)


# The model: pure arithmetic.

def ring_allreduce_bytes(payload_bytes: float, gpus: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of `payload_bytes`: reduce-scatter then all-gather, 2 (N-1) steps
    of payload / N each (Patarasuk & Yuan 2009; NCCL's ring)."""
    return 2 * (gpus - 1) / gpus * payload_bytes


def link_bandwidth(gpus: int) -> tuple[float, str]:
    """(bus bandwidth of the ring's slowest link in B/s, which link) for `gpus` GPUs, GPUS_PER_NODE to a node.

    Within a node: NVLink. Across nodes NCCL runs one ring per NIC (rail-aligned), each ring leaving a node once:
    a node's traffic per ring step crosses its GPUS_PER_NODE NICs in parallel, so the ring's bus bandwidth is the
    node's (8 x 25 GB/s = 200 GB/s), not one NIC's."""
    if gpus <= GPUS_PER_NODE:
        return NVLINK_BUS, "intra-node comm"
    return min(NVLINK_BUS, GPUS_PER_NODE * NIC_PER_GPU), "inter-node comm"


def implied_mfu(images_per_s: float, flops_per_image: float, peak: float = A100_BF16_PEAK) -> float:
    """The model FLOP utilisation at which `images_per_s` needs `flops_per_image` each."""
    return images_per_s * flops_per_image / peak


def step_seconds(compute_s: float, last_backward_s: float, comm_s: float) -> tuple[float, float]:
    """(overlapped, serial) step time. DDP all-reduces gradient buckets as the backward makes them, and only in the
    last micro-batch (train_ldm runs the others under net.no_sync()): at best the all-reduce hides behind that
    backward. Serial: compute, then the whole all-reduce."""
    return compute_s - last_backward_s + max(last_backward_s, comm_s), compute_s + comm_s


def bottleneck(busy_s: dict[str, float]) -> str:
    """The resource with the most busy time per step."""
    return max(busy_s, key=busy_s.get)


def split_batch(per_gpu: int, micro: int) -> tuple[int, int]:
    """(accumulation steps, size of the last micro-batch) for `per_gpu` images per step in micro-batches of `micro`."""
    accum = math.ceil(per_gpu / micro)
    return accum, per_gpu - micro * (accum - 1)


def model_row(gpus: int, per_gpu: int, micro: int, *, size: dict, params: int, grad_bytes: int, mfu: float,
              latent_rate: float, jpeg_rate: float) -> dict:
    """One table row: `gpus` GPUs, `per_gpu` images per optimizer step each, `size` the FLOPs per image."""
    rate = A100_BF16_PEAK * mfu  # FLOP/s achieved
    accum, last = split_batch(per_gpu, micro)
    compute_s = per_gpu * (size["forward"] + size["backward"]) / rate
    last_backward_s = last * size["backward"] / rate
    traffic = ring_allreduce_bytes(params * grad_bytes, gpus)
    bandwidth, link = link_bandwidth(gpus)
    comm_s = traffic / bandwidth
    overlapped, serial = step_seconds(compute_s, last_backward_s, comm_s)
    data_s = per_gpu / (latent_rate * CORES_PER_GPU)  # loader workers run beside the GPU (prefetching)
    per_s = per_gpu / max(overlapped, data_s)
    # From JPEGs the GPU also encodes every image (VAE) and caption (text encoder), forward only.
    jpeg_compute_s = compute_s + per_gpu * (size["vae"] + size["text"]) / rate
    jpeg_step = max(step_seconds(jpeg_compute_s, last_backward_s, comm_s)[0], per_gpu / (jpeg_rate * CORES_PER_GPU))
    return {"gpus": gpus, "per_gpu": per_gpu, "micro": min(micro, per_gpu), "accum": accum, "compute_s": compute_s,
            "traffic": traffic, "comm_s": comm_s, "overlapped": overlapped, "serial": serial, "per_s": per_s,
            "cores_latents": per_s / latent_rate, "jpeg_per_s": per_gpu / jpeg_step,
            "cores_jpeg": per_gpu / jpeg_step / jpeg_rate,
            "bottleneck": bottleneck({"compute": compute_s, link: comm_s, "data loading": data_s})}


# The measured inputs.

def build_meta_model():
    """SD-v2 (UNet, kl-f8 VAE, OpenCLIP ViT-H text encoder) on the meta device: shapes only, no memory or init."""
    import torch

    from ldm.formats.configs import from_original_config
    from ldm.formats.original_configs import SD_V2
    from ldm.model import LatentDiffusion

    with torch.device("meta"):
        model = LatentDiffusion(from_original_config(SD_V2))
    for module in model.denoiser.modules():  # train.gradient_checkpointing is off by default
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    return model


def count_flops(model, pixels: int) -> dict[str, float]:
    """FLOPs per image at `pixels` px: UNet forward and backward (measured separately), VAE encode, text encode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = pixels // 8  # kl-f8
    with torch.device("meta"):
        x, t = torch.randn(1, 4, side, side), torch.tensor([500])
        context, image = torch.randn(1, *CONTEXT_SHAPE), torch.randn(1, 3, pixels, pixels)
    with FlopCounterMode(display=False) as forward:
        out = model.denoiser(x, t, context)
    with FlopCounterMode(display=False) as backward:
        out.float().square().mean().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as vae:
        model.autoencoder.encode(image)
    with torch.no_grad(), FlopCounterMode(display=False) as text:
        model.text_encoder.encode(["a photograph of an astronaut riding a horse"])
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
            "vae": vae.get_total_flops(), "text": text.get_total_flops()}


def write_latent_shards(folder: Path, count: int, *, latent_side: int, context: tuple[int, int] = CONTEXT_SHAPE,
                        per_shard: int = 256) -> list[str]:
    """Latent shards as tools/encode_latents.py writes them (float16 mean, std, ctx; txt; autoencoder.json)."""
    import webdataset as wds

    from ldm.data.captions import AUTOENCODER_RECORD

    rng = np.random.default_rng(0)
    record = json.dumps({"sha256": "0" * 64, "scale_factor": 0.18215, "checkpoint": None}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "latents-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for k in range(count):
            sink.write({"__key__": f"{k:06d}", "txt": f"caption {k}", AUTOENCODER_RECORD: record,
                        "mean.npy": rng.standard_normal((4, latent_side, latent_side)).astype(np.float16),
                        "std.npy": rng.uniform(0.01, 0.1, (4, latent_side, latent_side)).astype(np.float16),
                        "ctx.npy": rng.standard_normal(context).astype(np.float16)})
    return sorted(str(p) for p in folder.glob("latents-*.tar"))


def write_jpeg_shards(folder: Path, count: int, *, short_side: int, per_shard: int = 256) -> list[str]:
    """Image shards as tools/make_shards.py writes them (jpg, txt, json): smooth colour fields with grain, 4:3."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = short_side, short_side * 4 // 3
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "images-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for k in range(count):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                            Image.BICUBIC)
            pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (height, width, 3))
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG", quality=90)
            caption = f"caption {k}"
            sink.write({"__key__": f"{k:06d}", "jpg": jpeg.getvalue(), "txt": caption,
                        "json": json.dumps({"caption": caption}).encode()})
    return sorted(str(p) for p in folder.glob("images-*.tar"))


def loader_rate(urls: list[str], *, latents: bool, seconds: float, batch: int = 32, image_size: int = 256) -> float:
    """Samples/s of tools/train_ldm.py's data path (num_workers=0, in this process) over `seconds`, after the first
    batch (shard opening and the shuffle buffer's first fill). No caption dropout: every sample decodes its ctx."""
    from ldm.training.batches import training_batches
    from ldm.training.config import TrainConfig

    cfg = TrainConfig(batch_size=batch, num_workers=0, image_size=image_size, caption_dropout=0.0)
    _, batches = training_batches(data=None if latents else urls, latents=urls if latents else None, cfg=cfg,
                                  rank=0, step=0, buckets=None, uncond={}, autoencoder=None)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        samples += len(next(batches)["key"])
    return samples / (time.perf_counter() - start)


def measure_loaders(sizes: list[int], seconds: float, batch: int, work: Path) -> dict[int, dict[str, float]]:
    """Per training size: latent and JPEG loader samples/s per core, and bytes per sample of each shard kind."""
    measured = {}
    for pixels in sizes:
        latent_urls = write_latent_shards(work / f"latents-{pixels}", 512, latent_side=pixels // 8)
        jpeg_urls = write_jpeg_shards(work / f"jpeg-{pixels}", 256, short_side=pixels * 5 // 4)
        latent = loader_rate(latent_urls, latents=True, seconds=seconds, batch=batch)
        jpeg = loader_rate(jpeg_urls, latents=False, seconds=seconds, batch=batch, image_size=pixels)
        measured[pixels] = {"latents": latent, "jpeg": jpeg,
                            "latent_bytes": sum(os.path.getsize(u) for u in latent_urls) / 512,
                            "jpeg_bytes": sum(os.path.getsize(u) for u in jpeg_urls) / 256}
        print(f"[{pixels} px] loader per core: cached latents {latent:.0f} samples/s, JPEG {jpeg:.0f} samples/s",
              flush=True)
    return measured


# The report.

def table(rows: list[dict]) -> str:
    lines = ["| px | GPUs | batch/GPU | global | compute ms | AR MB | comm ms | step ms | img/s/GPU | img/s all "
             "| cores | bottleneck |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        accum = f" ({r['micro']}x{r['accum']})" if r["accum"] > 1 else ""
        lines.append(f"| {r['px']} | {r['gpus']} | {r['per_gpu']}{accum} | {r['gpus'] * r['per_gpu']} | "
                     f"{r['compute_s'] * 1e3:.0f} | {r['traffic'] / 1e6:.0f} | {r['comm_s'] * 1e3:.0f} | "
                     f"{r['overlapped'] * 1e3:.0f} / {r['serial'] * 1e3:.0f} | {r['per_s']:.0f} | "
                     f"{r['per_s'] * r['gpus']:,.0f} | {r['cores_latents']:.2f} / {r['cores_jpeg']:.1f} | "
                     f"{r['bottleneck']} |")
    return "\n".join(lines)


def one_nic_note(rows: list[dict]) -> str:
    """What the inter-node rows would need if a ring's traffic went through one NIC (25 GB/s), not a node's eight."""
    slow = {r["gpus"]: r["traffic"] / NIC_PER_GPU for r in rows if r["gpus"] > GPUS_PER_NODE}
    if not slow:
        return ""
    return ("Through one 25 GB/s NIC per ring instead of a node's eight in parallel, the all-reduce would take "
            + ", ".join(f"{ms * 1e3:.0f} ms at {n} GPUs" for n, ms in slow.items()) + ".")


def inputs_text(flops: dict, loaders: dict, params: int, grad_dtype: str, mfu: float, implied: float) -> str:
    payload = params * GRAD_BYTES[grad_dtype]
    lines = [f"SD-v2 UNet: {params / 1e6:.1f}M parameters; all-reduce payload {payload / 1e6:.0f} MB ({grad_dtype} "
             f"gradients). MFU {mfu:.1%} (implied by {MOSAIC_IMAGES_PER_S:g} img/s per A100 at "
             f"{MOSAIC_SIZE} px: {implied:.1%}).", ""]
    for px, f in flops.items():
        train = f["forward"] + f["backward"]
        lines.append(f"- {px} px: UNet {f['forward'] / 1e9:.0f} GFLOP forward + {f['backward'] / 1e9:.0f} backward = "
                     f"{train / 1e9:.0f} GFLOP per training image (backward {f['backward'] / f['forward']:.2f}x "
                     f"forward); VAE encode {f['vae'] / 1e9:.0f}, text encode {f['text'] / 1e9:.0f} GFLOP. Loader per "
                     f"core: cached latents {loaders[px]['latents']:.0f} samples/s "
                     f"({loaders[px]['latent_bytes'] / 1e3:.0f} KB each), JPEG {loaders[px]['jpeg']:.0f} samples/s "
                     f"({loaders[px]['jpeg_bytes'] / 1e3:.0f} KB each).")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="training sizes in px (default 256 512)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512], help="GPU counts (default 8 64 512)")
    p.add_argument("--batch", type=int, default=32,
                   help="images per GPU per micro-batch, and the loader's batch (default 32)")
    p.add_argument("--global-batch", type=int, default=2048,
                   help="also rows at this global batch (default 2048, as MosaicML at 256 px); 0: none")
    p.add_argument("--grad-dtype", choices=list(GRAD_BYTES), default="fp32",
                   help="gradient dtype DDP all-reduces (default fp32)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOP utilisation (default: MosaicML's implied)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per loader measurement (default 10)")
    p.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    args = p.parse_args()
    if any(s <= 0 or s % 64 for s in args.sizes):
        raise InputError(f"--sizes must be positive multiples of 64 px (8x8 UNet latents), got {args.sizes}")
    if min(args.gpus) < 1 or args.batch < 1 or args.global_batch < 0 or args.seconds <= 0:
        raise InputError("--gpus and --batch must be >= 1, --global-batch >= 0 and --seconds > 0")
    if args.global_batch and any(args.global_batch % n for n in args.gpus):
        raise InputError(f"--global-batch {args.global_batch} must split evenly over --gpus {args.gpus}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise InputError(f"--mfu is a fraction in (0, 1], got {args.mfu}")
    return args


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)  # per core: the loader runs in this process
    started, load = time.perf_counter(), os.getloadavg()[0]
    model = build_meta_model()
    params = sum(p.numel() for p in model.denoiser.parameters())
    flops = {px: count_flops(model, px) for px in sorted(set(args.sizes) | {MOSAIC_SIZE})}
    reference = flops[MOSAIC_SIZE]
    implied = implied_mfu(MOSAIC_IMAGES_PER_S, reference["forward"] + reference["backward"])
    mfu = args.mfu or implied
    print(f"FLOPs counted ({time.perf_counter() - started:.0f} s); implied MFU {implied:.1%}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ldm-cluster-") as work:
        loaders = measure_loaders(args.sizes, args.seconds, args.batch, Path(work))
    rows = []
    for px in args.sizes:
        common = dict(size=flops[px], params=params, grad_bytes=GRAD_BYTES[args.grad_dtype], mfu=mfu,
                      latent_rate=loaders[px]["latents"], jpeg_rate=loaders[px]["jpeg"])
        batches = [(n, args.batch) for n in args.gpus]
        batches += [(n, args.global_batch // n) for n in args.gpus] if args.global_batch else []
        rows += [{"px": px, **model_row(n, per_gpu, args.batch, **common)} for n, per_gpu in dict.fromkeys(batches)]
    inputs = inputs_text({px: flops[px] for px in args.sizes}, loaders, params, args.grad_dtype, mfu, implied)
    text = "\n".join([
        "## Training throughput on paper: the SD-v2 UNet on N A100s", "",
        f"`python bench/cluster_model.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`, "
        f"{datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start. python "
        f"{platform.python_version()}, torch {torch.__version__} (1 thread). Total run time "
        f"{time.perf_counter() - started:.0f} s.", "",
        inputs, "",
        f"A100 bf16 peak {A100_BF16_PEAK / 1e12:.0f} TFLOP/s; ring bus bandwidth {NVLINK_BUS / 1e9:.0f} GB/s "
        f"within a node (NVLink3), {link_bandwidth(GPUS_PER_NODE + 1)[0] / 1e9:.0f} GB/s across nodes ({GPUS_PER_NODE}"
        f" x 200 Gb/s InfiniBand per node); {CORES_PER_GPU} host cores per GPU. `step ms`: all-reduce "
        "overlapped with the last backward / after it; `AR MB`: all-reduce traffic each GPU sends per step; "
        "`cores`: loader cores per GPU at that rate from cached latents / from JPEGs (the JPEG path also runs the VAE "
        "and text encoders on the GPU, so its img/s are lower).", "",
        table(rows), "", one_nic_note(rows)])
    print("\n" + text)
    if args.out:
        write_section("cluster_model", text, args.out)


if __name__ == "__main__":
    run_cli(main)
