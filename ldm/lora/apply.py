"""Merging LoRA files into a model's weights, and taking them out again.

`load_lora(model, path, weight)` adds `weight * scale * up @ down` to every weight the file names (computed in
float32, cast back to the weight's dtype), so sampling costs nothing extra. The first time a weight changes,
its original bytes are kept (on the CPU), so `unload_loras(model)` restores the base model exactly however
many files were loaded. Nothing changes unless every module of the file fits: a name that matches nothing
is an error (or, with `allow_partial`, a warning), a shape that does not fit is always one.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.errors import InputError
from ldm.lora.files import LoraFile, LoraModule, read_lora
from ldm.lora.keys import CONTEXT_FAMILIES, Target, lora_targets, model_family, resolve_component

SHOWN = 5  # names quoted in a message


@dataclass
class LoraReport:
    """What one `load_lora` did: the file's keys and how many were applied, the weights it changed (our
    parameter names, `[a:b]` for rows of a fused q/k/v weight), and the modules left out (allow_partial)."""

    path: Path
    weight: float
    layout: str
    total_keys: int
    matched_keys: int
    changed: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = sorted({".".join(name.split(".")[:3 if ".embedders." in name else 1]) for name in self.changed})
        text = (f"LoRA {self.path.name} ({self.layout}) at weight {self.weight:g}: {self.matched_keys} of "
                f"{self.total_keys} keys matched, {len(self.changed)} weights changed ({', '.join(parts)})")
        return text + (f"; {len(self.unmatched)} modules left out" if self.unmatched else "")


@dataclass
class LoraState:
    """Kept on the model while LoRAs are merged: the original weights and one report per file."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[LoraReport] = field(default_factory=list)


def lora_state(model: nn.Module) -> LoraState:
    if not isinstance(getattr(model, "_lora_state", None), LoraState):
        model._lora_state = LoraState()
    return model._lora_state


def load_lora(model: nn.Module, path: str | Path, weight: float = 1.0, *, allow_partial: bool = False) -> LoraReport:
    """Merge a LoRA file into the model's weights: W += weight * (alpha / r) * up @ down for each module.

    Reads kohya (`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*` / `lora_te2_*`; LoCon convs), diffusers /
    PEFT (`unet.*.lora_A/B`, `text_encoder.*`, `text_encoder_2.*`) and fp16 files, for SD 1.x, 2.x and SDXL.
    Modules that match nothing in this model are an InputError naming them and the likely cause (a LoRA for
    another model family), unless `allow_partial` (then a warning, and the rest is applied); a file of which
    nothing matches, and a module whose shape does not fit its weight, are errors either way. Call
    `unload_loras` to get the base weights back; several files may be loaded, each with its own weight.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise InputError(f"LoRA weight must be a finite number, got {weight!r}")
    lora = read_lora(path)
    targets = lora_targets(model)
    placed: list[tuple[LoraModule, Target]] = []
    unmatched: list[tuple[LoraModule, str]] = []
    for module in lora.modules:
        component = resolve_component(module.component, targets)
        target = targets[component].get(module.flat_name) if component else None
        if module.problem is not None:
            unmatched.append((module, module.problem))
        elif target is None:
            unmatched.append((module, "no such module in this model"))
        else:
            placed.append((module, target))
    parameters = dict(model.named_parameters())
    _check_shapes(model, lora, placed, parameters)
    _check_duplicates(lora, placed)
    if not placed:
        raise InputError(f"LoRA file {lora.path}: none of its {lora.n_keys} keys match this model "
                         f"({_examples(lora, unmatched)}). {_cause(model, lora)}")
    if unmatched or lora.unknown:
        message = (f"LoRA file {lora.path}: {len(unmatched)} of {len(lora.modules)} modules and "
                   f"{len(lora.unknown)} other keys cannot be applied ({_examples(lora, unmatched)}). "
                   f"{_cause(model, lora)}")
        if not allow_partial:
            raise InputError(message + " Pass allow_partial=True to apply the rest.")
        warnings.warn(message + " Applied the rest (allow_partial).", stacklevel=2)
    state = lora_state(model)
    for name, changes in _by_parameter(placed).items():
        parameter = parameters[name]
        if name not in state.originals:
            state.originals[name] = parameter.detach().to("cpu", copy=True)
        merged = parameter.detach().to(torch.float32, copy=True)
        for module, target in changes:
            rows = slice(*target.rows) if target.rows else slice(None)
            merged[rows] += (weight * module.scale) * lora_delta(module, merged[rows].shape, merged.device)
        _write(parameter, merged)
    _drop_derived_copies(model)
    report = LoraReport(lora.path, float(weight), lora.layout, lora.n_keys, sum(len(m.keys) for m, _ in placed),
                        sorted(str(t) for _, t in placed), sorted(m.name for m, _ in unmatched))
    state.reports.append(report)
    return report


def unload_loras(model: nn.Module) -> int:
    """Take every loaded LoRA out: the changed weights get their original bytes back. Returns how many."""
    state = lora_state(model)
    parameters = dict(model.named_parameters())
    for name, original in state.originals.items():
        _write(parameters[name], original)
    restored = len(state.originals)
    state.originals.clear()
    state.reports.clear()
    _drop_derived_copies(model)
    return restored


def loaded_loras(model: nn.Module) -> tuple[LoraReport, ...]:
    """The reports of the LoRAs merged into the model now, in loading order."""
    return tuple(lora_state(model).reports)


def lora_delta(module: LoraModule, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`up @ down` (float32) in the shape of the weight: [out, in] for a linear, [out, in, k, k] for a conv
    (LoCon: down is a k x k kernel, up 1x1; A1111's `rebuild_conventional`)."""
    up = module.up.to(device, torch.float32).reshape(module.up.shape[0], module.rank)
    down = module.down.to(device, torch.float32).reshape(module.rank, -1)
    return (up @ down).reshape(shape)


