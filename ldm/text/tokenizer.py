"""The CLIP BPE tokenizer (Radford et al. 2021), as open_clip and SD use it."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Sequence

import torch

from common.errors import InputError
from ldm.text.bpe import CLIPBPE

SOT_TOKEN, EOT_TOKEN, VOCAB_SIZE = 49406, 49407, 49408


@functools.cache
def _bpe(path: str | None = None) -> CLIPBPE:
    if path is None:
        return CLIPBPE()  # CLIP's vocabulary, which ships inside open_clip
    if not Path(path).is_file():
        raise InputError(f"tokenizer merges file not found: {path}; give the BPE file the text encoder was trained with")
    return CLIPBPE(path)


def special_tokens(bpe: str | None = None) -> tuple[int, int]:
    """(SOT, EOT) ids of a BPE vocabulary: the two ids after the byte tokens and the merges."""
    if bpe is None:
        return SOT_TOKEN, EOT_TOKEN
    encoder = _bpe(bpe).encoder
    return encoder["<start_of_text>"], encoder["<end_of_text>"]


def tokenize(prompts: str | Sequence[str], *, context_length: int = 77, pad_token_id: int = 0,
             bpe: str | None = None) -> torch.Tensor:
    """CLIP BPE token ids (B, context_length): SOT, text, EOT, then `pad_token_id`.

    Equals `open_clip.tokenize` for padding 0 (SD 2.x); SD 1.x's HF tokenizer pads with EOT (49407).
    Longer prompts are truncated with EOT kept as the last token, with a warning. `bpe`: a merges
    file (open_clip's format, e.g. a cut-down vocabulary of a tiny test model); None: CLIP's own.
    """
    sot, eot = special_tokens(bpe)
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens = torch.full((len(prompts), context_length), pad_token_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        ids = [sot] + _bpe(bpe).encode(prompt) + [eot]
        if len(ids) > context_length:
            warnings.warn(f"prompt {i} is {len(ids)} tokens long (with start/end tokens) but the text encoder reads "
                          f"{context_length}: the last {len(ids) - context_length} tokens were dropped (this reads "
                          "the prompt literally in one window, as training does; generation's `condition` splits "
                          "long prompts into chunks instead)", stacklevel=2)
            ids = ids[:context_length - 1] + [eot]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens
