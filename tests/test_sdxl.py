"""SDXL: parity with the original code (sgm) on the tiny-sdxl fixture, and the full-size key manifests.

Every tensor of `tiny-sdxl/cases.safetensors` (see that folder's README) is recomputed here: tokens, both
text towers, the pooled vector, the Fourier size features, the conditioner's outputs (cond and the
zeroed uncond), the UNet, the sgm denoiser, the VAE and the 10-step Euler run with CFG 5.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ldm
from common.errors import InputError
from ldm import samplers
from ldm.formats.sgm import SDXL_BASE, SDXL_REFINER, from_sgm_config, infer_sgm_config

from helpers import reference_dir

PROMPTS = ["A red cube on a blue sphere, 4K photo", ""]
SIZE = (64, 48)  # the cases' original and target size (height, width)


def tiny_sdxl_config() -> dict:
    """The fixture's sgm config, with the tiny towers' sizes and tokenizer given as embedder params."""
    ref = reference_dir("tiny-sdxl")
    raw = yaml.safe_load((ref / "config.yaml").read_text())
    bpe = str(ref / "tokenizer" / "bpe_tiny.txt.gz")
    tiny = raw.pop("tiny_text_encoders")
    hf = {k: v for k, v in tiny["clip_l"].items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                "projection_dim")}
    embedders = raw["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    embedders[0]["params"].update(hf_config=hf, bpe=bpe)
    embedders[1]["params"].update(text_cfg=tiny["open_clip"]["text_cfg"], embed_dim=tiny["open_clip"]["embed_dim"],
                                  bpe=bpe)
    return raw


@pytest.fixture(scope="module")
def model():
    return ldm.load_model(reference_dir("tiny-sdxl") / "model.safetensors", config=tiny_sdxl_config())


@pytest.fixture(scope="module")
def cases():
    return load_file(reference_dir("tiny-sdxl") / "cases.safetensors")


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_tokens_pad_with_eot_for_clip_l_and_zero_for_open_clip(model, cases):
    clip_l, big_g = model.text_encoder.towers
    assert torch.equal(clip_l.tokenize(PROMPTS), cases["tokens_clip_l"])
    assert torch.equal(big_g.tokenize(PROMPTS), cases["tokens_open_clip"])


def test_text_towers_penultimate_without_final_norm_and_pooled(model, cases):
    clip_l, big_g = model.text_encoder.towers
    close(clip_l(cases["tokens_clip_l"]), cases["clip_l_hidden"])
    context, pooled = big_g.encode_tokens(cases["tokens_open_clip"], pooled=True)
    close(context, cases["open_clip_penultimate"])
    close(pooled, cases["open_clip_pooled"])
    assert (context - cases["open_clip_last_ln"]).abs().max() > 0.1  # the wrong choice would show


def test_conditioner_outputs_and_zeroed_unconditional(model, cases):
    conditioner = model.text_encoder
    for name, embedder in zip(conditioner.config.size_inputs, conditioner.embedders[2:]):
        close(embedder(cases[f"in_{name}"]), cases[f"fourier_{name}"])
    cond = conditioner.condition(PROMPTS, image_size=SIZE)
    close(cond["context"], cases["cond_crossattn"])
    close(cond["y"], cases["cond_vector"])
    uncond = conditioner.condition(["", ""], image_size=SIZE, unconditional=True)
    assert not uncond["context"].any()  # sgm's force_uc_zero_embeddings=["txt"]
    close(uncond["y"], cases["uncond_vector"])
    # A negative prompt is encoded (as diffusers, A1111 and ComfyUI do); an empty positive prompt is too.
    negative = conditioner.condition(["blurry", "blurry"], image_size=SIZE, unconditional=True)
    assert negative["context"].abs().max() > 0.1
    close(conditioner.condition(["", ""], image_size=SIZE)["context"][1], cases["cond_crossattn"][1])


def test_unet_and_sgm_denoiser(model, cases):
    out = model.denoiser(cases["unet_x"], cases["unet_t"], cases["cond_crossattn"], y=cases["cond_vector"])
    close(out, cases["unet_out"])
    close(model.schedule.sigmas[cases["unet_t"]].float(), cases["denoiser_sigma"])
    denoiser = samplers.DiscreteDenoiser(
        lambda x, t: model.denoiser(x, t, cases["cond_crossattn"], y=cases["cond_vector"]), model.schedule,
        parameterization="eps")
    # D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t), row by row (each row has its own sigma). The
    # UNet's own 1e-5 becomes sigma * 1e-5 here (sigma = 9.14 in row 0).
    for i, (t, sigma) in enumerate(zip(cases["unet_t"], cases["denoiser_sigma"])):
        x0 = denoiser(cases["unet_x"], sigma.item(), t)
        close(x0[i], cases["denoiser_out"][i], atol=1e-5 * max(1.0, sigma.item()))


def test_vae_encode_and_decode(model, cases):
    posterior = model.autoencoder.encode(cases["ae_image"])
    close(posterior.mean, cases["ae_posterior_mean"])
    close(posterior.logvar, cases["ae_posterior_logvar"])
    close(model.autoencoder.decode(cases["ae_posterior_mean"]), cases["ae_decoded"])
    assert model.scale_factor == 0.13025
    close(model.decode_latents(cases["ae_posterior_mean"] * 0.13025), cases["ae_decode_first_stage"])


def test_ten_step_euler_with_cfg_reproduces_sgm(model, cases):
    plan = samplers.plan("euler", model.schedule, 10, model.config.timestep_spacing)
    assert plan.timesteps.tolist() == list(range(999, 0, -100))
    close(plan.sigmas.float(), cases["sample_sigmas"])
    cond = model.text_encoder.condition(PROMPTS, image_size=SIZE)
    uncond = model.text_encoder.condition(["", ""], image_size=SIZE, unconditional=True)
    x_T = cases["sample_x_T"].clone()
    out = model.sample(cond, uncond, x_T=x_T, sampler="euler", steps=10, guidance_scale=5.0)
    assert torch.equal(x_T, cases["sample_x_T"])  # sgm scales x_T in place; we never modify inputs
    close(out, cases["sample_out"], atol=1e-3)  # values up to ~86; fp32 vs sgm's float64 schedule


def test_hand_off_between_two_runs_equals_one_run(model, cases):
    """The base -> refiner hand-off: the first 7 steps, then the last 3 from that latent, is the whole run."""
    cond = model.text_encoder.condition(PROMPTS, image_size=SIZE)
    uncond = model.text_encoder.condition(["", ""], image_size=SIZE, unconditional=True)
    kwargs = dict(sampler="euler", steps=10, guidance_scale=5.0)
    whole = model.sample(cond, uncond, x_T=cases["sample_x_T"], **kwargs)
    middle = model.sample(cond, uncond, x_T=cases["sample_x_T"], end_step=7, **kwargs)
    rest = model.sample(cond, uncond, x_T=middle, start_step=7, **kwargs)
    close(rest, whole, atol=1e-4)


def test_our_checkpoint_round_trip_keeps_the_conditioner(model, cases, tmp_path):
    path = tmp_path / "tiny-sdxl.safetensors"
    ldm.save_model(model, path)
    loaded = ldm.load_model(path)
    assert loaded.config == model.config
    cond = loaded.text_encoder.condition(PROMPTS, image_size=SIZE)
    close(cond["y"], cases["cond_vector"])


def test_files_without_position_ids_load_and_sigmas_are_ignored(tmp_path):
    ref = reference_dir("tiny-sdxl")
    tensors = load_file(ref / "model.safetensors")
    assert "denoiser.sigmas" in tensors
    del tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    save_file(tensors, tmp_path / "no-position-ids.safetensors")
    model = ldm.load_model(tmp_path / "no-position-ids.safetensors", config=tiny_sdxl_config())
    ids = model.text_encoder.towers[0].transformer.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77)[None])


def _manifest(name: str) -> dict:
    return json.loads((reference_dir("sdxl-formats") / f"sdxl-{name}-keys.json").read_text())


ORIGINAL_PREFIXES = {"autoencoder.": "first_stage_model.", "denoiser.": "model.diffusion_model.",
                     "text_encoder.": "conditioner."}


@pytest.mark.parametrize("name,template", [("base", SDXL_BASE), ("refiner", SDXL_REFINER)])
def test_full_size_layout_matches_the_manifest_keys_shapes_and_order(name, template):
    manifest = _manifest(name)
    keys = manifest["keys"]
    fake = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    inferred = infer_sgm_config(fake)  # recognised from the keys alone
    assert inferred == template
    assert inferred["model"]["params"]["network_config"]["params"]["transformer_depth"] == manifest["unet"][
        "transformer_depth"]
    with torch.device("meta"):
        model = ldm.LatentDiffusion(from_sgm_config(inferred))
    built = []
    for key, value in model.state_dict().items():
        if key == "alphas_cumprod":  # ours; sgm derives its sigmas and released files have none
            continue
        prefix = next(p for p in ORIGINAL_PREFIXES if key.startswith(p))
        built.append((ORIGINAL_PREFIXES[prefix] + key[len(prefix):], list(value.shape)))
    for part in ORIGINAL_PREFIXES.values():  # names, shapes and state_dict order of each part
        assert [b for b in built if b[0].startswith(part)] == [(k, v) for k, v in keys.items() if k.startswith(part)]
    assert len(built) == len(keys)
    unet = sum(v.numel() for k, v in model.denoiser.state_dict().items())
    assert unet == manifest["param_counts"]["model.diffusion_model"]["numel"]  # base: 2,567,463,684


def test_sdxl_inpainting_is_recognised_by_its_nine_input_channels():
    keys = _manifest("base")["keys"]
    fake = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    fake["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    config = from_sgm_config(infer_sgm_config(fake))
    with torch.device("meta"):
        model = ldm.LatentDiffusion(config)
    assert model.concat_channels == 5


def test_mismatched_sgm_configs_are_one_line_errors():
    raw = tiny_sdxl_config()
    network = raw["model"]["params"]["network_config"]["params"]
    wrong = copy.deepcopy(raw)
    wrong["model"]["params"]["network_config"]["params"]["adm_in_channels"] = 80
    with pytest.raises(InputError, match="vector y of width 72 but the denoiser takes 80"):
        ldm.LatentDiffusion(from_sgm_config(wrong))
    wrong = copy.deepcopy(raw)
    wrong["model"]["params"]["network_config"]["params"]["transformer_depth"] = [1, 2, 3]
    with pytest.raises(InputError, match="transformer_depth has 3 entries but there are 2 levels"):
        from_sgm_config(wrong)
    assert network["transformer_depth"] == [0, 2]
    wrong = copy.deepcopy(raw)
    wrong["model"]["params"]["conditioner_config"]["params"]["emb_models"][0]["params"]["layer_idx"] = 1
    with pytest.raises(InputError, match="FrozenCLIPEmbedder layer 'hidden'"):
        from_sgm_config(wrong)


def tiny_refiner_config() -> dict:
    """A tiny SDXL-refiner-layout model: the bigG-like tower alone, sizes and aesthetic score, no CLIP-L."""
    raw = tiny_sdxl_config()
    params = raw["model"]["params"]
    embedders = params["conditioner_config"]["params"]["emb_models"]
    big_g, original, crop = embedders[1], embedders[2], embedders[3]
    aesthetic = copy.deepcopy(crop)
    aesthetic["input_key"] = "aesthetic_score"
    params["conditioner_config"]["params"]["emb_models"] = [big_g, original, crop, aesthetic]
    params["network_config"]["params"].update(context_dim=16, adm_in_channels=24 + 5 * 8)
    return raw


@pytest.fixture(scope="module")
def refiner():
    torch.manual_seed(5)
    return ldm.LatentDiffusion(from_sgm_config(tiny_refiner_config())).eval().requires_grad_(False)


def _count_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["y"].shape[1]) if "y" in kwargs
                                        else calls.append(args[3].shape[1]), with_kwargs=True)


def test_refiner_takes_the_last_noise_levels_with_its_own_conditioning(model, refiner):
    assert not refiner.config.text_encoder.zero_uncond  # sgm's refiner encodes the negative prompt
    base_calls, refiner_calls = [], []
    handles = [_count_calls(model.denoiser, base_calls), _count_calls(refiner.denoiser, refiner_calls)]
    try:
        options = dict(height=64, width=48, steps=10, sampler="euler", guidance_scale=5.0, seed=3)
        refined = model.generate("a red cube", refiner=refiner, refiner_switch=0.8, **options)[0]
    finally:
        for handle in handles:
            handle.remove()
    # switch 0.8: the base runs t >= 200 (999 ... 299: 8 steps), the refiner 199 and 99; y widths 72 and 64
    assert base_calls == [72] * 8 and refiner_calls == [64] * 2
    alone = model.generate("a red cube", **options)[0]
    assert refined.size == alone.size and refined.tobytes() != alone.tobytes()


def test_refiner_and_base_swapped_are_one_line_errors(model, refiner):
    with pytest.raises(InputError, match="is not an SDXL refiner"):
        model.generate("x", height=64, width=48, steps=4, refiner=model)
    with pytest.raises(InputError, match="the base model is an SDXL refiner"):
        refiner.generate("x", height=64, width=48, steps=4, refiner=refiner)
    with pytest.raises(InputError, match="refiner switch must be between 0 and 1"):
        model.generate("x", height=64, width=48, steps=4, refiner=refiner, refiner_switch=1.5)


def test_float16_vae_overflow_decodes_in_float32_and_says_so_once():
    """The community's "black image" of the fp16 SDXL VAE: activations beyond float16's 65504 become inf/NaN.
    Here the decoder's first conv is scaled so they do; the decode is redone in float32, with one warning."""
    model = ldm.load_model(reference_dir("tiny-sdxl") / "model.safetensors", config=tiny_sdxl_config(),
                           dtype=torch.float16)
    with torch.no_grad():
        model.autoencoder.decoder.conv_in.weight.mul_(1e5)
        model.autoencoder.decoder.conv_in.bias.mul_(1e5)
    options = dict(height=64, width=48, steps=2, sampler="euler", seed=1, n_samples=2, batch_size=1)
    with pytest.warns(UserWarning, match="decoding in float32") as caught:
        images = model.generate("a red cube", **options)
    assert len([w for w in caught if "decoding in float32" in str(w.message)]) == 1
    reference = model.float().generate("a red cube", **options)
    for image, expected in zip(images, reference):
        pixels = torch.from_numpy(np.array(image)).int()
        assert pixels.float().std() > 10  # not black
        assert (pixels - torch.from_numpy(np.array(expected)).int()).abs().max() <= 2


