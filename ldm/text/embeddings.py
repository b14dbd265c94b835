"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that a prompt names by a word.

    load_embeddings(model.text_encoder, "embeddings/")   # every file there; its name is the file name
    model.generate(["a photo of my-cat"])                 # "my-cat" becomes the vectors of my-cat.pt
    unload_embeddings(model.text_encoder)                 # the encoder exactly as before

Files (as the AUTOMATIC1111 web UI reads them): A1111 `.pt` (`string_to_param` {"*": [n, width]}, a
pickle read weights-only, so it runs no code), `.safetensors` with `emb_params` [n, width], diffusers'
`learned_embeds.safetensors` / `.bin` ({token: [n, width] or [width]}), and SDXL pairs (`clip_l` [n, 768]
for the CLIP ViT-L tower, `clip_g` [n, 1280] for the OpenCLIP bigG tower). An embedding's name is its file
name without the suffix; one of n vectors stands for n tokens.

How a name is found in a prompt (A1111's rule): the name is tokenized with the model's BPE tokenizer, and
wherever the prompt's tokens (of one prompt piece, see `ldm/text/prompts.py`) contain that token sequence,
it is replaced by the embedding's vectors; longer names first. CLIP's tokenizer lowercases and splits words
at punctuation, and a word's tokens end with its end-of-word token, so a name matches a whole word, or the
end of a longer word whose tokens end the same way ("cat" inside "mycat" = "my" + "cat", not in "bobcat",
which is one token), case-insensitively, with any punctuation around it.

How the vectors enter the encoder: its token embedding (`nn.Embedding`) is swapped for an
`AddedTokenEmbedding` that shares the same weight (the state dict keeps its keys and tensors) and reads
ids below 0 from a side table: id -1 - k is the table's row k. The vocabulary is untouched, and
`unload_embeddings` puts the original module back. Negative ids keep CLIP's pooled vector right: it is
taken at the largest id of each row, the EOT token.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.checkpoint import read_checkpoint
from common.errors import InputError
from ldm.text.tokenizer import _bpe

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SINGLE, CLIP_L, CLIP_G = "", "clip_l", "clip_g"   # which vectors a tower reads: one tower's, or SDXL's pair
FAMILY_WIDTHS = "SD 1.x: 768, SD 2.x: 1024, SDXL: clip_l 768 + clip_g 1280"


@dataclass
class Embedding:
    """One embedding file: `vectors` {SINGLE: [n, width]} or {CLIP_L: [n, w_l], CLIP_G: [n, w_g]}, float32."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    shorthash: str   # A1111's "TI hashes": the first 10 hex digits of the file's sha256
    step: int | None = None                # what an A1111 .pt records of its training, where it does
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def width(self) -> int:
        """A1111's "shape": the vector width, summed over an SDXL pair's two sets (768 + 1280)."""
        return sum(v.shape[1] for v in self.vectors.values())


def read_embedding(path: str | Path) -> Embedding:
    """An embedding file in any of the formats above; a one-line `InputError` for anything else."""
    path = Path(path)
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise InputError(f"embedding {path}: unknown file type {path.suffix!r}; use {', '.join(EMBEDDING_SUFFIXES)}")
    data = read_checkpoint(path)[0] if path.suffix == ".safetensors" else _read_pickle(path)
    shorthash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    embedding = Embedding(path.stem, path, _vectors_of(data, path), shorthash)
    step = data.get("step")  # A1111's .pt: its training step and the checkpoint it was trained on
    embedding.step = step if isinstance(step, int) and not isinstance(step, bool) else None
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        setattr(embedding, key, data[key] if isinstance(data.get(key), str) else None)
    return embedding


def _read_pickle(path: Path) -> Any:
    """A pickled embedding, nested dictionaries included, read with `torch.load(weights_only=True)`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the project's reader words the reason (code in the file, corrupt, not a checkpoint)
        read_checkpoint(path)
        raise InputError(f"embedding {path} is not a readable PyTorch file") from None


def _vectors_of(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping):
        raise InputError(f"embedding {path} holds a {type(data).__name__}, not a dictionary of tensors")
    if "string_to_param" in data:  # A1111 (and the original textual-inversion code)
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise InputError(f"embedding {path}: string_to_param must hold exactly one term")
        return {SINGLE: _matrix(next(iter(params.values())), path, "string_to_param")}
    if CLIP_L in data or CLIP_G in data:  # SDXL: one set of vectors per text tower
        missing = [key for key in (CLIP_L, CLIP_G) if key not in data]
        if missing:
            raise InputError(f"embedding {path} is an SDXL embedding without {missing[0]}; it needs clip_l and clip_g")
        pair = {key: _matrix(data[key], path, key) for key in (CLIP_L, CLIP_G)}
        if pair[CLIP_L].shape[0] != pair[CLIP_G].shape[0]:
            raise InputError(f"embedding {path}: clip_l has {pair[CLIP_L].shape[0]} vectors but clip_g has "
                             f"{pair[CLIP_G].shape[0]}; they must be as many")
        return pair
    if "emb_params" in data:  # A1111 .safetensors
        return {SINGLE: _matrix(data["emb_params"], path, "emb_params")}
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers: {token: vectors}
        key, value = next(iter(data.items()))
        return {SINGLE: _matrix(value, path, str(key))}
    keys = ", ".join(sorted(map(str, data))[:8])
    raise InputError(f"embedding {path} is not a textual-inversion embedding: expected string_to_param (A1111 .pt), "
                     f"emb_params, clip_l + clip_g (SDXL) or one {{token: vectors}} entry (diffusers); found {keys}")


def _matrix(value: Any, path: Path, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"embedding {path}: {key} must be vectors [n, width], got {what}")
    matrix = value.detach().to(torch.float32).reshape(-1, value.shape[-1])
    if not torch.isfinite(matrix).all():
        raise InputError(f"embedding {path}: {key} holds NaN or infinite values")
    return matrix


class AddedTokenEmbedding(nn.Embedding):
    """`base`'s token lookup, sharing its weight, extended below 0: id -1 - k reads row k of `added`."""

    def __init__(self, base: nn.Embedding, added: torch.Tensor):
        nn.Module.__init__(self)
        for name in nn.Embedding.__constants__:
            setattr(self, name, getattr(base, name))
        self.weight = base.weight   # the same Parameter: same state-dict key and tensor
        self.register_buffer("added", added.to(base.weight.device, base.weight.dtype), persistent=False)
        self.__dict__["base"] = base   # kept for `unload_embeddings`, outside the module tree

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = ids < 0
        if not bool(extra.any()):
            return super().forward(ids)
        out = super().forward(ids.clamp(min=0))
        rows = self.added.to(out.dtype)[(-1 - ids).clamp(min=0)]
        return torch.where(extra[..., None], rows, out)


@dataclass
class _Entry:
    name: str
    name_ids: list[int]   # the name as BPE token ids
    ids: list[int]        # the ids of its vectors (negative)
    shorthash: str = ""
    problem: str | None = None   # why this file cannot be used with this model (a prompt naming it fails)


class AddedTokens:
    """The embeddings a text tower reads, as the prompt chunker looks them up (`tower.textual_inversion`)."""

    def __init__(self) -> None:
        self._by_first: dict[int, list[_Entry]] = {}

    def add(self, entry: _Entry) -> None:
        entries = self._by_first.setdefault(entry.name_ids[0], [])
        entries.append(entry)
        entries.sort(key=lambda e: (-len(e.name_ids), e.problem is not None))   # longest name first

    def entry_at(self, tokens: Sequence[int], position: int) -> _Entry | None:
        for entry in self._by_first.get(tokens[position], ()):
            if list(tokens[position:position + len(entry.name_ids)]) == entry.name_ids:
                return entry
        return None

    def match(self, tokens: Sequence[int], position: int) -> tuple[int, list[int]] | None:
        """(tokens of the name, ids of the vectors) of the embedding named at `position`, or None."""
        entry = self.entry_at(tokens, position)
        if entry is None:
            return None
        if entry.problem:
            raise InputError(entry.problem)
        return len(entry.name_ids), entry.ids


def added_tokens(tower: Any) -> AddedTokens | None:
    return getattr(tower, "textual_inversion", None)


@dataclass
class EmbeddingReport:
    """What `load_embeddings` did: {name: number of vectors} loaded, {name: reason} skipped, and the `Embedding`
    read from each file that could be read, under the same keys (a skipped file of another width, say)."""

    loaded: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, Embedding] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"textual inversion: {len(self.loaded)} embeddings loaded"
                 + (f" ({', '.join(self.loaded)})" if self.loaded else "")]
        lines += [f"textual inversion: skipped {reason}" for reason in self.skipped.values()]
        return "\n".join(lines)


