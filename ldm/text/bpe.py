"""CLIP's byte-level BPE (Radford et al. 2021), as open_clip's `SimpleTokenizer` (clean "lower") encodes,
without importing open_clip: its package loads torchvision, timm and transformers (seconds), and a model
with a small text encoder needs none of them. The merges file is the one that ships inside open_clip
(found without importing it), or a file of the same format. `tests/test_startup.py` checks the ids equal
open_clip's.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import ftfy
import regex

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
MERGES = 49152 - 256 - 2  # the merges CLIP uses: the vocabulary is 256 bytes x 2 + merges + 2 special = 49408


def default_bpe() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz` (CLIP's merges), located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the CLIP tokenizer's vocabulary ships with open_clip: pip install open_clip_torch")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character (the printable bytes themselves, the others from 256 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, codes)))


def _clean(text: str) -> str:
    """open_clip's clean "lower": fix mojibake, unescape HTML twice, collapse whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class CLIPBPE:
    """`encode(text) -> ids`; `encoder` (token -> id) and `bpe_ranks` ((a, b) -> merge rank) as open_clip's."""

    def __init__(self, path: str | Path | None = None) -> None:
        lines = gzip.open(path or default_bpe()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.pattern = regex.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.byte_encoder = bytes_to_unicode()

    def bpe(self, token: str) -> str:
        """The token's symbols after the merges, joined by spaces; the last one ends with </w>."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(_clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids
