"""Textual-inversion embeddings: every file format, exact replacement of the named tokens, SDXL pairs, errors.

The files are small synthetic ones written here in each tool's layout. An embedding whose vectors are copies
of the token embeddings of "red cat" must give exactly the context of the words "red cat".
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from test_prompts import small_encoder, tiny_conditioner, words  # the prompt tests' small encoders
from torch import nn

from common.errors import InputError
from ldm.text.embeddings import AddedTokenEmbedding, load_embeddings, read_embedding, unload_embeddings
from ldm.text.prompts import chunk_prompts, used_embeddings
from ldm.text.tokenizer import _bpe

NAME = "zqxstyle"   # four CLIP tokens, no real word


def token_rows(tower, text: str) -> torch.Tensor:
    """The token embeddings of `text`'s tokens in `tower` (so an embedding of them stands for the words)."""
    owner = tower.transformer.text_model.embeddings if hasattr(tower, "transformer") else tower.model
    return owner.token_embedding.weight[_bpe().encode(text)].detach().clone()


def write_a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": nn.Parameter(vectors)}, "name": "other",
                "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5"}, path)


def write_a1111_safetensors(path, vectors):
    save_file({"emb_params": vectors}, path)


def write_diffusers(path, vectors):
    save_file({"<zqx-style>": vectors}, path)       # learned_embeds.safetensors: {placeholder token: vectors}


def write_diffusers_bin(path, vectors):
    torch.save({"<zqx-style>": vectors}, path)       # learned_embeds.bin


FORMATS = {"a1111.pt": (write_a1111_pt, ".pt"), "a1111.safetensors": (write_a1111_safetensors, ".safetensors"),
           "diffusers.safetensors": (write_diffusers, ".safetensors"), "diffusers.bin": (write_diffusers_bin, ".bin")}


@pytest.fixture(scope="module")
def encoder():
    return small_encoder()


