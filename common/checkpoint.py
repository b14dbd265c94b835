"""Reading and writing checkpoints: safetensors (ours, with the config inside) and original files.

Original `.ckpt` files are pickles: they are read with `torch.load(weights_only=True)`, which
refuses anything that would run code, and never executed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

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

    A crash at any moment leaves either the old file or the new one, never a partial file; a full
    disk removes the partial file and raises `DiskFullError`.
    `.safetensors` gets `metadata` (non-string values as JSON) and, when `ours`, our format tag;
    `.ckpt` / `.pt` is written as the original scripts do, `{"state_dict": tensors}` (no metadata).
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise InputError(f"cannot write {path}: use a .safetensors or .ckpt file name")
    meta = {"format": FORMAT} if ours else {}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        needed = sum(v.nbytes for v in contiguous.values()) + len(json.dumps(meta)) + 100 * len(contiguous)
        write_atomically(path, lambda tmp: save_file(contiguous, tmp, metadata=meta), needed_bytes=needed)
    else:
        save_pickle(path, {"state_dict": contiguous})


def save_pickle(path: str | Path, obj: Any) -> None:
    """`torch.save(obj)` atomically, like `save_checkpoint` (a full disk: `DiskFullError`, no partial file)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC), not a bare torch error
            torch.save(obj, f)

    write_atomically(Path(path), write, needed_bytes=_tensor_bytes(obj))


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a small text file (a summary, a config) atomically, like `save_checkpoint`."""
    data = text.encode("utf-8")
    write_atomically(Path(path), lambda tmp: Path(tmp).write_bytes(data), needed_bytes=len(data))


def write_atomically(path: Path, write: Callable[[str], None], *, needed_bytes: int) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then fsynced and renamed to `path`.

    On any failure the temporary file is removed; a full disk raises `DiskFullError` naming `path`
    and `needed_bytes` (the size of what was being written)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path, needed_bytes) from None
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested dict / list (an optimizer state): a pickle's size, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


# --- full disks -----------------------------------------------------------------------------------

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports "... I/O error: No space left on device (os error 28)", without an errno.
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (?:%d|%d)\b" % _DISK_FULL)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from (torch wraps the OSError in a RuntimeError),
    is a full disk or an exceeded quota."""
    return _disk_full_cause(exc) is not None


def _disk_full_cause(exc: BaseException | None) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return exc
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        if not isinstance(exc, OSError) and _DISK_FULL_TEXT.search(str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_path(exc: BaseException) -> str | None:
    """The file a disk-full error names, if it names one."""
    cause = _disk_full_cause(exc)
    if isinstance(cause, DiskFullError):
        return str(cause.path)
    return getattr(cause, "filename", None)


def megabytes(n_bytes: int) -> str:
    """`n_bytes` in MB (10^6) for a message, to 0.1 MB (at least 0.1, so a small write never reads as 0)."""
    return f"{max(n_bytes / 1e6, 0.1):.1f}"


class DiskFullError(InputError):
    """A write that found the disk full (ENOSPC / EDQUOT); the partial output has been removed."""

    def __init__(self, path: str | Path, needed_bytes: int, fix: str = "free space or choose another output folder"):
        self.path, self.needed_bytes = Path(path), int(needed_bytes)
        super().__init__(f"disk full at {path} ({megabytes(self.needed_bytes)} MB needed): {fix}")


# --- intact files ---------------------------------------------------------------------------------

def file_problem(path: str | Path) -> str | None:
    """What makes a checkpoint file unusable (missing, truncated, unreadable), or None if it is whole.

    Cheap: a safetensors file's size is checked against its header's data offsets (no tensor is
    read); a pickle is opened with `torch.load(mmap=True)`, which needs its zip directory, written
    last, and maps the tensors without reading them."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in PICKLE_SUFFIXES:
        zipped = zipfile.is_zipfile(path)  # torch >= 1.6 writes zips, their directory last: a cut file has none
        try:  # a pickle from before torch 1.6 cannot be mapped: it is read whole
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
            reason = f"{type(exc).__name__}: {_reason(str(exc))}" if zipped else "truncated or not a PyTorch file"
            return f"{path.name} is unreadable ({reason})"
    return None


_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes, no header)"
        header_len = struct.unpack("<Q", head)[0]
        if header_len > _MAX_HEADER:
            return f"{path.name} is not a safetensors file (its header would be {header_len} bytes)"
        if 8 + header_len > size:
            return f"{path.name} is truncated ({size} bytes, shorter than its {header_len}-byte header)"
        try:
            header = json.loads(f.read(header_len))
            end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path.name} has a corrupt header (not safetensors JSON with data_offsets)"
    expected = 8 + header_len + end
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"{path.name} is corrupt ({size - expected} bytes past the end of its data)"
    return None


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
        with _SkipMetaInit():
            yield
    finally:
        nn.Module.register_parameter = original


# What initialisations do to a tensor in place (torch.nn.init's, and the modules' own). A meta tensor has no
# values, so on one they are nothing to do; but some run torch's Python reference code, and its first call
# imports torch._dynamo (sympy, triton...: over 1 s of CPU, half of `import torch`).
_INIT_OPS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
                       torch.Tensor.exponential_, torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.log_normal_,
                       torch.Tensor.cauchy_, torch.Tensor.geometric_, torch.Tensor.erfinv_, torch.Tensor.mul_,
                       torch.Tensor.add_, torch.Tensor.clamp_}
                      | {getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and name[0] != "_"})


class _SkipMetaInit(TorchFunctionMode):
    """`empty_parameters`' initialisations of its meta parameters: skipped (they would compute nothing)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_OPS:
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)
