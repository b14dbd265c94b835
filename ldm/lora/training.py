"""Training LoRA adapters (Hu et al. 2021) on a frozen model, saved as a kohya-format file.

`attach_lora(model, rank, alpha)` freezes every weight of the model and gives the UNet's transformer
projections (attn1 / attn2 `to_q`, `to_k`, `to_v`, `to_out.0`, and `ff.net.0.proj`, `ff.net.2`) and, with
`text_encoder=True`, the text encoder's attention and MLP projections (q / k / v / out, fc1 / fc2, in CLIP's
names) a low-rank update: W_eff = W + (alpha / rank) * up @ down, with `down` [rank, in] initialised as kohya
and PEFT do (kaiming-uniform, a = sqrt(5)) and `up` [out, rank] zero, so training starts at the base model.

The update is a parametrization (`torch.nn.utils.parametrize`) of the weight: the base tensor stays where it
is, untouched (`parametrizations.weight.original`), and everything that reads the weight (a Linear, the
fused in_proj of an open_clip attention: q / k / v are rows of it) sees W_eff. The adapted modules are the
ones `ldm.lora.keys.lora_targets` names, by the flattened diffusers / Hugging Face CLIP names kohya writes,
so `save_kohya` writes `lora_unet_<diffusers path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(and `lora_te_text_model_...`), the file `model.load_lora`, A1111, ComfyUI and diffusers' `load_lora_weights`
read. An SDXL model is named as kohya's `sdxl_train_network.py` names it: the UNet by sgm's paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), the two text towers `lora_te1_` (CLIP ViT-L)
and `lora_te2_` (OpenCLIP bigG, q / k / v as rows of its fused in_proj). `detach_lora(model, network)` removes
the adapters and leaves the base weights as they were.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from common.checkpoint import save_checkpoint
from common.errors import InputError
from ldm.lora.keys import Target, lora_targets

UNET_MODULES = re.compile(r"(down_blocks|mid_block|up_blocks)_.*transformer_blocks_\d+_"
                          r"(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2)")
SGM_UNET_MODULES = re.compile(r"(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_transformer_blocks_\d+_"
                              r"(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2)")  # the same, by sgm's paths
TEXT_MODULES = re.compile(r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")
TEXT_TOWERS = ("te", "te1", "te2")  # SD 1.x / 2.x's one tower; SDXL's CLIP ViT-L and OpenCLIP bigG


class LoraDelta(nn.Module):
    """The parametrization of one weight: W + scale * up @ down for each adapter (on rows of W, for q / k / v
    of a fused in_proj_weight)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        self.rows: list[tuple[int, int] | None] = []

    def add(self, rows: tuple[int, int] | None, out_features: int, in_features: int, rank: int,
            device: torch.device, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
        down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # kohya's and PEFT's init of lora_down / lora_A
        up = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.down.append(down)
        self.up.append(up)
        self.rows.append(rows)
        return down, up

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = None
        for down, up, rows in zip(self.down, self.up, self.rows):
            piece = self.scale * (up @ down).to(weight.dtype)
            if rows is None:
                delta = piece if delta is None else delta + piece
            else:
                full = torch.zeros_like(weight)
                full[rows[0]:rows[1]] = piece
                delta = full if delta is None else delta + full
        return weight if delta is None else weight + delta


@dataclass
class LoraNetwork:
    """The adapters attached to a model: kohya module name (`lora_unet_...`) -> (down, up) parameters."""

    rank: int
    alpha: float
    modules: dict[str, tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict)
    parametrized: list[tuple[nn.Module, str, list[str]]] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.modules.values() for p in pair]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kohya tensors: `<name>.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha` (float32)."""
        tensors = {}
        for name, (down, up) in self.modules.items():
            tensors[f"{name}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return tensors

    def metadata(self) -> dict[str, str]:
        """The header entries kohya's `train_network.py` writes that readers look at (A1111's and ComfyUI's
        LoRA pages show them; `ss_network_dim` / `ss_network_alpha` are the rank and alpha)."""
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": f"{self.alpha:g}", "ss_network_args": "{}",
                "ss_training_comment": "trained with tools/train_ldm.py (latent-diffusion-kit)"}


def attach_lora(model: nn.Module, rank: int, alpha: float, *, text_encoder: bool = False) -> LoraNetwork:
    """Freeze `model` (a `LatentDiffusion`) and give its UNet's transformer projections (and, with
    `text_encoder`, its text encoder's attention and MLP projections) trainable LoRA adapters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"--lora-rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"--lora-alpha must be a positive number, got {alpha!r}")
    model.requires_grad_(False)
    targets = lora_targets(model)
    chosen: dict[str, Target] = {}
    sdxl = "te" not in targets and ("te1" in targets or "te2" in targets)
    pattern = SGM_UNET_MODULES if sdxl else UNET_MODULES
    unet = {name: t for name, t in targets.get("unet", {}).items() if pattern.fullmatch(name)}
    if not unet:
        raise InputError("LoRA training needs a UNet denoiser with transformer blocks (no attention projection "
                         "of this model's denoiser has a diffusers name)")
    chosen.update({"lora_unet_" + name: t for name, t in unet.items()})
    if text_encoder:
        towers = [component for component in TEXT_TOWERS if component in targets]
        if not towers:
            raise InputError("--lora-text-encoder: this model's text encoder is not a CLIP-style tower")
        for component in towers:
            text = {name: t for name, t in targets[component].items() if TEXT_MODULES.fullmatch(name)}
            if not text:
                raise InputError("--lora-text-encoder: this model's text encoder has no CLIP-layout attention or "
                                 "MLP projections")
            chosen.update({f"lora_{component}_" + name: t for name, t in text.items()})
    network = LoraNetwork(rank, float(alpha))
    deltas: dict[str, LoraDelta] = {}
    for name in sorted(chosen, key=lambda n: (chosen[n].parameter, chosen[n].rows or (0, 0))):
        target = chosen[name]
        module_path, _, attribute = target.parameter.rpartition(".")
        module = model.get_submodule(module_path)
        weight = getattr(module, attribute)
        if target.parameter not in deltas:
            deltas[target.parameter] = LoraDelta(float(alpha) / rank)
        delta = deltas[target.parameter]
        out = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        network.modules[name] = delta.add(target.rows, out, weight.shape[1], rank, weight.device, weight.dtype)
    for parameter, delta in deltas.items():
        module_path, _, attribute = parameter.rpartition(".")
        module = model.get_submodule(module_path)
        order = list(module._parameters)
        parametrize.register_parametrization(module, attribute, delta, unsafe=True)
        network.parametrized.append((module, attribute, order))
    return network


def detach_lora(model: nn.Module, network: LoraNetwork) -> None:
    """Remove the adapters: the weights are the base ones again (bit for bit)."""
    for module, attribute, order in network.parametrized:
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        names = [name for name in dict.fromkeys([*order, *module._parameters]) if name in module._parameters]
        module._parameters = {name: module._parameters[name] for name in names}  # the order of before (state_dict)
    network.parametrized.clear()


def save_kohya(path: str | Path, network: LoraNetwork) -> None:
    """Write the adapters as a kohya LoRA `.safetensors` (atomically: a crash leaves the old file or the new)."""
    save_checkpoint(path, network.state_dict(), network.metadata(), ours=False)
