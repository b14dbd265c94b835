"""Disk faults, through the real command lines: a full disk while writing a checkpoint, shards, a converted
or rewritten model (one line, exit 2, no partial file, the previous output kept), and a training run that
resumes past a truncated newest checkpoint with one metrics row per step.

A full disk is simulated, never made: `install_full_disk` lets writes under one folder take `free_bytes` in
all, then fails them as the kernel does (the part that fits is written, then OSError ENOSPC), and gives
safetensors' Rust writer its real error form. A command line runs under it through `FULL_DISK_RUNNER`.
"""
from __future__ import annotations

import builtins
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

import ldm
from autoencoder import AutoencoderKL
from common.checkpoint import megabytes
from ldm.cli import run_cli
from ldm.training.checkpoints import checkpoint_problem, checkpoint_to_resume, list_checkpoints, write_checkpoint_dir

from helpers import REPO, TINY_AE, write_real_images


def install_full_disk(folder: str | Path, free_bytes: int, setattr_=setattr) -> None:
    """From now on, files written under `folder` get `free_bytes` in all (removals free nothing)."""
    import safetensors.torch
    from safetensors import SafetensorError

    import common.checkpoint

    folder, real_open = os.path.realpath(folder), builtins.open
    budget = {"free": free_bytes}

    class FullDiskFile:
        """A file being written on the nearly full disk: a write past the free space writes what fits, then fails."""

        def __init__(self, raw, name):
            self._raw, self._name = raw, name

        def write(self, data):
            data = bytes(data)
            fits = data[:max(budget["free"], 0)]
            self._raw.write(fits)
            budget["free"] -= len(fits)
            if len(fits) < len(data):
                self._raw.flush()
                raise OSError(errno.ENOSPC, "No space left on device", self._name)
            return len(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._raw.close()

        def __getattr__(self, name):
            return getattr(self._raw, name)

    def full_disk_open(file, mode="r", *args, **kwargs):
        writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        if not writing or not os.path.realpath(file).startswith(folder + os.sep):
            return real_open(file, mode, *args, **kwargs)
        if "b" in mode:
            return FullDiskFile(real_open(file, mode, *args, **kwargs), os.fspath(file))
        encoding = kwargs.pop("encoding", None) or "utf-8"
        newline = kwargs.pop("newline", None)
        binary = FullDiskFile(real_open(file, mode + "b"), os.fspath(file))
        return io.TextIOWrapper(binary, encoding=encoding, newline=newline, write_through=True)

    def save_file(tensors, filename, metadata=None):  # safetensors' Rust writer reports errno 28 in its text
        try:
            with full_disk_open(filename, "wb") as f:
                f.write(safetensors.torch.save(tensors, metadata=metadata))
        except OSError:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)") from None

    setattr_(builtins, "open", full_disk_open)
    setattr_(io, "open", full_disk_open)  # pathlib's write_text / write_bytes
    setattr_(common.checkpoint, "save_file", save_file)


