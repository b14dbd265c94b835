"""train.precision: bf16 autocast training on the CPU (both trainers), float32 checkpoints, exact resume, the
first step's loss next to fp32's, what `auto` resolves to, and bad values."""
from __future__ import annotations

import contextlib
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.config import read_yaml
from common.errors import InputError
from ldm.cli import run_cli
from ldm.training import precision
from ldm.training.config import TrainConfig
from ldm.training.precision import resolve_precision, training_autocast

from helpers import REPO, write_real_images

sys.path.insert(0, str(REPO / "tools"))

CPU = torch.device("cpu")
# The first step's loss under bf16 autocast vs fp32, same weights and batch: measured 3e-4 relative for the tiny LDM
# below, 2e-7 (LDM) and 2e-5 (autoencoder) on the emoji recipe (bench/RESULTS.md). bf16 keeps 8 bits of mantissa
# (0.4% per rounding) and the losses average many roundings: 1% is a loose bound that still catches a loss reduced
# in bf16 or a model run in half precision throughout.
FIRST_STEP_REL = 1e-2
AE_FAST = ["train.batch_size=4", "train.held_out=4", "train.log_every=1", "train.eval_every=1000",
           "train.sample_every=1000", "train.num_workers=0", "loss.disc_start=2"]


def run_tool(monkeypatch, module: str, *args: str) -> None:
    """A trainer's main under run_cli, in this process (saves a Python start); fails on a non-zero exit."""
    tool = __import__(module)
    monkeypatch.setattr(sys, "argv", [f"{module}.py", "--device", "cpu", *args])
    try:
        run_cli(tool.main)
    except SystemExit as exit_:
        assert exit_.code == 0, f"{module} exited {exit_.code}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision_images")
    write_real_images(folder, 12)
    return folder


# --- the key and its resolution ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["bf17", "float32", 16, "BF16"])
def test_a_bad_precision_is_one_line_naming_the_key_and_the_choices(value):
    with pytest.raises(InputError) as err:
        TrainConfig.from_dict({"precision": value})
    message = str(err.value)
    assert message == f"train config: precision must be one of auto, fp32, bf16, fp16, got {value!r}"
    assert "\n" not in message


def test_fp16_is_refused_off_cuda():
    with pytest.raises(InputError, match=r"train.precision=fp16 .* is for CUDA GPUs; use bf16 or fp32 on cpu"):
        resolve_precision("fp16", CPU, "ldm")


def test_auto_resolves_as_designed(monkeypatch):
    # What bench/train_precision.py measured on an AVX512_BF16 CPU (bench/RESULTS.md): bf16 faster with agreeing
    # curves for the LDM, not faster over the recipe for the autoencoder.
    assert precision.AUTO_BF16_ON_CPU == {"ldm": ("avx512_bf16",), "autoencoder": ()}
    # A CPU without native bf16: fp32 for both trainers.
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    assert resolve_precision("auto", CPU, "ldm")[0] == resolve_precision("auto", CPU, "autoencoder")[0] == "fp32"
    # AVX512_BF16: bf16 for the LDM, fp32 for the autoencoder, each saying why.
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "avx512_bf16")
    resolved, why = resolve_precision("auto", CPU, "ldm")
    assert resolved == "bf16" and "avx512_bf16" in why
    resolved, why = resolve_precision("auto", CPU, "autoencoder")
    assert resolved == "fp32" and "avx512_bf16" in why and "train.precision=bf16 turns it on" in why
    # AMX is not measured: fp32 until it is.
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "amx_bf16")
    assert resolve_precision("auto", CPU, "ldm")[0] == "fp32"
    monkeypatch.setattr(precision, "AUTO_BF16_ON_CPU", {"ldm": (), "autoencoder": ("amx_bf16",)})
    assert resolve_precision("auto", CPU, "ldm")[0] == "fp32"
    assert resolve_precision("auto", CPU, "autoencoder")[0] == "bf16"
    # Explicit values are kept; bf16 without native support runs (emulated) and says so.
    assert resolve_precision("bf16", CPU, "ldm")[0] == "bf16" and resolve_precision("fp32", CPU, "ldm")[0] == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    assert resolve_precision("bf16", CPU, "autoencoder") == ("bf16", "set; this CPU has no native bf16, so it is "
                                                                     "emulated (slow)")
    # CUDA: bf16 where the GPU supports it, for both trainers (only the device type is looked at; no GPU needed).
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda, "ldm")[0] == resolve_precision("auto", cuda, "autoencoder")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda, "ldm")[0] == "fp32"
    assert resolve_precision("fp16", cuda, "ldm")[0] == "fp16"
    # The autocast factory: none for fp32, bf16 autocast on the device's type otherwise.
    assert training_autocast("fp32", CPU, "ldm")[1] is contextlib.nullcontext
    resolved, autocast = training_autocast("bf16", CPU, "ldm")
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_the_detection_agrees_with_proc_cpuinfo(monkeypatch):
    flags = precision._proc_cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert precision.cpu_bf16_feature.__wrapped__() == expected
    # Without torch's CPU info, /proc/cpuinfo decides alone.
    monkeypatch.setattr(torch._C, "_cpu", None, raising=False)
    assert precision.cpu_bf16_feature.__wrapped__() == expected


