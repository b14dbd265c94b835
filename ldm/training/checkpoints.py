"""Training-run checkpoints: one folder per step, made complete before it becomes visible.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX/`, its files are fsynced, the `COMPLETE`
marker is written last (JSON: the step and each file's size) and the folder is renamed to
`checkpoints/step_XXXXXXXX/` (a rename within a folder is atomic). So a run killed at any moment leaves
only complete checkpoints and perhaps a `.tmp-step_*` folder, which the next write or resume removes;
a full disk removes the partial folder at once and raises `DiskFullError`. `--resume` checks the files
of the newest checkpoint (sizes against the marker, each file against its own header) and falls back
to an older one when they are damaged, saying which was skipped and why.

A LoRA run (`--lora-rank`) keeps only what it trains: the adapters in kohya's layout (`lora.safetensors`),
their EMA (`lora_ema.safetensors`) and `train_state.pt`; the frozen model is its --init's, not copied.

Under train.fsdp a checkpoint folder holds a `torch.distributed.checkpoint` directory written by every rank
instead of the safetensors files (ldm/training/sharded.py); the marker lists the files of the whole tree.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.checkpoint import (
    DiskFullError,
    file_problem,
    is_disk_full,
    load_state_dict_checked,
    read_checkpoint,
    save_checkpoint,
    save_pickle,
)
from common.errors import InputError
from ldm.lora.training import LoraNetwork
from ldm.model import LatentDiffusion
from ldm.training.distributed import full_tensors, lost_peer, state_of
from ldm.training.ema import EMA

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_PARTIAL_DIR = re.compile(r"^\.tmp-step_\d{8}$")
MARKER = "COMPLETE"
RESUME_FILE = "resume.pt"  # a sharded checkpoint's per-rank data positions and RNG states
LORA_FILE, LORA_EMA_FILE = "lora.safetensors", "lora_ema.safetensors"  # a LoRA run's checkpoint


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))


def write_checkpoint_dir(root: Path, step: int, write: Callable[[Path], None], *, keep: int = 2) -> Path:
    """Call `write(tmp_folder)` to fill a new checkpoint, publish it atomically, prune old ones.

    Kept: the `keep` newest checkpoints up to `step` (all with keep <= 0). Newer ones can only be left
    from before a resume that skipped them as damaged, and are removed. On a full disk the partial
    folder is removed and `DiskFullError` names the checkpoint and the space it needs."""
    try:
        write(begin_checkpoint_dir(root, step))
        seal_checkpoint_dir(partial_dir(root, step), step)
    except BaseException as exc:
        abandon_checkpoint_dir(root, step, exc)
        raise
    return publish_checkpoint_dir(root, step, keep=keep)


# The steps of `write_checkpoint_dir`, apart: a sharded checkpoint (ldm/training/sharded.py) is filled by every
# rank between rank 0's begin and its seal / publish.

def partial_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def begin_checkpoint_dir(root: Path, step: int) -> Path:
    """A new, empty `.tmp-step_*` folder (partial folders of an interrupted write removed first)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(root)
    tmp = partial_dir(root, step)
    tmp.mkdir()
    return tmp


def seal_checkpoint_dir(tmp: Path, step: int) -> None:
    """Make every file in the folder tree durable, then write the `COMPLETE` marker with their sizes (paths
    relative to the folder: `model.safetensors`, `dcp/__0_0.distcp`)."""
    files = {path.relative_to(tmp).as_posix(): path.stat().st_size for path in _files_in(tmp)}
    for name in files:  # a writer that does not fsync (plain torch.save) is made durable before the marker
        _fsync(tmp / name)
    for folder in {(tmp / name).parent for name in files} - {tmp}:
        _fsync(folder)
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}) + "\n")
    _fsync(tmp / MARKER)


def abandon_checkpoint_dir(root: Path, step: int, exc: BaseException) -> None:
    """Remove a partial folder after a failed write; raise `DiskFullError` if the disk was full."""
    tmp = partial_dir(root, step)
    written = _folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if is_disk_full(exc):
        raise _disk_full(root, root / step_dir_name(step), exc, written) from None