FULL_DISK_RUNNER = """
import runpy, sys
sys.path.insert(0, {tests!r})
from test_disk_faults import install_full_disk
install_full_disk({folder!r}, {free_bytes!r})
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def run_tool(tool: str, *args, full_disk: tuple[Path, int] | None = None) -> subprocess.CompletedProcess:
    """`python tools/TOOL ARGS`, with the disk under full_disk[0] holding full_disk[1] more bytes."""
    script = str(REPO / "tools" / tool)
    args = [str(a) for a in args]
    if full_disk is None:
        cmd = [sys.executable, script, *args]
    else:
        code = FULL_DISK_RUNNER.format(tests=str(REPO / "tests"), folder=str(full_disk[0]),
                                       free_bytes=int(full_disk[1]), script=script, args=args)
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (progress bars share stderr), after checking it is a clean exit 2."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the library ------------------------------------------------------------------------------------


def _state(folder: Path) -> None:
    """Two safetensors of 1,000,000 bytes of tensor data each."""
    from common.checkpoint import save_checkpoint

    for name in ("model", "ema"):
        save_checkpoint(folder / f"{name}.safetensors", {"w": torch.zeros(250_000)}, {"step": 1})


def test_checkpoint_on_a_full_disk_is_removed_and_the_last_one_kept(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    write_checkpoint_dir(root, 10, _state)
    (root / ".tmp-step_00000015").mkdir()  # from a run killed while writing: never a checkpoint
    install_full_disk(root, 1_500_000, monkeypatch.setattr)  # the first file fits, the second does not
    with pytest.raises(ldm.InputError) as error:
        write_checkpoint_dir(root, 20, _state)
    # Needed: the previous checkpoint's size, 2 x (1,000,000 bytes of data + a header of under 100 bytes).
    assert str(error.value) == (f"disk full at {root / 'step_00000020'} (2.0 MB needed): free space or choose another "
                                "--out (the last checkpoint, step_00000010, is kept)")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010"]  # no partial folder, old or new
    assert checkpoint_problem(root / "step_00000010") is None
    assert checkpoint_to_resume(root, resume=True) == root / "step_00000010"


def test_run_cli_turns_any_full_disk_into_one_line(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.csv")

    def wrapped():  # torch's writer wraps the OSError of a Python file in a RuntimeError
        try:
            full()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    for main in (full, wrapped):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == ("error: disk full at /runs/a/metrics.csv: free space or choose another "
                                           "output folder\n")
    with pytest.raises(OSError, match="Permission denied"):  # other failures are not dressed up as a full disk
        run_cli(lambda: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))


# --- make_shards.py -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve captioned 128x128 photos (PNG, stored byte for byte, about 40 kB each)."""
    root = tmp_path_factory.mktemp("photos")
    for path in write_real_images(root, 12, size=128):
        path.with_suffix(".txt").write_text(f"photo {path.stem}")
    return root


