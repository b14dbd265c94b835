"""Config-file helpers shared by every package: YAML reading and typed-section checks."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from common.errors import InputError


def check_keys(cls: type, d: dict[str, Any], section: str) -> None:
    """InputError naming unknown keys of a config section, and the valid ones."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InputError(f"{section} config: unknown keys {unknown}; valid keys are {known}")


def coerce_numbers(obj: Any, section: str) -> None:
    """Convert int/float fields given as strings (YAML 1.1 reads `1e-4` as a string) or a bad type error;
    NaN and infinity are refused too (NaN passes every range check a config makes after this)."""
    for f in dataclasses.fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind not in ("int", "float"):
            continue
        value = getattr(obj, f.name)
        try:
            number = float(value)
            finite = math.isfinite(number)
            if finite and kind == "int" and number != int(number):
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(f"{section} config: {f.name} must be {'a whole number' if kind == 'int' else 'a number'}, "
                             f"got {value!r}") from None
        if not finite:
            raise InputError(f"{section} config: {f.name} must be a finite number, got {number}")
        setattr(obj, f.name, int(number) if kind == "int" else number)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"config file {path} must hold a mapping at the top level")
    return raw
