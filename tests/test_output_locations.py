"""Bad output locations (a file where a folder goes, a folder where a file goes, a read-only folder) are
refused by every tool with one line naming the path, the problem and the fix, before any model or data
loads; and --help shows real defaults only.

Each tool case passes inputs that do not exist: the error is about the output, so the check ran first.
The subprocesses (~2 s of imports each) run side by side, once for the module; the checks themselves
are also tested in-process, with the read-only cases simulated (root may write anywhere).
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.errors import InputError
from ldm.cli import HelpFormatter, check_output_file, check_output_folder

from helpers import REPO

AS_ROOT = os.geteuid() == 0  # os.access says root may write into a read-only folder, and it may

# (script, arguments, the expected error; FILE: a regular file, DIR: an empty folder, RUN: a folder whose
# checkpoints/ is a file, RO: a read-only folder, MISSING: an input that does not exist)
CASES = {
    "train_autoencoder": ("train_autoencoder.py", ["--data", "MISSING", "--out", "FILE"],
                          "FILE is a file, but the run's files go into a folder there: remove it or choose another "
                          "--out"),
    "train_ldm": ("train_ldm.py", ["--data", "MISSING.tar", "--out", "RUN", "model.random_autoencoder=true"],
                  "RUN/checkpoints is a file, but the checkpoints go into a folder there: remove it or choose "
                  "another --out"),
    "make_shards": ("make_shards.py", ["MISSING", "FILE/%06d.tar"],
                    "FILE is a file, but the shards go into a folder there: remove it or choose another OUT_PATTERN"),
    "encode_latents": ("encode_latents.py", ["--config", "configs/ldm/tiny.yaml", "--data", "MISSING.tar", "--out",
                                             "FILE/latents/%06d.tar"],
                       "FILE is a file, so the latent shards cannot be written to FILE/latents: choose another --out"),
    "convert_checkpoint": ("convert_checkpoint.py", ["MISSING.ckpt", "DIR"],
                           "DIR is a folder, but the converted checkpoint is written to a file: give OUTPUT a file "
                           "name"),
    "compute_scale_factor": ("compute_scale_factor.py", ["--ckpt", "DIR", "--data", "MISSING", "--write"],
                             "DIR is a folder, but the updated checkpoint (--write) is written to a file: give --ckpt "
                             "a file name"),
    "prepare_emoji": ("prepare_emoji.py", ["--meta", "MISSING.tgz", "--art", "MISSING.tgz", "--out", "FILE/%06d.tar"],
                      "FILE is a file, but the shards go into a folder there: remove it or choose another --out"),
    "eval_text_to_image": ("eval_text_to_image.py", ["--ckpt", "MISSING.safetensors", "--data", "MISSING.tar",
                                                     "--grid", "DIR"],
                           "DIR is a folder, but the grid is written to a file: give --grid a file name"),
    # A read-only folder (real only when not root).
    "train_ldm read-only": ("train_ldm.py", ["--data", "MISSING.tar", "--out", "RO/run",
                                             "model.random_autoencoder=true"],
                            "RO is not writable, so the run's files cannot be written to RO/run: choose another --out"),
    "convert_checkpoint read-only": ("convert_checkpoint.py", ["MISSING.ckpt", "RO/model.safetensors"],
                                     "RO is not writable, so the converted checkpoint cannot be written to "
                                     "RO/model.safetensors: choose another OUTPUT"),
}


def _layout(root: Path) -> dict[str, str]:
    (root / "FILE").write_text("a file, not a folder")
    (root / "DIR").mkdir()
    (root / "RUN").mkdir()
    (root / "RUN" / "checkpoints").write_text("a file where the checkpoints go")
    (root / "RO").mkdir()
    (root / "RO").chmod(0o555)
    return {name: str(root / name) for name in ("MISSING", "FILE", "DIR", "RUN", "RO")}


def _fill(text: str, names: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda match: names[match.group(1)], text)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def tool_results(tmp_path_factory):
    """{case: (completed process, expected message)} for every case, run side by side (one per CPU core:
    the time is their imports); and the folder's contents before and after (nothing may be created)."""
    root = tmp_path_factory.mktemp("outputs")
    names = _layout(root)
    before = _tree(root)
    cases = {case: spec for case, spec in CASES.items() if not ("read-only" in case and AS_ROOT)}

    def run(spec):
        script, args, message = spec
        return subprocess.run([sys.executable, f"tools/{script}", *(_fill(a, names) for a in args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300), _fill(message, names)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    yield results, before, _tree(root)
    (root / "RO").chmod(0o755)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_output_location_is_refused_before_anything_loads(tool_results, case):
    if "read-only" in case and AS_ROOT:
        pytest.skip("root may write into a read-only folder (the check is tested in-process below)")
    results, before, after = tool_results
    result, message = results[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == f"error: {message}", result.stderr
    assert "MISSING" not in lines[0]  # the inputs, which do not exist, were never reached
    assert after == before  # nothing created


# The checks in-process: every kind of bad location, nothing created.

def _message(check, *args, **kwargs) -> str:
    with pytest.raises(InputError) as error:
        check(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_output_folder_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "run" / "samples").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    subfolders = {"checkpoints": "the checkpoints", "samples": "the samples"}

    check_output_folder(tmp_path / "new" / "deeper", flag="--out", subfolders=subfolders)  # can be made: fine
    check_output_folder(tmp_path / "run" / "samples", flag="--out")
    assert _message(check_output_folder, tmp_path / "file", flag="--out", what="the run") == (
        f"{tmp_path / 'file'} is a file, but the run go into a folder there: remove it or choose another --out")
    assert _message(check_output_folder, tmp_path / "run", flag="--out", subfolders=subfolders) == (
        f"{tmp_path / 'run' / 'checkpoints'} is a file, but the checkpoints go into a folder there: remove it or "
        "choose another --out")
    assert _message(check_output_folder, tmp_path / "file" / "a" / "b", flag="--out", what="the shards") == (
        f"{tmp_path / 'file'} is a file, so the shards cannot be written to {tmp_path / 'file' / 'a' / 'b'}: "
        "choose another --out")
    assert "is a broken link" in _message(check_output_folder, tmp_path / "dangling" / "x", flag="--out")

    read_only = {tmp_path / "run" / "samples"}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in read_only and real_access(path, mode))
    assert _message(check_output_folder, tmp_path / "run" / "samples" / "new", flag="--outdir",
                    what="the images") == (
        f"{tmp_path / 'run' / 'samples'} is not writable, so the images cannot be written to "
        f"{tmp_path / 'run' / 'samples' / 'new'}: choose another --outdir")
    assert _message(check_output_folder, tmp_path / "run", flag="--out", subfolders={"samples": "the samples"}) == (
        f"{tmp_path / 'run' / 'samples'} is not writable, so the samples cannot be written to {tmp_path / 'run'}: "
        "choose another --out")
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_output_file_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "model.safetensors").write_text("x")

    check_output_file(tmp_path / "model.safetensors", "--ckpt")  # an existing file may be replaced
    check_output_file(tmp_path / "new" / "out.json", "--json")  # its folder can be made
    assert _message(check_output_file, tmp_path / "folder", "--grid", what="the grid") == (
        f"{tmp_path / 'folder'} is a folder, but the grid is written to a file: give --grid a file name")
    assert _message(check_output_file, tmp_path / "file" / "out.json", "--json", what="the results") == (
        f"{tmp_path / 'file'} is a file, so the results cannot be written to {tmp_path / 'file' / 'out.json'}: "
        "choose another --json")

    read_only = {tmp_path / "folder", tmp_path / "model.safetensors"}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in read_only and real_access(path, mode))
    assert _message(check_output_file, tmp_path / "folder" / "x.safetensors", "OUTPUT", what="the checkpoint") == (
        f"{tmp_path / 'folder'} is not writable, so the checkpoint cannot be written to "
        f"{tmp_path / 'folder' / 'x.safetensors'}: choose another OUTPUT")
    assert _message(check_output_file, tmp_path / "model.safetensors", "--ckpt", what="the scale factor",
                    fix="leave out --write") == (
        f"{tmp_path / 'model.safetensors'} is read-only, so the scale factor cannot be written to it: make it "
        "writable or leave out --write")
    assert not (tmp_path / "new").exists()


