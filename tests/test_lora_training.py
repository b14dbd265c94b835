"""Training LoRA adapters (`ldm.lora.training`, `train_ldm.py --lora-rank`): only the adapters change, and the
kohya file the trainer writes gives the in-training model's output through our `load_lora` and diffusers'
`load_lora_weights` (test-only peer; needs peft)."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings

import pytest
import torch
import webdataset as wds
from safetensors import safe_open

import ldm
from common.config import read_yaml
from common.errors import InputError
from ldm.diffusion.loss import diffusion_loss
from ldm.formats.loading import model_from_training_config
from ldm.lora.training import attach_lora, detach_lora, save_kohya

from helpers import REPO, write_real_images

CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"]


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def tiny_model():
    raw = read_yaml(REPO / "configs/ldm/tiny.yaml")
    torch.manual_seed(0)
    return model_from_training_config({**raw["model"], "random_autoencoder": True})


def test_only_the_adapters_train_and_the_saved_file_gives_the_in_training_output(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    network = attach_lora(model, 4, 8.0)
    assert len(network.modules) == 70 and all(name.startswith("lora_unet_") for name in network.modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in network.modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in network.modules
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trained} == {id(p) for p in network.parameters()}
    assert all(not torch.any(up) for _, up in network.modules.values())  # up starts at zero: the base model
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    context = model.text_encoder.encode(CAPTIONS)
    for _ in range(3):
        loss, _ = diffusion_loss(lambda x, t: model.denoiser(x, t, context), latents, model.schedule,
                                 parameterization="eps")
        assert math.isfinite(loss.mean().item())
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.any(up) for _, up in network.modules.values())
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        adapted = model.denoiser(x, t, context[:2])
    path = tmp_path / "lora.safetensors"
    save_kohya(path, network)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {**f.metadata(), "ss_network_module": "networks.lora", "ss_network_dim": "4",
                                "ss_network_alpha": "8"}
        assert f.get_tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha").item() == 8.0
    detach_lora(model, network)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())  # bit-identical
    with torch.no_grad():
        base = model.denoiser(x, t, context[:2])
    report = model.load_lora(path)
    assert report.matched_keys == report.total_keys == 210 and not report.unmatched
    with torch.no_grad():
        loaded = model.denoiser(x, t, context[:2])
    assert (adapted - base).abs().max() > 1e-3  # the adapters changed the output
    close(loaded, adapted, atol=1e-5)


def test_text_encoder_adapters_and_bad_options():
    model = tiny_model()
    with pytest.raises(InputError, match="lora-rank must be a positive integer"):
        attach_lora(model, 0, 1.0)
    with pytest.raises(InputError, match="lora-alpha must be a positive number"):
        attach_lora(model, 4, float("nan"))
    network = attach_lora(model, 4, 4.0, text_encoder=True)  # open_clip layout: q, k, v on rows of in_proj_weight
    text = sorted(name for name in network.modules if name.startswith("lora_te_"))
    assert len(text) == 2 * 6 and "lora_te_text_model_encoder_layers_1_self_attn_k_proj" in text
    tokens = model.text_encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        base = model.text_encoder(tokens)
    for _, up in network.modules.values():
        torch.nn.init.normal_(up, std=0.1)
    adapted = model.text_encoder(tokens)
    adapted.square().mean().backward()
    assert all(down.grad is not None for name, (down, _) in network.modules.items() if name.startswith("lora_te_"))
    assert (adapted - base).abs().max() > 1e-3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data")
    images = write_real_images(root / "images", 16)
    with wds.TarWriter(str(root / "000000.tar")) as sink:
        for k, path in enumerate(images):
            sink.write({"__key__": f"s_{k:03d}", "png": path.read_bytes(), "txt": CAPTIONS[k % len(CAPTIONS)]})
    return str(root / "000000.tar")


def sd1_folder(folder):
    """A tiny SD 1.x-layout diffusers pipeline (test_diffusers_folders.save_sd_folder's, with CLIP's vocabulary and
    special tokens, as our loader tokenizes with CLIP's BPE): -> (unet, text encoder)."""
    import diffusers
    import transformers
    from test_diffusers_folders import tiny_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                  sample_size=32)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        hidden_act="quick_gelu", projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with torch.no_grad():  # away from the inits that zero some output layers
        for p in [*unet.parameters(), *vae.parameters(), *text.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(), unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return unet.eval(), text.eval()


def test_train_ldm_writes_a_kohya_lora_that_diffusers_loads(shards, tmp_path):
    """An SD 1.x-layout diffusers folder as --init, UNet and text-encoder adapters: the file gives our outputs
    and diffusers' (`load_lora_weights` + `fuse_lora`) alike, and the base model's files are untouched."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (a test-only peer)")
    import diffusers
    from test_diffusers_folders import inputs

    folder = tmp_path / "sd1"
    unet, text = sd1_folder(folder)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "train_ldm.py"), "--init", str(folder), "--data", shards,
           "--out", str(run), "--max-steps", "3", "--lora-rank", "4", "--lora-alpha", "8", "--lora-text-encoder",
           "--device", "cpu", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", "train.lr=1e-2",
           "train.num_workers=0", "train.shuffle_buffer=0", "train.ckpt_every=2", "train.sample_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA (rank 4, alpha 8)" in result.stdout
    with open(run / "metrics.csv", newline="") as f:
        assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))
    assert not (run / "model.safetensors").exists()  # the base model is never copied, in checkpoints neither
    assert {p.name for p in (run / "checkpoints").rglob("*.safetensors")} == {"lora.safetensors", "lora_ema.safetensors"}
    path = run / "lora.safetensors"
    model = ldm.load_model(folder)
    x, t, context, _ = inputs()
    tokens = model.text_encoder.tokenize(["red apple", "a blue heart on a yellow star"])
    with torch.no_grad():
        base = model.denoiser(x, t, context)
    report = model.load_lora(path)
    assert report.matched_keys == report.total_keys and not report.unmatched
    assert any(name.startswith("text_encoder.") for name in report.changed)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path), adapter_name="lora")
        pipe.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        ours = model.denoiser(x, t, context)
        assert (ours - base).abs().max() > 1e-3
        close(ours, unet(x, t, encoder_hidden_states=context).sample)
        close(model.text_encoder.encode_tokens(tokens)[0], text(tokens).last_hidden_state)


def test_a_resumed_lora_run_repeats_the_uninterrupted_one(shards, tmp_path):
    """A LoRA run's checkpoints keep the adapters, their EMA, the optimizer and each rank's data position and RNG
    (not the frozen model): stopped at step 2 and --resumed, the run sees the same samples and ends with the
    same adapters as one that never stopped. Other LoRA options, or none, are refused in one line."""
    from test_train_ldm import FAST, train

    common = ["--data", shards, "--lora-rank", "2", "--lora-alpha", "4", *FAST, "train.ckpt_every=2", "train.lr=1e-2",
              "train.log_sample_keys=true", "train.caption_dropout=0.5"]
    train("--out", str(tmp_path / "straight"), "--max-steps", "5", *common)
    train("--out", str(tmp_path / "resumed"), "--max-steps", "2", *common)
    folder = tmp_path / "resumed" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "lora.safetensors", "lora_ema.safetensors",
                                                        "train_state.pt"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2 << 20  # the adapters, not the model
    for wrong, message in ((["--lora-rank", "4"], "holds other adapters than this run attaches"),
                           ([], "is a LoRA run's checkpoint: resume it with the run's --lora-rank")):
        options = [a for a in common if a not in ("--lora-rank", "2", "--lora-alpha", "4")]
        result = train("--out", str(tmp_path / "resumed"), "--max-steps", "5", "--resume", *options, *wrong,
                       check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    result = train("--out", str(tmp_path / "resumed"), "--max-steps", "5", "--resume", *common)
    assert "resumed at step 2" in result.stdout
    straight = (tmp_path / "straight" / "sample_keys" / "rank0.tsv").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "sample_keys" / "rank0.tsv").read_text().splitlines()
    assert len(straight) == 5 and resumed == straight  # keys and adapter checksums, line for line
    a, b = (ldm_tensors(tmp_path / run / "lora.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.any(v) for k, v in a.items() if "lora_up" in k)  # the adapters did train


def ldm_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_sdxl_adapters_use_kohya_sdxl_names_and_load_back(tmp_path):
    """On an SDXL-layout model (configs/ldm/tiny-sdxl.yaml) the adapters are named as kohya's sdxl_train_network
    names them (the UNet by sgm's paths, `lora_te1_` / `lora_te2_` for the two towers), and the saved file gives
    the in-training model's context, pooled vector and denoiser output through `load_lora`."""
    raw = read_yaml(REPO / "configs/ldm/tiny-sdxl.yaml")
    torch.manual_seed(0)
    model = model_from_training_config({**raw["model"], "random_autoencoder": True}).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    network = attach_lora(model, 4, 4.0, text_encoder=True)
    names = list(network.modules)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in names  # tiny-sdxl: attention from level 1
    assert not any(name.startswith("lora_unet_down_blocks") for name in names)
    assert {name.split("_text_model")[0] for name in names if "_te" in name} == {"lora_te1", "lora_te2"}
    assert sum(name.startswith("lora_te2_") for name in names) == sum(name.startswith("lora_te1_") for name in names)
    with torch.no_grad():
        for _, up in network.modules.values():
            up.normal_(std=0.05)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])

    def outputs():
        with torch.no_grad():
            cond = model.text_encoder.condition(["red apple", "a blue heart"], image_size=(64, 64))
            return cond["context"], cond["y"], model.denoiser(x, t, cond["context"], y=cond["y"])

    adapted = outputs()
    path = tmp_path / "sdxl-lora.safetensors"
    save_kohya(path, network)
    detach_lora(model, network)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    base = outputs()
    report = model.load_lora(path)
    assert report.matched_keys == report.total_keys and not report.unmatched
    loaded = outputs()
    for a, b, c in zip(adapted, base, loaded):
        assert (a - b).abs().max() > 1e-3  # the adapters change every output
        close(c, a, atol=1e-5)
