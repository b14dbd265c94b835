"""LPIPS: loading from local files (torchvision VGG16 + lpips lin weights), key layout, safety, values.

No real weights are downloaded: the files are made here from randomly initialised networks.
"""
from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from autoencoder.lpips import LPIPS
from common.errors import InputError


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A torchvision VGG16 state dict (like vgg16-397923af.pth) and an lpips lin file.

    The real file also holds the 120M-parameter classifier, which LPIPS ignores; a small stand-in
    `classifier.*` key keeps the file at 59 MB instead of 528 MB while still testing that it is ignored.
    """
    directory = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg_path = directory / "vgg16.pth"
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    state = {f"features.{k}": v for k, v in features.items()} | {"classifier.0.weight": torch.zeros(8, 8)}
    torch.save(state, vgg_path)
    # lpips' weights/v0.1/vgg.pth names them linK.model.1.weight (index 1: after the Dropout); the
    # real weights are non-negative, so positive random ones keep the distance >= 0.
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    lin_path = directory / "lin.pth"
    torch.save(lin, lin_path)
    return vgg_path, lin_path


@pytest.fixture(scope="module")
def lpips_model(weight_files):
    return LPIPS.from_files(*weight_files)


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_distance_properties(lpips_model):
    x, y = images(1), images(2)
    d_xy = lpips_model(x, y)
    assert d_xy.shape == (2, 1, 1, 1)  # taming's output shape
    assert torch.all(d_xy > 0)
    assert torch.equal(lpips_model(x, x), torch.zeros(2, 1, 1, 1))  # identical features: exactly 0
    torch.testing.assert_close(lpips_model(y, x), d_xy)  # each term is a squared difference


def test_distance_grows_with_noise(lpips_model):
    x = images(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    small = lpips_model(x, x + 0.05 * noise)
    large = lpips_model(x, x + 0.5 * noise)
    assert torch.all(small < large)


def test_weights_loaded_and_frozen(lpips_model, weight_files):
    vgg = torch.load(weight_files[0], weights_only=True)
    lin = torch.load(weight_files[1], weights_only=True)
    state = lpips_model.state_dict()
    assert torch.equal(state["net.slice1.0.weight"], vgg["features.0.weight"])
    assert torch.equal(state["net.slice5.28.bias"], vgg["features.28.bias"])
    assert torch.equal(state["lin4.model.1.weight"], lin["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()  # a parent's .train() must not switch the lin dropout on
    assert not lpips_model.training and not lpips_model.lin0.model[0].training


def test_state_dict_keys_match_taming_layout():
    keys = set(LPIPS().state_dict())
    # taming's vgg16 wrapper: slice k holds torchvision features[a:b] under their original indices
    convs = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    expected = {"scaling_layer.shift", "scaling_layer.scale"}
    expected |= {f"net.slice{s}.{i}.{p}" for s, idx in convs.items() for i in idx for p in ("weight", "bias")}
    expected |= {f"lin{k}.model.1.weight" for k in range(5)}
    assert keys == expected
    buffers = LPIPS().state_dict()
    torch.testing.assert_close(buffers["scaling_layer.shift"].flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    torch.testing.assert_close(buffers["scaling_layer.scale"].flatten(), torch.tensor([0.458, 0.448, 0.450]))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_full_state_dict_round_trip(lpips_model, tmp_path, suffix):
    path = tmp_path / f"lpips{suffix}"
    state = {k: v.contiguous() for k, v in lpips_model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    reloaded = LPIPS.from_files(path)  # lin weights come from the same file
    x, y = images(5), images(6)
    assert torch.equal(reloaded(x, y), lpips_model(x, y))


def test_lin_file_is_required(weight_files):
    with pytest.raises(InputError, match="needs two files"):
        LPIPS.from_files(weight_files[0])


def test_missing_key_is_named(weight_files, tmp_path):
    vgg = torch.load(weight_files[0], weights_only=True)
    del vgg["features.28.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(vgg, path)
    with pytest.raises(InputError, match=r"features\.28\.weight"):
        LPIPS.from_files(path, weight_files[1])


def test_wrong_shape_is_named(weight_files, tmp_path):
    lin = torch.load(weight_files[1], weights_only=True)
    lin["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)
    path = tmp_path / "bad_lin.pth"
    torch.save(lin, path)
    with pytest.raises(InputError, match=r"lin2\.model\.1\.weight has shape \(1, 128, 1, 1\)"):
        LPIPS.from_files(weight_files[0], path)


def test_unrelated_file_and_missing_file(weight_files, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="does not look like VGG16"):
        LPIPS.from_files(path, weight_files[1])
    with pytest.raises(InputError, match="not found"):
        LPIPS.from_files(tmp_path / "nope.pth", weight_files[1])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="corrupt or not a PyTorch checkpoint"):
        LPIPS.from_files(garbage, weight_files[1])


class CreatesMarker:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused_without_running_it(weight_files, tmp_path):
    # the payload does run under a plain unpickler, so the check below is meaningful
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesMarker(str(probe)))).close()
    assert probe.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": CreatesMarker(str(marker))}, path)
    with pytest.raises(InputError, match=r"refusing to load.*holds Python objects \(io\.open\).*could run code"):
        LPIPS.from_files(path, weight_files[1])
    assert not marker.exists()
