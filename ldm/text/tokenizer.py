"""The CLIP BPE tokenizer (Radford et al. 2021), as open_clip and SD use it."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import torch

from common.errors import InputError

SOT_TOKEN, EOT_TOKEN, VOCAB_SIZE = 49406, 49407, 49408


@functools.cache
def _bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer  # imported here: open_clip takes seconds to import
    return SimpleTokenizer()  # the vocabulary ships inside open_clip


def tokenize(prompts: str | Sequence[str], *, context_length: int = 77, pad_token_id: int = 0) -> torch.Tensor:
    """CLIP BPE token ids (B, context_length): SOT, text, EOT, then `pad_token_id`.

    Equals `open_clip.tokenize` for padding 0 (SD 2.x); SD 1.x's HF tokenizer pads with EOT (49407).
    Longer prompts are truncated with EOT kept as the last token, with a warning.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tokens = torch.full((len(prompts), context_length), pad_token_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        ids = [SOT_TOKEN] + _bpe().encode(prompt) + [EOT_TOKEN]
        if len(ids) > context_length:
            warnings.warn(f"prompt {i} is {len(ids)} tokens long (with start/end tokens) but the text encoder reads "
                          f"{context_length}: the last {len(ids) - context_length} tokens were dropped", stacklevel=2)
            ids = ids[:context_length - 1] + [EOT_TOKEN]
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens
