"""A1111 prompt syntax: the parser on A1111's documented examples, chunked long prompts, BREAK, weights.

The encoders are small random ones (the real CLIP vocabulary, tiny widths), built in well under a second.
"""
from __future__ import annotations

import math

import pytest
import torch

from common.errors import InputError
from ldm.conditioner import Conditioner, ConditionerConfig
from ldm.text import TextEncoderConfig
from ldm.text.encoders import SmallTextEncoder
from ldm.text.prompts import (
    chunk_prompts,
    emphasize,
    empty_context,
    pad_to_same_length,
    parse_prompt_attention,
    prompt_chunks,
)
from ldm.text.tokenizer import _bpe

WORDS = ["cat", "dog", "red", "blue", "house", "tree", "sun", "moon", "car", "bird", "green", "river"]


def words(n: int, start: int = 0) -> str:
    """n words of one CLIP token each."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with random biases and LayerNorms: fresh ones (bias 0, scale 1) give token features of mean
    about 0, where A1111's mean-restoring division is ill-conditioned; real CLIP's are far from that."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return module


def small_encoder(context_length: int = 77) -> SmallTextEncoder:
    torch.manual_seed(1)
    return perturbed(SmallTextEncoder(width=32, layers=2, heads=4, context_length=context_length, trainable=False))


def tiny_conditioner() -> Conditioner:
    """SDXL's conditioner with tiny towers: CLIP in Hugging Face layout (width 32, EOT padding) and an OpenCLIP
    tower (width 16, padding 0, pooled), both at the penultimate layer without the final norm, as SDXL."""
    torch.manual_seed(2)
    hf = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    clip_l = TextEncoderConfig(kind="hf_clip", hf_config=hf, layer="penultimate", final_norm=False,
                               pad_token_id=49407)
    big_g = TextEncoderConfig(kind="open_clip", text_cfg={"vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
                              embed_dim=8, layer="penultimate", final_norm=False)
    return perturbed(Conditioner(ConditionerConfig(text=[clip_l, big_g], size_dim=8)))


@pytest.fixture(scope="module")
def encoder() -> SmallTextEncoder:
    return small_encoder()


@pytest.fixture(scope="module")
def conditioner() -> Conditioner:
    return tiny_conditioner()


def test_words_are_one_token_each():
    assert all(len(_bpe().encode(word)) == 1 for word in WORDS)
    assert len(_bpe().encode(words(150))) == 150


# --- the parser -------------------------------------------------------------------------------------------

# The examples of A1111's `parse_prompt_attention` docstring, and the issue's.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("a (red:1.5) cat", [["a ", 1.0], ["red", 1.5], [" cat", 1.0]]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_parser_gives_a1111s_documented_output(text, expected):
    assert parse_prompt_attention(text) == expected   # exact, floats included (same products, same order)


def test_parser_brackets_escapes_and_break():
    assert parse_prompt_attention("((word))") == [["word", 1.1 * 1.1]]
    assert parse_prompt_attention("[word]") == [["word", 1 / 1.1]]
    assert parse_prompt_attention("[[word]]") == [["word", 1 / 1.1 / 1.1]]
    assert parse_prompt_attention("(word: 1.3 ) x") == [["word", 1.3], [" x", 1.0]]   # spaces around the number
    assert parse_prompt_attention("\\(a\\) \\[b\\] \\\\") == [["(a) [b] \\", 1.0]]
    assert parse_prompt_attention("a] b) c:1.2)") == [["a] b) c:1.2)", 1.0]]   # closers never opened are text
    assert parse_prompt_attention("[unbalanced") == [["unbalanced", 1 / 1.1]]
    assert parse_prompt_attention("") == [["", 1.0]]
    assert parse_prompt_attention("a cat BREAK a dog") == [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]
    assert parse_prompt_attention("BREAKFAST") == [["BREAKFAST", 1.0]]   # a word of its own only
    with pytest.raises(InputError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# --- plain prompts are exactly as before --------------------------------------------------------------------

PLAIN = ["a photograph of an astronaut riding a horse", "", "Hello, World!  it's 3.14 café", words(75)]


def test_plain_short_prompts_give_exactly_the_single_window_context(encoder, conditioner):
    with torch.no_grad():
        assert torch.equal(encoder.condition(PLAIN), encoder(encoder.tokenize(PLAIN)))
        clip_l = conditioner.towers[0]
        assert torch.equal(clip_l.condition(PLAIN), clip_l(clip_l.tokenize(PLAIN)))
        got = conditioner.condition(PLAIN, image_size=(64, 48))
        sizes = {"original_size_as_tuple": torch.tensor([[64, 48]] * 4), "crop_coords_top_left": torch.zeros(4, 2),
                 "target_size_as_tuple": torch.tensor([[64, 48]] * 4)}
        want = conditioner([tower.tokenize(PLAIN) for tower in conditioner.towers], sizes)
    assert torch.equal(got["context"], want["context"]) and torch.equal(got["y"], want["y"])


# --- chunks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens", [75, 76, 80, 150, 151])
def test_long_prompts_are_chunks_of_75_encoded_separately(encoder, n_tokens):
    with torch.no_grad():
        context = encoder.condition([words(n_tokens)])
        chunks = math.ceil(n_tokens / 75)
        assert context.shape == (1, 77 * chunks, 32)
        for i in range(chunks):
            piece = words(min(75, n_tokens - 75 * i), start=75 * i)
            assert torch.equal(context[:, 77 * i:77 * (i + 1)], encoder.condition([piece]))


def test_break_starts_a_new_chunk(encoder):
    with torch.no_grad():
        context = encoder.condition(["red cat, on a house BREAK blue dog"])
        assert context.shape == (1, 154, 32)
        assert torch.equal(context[:, :77], encoder.condition(["red cat, on a house"]))
        assert torch.equal(context[:, 77:], encoder.condition(["blue dog"]))
        three = encoder.condition(["BREAK red cat BREAK BREAK dog BREAK"])   # as A1111: empty chunks included
        empty, cat, dog = (encoder.condition([p]) for p in ("", "red cat", "dog"))
    assert torch.equal(three, torch.cat([empty, cat, empty, dog], dim=1))


def test_a_chunk_breaks_after_the_last_comma_within_20_tokens(encoder):
    near = words(70) + ", " + words(10, start=70)        # the comma is token 71: 5 tokens from the end
    (first, _), (second, _) = prompt_chunks(encoder, near)
    assert len(first) == 71 and first[-1] == _bpe().encoder[",</w>"] and len(second) == 10
    far = words(50) + ", " + words(30, start=50)           # 25 tokens after the comma: a plain cut at 75
    (first, _), (second, _) = prompt_chunks(encoder, far)
    assert len(first) == 75 and len(second) == 6
    assert len(prompt_chunks(encoder, near, comma_backtrack=0)[0][0]) == 75
    with torch.no_grad():
        context = encoder.condition([near])
        assert torch.equal(context[:, :77], encoder.condition([words(70) + ","]))
        assert torch.equal(context[:, 77:], encoder.condition([words(10, start=70)]))


def test_the_default_models_24_token_window_makes_chunks_of_22():
    encoder = small_encoder(context_length=24)
    with torch.no_grad():
        assert torch.equal(encoder.condition(["red apple"]), encoder.encode(["red apple"]))
        context = encoder.condition([words(30)])
        assert context.shape == (1, 48, 32)
        assert torch.equal(context[:, 24:], encoder.condition([words(8, start=22)]))


def test_a_batch_pads_shorter_prompts_with_empty_chunks(encoder):
    with torch.no_grad():
        batch = encoder.condition(["red cat", words(150)])
        assert batch.shape == (2, 154, 32)
        # equal up to the rounding of a batch of 2 against 1
        torch.testing.assert_close(batch[:1, :77], encoder.condition(["red cat"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(batch[:1, 77:], encoder.condition([""]), rtol=0, atol=1e-5)
    chunks = chunk_prompts(encoder, ["red cat"], count=3)
    assert chunks.tokens.shape == (1, 3, 77) and torch.equal(chunks.tokens[0, 1], encoder.tokenize([""])[0])


def test_prompt_and_negative_prompt_padded_to_one_length(encoder, conditioner):
    with torch.no_grad():
        cond, uncond = encoder.condition([words(100)]), encoder.condition(["blurry"])
        cond2, uncond2 = pad_to_same_length(encoder, cond, uncond)
        assert cond2 is cond and uncond2.shape == cond.shape
        assert torch.equal(uncond2[:, :77], uncond) and torch.equal(uncond2[:, 77:], encoder.condition([""]))
        assert pad_to_same_length(encoder, uncond, cond)[0].shape == cond.shape   # either side
        long = conditioner.condition([words(80)], image_size=(64, 64))
        zeros = conditioner.condition([""], image_size=(64, 64), unconditional=True)
        long2, zeros2 = pad_to_same_length(conditioner, long, zeros)
        assert zeros2["context"].shape == long["context"].shape and torch.equal(zeros2["y"], zeros["y"])
        assert not zeros2["context"][:, :77].any()   # the zeroed SDXL uncond, then an encoded empty chunk
        assert torch.equal(zeros2["context"][:, 77:], empty_context(conditioner))


# --- weights --------------------------------------------------------------------------------------------------

def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's EmphasisOriginal for one prompt: z * w, then * mean(z) / mean(z * w)."""
    weighted = z * weights[..., None]
    return weighted * (z.mean() / weighted.mean())


