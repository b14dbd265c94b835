"""bench/learning.py's data and judge: procedurally drawn shapes, scikit-learn's digits, and a small CNN trained on
the real images that says which prompt a picture matches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32


# The data.

@dataclass
class DataSet:
    """Images (N, 3, H, W) uint8, their label per attribute (N, A), the attributes' class names and the prompts
    (caption -> labels)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    attributes: list[tuple[str, list[str]]]
    captions: list[str]

    def prompts(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for caption, labels in zip(self.captions, self.labels):
            out.setdefault(caption, tuple(int(v) for v in labels))
        return dict(sorted(out.items(), key=lambda kv: kv[1]))


SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 190, 20)}
PLACES = ["top left", "top right", "bottom left", "bottom right"]


def draw_shape(shape: str, colour: tuple[int, int, int], place: int, rng: np.random.Generator) -> Image.Image:
    """One picture, drawn at 4x and downsampled (anti-aliased edges): the shape's centre in its quadrant with a
    random offset of up to 1 px, its half-size 6.5-7.5 px, so it fills most of its 16 px quadrant (at half that
    size the tiny f4 autoencoder rounded every shape into a blob: 25.6% of reconstructions recognisable)."""
    s = 4
    image = Image.new("RGB", (SIZE * s, SIZE * s), "white")
    draw = ImageDraw.Draw(image)
    r = rng.uniform(6.5, 7.5) * s
    cx = (8 + 16 * (place % 2) + rng.uniform(-1, 1)) * s
    cy = (8 + 16 * (place // 2) + rng.uniform(-1, 1)) * s
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def shapes_data(per_prompt: int = 48, seed: int = 0) -> DataSet:
    rng = np.random.default_rng(seed)
    images, labels, captions = [], [], []
    for si, shape in enumerate(SHAPES):
        for ci, (colour, rgb) in enumerate(COLOURS.items()):
            for pi, place in enumerate(PLACES):
                for _ in range(per_prompt):
                    images.append(np.asarray(draw_shape(shape, rgb, pi, rng)))
                    labels.append((si, ci, pi))
                    captions.append(f"{colour} {shape}, {place}")
    return DataSet("shapes", np.stack(images).transpose(0, 3, 1, 2), np.array(labels),
                   [("shape", SHAPES), ("colour", list(COLOURS)), ("position", PLACES)], captions)


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_data() -> DataSet:
    """scikit-learn's digits (8x8, values 0-16), upsampled to 32x32 (bicubic), grey as RGB."""
    from common.errors import InputError

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits data set needs scikit-learn: pip install scikit-learn "
                         "(or run --datasets shapes)") from None
    digits = load_digits()
    images = []
    for pixels in digits.images:
        small = Image.fromarray(np.uint8(np.clip(pixels * 255 / 16, 0, 255)), "L")
        images.append(np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")))
    labels = digits.target.astype(np.int64)[:, None]
    return DataSet("digits", np.stack(images).transpose(0, 3, 1, 2), labels, [("digit", DIGITS)],
                   [DIGITS[k] for k in digits.target])


DATASETS = {"shapes": shapes_data, "digits": digits_data}


# The judge: a small CNN trained on the real images.

def make_judge(heads: list[int]):
    import torch
    from torch import nn

    class Judge(nn.Module):
        """Three conv blocks and one linear head per attribute; images (B, 3, 32, 32) in [0, 1]."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.heads = nn.ModuleList(nn.Linear(128, n) for n in heads)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            h = self.body(x * 2 - 1)
            return [head(h) for head in self.heads]

    return Judge()


def train_judge(data: DataSet, seed: int = 0, epochs: int = 30):
    """The judge, trained on 80% of the images (seeded split, +-1 px shifts); returns it and the held-out indices."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.images), generator=g)
    held = order[: len(order) // 5]
    train = order[len(order) // 5:]
    x_all = torch.from_numpy(data.images).float() / 255
    y_all = torch.from_numpy(data.labels)
    torch.manual_seed(seed)
    judge = make_judge([len(names) for _, names in data.attributes])
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train), generator=g)].split(64):
            x = x_all[batch]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # the background is uniform at the borders
            loss = sum(F.cross_entropy(logits, y_all[batch, a]) for a, logits in enumerate(judge(x)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    judge.eval()
    return judge, held


def judge_labels(judge, images) -> np.ndarray:
    """Predicted labels (N, A) of float images in [0, 1]."""
    import torch

    with torch.no_grad():
        out = [torch.cat([logits.argmax(1, keepdim=True) for logits in judge(chunk)], 1)
               for chunk in images.split(256)]
    return torch.cat(out).numpy()


def save_joint_judge(judge, path) -> None:
    """The judge as a TorchScript file for train_ldm's `train.eval_classifier`: one logit per combination of the
    attributes' classes (the sum of each head's log-probabilities), class index = the labels in mixed radix
    (`joint_label`). Its argmax is each head's argmax, so eval_accuracy equals this benchmark's `match`."""
    import torch
    from torch import nn

    class Joint(nn.Module):
        def __init__(self, judge):
            super().__init__()
            self.judge = judge

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            heads = [logits.log_softmax(1) for logits in self.judge(x)]
            joint = heads[0]
            for head in heads[1:]:
                joint = (joint[:, :, None] + head[:, None, :]).flatten(1)
            return joint

    traced = torch.jit.trace(Joint(judge).eval(), torch.rand(2, 3, SIZE, SIZE))
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(traced, str(tmp))
    tmp.replace(path)


def joint_label(labels: tuple[int, ...], attributes: list[tuple[str, list[str]]]) -> int:
    index = 0
    for value, (_, names) in zip(labels, attributes):
        index = index * len(names) + value
    return index


# What the noise leaves of the layout.

def layout_leak(data: DataSet, ae_path: str, seed: int = 0) -> dict[str, float] | None:
    """`probe_layout` on `data`'s latents (the autoencoder at `ae_path`, times its scale factor, as training sees
    them); None for data without a "position" attribute."""
    names = [name for name, _ in data.attributes]
    if "position" not in names:
        return None
    import torch

    import ldm

    ae = ldm.load_autoencoder(ae_path)
    x = torch.from_numpy(data.images).float() / 255 * 2 - 1
    with torch.no_grad():
        z = torch.cat([ae.encode(chunk).mode() for chunk in x.split(256)]) * ae.config.scale_factor
    position = names.index("position")
    return probe_layout(z, data.labels[:, position], len(data.attributes[position][1]), seed)


def probe_layout(z, positions: np.ndarray, classes: int, seed: int = 0) -> dict[str, float]:
    """How well a linear probe (logistic regression, trained on 3/4 of the latents `z`, scored on the rest) reads
    each one's position from it noised to the last training step t = T - 1, under SD's scaled_linear schedule
    and under its zero-terminal-SNR rescaling (Lin et al. 2023); "chance" is 1 / `classes`. What the probe reads
    from the noise a model can learn to take from it instead of from the prompt; pure noise at sampling time then
    places things at random."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from ldm.diffusion.schedule import NoiseSchedule

    order = np.random.default_rng(seed).permutation(len(positions))
    z, y, n = z[order].double(), positions[order], len(positions) * 3 // 4
    out = {"chance": 1 / classes}
    for name, zsnr in (("scaled_linear", False), ("zero terminal SNR", True)):
        a = NoiseSchedule.make(zero_terminal_snr=zsnr).alphas_cumprod[-1].double()
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x_T = (a.sqrt() * z + (1 - a).sqrt() * noise).flatten(1).numpy()
        probe = LogisticRegression(C=0.1, max_iter=2000).fit(x_T[:n], y[:n])
        out[name] = float(probe.score(x_T[n:], y[n:]))
    return out
