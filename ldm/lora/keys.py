"""Where a LoRA module lands in our model: its name in the file -> our parameter (and rows of it).

LoRA files name the modules they change in another tool's layout:
- kohya: `lora_unet_` + the diffusers UNet path with every `.` replaced by `_` (SD 1.x/2.x), or the sgm
  path (SDXL, which kohya trains on sgm's UNet: `lora_unet_input_blocks_4_1_...`); `lora_te_`, `lora_te1_`,
  `lora_te2_` + the Hugging Face CLIP path (`text_model_encoder_layers_0_self_attn_q_proj`);
- diffusers / PEFT: `unet.` + the diffusers path, `text_encoder.` / `text_encoder_2.` + the HF CLIP path.

Our models keep the original names: the UNet's `input_blocks.N.M` (`ldm/denoisers/unet.py`), open_clip
towers whose q, k, v projections are one `in_proj_weight` (a LoRA on q lands on its first third of rows),
and SDXL's CLIP ViT-L in Hugging Face layout (`ldm/text/hf_clip.py`). kohya's flattening cannot be undone
by splitting on `_` (`to_q`, `proj_in`, `transformer_blocks` hold `_` themselves), so, as A1111 does, every
name a file may use is flattened the same way and looked up: `lora_targets(model)` is that table.

The diffusers <-> original UNet block map is a function of the UNet config (`unet_block_names`), the rule
of the LDM `UNetModel` constructor: A1111's hard-coded indices hold only for SD's 2 ResBlocks per level.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ldm.conditioner import Conditioner
from ldm.denoisers.unet import UNetConfig

# Inside a ResBlock: ours (original) -> diffusers' ResnetBlock2D. Inside a transformer the names are the same.
RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# Inside an open_clip text block -> Hugging Face CLIP's encoder layer (q, k, v: rows of in_proj_weight).
OPEN_CLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
HF_QKV = ("q_proj", "k_proj", "v_proj")
# Cross-attention (context) widths of the released families: what a LoRA's attn2.to_k / to_v input width tells.
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


@dataclass(frozen=True)
class Target:
    """A weight a LoRA module changes: our parameter's name in the `LatentDiffusion` and, for q / k / v
    on a fused `in_proj_weight`, its rows [start, stop)."""

    parameter: str
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        return self.parameter if self.rows is None else f"{self.parameter}[{self.rows[0]}:{self.rows[1]}]"


def flat(name: str) -> str:
    """kohya's flattening of a module path: every `.` -> `_`."""
    return name.replace(".", "_")


