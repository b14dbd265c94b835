"""Original Stable Diffusion checkpoints: layout, recognition from keys, EMA, parity with diffusers."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import yaml

import ldm
from common.errors import InputError
from ldm.formats.configs import from_original_config
from ldm.formats.original_configs import SD_V1, SD_V2, infer_original_config

from helpers import reference_dir

PREFIXES = {"autoencoder.": "first_stage_model.", "denoiser.": "model.diffusion_model.", "text_encoder.": "cond_stage_model."}


def original_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LatentDiffusion state-dict names -> the original LatentDiffusion's."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), "")
        out[(PREFIXES[prefix] + key[len(prefix):]) if prefix else key] = value
    return out


def manifest(version: str) -> dict:
    return json.loads((reference_dir("sd-formats") / f"sd-{version}-keys.json").read_text())


@pytest.mark.parametrize("version,template", [("v1", SD_V1), ("v2", SD_V2)])
def test_config_recognised_from_keys_builds_the_manifest_layout(version, template):
    keys = manifest(version)["keys"]
    fake = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferred = infer_original_config(fake)
    assert inferred["model"]["params"]["unet_config"] == template["model"]["params"]["unet_config"]
    with torch.device("meta"):
        model = ldm.LatentDiffusion(from_original_config(inferred))
    built = {k: list(v.shape) for k, v in original_names(model.state_dict()).items()}
    for part in ("model.diffusion_model.", "first_stage_model."):
        expected = [(k, v) for k, v in keys.items() if k.startswith(part)]
        assert [(k, v) for k, v in built.items() if k.startswith(part)] == expected  # names, shapes, order
    # The text encoder: SD 2.x names as they are; SD 1.x in Hugging Face layout, mapped for writing.
    text = {k: v for k, v in model.state_dict().items() if k.startswith("text_encoder.")}
    if version == "v1":
        from ldm.text.keymaps import open_clip_to_hf_clip
        text = {"text_encoder." + k: v for k, v in open_clip_to_hf_clip({k[len("text_encoder."):]: v for k, v in text.items()}).items()}
    expected = [(k, v) for k, v in keys.items() if k.startswith("cond_stage_model.")]
    assert [("cond_stage_model." + k[len("text_encoder."):], list(v.shape)) for k, v in text.items()] == expected


def _small_v1(tmp_path, *, ema: bool = False):
    """A random-weight checkpoint with the SD 1.x layout at small widths, in the original format."""
    config = copy.deepcopy(SD_V1)
    params = config["model"]["params"]
    params["unet_config"]["params"].update(model_channels=32, context_dim=32, num_heads=4, use_checkpoint=False)
    params["first_stage_config"]["params"]["ddconfig"].update(ch=32)
    params.pop("cond_stage_config")
    (tmp_path / "v1-small.yaml").write_text(yaml.safe_dump(config))
    model = ldm.LatentDiffusion(from_original_config(config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-degenerate weights (the original init zeroes some convs)
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim > 1 else (1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise))
    state = original_names(model.state_dict())
    if ema:  # an EMA copy under the original's dot-less names, different from the raw weights
        for key, value in list(state.items()):
            if key.startswith("model.diffusion_model."):
                state["model_ema." + key[len("model."):].replace(".", "")] = value * 0.5
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "v1-small.ckpt")
    return model


def test_original_sd_v1_layout_checkpoint_matches_diffusers_single_file_loading(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    reference = _small_v1(tmp_path)
    ckpt, config = tmp_path / "v1-small.ckpt", tmp_path / "v1-small.yaml"
    ours = ldm.load_model(ckpt, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_single_file(str(ckpt), original_config=str(config), local_files_only=True)
        vae = AutoencoderKL.from_single_file(str(ckpt), original_config=str(config), local_files_only=True)
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.denoiser(x, t, context), unet(x, t, context).sample, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.autoencoder.encode(image).mean, vae.encode(image).latent_dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.autoencoder.decode(x[:1]), vae.decode(x[:1]).sample, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.denoiser(x, t, context), reference.denoiser(x, t, context), atol=0, rtol=0)


def test_ema_weights_are_used_when_present(tmp_path):
    reference = _small_v1(tmp_path, ema=True)
    ckpt, config = tmp_path / "v1-small.ckpt", tmp_path / "v1-small.yaml"
    with_ema = ldm.load_model(ckpt, config=config)
    raw = ldm.load_model(ckpt, config=config, ema=False)
    weight = reference.denoiser.input_blocks[0][0].weight
    assert torch.equal(raw.denoiser.input_blocks[0][0].weight, weight)
    assert torch.equal(with_ema.denoiser.input_blocks[0][0].weight, weight * 0.5)


def test_sd2_parameterization_is_selectable(tmp_path):
    config = copy.deepcopy(SD_V2)
    params = config["model"]["params"]
    params["unet_config"]["params"].update(model_channels=32, context_dim=32, num_head_channels=8, use_checkpoint=False)
    params.pop("cond_stage_config")
    model = ldm.LatentDiffusion(from_original_config(config))
    state = original_names(model.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    fake_inferred = infer_original_config
    with pytest.warns(UserWarning, match="assuming v-prediction"):
        inferred = fake_inferred(state)
    assert inferred["model"]["params"]["parameterization"] == "v"
    assert inferred["model"]["params"]["unet_config"]["params"]["use_linear_in_transformer"]
    assert fake_inferred(state, parameterization="eps")["model"]["params"]["parameterization"] == "eps"
    with pytest.raises(InputError, match="no Stable Diffusion UNet"):
        infer_original_config({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)})


def test_parameterization_override_on_load():
    ref = reference_dir("tiny-sd2")
    model = ldm.load_model(ref / "model.safetensors", config=ref / "config.yaml", parameterization="eps")
    assert model.parameterization == "eps"


def test_convert_checkpoint_round_trip(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from helpers import REPO

    ref = reference_dir("tiny-sd2")
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    run = lambda *args: subprocess.run([*tool, *map(str, args)], capture_output=True, text=True, timeout=300)
    ours, half, original = tmp_path / "ours.safetensors", tmp_path / "half.safetensors", tmp_path / "orig.ckpt"
    assert run(ref / "model.safetensors", ours, "--config", ref / "config.yaml").returncode == 0
    assert run(ours, half, "--half").returncode == 0
    result = run(ours, original, "--to", "original")
    assert result.returncode == 0, result.stderr
    # The original-format output has exactly the original checkpoint's keys, shapes and (float32) weights.
    written = torch.load(original, weights_only=True)["state_dict"]
    reference = load_file(ref / "model.safetensors")
    assert written.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(written[key], reference[key], rtol=1e-5, atol=3e-5, msg=key)
    cases = load_file(ref / "cases.safetensors")
    for path, config, tolerance in ((ours, None, 1e-4), (original, tmp_path / "orig.yaml", 1e-4), (half, None, 5e-2)):
        model = ldm.load_model(path, config=config)
        out = model.denoiser(cases["unet_x"], cases["unet_t"], cases["unet_context"])
        torch.testing.assert_close(out, cases["unet_out"], atol=tolerance, rtol=0)
    assert load_file(half)["denoiser.out.2.weight"].dtype == torch.float16
    assert load_file(half)["alphas_cumprod"].dtype == torch.float32
    bad = run(ours, ours)
    assert bad.returncode == 2 and "overwrite the input" in bad.stderr
