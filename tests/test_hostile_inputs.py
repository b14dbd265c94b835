"""Hostile and absurd inputs (issue 15): broken or enormous configs inside a checkpoint, enormous sample
counts, decompression bombs. Each is refused up front with one line naming the problem and the fix, before
anything large is allocated; and img2img's PNG metadata names its init image and mask.
"""
from __future__ import annotations

import json
import runpy
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
from autoencoder import AutoencoderConfig
from common.checkpoint import FORMAT
from common.config import check_range
from common.errors import InputError
from ldm import pipeline
from ldm.denoisers import DiTConfig
from ldm.images import open_image

from helpers import REPO, TINY_AE

VALID = ldm.LDMConfig(autoencoder=TINY_AE).to_dict()


def _with(**changes) -> str:
    """VALID as JSON with `section.key` (or top-level `key`) set to the given values."""
    config = json.loads(json.dumps(VALID))
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        (config[section] if section else config)[key] = value
    return json.dumps(config)


def _checkpoint(path: Path, config: str, kind: str = "latent_diffusion") -> Path:
    """A tiny safetensors file in our format whose metadata carries `config` (one real tensor: the weights
    would never fit, so anything that reached the loading of weights would fail differently)."""
    save_file({"alphas_cumprod": torch.ones(2)}, str(path), metadata={"format": FORMAT, "kind": kind, "config": config})
    return path


# ---------------------------------------------------------------------------------------------------
# configs inside a checkpoint


@pytest.mark.parametrize("config, message", [
    ("{not json", "the config in this checkpoint's metadata is not valid JSON (Expecting property name"),
    ("[" * 100_000, "is not valid JSON"),  # nesting deeper than the parser's recursion limit
    ('{"timesteps": ' + "9" * 5000 + "}", "is not valid JSON"),  # an integer of more than 4300 digits
    ("null", "the config in this checkpoint's metadata is null, not a JSON object"),
    ("[1, 2]", "is a JSON list, not a JSON object"),
    (_with(timesteps=10 ** 12), "model config: timesteps must be between 1 and 100000, got 1000000000000"),
    (_with(timesteps=10 ** 400), "model config: timesteps must be between 1 and 100000, got about 10**400"),
    (_with(image_size=10 ** 9), "model config: image_size must be between 1 and 4096"),
    (_with(**{"autoencoder.ch": 2 ** 40}), "autoencoder config: ch must be between 1 and 4096, got 1099511627776"),
    (_with(**{"autoencoder.ch_mult": [1] * 100}), "autoencoder config: ch_mult must have 1 to 8 entries, got 100"),
    (_with(**{"autoencoder.ch_mult": [1, 10 ** 9]}), "autoencoder config: ch_mult entries must be between 1 and 64"),
    (_with(**{"autoencoder.ch": 2048, "autoencoder.ch_mult": [1, 4]}),
     "ch x ch_mult gives layers of 8192 channels; at most 4096"),
    (_with(**{"autoencoder.num_res_blocks": 10 ** 6}), "num_res_blocks must be between 1 and 64"),
    (_with(**{"autoencoder.ch_mult": "abc"}), "ch_mult must be a list of whole numbers, got 'abc'"),
    (_with(autoencoder=None), "autoencoder config must be a mapping of keys to values, got None"),
    (_with(denoiser=[1]), "denoiser config must be a mapping of keys to values"),
    (_with(denoiser={"type": "dit", "hidden_size": 2 ** 30, "depth": 2, "num_heads": 4}),
     "dit config: hidden_size must be between 1 and 8192, got 1073741824"),
    (_with(denoiser={"type": "dit", "size": "DiT-S/2", "depth": 10 ** 6}), "dit config: depth must be between 1 and 128"),
    (_with(denoiser={"type": "dit", "size": "DiT-S/2", "context_dim": 10 ** 7}), "context_dim must be between 1 and 16384"),
    (_with(denoiser={"type": "dit", "size": "DiT-S/2", "hidden_size": 8192, "mlp_ratio": 64}),
     "dit config: hidden_size x mlp_ratio = 524288 is more than 65536"),
    (_with(denoiser={"type": "dit", "size": "DiT-S/2", "in_channels": 1024, "patch_size": 16}),
     "dit config: 1024 channels in patches of 16x16 are more than 16384 values per patch"),
    (_with(linear_start=float("nan")), "linear_start must be a finite number, got nan"),
    (_with(**{"autoencoder.scale_factor": 1e400}), "scale_factor must be a finite number, got inf"),
])
def test_hostile_configs_in_a_checkpoint_are_refused_before_anything_is_allocated(tmp_path, config, message):
    path = _checkpoint(tmp_path / "hostile.safetensors", config)
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        ldm.load_model(path)
    assert time.perf_counter() - start < 2  # from the config alone: nothing of that size is ever built
    text = str(info.value)
    assert message in text and text.startswith(f"{path}: the config in this checkpoint's metadata ")
    assert "\n" not in text


