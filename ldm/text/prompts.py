"""Prompts in the AUTOMATIC1111 (A1111) web UI's syntax: emphasis, BREAK, and prompts of any length.

    prompt -> `parse_prompt_attention` -> (text, weight) pieces -> `prompt_chunks`: token chunks of
    context_length - 2 tokens (75 for CLIP) -> each chunk SOT + tokens + EOT + padding, encoded on its own
    -> `emphasize` (weights) -> the chunks' contexts joined on the token axis: (B, context_length * k, width)

The semantics are A1111's (`modules/prompt_parser.py`, `modules/sd_hijack_clip.py`,
`FrozenCLIPEmbedderWithCustomWordsBase`, emphasis "Original"):
- `(text)` multiplies the weight of text by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by
  1.3; they nest (`((text))` = 1.21). `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a
  backslash before anything else is dropped. A bracket that is never closed applies to the rest of the
  prompt; a closing bracket that was never opened is text.
- `BREAK` (upper case, a word of its own) ends the current chunk, so what follows starts a new one.
- Each piece of text is tokenized on its own (so `(red)dish` is the two words "red" and "dish").
- A chunk holds at most context_length - 2 tokens. When a chunk is full and the last comma is at most 20
  tokens back (A1111's default `comma_padding_backtrack`), the tokens after that comma move to the next
  chunk, so a phrase is not cut in two. A textual-inversion embedding's vectors are never split across
  chunks (see `ldm/text/embeddings.py`).
- Each token's hidden state is multiplied by its weight, then the chunk is rescaled so its mean equals the
  mean before weighting: z * w * mean(z) / mean(z * w).
- Prompts of one batch with different numbers of chunks are padded with empty chunks (SOT, EOT, padding)
  to the longest; `pad_to_same_length` does the same for a prompt and its negative prompt.
- SDXL's pooled vector is the first chunk's (unweighted), as A1111 returns `zs[0].pooled`.

Where we differ from A1111, on purpose: the mean in the rescaling is each prompt's own (A1111 takes it over
the whole batch, so one prompt's weights change another prompt's context); BREAK inside brackets still
breaks (A1111 would encode the word "BREAK" with weight -1.1); a weight that is not a number, such as
`(a:1.2.3)`, is a one-line `InputError` (A1111 raises ValueError). Plain prompts (no brackets, backslashes or
BREAK) of at most context_length - 2 tokens give exactly the context of `encoder(encoder.tokenize(prompts))`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from common.errors import InputError
from ldm.text.embeddings import added_tokens
from ldm.text.tokenizer import _bpe, special_tokens

ROUND_BRACKET, SQUARE_BRACKET = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
BREAK = "BREAK"

# One match per syntax element, tried in this order: escapes, a lone backslash, openers, a weight closing a
# round bracket (":1.3)", spaces allowed around the number), closers, plain text, a colon that is only text.
_SYNTAX = re.compile(r"""
\\[()\[\]\\] | \\ | [(\[] | :\s*([+-]?[.\d]+)\s*\) | [)\]] | [^\\()\[\]:]+ | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list[Any]]:
    """`text` as [piece, weight] pairs, neighbours of equal weight merged; a BREAK is the pair ["BREAK", -1].

    A1111's documented examples hold: `parse_prompt_attention("a (red:1.5) cat")` is
    `[["a ", 1.0], ["red", 1.5], [" cat", 1.0]]`, `"(unbalanced"` gives `[["unbalanced", 1.1]]`.
    """
    pieces: list[list[Any]] = []
    round_open: list[int] = []   # where each open bracket's range starts in `pieces`
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _SYNTAX.finditer(text):
        element, number = match.group(0), match.group(1)
        if element.startswith("\\"):
            pieces.append([element[1:], 1.0])
        elif element in "([":
            (round_open if element == "(" else square_open).append(len(pieces))
        elif number is not None and round_open:
            try:
                weight = float(number)
            except ValueError:
                raise InputError(f"prompt {text!r}: the weight {number!r} in {element!r} is not a number") from None
            scale_from(round_open.pop(), weight)
        elif element == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET)
        elif element == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET)
        else:  # text (also an unmatched closer, or ":1.3)" with no open bracket)
            for i, part in enumerate(_BREAK.split(element)):
                if i:
                    pieces.append([BREAK, -1])
                pieces.append([part, 1.0])
    for start in round_open:   # brackets never closed reach to the end
        scale_from(start, ROUND_BRACKET)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET)
    merged: list[list[Any]] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def _is_break(text: str, weight: float) -> bool:
    return text == BREAK and weight < 0


