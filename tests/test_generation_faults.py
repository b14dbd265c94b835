"""Generation faults: NaN / inf (options, configs, weights, float16 overflow), 16-bit init images, and
output names that two processes never share.

Uses the tiny random text-to-image model of test_cli.py; a NaN / inf result must stop with a one-line
error and no image, never come out as a black image with exit code 0.
"""
from __future__ import annotations

import dataclasses
import runpy
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import NATIVE, PROMPT, _tiny_model, assert_one_line_error, pixels, run_in_process

import ldm
from autoencoder import AutoencoderConfig
from ldm.cli import generate as cli_generate
from ldm.images import image_to_tensor, mask_to_tensor, open_image, to_rgb

from helpers import REPO, TINY_AE, write_real_images

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def model() -> ldm.LatentDiffusion:
    return _tiny_model(4)


def _images(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(int)


def _run_tool(script: str, args: list[str], monkeypatch) -> None:
    """A tool's own code in this process (saves a process start), expected to succeed."""
    monkeypatch.setattr("sys.argv", [f"tools/{script}", *args])
    runpy.run_path(str(REPO / "tools" / script), run_name="__main__")


def _first_weight(module: torch.nn.Module) -> tuple[str, torch.nn.Parameter]:
    return next(iter(module.named_parameters()))


# ---------------------------------------------------------------------------------------------------
# non-finite options and configs: refused before any work


@pytest.mark.parametrize("flag, value", [("--scale", "nan"), ("--scale", "inf"), ("--ddim_eta", "nan")])
def test_non_finite_flags_are_refused(tmp_path, monkeypatch, capsys, flag, value):
    code, err = run_in_process("txt2img.py", ["--ckpt", "unused.safetensors", "--prompt", "a", flag, value,
                                              "--outdir", str(tmp_path)], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{flag} must be a finite number, got {float(value)}")


def test_non_finite_strength_is_refused(tmp_path, monkeypatch, capsys):
    code, err = run_in_process("img2img.py", ["--ckpt", "unused.safetensors", "--prompt", "a", "--init-img", "x.png",
                                              "--strength", "nan", "--outdir", str(tmp_path)], monkeypatch, capsys)
    assert_one_line_error(code, err, "--strength must be a finite number, got nan")


@pytest.mark.parametrize("option", ["guidance_scale", "eta", "strength"])
def test_non_finite_api_options_are_refused(model, option):
    with pytest.raises(ldm.InputError, match=f"^{option} must be a finite number, got inf$"):
        model.generate(PROMPT, steps=1, seed=0, **{option: INF})
    context = torch.zeros(1, 77, 64)
    with pytest.raises(ldm.InputError, match=f"^{option} must be a finite number, got nan$"):
        model.sample(context, context, x_T=torch.zeros(1, 4, 16, 16), **{option: NAN})


def test_non_finite_config_numbers_are_refused():
    for value in (NAN, INF, "nan"):  # "nan": YAML 1.1 reads some numbers as strings, coerced to floats
        with pytest.raises(ldm.InputError, match="autoencoder config: scale_factor must be a finite number"):
            dataclasses.replace(TINY_AE, scale_factor=value)
    with pytest.raises(ldm.InputError, match="autoencoder config: dropout must be a finite number, got nan"):
        AutoencoderConfig(dropout=NAN)
    with pytest.raises(ldm.InputError, match="autoencoder config: dropout must be in"):
        AutoencoderConfig(dropout=1.5)
    for name in ("linear_start", "linear_end"):
        with pytest.raises(ldm.InputError, match=f"model config: {name} must be a finite number, got inf"):
            ldm.LDMConfig(autoencoder=TINY_AE, **{name: INF})
        with pytest.raises(ldm.InputError, match=rf"{name} must be in \(0, 1\)"):
            ldm.LDMConfig(autoencoder=TINY_AE, **{name: 0.0})
    config = _tiny_model(4).config.to_dict()
    config["denoiser"]["dropout"] = NAN
    with pytest.raises(ldm.InputError, match="unet config: dropout must be a finite number, got nan"):
        ldm.LDMConfig.from_dict(config)


def test_checkpoint_with_a_nan_scale_factor_is_refused(tmp_path, monkeypatch, capsys):
    model = _tiny_model(4)
    model.config.autoencoder.scale_factor = NAN  # past the config's check, as a hand-edited file would be
    ldm.save_model(model, tmp_path / "nan.safetensors")
    code, err = run_in_process("txt2img.py", ["--ckpt", str(tmp_path / "nan.safetensors"), "--prompt", "a",
                                              "--outdir", str(tmp_path / "out")], monkeypatch, capsys)
    assert_one_line_error(code, err, "autoencoder config: scale_factor must be a finite number, got nan")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# NaN / inf weights: a one-line error naming the stage and the weight, no image


def test_nan_weight_stops_txt2img_with_no_image(tmp_path, monkeypatch, capsys):
    model = _tiny_model(4)
    name, weight = _first_weight(model.denoiser)
    with torch.no_grad():
        weight.view(-1)[0] = NAN
    ldm.save_model(model, tmp_path / "nan.safetensors")
    outdir = tmp_path / "out"
    code, err = run_in_process("txt2img.py", ["--ckpt", str(tmp_path / "nan.safetensors"), "--prompt", "a",
                                              "--steps", "2", "--outdir", str(outdir)], monkeypatch, capsys)
    assert_one_line_error(code, err, "sampling (text encoder, denoiser and sampler) gave NaN/inf latents in "
                                     f"float32: the weight denoiser.{name} holds NaN/inf, so the checkpoint is corrupt; "
                                     "check the checkpoint")
    assert not list(outdir.rglob("*.png"))


def test_inf_decoder_weight_is_named(model):
    name, weight = _first_weight(model.autoencoder.decoder)
    with torch.no_grad():
        weight.view(-1)[0] = INF
    with pytest.raises(ldm.InputError, match=rf"^decoding \(autoencoder decoder\) gave NaN/inf pixels in float32: "
                                             rf"the weight autoencoder\.decoder\.{name} holds NaN/inf"):
        model.generate(PROMPT, steps=1, seed=0)


def test_nan_latents_with_finite_weights(model, monkeypatch):
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *args, **kwargs: sample(*args, **kwargs) * NAN)
    with pytest.raises(ldm.InputError, match="gave NaN/inf latents in float32 with finite weights: likely weights "
                                             "out of range"):
        model.generate(PROMPT, steps=1, seed=0)


# ---------------------------------------------------------------------------------------------------
# float16 overflow: that part runs again in float32, the model stays in float16


def _overflow_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """From now on `module` returns inf wherever it computes in `dtype`: an overflow of that precision."""
    module.register_forward_hook(lambda _, args, out: out * INF if out.dtype == dtype else out)


def _record_calls(monkeypatch, model: ldm.LatentDiffusion, method: str) -> list[tuple[tuple, torch.Tensor]]:
    calls, original = [], getattr(model, method)

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(model, method, recorded)
    return calls


def test_float16_overflow_is_redone_in_float32(model, monkeypatch):
    model.half()
    reference_samples = _record_calls(monkeypatch, model.float(), "sample")  # the float16 weights, in float32
    reference = _images(model.generate(PROMPT, steps=2, seed=5, n_samples=2))
    monkeypatch.undo()
    model.half()
    samples = _record_calls(monkeypatch, model, "sample")
    _overflow_in(model.denoiser, torch.float16)
    with pytest.warns(RuntimeWarning, match=r"^float16 overflowed in sampling \(text encoder, denoiser and sampler\) "
                                            r"\(NaN/inf latents\); ran that part again in float32$") as record:
        images = _images(model.generate(PROMPT, steps=2, seed=5, n_samples=2))
    assert len(record) == 1 and len(samples) == 2  # the batch sampled twice
    assert torch.equal(samples[-1][1], reference_samples[0][1])  # the retry is the float32 sampling exactly
    assert np.abs(images - reference).max() <= 3  # decoded in float16
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # cast back after the retry
    assert not any(p.is_inference() for p in model.parameters())  # still trainable and loadable


def test_float16_decoder_overflow_gives_finite_images(model):
    """The autoencoder decodes again in float32 itself (AutoencoderKL.decode); the pipeline only checks."""
    model.half()
    reference = _images(model.float().generate(PROMPT, steps=1, seed=5))
    model.half()
    _overflow_in(model.autoencoder.decoder, torch.float16)
    with pytest.warns(UserWarning, match="decoding in float32 instead"):
        images = _images(model.generate(PROMPT, steps=1, seed=5))
    assert np.abs(images - reference).max() <= 3
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_autocast_overflow_is_redone_without_autocast(model, monkeypatch):
    reference_samples = _record_calls(monkeypatch, model, "sample")
    reference = _images(model.generate(PROMPT, steps=2, seed=5))
    monkeypatch.undo()
    samples = _record_calls(monkeypatch, model, "sample")
    # a layer inside: the denoiser casts its output back to the input's dtype
    _overflow_in(next(m for m in model.denoiser.modules() if isinstance(m, torch.nn.Linear)), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="^bfloat16 overflowed"):
        images = _images(model.generate(PROMPT, steps=2, seed=5))
    assert len(samples) == 2 and torch.equal(samples[-1][1], reference_samples[0][1])  # autocast off: float32
    assert np.abs(images - reference).max() <= 8  # decoded under bfloat16 autocast (8 significant bits)


def test_float16_with_a_nan_weight_is_still_an_error(model):
    model.half()
    name, weight = _first_weight(model.denoiser)
    with torch.no_grad():
        weight.view(-1)[0] = NAN
    with pytest.raises(ldm.InputError, match=f"in float16 and again in float32: the weight denoiser.{name} holds"):
        model.generate(PROMPT, steps=1, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


# ---------------------------------------------------------------------------------------------------
# 16-bit init images: scaled as the training loader does, not clipped to white


def _png_16_bit_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, bit depth 16), which Pillow reads but cannot write."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo_8_bit(tmp_path_factory) -> np.ndarray:
    path = write_real_images(tmp_path_factory.mktemp("photo16"), 1, size=NATIVE)[0]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_16_bit_images_read_as_their_8_bit_equivalent(photo_8_bit, tmp_path):
    gray = np.asarray(Image.fromarray(photo_8_bit).convert("L"))
    noise = np.random.default_rng(0).integers(0, 256, gray.shape)  # low bytes: within 1/255 of the 8-bit value
    expected = image_to_tensor(Image.fromarray(gray))
    for mode, file in (("I;16", "gray16.png"), ("I", "gray32.tif")):  # Pillow writes 32-bit "I" as TIFF, not PNG
        wide = Image.fromarray((gray.astype(np.int32) * 256 + noise).astype(np.uint16 if mode == "I;16" else np.int32))
        assert wide.mode == mode
        wide.save(tmp_path / file)
        read = open_image(tmp_path / file)
        assert read.mode == mode  # Pillow keeps the 16 bits
        assert torch.equal(image_to_tensor(read), expected)  # 65535 -> 255, not 255 -> white
    (tmp_path / "rgb16.png").write_bytes(_png_16_bit_rgb(photo_8_bit.astype(np.uint16) * 257))
    assert np.array_equal(np.asarray(to_rgb(open_image(tmp_path / "rgb16.png"))), photo_8_bit)
    (tmp_path / "rgb16.png").write_bytes(_png_16_bit_rgb(photo_8_bit.astype(np.uint16) * 257 + 128))
    rgb16 = open_image(tmp_path / "rgb16.png")  # within one 8-bit level (2/255 in [-1, 1])
    assert (image_to_tensor(rgb16) - image_to_tensor(Image.fromarray(photo_8_bit))).abs().max() <= 2 / 255 + 1e-6
    mask = Image.fromarray((gray >= 128).astype(np.uint16) * 65535)
    assert torch.equal(mask_to_tensor(mask), mask_to_tensor(Image.fromarray((gray >= 128).astype(np.uint8) * 255)))


def test_16_bit_init_image_gives_the_8_bit_result(photo_8_bit, tmp_path, monkeypatch, capsys):
    gray = np.asarray(Image.fromarray(photo_8_bit).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    ldm.save_model(_tiny_model(4), tmp_path / "tiny.safetensors")
    outputs = []
    for name in ("gray8.png", "gray16.png"):
        outdir = tmp_path / name.removesuffix(".png")
        _run_tool("img2img.py", ["--ckpt", str(tmp_path / "tiny.safetensors"), "--init-img", str(tmp_path / name),
                                 "--prompt", PROMPT, "--steps", "2", "--strength", "0.5", "--outdir", str(outdir)],
                  monkeypatch)
        outputs.append(pixels(outdir / "samples" / "00000.png"))
    assert np.array_equal(outputs[0], outputs[1])
    assert outputs[1].mean() < 250  # not near-white


def test_open_image_applies_the_exif_rotation(tmp_path):
    image = Image.new("RGB", (4, 2), "black")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "sideways.jpg", exif=exif)
    assert open_image(tmp_path / "sideways.jpg").size == (2, 4)


# ---------------------------------------------------------------------------------------------------
# output names: claimed atomically, never overwritten


def test_taken_numbers_are_skipped_not_overwritten(tmp_path, monkeypatch, capsys):
    """Another process wrote 00000.png and grid-0000.png after this one counted the files (simulated:
    next_index still answers 0): the new images go to the next free numbers."""
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "00000.png").write_bytes(b"theirs")
    (samples / "00002.png").write_bytes(b"theirs too")
    (tmp_path / "grid-0000.png").write_bytes(b"their grid")
    monkeypatch.setattr(cli_generate, "next_index", lambda folder, pattern: 0)
    ckpt = tmp_path / "tiny.safetensors"
    ldm.save_model(_tiny_model(4), ckpt)
    _run_tool("txt2img.py", ["--ckpt", str(ckpt), "--prompt", PROMPT, "--steps", "1", "--n_samples", "3",
                             "--outdir", str(tmp_path)], monkeypatch)
    assert (samples / "00000.png").read_bytes() == b"theirs"
    assert (samples / "00002.png").read_bytes() == b"theirs too"
    assert (tmp_path / "grid-0000.png").read_bytes() == b"their grid"
    assert sorted(p.name for p in samples.iterdir()) == [f"{n:05d}.png" for n in range(5)]
    assert [int(Image.open(samples / f"{n:05d}.png").text["parameters"].split("Seed: ")[1].split(",")[0])
            for n in (1, 3, 4)] == [42, 43, 44]
    assert pixels(tmp_path / "grid-0001.png").shape == (NATIVE, 3 * NATIVE, 3)
    assert not list(tmp_path.rglob(".*.tmp"))


def test_concurrent_writers_never_share_a_name(tmp_path):
    def write(k: int) -> None:
        for _ in range(5):
            cli_generate.save_numbered(tmp_path, "{:05d}.png", 0, f"writer {k}".encode())

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [f"{n:05d}.png" for n in range(40)]
    contents = [p.read_bytes() for p in files]
    assert sorted(contents) == sorted(f"writer {k}".encode() for k in range(8) for _ in range(5))


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "00000.png").write_bytes(b"old")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_generate.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli_generate.save_numbered(tmp_path, "{:05d}.png", 0, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]
    assert (tmp_path / "00000.png").read_bytes() == b"old"