def test_a_broken_config_says_how_to_recover(tmp_path):
    path = _checkpoint(tmp_path / "damaged.safetensors", '{"autoencoder": {"ch": 3')
    with pytest.raises(InputError, match=r"the file is damaged; pass the model's config \(--config YAML, or config= "
                                         r"in Python\), or re-save the file with it: tools/convert_checkpoint.py"):
        ldm.load_model(path)


def test_an_autoencoder_checkpoint_with_a_hostile_config_is_refused(tmp_path):
    config = json.dumps({**TINY_AE.to_dict(), "z_channels": 10 ** 8})
    path = _checkpoint(tmp_path / "ae.safetensors", config, kind="autoencoder")
    with pytest.raises(InputError, match="autoencoder config: z_channels must be between 1 and 1024, got 100000000"):
        ldm.load_autoencoder(path)
    with pytest.raises(InputError, match="metadata is a JSON string, not a JSON object"):
        ldm.load_autoencoder(_checkpoint(tmp_path / "ae2.safetensors", '"ch=128"', kind="autoencoder"))


def test_the_bounds_admit_every_real_model():
    """SD 1.x/2.x/SDXL first stage (ch 128, ch_mult [1, 2, 4, 4]), SD3-style 16-channel latents, DiT-XL/2, 1000 steps
    and SD 2.x's 96 x 96 latents build within the bounds; so do the widest and deepest sizes the bounds allow."""
    AutoencoderConfig()
    AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), z_channels=16, embed_dim=16)
    AutoencoderConfig(ch=128, ch_mult=(1,) * 7 + (32,), num_res_blocks=64, z_channels=1024, embed_dim=1024)
    assert DiTConfig.named("DiT-XL/2").hidden_size == 1152
    DiTConfig(hidden_size=8192, depth=128, num_heads=128, input_size=4096, patch_size=16, in_channels=64,
              mlp_ratio=8, context_dim=16384)
    ldm.LDMConfig(timesteps=1000, image_size=96)
    ldm.LDMConfig(timesteps=100_000, image_size=4096)


def test_a_config_at_every_upper_bound_is_refused_by_its_missing_weights_not_by_memory(tmp_path):
    """The bounds keep every single weight small enough to be created (and dropped: the parameters are built on
    the meta device, `empty_parameters`), so even the largest config the bounds admit ends in the clear
    "does not fit" error, in seconds, rather than an allocator's traceback."""
    widest = AutoencoderConfig(ch=4096, ch_mult=(1,) * 8, num_res_blocks=64, z_channels=1024, embed_dim=1024)
    dit = DiTConfig(hidden_size=8192, depth=128, num_heads=1024, input_size=4096, patch_size=16, in_channels=64,
                    mlp_ratio=8, context_dim=16384)
    config = ldm.LDMConfig(autoencoder=widest, denoiser=dit, timesteps=100_000, image_size=4096)
    path = _checkpoint(tmp_path / "largest.safetensors", config.to_json())
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"does not fit the config: missing keys: encoder\.conv_in\.weight"):
        ldm.load_model(path)
    assert time.perf_counter() - start < 30


def test_check_range_names_the_field_its_bounds_and_the_value():
    with pytest.raises(InputError, match=r"^model config: timesteps must be between 1 and 100000, got 1000000000000$"):
        check_range({"timesteps": 10 ** 12}, "model config", {"timesteps": (1, 100_000)})
    with pytest.raises(InputError, match=r"^x: sizes entries must be between 1 and 8, got 9$"):
        check_range({"sizes": [1, 9]}, "x", {"sizes": (1, 8)})
    with pytest.raises(InputError, match=r"^x: width must be numbers, got 'wide'$"):
        check_range({"width": "wide"}, "x", {"width": (1, 8)})
    check_range({"width": None, "depth": 3}, "x", {"width": (1, 8), "depth": (1, 8)})  # None: a field left out


# ---------------------------------------------------------------------------------------------------
# enormous sample counts and batches


