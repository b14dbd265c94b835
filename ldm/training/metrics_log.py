"""The training scripts' CSV log."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from common.checkpoint import write_text_atomically


class MetricsLog:
    """A CSV of metric rows; a row with new columns rewrites the file with the wider header.

    A resumed run repeats the steps after its checkpoint, so rows of an earlier run past the resumed
    step are dropped (the file rewritten atomically): each step keeps the rows of the run that went on.
    Give `resume_step` (0 for a fresh run) to drop them on opening; without it they are dropped at the
    first write, as the rows at and after that row's step (a step may hold several rows, as a training
    row and a held-out row)."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.fields = list(dict.fromkeys(k for r in self.rows for k in r)) or ["step"]
        self._earlier_run = resume_step is None and bool(self.rows)  # rows to prune at the first write
        if resume_step is not None:
            self._drop_rows_after(resume_step)

    def write(self, row: dict) -> None:
        if self._earlier_run:
            self._earlier_run = False
            self._drop_rows_after(_step(row) - 1)
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.is_file():
            self.fields += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def _drop_rows_after(self, step: float) -> None:
        kept = [r for r in self.rows if _step(r) <= step]
        if len(kept) < len(self.rows):
            self.rows = kept
            self._rewrite()

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomically(self.path, buffer.getvalue())


def _step(row: dict) -> float:
    """A row's step (a number from the CSV's text); a row without one counts as step 0 and is kept."""
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class TensorBoardLog:
    """The same rows as TensorBoard scalars (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def add_image(self, tag: str, image, step: int) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def timestep_buckets(losses: torch.Tensor, t: torch.Tensor, num_timesteps: int, buckets: int = 4) -> dict[str, float]:
    """Mean loss per timestep range (t in [0, T/4), [T/4, T/2), ...), for the log."""
    out = {}
    edges = torch.linspace(0, num_timesteps, buckets + 1)
    for i in range(buckets):
        sel = (t >= edges[i]) & (t < edges[i + 1])
        if sel.any():
            out[f"loss_t{int(edges[i])}-{int(edges[i + 1]) - 1}"] = losses[sel].mean().item()
    return out