def _fits(module: LoraModule, shape: torch.Size) -> bool:
    """Whether up [out, r(, 1, 1)] @ down [r, in(, kh, kw)] makes a weight of `shape` ([out, in(, kh, kw)])."""
    down, up, rank = module.down, module.up, module.rank
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        return False
    if up.shape[0] != shape[0] or math.prod(down.shape[1:]) != math.prod(shape[1:]):
        return False
    kernel = tuple(shape[2:])
    return down.ndim == 2 or tuple(down.shape[1:]) == tuple(shape[1:]) or (not kernel and down.shape[2:] == (1, 1))


def _check_shapes(model: nn.Module, lora: LoraFile, placed: list, parameters: dict) -> None:
    for module, target in placed:
        shape = parameters[target.parameter].shape
        if target.rows:
            shape = torch.Size([target.rows[1] - target.rows[0], *shape[1:]])
        if not _fits(module, shape):
            made = [module.up.shape[0], *module.down.shape[1:]]
            raise InputError(f"LoRA file {lora.path}: {module.name} makes a weight of shape {made} (lora_down "
                             f"{list(module.down.shape)}, lora_up {list(module.up.shape)}) but {target} has "
                             f"shape {list(shape)}. {_cause(model, lora, shapes=True)}")
        for tensor in (module.down, module.up):
            if not torch.isfinite(tensor).all():
                raise InputError(f"LoRA file {lora.path}: {module.name} holds NaN or infinite values; the file is "
                                 "corrupt or was saved from a diverged training run")


def _check_duplicates(lora: LoraFile, placed: list) -> None:
    seen: dict[Target, str] = {}
    for module, target in placed:
        if target in seen:
            raise InputError(f"LoRA file {lora.path}: {seen[target]} and {module.name} both change {target}; "
                             "the file names one module twice (in two layouts?)")
        seen[target] = module.name


def _by_parameter(placed: list) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for module, target in placed:
        grouped.setdefault(target.parameter, []).append((module, target))
    return grouped


@torch.no_grad()
def _write(parameter: torch.Tensor, values: torch.Tensor) -> None:
    """Copy into the parameter in place (its dtype, device and memory layout stay)."""
    if parameter.is_inference():  # weights made under inference_mode can only be written there
        with torch.inference_mode():
            parameter.copy_(values)
    else:
        parameter.copy_(values)


def _drop_derived_copies(model: nn.Module) -> None:
    """Forget copies made from the weights (the fused Q/K/V matrices of `fuse_qkv_projections`); they are
    remade from the new weights at the next call. The copies track in-place writes by version counters,
    which weights made under inference_mode lack, so they are dropped here rather than trusted."""
    for module in model.modules():
        if getattr(module, "_fused_cache", None) is not None:
            module._fused_cache = None


def _examples(lora: LoraFile, unmatched: list) -> str:
    shown = [f"{module.name} ({why})" for module, why in unmatched[:SHOWN]]
    shown += [f"{key} ({why})" for key, why in list(lora.unknown.items())[:SHOWN - len(shown)]]
    more = len(unmatched) + len(lora.unknown) - len(shown)
    return "e.g. " + ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "none"


def _cause(model: nn.Module, lora: LoraFile, *, shapes: bool = False) -> str:
    """The likely cause, from what the file's names and shapes say it was made for."""
    ours, parts = model_family(model), lora_targets(model)
    components = {m.component for m in lora.modules} - {""}
    widths = sorted({m.down.shape[1] for m in lora.modules if m.down is not None and m.down.ndim >= 2
                     and m.flat_name.endswith(("attn2_to_k", "attn2_to_v"))})
    context = getattr(model.config.denoiser, "context_dim", None)
    if {"te1", "te2"} & components and "te2" not in parts:
        return f"The file looks made for SDXL (it has keys for two text encoders), and this model is {ours}."
    foreign = [w for w in widths if w != context]
    if foreign:
        family = CONTEXT_FAMILIES.get(foreign[-1], "another model")
        return (f"The file looks made for {family} (its cross-attention LoRAs read context width {foreign[-1]}), "
                f"and this model is {ours}.")
    if not components:
        return ("Its names are of no Stable Diffusion UNet or text encoder (expected lora_unet_* / lora_te_* or "
                f"unet.* / text_encoder.*): is it a LoRA file for this kind of model? This model is {ours}.")
    missing = sorted(c for c in components if resolve_component(c, parts) is None)
    if missing:
        return f"The file has parts for {', '.join(missing)}, which this model ({ours}) lacks."
    if shapes:
        return f"A LoRA for a model of other widths than this one ({ours})?"
    return (f"Its module names do not exist in this model ({ours}): a LoRA for a model with other block counts "
            "or transformer depths?")
