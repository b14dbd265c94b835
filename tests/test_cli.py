"""txt2img.py / img2img.py end to end on a tiny random model, and the pipeline behind them.

The model is random, so these tests check the plumbing (files, numbering, metadata, seeds, sizes,
masks, error messages), not image quality. Each subprocess costs ~5-8 s of import and load on 2
CPU cores, so each run serves several checks; the rest runs in-process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.cli import run_cli
from ldm.images import image_to_tensor, to_uint8

from helpers import REPO, TINY_AE, reference_dir, write_real_images

UNET = {"type": "unet", "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "context_dim": 64,
        "use_linear_in_transformer": True}
TEXT = {"kind": "small", "width": 64, "layers": 2, "heads": 4}
# TINY_AE has ch_mult (1, 2): f = 2, and image_size 16 latents -> native 32x32 images.
FACTOR, NATIVE = 2, 32
PROMPT, NEGATIVE = "a red apple on a table", "blurry"


def _tiny_model(in_channels: int) -> ldm.LatentDiffusion:
    # scale_factor 3: about 1/std of this random autoencoder's latents (what tools/compute_scale_factor.py
    # measures). With SD's 0.18215 the latents would be ~0.06 in std and img2img noise would swamp them.
    autoencoder = dataclasses.replace(TINY_AE, scale_factor=3.0)
    config = ldm.LDMConfig(autoencoder=autoencoder, parameterization="v", denoiser={**UNET, "in_channels": in_channels},
                           text_encoder=TEXT, image_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ldm.LatentDiffusion(config)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A full text-to-image checkpoint (ours: config inside), random weights."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ldm.save_model(_tiny_model(4), path)
    return path


@pytest.fixture(scope="session")
def tiny_inpaint_ckpt(tmp_path_factory) -> Path:
    """The same with a 9-channel SD-inpainting-style UNet input (latent, mask, masked-image latent)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-inpaint.safetensors"
    ldm.save_model(_tiny_model(9), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt) -> ldm.LatentDiffusion:
    return ldm.load_model(tiny_ckpt)