def _towers(text_encoder: Any) -> list[tuple[Any, str]]:
    """(tower, which vectors it reads): one text encoder reads SINGLE; SDXL's conditioner gives its CLIP ViT-L
    tower (Hugging Face layout) clip_l and its OpenCLIP tower(s) clip_g, as A1111 does."""
    towers = getattr(text_encoder, "towers", None)
    if towers is None:
        return [(text_encoder, SINGLE)]
    return [(tower, CLIP_L if _is_hf(tower) else CLIP_G) for tower in towers]


def _is_hf(tower: Any) -> bool:
    return hasattr(tower, "transformer") and hasattr(tower.transformer, "text_model")


def _token_embedding_owner(tower: Any) -> nn.Module:
    """The module whose `token_embedding` the tower looks its tokens up in."""
    return tower.transformer.text_model.embeddings if _is_hf(tower) else tower.model


def _vectors_for(embedding: Embedding, tower: Any, key: str) -> torch.Tensor:
    width = _token_embedding_owner(tower).token_embedding.embedding_dim
    path = embedding.path
    if key not in embedding.vectors:
        if key == SINGLE:
            raise InputError(f"embedding {path} is an SDXL embedding (clip_l {embedding.vectors[CLIP_L].shape[1]}, "
                             f"clip_g {embedding.vectors[CLIP_G].shape[1]}) but this model has one text encoder, "
                             f"of width {width}")
        raise InputError(f"embedding {path} has one set of vectors, of width {embedding.vectors[SINGLE].shape[1]}, "
                         "but this SDXL model needs a pair: clip_l (CLIP ViT-L) and clip_g (OpenCLIP bigG)")
    vectors = embedding.vectors[key]
    if vectors.shape[1] != width:
        which = f" ({key})" if key else ""
        raise InputError(f"embedding {path} has vectors of width {vectors.shape[1]}{which} but this model's text "
                         f"encoder has width {width}: it was made for another model family ({FAMILY_WIDTHS})")
    if vectors.shape[0] > tower.context_length - 2:
        raise InputError(f"embedding {path} has {vectors.shape[0]} vectors but a prompt chunk of this text encoder "
                         f"holds {tower.context_length - 2} tokens")
    return vectors


