"""diffusers-format folders: read into the original layout, loaded end to end, and written back.

The folders are written by diffusers' own `save_pretrained` from tiny random models (SD 1.x / 2.x layouts) and,
for SDXL, from the tiny-sdxl fixture converted with diffusers' own single-file converters; outputs are compared
with the diffusers / transformers modules on the same inputs.
"""
from __future__ import annotations

import copy
import json
import math
import runpy
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ldm
from autoencoder import AutoencoderConfig, AutoencoderKL
from common.errors import InputError
from ldm.denoisers.unet import UNetConfig, UNetModel
from ldm.formats.configs import from_original_config
from ldm.formats.diffusers import (
    clip_tokenizer_files,
    is_diffusers_folder,
    read_diffusers_folder,
    write_diffusers_folder,
)
from ldm.formats.original_configs import SD_V1, SD_V2, to_original_config, to_original_state_dict
from ldm.text.encoders import OpenCLIPTextEncoder
from ldm.text.keymaps import hf_clip_to_open_clip

from helpers import REPO, reference_dir

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

UNET, VAE = "model.diffusion_model.", "first_stage_model."


def strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def tiny_sdxl_text_towers(raw: dict, checkpoint: dict):
    """The tiny-sdxl fixture's two text towers as transformers models (its README's cross-check): CLIP-L's
    weights as they are, bigG's through diffusers' own open_clip converter."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    towers = raw["tiny_text_encoders"]
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**towers["clip_l"]))
    weights = {k: v for k, v in strip(checkpoint, "conditioner.embedders.0.transformer.").items()
               if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in clip_l.state_dict()):  # transformers 5 names it without
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    clip_l.load_state_dict(weights, strict=True)
    text_cfg = towers["open_clip"]["text_cfg"]
    big_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=text_cfg["vocab_size"], hidden_size=text_cfg["width"], intermediate_size=4 * text_cfg["width"],
        num_hidden_layers=text_cfg["layers"], num_attention_heads=text_cfg["heads"], max_position_embeddings=77,
        hidden_act="gelu", projection_dim=towers["open_clip"]["embed_dim"], bos_token_id=2560, eos_token_id=2561,
        pad_token_id=0))
    big_g.load_state_dict(convert_open_clip_checkpoint(big_g, checkpoint, prefix="conditioner.embedders.1.model."),
                          strict=True)
    return clip_l, big_g


def tiny_tokenizer():
    folder = reference_dir("tiny-sdxl") / "tokenizer"
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def save_sd_folder(folder, version: int):
    """A tiny SD 1.x- or 2.x-layout pipeline written by diffusers: 3 levels (attention on the first two, as SD's
    last level has none), 2 resnets per level; SD 2.x: linear projections, heads of 8 channels, OpenCLIP-style
    (gelu) text tower, v-prediction with trailing spacing."""
    sd2 = version == 2
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[4, 4, 8] if sd2 else 4, use_linear_projection=sd2)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                  sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=2562, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=16, bos_token_id=2560, eos_token_id=2561,
        pad_token_id=2561))
    with torch.no_grad():  # away from the inits that zero some output layers
        for p in [*unet.parameters(), *vae.parameters(), *text.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction" if sd2 else "epsilon",
                                        timestep_spacing="trailing" if sd2 else "leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(), unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return unet.eval(), vae.eval(), text.eval()


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "model"
    return 1, folder, save_sd_folder(folder, 1)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2") / "model"
    return 2, folder, save_sd_folder(folder, 2)


@pytest.fixture(params=[1, 2], ids=["sd1", "sd2"])
def sd_folder(request):
    return request.getfixturevalue(f"sd{request.param}_folder")


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g),
            torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)


def test_sd_folder_reads_into_the_original_layout_and_computes_what_diffusers_does(sd_folder):
    version, folder, (unet, vae, text) = sd_folder
    assert is_diffusers_folder(folder) and not is_diffusers_folder(folder / "unet")
    tensors, config = read_diffusers_folder(folder)
    params = config["model"]["params"]
    assert params["parameterization"] == ("v" if version == 2 else "eps")
    assert params["timestep_spacing"] == ("trailing" if version == 2 else "leading")
    assert (params["scale_factor"], params["beta_schedule"], params["linear_start"]) == (0.18215, "linear", 0.00085)
    # every tensor is renamed into a part, and each part loads strictly into our modules built from the config
    ours_unet = UNetModel(UNetConfig.from_original(params["unet_config"]["params"])).eval()
    ours_unet.load_state_dict(strip(tensors, UNET), strict=True)
    first_stage = params["first_stage_config"]["params"]
    ae_config = AutoencoderConfig.from_dict({**first_stage["ddconfig"], "embed_dim": first_stage["embed_dim"]})
    ours_vae = AutoencoderKL(ae_config)
    ours_vae.eval().load_state_dict(strip(tensors, VAE), strict=True)
    cond = params["cond_stage_config"]
    if version == 1:  # SD 1.x keeps CLIP in Hugging Face layout; loading maps it as for an original file
        assert cond["target"].endswith("FrozenCLIPEmbedder") and tensors[
            "cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
        hf = cond["params"]["hf_config"]
        text_cfg = {"context_length": 77, "vocab_size": hf["vocab_size"], "width": hf["hidden_size"],
                    "heads": hf["num_attention_heads"], "layers": hf["num_hidden_layers"],
                    "mlp_ratio": hf["intermediate_size"] / hf["hidden_size"]}
        ours_text = OpenCLIPTextEncoder(text_cfg, quick_gelu=True, layer="last")
        weights = hf_clip_to_open_clip(strip(tensors, "cond_stage_model."))
    else:  # SD 2.x: open_clip layout with a 3rd, all-zero block; "penultimate" of 3 = the folder's 2 blocks + ln_final
        assert cond["target"].endswith("FrozenOpenCLIPEmbedder") and cond["params"]["text_cfg"]["layers"] == 3
        ours_text = OpenCLIPTextEncoder(cond["params"]["text_cfg"], embed_dim=cond["params"]["embed_dim"],
                                        layer=cond["params"]["layer"])
        weights = strip(tensors, "cond_stage_model.")
        assert not any(v.any() for k, v in weights.items() if k.startswith("model.transformer.resblocks.2."))
        assert weights["model.logit_scale"].item() == pytest.approx(math.log(100))
    ours_text.load_state_dict(weights, strict=True)
    n_text = len(strip(tensors, "cond_stage_model."))
    assert len(tensors) == len(ours_unet.state_dict()) + len(ours_vae.state_dict()) + n_text
    x, t, context, image = inputs()
    tokens = torch.randint(0, 2560, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(ours_unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_vae.encode(image).mean, vae.encode(image).latent_dist.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_vae.decode(x[:1]), vae.decode(x[:1]).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_text(tokens), text(tokens).last_hidden_state, atol=1e-5, rtol=0)
        if version == 2:  # the zero block is the identity: "last" computes the same
            ours_text.layer = "last"
            torch.testing.assert_close(ours_text(tokens), text(tokens).last_hidden_state, atol=1e-5, rtol=0)


def test_load_model_reads_a_diffusers_folder_end_to_end(sd_folder, tmp_path):
    """Without its text encoder (our SD 1.x / 2.x text configs name the full-size towers), the folder loads as a
    whole model: the scheduler's parameterization, the UNet and the VAE, as diffusers computes them."""
    version, source, (unet, vae, _) = sd_folder
    folder = tmp_path / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None],
                                                         "tokenizer": [None, None]}))
    model = ldm.load_model(folder)
    assert model.text_encoder is None and model.parameterization == ("v" if version == 2 else "eps")
    x, t, context, image = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser(x, t, context), unet(x, t, encoder_hidden_states=context).sample,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.autoencoder.decode(x[:1]), vae.decode(x[:1]).sample, atol=1e-5, rtol=0)


