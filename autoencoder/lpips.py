"""LPIPS perceptual distance, VGG16 variant (Zhang et al. 2018, "The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), laid out like taming-transformers' `LPIPS` so that its
state-dict keys (`net.slice1.0.weight`, `lin0.model.1.weight`, ...) match.

Nothing is downloaded: weights come from two local files, see `LPIPS.from_files`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from common.errors import InputError

# torchvision `vgg16().features` indices of each slice, ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] inputs to the ImageNet-normalised range the VGG trunk expects (LPIPS constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A learned 1x1 conv (no bias) weighting the channels of one feature map; `model.1` holds it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class VGG16Slices(nn.Module):
    """torchvision's VGG16 `features`, cut into five slices that keep the torchvision layer indices."""

    def __init__(self) -> None:
        super().__init__()
        # Same layers as torchvision.models.vgg16(weights=None).features, without building the
        # 100M-parameter classifier we would throw away.
        features = make_layers(cfgs["D"], batch_norm=False)
        for i, (start, stop) in enumerate(SLICES, start=1):
            part = nn.Sequential()
            for index in range(start, stop):
                part.add_module(str(index), features[index])
            setattr(self, f"slice{i}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            outputs.append(x)
        return outputs


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise each feature vector over channels (LPIPS eq. 1)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw w_l . (f_l(x) - f_l(y))^2 on unit-normalised VGG16 features.

    Inputs are images in [-1, 1], shape (B, 3, H, W); the output has shape (B, 1, 1, 1) as in
    taming. `LPIPS()` has random weights; use `LPIPS.from_files` for the real metric. Parameters
    are frozen and the module stays in eval mode even when a parent calls `.train()` (so the
    dropout in `lin*` never fires; the original lets it fire while training the autoencoder).
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, channels in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features_x = self.net(self.scaling_layer(x))
        features_y = self.net(self.scaling_layer(y))
        total = 0.0
        for i, (fx, fy) in enumerate(zip(features_x, features_y)):
            diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike | None = None) -> "LPIPS":
        """Load LPIPS from local files, never from the network.

        `vgg_path`: torchvision's VGG16 state dict (`vgg16-397923af.pth`: keys `features.N.*`,
        `classifier.*` ignored) or a full LPIPS state dict (`net.slice*`, `lin*`; .pth/.pt or
        .safetensors). `lin_path`: the lpips package's `weights/v0.1/vgg.pth` (`linK.model.1.weight`);
        needed unless `vgg_path` already holds the lin weights, and it wins over them.
        """
        model = cls()
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("scaling_layer.")}
        source_names: dict[str, str] = {}  # our key -> (file, key in that file), for error messages
        tensors: dict[str, torch.Tensor] = {}

        vgg = load_state_dict(vgg_path, what="LPIPS VGG16")
        if any(k.startswith("features.") for k in vgg):
            for key, value in vgg.items():
                if key.startswith("features."):
                    tensors[_torchvision_to_lpips(key)] = value
            source_names.update({k: f"{vgg_path}: {_lpips_to_torchvision(k)}"
                                 for k in expected if k.startswith("net.")})
        elif any(k.startswith("net.slice") for k in vgg):
            tensors.update({k: v for k, v in vgg.items() if k.startswith("net.")})
            source_names.update({k: f"{vgg_path}: {k}" for k in expected if k.startswith("net.")})
        else:
            raise InputError(
                f"{vgg_path} does not look like VGG16 weights: expected keys like 'features.0.weight' "
                f"(torchvision's vgg16-397923af.pth) or 'net.slice1.0.weight' (a full LPIPS state dict), "
                f"found {_first(vgg)}")

        lin_keys = [k for k in expected if k.startswith("lin")]
        if lin_path is not None:
            lin = load_state_dict(lin_path, what="LPIPS lin")
            if not any(k.startswith("lin") for k in lin):
                raise InputError(
                    f"{lin_path} holds no LPIPS linear-layer weights (keys like 'lin0.model.1.weight'; "
                    f"found {_first(lin)}): pass the lpips package's weights/v0.1/vgg.pth")
            tensors.update({k: v for k, v in lin.items() if k.startswith("lin")})
            source_names.update({k: f"{lin_path}: {k}" for k in lin_keys})
        elif any(k.startswith("lin") for k in vgg):
            tensors.update({k: v for k, v in vgg.items() if k.startswith("lin")})
            source_names.update({k: f"{vgg_path}: {k}" for k in lin_keys})
        else:
            raise InputError(
                f"LPIPS needs two files: the VGG16 trunk ({vgg_path}) and the learned linear layers, which "
                "that file does not hold; pass lin_path= the lpips package's weights/v0.1/vgg.pth "
                "(config: loss.lpips_lin)")

        missing = [source_names[k] for k in expected if k not in tensors]
        if missing:
            raise InputError(f"LPIPS weights are missing {len(missing)} tensors, first: {missing[:3]}; "
                             "is the file complete and the right model (VGG16, not VGG16-BN or VGG19)?")
        misshaped = [f"{source_names[k]} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if tensors[k].shape != v.shape]
        if misshaped:
            raise InputError(f"LPIPS weights have wrong shapes ({len(misshaped)}), first: {misshaped[:3]}; "
                             "is this VGG16 (not VGG16-BN or VGG19)?")
        model.load_state_dict({**model.state_dict(), **{k: tensors[k] for k in expected}})
        return model


def load_state_dict(path: str | os.PathLike, *, what: str) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from .safetensors or a .pth/.pt file (weights_only: never runs code)."""
    from common.checkpoint import read_checkpoint  # the one safe reader; imported late (ldm builds on autoencoder)

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} weights file not found: {path}; give the path of a local file")
    try:
        return read_checkpoint(path)[0]
    except InputError as error:
        raise InputError(f"{what}: {error}") from None


def _torchvision_to_lpips(key: str) -> str:
    """'features.23.weight' -> 'net.slice5.23.weight'; keys outside the slices come back unchanged."""
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[1].isdigit():
        for i, (start, stop) in enumerate(SLICES, start=1):
            if start <= int(parts[1]) < stop:
                return f"net.slice{i}.{parts[1]}.{parts[2]}"
    return key


def _lpips_to_torchvision(key: str) -> str:
    """'net.slice5.23.weight' -> 'features.23.weight'."""
    _, _, index, rest = key.split(".", 3)
    return f"features.{index}.{rest}"


def _first(state: dict, n: int = 5) -> list[str]:
    return list(state)[:n]