# --help: real defaults only, the docstring's example lines kept.

def test_help_shows_real_defaults_only():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--ckpt", default=None, help="a checkpoint")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--size", type=int, default=1000, help="per shard (default: 1000)")
    p.add_argument("overrides", nargs="*", help="overrides")
    text = " ".join(p.format_help().split())
    assert "sampling steps (default: 50)" in text and "per shard (default: 1000) " in text + " "
    assert "(default: None)" not in text and "(default: False)" not in text and text.count("(default:") == 2


@pytest.mark.parametrize("script", ["train_autoencoder.py", "convert_checkpoint.py", "train_ldm.py", "make_shards.py",
                                    "encode_latents.py", "compute_scale_factor.py", "prepare_emoji.py",
                                    "eval_text_to_image.py", "txt2img.py", "img2img.py"])
def test_tool_help_has_no_empty_defaults_and_keeps_example_lines(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr("warnings.showwarning", __import__("warnings").showwarning)  # run_cli replaces it
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "tools" / script), run_name="__main__")
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    source = (REPO / "tools" / script).read_text()
    docstring = source.split('"""')[1].replace("\\\\", "\\")

    def examples(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(("    python tools/", "    torchrun "))]
    assert examples(text) == examples(docstring) and examples(text), text  # each example on a line of its own
