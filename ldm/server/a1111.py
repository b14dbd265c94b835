"""The AUTOMATIC1111 web UI's API vocabulary: request fields, sampler and scheduler names, infotexts.

Field names and defaults follow A1111's `modules/api/models.py` (StableDiffusionTxt2ImgProcessingAPI and
its img2img twin, generated from its processing classes), so its clients (the `webuiapi` package,
editor plug-ins, bots) send what they always send. Fields we have no use for (hires fix off, restore
faces off, scripts, subseeds) are accepted and ignored, as A1111 ignores the ones its extensions do
not read; a field asking for something we cannot do (hires fix on, an unknown sampler) is refused
with a one-line message naming the field.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InputError
from ldm.text.embeddings import EmbeddingReport

# A1111's sampler names (and its aliases, k-diffusion's function names) -> ours. The schedule comes in the
# separate `scheduler` field (A1111 >= 1.9): "Automatic" is each sampler's default, Karras et al. (2022)
# sigmas for DPM++ 2M (A1111's `{"scheduler": "karras"}` option), the sampler's own elsewhere; "Karras"
# asks for those sigmas (our DPM++ 2M takes them); "Uniform" the timesteps evenly spaced (our plain plans).
SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "Heun": ("heun", ["k_heun"]),
    "DDIM": ("ddim", []),
    "PLMS": ("plms", []),
    "DDPM": ("ddpm", []),
}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}  # sampler -> its Karras-schedule variant
LEGACY_KARRAS = {"DPM++ 2M Karras": "dpmpp_2m_karras"}  # A1111 < 1.9 put the schedule in the name
SCHEDULERS = [{"name": "automatic", "label": "Automatic"}, {"name": "uniform", "label": "Uniform"},
              {"name": "karras", "label": "Karras"}]
DEFAULT_SAMPLER = "Euler a"  # webuiapi's default, and the web page's
A1111_NAMES = {ours: name for name, (ours, _) in SAMPLERS.items()} | {"dpmpp_2m_karras": "DPM++ 2M Karras"}


def sampler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: [{"name", "aliases", "options"}], A1111's layout."""
    return [{"name": name, "aliases": aliases, "options": {"scheduler": "karras"} if ours in KARRAS else {}}
            for name, (ours, aliases) in SAMPLERS.items()]


def embedding_list(report: EmbeddingReport) -> dict[str, Any]:
    """GET /sdapi/v1/embeddings: {"loaded": {name: details}, "skipped": {name: details}}, A1111's layout, where
    details are {"step", "sd_checkpoint", "sd_checkpoint_name"} (what an A1111 .pt records of its training,
    else None), "shape" (the vector width; an SDXL pair's two summed, as A1111 does) and "vectors" (how
    many). A skipped file that could not be read at all has None for shape and vectors too."""
    def details(key: str) -> dict[str, Any]:
        embedding = report.files.get(key)
        if embedding is None:
            return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        return {"step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
                "sd_checkpoint_name": embedding.sd_checkpoint_name, "shape": embedding.width,
                "vectors": embedding.count}

    return {"loaded": {name: details(name) for name in report.loaded},
            "skipped": {name: details(name) for name in report.skipped}}


def resolve_sampler(name: str | None, scheduler: str | None = None) -> str:
    """Our sampler for an A1111 `sampler_name` (or alias, or our own name) and `scheduler`."""
    name = name or DEFAULT_SAMPLER
    key = name.strip().lower()
    table = {n.lower(): ours for n, (ours, aliases) in SAMPLERS.items()}
    table |= {alias.lower(): ours for ours, aliases in SAMPLERS.values() for alias in aliases}
    table |= {n.lower(): ours for n, ours in LEGACY_KARRAS.items()} | {ours: ours for ours in A1111_NAMES}
    if key not in table:
        raise InputError(f"sampler_name: unknown sampler {name!r}; valid: {', '.join([*SAMPLERS, *LEGACY_KARRAS])}")
    ours = table[key]
    schedule = (scheduler or "automatic").strip().lower()
    if schedule in ("automatic", ""):  # our own names are taken as they are
        return ours if key in A1111_NAMES else KARRAS.get(ours, ours)
    if schedule == "uniform":
        return next((plain for plain, karras in KARRAS.items() if karras == ours), ours)
    if schedule == "karras":
        if ours in KARRAS.values():
            return ours
        if ours in KARRAS:
            return KARRAS[ours]
        raise InputError(f"scheduler: 'Karras' is available with DPM++ 2M here, not with {name!r}; send "
                         "scheduler 'Automatic' or sampler_name 'DPM++ 2M'")
    raise InputError(f"scheduler: unknown scheduler {scheduler!r}; valid: Automatic, Uniform, Karras")


class GenerationRequest(BaseModel):
    """POST /sdapi/v1/txt2img: A1111's fields. `width` / `height` left out: the model's native size (A1111's
    512 suits SD 1.x only). Unknown fields are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, description="-1: a random seed; image k of the request uses seed + k")
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="deprecated name of sampler_name")
    scheduler: str | None = None
    batch_size: int = Field(1, description="images sampled at once")
    n_iter: int = Field(1, description="batches, one after another")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    eta: float | None = Field(None, description="DDIM's eta (0: deterministic); other samplers ignore it")
    enable_hr: bool = False
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the init image, strength and the inpainting mask."""

    init_images: list[str] = Field(default_factory=list, description="base64 images (data: URLs too); the first is used")
    denoising_strength: float = 0.75
    mask: str | None = Field(None, description="base64 mask, white = repaint, the init image's size")
    inpainting_mask_invert: int = Field(0, description="1: black = repaint")
    include_init_images: bool = False


# A1111's `re_param`: Key: value, with quoted values that may hold commas.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """A "parameters" text -> {"Prompt", "Negative prompt", "Steps", ..., "Size-1", "Size-2"}, as A1111's
    `parse_generation_parameters` reads it (numbers as numbers where they parse)."""
    *lines, last = text.strip().split("\n")
    if not PARAM.findall(last) or len(PARAM.findall(last)) < 3:  # no settings line: all of it is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = int(size.group(1)), int(size.group(2))
            continue
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        result[key] = value
    return result
