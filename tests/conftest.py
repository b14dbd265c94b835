"""Fixtures shared by the tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoencoder import AutoencoderConfig

from helpers import TINY_AE, write_real_images


@pytest.fixture
def tiny_ae_config() -> AutoencoderConfig:
    return AutoencoderConfig.from_dict(TINY_AE.to_dict())


@pytest.fixture(scope="session")
def real_images(tmp_path_factory) -> Path:
    """A folder of 48 real 32x32 images (crops of scikit-image's sample photographs)."""
    folder = tmp_path_factory.mktemp("real_images")
    write_real_images(folder, 48)
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
