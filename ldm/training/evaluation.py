"""Prompt adherence during training: do the EMA weights draw what the prompts say? (tools/train_ldm.py, issue #20)

Every `train.eval_every` steps rank 0 generates `eval_images_per_prompt` images for each eval prompt, from seeds
0 .. n-1 (the same noise for every prompt, so the prompts differ only in their text), and scores them with

- a classifier (`eval_classifier`, TorchScript: images (B, 3, H, W) in [0, 1] at the training size -> logits
  (B, C)) and each prompt's class (`eval_labels`): `eval_accuracy`, the share of images whose argmax is their
  prompt's class;
- a CLIP model (`eval_clip`: "ARCH:PATH", an open_clip architecture and a local weights file):
  `eval_clip_score`, the mean over images of max(100 cos(image, its prompt), 0) (CLIP-S, Hessel et al. 2021,
  eq. 1, with torchmetrics' w = 100; torchmetrics' CLIPScore clamps the mean instead of each image, the same
  unless a cosine is negative), and `eval_clip_accuracy`, the share of images whose most similar eval prompt is
  their own (zero-shot classification over the prompts, Radford et al. 2021, sec. 3.1.2).

The images are the 8-bit ones `generate` returns, as the sample grids show them. The evaluation does no
collective operation (other ranks go on to the next step's all-reduce and wait there), and it restores the
RNG states it finds, so a run's training numbers are the same with evaluation on or off.
"""
from __future__ import annotations

import contextlib
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import ldm.pipeline  # noqa: F401  (it attaches LatentDiffusion.generate)
from common.errors import InputError
from ldm.model import LatentDiffusion
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA

CHUNK = 64  # images per classifier / CLIP forward pass


@dataclass
class Clip:
    """An open_clip model with its eval transform (PIL image -> normalised tensor) and tokenizer."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


class PromptAdherence:
    """The eval prompts' images and their scores; the scorers are loaded (and checked) when it is built."""

    def __init__(self, prompts: Sequence[str], *, images_per_prompt: int, steps: int, scale: float, image_size: int,
                 device: torch.device, classifier: nn.Module | None = None, labels: Sequence[int] | None = None,
                 clip: Clip | None = None):
        self.prompts, self.images_per_prompt = list(prompts), images_per_prompt
        self.steps, self.scale, self.image_size, self.device = steps, scale, image_size, device
        self.classifier, self.labels, self.clip = classifier, labels, clip

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device) -> PromptAdherence:
        """The `train` section's evaluation; a missing or unfit classifier or CLIP file is a one-line InputError
        now, before any training step."""
        prompts = cfg.sample_prompts if cfg.eval_prompts is None else cfg.eval_prompts
        classifier = (load_classifier(cfg.eval_classifier, cfg.eval_labels, cfg.image_size, device)
                      if cfg.eval_classifier else None)
        return cls(prompts, images_per_prompt=cfg.eval_images_per_prompt,
                   steps=cfg.sample_steps if cfg.eval_steps is None else cfg.eval_steps,
                   scale=cfg.sample_scale if cfg.eval_scale is None else cfg.eval_scale, image_size=cfg.image_size,
                   device=device, classifier=classifier, labels=cfg.eval_labels,
                   clip=load_clip(cfg.eval_clip, device) if cfg.eval_clip else None)

    def describe(self) -> str:
        metrics = [*(["eval_accuracy"] if self.classifier is not None else []),
                   *(["eval_clip_score", "eval_clip_accuracy"] if self.clip is not None else [])]
        return (f"evaluation: {len(self.prompts)} prompts x {self.images_per_prompt} images, {self.steps} steps, "
                f"scale {self.scale:g} -> {', '.join(metrics)}")

    def evaluate(self, model: LatentDiffusion, trainable: nn.Module, ema: EMA) -> dict[str, float]:
        """The metrics of the EMA weights (loaded into `trainable` meanwhile), and eval_seconds."""
        start = time.perf_counter()
        with training_rng_kept(self.device), ema.applied_to(trainable):
            was_training = trainable.training
            trainable.eval()
            try:
                images = self.generate(model)
            finally:
                trainable.train(was_training)
            metrics = self.score(images)
        return {**metrics, "eval_seconds": time.perf_counter() - start}

    def generate(self, model: LatentDiffusion) -> list[Image.Image]:
        """The images, prompt by prompt (the order of `score`): seeds 0 .. n-1 for each."""
        images = []
        for prompt in self.prompts:
            images += model.generate([prompt], n_samples=self.images_per_prompt, seed=0, steps=self.steps,
                                     guidance_scale=self.scale, height=self.image_size, width=self.image_size)
        return images

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image]) -> dict[str, float]:
        """The metrics of `images`: `images_per_prompt` for each prompt in turn."""
        if len(images) != len(self.prompts) * self.images_per_prompt:
            raise ValueError(f"{len(images)} images for {len(self.prompts)} prompts x {self.images_per_prompt}")
        prompt_of = torch.arange(len(self.prompts), device=self.device).repeat_interleave(self.images_per_prompt)
        metrics = {}
        if self.classifier is not None:
            pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
            logits = torch.cat([self.classifier(chunk.to(self.device).permute(0, 3, 1, 2).float() / 255)
                                for chunk in pixels.split(CHUNK)])
            labels = torch.tensor(self.labels, device=self.device)[prompt_of]
            metrics["eval_accuracy"] = (logits.argmax(dim=1) == labels).float().mean().item()
        if self.clip is not None:
            cosines = clip_cosines(self.clip, images, self.prompts, self.device)  # (images, prompts)
            own = cosines[torch.arange(len(images), device=self.device), prompt_of]
            metrics["eval_clip_score"] = (100 * own).clamp(min=0).mean().item()
            metrics["eval_clip_accuracy"] = (cosines.argmax(dim=1) == prompt_of).float().mean().item()
        return metrics


