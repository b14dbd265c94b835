"""Prompt adherence during training (ldm/training/evaluation.py, train.eval_* in tools/train_ldm.py): the metrics
against hand and direct computations, the logs of a run, the untouched training RNG, the EMA warm-up, and the
one-line refusals of unfit evaluation settings before the first step."""
from __future__ import annotations

import csv
import json
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_ldm import FAST, one_line_error, shards, train  # noqa: F401  (shards: the module's fixture)
from torch import nn

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import run_cli
from ldm.formats.loading import model_from_training_config
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.evaluation import PromptAdherence, load_classifier, load_clip
from ldm.training.trainable import Trainable

from helpers import REPO

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


class MeanColour(nn.Module):
    """Logits = each channel's mean, so class 0 / 1 / 2 is a red / green / blue dominated image. It also draws
    from torch's RNG (times 0), as a classifier with dropout or noise might: evaluation must not disturb it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(2, 3))
        return mean + 0 * torch.rand_like(mean)


def save_torchscript(module: nn.Module, path) -> str:
    with warnings.catch_warnings():  # torch deprecates TorchScript; the evaluation reads it all the same
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    return save_torchscript(MeanColour(), tmp_path_factory.mktemp("classifier") / "mean_colour.pt")


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    """A tiny open_clip architecture registered under a test name (its 24 px input: the 32 px images get resized),
    and its random weights saved to a file: "tiny-test-clip:PATH"."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "tiny-test-clip.json")
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-test-clip")
    torch.save(model.state_dict(), folder / "weights.bin")
    return f"tiny-test-clip:{folder / 'weights.bin'}"


@pytest.fixture(scope="module")
def tiny_model():
    """configs/ldm/tiny.yaml's model with random weights, and its trainable part."""
    torch.manual_seed(0)
    model = model_from_training_config({**read_yaml(REPO / "configs/ldm/tiny.yaml")["model"],
                                        "random_autoencoder": True}).eval()
    return model, Trainable(model.denoiser, model.text_encoder)


def solid(colour) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def evaluator(prompts, n, *, classifier=None, labels=None, clip=None) -> PromptAdherence:
    return PromptAdherence(prompts, images_per_prompt=n, steps=2, scale=5.0, image_size=32, device=torch.device("cpu"),
                           classifier=classifier, labels=labels, clip=clip)


# --- the metrics ------------------------------------------------------------------------------------------

def test_classifier_accuracy_is_the_share_of_images_of_their_prompts_class(classifier_file):
    classifier = load_classifier(classifier_file, [0, 1, 2], 32, torch.device("cpu"))
    scorer = evaluator(["red", "green", "blue"], 2, classifier=classifier, labels=[0, 1, 2])
    # red: both right; green: green right, blue wrong; blue: red wrong, blue right -> 4 of 6
    images = [solid(RED), solid(RED), solid(GREEN), solid(BLUE), solid(RED), solid(BLUE)]
    assert scorer.score(images) == {"eval_accuracy": pytest.approx(4 / 6, abs=1e-7)}
    scorer.labels = [1, 1, 2]  # now the red prompt's images count as wrong: 2 of 6
    assert scorer.score(images)["eval_accuracy"] == pytest.approx(2 / 6, abs=1e-7)


def test_evaluate_scores_the_ema_images_of_generate_and_restores_everything(classifier_file, tiny_model):
    model, trainable = tiny_model
    prompts, labels, n = ["red apple", "blue heart"], [0, 2], 2
    ema = EMA(trainable, decay=0.9)
    # What generate makes with the EMA weights (the weights as built: no updates yet), seeds 0..n-1 per prompt.
    expected = [image for prompt in prompts for image in
                model.generate([prompt], n_samples=n, seed=0, steps=2, guidance_scale=5.0, height=32, width=32)]
    assert [image.info["seed"] for image in expected] == [0, 1, 0, 1]
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in expected])
    right = MeanColour()(pixels).argmax(dim=1) == torch.tensor(labels).repeat_interleave(n)
    with torch.no_grad():  # the live weights now differ from the EMA's
        for p in trainable.parameters():
            p.add_(0.05 * torch.randn_like(p))
    live = {name: p.detach().clone() for name, p in trainable.named_parameters()}
    trainable.train()
    scorer = evaluator(prompts, n, classifier=load_classifier(classifier_file, labels, 32, torch.device("cpu")),
                       labels=labels)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    metrics = scorer.evaluate(model, trainable, ema)
    assert metrics["eval_accuracy"] == pytest.approx(right.float().mean().item(), abs=1e-7)
    assert metrics["eval_seconds"] > 0 and set(metrics) == {"eval_accuracy", "eval_seconds"}
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert trainable.training and all(torch.equal(p, live[name]) for name, p in trainable.named_parameters())


