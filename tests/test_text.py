"""Text conditioning: SD key layouts, equality with open_clip (and HF CLIP), tokenizer, config, training."""
from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from common.checkpoint import load_state_dict_checked, save_checkpoint
from common.errors import InputError
from ldm.text import TextEncoderConfig, build_text_encoder
from ldm.text.encoders import OpenCLIPTextEncoder, SmallTextEncoder
from ldm.text.keymaps import hf_clip_to_open_clip, load_open_clip_weights, open_clip_to_hf_clip
from ldm.text.tokenizer import tokenize

from helpers import reference_dir

V2_COND = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
           "params": {"freeze": True, "layer": "penultimate"}}            # as in v2-inference(-v).yaml
V1_COND = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}  # as in v1-inference.yaml
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}
PROMPTS = ["a photograph of an astronaut riding a horse", "", "Hello, World!  it's 3.14 café",
           "An oil painting, trending on ArtStation; 4k HDR (masterpiece)"]


def _manifest(name: str) -> tuple[dict[str, list[int]], dict]:
    """cond_stage_model.* of an SD key manifest, prefix removed, in state_dict order."""
    data = json.loads((reference_dir("sd-formats") / name).read_text())
    prefix = "cond_stage_model."
    return {k[len(prefix):]: v for k, v in data["keys"].items() if k.startswith(prefix)}, data


def _shapes(state: dict[str, torch.Tensor]) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in state.items()]


def _tiny_clip(quick_gelu: bool = False) -> CLIP:
    """A small random open_clip CLIP: real vocabulary and context, tiny widths, a tiny vision tower."""
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    clip = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIPTextCfg(**TINY_TEXT), quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # open_clip initialises biases and LayerNorms to constants; make every weight count
        for name, p in clip.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_final" in name:
                p.add_(0.1 * torch.randn_like(p))
    return clip