def _name_ids(tower: Any, name: str, path: Path) -> list[int]:
    ids = _bpe(tower.bpe).encode(name)
    if not ids:
        raise InputError(f"embedding {path}: its name {name!r} has no tokens, so no prompt can name it; rename it")
    return ids


def _files(sources: str | Path | Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """(file, named on its own): the embedding files of each folder (recursively, sorted) or file."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += [(p, False) for p in sorted(source.rglob("*")) if p.suffix in EMBEDDING_SUFFIXES
                      and p.is_file() and not p.name.startswith(".") and p.stat().st_size > 0]
        elif source.is_file():
            files.append((source, True))
        else:
            raise InputError(f"embeddings folder or file not found: {source}")
    return files


def load_embeddings(text_encoder: Any, sources: str | Path | Sequence[str | Path]) -> EmbeddingReport:
    """Make the embeddings in `sources` (folders and files) usable in prompts of `text_encoder` (a text encoder,
    or SDXL's conditioner), replacing those loaded before.

    A file named on its own that does not fit the model (another family's width, an SDXL pair on a
    one-tower model, unreadable) is an `InputError` at once. In a folder such a file is skipped and listed in
    the report, as A1111 skips it, and a prompt that names it gets that `InputError`. Two files of one name:
    the first in sorted order is used.
    """
    towers = _towers(text_encoder)
    files = _files(sources)
    unload_embeddings(text_encoder)
    tables = [AddedTokens() for _ in towers]
    rows: list[list[torch.Tensor]] = [[] for _ in towers]
    report, taken = EmbeddingReport(), {}
    for path, named in files:
        name, embedding = path.stem, None
        try:
            if name in taken:
                raise InputError(f"embedding {path}: the name {name!r} is already {taken[name]}'s")
            embedding = read_embedding(path)
            parts = [_vectors_for(embedding, tower, key) for tower, key in towers]
            name_ids = [_name_ids(tower, name, path) for tower, _ in towers]
        except InputError as exc:
            if named:
                raise
            key = name if name not in report.skipped else str(path)
            report.skipped[key] = str(exc)
            if embedding is not None:
                report.files[key] = embedding
            if name not in taken:
                for table, (tower, _) in zip(tables, towers):
                    ids = _bpe(tower.bpe).encode(name)
                    if ids:
                        table.add(_Entry(name, ids, [], problem=f"the prompt names {name!r}, but {exc}"))
            continue
        taken[name] = path
        for table, tower_rows, vectors, ids in zip(tables, rows, parts, name_ids):
            first = sum(len(r) for r in tower_rows)
            tower_rows.append(vectors)
            table.add(_Entry(name, ids, [-1 - k for k in range(first, first + len(vectors))], embedding.shorthash))
        report.loaded[name] = embedding.count
        report.files[name] = embedding
    for (tower, _), table, tower_rows in zip(towers, tables, rows):
        if tower_rows:
            owner = _token_embedding_owner(tower)
            owner.token_embedding = AddedTokenEmbedding(owner.token_embedding, torch.cat(tower_rows))
        tower.textual_inversion = table
    return report


def unload_embeddings(text_encoder: Any) -> None:
    """Remove loaded embeddings: the original token embedding module is back, prompts read names as words."""
    for tower, _ in _towers(text_encoder):
        owner = _token_embedding_owner(tower)
        added = owner.token_embedding
        if isinstance(added, AddedTokenEmbedding):
            added.base.weight = added.weight   # the current Parameter, should a move have replaced it
            owner.token_embedding = added.base
        tower.textual_inversion = None