# --- the first step: bf16 next to fp32 ---------------------------------------------------------------------

def test_the_first_ldm_step_loss_under_bf16_is_close_to_fp32():
    from train_ldm import build_model

    from ldm import diffusion
    from ldm.training.conditioning import conditioned_model_fn

    raw = read_yaml(REPO / "configs/ldm/tiny.yaml")
    raw["model"]["random_autoencoder"] = True
    cfg = TrainConfig.from_dict(raw["train"])
    torch.manual_seed(0)
    model = build_model(raw, cfg, CPU)
    batch = {"caption": ["red apple", "grinning face", "", "blue heart"]}
    latents = torch.randn(4, 4, 8, 8)
    losses, grads = {}, {}
    for name in ("fp32", "bf16"):
        _, autocast = training_autocast(name, CPU, "ldm")
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same t and noise
        model_fn = conditioned_model_fn(model.denoiser, model, batch, train_text=False, device=CPU)
        with autocast():
            loss, _ = diffusion.diffusion_loss(model_fn, latents, model.schedule, parameterization="eps",
                                               min_snr_gamma=5.0)
            loss.mean().backward()
        assert loss.dtype == torch.float32  # the reduction stays float32
        losses[name] = loss.mean().item()
        grads[name] = torch.cat([p.grad.flatten() for p in model.denoiser.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in model.denoiser.parameters())
    assert math.isfinite(losses["bf16"])
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < FIRST_STEP_REL, losses
    assert not torch.equal(grads["bf16"], grads["fp32"])  # bf16 did compute
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.99, cosine  # the same direction of descent


def test_the_first_autoencoder_step_loss_under_bf16_is_close_to_fp32(images):
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from autoencoder.losses import AutoencoderLoss, LossConfig
    from ldm.training.precision import float32_posterior

    raw = read_yaml(REPO / "configs/autoencoder/tiny.yaml")
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig.from_dict(raw["model"]))
    with pytest.warns(UserWarning, match="perceptual loss"):
        loss_fn = AutoencoderLoss(LossConfig.from_dict({**raw["loss"], "disc_start": 0}))  # the GAN term on too
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = {}
    for name in ("fp32", "bf16"):
        _, autocast = training_autocast(name, CPU, "autoencoder")
        torch.manual_seed(1)  # the same posterior sample
        with autocast():
            xrec, posterior = ae(x)
            posterior = float32_posterior(posterior)
            g_loss, logs = loss_fn.generator_loss(x, xrec, posterior, 0, ae.last_layer)
            d_loss, _ = loss_fn.discriminator_loss(x, xrec.detach(), 0)
        assert posterior.mean.dtype == g_loss.dtype == d_loss.dtype == logs["kl"].dtype == torch.float32
        losses[name] = (g_loss.item(), d_loss.item())
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert abs(bf16 - fp32) / abs(fp32) < FIRST_STEP_REL, losses


