"""Training-run checkpoints: one folder per step, made complete before it becomes visible.

A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX/` and then renamed to
`checkpoints/step_XXXXXXXX/` (a rename within a folder is atomic), so a run killed at any moment
leaves only complete checkpoints behind; `latest` finds the newest of them.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint_dir(root: Path, step: int, write: Callable[[Path], None], *, keep: int = 2) -> Path:
    """Call `write(tmp_folder)` to fill a new checkpoint, publish it atomically, prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / "COMPLETE").write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None