def test_sd_folder_round_trip_loads_in_diffusers_and_reads_back_bitwise(sd_folder, tmp_path):
    version, folder, _ = sd_folder
    tensors, config = read_diffusers_folder(folder)
    write_diffusers_folder(tensors, config, tmp_path / "out")
    check_diffusers_loads(tmp_path / "out", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"},
                          {"text_encoder": "CLIPTextModel"})
    again, config_again = read_diffusers_folder(tmp_path / "out")
    assert config_again == config and again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"] == [None, None]  # tiny vocabulary
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    assert scheduler.config.prediction_type == ("v_prediction" if version == 2 else "epsilon")
    assert not list(tmp_path.glob(".out.*"))  # the temporary folder was renamed


def check_diffusers_loads(folder, models: dict, text_models: dict) -> None:
    """Each part loads with diffusers' / transformers' `from_pretrained` with no missing or unexpected keys."""
    for part, name in models.items():
        _, info = getattr(diffusers, name).from_pretrained(folder / part, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (part, info)
    for part, name in text_models.items():
        _, info = getattr(transformers, name).from_pretrained(folder / part, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (part, info)


# --- SDXL ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """tiny-sdxl's model.safetensors as diffusers converts and saves it (the fixture README's cross-check)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    ref = reference_dir("tiny-sdxl")
    raw = yaml.safe_load((ref / "config.yaml").read_text())
    checkpoint = load_file(ref / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = create_unet_diffusers_config_from_ldm(raw, checkpoint)
        vae_config = create_vae_diffusers_config_from_ldm(raw, checkpoint)
    unet_config.update(addition_embed_type="text_time", addition_time_embed_dim=8, class_embed_type=None)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    clip_l, big_g = tiny_sdxl_text_towers(raw, checkpoint)
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    tokenizer_2.pad_token = "!"
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="trailing")
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tokenizer,
                                        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder, raw, checkpoint


def test_sdxl_folder_reads_back_the_original_file(sdxl_folder):
    folder, raw, checkpoint = sdxl_folder
    tensors, config = read_diffusers_folder(folder)
    expected = {k: v for k, v in checkpoint.items() if k != "denoiser.sigmas"}
    assert tensors.keys() == expected.keys()
    unequal = [k for k, v in expected.items() if not (tensors[k].dtype == v.dtype and torch.equal(tensors[k], v))]
    # logit_scale (unused) is not in diffusers folders: it reads as ln 100, released SDXL's value; the fixture
    # kept open_clip's initial ln(1 / 0.07)
    assert unequal == ["conditioner.embedders.1.model.logit_scale"]
    assert tensors[unequal[0]].item() == pytest.approx(math.log(100))
    params, fixture = config["model"]["params"], raw["model"]["params"]
    assert params["network_config"] == fixture["network_config"]
    assert params["scale_factor"] == fixture["scale_factor"] and params["timestep_spacing"] == "trailing"
    embedders = params["conditioner_config"]["params"]["emb_models"]
    towers = raw["tiny_text_encoders"]
    not_sizes = ("projection_dim", "bos_token_id", "eos_token_id", "pad_token_id")  # no HFCLIPConfig fields
    assert embedders[0]["params"] == {"layer": "hidden", "layer_idx": 2, "hf_config": {
        k: v for k, v in towers["clip_l"].items() if k not in not_sizes}}
    big_g = embedders[1]["params"]
    assert (big_g["layer"], big_g["always_return_pooled"], big_g["legacy"]) == ("penultimate", True, False)
    assert (big_g["text_cfg"], big_g["embed_dim"]) == (towers["open_clip"]["text_cfg"],
                                                       towers["open_clip"]["embed_dim"])
    assert [(e["input_key"], e["params"]) for e in embedders[2:]] == [
        (e["input_key"], e["params"]) for e in fixture["conditioner_config"]["params"]["emb_models"][2:]]
    assert (config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]
            == fixture["first_stage_config"]["params"]["ddconfig"]["ch_mult"])


def test_sdxl_folder_loads_end_to_end_and_equals_the_original_model(sdxl_folder):
    folder, _, _ = sdxl_folder
    cases = load_file(reference_dir("tiny-sdxl") / "cases.safetensors")
    model = ldm.load_model(folder)
    sizes = {name: cases[f"in_{name}"]
             for name in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")}
    with torch.no_grad():
        cond = model.text_encoder([cases["tokens_clip_l"], cases["tokens_open_clip"]], sizes)
        out = model.denoiser(cases["unet_x"], cases["unet_t"], cases["cond_crossattn"], y=cases["cond_vector"])
        decoded = model.autoencoder.decode(cases["ae_posterior_mean"])
    torch.testing.assert_close(cond["context"], cases["cond_crossattn"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["y"], cases["cond_vector"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, cases["unet_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, cases["ae_decoded"], atol=1e-5, rtol=0)


def test_sdxl_round_trip_loads_in_diffusers_and_reads_back_bitwise(sdxl_folder, tmp_path):
    folder, _, _ = sdxl_folder
    tensors, config = read_diffusers_folder(folder)
    write_diffusers_folder(tensors, config, tmp_path / "out")
    check_diffusers_loads(tmp_path / "out", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"},
                          {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"})
    again, config_again = read_diffusers_folder(tmp_path / "out")
    assert config_again == config and again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == ("StableDiffusionXLPipeline", True)
    # the written bigG tower pools as sgm does (eos_token_id 2: the argmax token, EOT)
    cases = load_file(reference_dir("tiny-sdxl") / "cases.safetensors")
    big_g = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "out" / "text_encoder_2").eval()
    with torch.no_grad():
        out = big_g(cases["tokens_open_clip"], output_hidden_states=True)
    torch.testing.assert_close(out.text_embeds, cases["open_clip_pooled"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[-2], cases["open_clip_penultimate"], atol=1e-5, rtol=0)


def test_tokenizer_files_are_hugging_faces_clip_tokenizer():
    folder = reference_dir("tiny-sdxl") / "tokenizer"
    tiny = clip_tokenizer_files(pad_token="<|endoftext|>", bpe=folder / "bpe_tiny.txt.gz")
    assert json.loads(tiny["vocab.json"]) == json.loads((folder / "vocab.json").read_text())
    assert tiny["merges.txt"] == (folder / "merges.txt").read_text()
    full = json.loads(clip_tokenizer_files(pad_token="!")["vocab.json"])
    assert len(full) == 49408 and full["<|startoftext|>"] == 49406 and full["<|endoftext|>"] == 49407


# --- the converter, weights files, bad input ----------------------------------------------------------------

def test_convert_checkpoint_writes_a_diffusers_folder(tmp_path, monkeypatch):
    config = copy.deepcopy(SD_V1)
    params = config["model"]["params"]
    params["unet_config"]["params"].update(model_channels=32, context_dim=32, num_heads=4, use_checkpoint=False)
    params["unet_config"]["params"].update(channel_mult=[1, 2], attention_resolutions=[2, 1])
    params["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 2])
    params.pop("cond_stage_config")
    model = ldm.LatentDiffusion(from_original_config(config)).eval()
    torch.save({"state_dict": to_original_state_dict(model)}, tmp_path / "small.ckpt")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(to_original_config(model.config)))
    tool = runpy.run_path(str(REPO / "tools" / "convert_checkpoint.py"))
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", str(tmp_path / "small.ckpt"), str(tmp_path / "out"),
                                      "--to", "diffusers", "--config", str(tmp_path / "small.yaml")])
    tool["main"]()
    check_diffusers_loads(tmp_path / "out", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}, {})
    loaded = ldm.load_model(tmp_path / "out")
    x, t, context, _ = inputs()
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, t, context), model.denoiser(x, t, context))
    with pytest.raises(InputError, match="already exists"):  # checked before anything loads
        tool["main"]()


def test_fp16_bin_sharded_and_old_attention_weights_files_are_read(sd1_folder, tmp_path):
    """A `.fp16.safetensors` variant, a pickled `.bin` with the VAE attention names of diffusers < 0.14
    (query/key/value/proj_attn), and shards listed in `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    _, source, _ = sd1_folder
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(unet_file.with_name("diffusion_pytorch_model.fp16.safetensors"))
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    vae = {next((k.replace(new, old) for new, old in old_names.items() if new in k), k): v
           for k, v in load_file(vae_file).items()}
    assert any(".query." in k for k in vae)
    torch.save(vae, vae_file.with_suffix(".bin"))
    vae_file.unlink()
    text_file = folder / "text_encoder" / "model.safetensors"
    text = load_file(text_file)
    names = sorted(text)
    for i, shard in enumerate((names[:10], names[10:])):
        save_file({k: text[k] for k in shard}, folder / "text_encoder" / f"model-0000{i + 1}-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (k not in names[:10])}-of-00002.safetensors" for k in names}
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    text_file.unlink()
    tensors, _ = read_diffusers_folder(folder)
    expected, _ = read_diffusers_folder(source)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)


@pytest.mark.parametrize("damage,message", [
    (lambda f: shutil.rmtree(f / "unet"), r"has no unet/ \(the denoiser\); copy the complete model folder"),
    (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(), r"vae/ has no weights file .* fetch vae/"),
    (lambda f: (f / "text_encoder" / "config.json").write_text("{not json"),
     r"text_encoder/config.json is not valid JSON"),
    (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), r"scheduler/scheduler_config.json is missing"),
    (lambda f: (f / "model_index.json").unlink(), r"is not a diffusers folder"),
])
def test_a_folder_with_a_missing_part_is_one_line_naming_it(sd1_folder, tmp_path, damage, message):
    _, source, _ = sd1_folder
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    damage(folder)
    with pytest.raises(InputError, match=message) as error:
        read_diffusers_folder(folder)
    assert "\n" not in str(error.value)


def test_a_failed_write_leaves_nothing(sd1_folder, tmp_path, monkeypatch):
    _, source, _ = sd1_folder
    tensors, config = read_diffusers_folder(source)
    import ldm.formats.diffusers_writer as writer

    def fail(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(writer, "save_file", fail)
    with pytest.raises(OSError, match="simulated"):
        write_diffusers_folder(tensors, config, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        write_diffusers_folder(tensors, config, tmp_path / "taken")


# --- full size, on the meta device --------------------------------------------------------------------------

MANIFESTS = {"sd1": "sd-formats/sd-v1-keys.json", "sd2": "sd-formats/sd-v2-keys.json",
             "sdxl-base": "sdxl-formats/sdxl-base-keys.json", "sdxl-refiner": "sdxl-formats/sdxl-refiner-keys.json"}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
VIT_H_23 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, hidden_act="gelu", projection_dim=512)  # SD 2.x's text_encoder/config.json
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


def meta_state(cls, *args, **kwargs) -> dict:
    with torch.device("meta"):
        return dict(cls(*args, **kwargs).state_dict())


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_full_size_diffusers_parts_map_to_the_manifest_keys_both_ways(name):
    """The parts of a full-size folder (configs derived by diffusers' own single-file code from the original
    configs, models built on the meta device) become exactly the manifest's keys and shapes, and map back."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    from ldm.formats.diffusers import translate_parts
    from ldm.formats.diffusers_writer import diffusers_files

    folder, file = MANIFESTS[name].split("/")
    manifest = json.loads((reference_dir(folder) / file).read_text())
    sgm = name.startswith("sdxl")
    template = SD_V2 if name == "sd2" else SD_V1
    unet_params = manifest["unet"] if sgm else template["model"]["params"]["unet_config"]["params"]
    original = {"model": {"params": {("network_config" if sgm else "unet_config"): {"params": unet_params},
                                     "first_stage_config": template["model"]["params"]["first_stage_config"]}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = create_unet_diffusers_config_from_ldm(original, {}, image_size=1024 if sgm else 512)
        vae_config = create_vae_diffusers_config_from_ldm(original, {}, image_size=1024 if sgm else 512)
    towers = {"sd1": {"text_encoder": CLIP_L}, "sd2": {"text_encoder": VIT_H_23},
              "sdxl-base": {"text_encoder": CLIP_L, "text_encoder_2": BIG_G},
              "sdxl-refiner": {"text_encoder_2": BIG_G}}[name]
    parts = {"unet": (unet_config, meta_state(diffusers.UNet2DConditionModel, **unet_config)),
             "vae": (vae_config, meta_state(diffusers.AutoencoderKL, **vae_config))}
    for part, sizes in towers.items():
        config = transformers.CLIPTextConfig(**sizes, max_position_embeddings=77)
        cls = transformers.CLIPTextModelWithProjection if part == "text_encoder_2" else transformers.CLIPTextModel
        parts[part] = (config.to_dict(), meta_state(cls, config))
    scheduler = {"prediction_type": "v_prediction" if name == "sd2" else "epsilon"}
    tensors, config = translate_parts(parts, scheduler, Path(name))
    expected = {k: v for k, v in manifest["keys"].items() if k.startswith(("model.", "first_stage_model.", "cond"))}
    assert {k: list(v.shape) for k, v in tensors.items()} == expected
    params = config["model"]["params"]
    if sgm:
        ignored = ("use_checkpoint", "spatial_transformer_attn_type")  # no effect on the weights or the result
        network = {k: v for k, v in params["network_config"]["params"].items() if k not in ignored}
        context_dim = 2048 if name == "sdxl-base" else 1280  # the refiner's config lists it per level
        assert network == {k: v for k, v in manifest["unet"].items() if k not in ignored} | {"context_dim": context_dim}
        embedders = params["conditioner_config"]["params"]["emb_models"]
        assert [e["params"].get("layer_idx", e["params"].get("arch")) for e in embedders[:len(towers)]] == (
            [11, "ViT-bigG-14"] if name == "sdxl-base" else ["ViT-bigG-14"])
    else:
        assert params["cond_stage_config"] == template["model"]["params"]["cond_stage_config"]
    files = diffusers_files(tensors, config)
    for part, (_, state) in parts.items():
        written = files[f"{part}/{'model' if 'text' in part else 'diffusion_pytorch_model'}.safetensors"]
        assert {k.removeprefix("text_model."): list(v.shape) for k, v in written.items()} == {
            k.removeprefix("text_model."): list(v.shape) for k, v in state.items() if not k.endswith("position_ids")}