def test_weights_multiply_hidden_states_and_restore_the_mean(encoder):
    with torch.no_grad():
        z = encoder.condition(["a red cat"])
        weights = torch.ones(1, 77)
        weights[0, 2] = 1.5                                    # SOT, a, red, cat, EOT: "red" is token 2
        got = encoder.condition(["a (red:1.5) cat"])
        torch.testing.assert_close(got, a1111_emphasis(z, weights), rtol=0, atol=1e-7)
        assert (got - z).abs().max() > 1e-3
        torch.testing.assert_close(got.mean(), z.mean(), rtol=0, atol=1e-7)
        # ((red)) and [cat] in the second chunk: that chunk is weighted, the first stays as encoded
        prompt = words(75) + " ((red)) [cat]"
        z2 = encoder.condition([words(75) + " red cat"])
        w2 = torch.ones(1, 77)
        w2[0, 1], w2[0, 2] = 1.1 * 1.1, 1 / 1.1
        got2 = encoder.condition([prompt])
    assert torch.equal(got2[:, :77], z2[:, :77])
    torch.testing.assert_close(got2[:, 77:], a1111_emphasis(z2[:, 77:], w2), rtol=0, atol=1e-7)
    chunks = chunk_prompts(encoder, [prompt])
    assert chunks.weights[0, 1, :4].tolist() == pytest.approx([1.0, 1.21, 1 / 1.1, 1.0])