def test_make_shards_on_a_full_disk_keeps_only_complete_shards(photos, tmp_path):
    whole = tmp_path / "whole"
    assert run_tool("make_shards.py", photos, whole / "%06d.tar", "--shard-size", "3").returncode == 0
    total = sum(p.stat().st_size for p in whole.glob("*.tar"))  # 4 shards of 3 samples
    out = tmp_path / "out"
    result = run_tool("make_shards.py", photos, out / "%06d.tar", "--shard-size", "3",
                      full_disk=(out, total * 6 // 10))  # room for 2 of the 4 shards and part of the third
    line = error_line(result)
    prefix = f"error: disk full at {out / '000002.tar'} ("
    assert line.startswith(prefix), line
    needed = float(line[len(prefix):].split(" MB needed")[0])  # estimated from the bytes per input so far
    assert needed == pytest.approx(total / 1e6, rel=0.15)
    assert line.endswith(" MB needed): free space or choose another output folder, then rerun with --overwrite "
                         "(2 complete shards kept; no partial shard or summary.json left)")
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar"]
    for name in ("000000.tar", "000001.tar"):  # the complete shards are whole, and the same as without the fault
        assert (out / name).read_bytes() == (whole / name).read_bytes()
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 3 * 3  # image, caption, metadata
    # With space again, --overwrite packs everything.
    assert run_tool("make_shards.py", photos, out / "%06d.tar", "--shard-size", "3", "--overwrite").returncode == 0
    assert json.loads((out / "summary.json").read_text())["samples"] == 12


def test_make_shards_removes_an_unfinished_shard_of_a_killed_run(photos, tmp_path):
    (tmp_path / ".000001.tar.tmp").write_bytes(b"half a tar")  # what a SIGKILL leaves (never a shard name)
    assert run_tool("make_shards.py", photos, tmp_path / "%06d.tar", "--shard-size", "6").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "000001.tar", "summary.json"]
    assert len(list(wds.WebDataset(str(tmp_path / "{000000..000001}.tar"), shardshuffle=False))) == 12


# --- convert_checkpoint.py, compute_scale_factor.py --write ------------------------------------------


@pytest.mark.parametrize("to, name", [("ours", "out.safetensors"), ("original", "out.ckpt")])
def test_convert_checkpoint_on_a_full_disk_leaves_nothing(to, name, tmp_path):
    source = tmp_path / "in" / "model.safetensors"
    ldm.save_model(ldm.LatentDiffusion(ldm.LDMConfig(autoencoder=TINY_AE, parameterization="v")), source)
    before = digest(source)
    out = tmp_path / "out"
    out.mkdir()
    result = run_tool("convert_checkpoint.py", source, out / name, "--to", to, full_disk=(out, 500_000))
    line = error_line(result)
    assert run_tool("convert_checkpoint.py", source, out / name, "--to", to).returncode == 0  # the size it needs
    written = (out / name).stat().st_size
    assert line == (f"error: disk full at {out / name} ({megabytes(written)} MB needed): free space or choose "
                    "another output folder")
    assert digest(source) == before
    (out / name).unlink()
    (out / name).with_suffix(".yaml").unlink(missing_ok=True)
    assert list(out.iterdir()) == []  # neither the output nor a temporary file


def test_compute_scale_factor_write_on_a_full_disk_keeps_the_checkpoint(tmp_path, real_images):
    ckpt = tmp_path / "ae.safetensors"
    ldm.save_autoencoder(AutoencoderKL(TINY_AE), ckpt)
    before = digest(ckpt)
    result = run_tool("compute_scale_factor.py", "--ckpt", ckpt, "--data", real_images, "--num-images", "8",
                      "--write", "--device", "cpu", full_disk=(tmp_path, 100_000))
    assert error_line(result) == (f"error: disk full at {ckpt} ({megabytes(ckpt.stat().st_size)} MB needed): free "
                                  f"space and rerun; {ckpt} is unchanged")
    assert "scale_factor = " in result.stdout  # the value is still reported
    assert digest(ckpt) == before and [p.name for p in tmp_path.iterdir()] == ["ae.safetensors"]


# --- train_ldm.py -----------------------------------------------------------------------------------

FAST = ["model.random_autoencoder=true", "train.batch_size=4", "train.log_every=1", "train.sample_every=1000",
        "train.warmup_steps=2", "train.num_workers=0", "train.shuffle_buffer=20", "train.ckpt_every=1",
        "train.sample_steps=2"]


def train(shard: str, run: Path, steps: int, *extra, full_disk=None) -> subprocess.CompletedProcess:
    return run_tool("train_ldm.py", "--config", REPO / "configs/ldm/tiny.yaml", "--data", shard, "--out", run,
                    "--max-steps", steps, *FAST, *extra, full_disk=full_disk)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A tiny run of two steps with a checkpoint after each."""
    root = tmp_path_factory.mktemp("ldm")
    with wds.TarWriter(str(root / "000000.tar")) as sink:
        for k, path in enumerate(write_real_images(root / "images", 8)):
            sink.write({"__key__": f"{k:03d}", "png": path.read_bytes(), "txt": ["red apple", "blue heart"][k % 2]})
    result = train(str(root / "000000.tar"), root / "run", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_train_ldm_resumes_past_a_truncated_checkpoint_and_logs_each_step_once(two_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_steps / "run", run)
    model = run / "checkpoints" / "step_00000002" / "model.safetensors"
    size = model.stat().st_size
    with open(model, "r+b") as f:  # the header survives, half the data is gone
        f.truncate(size // 2)
    result = train(str(two_steps / "000000.tar"), run, 3, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "warning" in line] == [
        f"warning: --resume skips {model.parent}: model.safetensors is truncated ({size // 2} of {size} bytes)"]
    assert "resumed at step 1" in result.stdout
    with open(run / "metrics.csv", newline="") as f:  # step 2 again after the resume, logged once
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2", "3"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000003"]
    assert checkpoint_problem(model.parent) is None  # rewritten by the resumed run


def test_train_ldm_checkpoint_on_a_full_disk(two_steps, tmp_path):
    first = two_steps / "run" / "checkpoints" / "step_00000001"
    size = sum(p.stat().st_size for p in first.iterdir())
    checkpoints = tmp_path / "run" / "checkpoints"
    result = train(str(two_steps / "000000.tar"), tmp_path / "run", 2, full_disk=(checkpoints, size * 3 // 2))
    # Needed: the size of the checkpoint before (model, EMA, optimizer state), as the new one holds the same.
    assert error_line(result) == (f"error: disk full at {checkpoints / 'step_00000002'} ({megabytes(size)} MB "
                                  "needed): free space or choose another --out (the last checkpoint, step_00000001, "
                                  "is kept)")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001"]
    assert checkpoint_to_resume(checkpoints, resume=True) == checkpoints / "step_00000001"