# --- the trainers end to end in bf16 ------------------------------------------------------------------------

def test_the_autoencoder_trains_in_bf16_with_float32_checkpoints_and_resumes_exactly(images, tmp_path, monkeypatch,
                                                                                      capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--config", str(REPO / "configs/autoencoder/tiny.yaml"), "--data", str(images), *AE_FAST,
              "train.precision=bf16", "train.ckpt_every=2"]
    run_tool(monkeypatch, "train_autoencoder", *common, "--out", str(straight), "--max-steps", "4")
    assert "precision bf16 autocast" in capsys.readouterr().out
    # The resumed run: the straight one's folder as it was after step 2.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    run_tool(monkeypatch, "train_autoencoder", *common, "--out", str(resumed), "--max-steps", "4", "--resume")
    assert "at step 2" in capsys.readouterr().out
    a, b = straight / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004"
    for name in ("autoencoder.safetensors", "autoencoder_ema.safetensors", "discriminator.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert {v.dtype for v in wa.values() if v.is_floating_point()} == {torch.float32}, name
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key}"
        assert all(torch.isfinite(v).all() for v in wa.values() if v.is_floating_point())
    state = torch.load(a / "train_state.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for s in state["opt_ae"]["state"].values() for k, t in s.items()
               if k != "step")
    assert {v.dtype for v in load_file(straight / "autoencoder.safetensors").values()} == {torch.float32}


def test_the_ldm_trains_in_bf16_with_float32_checkpoints_and_resumes(images, tmp_path, monkeypatch, capsys):
    """The checkpoints hold float32 weights, EMA and optimizer state, and a resume goes on from them. (The LDM
    trainer reseeds from (seed, rank, step) on resume, by design, so a resumed run is not bit-equal to an
    uninterrupted one; the autoencoder's bf16 resume is checked bit-exactly above.)"""
    import csv

    import webdataset as wds

    shards = tmp_path / "shards.tar"
    with wds.TarWriter(str(shards)) as sink:
        for k, path in enumerate(sorted(images.iterdir())):
            sink.write({"__key__": f"k{k:03d}", "png": path.read_bytes(), "txt": ["red apple", "yellow star"][k % 2]})
    straight = tmp_path / "straight"
    common = ["--config", str(REPO / "configs/ldm/tiny.yaml"), "--data", str(shards), "model.random_autoencoder=true",
              "train.batch_size=4", "train.log_every=1", "train.sample_every=1000", "train.warmup_steps=2",
              "train.num_workers=0", "train.shuffle_buffer=8", "train.ckpt_every=2", "train.precision=bf16",
              "train.sample_steps=1", "train.sample_prompts=[red apple]"]
    run_tool(monkeypatch, "train_ldm", *common, "--out", str(straight), "--max-steps", "2")
    assert "precision bf16 autocast" in capsys.readouterr().out
    with open(straight / "metrics.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    folder = straight / "checkpoints" / "step_00000002"
    for name in ("model.safetensors", "ema.safetensors"):
        tensors = load_file(folder / name)
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float32}, name
    state = torch.load(folder / "train_state.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, t in s.items()
               if k != "step")
    assert {v.dtype for v in load_file(straight / "model.safetensors").values()} == {torch.float32}
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    run_tool(monkeypatch, "train_ldm", *common, "--out", str(run), "--max-steps", "3", "--resume")
    assert "resumed at step 2" in capsys.readouterr().out
    end = run / "checkpoints" / "step_00000003"
    for name in ("model.safetensors", "ema.safetensors"):
        assert {v.dtype for v in load_file(end / name).values() if v.is_floating_point()} == {torch.float32}, name
    state = torch.load(end / "train_state.pt", weights_only=True)
    assert state["ema_num_updates"] == 3  # 2 restored + 1
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())  # Adam's count, restored
