"""Helpers shared by the tests: the reference data beside the repo, tiny configs, real images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
from autoencoder import AutoencoderConfig

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("LDM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))

TINY_AE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4)


def reference_dir(name: str) -> Path:
    """A folder of ../shared/reference; skipped where it is absent, but a failure under CI."""
    path = REFERENCE / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data {path} is missing (set LDM_REFERENCE_DIR)")
        pytest.skip(f"reference data {path} not available")
    return path


def _photos() -> list[np.ndarray]:
    import skimage.data as data  # test-only peer: ships real photographs inside the package
    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
            data.immunohistochemistry(), data.retina()]


def write_real_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    """`n` crops of real photographs (scikit-image's sample images), downscaled, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p).convert("RGB") for p in _photos()]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        crop = int(min(w, h, size * rng.uniform(2.0, 6.0)))
        x0, y0 = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
        img = photo.crop((x0, y0, x0 + crop, y0 + crop)).resize((size, size), Image.BICUBIC)
        path = folder / f"img_{i:04d}.png"
        img.save(path)
        paths.append(path)
    return paths


def write_caption_shards(root: Path, captions: list[str], *, shards: int = 2, per_shard: int = 16) -> str:
    """`shards` webdataset shards of `per_shard` real images each (`write_real_images`, 32 px), sample k captioned
    captions[k % len(captions)], keyed s{shard}_{k:03d}, written directly (as make_shards.py would); their
    brace pattern."""
    import webdataset as wds

    images = write_real_images(root / "images", shards * per_shard, 32)
    for shard in range(shards):
        with wds.TarWriter(str(root / f"{shard:06d}.tar")) as sink:
            for k, path in enumerate(images[shard * per_shard:(shard + 1) * per_shard]):
                sink.write({"__key__": f"s{shard}_{k:03d}", "png": path.read_bytes(),
                            "txt": captions[k % len(captions)]})
    return str(root / f"{{000000..{shards - 1:06d}}}.tar")


def write_default_model_lora(path, seed: int = 0) -> None:
    """A kohya file for the embedded default model: rank-2 LoRAs on every attn2.to_k (sgm-flattened names)."""
    model = ldm.load_model()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.denoiser.named_modules():
        if name.endswith("attn2.to_k"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator)
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator)
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