def clip_cosines(clip: Clip, images: Sequence[Image.Image], prompts: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """Cosine similarity (images, prompts) of CLIP's image and text embeddings."""
    image_features = torch.cat([clip.model.encode_image(torch.stack([clip.preprocess(image) for image in
                                                                     images[start:start + CHUNK]]).to(device))
                                for start in range(0, len(images), CHUNK)])
    text_features = clip.model.encode_text(clip.tokenizer(list(prompts)).to(device))
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


@contextlib.contextmanager
def training_rng_kept(device: torch.device) -> Iterator[None]:
    """Torch's CPU RNG (and this CUDA device's), Python's and NumPy's as they were before: what the evaluation
    draws leaves the training's noise, timesteps and data order alone."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def load_classifier(path: str, labels: Sequence[int], image_size: int, device: torch.device) -> nn.Module:
    """eval_classifier: the TorchScript module at `path`, on `device`, checked on one blank image of the training
    size: it must give logits (1, C) with a class for every label."""
    if not Path(path).is_file():
        raise InputError(f"train config: eval_classifier file {path} not found; give a TorchScript classifier "
                         "saved with torch.jit.save")
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript for torch.export; it still loads
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load`", category=FutureWarning)
            classifier = torch.jit.load(path, map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or pickle errors by what the file holds
        raise InputError(f"train config: eval_classifier {path} is not a TorchScript file ({first_line(exc)}); "
                         "save the classifier with torch.jit.save") from None
    classifier.eval()
    shape = f"(1, 3, {image_size}, {image_size})"
    try:
        with torch.inference_mode():
            logits = classifier(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as exc:  # the user's code: any error means it does not fit
        raise InputError(f"train config: eval_classifier {path} fails on a {shape} image in [0, 1] "
                         f"({first_line(exc)}); it must map images of the training image_size to logits (B, C)"
                         ) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"train config: eval_classifier {path} gives {got} for a {shape} image; it must give "
                         "logits of shape (B, C)")
    if max(labels) >= logits.shape[1]:
        raise InputError(f"train config: eval_labels go up to {max(labels)} but eval_classifier {path} gives "
                         f"{logits.shape[1]} classes; use labels 0 to {logits.shape[1] - 1}")
    return classifier


def load_clip(spec: str, device: torch.device) -> Clip:
    """eval_clip "ARCH:PATH": the open_clip architecture with the local weights at PATH (nothing is downloaded),
    its eval transform (resize, centre crop, the model's mean and std) and its tokenizer."""
    import open_clip  # here: only runs that score with CLIP import it

    arch, _, path = spec.partition(":")
    if arch not in open_clip.list_models():
        raise InputError(f"train config: eval_clip architecture {arch!r} is not an open_clip one; use a name from "
                         "open_clip.list_models(), e.g. ViT-B-32")
    if not Path(path).is_file():
        raise InputError(f"train config: eval_clip weights file {path} not found; give a local open_clip weights "
                         f"file for {arch} (nothing is downloaded)")
    try:  # an absolute path: open_clip reads a relative one that names a pretrained tag as the tag (a download)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(Path(path).resolve()),
                                                                     device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # torch and open_clip raise RuntimeError, KeyError, pickle errors by the file
        raise InputError(f"train config: eval_clip {path} did not load as {arch} weights ({first_line(exc)}); give "
                         "that architecture's open_clip weights file") from None
    return Clip(model.eval().requires_grad_(False), preprocess, tokenizer)


def first_line(exc: BaseException) -> str:
    """An exception's message, on one line, for an InputError that wraps it."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