def _text_state(clip: CLIP) -> dict[str, torch.Tensor]:
    return {"model." + k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


# --- state-dict layouts of SD 2.x and SD 1.x ---------------------------------------------------------

def test_sd2_open_clip_keys_equal_the_manifest():
    reference, data = _manifest("sd-v2-keys.json")
    with torch.device("meta"):
        encoder = build_text_encoder(TextEncoderConfig.from_original(V2_COND))
    assert _shapes(encoder.state_dict()) == list(reference.items())   # names, order and shapes
    assert sum(p.numel() for p in encoder.parameters()) == data["param_counts"]["cond_stage_model"]["parameters"]
    assert encoder.layer == "penultimate" and encoder.pad_token_id == 0 and encoder.width == 1024
    assert not any(name.startswith("model.visual") for name, _ in encoder.named_modules())


def test_sd1_hf_keys_map_to_our_module_and_back():
    reference, data = _manifest("sd-v1-keys.json")
    hf = {k: torch.empty(shape, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float32)
          for k, shape in reference.items()}
    with torch.device("meta"):
        encoder = build_text_encoder(TextEncoderConfig.from_original(V1_COND))
    ours = encoder.state_dict()
    assert _shapes(hf_clip_to_open_clip(hf)) == _shapes(ours)
    assert _shapes(open_clip_to_hf_clip(ours)) == list(reference.items())   # transformers 4.19 order
    assert sum(p.numel() for p in encoder.parameters()) == data["param_counts"]["cond_stage_model"]["parameters"]
    assert isinstance(encoder.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert (encoder.layer, encoder.pad_token_id, encoder.width) == ("last", 49407, 768)


def test_hf_mapping_is_an_exact_inverse(tmp_path):
    encoder = OpenCLIPTextEncoder(TINY_TEXT, embed_dim=None, quick_gelu=True, layer="last")
    ours = encoder.state_dict()
    hf = open_clip_to_hf_clip(ours)
    assert hf["transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(hf["transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    back = hf_clip_to_open_clip(hf)
    assert list(back) == list(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    save_checkpoint(tmp_path / "sd1-text.safetensors", hf, {})   # no shared-memory views left (q, k, v)
    with pytest.raises(InputError, match="text_projection"):
        open_clip_to_hf_clip(OpenCLIPTextEncoder(TINY_TEXT, embed_dim=32).state_dict())
    with pytest.raises(InputError, match="final_layer_norm"):
        hf_clip_to_open_clip({k: v for k, v in hf.items() if "final_layer_norm" not in k})


# --- numerics against open_clip and transformers ---------------------------------------------------------

@pytest.mark.parametrize("quick_gelu", [False, True])
def test_equals_open_clip_last_and_penultimate(quick_gelu):
    clip = _tiny_clip(quick_gelu)
    tokens = open_clip.tokenize(PROMPTS)
    last = OpenCLIPTextEncoder(TINY_TEXT, embed_dim=32, quick_gelu=quick_gelu, layer="last")
    penultimate = OpenCLIPTextEncoder(TINY_TEXT, embed_dim=32, quick_gelu=quick_gelu, layer="penultimate")
    assert list(last.state_dict()) == list(_text_state(clip))   # CLIP's own names and order, minus visual.*
    for encoder in (last, penultimate):
        load_state_dict_checked(encoder, _text_state(clip), source="tiny CLIP")
    with torch.no_grad():
        x = clip.token_embedding(tokens) + clip.positional_embedding   # by hand from the CLIP's modules
        for block in clip.transformer.resblocks[:-1]:
            x = block(x, attn_mask=clip.attn_mask)
        want_penultimate = clip.ln_final(x)
        want_last = clip.ln_final(clip.transformer.resblocks[-1](x, attn_mask=clip.attn_mask))
        got_last, got_penultimate = last(tokens), penultimate(tokens)
        pooled = got_last[torch.arange(len(tokens)), tokens.argmax(-1)] @ last.model.text_projection
        want_pooled = clip.encode_text(tokens)
    # same modules, same operations: equal to the bit
    assert torch.equal(got_last, want_last) and torch.equal(got_penultimate, want_penultimate)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-6)   # open_clip's encode_text, end to end
    assert got_last.shape == (len(PROMPTS), 77, 64)
    assert (got_last - got_penultimate).abs().max() > 0.1   # the last block matters: the two layers differ


def test_equals_hf_clip_text_model():
    transformers = pytest.importorskip("transformers")   # test-only peer
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    hf = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():   # HF initialises biases to 0 and LayerNorms to 1: randomise so q/k/v biases are tested
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = OpenCLIPTextEncoder({**TINY_TEXT, "layers": 2}, quick_gelu=True, layer="last", pad_token_id=49407)
    state = hf.state_dict()   # transformers 5: no "text_model." level; SD 1.x files have "transformer.text_model."
    load_state_dict_checked(ours, hf_clip_to_open_clip({"transformer.text_model." + k: v for k, v in state.items()}),
                            source="HF CLIPTextModel")
    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        want = hf(input_ids=tokens).last_hidden_state
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tokenizer_equals_hf_clip_tokenizer_with_eot_padding():
    transformers = pytest.importorskip("transformers")
    from ldm.text.tokenizer import _bpe
    bpe = _bpe()   # build an HF CLIPTokenizer from open_clip's own vocabulary and merges (no download)
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): i for k, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    prompts = PROMPTS + ["a " * 100]
    want = hf(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="dropped"):
        assert torch.equal(tokenize(prompts, pad_token_id=49407), want)   # SD 1.x FrozenCLIPEmbedder's call


# --- tokenizer ------------------------------------------------------------------------------------------

def test_tokenize_padding_sot_eot():
    tokens = tokenize(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))   # SD 2.x: padding with 0
    eot_padded = tokenize(PROMPTS, pad_token_id=49407)
    for row, row_eot in zip(tokens, eot_padded):
        end = int((row == 49407).nonzero()[0])
        assert row[0] == 49406 and (row[end + 1:] == 0).all()
        assert torch.equal(row_eot[:end + 1], row[:end + 1]) and (row_eot[end:] == 49407).all()
    assert tokens[1, :3].tolist() == [49406, 49407, 0]   # the empty prompt: SOT, EOT, padding


def test_long_prompt_warns_and_keeps_eot_last():
    prompt = "a " * 100   # "a" is one token: 100 + SOT + EOT = 102 tokens, so 25 are dropped
    with pytest.warns(UserWarning, match=r"102 tokens.*last 25 tokens were dropped"):
        tokens = tokenize([prompt])
    assert tokens[0, -1] == 49407 and tokens[0, 0] == 49406 and (tokens[0, 1:-1] == tokenize(["a"])[0, 1]).all()
    assert torch.equal(tokens, open_clip.tokenize([prompt]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(["a " * 75])   # exactly 77 tokens: no warning


# --- encode, freezing, training ---------------------------------------------------------------------------

def test_empty_prompt_is_the_unconditional_context():
    encoder = OpenCLIPTextEncoder(TINY_TEXT, embed_dim=32)
    with torch.no_grad():
        uncond = encoder.encode([""])
        batch = encoder.encode(["", "a red apple", ""])
    assert uncond.shape == (1, 77, 64)
    assert torch.equal(uncond, encoder(open_clip.tokenize([""])))
    torch.testing.assert_close(batch[0], uncond[0])
    torch.testing.assert_close(batch[2], uncond[0])
    assert (batch[1] - uncond[0]).abs().max() > 1e-3
    with pytest.raises(InputError, match="shape"):
        encoder(torch.zeros(1, 76, dtype=torch.long))


def test_frozen_unless_trainable():
    frozen = OpenCLIPTextEncoder(TINY_TEXT)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training   # a frozen encoder stays in eval mode inside a model being trained
    trainable = OpenCLIPTextEncoder(TINY_TEXT, trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    small = build_text_encoder({"kind": "small", "width": 32, "layers": 2, "heads": 4})
    assert small.trainable and all(p.requires_grad for p in small.parameters()) and small.layer == "last"
    unfrozen = TextEncoderConfig.from_original({**V2_COND, "params": {"freeze": False, "layer": "penultimate"}})
    assert unfrozen.trainable


def test_small_encoder_trains():
    encoder = SmallTextEncoder(width=32, layers=2, heads=4)
    prompts = ["a red apple", "a blue car on a road"]
    target = torch.randn(2, 77, 32)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(encoder.encode(prompts), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert list(encoder.state_dict())[:2] == ["model.positional_embedding", "model.transformer.resblocks.0.ln_1.weight"]


# --- open_clip checkpoint files ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_load_open_clip_weights(tmp_path, suffix):
    clip = _tiny_clip()
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}   # full CLIP: visual.* included
    if suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    encoder = OpenCLIPTextEncoder(TINY_TEXT, embed_dim=32, layer="last")
    load_open_clip_weights(encoder, path)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        want = clip.ln_final(clip.transformer(clip.token_embedding(tokens) + clip.positional_embedding,
                                              attn_mask=clip.attn_mask))
        assert torch.equal(encoder(tokens), want)
    no_projection = OpenCLIPTextEncoder(TINY_TEXT, layer="last")   # SD 1.x-style module: skips the projection
    load_open_clip_weights(no_projection, path)
    assert torch.equal(no_projection.model.token_embedding.weight, clip.token_embedding.weight)
    with pytest.raises(InputError, match="shape mismatches"):
        load_open_clip_weights(OpenCLIPTextEncoder({**TINY_TEXT, "width": 32}, embed_dim=32), path)
    with pytest.raises(InputError, match="missing keys: model.transformer.resblocks.3"):
        load_open_clip_weights(OpenCLIPTextEncoder({**TINY_TEXT, "layers": 4}, embed_dim=32), path)


# --- config ------------------------------------------------------------------------------------------------

def test_config_round_trip_and_defaults():
    config = TextEncoderConfig()
    assert (config.arch, config.layer, config.pad_token_id, config.trainable) == ("ViT-H-14", "penultimate", 0, False)
    small = TextEncoderConfig(kind="small", width=64, layers=2, heads=4)
    assert (small.layer, small.trainable) == ("last", True)
    for c in (config, small, TextEncoderConfig.from_original(V1_COND)):
        assert TextEncoderConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    v1 = TextEncoderConfig.from_original(V1_COND)
    assert (v1.arch, v1.quick_gelu, v1.layer, v1.pad_token_id, v1.with_projection) == ("ViT-L-14", True, "last", 49407, False)
    v2 = TextEncoderConfig.from_original(V2_COND)
    assert (v2.arch, v2.layer, v2.pad_token_id, v2.trainable) == ("ViT-H-14", "penultimate", 0, False)
    assert TextEncoderConfig.from_original({"target": V2_COND["target"]}).layer == "last"   # the original's default


def test_config_errors():
    with pytest.raises(InputError, match=r"unknown keys \['depth'\]"):
        TextEncoderConfig.from_dict({"kind": "small", "depth": 3})
    with pytest.raises(InputError, match="kind 'bert'"):
        TextEncoderConfig(kind="bert")
    with pytest.raises(InputError, match="layer 'middle'"):
        TextEncoderConfig(layer="middle")
    with pytest.raises(InputError, match="multiple of heads"):
        TextEncoderConfig(kind="small", width=30, heads=4)
    with pytest.raises(InputError, match="FrozenCLIPEmbedder"):   # the message lists the supported targets
        TextEncoderConfig.from_original({"target": "ldm.modules.encoders.modules.BERTEmbedder"})
    with pytest.raises(InputError, match="unknown params"):
        TextEncoderConfig.from_original({"target": V2_COND["target"], "params": {"layers": 3}})
    with pytest.raises(InputError, match="did you mean"):
        build_text_encoder({"kind": "open_clip", "arch": "ViT-H-15"})
    with pytest.raises(InputError, match="tokenizer"), torch.device("meta"):
        build_text_encoder({"arch": "ViT-B-16-SigLIP"})


def test_any_open_clip_arch_builds_without_the_vision_tower():
    with torch.device("meta"):
        big_g = build_text_encoder({"arch": "ViT-bigG-14"})             # SDXL's second encoder
        quick = build_text_encoder({"arch": "ViT-L-14-quickgelu", "layer": "last"})
    assert big_g.width == 1280 and len(big_g.model.transformer.resblocks) == 32
    assert isinstance(quick.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