def _cli(script: str, *args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_enormous_n_samples_is_refused_before_the_model_loads(tmp_path):
    result = _cli("txt2img.py", "--prompt", "red apple", "--n_samples", 100_000_000, "--outdir", tmp_path / "out")
    _assert_one_line_error(result, "--n_samples must be at most 100000 (the images of one iteration are held in "
                                   "memory until written), got 100000000; use --n_iter for more images")
    assert not (tmp_path / "out").exists()


def test_more_images_than_memory_can_hold_are_refused_from_an_estimate(tmp_path):
    """100 prompts x 100000 images of 256 x 256 would hold 1.8 TiB of pixels before they are written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {k}\n" for k in range(100)))
    result = _cli("txt2img.py", "--from-file", prompts, "--n_samples", 100_000, "--H", 256, "--W", 256,
                  "--batch_size", 1, "--outdir", tmp_path / "out")
    _assert_one_line_error(result, "10000000 images of 256x256 need about 1831.1 GiB of memory to hold until they "
                                   "are written but")
    assert "lower --n_samples (or the number of prompts) and use --n_iter for more images" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written, or even a folder made


def test_the_memory_estimate_covers_the_batch_sampled_at_once(monkeypatch):
    model = ldm.load_model()
    cpu, dtype = torch.device("cpu"), torch.float32
    # The default model at 256 x 256: decoding one image holds about 7 x 256^2 x 32 x 4 bytes = 56 MiB.
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 200 * 2 ** 20)
    pipeline.check_memory(model, 256, 256, cpu, dtype, batch_size=3, n_images=8)
    with pytest.raises(InputError, match=r"^4 images of 256x256 at once need about 0\.2 GiB to sample and decode but "
                                         r"0\.2 GiB are free: use --batch_size 3 or lower"):
        pipeline.check_memory(model, 256, 256, cpu, dtype, batch_size=4, n_images=8)
    with pytest.raises(InputError, match=r"^2000 images of 256x256 need about 0\.4 GiB of memory to hold"):
        pipeline.check_memory(model, 256, 256, cpu, dtype, batch_size=1, n_images=2000)
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 40 * 2 ** 20)
    with pytest.raises(InputError, match=r"^256x256 needs about 0\.1 GiB to decode one image"):
        pipeline.check_memory(model, 256, 256, cpu, dtype)
    model.autoencoder.enable_tiling()  # tiles bound the decoder; sampling the latents still counts
    with pytest.raises(InputError, match=r"^4096x4096 needs about [\d.]+ GiB to sample one image but .* smaller init"):
        pipeline.check_memory(model, 4096, 4096, cpu, dtype, batch_size=1, n_images=1)


# ---------------------------------------------------------------------------------------------------
# init images: metadata, decompression bombs, huge images


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (8-bit gray) with almost no data: a decompression bomb's shape.
    PIL decides from the header, so the data never needs to be there."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))
    return path


def _png_text_bomb(path: Path) -> Path:
    """An 8 x 8 PNG with a zTXt chunk that inflates to 64 MiB (PIL refuses text over MAX_TEXT_CHUNK)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * 8 for _ in range(8)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
                     + chunk(b"zTXt", b"bomb\x00\x00" + zlib.compress(b"A" * (64 << 20), 9))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (10_000, 10_000)])  # PIL's error; PIL's warning only
def test_decompression_bombs_and_huge_images_are_refused_from_the_header(tmp_path, width, height):
    path = _png_header_only(tmp_path / "bomb.png", width, height)
    with pytest.raises(InputError, match=f"image refused before decoding: its header says {width * height:,} pixels"):
        open_image(path)


def test_img2img_refuses_a_decompression_bomb_in_one_line(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    result = _cli("img2img.py", "--init-img", bomb, "--prompt", "red apple", "--outdir", tmp_path / "out")
    _assert_one_line_error(result, f"cannot read init image {bomb}: image refused before decoding: its header says "
                                   "10,000,000,000 pixels, more than the 89,478,485 read here")
    assert "downscale it first" in result.stderr and not (tmp_path / "out").exists()


def test_img2img_refuses_a_png_text_bomb_as_a_mask(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (8, 8), "gray").save(tmp_path / "init.png")
    _png_text_bomb(tmp_path / "mask.png")
    monkeypatch.setattr(sys, "argv", ["img2img.py", "--init-img", str(tmp_path / "init.png"), "--mask",
                                      str(tmp_path / "mask.png"), "--prompt", "a", "--outdir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / "img2img.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"error: cannot read mask {tmp_path / 'mask.png'}: Decompressed data too large") and err.count("\n") == 1


def test_img2img_metadata_names_the_init_image_and_the_mask(tmp_path, monkeypatch):
    """File names as given on the command line; one with a comma is quoted so the parameters line still parses."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), (200, 30, 30)).save("cat.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save("my, mask.png")
    monkeypatch.setattr(sys, "argv", ["img2img.py", "--init-img", "cat.png", "--mask", "my, mask.png", "--prompt",
                                      "red apple", "--steps", "2", "--strength", "0.5", "--outdir", "out"])
    runpy.run_path(str(REPO / "tools" / "img2img.py"), run_name="__main__")
    with Image.open(tmp_path / "out" / "samples" / "00000.png") as image:
        text = dict(image.text)
    parameters = text["parameters"].splitlines()[-1]
    assert parameters.endswith(', Denoising strength: 0.5, Init image: cat.png, Mask: "my, mask.png"'), parameters
    record = json.loads(text["ldm"])
    assert (record["init_image"], record["mask"], record["strength"]) == ("cat.png", "my, mask.png", 0.5)
