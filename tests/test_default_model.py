"""The embedded default model (ldm/weights/default.safetensors): it ships, loads with no path, is the model
its card documents, and draws what the prompt says."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

import ldm
from common.checkpoint import read_checkpoint
from ldm.formats.loading import DEFAULT_MODEL

from helpers import REPO

CARD = DEFAULT_MODEL.parent / "README.md"


@pytest.fixture(scope="module")
def model():
    return ldm.load_model()


def _documented(field: str) -> str:
    match = re.search(rf"^- {field}: `([^`]+)`", CARD.read_text(), re.MULTILINE)
    assert match, f"{CARD} documents no {field}"
    return match.group(1)


def test_weights_ship_under_the_size_limit_with_the_documented_hash():
    assert DEFAULT_MODEL.is_file()
    assert DEFAULT_MODEL.stat().st_size < 60 * 2**20
    assert hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == _documented("sha256")
    readme = (REPO / "README.md").read_text()
    assert _documented("sha256")[:12] in readme  # the README names the same file
    for credit in ("Twemoji", "CC-BY 4.0", "Noto Emoji", "Apache 2.0"):
        assert credit in CARD.read_text() and credit in readme


def test_config_is_the_documented_recipe(model):
    recipe = yaml.safe_load((REPO / "configs/ldm/emoji.yaml").read_text())["model"]
    config = model.config
    for key, value in recipe["denoiser"].items():
        assert config.to_dict()["denoiser"][key] == value, key
    for key, value in recipe["text_encoder"].items():
        assert getattr(config.text_encoder, key) == value, key
    for key, value in recipe["diffusion"].items():
        assert getattr(config, key) == value, key
    ae = yaml.safe_load((REPO / "configs/autoencoder/emoji.yaml").read_text())["model"]
    for key, value in ae.items():
        if key != "scale_factor":
            actual = getattr(config.autoencoder, key)
            assert (list(actual) if isinstance(actual, tuple) else actual) == value, key
    assert config.autoencoder.scale_factor == pytest.approx(float(_documented("scale_factor")))
    _, metadata = read_checkpoint(DEFAULT_MODEL)
    assert metadata.get("ema") == "true"  # the EMA weights ship
    assert model.text_encoder is not None and model.denoiser is not None
    assert sum(p.numel() for p in model.parameters()) == int(_documented("parameters").replace(",", ""))


def test_native_size_and_determinism(model):
    a = model.generate("red apple", steps=10, seed=3)[0]
    b = model.generate("red apple", steps=10, seed=3)[0]
    assert a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _mean_rgb(images: list[Image.Image]) -> np.ndarray:
    """Mean colour of the non-white (drawn) pixels."""
    pixels = np.concatenate([np.asarray(i, dtype=np.float32).reshape(-1, 3) for i in images])
    drawn = pixels[pixels.min(axis=1) < 200]
    return drawn.mean(axis=0)


def test_different_prompts_give_clearly_different_images(model):
    apples = model.generate("red apple", n_samples=4, seed=0, steps=25, guidance_scale=5.0)
    hearts = model.generate("blue heart", n_samples=4, seed=0, steps=25, guidance_scale=5.0)  # the same noise
    a = np.stack([np.asarray(i, dtype=np.float32) for i in apples])
    h = np.stack([np.asarray(i, dtype=np.float32) for i in hearts])
    assert np.abs(a - h).mean() > 20  # levels of 255, per pixel: not a variation of one image
    red, blue = _mean_rgb(apples), _mean_rgb(hearts)
    assert red[0] > red[2] + 40  # the apple is red
    assert blue[2] > blue[0] + 40  # the heart is blue


def test_txt2img_runs_the_default_model(tmp_path):
    result = subprocess.run([sys.executable, "tools/txt2img.py", "--prompt", "red apple", "--outdir", str(tmp_path),
                             "--steps", "20", "--seed", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    (image,) = sorted((tmp_path / "samples").glob("*.png"))
    png = Image.open(image)
    assert png.size == (32, 32)
    assert "red apple" in png.text["parameters"] and _documented("sha256")[:10] in png.text["parameters"]
