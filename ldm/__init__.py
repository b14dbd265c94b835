"""Latent diffusion: the diffusion model over autoencoder latents.

    image  -> autoencoder -> latent -> noise (diffusion/) -> denoiser (denoisers/) -> loss (training/)
    prompt -> text encoder (text/) -> context -> sampler (samplers/) -> decoder -> image (pipeline.py)

`import ldm` is light (no torch), so that a command's `--help` answers at once: the names below load at
their first use (PEP 562). The first use of any of them (or of a subpackage, `ldm.formats`, ...) loads
them all, as an eager package would, with `ldm.pipeline` and `ldm.lora`, which attach `generate` and
`load_lora` / `unload_loras` / `loras` to `LatentDiffusion`.
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from common.errors import InputError

if TYPE_CHECKING:
    from ldm import lora, pipeline, samplers
    from ldm.config import LDMConfig
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.formats.configs import load_ldm_config
    from ldm.formats.loading import load_autoencoder, load_model, save_autoencoder, save_model
    from ldm.model import LatentDiffusion

__all__ = ["InputError", "LDMConfig", "LatentDiffusion", "NoiseSchedule", "load_autoencoder", "load_ldm_config",
           "load_model", "lora", "pipeline", "samplers", "save_autoencoder", "save_model"]


_loading = False


def _load() -> None:
    """Import the package's names into it (once)."""
    global _loading
    if _loading:
        return
    _loading = True
    try:
        from ldm import lora, pipeline, samplers
        from ldm.config import LDMConfig
        from ldm.diffusion.schedule import NoiseSchedule
        from ldm.formats.configs import load_ldm_config
        from ldm.formats.loading import load_autoencoder, load_model, save_autoencoder, save_model
        from ldm.model import LatentDiffusion
    except BaseException:
        _loading = False  # a later use tries again, and meets the same error
        raise
    globals().update(lora=lora, pipeline=pipeline, samplers=samplers, LDMConfig=LDMConfig, NoiseSchedule=NoiseSchedule,
                     load_ldm_config=load_ldm_config, load_autoencoder=load_autoencoder, load_model=load_model,
                     save_autoencoder=save_autoencoder, save_model=save_model, LatentDiffusion=LatentDiffusion)


def _importing() -> bool:
    """Whether a module of this package is being imported right now (its code running): loading everything
    then could import a module that is half-made."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items()) if name.startswith(__name__ + "."))


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in __all__ and name not in ("lora", "pipeline", "samplers"):
        _load()
        if name in globals():
            return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} yet: it is being imported")
    try:  # a subpackage or module (`from ldm import samplers` asks here first)
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if not _importing():
        _load()
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
