"""The training scripts' CSV log."""
from __future__ import annotations

import csv
from pathlib import Path

import torch


class MetricsLog:
    """A CSV of metric rows; a row with new columns rewrites the file with the wider header."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.fields = list(dict.fromkeys(k for r in self.rows for k in r)) or ["step"]

    def write(self, row: dict) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.is_file():
            self.fields += new
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows)
            tmp.replace(self.path)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)


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