def test_clip_score_and_accuracy_equal_open_clips_own_computation(clip_spec):
    import open_clip

    arch, path = clip_spec.split(":", 1)
    prompts = ["a red square", "a green square", "a blue square"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    metrics = evaluator(prompts, 2, clip=load_clip(clip_spec, torch.device("cpu"))).score(images)

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_features = model.encode_text(open_clip.get_tokenizer(arch)(prompts))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    cosines = image_features @ text_features.T
    own = torch.tensor([0, 0, 1, 1, 2, 2])
    score = torch.clamp(100 * cosines[torch.arange(6), own], min=0).mean()  # CLIP-S per image, w = 100
    accuracy = (cosines.argmax(dim=1) == own).float().mean()
    assert metrics["eval_clip_score"] == pytest.approx(score.item(), rel=1e-5, abs=1e-5)
    assert metrics["eval_clip_accuracy"] == pytest.approx(accuracy.item(), abs=1e-7)
    assert set(metrics) == {"eval_clip_score", "eval_clip_accuracy"}


# --- in a training run ------------------------------------------------------------------------------------

def rows_of(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_logs_the_evaluation_and_trains_exactly_as_without(shards, classifier_file, tmp_path):  # noqa: F811
    common = [*FAST, "train.eval_steps=2", "train.eval_images_per_prompt=2", "train.eval_prompts=[red apple, blue heart]"]
    result = train("--data", shards, "--out", str(tmp_path / "eval"), "--max-steps", "4", *common, "train.eval_every=2",
                   f"train.eval_classifier={classifier_file}", "train.eval_labels=[0, 2]")
    train("--data", shards, "--out", str(tmp_path / "plain"), "--max-steps", "4", *common)
    assert "evaluation: 2 prompts x 2 images, 2 steps, scale 2 -> eval_accuracy, every 2 steps" in result.stdout
    assert "step 2: eval_accuracy " in result.stdout and "step 4: eval_accuracy " in result.stdout  # one line each
    rows = rows_of(tmp_path / "eval")
    evaluated = [row for row in rows if row["eval_accuracy"]]
    assert [row["step"] for row in evaluated] == ["2", "4"]
    assert all(float(row["eval_accuracy"]) in (0, 0.25, 0.5, 0.75, 1) and float(row["eval_seconds"]) > 0
               for row in evaluated)
    # The same losses with and without the evaluation: it leaves the training's RNG (and weights) alone.
    losses = [(row["step"], row["loss"]) for row in rows if row["loss"]]
    assert losses == [(row["step"], row["loss"]) for row in rows_of(tmp_path / "plain")]
    assert len(losses) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("eval_accuracy")
    assert [e.step for e in scalars] == [2, 4]
    assert [e.value for e in scalars] == pytest.approx([float(row["eval_accuracy"]) for row in evaluated])


# --- the EMA warm-up (train.ema_warmup) ---------------------------------------------------------------------

class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warmup_decay_and_average(warmup):
    module, decay = One(), 0.5
    ema = EMA(module, decay=decay, warmup=warmup)
    shadow = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0]):  # the weight before update n + 1
        expected = min(decay, (1 + n) / (10 + n)) if warmup else decay  # LitEma: 0.1, 2/11, 0.25 with warm-up
        assert ema.current_decay(step=n) == expected
        with torch.no_grad():
            module.w.fill_(value)
        ema.update(module, step=n)
        shadow = expected * shadow + (1 - expected) * value
        assert ema.shadow["w"].item() == pytest.approx(shadow, rel=1e-6)
    assert shadow == pytest.approx(0.25 * (2 / 11 * 0.9 + 9 / 11 * 2) + 0.75 * 3 if warmup else 2.125)


def test_ema_warmup_is_a_train_switch():
    assert TrainConfig.from_dict({}).ema_warmup is True
    assert TrainConfig.from_dict({"ema_warmup": False}).ema_warmup is False
    with pytest.raises(InputError, match="train config: ema_warmup is true or false, got 'no'"):
        TrainConfig.from_dict({"ema_warmup": "no"})


# --- unfit settings: one line, before the first step --------------------------------------------------------

