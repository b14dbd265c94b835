"""Reading LoRA files: kohya, kohya LoCon, diffusers / PEFT (and diffusers' older layouts) -> `LoraModule`s.

A LoRA module changes one weight W by `scale * up @ down` (Hu et al. 2021, eq. 3: W + (alpha / r) B A), with
`down` [r, in] (LoCon on a k x k conv: a conv kernel [r, in, k, k]) and `up` [out, r] (or [out, r, 1, 1]).
The scale, as kohya, diffusers and A1111 apply it (see ../shared/reference/lora/README.md):
- kohya: `alpha / r` from the module's own `.alpha` tensor (LoCon convs may have another alpha than the
  linears); a missing or zero alpha means alpha = r, scale 1;
- diffusers / PEFT: `lora_alpha / r` from the header's `lora_adapter_metadata` (`unet.lora_alpha`, and
  per-module alphas in `unet.alpha_pattern`; `use_rslora`: alpha / sqrt(r)); no alpha anywhere: scale 1.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.checkpoint import read_checkpoint
from common.errors import InputError
from ldm.lora.keys import flat

# Key endings: (ending, role) for the layouts we read. kohya; PEFT; diffusers' LoRACompatible layers and
# text-encoder patches (0.14-0.20); the older attention processors (`attn1.processor.to_q_lora.down.weight`).
ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
         (".lora_A.weight", "down"), (".lora_B.weight", "up"),
         (".lora.down.weight", "down"), (".lora.up.weight", "up"),
         (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"))
OLD_PROCESSOR = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# Other adapter kinds of LyCORIS and friends, by a word in their keys: what they are, for the message.
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
               "dora_scale": "DoRA", "oft_": "OFT", "boft_": "BOFT", ".diff": "a full weight difference (diff)",
               "w_norm": "norm weights", "b_norm": "norm weights", "lora_magnitude_vector": "DoRA"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "te", "text_encoder_2.": "te2"}
METADATA_PREFIXES = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2", "te1": "text_encoder"}
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
              "add_embedding.", "input_blocks.", "middle_block.", "output_blocks.")


@dataclass
class LoraModule:
    """One LoRA module of a file: `name` as the file writes it (its keys without the ending), the `component`
    it is for ("unet", "te", "te1", "te2"), its path there flattened (`flat_name`) and, where the file has it,
    with dots (`path`, for PEFT's alpha_pattern), its tensors and scale."""

    name: str
    component: str
    flat_name: str
    path: str | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    scale: float = 1.0
    keys: list[str] = field(default_factory=list)
    problem: str | None = None  # why it cannot be applied (an unsupported extra tensor, a missing half)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    """A parsed LoRA file: its modules, the keys of no module (`unknown`, each with why) and its layout."""

    path: Path
    layout: str
    modules: list[LoraModule]
    unknown: dict[str, str]
    metadata: dict[str, str]

    @property
    def n_keys(self) -> int:
        return sum(len(m.keys) for m in self.modules) + len(self.unknown)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name as written, role) of a tensor key, or None for a key of no LoRA role."""
    for ending, role in ROLES:
        if key.endswith(ending):
            return key[:-len(ending)], role
    if m := OLD_PROCESSOR.match(key):
        return f"{m.group(1)}.{m.group(3)}", m.group(4)
    return None


def locate(name: str) -> tuple[str, str, str | None, str]:
    """(component, flattened path, dotted path or None, layout) of a module name as a file writes it."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):], None, "kohya"
    name = name.removeprefix("base_model.model.")  # PEFT's wrapper, in files saved straight from a PeftModel
    component, path = "", name
    for prefix, candidate in sorted(PEFT_PREFIXES.items(), key=lambda item: -len(item[0])):
        if name.startswith(prefix):
            component, path = candidate, name[len(prefix):]
            break
    else:
        if name.startswith(UNET_ROOTS):  # `unet.save_attn_procs` files: UNet names without a prefix
            component = "unet"
        elif name.startswith("text_model."):
            component = "te"
    if component != "unet" and (m := re.fullmatch(r"(.*\.self_attn)\.(to_q|to_k|to_v|to_out)", path)):
        path = f"{m.group(1)}.{OLD_TEXT_NAMES[m.group(2)]}"  # old text-encoder processor names
    elif component == "unet" and path.endswith(".to_out"):
        path += ".0"
    return component, flat(path), path, "diffusers/PEFT"


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file (.safetensors, or a weights-only pickle) into modules with their scales."""
    path = Path(path)
    tensors, metadata = read_checkpoint(path)
    modules: dict[str, LoraModule] = {}
    unknown: dict[str, str] = {}
    layouts = set()
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            kind = next((what for word, what in UNSUPPORTED.items() if word in key), None)
            unknown[key] = (f"{kind} is not supported (only LoRA and LoCon)" if kind
                            else "not a LoRA tensor (lora_down / lora_up / alpha / lora_A / lora_B)")
            continue
        name, role = split
        if name not in modules:
            component, flat_name, dotted, layout = locate(name)
            layouts.add(layout)
            modules[name] = LoraModule(name, component, flat_name, dotted)
        module = modules[name]
        module.keys.append(key)
        if role == "alpha":
            if tensor.numel() != 1:
                raise InputError(f"LoRA file {path}: {key} should be one number, got shape {list(tensor.shape)}")
            module.alpha = float(tensor.float().item())
        elif getattr(module, role) is not None:
            raise InputError(f"LoRA file {path}: module {name} has two '{role}' tensors; the file is malformed")
        else:
            setattr(module, role, tensor)
    for key in list(unknown):  # an unsupported tensor of a module (DoRA's dora_scale, ...) rules the module out
        owner = modules.get(key.rsplit(".", 1)[0]) or modules.get(key.rsplit(".", 2)[0])
        if owner is not None:
            owner.keys.append(key)
            owner.problem = f"{key}: {unknown.pop(key)}"
    adapter = _adapter_metadata(metadata, path)
    for module in modules.values():
        if module.down is None or module.up is None:
            module.problem = module.problem or f"{module.name} has no {'up' if module.up is None else 'down'} tensor"
        elif module.problem is None:
            module.scale = _scale(module, adapter)
    layout = " + ".join(sorted(layouts)) or "none"
    return LoraFile(path, layout, list(modules.values()), unknown, metadata)


def _adapter_metadata(metadata: dict[str, str], path: Path) -> dict:
    """diffusers' `lora_adapter_metadata` header entry: PEFT's LoraConfig of each part, keys `unet.lora_alpha`, ..."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        adapter = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"LoRA file {path}: the header's lora_adapter_metadata is not JSON") from None
    return adapter if isinstance(adapter, dict) else {}