def test_each_prompt_of_a_batch_keeps_its_own_mean(encoder):
    with torch.no_grad():
        alone = encoder.condition(["a (red:1.5) cat"])
        batch = encoder.condition(["a (red:1.5) cat", "(a dog:0.5)"])
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)   # batch rounding; A1111 mixes the rows


def test_sdxl_weights_each_tower_and_pools_the_first_chunk(conditioner):
    size = (64, 64)
    with torch.no_grad():
        plain = conditioner.condition(["a red cat"], image_size=size)
        weighted = conditioner.condition(["a (red:1.5) cat"], image_size=size)
        w = torch.ones(1, 77)
        w[0, 2] = 1.5
        want = emphasize(plain["context"], [w, w], widths=[32, 16])
        assert torch.equal(weighted["context"], want)
        torch.testing.assert_close(want[..., :32], a1111_emphasis(plain["context"][..., :32], w), rtol=0, atol=1e-7)
        torch.testing.assert_close(want[..., 32:], a1111_emphasis(plain["context"][..., 32:], w), rtol=0, atol=1e-7)
        assert torch.equal(weighted["y"], plain["y"])   # the pooled vector is not weighted (A1111)
        long = conditioner.condition([words(80)], image_size=size)
        first = conditioner.condition([words(75)], image_size=size)
        rest = conditioner.condition([words(5, start=75)], image_size=size)
    assert long["context"].shape == (1, 154, 48)
    assert torch.equal(long["context"], torch.cat([first["context"], rest["context"]], dim=1))
    assert torch.equal(long["y"], first["y"])   # pooled of the first chunk, as A1111's zs[0].pooled


def test_generate_pads_a_long_prompt_and_a_short_negative_to_the_same_chunks():
    """The pipeline encodes both sides in chunks and pads the shorter one (A1111), so guidance gets equal shapes."""
    import ldm
    model = ldm.load_model()
    long_prompt = "a " + " ".join(["red smiling face with hearts"] * 8)  # over the default model's 22-token window
    cond = model.text_encoder.condition([long_prompt])
    assert cond.shape[1] == 2 * model.text_encoder.context_length
    image = model.generate(long_prompt, negative_prompt="blurry", steps=2, seed=1)[0]
    assert image.size == (32, 32)