def train_in_process(monkeypatch, capsys, tmp_path, *overrides: str) -> str:
    """tools/train_ldm.py's main under run_cli, in this process (the refusals come before the model is built):
    its one stderr line; nothing of the run is written."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import train_ldm

    monkeypatch.setattr(sys, "argv", ["train_ldm.py", "--config", str(REPO / "configs/ldm/tiny.yaml"), "--data",
                                      str(tmp_path / "unused.tar"), "--out", str(tmp_path / "run"), "--device", "cpu",
                                      *FAST, *overrides])
    with pytest.raises(SystemExit) as exit_:
        run_cli(train_ldm.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "checkpoints").exists()
    return lines[0]


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=5"], "train config: eval_every 5 needs a metric; set eval_classifier (with eval_labels) or "
                             "eval_clip, or eval_every 0"),
    (["train.eval_every=5", "train.eval_classifier=CLASSIFIER", "train.eval_labels=[0, 1]"],
     "train config: eval_labels has 2 entries for 4 eval prompts; give one class index per prompt"),
    (["train.eval_labels=[0, 1, 2, 0]"], "train config: eval_labels are class indices of eval_classifier; set "
                                         "eval_classifier (a TorchScript file) or drop eval_labels"),
    (["train.eval_every=5", "train.eval_classifier=CLASSIFIER", "train.eval_labels=[0, 1, 2, 3]"],
     "train config: eval_labels go up to 3 but eval_classifier CLASSIFIER gives 3 classes; use labels 0 to 2"),
    (["train.eval_every=5", "train.eval_classifier=MISSING", "train.eval_labels=[0, 1, 2, 0]"],
     "train config: eval_classifier file MISSING not found; give a TorchScript classifier saved with torch.jit.save"),
    (["train.eval_every=5", "train.eval_classifier=NOT_TORCHSCRIPT", "train.eval_labels=[0, 1, 2, 0]"],
     "train config: eval_classifier NOT_TORCHSCRIPT is not a TorchScript file ("),
    (["train.eval_every=5", "train.eval_clip=ViT-B-32"], "train config: eval_clip must be ARCH:PATH, an open_clip "
                                                         "architecture and a local weights file"),
    (["train.eval_every=5", "train.eval_clip=ViT-B-32:MISSING"], "train config: eval_clip weights file MISSING not "
                                                                 "found; give a local open_clip weights file for "
                                                                 "ViT-B-32 (nothing is downloaded)"),
    (["train.eval_every=5", "train.eval_clip=ViT-Q-99:MISSING"], "train config: eval_clip architecture 'ViT-Q-99' is "
                                                                 "not an open_clip one"),
])
def test_unfit_evaluation_settings_stop_the_run_with_one_line(monkeypatch, capsys, tmp_path, classifier_file,
                                                              overrides, message):
    (tmp_path / "weights.txt").write_text("not a TorchScript file")
    files = {"CLASSIFIER": classifier_file, "MISSING": str(tmp_path / "missing.pt"),
             "NOT_TORCHSCRIPT": str(tmp_path / "weights.txt")}
    for name, path in files.items():
        overrides = [o.replace(name, path) for o in overrides]
        message = message.replace(name, path)
    assert train_in_process(monkeypatch, capsys, tmp_path, *overrides).startswith(f"error: {message}")


def test_the_command_line_refuses_a_missing_classifier_before_any_step(tmp_path):
    result = train("--data", str(tmp_path / "unused.tar"), "--out", str(tmp_path / "run"), *FAST,
                   "train.eval_every=2", f"train.eval_classifier={tmp_path / 'none.pt'}",
                   "train.eval_labels=[0, 1, 2, 3]", check=False)
    assert one_line_error(result) == (f"error: train config: eval_classifier file {tmp_path / 'none.pt'} not found; "
                                      "give a TorchScript classifier saved with torch.jit.save")
    assert not (tmp_path / "run").exists()


def test_a_classifier_of_the_wrong_shape_is_refused(tmp_path):
    class Flat(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten()

    path = save_torchscript(Flat(), tmp_path / "flat.pt")
    with pytest.raises(InputError, match=r"gives \(3072,\) for a \(1, 3, 32, 32\) image; it must give logits of "
                                         r"shape \(B, C\)"):
        load_classifier(path, [0], 32, torch.device("cpu"))


def test_clip_weights_of_another_architecture_are_refused(clip_spec, tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(InputError, match=r"train config: eval_clip .*other.bin did not load as tiny-test-clip "
                                         r"weights \(.*\); give that architecture's open_clip weights file"):
        load_clip(f"tiny-test-clip:{tmp_path / 'other.bin'}", torch.device("cpu"))