def publish_checkpoint_dir(root: Path, step: int, *, keep: int) -> Path:
    """Rename the sealed `.tmp-step_*` folder to `step_*` (atomic), then prune (see `write_checkpoint_dir`)."""
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial_dir(root, step), final)
    _fsync(root)
    done = list_checkpoints(root)
    older = [p for p in done if _step_of(p) <= step]
    for old in [p for p in done if _step_of(p) > step] + (older[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(root: Path, final: Path, exc: BaseException, written: int) -> DiskFullError:
    """The one-line error for a checkpoint that did not fit: its size estimated as the files written
    plus the one that failed, or the previous checkpoint's size if that is more."""
    previous = list_checkpoints(root)
    needed = written + (exc.needed_bytes if isinstance(exc, DiskFullError) else 0)
    if previous:
        needed = max(needed, _folder_bytes(previous[-1]))
    kept = f" (the last checkpoint, {previous[-1].name}, is kept)" if previous else ""
    return DiskFullError(final, needed, f"free space or choose another --out{kept}")


def _files_in(folder: Path) -> list[Path]:
    """The files of a folder tree, sorted (a flat checkpoint's are its top-level files)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files_in(folder)) if folder.is_dir() else 0


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk; where that is refused (a folder on some systems), go on, unless
    the disk is full."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise


def remove_partial_checkpoints(root: Path) -> list[Path]:
    """Remove the `.tmp-step_*` folders of an interrupted write (never valid checkpoints); -> those removed."""
    partial = [p for p in root.iterdir() if _PARTIAL_DIR.match(p.name)] if root.is_dir() else []
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def lost_contact(exc: BaseException, root: Path) -> InputError | None:
    """Under torchrun, the one-line error for `exc` when it means another rank is gone (a dead node or worker) or
    stuck: it names the newest complete checkpoint under `root` and how to go on. None for any other error,
    which the caller re-raises as it is."""
    if not lost_peer(exc, int(os.environ.get("WORLD_SIZE", "1"))):
        return None
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return InputError(f"rank {os.environ.get('RANK', '0')}: lost contact with another rank ({reason}): a node or "
                      f"worker died or stopped answering; the newest complete checkpoint is "
                      f"{latest_checkpoint(Path(root)) or 'none yet'}: relaunch the same command with --resume "
                      "(torchrun --max-restarts N relaunches by itself)")


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a complete checkpoint folder unusable (a file missing, truncated or unreadable), or None.

    The marker's file sizes are checked where it has them (checkpoints written before it did are
    checked file by file), then each file on its own (`common.checkpoint.file_problem`)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return f"its {MARKER} marker is unreadable"
    sizes = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(sizes, dict):  # a marker from before the sizes: just the step
        sizes = {}
    for name, expected in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size < expected:
            return f"{name} is truncated ({size} of {expected} bytes)"
        if size > expected:
            return f"{name} has changed ({size} bytes, written as {expected})"
    names = list(sizes) or sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MARKER)
    for name in names:
        problem = file_problem(folder / name)
        if problem is not None:
            return problem
    return None


def checkpoint_to_resume(root: Path, *, resume: bool) -> Path | None:
    """With --resume, the newest intact checkpoint under `root` (None: there is none yet). A damaged newer
    one is skipped with a warning naming it and why; if every one is damaged, an InputError. Without
    --resume, an InputError if the run folder already holds one: a new run never mixes with an old one.
    Partial folders of an interrupted write are removed either way."""
    for partial in remove_partial_checkpoints(root):
        print(f"removed {partial}: a partial checkpoint from an interrupted run", flush=True)
    found = list_checkpoints(root)
    if not resume:
        if found:
            raise InputError(f"{root.parent} already holds checkpoints: pass --resume to continue, or choose a new --out")
        return None
    skipped = []
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"warning: --resume skips {folder}: {problem}", file=sys.stderr, flush=True)
        skipped.append(f"{folder.name}: {problem}")
    if skipped:
        raise InputError(f"--resume: no intact checkpoint in {root} ({'; '.join(skipped)}); "
                         "remove the damaged folders to start over, or choose a new --out")
    print(f"--resume: no checkpoint in {root} yet, so this run starts at step 0", flush=True)
    return None


def write_training_checkpoint(root: Path, step: int, model: LatentDiffusion, trainable_state: dict[str, torch.Tensor],
                              ema: EMA, optimizer: torch.optim.Optimizer, scaler, *, keep: int,
                              resume: dict | None = None) -> Path:
    """Rank 0: `model.safetensors` (raw), `ema.safetensors` (EMA weights: the one to use), `train_state.pt`.

    `resume` (gathered from every rank by the trainer): each rank's data-stream position and RNG state, so a
    resume on the same number of ranks goes on exactly; on another it reseeds from (seed, rank, step)."""

    def write(folder: Path) -> None:
        meta = {"step": step}
        model_state = _merged_state(model, trainable_state)
        save_checkpoint(folder / "model.safetensors", model_state,
                        {"kind": "latent_diffusion", "config": model.config.to_json(), **meta})
        ema_state = _merged_state(model, {k: v for k, v in ema.shadow.items()})
        save_checkpoint(folder / "ema.safetensors", ema_state,
                        {"kind": "latent_diffusion", "config": model.config.to_json(), "ema": "true", **meta})
        _save_train_state(folder, step, ema, optimizer, scaler, resume)

    return write_checkpoint_dir(root, step, write, keep=keep)


def _save_train_state(folder: Path, step: int, ema: EMA, optimizer, scaler, resume: dict | None) -> None:
    """`train_state.pt`: the step, optimizer, grad scaler, EMA update count and every rank's `resume`."""
    save_pickle(folder / "train_state.pt", {"step": step, "optimizer": optimizer.state_dict(),
                                            "scaler": scaler.state_dict(), "ema_num_updates": ema.num_updates,
                                            "resume": resume or {}})


def _restore_train_state(folder: Path, ema: EMA, optimizer, scaler) -> int:
    """Load `train_state.pt` into the optimizer, scaler and EMA count (after the EMA's shadows); the step."""
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    ema.num_updates = int(state["ema_num_updates"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def save_training_checkpoint(root: Path, step: int, model: LatentDiffusion, net: nn.Module, ema: EMA,
                             optimizer: torch.optim.Optimizer, scaler, *, keep: int, is_main: bool,
                             resume: dict | None = None) -> None:
    """Called on every rank: each gathers the trained weights (a collective under FSDP), rank 0 writes
    them with `write_training_checkpoint`, and all ranks wait until it has."""
    trainable_state = state_of(net)
    if is_main:
        write_training_checkpoint(root, step, model, trainable_state, ema, optimizer, scaler, keep=keep,
                                  resume=resume)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _merged_state(model: LatentDiffusion, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole LatentDiffusion state with the trainable parts' weights (full tensors) swapped in."""
    return {key: (trainable[key].detach().cpu().to(value.dtype) if key in trainable else value.detach().cpu())
            for key, value in model.state_dict().items()}


def restore_training_checkpoint(folder: Path, trainable: nn.Module, ema: EMA, optimizer, scaler) -> int:
    """Load raw weights, EMA, optimizer and scaler; returns the step. Every rank reads the same files."""
    if not (folder / "model.safetensors").is_file() and (folder / LORA_FILE).is_file():
        raise InputError(f"{folder} is a LoRA run's checkpoint: resume it with the run's --lora-rank (and "
                         "--lora-alpha, --lora-text-encoder, --init), or choose a new --out")
    if not (folder / "model.safetensors").is_file() and (folder / "dcp").is_dir():
        raise InputError(f"{folder} is a sharded checkpoint (written with train.fsdp=true): resume it with "
                         "train.fsdp=true, or export it: tools/convert_checkpoint.py FOLDER OUT.safetensors")
    tensors, _ = read_checkpoint(folder / "model.safetensors")
    own = {k: v for k, v in tensors.items() if k.split(".")[0] in ("denoiser", "text_encoder")}
    target = trainable.module if isinstance(trainable, nn.parallel.DistributedDataParallel) else trainable
    load_state_dict_checked(target, {k: v for k, v in own.items() if k in target.state_dict()},
                            source=str(folder / "model.safetensors"))
    ema_tensors, _ = read_checkpoint(folder / "ema.safetensors")
    ema.load_state_dict({k: ema_tensors[k] for k in ema.shadow})
    return _restore_train_state(folder, ema, optimizer, scaler)


def save_lora_checkpoint(root: Path, step: int, network: LoraNetwork, ema: EMA, optimizer: torch.optim.Optimizer,
                         scaler, *, keep: int, is_main: bool, resume: dict | None = None) -> None:
    """A LoRA run's checkpoint, written by rank 0 while every rank waits: the adapters (kohya layout, as the
    run's `lora.safetensors`), their EMA (`EMA(trained_only=True)`: the frozen weights' average is the weights
    themselves) and `train_state.pt` (optimizer, scaler, EMA count, each rank's data position and RNG state)."""
    if is_main:
        def write(folder: Path) -> None:
            save_checkpoint(folder / LORA_FILE, network.state_dict(), {**network.metadata(), "step": str(step)},
                            ours=False)
            save_checkpoint(folder / LORA_EMA_FILE, {name: v.detach().cpu() for name, v in ema.shadow.items()},
                            {"step": str(step)})
            _save_train_state(folder, step, ema, optimizer, scaler, resume)

        write_checkpoint_dir(root, step, write, keep=keep)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def restore_lora_checkpoint(folder: Path, network: LoraNetwork, ema: EMA, optimizer, scaler) -> int:
    """Load a LoRA run's checkpoint into the adapters just attached (same rank, alpha and targets, else a one-line
    InputError); returns the step."""
    if not (folder / LORA_FILE).is_file():
        raise InputError(f"{folder} is the checkpoint of a full training run, not of a LoRA run: resume it "
                         "without --lora-rank, or choose a new --out")
    tensors, _ = read_checkpoint(folder / LORA_FILE)
    expected = network.state_dict()
    differs = sorted(set(tensors) ^ set(expected)) or [k for k, v in expected.items() if tensors[k].shape != v.shape
                                                       or (k.endswith(".alpha") and not torch.equal(tensors[k], v))]
    if differs:
        raise InputError(f"{folder / LORA_FILE} holds other adapters than this run attaches (first: {differs[0]}): "
                         f"resume with the run's --lora-rank, --lora-alpha, --lora-text-encoder and --init")
    for name, (down, up) in network.modules.items():
        down.copy_(tensors[f"{name}.lora_down.weight"])
        up.copy_(tensors[f"{name}.lora_up.weight"])
    shadows, _ = read_checkpoint(folder / LORA_EMA_FILE)
    ema.load_state_dict({name: shadows[name] for name in ema.shadow})
    return _restore_train_state(folder, ema, optimizer, scaler)


def export_ema(path: Path, model: LatentDiffusion, ema: EMA, *, is_main: bool = True) -> None:
    """The final model for `ldm.load_model` / `txt2img.py --ckpt`: the EMA weights, config inside, written by
    rank 0. Under FSDP every rank calls it: the EMA's shards are gathered (a collective) into full tensors."""
    shadow = full_tensors(ema.shadow, keep=is_main)
    if is_main:
        save_checkpoint(path, _merged_state(model, shadow),
                        {"kind": "latent_diffusion", "config": model.config.to_json(), "ema": "true"})


def saved_resume(folder: Path) -> dict:
    """The per-rank `resume` a checkpoint keeps ({"data": [state per rank], "rng": [state per rank]}): in
    train_state.pt, or resume.pt of a sharded one; {} for checkpoints from before it was saved."""
    for name in ("train_state.pt", RESUME_FILE):
        if (folder / name).is_file():
            state = torch.load(folder / name, map_location="cpu", weights_only=True)
            return (state.get("resume") if name == "train_state.pt" else state) or {}
    return {}