def cli(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------
# txt2img end to end


@pytest.fixture(scope="module")
def batch_run(tiny_ckpt, tmp_path_factory):
    """--n_iter 2 --n_samples 2: two iterations of one batch of 2 images each."""
    outdir = tmp_path_factory.mktemp("batch_run")
    result = cli("txt2img.py", "--ckpt", tiny_ckpt, "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
                 "--n_iter", 2, "--n_samples", 2, "--steps", 2, "--sampler", "euler_a", "--outdir", outdir)
    assert result.returncode == 0, result.stderr
    return outdir, result


@pytest.fixture(scope="module")
def file_run(tiny_ckpt, tmp_path_factory):
    """--from-file with two prompts (and blank lines), --n_samples 2, every image sampled alone.
    Run in-process (the script's own code through runpy) to save a process start."""
    outdir = tmp_path_factory.mktemp("file_run")
    prompts = outdir.parent / f"{outdir.name}-prompts.txt"
    prompts.write_text(f"\n{PROMPT}\n\n   \na lighthouse at dusk\n\n", encoding="utf-8")
    argv = sys.argv
    sys.argv = ["tools/txt2img.py", "--ckpt", str(tiny_ckpt), "--from-file", str(prompts), "--negative_prompt",
                NEGATIVE, "--n_samples", "2", "--batch_size", "1", "--steps", "2", "--sampler", "euler_a",
                "--outdir", str(outdir)]
    try:
        runpy.run_path(str(REPO / "tools" / "txt2img.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return outdir


def test_txt2img_files_seeds_and_grids(batch_run):
    outdir, result = batch_run
    samples = sorted(p.name for p in (outdir / "samples").iterdir())
    assert samples == ["00000.png", "00001.png", "00002.png", "00003.png"]
    seeds = [json.loads(png_text(outdir / "samples" / name)["ldm"])["seed"] for name in samples]
    assert seeds == [42, 43, 44, 45]
    assert sorted(p.name for p in outdir.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    for grid_path, first in (("grid-0000.png", 0), ("grid-0001.png", 2)):
        grid = pixels(outdir / grid_path)
        assert grid.shape == (NATIVE, 2 * NATIVE, 3)  # 1 row x 2 columns (one prompt, 2 samples)
        left, right = (pixels(outdir / "samples" / f"{first + k:05d}.png") for k in (0, 1))
        assert np.array_equal(grid[:, :NATIVE], left) and np.array_equal(grid[:, NATIVE:], right)
        with Image.open(outdir / grid_path) as image:  # the grid carries its first image's parameters
            with Image.open(outdir / "samples" / f"{first:05d}.png") as sample:
                assert image.text["parameters"] == sample.text["parameters"]
    images = [pixels(outdir / "samples" / name) for name in samples]
    assert all(a.shape == (NATIVE, NATIVE, 3) for a in images)
    assert all(not np.array_equal(images[0], other) for other in images[1:])  # seeds matter
    assert f"wrote 4 images to {outdir / 'samples'}" in result.stdout
    assert "Traceback" not in result.stderr


def test_png_metadata(batch_run, tiny_ckpt):
    outdir, _ = batch_run
    text = png_text(outdir / "samples" / "00002.png")
    model_hash = sha10(tiny_ckpt)
    assert text["parameters"] == (f"{PROMPT}\nNegative prompt: {NEGATIVE}\nSteps: 2, Sampler: euler_a, CFG scale: 7.5, "
                                  f"Seed: 44, Size: {NATIVE}x{NATIVE}, Model hash: {model_hash}")
    assert json.loads(text["ldm"]) == {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 44, "steps": 2,
                                       "sampler": "euler_a", "scale": 7.5, "eta": 0.0, "width": NATIVE,
                                       "height": NATIVE, "model_hash": model_hash}


def test_from_file(file_run):
    samples = sorted((file_run / "samples").iterdir())
    records = [json.loads(png_text(p)["ldm"]) for p in samples]
    assert [(r["prompt"], r["seed"]) for r in records] == [(PROMPT, 42), (PROMPT, 43), ("a lighthouse at dusk", 44),
                                                           ("a lighthouse at dusk", 45)]
    assert sorted(p.name for p in file_run.glob("grid-*.png")) == ["grid-0000.png"]
    assert pixels(file_run / "grid-0000.png").shape == (2 * NATIVE, 2 * NATIVE, 3)  # 2 prompts (rows) x 2 samples


def test_batch_member_matches_single_run(batch_run, file_run):
    """Image k of a batch is image seed 42+k sampled alone (file_run samples every image alone).

    Not byte-exact: CPU convolutions and matmuls round differently at another batch size (~1e-6),
    which after rounding to uint8 flips an occasional value by one level.
    """
    outdir, _ = batch_run
    for k in (0, 1):
        batched = pixels(outdir / "samples" / f"{k:05d}.png").astype(int)
        alone = pixels(file_run / "samples" / f"{k:05d}.png").astype(int)
        assert np.abs(batched - alone).max() <= 2
        assert (batched != alone).mean() < 0.01


def test_reproduce_from_metadata_continues_numbering(tiny_ckpt, tmp_path):
    """A second run with the arguments read back from an image's metadata: same args, so the same
    file byte for byte; numbered after the first, which stays untouched; --no-grid writes no grid."""
    outdir = tmp_path / "out"
    first_args = ["--prompt", "a lighthouse at dusk", "--negative_prompt", "fog", "--seed", "1234", "--steps", "2",
                  "--sampler", "dpmpp_2m_karras", "--scale", "5.0", "--ddim_eta", "0.0", "--H", "32", "--W", "32",
                  "--n_samples", "1", "--no-grid"]
    result = cli("txt2img.py", "--ckpt", tiny_ckpt, "--outdir", outdir, *first_args)
    assert result.returncode == 0, result.stderr
    first = outdir / "samples" / "00000.png"
    first_bytes = first.read_bytes()
    record = json.loads(png_text(first)["ldm"])
    assert record["model_hash"] == sha10(tiny_ckpt)
    again_args = ["--prompt", record["prompt"], "--negative_prompt", record["negative_prompt"], "--seed",
                  str(record["seed"]), "--steps", str(record["steps"]), "--sampler", record["sampler"], "--scale",
                  str(record["scale"]), "--ddim_eta", str(record["eta"]), "--H", str(record["height"]), "--W",
                  str(record["width"]), "--n_samples", "1", "--no-grid"]
    assert again_args == first_args  # the metadata holds every argument that shapes the image
    result = cli("txt2img.py", "--ckpt", tiny_ckpt, "--outdir", outdir, *again_args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (outdir / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert first.read_bytes() == first_bytes  # never overwritten
    assert (outdir / "samples" / "00001.png").read_bytes() == first_bytes  # pixels and metadata
    assert not list(outdir.glob("grid-*.png"))


# ---------------------------------------------------------------------------------------------------
# in-process: samplers, prompts, img2img, inpainting, out of memory


@pytest.mark.parametrize("sampler", list(ldm.samplers.SAMPLERS))
def test_every_sampler(tiny_model, sampler):
    first = tiny_model.generate(PROMPT, steps=2, sampler=sampler, seed=7)[0]
    assert first.size == (NATIVE, NATIVE)
    assert np.asarray(first).std() > 0
    assert first.info["seed"] == 7 and first.info["prompt"] == PROMPT
    if sampler in ("ddpm", "euler_a"):  # ancestral: their fresh noise comes from the seed too
        again = tiny_model.generate(PROMPT, steps=2, sampler=sampler, seed=7)[0]
        assert np.array_equal(np.asarray(first), np.asarray(again))


def test_prompt_seed_and_negative_prompt_matter(tiny_model):
    def image(**kw):
        return np.asarray(tiny_model.generate(**{"prompts": PROMPT, "steps": 2, "seed": 1, **kw})[0]).astype(int)

    base = image()
    for changed in (image(prompts="a blue car"), image(seed=2), image(negative_prompt=NEGATIVE)):
        assert np.abs(changed - base).mean() > 1.0


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Image.Image:
    path = write_real_images(tmp_path_factory.mktemp("photo"), 1, size=NATIVE)[0]
    with Image.open(path) as image:
        return image.convert("RGB")


def test_img2img_strength(tiny_model, photo):
    """Low strength stays near the input, strength 1 moves far. Measured against the autoencoder's own
    reconstruction of the input (what strength -> 0 gives): a random autoencoder does not reproduce
    its input, so the distance to the input itself is large at any strength."""
    with torch.no_grad():
        latent = tiny_model.encode_images(image_to_tensor(photo), sample=False)
        reconstruction = to_uint8(tiny_model.decode_latents(latent))[0].astype(float)

    def moved(strength):
        out = tiny_model.generate(PROMPT, init_image=photo, strength=strength, steps=5, seed=3)[0]
        assert out.size == photo.size
        return np.abs(np.asarray(out).astype(float) - reconstruction).mean()

    low, high = moved(0.2), moved(1.0)
    assert low < 0.5 * high, (low, high)


def _half_mask(size: tuple[int, int]) -> Image.Image:
    """Black (keep) left part, white (repaint) right part."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2:] = 255
    return Image.fromarray(mask, "L")


def test_inpainting_unet_9_channels(tiny_inpaint_ckpt, photo):
    model = ldm.load_model(tiny_inpaint_ckpt)
    seen_channels = []
    model.denoiser.register_forward_pre_hook(lambda module, args: seen_channels.append(args[0].shape[1]))
    mask = _half_mask(photo.size)
    out = np.asarray(model.generate(PROMPT, init_image=photo, mask=mask, steps=2, seed=3)[0]).astype(int)
    keep = np.asarray(mask) < 128
    original = np.asarray(photo).astype(int)
    assert set(seen_channels) == {9}  # latent + mask + masked-image latent
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).mean() > 5


def test_inpainting_unet_is_read_from_the_config_and_needs_a_mask(tiny_inpaint_ckpt, tiny_model, photo):
    model = ldm.load_model(tiny_inpaint_ckpt)
    assert model.concat_channels == 5 and tiny_model.concat_channels == 0  # in_channels 9 vs 4 latent channels
    for kwargs in ({}, {"init_image": photo}):  # text-to-image and img2img have no mask to give it
        with pytest.raises(ldm.InputError, match="takes 5 extra input channels .concat. but 0 were given"):
            model.generate(PROMPT, steps=2, seed=3, **kwargs)


def test_oom_splits_the_batch(tiny_model, monkeypatch):
    decode = tiny_model.decode_latents
    batch_sizes = []

    def decode_oom_above_one(latents):
        batch_sizes.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return decode(latents)

    monkeypatch.setattr(tiny_model, "decode_latents", decode_oom_above_one)
    images = tiny_model.generate(PROMPT, n_samples=4, batch_size=4, steps=1, guidance_scale=1.0, seed=42)
    assert batch_sizes == [4, 2, 1, 1, 1, 1]  # halved until it fits, then kept there
    assert [image.info["seed"] for image in images] == [42, 43, 44, 45]
    monkeypatch.setattr(tiny_model, "decode_latents", decode)
    alone = tiny_model.generate(PROMPT, n_samples=4, batch_size=1, steps=1, guidance_scale=1.0, seed=42)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, alone))


def test_oom_for_one_image_is_a_clean_error(tiny_model, monkeypatch, capsys):
    def sample_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(tiny_model, "sample", sample_oom)
    with pytest.raises(ldm.InputError, match=r"--vae-tiling.*--precision"):
        tiny_model.generate(PROMPT, n_samples=2, steps=1, seed=1)
    # Through the command-line wrapper: exit 2, one line.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: tiny_model.generate(PROMPT, steps=1, seed=1))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: out of memory even for one image") and err.count("\n") == 1


def test_run_cli_out_of_memory(capsys):
    def main():
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: out of memory") and "--vae-tiling" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# img2img end to end


def test_img2img_inpainting_with_resize(tiny_ckpt, tmp_path):
    """A 37x45 image is resized to 36x44 (multiple of 4: f=2 x the UNet's 2) with a note; the black (keep) part
    of the mask comes back pixel for pixel, the white part is repainted."""
    source = write_real_images(tmp_path / "src", 1, size=48)[0]
    with Image.open(source) as image:
        init = image.convert("RGB").resize((37, 45), Image.BICUBIC)
    init.save(tmp_path / "init.png")
    _half_mask(init.size).save(tmp_path / "mask.png")
    outdir = tmp_path / "out"
    result = cli("img2img.py", "--ckpt", tiny_ckpt, "--init-img", tmp_path / "init.png",
                 "--mask", tmp_path / "mask.png", "--prompt", PROMPT, "--strength", 0.8, "--steps", 2, "--seed", 5,
                 "--outdir", outdir)
    assert result.returncode == 0, result.stderr
    assert "resized the init image from 37x45 to 36x44 (a multiple of 4)" in result.stdout  # f 2 x UNet 2
    out_path = outdir / "samples" / "00000.png"
    out = pixels(out_path).astype(int)
    assert out.shape == (44, 36, 3)
    # what the script feeds the pipeline: the same resize of image and mask
    expected = np.asarray(init.resize((36, 44), Image.LANCZOS)).astype(int)
    keep = np.asarray(_half_mask((37, 45)).resize((36, 44), Image.NEAREST)) < 128
    assert 0 < keep.mean() < 1
    assert np.array_equal(out[keep], expected[keep])
    assert np.abs(out[~keep] - expected[~keep]).mean() > 5
    record = json.loads(png_text(out_path)["ldm"])
    assert (record["strength"], record["width"], record["height"], record["seed"]) == (0.8, 36, 44, 5)
    assert not list(outdir.glob("grid-*.png"))  # one image: no grid


# ---------------------------------------------------------------------------------------------------
# bad input: one line `error: ...` on stderr, exit code 2, no traceback, nothing written


@pytest.fixture
def bad_files(tmp_path, tiny_model) -> dict[str, Path]:
    files = {"out": tmp_path / "out", "missing": tmp_path / "nope.safetensors",
             "corrupt": tmp_path / "corrupt.safetensors", "ae": tmp_path / "ae.safetensors",
             "empty_prompts": tmp_path / "prompts.txt", "init": tmp_path / "init.png",
             "small_mask": tmp_path / "mask.png", "unreadable": tmp_path / "broken.png"}
    files["corrupt"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["empty_prompts"].write_text("\n  \n\n", encoding="utf-8")
    Image.new("RGB", (37, 45), "gray").save(files["init"])
    Image.new("L", (10, 10), 255).save(files["small_mask"])
    files["unreadable"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return files


def run_in_process(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [f"tools/{script}", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / script), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, expected: str, prefix: str = "error: ") -> None:
    lines = [line for line in err.splitlines() if line.strip()]  # tqdm's bar may come first, on its own line
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(prefix), err
    assert sum("error:" in line for line in lines) == 1, err
    assert expected in lines[-1], err


CKPT = ["--ckpt", "{ckpt}", "--outdir", "{out}", "--steps", "2"]
BAD_INPUTS = {  # name: (script, arguments, part of the message)
    "size not a multiple of f": ("txt2img.py", CKPT + ["--prompt", "a", "--H", "33"],
                                 "height 33 is not a multiple of 4; use 32 or 36"),  # f 2 x UNet 2
    "too many steps": ("txt2img.py", CKPT + ["--prompt", "a", "--steps", "5000"], "from 1 to 1000"),
    "negative scale": ("txt2img.py", CKPT + ["--prompt", "a", "--scale", "-1"], "--scale must be >= 0, got -1"),
    "no prompt": ("txt2img.py", CKPT, "give either --prompt or --from-file"),
    "prompt and file": ("txt2img.py", CKPT + ["--prompt", "a", "--from-file", "{empty_prompts}"],
                        "give either --prompt or --from-file"),
    "empty prompt file": ("txt2img.py", CKPT + ["--from-file", "{empty_prompts}"], "has no prompts"),
    "missing checkpoint": ("txt2img.py", ["--ckpt", "{missing}", "--outdir", "{out}", "--prompt", "a"],
                           "checkpoint not found"),
    "corrupt checkpoint": ("txt2img.py", ["--ckpt", "{corrupt}", "--outdir", "{out}", "--prompt", "a"],
                           "not a readable safetensors file"),
    "autoencoder only": ("txt2img.py", ["--ckpt", "{ae}", "--outdir", "{out}", "--prompt", "a"],
                         "text-to-image needs a full latent diffusion model"),
    "fp16 on the cpu": ("txt2img.py", CKPT + ["--prompt", "a", "--device", "cpu", "--precision", "fp16"],
                        "fp16 is for GPUs"),
    "init image missing": ("img2img.py", CKPT + ["--prompt", "a", "--init-img", "{missing}"], "init image not found"),
    "init image unreadable": ("img2img.py", CKPT + ["--prompt", "a", "--init-img", "{unreadable}"],
                              "cannot read init image"),
    "mask of another size": ("img2img.py", CKPT + ["--prompt", "a", "--init-img", "{init}", "--mask", "{small_mask}"],
                             "the mask is 10x10 but the init image is 37x45"),
    "strength 0": ("img2img.py", CKPT + ["--prompt", "a", "--init-img", "{init}", "--strength", "0"],
                   "--strength must be in (0, 1], got 0.0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, bad_files, tiny_ckpt, tiny_model, monkeypatch, capsys):
    script, args, expected = BAD_INPUTS[case]
    if case == "autoencoder only":
        ldm.save_autoencoder(tiny_model.autoencoder, bad_files["ae"])
    paths = {**{name: str(path) for name, path in bad_files.items()}, "ckpt": str(tiny_ckpt)}
    code, err = run_in_process(script, [arg.format(**paths) for arg in args], monkeypatch, capsys)
    assert_one_line_error(code, err, expected)
    assert not list(bad_files["out"].rglob("*.png"))


def test_unknown_sampler_is_argparse_error(tiny_ckpt, monkeypatch, capsys):
    code, err = run_in_process("txt2img.py", ["--ckpt", str(tiny_ckpt), "--prompt", "a", "--sampler", "nope"],
                               monkeypatch, capsys)
    assert_one_line_error(code, err, "invalid choice: 'nope'", prefix="txt2img.py: error: argument --sampler")


def test_config_that_does_not_fit(tiny_ckpt, tmp_path, monkeypatch, capsys):
    config = reference_dir("tiny-sd2") / "config.yaml"
    code, err = run_in_process("txt2img.py", ["--ckpt", str(tiny_ckpt), "--config", str(config), "--prompt", "a",
                                              "--outdir", str(tmp_path)], monkeypatch, capsys)
    assert_one_line_error(code, err, "does not fit the config")


def test_missing_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ldm.formats.loading, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    code, err = run_in_process("txt2img.py", ["--prompt", "a", "--outdir", str(tmp_path)], monkeypatch, capsys)
    assert_one_line_error(code, err, "the embedded default model is missing")


def test_bad_input_in_a_real_process(tiny_ckpt, tmp_path):
    result = cli("txt2img.py", "--ckpt", tiny_ckpt, "--prompt", "a", "--steps", "0", "--outdir", tmp_path)
    assert result.stderr == "error: --steps must be >= 1, got 0\n"
    assert result.returncode == 2 and result.stdout == ""


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for code a malicious checkpoint would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker, control_marker = tmp_path / "pwned", tmp_path / "control"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _CreatesFile(marker)}, tmp_path / "evil.ckpt")
    torch.save({"payload": _CreatesFile(control_marker)}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)["payload"].close()
    assert control_marker.exists()  # the payload is live: a plain unpickler runs it
    result = cli("txt2img.py", "--ckpt", tmp_path / "evil.ckpt", "--prompt", "a", "--outdir", tmp_path / "out")
    assert_one_line_error(result.returncode, result.stderr, "refusing to load")
    assert "Nothing was executed" in result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# speed options: --channels-last, --compile


def _txt2img_pixels(tiny_ckpt, outdir: Path, *extra: str) -> np.ndarray:
    argv = sys.argv
    sys.argv = ["tools/txt2img.py", "--ckpt", str(tiny_ckpt), "--prompt", PROMPT, "--steps", "3",
                "--n_samples", "2", "--no-grid", "--outdir", str(outdir), *extra]
    try:
        runpy.run_path(str(REPO / "tools" / "txt2img.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return np.stack([pixels(p) for p in sorted((outdir / "samples").glob("*.png"))]).astype(int)


def test_channels_last_gives_the_same_images(tiny_ckpt, tmp_path):
    plain = _txt2img_pixels(tiny_ckpt, tmp_path / "plain")
    channels_last = _txt2img_pixels(tiny_ckpt, tmp_path / "cl", "--channels-last")
    assert plain.shape == (2, NATIVE, NATIVE, 3)
    assert np.abs(plain - channels_last).max() <= 1  # float32 rounding may move a pixel by one level


def test_compile_without_a_compiler_is_a_clean_error(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    code, err = run_in_process("txt2img.py", ["--ckpt", str(tiny_ckpt), "--prompt", "a", "--compile", "--device",
                                              "cpu", "--outdir", str(tmp_path)], monkeypatch, capsys)
    assert_one_line_error(code, err, "--compile on the CPU needs a C++ compiler")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--compile"], ["--compile", "reduce-overhead"], ["--fuse-qkv", "--compile"]])
def test_compile_gives_the_same_images(tiny_ckpt, tmp_path, flags):
    """torch.compile (inductor, a C++ compiler on the CPU): about a minute of compiling each. On the
    CPU reduce-overhead records no CUDA graphs but runs the same wrapper; fused attention layers
    trace their separate projections."""
    plain = _txt2img_pixels(tiny_ckpt, tmp_path / "plain")
    compiled = _txt2img_pixels(tiny_ckpt, tmp_path / "compiled", *flags)
    assert np.abs(plain - compiled).max() <= 1


def test_fuse_qkv_gives_the_same_images(tiny_ckpt, tmp_path):
    plain = _txt2img_pixels(tiny_ckpt, tmp_path / "plain")
    fused = _txt2img_pixels(tiny_ckpt, tmp_path / "fused", "--fuse-qkv")
    assert np.abs(plain - fused).max() <= 1


def _cuda_graph_stand_in(fn, mode):
    """What a CUDA graph replay does with its output: write it into one static buffer, return that."""
    assert mode == "reduce-overhead"
    static: list[torch.Tensor] = []

    def replay(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not static:
            static.append(torch.empty_like(out))
        return static[0].copy_(out)

    return replay


def test_compile_reduce_overhead_copies_each_cuda_graph_output(tiny_ckpt, monkeypatch):
    """--compile reduce-overhead: PLMS without guidance keeps raw past outputs, which a replayed CUDA
    graph would overwrite; compile_denoiser marks each step and hands back a copy. Here torch.compile
    is the stand-in above (real CUDA graphs need a GPU), and the test shows the stand-in does corrupt
    the images when the output is not copied."""
    from ldm.cli.generate import compile_denoiser

    def load():  # read as an eps model: PLMS then keeps the network's own outputs (v is converted first)
        model = ldm.load_model(tiny_ckpt)
        model.config = dataclasses.replace(model.config, parameterization="eps")
        return model

    def images(model):
        return np.stack([np.asarray(im, dtype=int) for im in
                         model.generate("a red circle", steps=4, sampler="plms", guidance_scale=1.0, seed=3)])

    expected = images(load())
    raw = load()
    raw.denoiser.forward = _cuda_graph_stand_in(raw.denoiser.forward, "reduce-overhead")
    assert np.abs(images(raw) - expected).max() > 10  # the stand-in bites

    marks = []
    monkeypatch.setattr(torch, "compile", _cuda_graph_stand_in)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = load()
    compile_denoiser(model, "reduce-overhead")
    keys = list(model.state_dict())
    assert np.array_equal(images(model), expected)
    assert len(marks) == 5 and list(model.state_dict()) == keys  # one per call: PLMS makes 2 at its first step


def test_unknown_compile_mode_is_refused(tiny_model):
    from ldm.cli.generate import compile_denoiser

    with pytest.raises(ldm.InputError, match="compile mode 'fast' is unknown; choose one of"):
        compile_denoiser(tiny_model, "fast")
