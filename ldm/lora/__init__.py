"""LoRA (Hu et al. 2021): low-rank weight updates from kohya, LoCon and diffusers / PEFT files, merged in.

    file -> modules (files.py) -> our weights (keys.py: names of every layout -> our parameters)
         -> W += weight * (alpha / r) * up @ down, originals kept (apply.py)

`model.load_lora(path, weight=1.0, *, allow_partial=False)` and `model.unload_loras()` are this package's
functions, attached to `LatentDiffusion` here (the model never imports its add-ons), as `ldm.pipeline`
attaches `generate`. `model.loras` lists the reports of the LoRAs merged in.
"""
from ldm.lora.apply import LoraReport, load_lora, loaded_loras, unload_loras
from ldm.lora.files import LoraFile, LoraModule, read_lora
from ldm.lora.keys import Target, lora_targets, unet_block_names
from ldm.model import LatentDiffusion

__all__ = ["LoraFile", "LoraModule", "LoraReport", "Target", "load_lora", "loaded_loras", "lora_targets",
           "read_lora", "unet_block_names", "unload_loras"]

LatentDiffusion.load_lora = load_lora
LatentDiffusion.unload_loras = unload_loras
LatentDiffusion.loras = property(loaded_loras, doc="The reports of the LoRAs merged into the weights, in order.")