def prompt_chunks(encoder: Any, prompt: str, *,
                  comma_backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """A prompt as chunks of (token ids, weights), each at most `encoder.context_length - 2` long, without
    SOT / EOT (A1111's `tokenize_line`). `encoder` gives `context_length` and `bpe`, and the textual-inversion
    embeddings it reads (`ldm.text.embeddings.load_embeddings`): an embedding's name is replaced by its
    vectors' ids."""
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    size = encoder.context_length - 2
    bpe = _bpe(encoder.bpe)
    comma = bpe.encoder.get(",</w>")
    embeddings = added_tokens(encoder)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if _is_break(text, weight):
            close_chunk()
            continue
        tokens = bpe.encode(text)
        position = 0
        while position < len(tokens):
            if tokens[position] == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                moved = ids[last_comma + 1:], weights[last_comma + 1:]   # the words after the comma move on
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                ids, weights = moved
            if len(ids) == size:
                close_chunk()
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is None:
                ids.append(tokens[position])
                weights.append(weight)
                position += 1
                continue
            name_length, vector_ids = found
            if len(ids) + len(vector_ids) > size:
                close_chunk()
            ids += vector_ids
            weights += [weight] * len(vector_ids)
            position += name_length
    if ids or not chunks:
        close_chunk()
    return chunks


@dataclass
class Chunks:
    """A batch of prompts as `count` chunks of `context_length` tokens each: SOT, prompt tokens, EOT, padding
    (`tokens`, int64), and every token's weight (`weights`, float32; 1 for SOT, EOT and padding)."""

    tokens: torch.Tensor   # (batch, count, context_length)
    weights: torch.Tensor  # (batch, count, context_length)

    @property
    def count(self) -> int:
        return self.tokens.shape[1]

    def padded(self, count: int, encoder: Any) -> "Chunks":
        """These chunks with empty chunks appended up to `count` (A1111's `empty_chunk`)."""
        extra = count - self.count
        if extra <= 0:
            return self
        empty = _chunk_rows(encoder, [], [])
        batch = self.tokens.shape[0]
        tokens = empty[0].expand(batch, extra, -1)
        weights = empty[1].expand(batch, extra, -1)
        return Chunks(torch.cat([self.tokens, tokens], 1), torch.cat([self.weights, weights], 1))


def _chunk_rows(encoder: Any, ids: list[int], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    sot, eot = special_tokens(encoder.bpe)
    padding = encoder.context_length - 2 - len(ids)
    tokens = [sot] + ids + [eot] + [encoder.pad_token_id] * padding
    return torch.tensor(tokens), torch.tensor([1.0] + weights + [1.0] * (padding + 1))


def chunk_prompts(encoder: Any, prompts: str | Sequence[str], *, count: int = 1,
                  comma_backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """`prompts` as chunks, at least `count` and as many as the longest prompt needs (shorter prompts get
    empty chunks)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    cache: dict[str, list[tuple[list[int], list[float]]]] = {}   # a batch often repeats one prompt
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if prompt not in cache:
            cache[prompt] = prompt_chunks(encoder, prompt, comma_backtrack=comma_backtrack)
    per_prompt = [cache[prompt] for prompt in prompts]
    count = max(count, *(len(chunks) for chunks in per_prompt))
    tokens = torch.empty(len(prompts), count, encoder.context_length, dtype=torch.long)
    weights = torch.empty(len(prompts), count, encoder.context_length, dtype=torch.float32)
    for i, chunks in enumerate(per_prompt):
        for j in range(count):
            tokens[i, j], weights[i, j] = _chunk_rows(encoder, *(chunks[j] if j < len(chunks) else ([], [])))
    return Chunks(tokens, weights)


def chunk_towers(towers: Sequence[Any], prompts: str | Sequence[str]) -> list[Chunks]:
    """`chunk_prompts` for each text tower of a conditioner (SDXL), padded to one number of chunks."""
    chunked = [chunk_prompts(tower, prompts) for tower in towers]
    count = max(c.count for c in chunked)
    return [c.padded(count, tower) for c, tower in zip(chunked, towers)]


def emphasize(context: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], *,
              widths: Sequence[int] | None = None) -> torch.Tensor:
    """A1111's "Original" emphasis of one chunk: `context` (B, L, width) * weights (B, L), rescaled so that
    each prompt's mean is what it was. With `widths`, `context` is several towers' contexts side by side
    (SDXL) and `weights` one tensor per tower, each tower weighted on its own as A1111 does."""
    if widths is not None:
        parts = torch.split(context, list(widths), dim=-1)
        return torch.cat([emphasize(part, w) for part, w in zip(parts, weights)], dim=-1)
    weights = weights.to(context.device)
    if bool((weights == 1).all()):
        return context   # nothing to weight: the context exactly as encoded
    z = context.float()   # in float32, as A1111's product with its float32 multipliers is
    weighted = z * weights.float()[..., None]
    original_mean, new_mean = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    scale = torch.where(new_mean == 0, 1.0, original_mean / new_mean)   # all weights 0: no rescaling to inf
    return (weighted * scale).to(context.dtype)


def encode_chunks(encoder: Any, chunks: Chunks, *, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (B, context_length * count, width), pooled vector of the first chunk or None): each chunk
    encoded on its own with `encoder.encode_tokens`, weighted, and the chunks joined on the token axis."""
    contexts, first_pooled = [], None
    for i in range(chunks.count):
        context, pooled_i = encoder.encode_tokens(chunks.tokens[:, i].to(encoder.device), pooled=pooled and i == 0)
        contexts.append(emphasize(context, chunks.weights[:, i]))
        first_pooled = pooled_i if i == 0 else first_pooled
    return (contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=1)), first_pooled


def encode_prompts(encoder: Any, prompts: str | Sequence[str], *,
                   pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled) of prompts in A1111's syntax, of any length, with the encoder's embeddings."""
    return encode_chunks(encoder, chunk_prompts(encoder, prompts), pooled=pooled)


def empty_context(text_encoder: Any) -> torch.Tensor:
    """The context (1, context_length, width) of one empty chunk: the padding for `pad_to_same_length`
    (A1111's `cond_stage_model_empty_prompt`; for SDXL the towers' contexts side by side, never zeroed)."""
    towers = getattr(text_encoder, "towers", None) or [text_encoder]
    contexts = [tower.encode_tokens(_chunk_rows(tower, [], [])[0][None].to(tower.device))[0] for tower in towers]
    return torch.cat(contexts, dim=-1)


def pad_to_same_length(text_encoder: Any, cond: Any, uncond: Any) -> tuple[Any, Any]:
    """`cond` and `uncond` (contexts, or SDXL's {"context", "y"}) with the one of fewer tokens padded with
    empty-chunk contexts to the other's length, so they can share one batch for classifier-free guidance
    (A1111's `pad_cond_uncond`). Unchanged when the lengths agree."""
    def context_of(c: Any) -> torch.Tensor:
        return c["context"] if isinstance(c, dict) else c

    def padded(c: Any, tokens: int) -> Any:
        context = context_of(c)
        chunk = empty_context(text_encoder).to(device=context.device, dtype=context.dtype)
        repeats, rest = divmod(tokens - context.shape[1], chunk.shape[1])
        if rest:
            raise InputError(f"contexts of {context.shape[1]} and {tokens} tokens cannot be padded to one length "
                             f"with chunks of {chunk.shape[1]}")
        context = torch.cat([context, chunk.expand(context.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1)
        return {**c, "context": context} if isinstance(c, dict) else context

    n_cond, n_uncond = context_of(cond).shape[1], context_of(uncond).shape[1]
    if n_cond > n_uncond:
        return cond, padded(uncond, n_cond)
    if n_uncond > n_cond:
        return padded(cond, n_uncond), uncond
    return cond, uncond


def used_embeddings(text_encoder: Any, prompts: str | Sequence[str]) -> dict[str, str]:
    """{name: A1111 short hash} of the textual-inversion embeddings that `prompts` use (for "TI hashes" in an
    image's parameters)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    towers = getattr(text_encoder, "towers", None) or [text_encoder]
    embeddings = added_tokens(towers[0])
    if embeddings is None:
        return {}
    bpe, used = _bpe(towers[0].bpe), {}
    for prompt in prompts:
        for text, weight in parse_prompt_attention(prompt):
            tokens = [] if _is_break(text, weight) else bpe.encode(text)
            position = 0
            while position < len(tokens):
                entry = embeddings.entry_at(tokens, position)
                if entry is None:
                    position += 1
                    continue
                used[entry.name] = entry.shorthash
                position += len(entry.name_ids)
    return used
