"""tools/eval_text_to_image.py: caption retrieval, chance and the copy distance, on stand-in models whose
answer is known (a perfect copier, a prompt-blind model), and the command line on captioned shards."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
from eval_text_to_image import evaluate, features, nearest  # noqa: E402

CAPTIONS = ["red", "green", "blue", "white", "red"]  # "red" twice: chance counts it


def _training_set() -> tuple[torch.Tensor, list[str]]:
    colors = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "white": (1, 1, 1)}
    images = torch.stack([torch.tensor(colors[c], dtype=torch.float32)[:, None, None].expand(3, 8, 8)
                          for c in CAPTIONS]).clone()
    images[4, :, :4] *= 0.5  # the second "red" differs from the first
    return images, CAPTIONS


class _Copier:
    """Returns, for each prompt, the first training image with that caption: retrieval 100%, distance 0."""

    def __init__(self, images, captions):
        self.images, self.captions = images, captions

    def generate(self, prompts, *, n_samples, **kw):
        out = []
        for p in prompts:
            array = (self.images[self.captions.index(p)].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            out += [Image.fromarray(array)] * n_samples
        return out


class _Blind:
    """Ignores the prompt: always the blue image."""

    def generate(self, prompts, *, n_samples, **kw):
        return [Image.new("RGB", (8, 8), (0, 0, 255))] * (len(prompts) * n_samples)


def test_nearest_finds_the_closest_row_and_can_exclude_itself():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    idx, dist = nearest(torch.tensor([[0.9, 0.1], [4.0, 4.0]]), bank)
    assert idx.tolist() == [1, 2] and dist[0].item() == pytest.approx(2 ** 0.5 * 0.1)
    idx, _ = nearest(bank, bank, exclude=torch.arange(3))
    assert idx.tolist() == [1, 0, 1]
    assert features(torch.ones(2, 3, 8, 8), 2).shape == (2, 12)


def test_retrieval_is_perfect_for_a_copier_and_chance_is_the_caption_share():
    images, captions = _training_set()
    result = evaluate(_Copier(images, captions), images, captions, captions=4, seeds=2, scales=[1.0, 5.0], steps=2,
                      sampler="ddim", feature_size=4, seed=0)
    assert sorted(result["prompts"]) == ["blue", "green", "red", "white"]
    assert result["chance"] == pytest.approx(np.mean([2 / 5, 1 / 5, 1 / 5, 1 / 5]))
    for row in result["rows"]:
        assert row["retrieval"] == 1.0 and row["images"] == 8
        assert row["nearest_rms"] == pytest.approx(0.0, abs=1e-6)  # copies sit on the training images
    assert result["train_nearest_rms"] > 0.2  # the training images themselves are far apart


def test_a_prompt_blind_model_scores_only_its_one_caption():
    images, captions = _training_set()
    result = evaluate(_Blind(), images, captions, captions=4, seeds=3, scales=[5.0], steps=2, sampler="ddim",
                      feature_size=4, seed=0)
    assert result["rows"][0]["retrieval"] == pytest.approx(1 / 4)  # right only when the prompt is "blue"


def test_too_many_captions_is_a_clear_error():
    images, captions = _training_set()
    from common.errors import InputError
    with pytest.raises(InputError, match="only 4 distinct captions"):
        evaluate(_Blind(), images, captions, captions=10, seeds=1, scales=[1.0], steps=2, sampler="ddim",
                 feature_size=4, seed=0)


def test_command_line_on_shards(tmp_path):  # the default model
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for k, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
            sink.write({"__key__": f"{k:03d}", "png": buffer.getvalue(), "txt": f"colour {k}"})
    result = subprocess.run([sys.executable, "tools/eval_text_to_image.py", "--data",
                             str(shard), "--captions", "3", "--seeds", "1", "--steps", "2", "--scales", "1", "5",
                             "--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "grid.png"),
                             "--grid-prompts", "a", "b"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| 1 |" in result.stdout and "| 5 |" in result.stdout and "chance" in result.stdout
    assert (tmp_path / "r.json").is_file()
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] == 4 * 128  # 4 columns, labelled cells