@pytest.fixture(autouse=True)
def _unload(encoder):
    yield
    unload_embeddings(encoder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_and_replaces_exactly_the_named_tokens(encoder, tmp_path, fmt):
    write, suffix = FORMATS[fmt]
    write(tmp_path / f"{NAME}{suffix}", token_rows(encoder, "red cat"))
    report = load_embeddings(encoder, tmp_path)
    assert report.loaded == {NAME: 2} and not report.skipped
    with torch.no_grad():
        assert torch.equal(encoder.condition([f"a {NAME} on a house"]), encoder.condition(["a red cat on a house"]))
        # case and punctuation as CLIP's tokenizer sees them; weights apply to the vectors as to words
        assert torch.equal(encoder.condition([f"a ({NAME.upper()}:1.3), sun"]),
                           encoder.condition(["a (red cat:1.3), sun"]))


def test_a_single_vector_diffusers_file(encoder, tmp_path):
    save_file({"<cat-toy>": token_rows(encoder, "red")[0]}, tmp_path / f"{NAME}.safetensors")   # shape [width]
    assert load_embeddings(encoder, tmp_path / f"{NAME}.safetensors").loaded == {NAME: 1}
    with torch.no_grad():
        assert torch.equal(encoder.condition([f"a {NAME} cat"]), encoder.condition(["a red cat"]))


def test_only_the_named_tokens_change_and_unloading_restores_everything(encoder, tmp_path):
    prompt, other = f"a photo of {NAME} in a house", "a photo of a cat in a house"
    keys = list(encoder.state_dict())
    with torch.no_grad():
        before, before_other = encoder.condition([prompt]), encoder.condition([other])
        torch.manual_seed(3)
        write_a1111_pt(tmp_path / f"{NAME}.pt", torch.randn(3, 32))
        load_embeddings(encoder, tmp_path)
        after = encoder.condition([prompt])
        assert torch.equal(encoder.condition([other]), before_other)      # prompts without the name: as before
        assert torch.equal(after[:, :4], before[:, :4])                    # SOT a photo of: the causal mask
        assert (after[:, 4:7] - before[:, 4:7]).abs().amax(dim=-1).min() > 1e-3   # the 3 vectors
        assert list(encoder.state_dict()) == keys                          # the vocabulary is untouched
        assert isinstance(encoder.model.token_embedding, AddedTokenEmbedding)
        assert encoder.model.token_embedding.weight is encoder.model.token_embedding.base.weight
        unload_embeddings(encoder)
        assert type(encoder.model.token_embedding) is nn.Embedding
        assert torch.equal(encoder.condition([prompt]), before)


def test_an_embedding_is_never_split_across_chunks(encoder, tmp_path):
    write_a1111_safetensors(tmp_path / f"{NAME}.safetensors", torch.randn(3, 32))
    load_embeddings(encoder, tmp_path)
    tokens = chunk_prompts(encoder, [words(73) + f" {NAME} cat"]).tokens[0]
    assert tokens.shape == (2, 77)
    assert tokens[0, 74].item() == 49407                                   # chunk 0: 73 words, then EOT
    assert tokens[1, 1:5].tolist() == [-1, -2, -3, _bpe().encode("cat")[0]]


def test_names_are_the_file_names_and_hashes_are_a1111s(encoder, tmp_path):
    write_a1111_pt(tmp_path / "my-cat.pt", torch.randn(1, 32))
    write_a1111_safetensors(tmp_path / f"{NAME}.safetensors", torch.randn(2, 32))
    report = load_embeddings(encoder, tmp_path)
    assert report.loaded == {"my-cat": 1, NAME: 2}
    digest = hashlib.sha256((tmp_path / "my-cat.pt").read_bytes()).hexdigest()[:10]
    assert used_embeddings(encoder, ["a photo of my-cat", "(my-cat:1.2) and a dog"]) == {"my-cat": digest}
    assert used_embeddings(encoder, "a photo of a cat") == {}
    assert "2 embeddings loaded" in report.describe()
    # what A1111's GET /sdapi/v1/embeddings lists of each: the .pt's training record (none in a .safetensors)
    pt, st = report.files["my-cat"], report.files[NAME]
    assert (pt.step, pt.sd_checkpoint, pt.sd_checkpoint_name, pt.width, pt.count) == (500, "0123abcd", "v1-5", 32, 1)
    assert (st.step, st.sd_checkpoint, st.width, st.count) == (None, None, 32, 2)


def test_sdxl_pair_applies_to_both_towers(tmp_path):
    conditioner = tiny_conditioner()
    clip_l, big_g = conditioner.towers
    save_file({"clip_l": token_rows(clip_l, "red cat"), "clip_g": token_rows(big_g, "red cat")},
              tmp_path / f"{NAME}.safetensors")
    report = load_embeddings(conditioner, tmp_path)
    assert report.loaded == {NAME: 2} and report.files[NAME].width == 32 + 16  # A1111's shape: the pair's sum
    with torch.no_grad():
        got = conditioner.condition([f"a {NAME}"], image_size=(64, 64))
        want = conditioner.condition(["a red cat"], image_size=(64, 64))
        assert torch.equal(got["context"], want["context"])
        assert torch.equal(got["y"], want["y"])   # the pooled vector is still read at EOT
        unload_embeddings(conditioner)
        assert not torch.equal(conditioner.condition([f"a {NAME}"], image_size=(64, 64))["context"], got["context"])
    # only clip_l changed: the context's OpenCLIP half is that of the literal name
    save_file({"clip_l": torch.randn(4, 32), "clip_g": token_rows(big_g, NAME)}, tmp_path / f"{NAME}.safetensors")
    load_embeddings(conditioner, tmp_path)
    with torch.no_grad():
        mixed = conditioner.condition([f"a {NAME}"], image_size=(64, 64))["context"]
        unload_embeddings(conditioner)
        literal = conditioner.condition([f"a {NAME}"], image_size=(64, 64))["context"]
    assert torch.equal(mixed[..., 32:], literal[..., 32:]) and not torch.equal(mixed[..., :32], literal[..., :32])


def test_wrong_width_is_an_input_error_naming_the_file_and_widths(encoder, tmp_path):
    bad = tmp_path / "sd1-style.pt"
    write_a1111_pt(bad, torch.randn(2, 48))
    with pytest.raises(InputError, match=r"sd1-style\.pt has vectors of width 48 .* width 32"):
        load_embeddings(encoder, bad)
    # in a folder it is skipped and listed, and a prompt naming it gets the error
    write_a1111_safetensors(tmp_path / f"{NAME}.safetensors", torch.randn(1, 32))
    report = load_embeddings(encoder, tmp_path)
    assert report.loaded == {NAME: 1} and "width 48" in report.skipped["sd1-style"]
    assert report.files["sd1-style"].width == 48  # read, then skipped: listed with its width
    with pytest.raises(InputError, match=r"names 'sd1-style'.*width 48"):
        encoder.condition(["a sd1-style cat"])
    with torch.no_grad():
        encoder.condition([f"a {NAME} cat"])


def test_sdxl_and_single_tower_files_do_not_mix(encoder, tmp_path):
    pair = tmp_path / "pair.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 16)}, pair)
    with pytest.raises(InputError, match="SDXL embedding .* one text encoder"):
        load_embeddings(encoder, pair)
    single = tmp_path / "single.safetensors"
    write_a1111_safetensors(single, torch.randn(1, 32))
    with pytest.raises(InputError, match="needs a pair: clip_l .* clip_g"):
        load_embeddings(tiny_conditioner(), single)


class NotATensor:
    pass


def test_unsafe_and_unrecognised_files(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "payload": NotATensor()}, unsafe)
    with pytest.raises(InputError, match="refusing to load"):
        read_embedding(unsafe)
    other = tmp_path / "other.safetensors"
    save_file({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2)}, other)
    with pytest.raises(InputError, match="not a textual-inversion embedding"):
        read_embedding(other)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(1, 4)}, uneven)
    with pytest.raises(InputError, match="clip_l has 2 vectors but clip_g has 1"):
        read_embedding(uneven)
    with pytest.raises(InputError, match="not found"):
        load_embeddings(small_encoder(), tmp_path / "missing")


def test_txt2img_embeddings_dir_loads_the_folder_and_uses_the_token(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    import ldm
    width = ldm.load_model().text_encoder.width
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
              tmp_path / "emb" / "zqxstyle.safetensors")
    monkeypatch.setattr(sys, "argv", ["tools/txt2img.py", "--prompt", "a zqxstyle apple", "--steps", "2",
                                      "--embeddings-dir", str(tmp_path / "emb"), "--outdir", str(tmp_path / "out")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "txt2img.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "textual inversion: 1 embeddings loaded (zqxstyle)" in out
    from PIL import Image
    digest = hashlib.sha256((tmp_path / "emb" / "zqxstyle.safetensors").read_bytes()).hexdigest()[:10]
    parameters = Image.open(tmp_path / "out" / "samples" / "00000.png").text["parameters"]
    assert parameters.endswith(f'TI hashes: "zqxstyle: {digest}"')  # A1111's record of the embeddings used