def unet_block_names(config: UNetConfig) -> dict[str, str]:
    """Our UNet blocks and top-level modules -> the diffusers `UNet2DConditionModel` path of the same thing.

    With R = num_res_blocks and L levels (`up_blocks.i` is level L-1-i): `down_blocks.i.resnets.j` /
    `.attentions.j` are `input_blocks.{1 + i(R+1) + j}.0` / `.1`, the downsampler `input_blocks.{(i+1)(R+1)}.0.op`;
    `up_blocks.i.resnets.j` / `.attentions.j` are `output_blocks.{i(R+1) + j}.0` / `.1`, the upsampler the last
    block's `.2.conv` (`.1.conv` at a level without attention); the middle block is resnet, attention, resnet.
    Levels without attention (SDXL's first, SD's last) have no `attentions`.
    """
    levels, per_level = len(config.channel_mult), config.num_res_blocks
    attention = [2 ** level in config.attention_resolutions for level in range(levels)]
    names = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    if config.num_classes == "sequential":  # SDXL's vector conditioning
        names.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    for i in range(levels):
        for j in range(per_level):
            n = 1 + i * (per_level + 1) + j
            names[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            if attention[i]:
                names[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1 and not config.resblock_updown:  # (with resblock_updown the resampler is a ResBlock)
            names[f"input_blocks.{(i + 1) * (per_level + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for i in range(levels):
        level = levels - 1 - i
        for j in range(per_level + 1):
            n = i * (per_level + 1) + j
            names[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attention[level]:
                names[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
            if level and j == per_level and not config.resblock_updown:
                names[f"output_blocks.{n}.{2 if attention[level] else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return names


def diffusers_module_name(module: str, blocks: dict[str, str]) -> str | None:
    """Our UNet module path (e.g. `input_blocks.1.0.in_layers.2`) -> diffusers' (`down_blocks.0.resnets.0.conv1`),
    given `unet_block_names`; None for a module diffusers does not have."""
    parts = module.split(".")
    for cut in range(min(len(parts), 4), 1, -1):  # the longest block prefix: `input_blocks.3.0.op` has 4 parts
        block = ".".join(parts[:cut])
        if block in blocks:
            rest = ".".join(parts[cut:])
            if not rest:
                return blocks[block]
            if ".resnets." in blocks[block]:
                return f"{blocks[block]}.{RESBLOCK_NAMES[rest]}" if rest in RESBLOCK_NAMES else None
            return f"{blocks[block]}.{rest}"
    return None


def weight_modules(module: nn.Module) -> dict[str, str]:
    """Module path -> parameter name of every weight a LoRA can change (matrices and conv kernels)."""
    return {name.removesuffix(".weight"): name for name, p in module.named_parameters()
            if p.ndim >= 2 and name.endswith(".weight")}


def unet_aliases(denoiser: nn.Module, config: UNetConfig | None, prefix: str) -> dict[str, Target]:
    """Flattened names (ours = sgm's, and diffusers') -> Target for a denoiser under `prefix`."""
    blocks = unet_block_names(config) if isinstance(config, UNetConfig) else {}
    table = {}
    for module, parameter in weight_modules(denoiser).items():
        target = Target(prefix + parameter)
        table[flat(module)] = target
        if (name := diffusers_module_name(module, blocks)) is not None:
            table[flat(name)] = target
    return table


def text_aliases(tower: nn.Module, prefix: str) -> dict[str, Target]:
    """Flattened names (ours, and Hugging Face CLIP's, with and without `text_model.`) -> Target for a tower."""
    table = {}
    for module, parameter in weight_modules(tower).items():
        table[flat(module)] = Target(prefix + parameter)
        if m := re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\.(.+)", module):  # open_clip layout
            layer, inner = f"encoder.layers.{m.group(1)}.", m.group(2)
            if inner in OPEN_CLIP_TO_HF:
                hf = {layer + OPEN_CLIP_TO_HF[inner]: Target(prefix + parameter)}
            else:
                hf = {}
        elif m := re.fullmatch(r"transformer\.text_model\.(.+)", module):  # Hugging Face layout (SDXL's CLIP-L)
            hf = {m.group(1): Target(prefix + parameter)}
        else:
            hf = {}
        for name, target in hf.items():
            table[flat("text_model." + name)] = table[flat(name)] = target
    for name, p in tower.named_parameters():  # open_clip's fused q, k, v: one third of the rows each
        if m := re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", name):
            width = p.shape[0] // 3
            for k, proj in enumerate(HF_QKV):
                target = Target(prefix + name, (k * width, (k + 1) * width))
                hf = f"encoder.layers.{m.group(1)}.self_attn.{proj}"
                table[flat("text_model." + hf)] = table[flat(hf)] = target
    return table


def lora_targets(model: nn.Module) -> dict[str, dict[str, Target]]:
    """Component ("unet", "te" for SD 1.x/2.x's one tower, "te1" / "te2" for SDXL's CLIP-L / bigG) ->
    flattened module name -> Target, for a `LatentDiffusion`."""
    components = {}
    if model.denoiser is not None:
        components["unet"] = unet_aliases(model.denoiser, model.config.denoiser, "denoiser.")
    text = model.text_encoder
    if isinstance(text, Conditioner):  # SDXL base: CLIP-L, bigG; the refiner: bigG alone (diffusers' text_encoder_2)
        names = ("te1", "te2") if text.text_towers == 2 else ("te2",)
        for name, tower, index in zip(names, text.towers, range(text.text_towers)):
            components[name] = text_aliases(tower, f"text_encoder.embedders.{index}.")
    elif text is not None:
        components["te"] = text_aliases(text, "text_encoder.")
    return components


def resolve_component(component: str, targets: dict[str, dict[str, Target]]) -> str | None:
    """The model's component for a file's: `lora_te_` / `text_encoder.` is SD 1.x/2.x's tower, or SDXL's
    first (CLIP-L, as diffusers loads it); `te1` / `te2` exist only in SDXL models."""
    if component == "te" and "te" not in targets:
        component = "te1"
    return component if component in targets else None


def model_family(model: nn.Module) -> str:
    """A short description of the model for messages: SDXL, SD 1.x / 2.x by cross-attention width, or the width."""
    if isinstance(model.text_encoder, Conditioner):
        return "SDXL" if model.text_encoder.text_towers == 2 else "an SDXL refiner"
    width = getattr(model.config.denoiser, "context_dim", None)
    if width in (768, 1024):
        return f"{CONTEXT_FAMILIES[width]} (cross-attention width {width})"
    return f"a model with cross-attention width {width}" if width else "a model without a UNet"