def _convert(args: list[str], monkeypatch) -> None:
    import runpy
    import sys
    from pathlib import Path
    monkeypatch.setattr(sys, "argv", ["tools/convert_checkpoint.py", *map(str, args)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"), run_name="__main__")


def test_convert_checkpoint_writes_sgm_files_and_diffusers_folders(model, cases, tmp_path, monkeypatch):
    ours = tmp_path / "ours.safetensors"
    ldm.save_model(model, ours)
    _convert([ours, tmp_path / "original.safetensors", "--to", "original"], monkeypatch)
    original = load_file(tmp_path / "original.safetensors")
    released = load_file(reference_dir("tiny-sdxl") / "model.safetensors")
    assert set(original) == set(released) - {"denoiser.sigmas"}  # sgm's names, no schedule buffers
    assert all(torch.equal(original[k], released[k]) for k in original)
    config = yaml.safe_load((tmp_path / "original.yaml").read_text())
    assert from_sgm_config(config) == model.config
    reloaded = ldm.load_model(tmp_path / "original.safetensors", config=tmp_path / "original.yaml")
    close(reloaded.text_encoder.condition(PROMPTS, image_size=SIZE)["y"], cases["cond_vector"])
    _convert([ours, tmp_path / "diffusers", "--to", "diffusers"], monkeypatch)
    assert (tmp_path / "diffusers" / "text_encoder_2" / "config.json").is_file()
    folder = ldm.load_model(tmp_path / "diffusers")
    assert folder.config.denoiser == model.config.denoiser
    for part in ("denoiser", "autoencoder"):
        ours_state, theirs = getattr(model, part).state_dict(), getattr(folder, part).state_dict()
        assert all(torch.equal(ours_state[k], theirs[k]) for k in ours_state)


def _txt2img(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    import runpy
    import sys
    from pathlib import Path
    monkeypatch.setattr(sys, "argv", ["tools/txt2img.py", *map(str, args)])
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "txt2img.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_txt2img_with_refiner_and_micro_conditioning(model, refiner, tmp_path, monkeypatch, capsys):
    from PIL import Image
    base_path, refiner_path = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    ldm.save_model(model, base_path)
    ldm.save_model(refiner, refiner_path)
    common = ["--prompt", "a red cube", "--steps", "6", "--sampler", "euler", "--scale", "5", "--H", "64", "--W", "48",
              "--outdir", tmp_path / "out", "--no-grid"]
    code, err = _txt2img([*common, "--ckpt", base_path, "--refiner", refiner_path, "--original-size", "128", "96"],
                         monkeypatch, capsys)
    assert code == 0, err
    record = json.loads(Image.open(tmp_path / "out" / "samples" / "00000.png").text["ldm"])
    assert record["refiner"] == str(refiner_path) and record["original_size"] == [128, 96]
    assert "timestep_spacing" not in record  # the model's own (sgm's), not set on the command line
    code, err = _txt2img([*common, "--ckpt", refiner_path, "--refiner", base_path], monkeypatch, capsys)
    assert code == 2 and "error: the base model is an SDXL refiner" in err and "Traceback" not in err
    code, err = _txt2img([*common, "--ckpt", base_path, "--refiner", refiner_path, "--refiner-switch", "1"],
                         monkeypatch, capsys)
    assert code == 2 and "--refiner-switch must be between 0 and 1" in err
