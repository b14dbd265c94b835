"""Config-file helpers shared by every package: YAML reading and typed-section checks."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from common.errors import InputError


def check_keys(cls: type, d: dict[str, Any], section: str) -> None:
    """InputError naming unknown keys of a config section, and the valid ones (or saying it is no mapping)."""
    require_mapping(d, f"{section} config")
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InputError(f"{section} config: unknown keys {unknown}; valid keys are {known}")


def require_mapping(d: Any, section: str) -> None:
    """InputError unless `d` is a mapping (a JSON object / YAML mapping), e.g. for a section that is null or a list."""
    if not isinstance(d, Mapping):
        raise InputError(f"{section} must be a mapping of keys to values, got {_show(d)}")


def coerce_numbers(obj: Any, section: str) -> None:
    """Convert int/float fields given as strings (YAML 1.1 reads `1e-4` as a string) or a bad type error;
    NaN and infinity are refused too (NaN passes every range check a config makes after this)."""
    for f in dataclasses.fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind not in ("int", "float"):
            continue
        value = getattr(obj, f.name)
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            continue  # exact already (float() would round, or overflow past 1e308); check_range bounds it
        try:
            number = float(value)
            finite = math.isfinite(number)
            if finite and kind == "int" and number != int(number):
                raise ValueError
        except OverflowError:  # a whole number beyond a float's range in a float field
            number, finite = math.inf, False
        except (TypeError, ValueError):
            raise InputError(f"{section} config: {f.name} must be {'a whole number' if kind == 'int' else 'a number'}, "
                             f"got {value!r}") from None
        if not finite:
            raise InputError(f"{section} config: {f.name} must be a finite number, got {number}")
        setattr(obj, f.name, int(number) if kind == "int" else number)


def check_range(obj: Any, section: str, bounds: dict[str, tuple[float, float]]) -> None:
    """InputError for the first field of `obj` (a dataclass or a dict) outside its inclusive (low, high) bounds:
    "model: timesteps must be between 1 and 100000, got 1000000000000". A list or tuple value is checked
    entry by entry ("ch_mult entries must be ..."); None (an optional field left out) passes. Configs call it
    before anything is built, so that a hostile or broken config cannot ask for terabytes."""
    for name, (low, high) in bounds.items():
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name)
        if value is None:
            continue
        entries = isinstance(value, (list, tuple))
        for entry in value if entries else (value,):
            if isinstance(entry, bool) or not isinstance(entry, (int, float)):
                raise InputError(f"{section}: {name}{' entries' if entries else ''} must be numbers, got {_show(entry)}")
            if not low <= entry <= high:
                raise InputError(f"{section}: {name}{' entries' if entries else ''} must be between {_show(low)} and "
                                 f"{_show(high)}, got {_show(entry)}")


def check_length(values: Any, section: str, name: str, low: int, high: int) -> None:
    """InputError unless `values` is a list or tuple of `low` to `high` entries ("ch_mult must have 1 to 8
    entries, got 20")."""
    if not isinstance(values, (list, tuple)):
        raise InputError(f"{section}: {name} must be a list, got {_show(values)}")
    if not low <= len(values) <= high:
        raise InputError(f"{section}: {name} must have {low} to {high} entries, got {len(values)}")


def whole_numbers(values: Any, section: str, name: str) -> tuple[int, ...]:
    """A list of whole numbers (a config's `ch_mult: [1, 2, 4]`; "2" and 2.0 too) as a tuple of ints, or an
    InputError naming the entry that is not one."""
    if not isinstance(values, (list, tuple)):
        raise InputError(f"{section}: {name} must be a list of whole numbers, got {_show(values)}")
    numbers = []
    for value in values:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            number = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None:
            raise InputError(f"{section}: {name} must be a list of whole numbers, got an entry {_show(value)}")
        numbers.append(number)
    return tuple(numbers)


def _show(value: Any) -> str:
    """A value for an error message, short even for a number of thousands of digits or a huge list."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 15:
        return f"{'-' if value < 0 else ''}about 10**{int(abs(value).bit_length() * math.log10(2))}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