def _scale(module: LoraModule, adapter: dict) -> float:
    """alpha / r (see the module docstring): the module's own alpha, else PEFT's from the header, else 1."""
    rank = module.rank
    if rank < 1:
        raise InputError(f"LoRA module {module.name} has rank 0 (lora_down of shape {list(module.down.shape)})")
    alpha, rs = module.alpha, False
    if alpha is None and adapter:
        part = METADATA_PREFIXES.get(module.component, "")
        config = {k[len(part) + 1:]: v for k, v in adapter.items() if k.startswith(part + ".")} if part else {}
        config = config or {k: v for k, v in adapter.items() if "." not in k}  # one adapter, keys unprefixed
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module.path) or config.get("lora_alpha")
        rs = bool(config.get("use_rslora"))
    if alpha is None or not isinstance(alpha, (int, float)) or alpha == 0:  # kohya: no / zero alpha -> alpha = r
        return 1.0
    if not math.isfinite(alpha):
        raise InputError(f"LoRA module {module.name} has alpha {alpha}; it must be a finite number")
    return alpha / math.sqrt(rank) if rs else alpha / rank


def _pattern_value(patterns: dict, path: str | None) -> float | None:
    """PEFT's per-module value: the first pattern that matches the end of the module's dotted path."""
    if not path or not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        try:
            hit = re.fullmatch(rf"(.*\.)?(?:{pattern})", path) is not None
        except re.error:
            hit = path == pattern or path.endswith("." + pattern)
        if hit:
            return value
    return None
