"""The three parameterizations of the network output (eps, v, x0) and the conversions between them.

Pure functions of tensors; the network is passed in as `model_fn(x_t, t)`.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.errors import InputError

PARAMETERIZATIONS = ("eps", "v", "x0")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


# Conversions. `alpha_bar` broadcasts against x_t; x_t = sqrt(a) x0 + sqrt(1-a) eps and
# v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, sec. 4 and app. D).
def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1-a) eps) / sqrt(a): DDPM eq. 4 solved for x0 (DDIM eq. 12's "predicted x0")."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(a) x0) / sqrt(1-a): DDPM eq. 4 solved for eps."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def predict_x0(x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """x0 from the model output: (x_t - sqrt(1-a) eps) / sqrt(a), sqrt(a) x_t - sqrt(1-a) v, or x0 itself."""
    if parameterization == "eps":
        return x0_from_eps(x_t, output, alpha_bar)
    if parameterization == "v":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    if parameterization == "x0":
        return output
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def predict_eps(x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """eps from the model output: eps itself, sqrt(a) v + sqrt(1-a) x_t, or (x_t - sqrt(a) x0) / sqrt(1-a)."""
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t
    if parameterization == "x0":
        return eps_from_x0(x_t, output, alpha_bar)
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def model_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What a model of this parameterization should output for x_t made from (x0, eps)."""
    if parameterization == "eps":
        return eps
    if parameterization == "v":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    if parameterization == "x0":
        return x0
    raise InputError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")
