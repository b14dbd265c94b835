"""The checkpoints a server offers, the one it has loaded, and the LoRA files prompts may name.

A checkpoint is listed as A1111 lists it (`/sdapi/v1/sd-models`): a title "file.safetensors [hash]",
the model name (the file name without its suffix), the short hash (the first 10 hex digits of the
file's SHA-256, A1111's "shorthash"; computed when the model is first loaded, since hashing a 7 GB
file takes a while) and the path. The embedded default model is always offered.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import InputError
from ldm.cli import cast_for_cpu_bf16, generation_precision
from ldm.cli.generate import LORA_SUFFIXES, apply_loras
from ldm.formats.loading import DEFAULT_MODEL, load_model
from ldm.model import LatentDiffusion
from ldm.pipeline import native_size
from ldm.text.embeddings import EMBEDDING_SUFFIXES, EmbeddingReport, load_embeddings

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Checkpoint:
    path: Path | None  # None: the embedded default model
    config: str | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return str(self.path or DEFAULT_MODEL)

    @property
    def model_name(self) -> str:
        return "default" if self.path is None else (self.path.stem if self.path.is_file() else self.path.name)

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        name = Path(self.filename).name
        return f"{name} [{self.shorthash}]" if self.shorthash else name

    def describe(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": self.filename, "config": self.config}

    def matches(self, name: str) -> bool:
        """A1111 clients name a model by title, title without hash, model name or path."""
        return name.strip() in {self.title, Path(self.filename).name, self.model_name, self.filename}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():  # a diffusers folder: its weight files in name order
        files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    else:
        files = [path]
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Models:
    """The catalogue and the loaded model. Only the worker thread loads or uses the model."""

    def __init__(self, *, ckpt: str | None = None, config: str | None = None, models_dir: str | None = None,
                 lora_dir: str | None = None, embeddings_dir: str | None = None, device: torch.device,
                 precision: str = "auto"):
        self.models_dir = Path(models_dir) if models_dir else None
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None
        self.embeddings = EmbeddingReport()  # what the loaded model has of the folder (GET /sdapi/v1/embeddings)
        self._embeddings_seen: tuple = ()    # the folder's files (name, size, mtime) when it was last read
        self.device, self.precision = device, precision
        generation_precision(precision, device)  # fails now on a precision the device cannot do
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise InputError(f"--models-dir {self.models_dir} is not a folder: give the folder of checkpoints")
        if self.embeddings_dir is not None and not self.embeddings_dir.is_dir():
            raise InputError(f"--embeddings-dir {self.embeddings_dir} is not a folder: give the folder of "
                             "textual-inversion embeddings")
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise InputError(f"--lora-dir {self.lora_dir} is not a folder: give the folder of LoRA files")
        if ckpt is not None and not Path(ckpt).exists():
            raise InputError(f"--ckpt {ckpt} not found")
        self.extra = Checkpoint(Path(ckpt).resolve(), config) if ckpt else None
        self.checkpoints: list[Checkpoint] = []
        self.refresh()
        self.current: Checkpoint = self.extra or self.checkpoints[0]
        self.model: LatentDiffusion | None = None
        self.native_size = self.size_multiple = 0  # of the loaded model, for checking requests before they queue
        self.loras: tuple = ()  # (path, weight) pairs merged into the model now
        self.lora_hashes: str | None = None

    def refresh(self) -> None:
        """Scan --models-dir again (POST /sdapi/v1/refresh-checkpoints); hashes already computed are kept."""
        known = {c.filename: c for c in self.checkpoints}
        found = [Checkpoint(None)]
        if self.extra is not None:
            found.append(self.extra)
        if self.models_dir is not None:
            for path in sorted(self.models_dir.iterdir()):
                if (path.suffix in CHECKPOINT_SUFFIXES and path.is_file()) or (path / "model_index.json").is_file():
                    found.append(Checkpoint(path.resolve(), self._yaml_beside(path)))
        self.checkpoints = [known.get(c.filename, c) for c in found]
        self.checkpoints = list({c.filename: c for c in self.checkpoints}.values())

    @staticmethod
    def _yaml_beside(path: Path) -> str | None:
        """An original-style config next to the file (A1111's convention: model.yaml beside model.ckpt)."""
        yaml = path.with_suffix(".yaml")
        return str(yaml) if path.is_file() and yaml.is_file() else None

    def find(self, name: str) -> Checkpoint:
        self.refresh()
        for checkpoint in self.checkpoints:
            if checkpoint.matches(name):
                return checkpoint
        titles = ", ".join(c.title for c in self.checkpoints)
        raise InputError(f"sd_model_checkpoint: no model {name!r}; choose one of GET /sdapi/v1/sd-models: {titles}")

    def load(self, checkpoint: Checkpoint | None = None) -> LatentDiffusion:
        """Load `checkpoint` (default: the current one) unless it is loaded; the old model is freed first."""
        checkpoint = checkpoint or self.current
        if self.model is not None and checkpoint is self.current:
            return self.model
        self.model = None  # free the old weights before reading the new ones
        model = load_model(checkpoint.path, config=checkpoint.config, device=self.device)
        missing = [name for name in ("denoiser", "text_encoder") if getattr(model, name) is None]
        if missing:
            raise InputError(f"{checkpoint.filename} has no {' and no '.join(missing)}: the server needs a full "
                             "text-to-image model")
        self._embeddings_seen = ()
        self.refresh_embeddings(model)
        if generation_precision(self.precision, self.device, model)[0] == "bf16" and self.device.type == "cpu":
            cast_for_cpu_bf16(model)
        if checkpoint.sha256 is None:
            checkpoint.sha256 = file_sha256(Path(checkpoint.filename))
        self.model, self.current, self.loras, self.lora_hashes = model.eval(), checkpoint, (), None
        self.native_size, self.size_multiple = native_size(model), model.size_multiple
        return model

    def refresh_embeddings(self, model: LatentDiffusion | None = None, *, force: bool = False) -> None:
        """(Re)load the embeddings folder into `model` (default: the loaded one) if its files changed since it was
        last read, or if `force`; A1111 also rereads its folder before each generation when it changed."""
        model = model or self.model
        if self.embeddings_dir is None or model is None:
            return
        seen = []
        for path in sorted(self.embeddings_dir.rglob("*")):
            if path.suffix in EMBEDDING_SUFFIXES:
                with contextlib.suppress(OSError):  # a file removed meanwhile is simply not there
                    stat = path.stat()
                    seen.append((str(path), stat.st_size, stat.st_mtime_ns))
        seen = tuple(seen)
        if force or seen != self._embeddings_seen:
            self.embeddings = load_embeddings(model.text_encoder, self.embeddings_dir)
            self._embeddings_seen = seen

    def use_loras(self, requests: list[tuple[Path, float]]) -> str | None:
        """Merge exactly `requests` into the loaded model (unmerging others); the "Lora hashes" value."""
        wanted = tuple((str(path), weight) for path, weight in requests)
        if wanted != self.loras:
            self.model.unload_loras()
            self.loras, self.lora_hashes = (), None
            self.lora_hashes = apply_loras(self.model, requests)
            self.loras = wanted
        return self.lora_hashes

    def lora_args(self) -> argparse.Namespace:
        """What `ldm.cli.generate.lora_requests` reads: no --lora files, the server's --lora-dir."""
        return argparse.Namespace(lora=[], lora_dir=str(self.lora_dir) if self.lora_dir else None)

    def lora_list(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/loras: [{"name", "alias", "path", "metadata"}], A1111's layout."""
        if self.lora_dir is None:
            return []
        files = sorted(p for p in self.lora_dir.iterdir() if p.suffix in LORA_SUFFIXES and p.is_file())
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]

    def size_info(self) -> dict[str, int]:
        """The loaded model's sizes (kept apart from the model, which is None while another one loads)."""
        return {"ldm_default_width": self.native_size, "ldm_default_height": self.native_size,
                "ldm_size_multiple": self.size_multiple}
