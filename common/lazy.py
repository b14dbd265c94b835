"""A module imported at its first use, for light modules whose functions need a heavy one (torch: seconds)."""
from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for module `name`: `torch = LazyModule("torch")` at the top of a module, and its functions'
    `torch.device(...)` import torch at the first call and then use it. Importing the module that holds
    the stand-in (a command line's helpers, before `--help`) does not import `name`; `name in sys.modules`
    stays False until something is used."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"
