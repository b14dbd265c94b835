"""Exponential moving average of model weights (as the original `LitEma`, kept in float32)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's parameters: shadow <- decay * shadow + (1 - decay) * param.

    With `warmup` the decay is min(decay, (1 + n) / (10 + n)) after n updates, as in LitEma, so
    early averages are not dominated by the random initialisation. Before `start_step` the shadow
    simply follows the weights.

    The shadows take the parameters' type: under FSDP2 (`fully_shard`) the parameters are DTensor shards
    and so are the shadows, each rank averaging its own shard (`_foreach_lerp_` and `copy_` run on
    DTensors shard by shard, with no communication); `ldm.training.sharded` gathers them to sample,
    export or save.

    `trained_only`: shadow only the parameters that require gradients (a LoRA run: the adapters, not the
    frozen model, whose average is itself); the others are left as they are by `copy_to` / `applied_to`.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, start_step: int = 0, warmup: bool = True,
                 trained_only: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.start_step, self.warmup = decay, start_step, warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()
                       if p.requires_grad or not trained_only}

    def _named(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(name, p) for name, p in model.named_parameters() if name in self.shadow]

    def current_decay(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.current_decay(step)
        if step >= self.start_step:
            self.num_updates += 1
        named = self._named(model)
        # One multi-tensor kernel instead of a lerp per parameter (same arithmetic).
        torch._foreach_lerp_([self.shadow[name] for name, _ in named], [p.detach().float() for _, p in named],
                             1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in self._named(model):
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (for evaluation), then restore. A model whose parameters
        are the shadows themselves (`ldm.training.sharded.ema_weights`' gathered copy) is used as it is, with
        no backup copy."""
        if all(type(p.data) is torch.Tensor and p.data_ptr() == self.shadow[name].data_ptr()
               for name, p in self._named(model)):
            yield model
            return
        backup = {name: p.detach().clone() for name, p in self._named(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in self._named(model):
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__num_updates__": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.num_updates = int(state.pop("__num_updates__", torch.tensor(0)))
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state is missing {missing[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
