"""Checkpoints: our format round-trips, original files load with their config, bad files are refused."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ldm
from autoencoder import AutoencoderKL
from common.checkpoint import read_checkpoint, save_checkpoint
from common.errors import InputError
from ldm.formats.configs import ldm_config_from_dict
from ldm.text import TextEncoderConfig

from helpers import REPO, TINY_AE, reference_dir


def _tiny_model() -> ldm.LatentDiffusion:
    return ldm.LatentDiffusion(ldm.LDMConfig(autoencoder=TINY_AE, parameterization="v"))


def _original_config(tmp_path, ae_config=TINY_AE):
    d = ae_config.to_dict()
    raw = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "parameterization": "eps", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
        "scale_factor": 0.18215,
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": d.pop("embed_dim"), "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {k: v for k, v in d.items() if k != "scale_factor"}}},
        "cond_stage_config": {"target": "torch.nn.Identity"}}}}
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_our_checkpoint_round_trips_without_a_config(tmp_path):
    model = _tiny_model()
    ldm.save_model(model, tmp_path / "m.safetensors")
    loaded = ldm.load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    assert loaded.parameterization == "v" and loaded.denoiser is None and loaded.text_encoder is None
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    half = ldm.load_model(tmp_path / "m.safetensors", dtype=torch.float16)
    assert half.autoencoder.encoder.conv_in.weight.dtype == torch.float16
    assert half.alphas_cumprod.dtype == torch.float32  # the schedule is never rounded to half
    assert torch.equal(half.alphas_cumprod, model.alphas_cumprod)


def test_autoencoder_checkpoint_loads_alone(tmp_path):
    ae = AutoencoderKL(TINY_AE)
    ldm.save_autoencoder(ae, tmp_path / "ae.safetensors")
    assert set(load_file(tmp_path / "ae.safetensors")) == set(ae.state_dict())  # original first-stage names
    loaded = ldm.load_autoencoder(tmp_path / "ae.safetensors")
    assert loaded.config == ae.config
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), loaded.state_dict().values()))
    loaded16 = ldm.load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.float16)
    assert next(loaded16.parameters()).dtype == torch.float16


def test_original_ckpt_with_yaml_config(tmp_path):
    ae = AutoencoderKL(TINY_AE)
    state = {f"first_stage_model.{k}": v for k, v in ae.state_dict().items()}
    state["model_ema.decay"] = torch.tensor(0.9999)  # bookkeeping found in released files: ignored
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "orig.ckpt")
    model = ldm.load_model(tmp_path / "orig.ckpt", config=_original_config(tmp_path))
    assert model.scale_factor == pytest.approx(0.18215) and model.parameterization == "eps"
    assert torch.equal(model.autoencoder.encoder.conv_in.weight, ae.encoder.conv_in.weight)
    with pytest.raises(InputError, match="neither SD 1.x/2.x nor SDXL.*found .*pass config="):
        ldm.load_model(tmp_path / "orig.ckpt")


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    ae = AutoencoderKL(TINY_AE)
    state = {f"first_stage_model.{k}": v for k, v in ae.state_dict().items()}
    del state["first_stage_model.decoder.conv_out.bias"]
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    state["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(InputError) as info:
        ldm.load_model(tmp_path / "bad.safetensors", config=_original_config(tmp_path))
    message = str(info.value)
    assert "missing keys: decoder.conv_out.bias" in message
    assert "unexpected keys: encoder.extra.weight" in message
    assert "encoder.conv_in.weight (checkpoint [64, 3, 3, 3], model [32, 3, 3, 3])" in message


def test_config_that_does_not_fit_the_fixture(tmp_path):
    ref = reference_dir("tiny-sd2")
    raw = yaml.safe_load((ref / "config.yaml").read_text())
    raw["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"] = 64
    with pytest.raises(InputError, match=r"does not fit the config: .*shape mismatches: encoder.conv_in.weight"):
        ldm.load_model(ref / "model.safetensors", config=raw)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": Exploit()}}, tmp_path / "evil.ckpt")
    with pytest.raises(InputError, match="refusing to load.*Nothing was executed"):
        ldm.load_model(tmp_path / "evil.ckpt", config=_original_config(tmp_path))
    assert not marker.exists()


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        ldm.load_model(tmp_path / "nope.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        ldm.load_model(tmp_path / "broken.safetensors")
    (tmp_path / "broken.ckpt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt or not a PyTorch checkpoint"):
        ldm.load_model(tmp_path / "broken.ckpt", config=_original_config(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown file type"):
        ldm.load_model(tmp_path / "model.onnx")


def test_missing_default_model_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(ldm.formats.loading, "DEFAULT_MODEL", tmp_path / "absent.safetensors")
    with pytest.raises(InputError, match="the embedded default model is missing .*absent.safetensors.*--ckpt"):
        ldm.load_model()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("common.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary file left
    tensors, meta = read_checkpoint(path)
    assert json.loads(meta["step"]) == 1 and torch.equal(tensors["w"], torch.ones(3))


def test_our_yaml_and_original_yaml_configs():
    config = ldm.load_ldm_config({"autoencoder": TINY_AE.to_dict(), "diffusion": {"parameterization": "x0"}})
    assert config.parameterization == "x0" and config.autoencoder == TINY_AE
    with pytest.raises(InputError, match="parameterization 'q' is not one of eps, v, x0"):
        ldm.load_ldm_config({"autoencoder": TINY_AE.to_dict(), "diffusion": {"parameterization": "q"}})
    with pytest.raises(InputError, match="neither model.params.first_stage_config"):
        ldm.load_ldm_config({"model": {"target": "x.Y", "params": {}}})
    with pytest.raises(InputError, match="config file not found"):
        ldm.load_ldm_config(REPO / "configs" / "nope.yaml")


def test_full_model_of_our_own_round_trips_and_samples(tmp_path):
    """A complete model in our format: autoencoder, UNet, small text encoder; loads with no config."""
    unet = {"type": "unet", "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "context_dim": 64,
            "use_linear_in_transformer": True}
    text = {"kind": "small", "width": 64, "layers": 2, "heads": 4}
    model = ldm.LatentDiffusion(ldm.LDMConfig(autoencoder=TINY_AE, parameterization="v", denoiser=unet, text_encoder=text))
    ldm.save_model(model, tmp_path / "full.safetensors")
    loaded = ldm.load_model(tmp_path / "full.safetensors")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        cond, uncond = loaded.text_encoder.encode(["a red apple"]), loaded.text_encoder.encode([""])
        assert cond.shape == (1, 77, 64) and not torch.equal(cond, uncond)
        latents = loaded.sample(cond, uncond, x_T=torch.randn(1, 4, 8, 8), steps=3, guidance_scale=5.0)
        images = loaded.decode_latents(latents)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_checkpoints_written_before_the_typed_sections_still_load(tmp_path):
    """Our checkpoints up to 2026-11 stored the original `unet_config` / `cond_stage_config` as
    `{"original": section}`; they load to the same typed config and the same outputs."""
    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml")
    params = yaml.safe_load((ref / "config.yaml").read_text())["model"]["params"]
    assert params["cond_stage_config"]["target"] == "torch.nn.Identity" and model.config.text_encoder is None
    old = {**model.config.to_dict(), "denoiser": {"original": params["unet_config"]}}
    save_checkpoint(tmp_path / "old.safetensors", model.state_dict(),
                    {"kind": "latent_diffusion", "config": json.dumps(old)})
    loaded = ldm.load_model(tmp_path / "old.safetensors")
    assert loaded.config == model.config
    assert loaded.config.denoiser.context_dim == params["unet_config"]["params"]["context_dim"]
    cases = load_file(ref / "cases.safetensors")
    with torch.no_grad():
        out = loaded.denoiser(cases["unet_x"], cases["unet_t"], cases["unet_context"])
    torch.testing.assert_close(out, cases["unet_out"], atol=1e-4, rtol=0)
    bad = {**old, "denoiser": {"original": params["unet_config"], "type": "unet"}}
    save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), {"kind": "latent_diffusion", "config": json.dumps(bad)})
    with pytest.raises(InputError, match="'original' takes no other keys"):
        ldm.load_model(tmp_path / "bad.safetensors")
    sd1_text = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}  # as v1-inference.yaml
    translated = ldm_config_from_dict({**old, "text_encoder": {"original": sd1_text}}).text_encoder
    assert translated == TextEncoderConfig(arch="ViT-L-14", layer="last", quick_gelu=True, pad_token_id=49407,
                                           with_projection=False, trainable=False)
    assert translated.to_original() == sd1_text


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"kind": "test"})
    finally:
        os.umask(previous)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
