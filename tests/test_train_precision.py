"""train.precision: bf16 autocast training on the CPU (both trainers), float32 checkpoints, exact resume, the
first step's loss next to fp32's, what `auto` resolves to, and bad values."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

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
    from common import hardware
    flags = hardware.cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert hardware.cpu_bf16_feature.__wrapped__() == expected
    assert hardware.cpu_has_native_bf16() == (expected is not None)
    monkeypatch.setattr(hardware, "cpuinfo_flags", lambda: {"avx512f", "amx_bf16", "avx512_bf16"})
    assert hardware.cpu_bf16_feature.__wrapped__() == "amx_bf16"  # the faster one first
