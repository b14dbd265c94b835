"""Reading and writing checkpoints: safetensors (ours, with the config inside) and original files.

Original `.ckpt` files are pickles: they are read with `torch.load(weights_only=True)`, which
refuses anything that would run code, and never executed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import InputError

FORMAT = "ldm-kit/1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from a .safetensors or pickle checkpoint, on the CPU.

    For pickles, the weights under "state_dict" (Lightning / original SD files) are returned.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                             "is the download complete?") from None
        return tensors, metadata
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise InputError(f"checkpoint {path}: unknown file type {path.suffix!r}; use .safetensors or {', '.join(PICKLE_SUFFIXES)}")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        text = str(exc)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe or "GLOBAL" in text:
            what = f" ({unsafe.group(1)})" if unsafe else ""
            raise InputError(
                f"refusing to load {path}: it holds Python objects{what}, not just tensors, and loading it "
                "could run code from the file. Nothing was executed. If you trust the file, re-save it as a "
                "plain state dict or as .safetensors in a separate, sandboxed step.") from None
        raise InputError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint "
                         f"({type(exc).__name__}: {_reason(text)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"checkpoint {path} holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _reason(text: str) -> str:
    """The informative line of a torch.load error (its first lines are generic advice)."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "invalid load key", "PytorchStreamReader")):
            return line
    return lines[0] if lines else "unreadable"


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], *,
                    ours: bool = True) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, fsync, rename.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    `.safetensors` gets `metadata` (non-string values as JSON) and, when `ours`, our format tag;
    `.ckpt` / `.pt` is written as the original scripts do, `{"state_dict": tensors}` (no metadata).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT} if ours else {}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            save_file(contiguous, tmp, metadata=meta)
        elif path.suffix in PICKLE_SUFFIXES:
            torch.save({"state_dict": contiguous}, tmp)
        else:
            raise InputError(f"cannot write {path}: use a .safetensors or .ckpt file name")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise InputError naming the first missing, unexpected and misshaped keys, if any."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(v.shape)})"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches: {_first(misshaped, 3)}")
    if problems:
        raise InputError(f"{source} does not fit the config: " + "; ".join(problems)
                         + ". Check that the config matches the checkpoint.")


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                            assign: bool = False) -> None:
    """Load `state_dict` into `module` after `check_state_dict`: copied into the existing tensors
    (casting dtype), or with `assign=True` taken over as the parameters (see `empty_parameters`)."""
    check_state_dict(module, state_dict, source=source)
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@contextlib.contextmanager
def empty_parameters():
    """Create module parameters on the meta device (no memory), buffers as usual.

    Loading then assigns the checkpoint's tensors as the parameters (`assign=True`), so a model is
    never held twice: once randomly initialised and once as loaded weights. Buffers stay real
    because non-persistent ones (attention masks, schedules) are not in any checkpoint.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original
