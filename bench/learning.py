#!/usr/bin/env python
"""Learning efficiency: how well a small text-to-image model trained with our own tools on a CPU draws what its
prompt says, per recipe, side by side in one run.

    python bench/learning.py                                  # both data sets, today's recipe vs the new one
    python bench/learning.py --datasets digits --recipes today,new,no-flip,lr-1e-3 --steps-scale 0.5
    python bench/learning.py --list                           # the recipes and what each changes
    python bench/learning.py --work runs/learning --out ''    # keep the work folder; print only

The data, made by the benchmark (nothing is downloaded):
- `shapes`: procedurally drawn 32x32 pictures: a circle, square, triangle or cross, in red, green, blue or yellow,
  in one of the four quadrants, on white, each with its own size and position jitter; captioned like
  "red circle, top left" (64 prompts, 48 images each).
- `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey scans, UCI ML), upsampled to 32x32 and
  captioned with the class name ("zero" .. "nine").

The path, with the project's own tools, as a user runs them: `tools/make_shards.py` (a folder of PNG + TXT) ->
`tools/train_autoencoder.py` (configs/autoencoder/tiny.yaml, `--ae-steps`) -> `tools/compute_scale_factor.py
--write` -> `tools/encode_latents.py` (recipes with cached latents) -> `tools/train_ldm.py` (configs/ldm/tiny.yaml
with each recipe's overrides) -> `LatentDiffusion.generate` (the pipeline txt2img runs). The autoencoder, its
latents and the judge are shared by the recipes of a data set.

The judge: a small CNN trained on the real images (80%; its accuracy on the other 20% and on the autoencoder's
reconstructions of them is reported, so a low score is the LDM's, not the judge's or the first stage's). For shapes
it has three heads (shape, colour, position); an image matches its prompt when all three are right. Columns:
- `match`: the share of generated images (`--per-prompt` per prompt, seeds 0..n-1) the judge assigns to their
  prompt; `worst`: the lowest per-prompt share (digits) or per-attribute share (shapes: shape/colour/position).
- `diversity`: the mean pairwise RMS pixel distance among one prompt's generated images over the same among its
  real images, averaged over prompts (1.0: as varied as the data; near 0: one image per prompt).
- `train min`: wall minutes of train_ldm (the CPU budget each recipe spent); `img/s`: generation images per second
  with the recipe's sampler and steps (guidance on).
Writes its section of bench/RESULTS.md and a grid picture per data set (`--grid`, default docs/learning-*.png).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from learning_data import (  # bench/learning_data.py
    DATASETS,
    SIZE,
    DataSet,
    joint_label,
    judge_labels,
    layout_leak,
    save_joint_judge,
    train_judge,
)
from machine import RESULTS, machine, write_section  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from common.errors import InputError  # noqa: E402
from ldm.cli import run_cli  # noqa: E402

# The recipes. Each is a pinned base plus changes: today's tiny recipe (configs/ldm/tiny.yaml as it was before this
# benchmark) or the first new one (as it was from the first measurement until zero terminal SNR), so that their
# names keep their meaning after the config's defaults move; `new` is configs/ldm/tiny.yaml as it is now.

TODAY = {"train.lr": "2e-4", "train.warmup_steps": "100", "train.batch_size": "16", "train.ema_decay": "0.999",
         "train.random_flip": "true", "train.min_snr_gamma": "null", "model.diffusion.parameterization": "eps",
         "train.ema_warmup": "true", "model.diffusion.zero_terminal_snr": "false",
         "model.diffusion.timestep_spacing": "null"}
LATENTS = {"train.random_flip": "false"}  # what the cached-latent recipes change (no flips there anyway)
FIRST_NEW = {**TODAY, **LATENTS, "train.lr": "1e-3", "train.min_snr_gamma": "5"}
ZSNR = {"model.diffusion.zero_terminal_snr": "true", "model.diffusion.parameterization": "v",
        "model.diffusion.timestep_spacing": "trailing"}


@dataclass
class Recipe:
    """Overrides: `base` (None: configs/ldm/tiny.yaml as it is now) plus `changes`; the data path (images or cached
    latents), steps, and how it samples."""

    name: str
    about: str
    changes: dict[str, str] = field(default_factory=dict)
    latents: bool = False
    steps: int = 1500
    sampler: str = "ddim"
    sample_steps: int = 25
    scale: float = 5.0
    base: dict[str, str] | None = field(default_factory=lambda: TODAY)

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in {**(self.base or {}), **self.changes}.items()]


def _on_first_new(name: str, about: str, changes: dict[str, str] | None = None) -> Recipe:
    """A recipe on top of the first new one, sampled as it was (DPM++ 2M Karras, 20 steps, scale 5)."""
    return Recipe(name, about, changes or {}, latents=True, base=FIRST_NEW, sampler="dpmpp_2m_karras",
                  sample_steps=20)


RECIPES = {r.name: r for r in [
    Recipe("today", "configs/ldm/tiny.yaml before: lr 2e-4, warm-up 100, batch 16, random flips, eps, EMA 0.999; "
                    "images encoded every step; DDIM 25 steps at scale 5"),
    Recipe("no-flip", "today without random horizontal flips (they mirror digits and swap left/right)",
           {"train.random_flip": "false"}),
    Recipe("latents", "no-flip on cached latents (tools/encode_latents.py)", LATENTS, latents=True),
    Recipe("lr-1e-3", "latents with lr 1e-3", {**LATENTS, "train.lr": "1e-3"}, latents=True),
    Recipe("min-snr", "latents with min-SNR-gamma 5 loss weights", {**LATENTS, "train.min_snr_gamma": "5"},
           latents=True),
    Recipe("v-pred", "latents with v-prediction", {**LATENTS, "model.diffusion.parameterization": "v"},
           latents=True),
    Recipe("batch-64", "latents with batch 64 for a quarter of the steps", {**LATENTS, "train.batch_size": "64"},
           latents=True, steps=375),
    Recipe("combo", "latents with lr 1e-3 and min-SNR 5", {**LATENTS, "train.lr": "1e-3", "train.min_snr_gamma": "5"},
           latents=True),
    _on_first_new("first-new", "the first new tiny recipe (configs/ldm/tiny.yaml until zero terminal SNR): combo "
                               "sampled with DPM++ 2M Karras 20 steps"),
    # one change on top of the first new recipe each: does it still help?
    _on_first_new("new-v-pred", "first-new with v-prediction", {"model.diffusion.parameterization": "v"}),
    _on_first_new("new-lr-2e-3", "first-new with lr 2e-3", {"train.lr": "2e-3"}),
    _on_first_new("new-no-ema-warmup", "first-new with a constant EMA decay 0.999 (no LitEma warm-up: the average "
                                       "starts at the random initial weights)", {"train.ema_warmup": "false"}),
    _on_first_new("new-fp32", "first-new in fp32 (precision auto is bf16 autocast on this CPU, which has native bf16)",
                  {"train.precision": "fp32"}),
    # SD's scaled_linear schedule keeps sqrt(alpha_bar_T) = 0.068 of the image at t = T; over a 4x4x4 latent
    # quadrant that is enough to read where a shape is, so a model learns to take the layout from the noise, and
    # pure noise at sampling time then places it at random (Lin et al. 2023, "Common Diffusion Noise Schedules
    # and Sample Steps are Flawed": rescale to zero terminal SNR, v-prediction, trailing timesteps). Measured
    # (README, Learning efficiency): that alone does not help while min-SNR weights stay; without them it does.
    _on_first_new("new-zsnr", "first-new with a zero-terminal-SNR schedule, v-prediction and trailing timesteps "
                              "(Lin et al. 2023)", ZSNR),
    _on_first_new("new-v-plain", "first-new with v-prediction and without min-SNR weights, on SD's schedule "
                                 "(new-zsnr-plain without zero terminal SNR)",
                  {"model.diffusion.parameterization": "v", "train.min_snr_gamma": "null"}),
    _on_first_new("new-zsnr-plain", "new-zsnr without min-SNR weights (its v weight min(SNR, 5) / (SNR + 1) is 0 "
                                    "at SNR 0, where the layout is decided)", {**ZSNR, "train.min_snr_gamma": "null"}),
    Recipe("new", "the new tiny recipe (configs/ldm/tiny.yaml now: new-zsnr-plain), sampled at scale 2", latents=True,
           base=None, sampler="dpmpp_2m_karras", sample_steps=20, scale=2.0),
]}


# The pipeline: our tools, as subprocesses.

def tool(*args: str, log: Path) -> float:
    """Run tools/<args>; its output goes to `log`; a failure stops the benchmark with the log's last lines."""
    start = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise InputError(f"{args[0]} failed (exit {result.returncode}): {' | '.join(tail)}; the log is {log}")
    return time.perf_counter() - start


def prepare(data: DataSet, work: Path, ae_steps: int, need_latents: bool) -> dict:
    """Shards, the autoencoder (scale factor written) and, if asked, cached latents; reused when already there."""
    folder = work / data.name
    done = folder / "prepared.json"
    info = json.loads(done.read_text()) if done.is_file() else {}
    fingerprint = hashlib.sha256(data.images.tobytes() + "\n".join(data.captions).encode()).hexdigest()[:16]
    if info.get("ae_steps") != ae_steps or info.get("data") != fingerprint:
        images = folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        for k, (pixels, caption) in enumerate(zip(data.images, data.captions)):
            Image.fromarray(pixels.transpose(1, 2, 0)).save(images / f"{k:05d}.png")
            (images / f"{k:05d}.txt").write_text(caption)
        shards = str(folder / "shards" / "%06d.tar")
        tool("tools/make_shards.py", str(images), shards, "--shard-size", "1000", "--overwrite", "--shuffle",
             log=folder / "make_shards.log")  # the images are in class order: see make_shards' --shuffle
        n_shards = len(list((folder / "shards").glob("*.tar")))
        info = {"shards": str(folder / "shards" / f"{{000000..{n_shards - 1:06d}}}.tar"), "ae_steps": ae_steps,
                "n_images": len(data.images), "data": fingerprint}
        ae = clear(folder / "ae")
        info["ae_s"] = tool("tools/train_autoencoder.py", "--config", "configs/autoencoder/tiny.yaml", "--data",
                            info["shards"], "--out", str(ae), "--max-steps", str(ae_steps),
                            log=folder / "train_autoencoder.log")
        info["ae"] = str(ae / "autoencoder.safetensors")
        tool("tools/compute_scale_factor.py", "--ckpt", info["ae"], "--data", info["shards"], "--size", str(SIZE),
             "--write", log=folder / "compute_scale_factor.log")
        done.write_text(json.dumps(info))
    if need_latents and "latents" not in info:
        latents = clear(folder / "latents")
        tool("tools/encode_latents.py", "--config", "configs/ldm/tiny.yaml", "--data", info["shards"], "--out",
             str(latents / "%06d.tar"), f"model.autoencoder_ckpt={info['ae']}",
             log=folder / "encode_latents.log")
        n = len(list(latents.glob("*.tar")))
        info["latents"] = str(latents / f"{{000000..{n - 1:06d}}}.tar")
        done.write_text(json.dumps(info))
    return info


def clear(folder: Path) -> Path:
    """Start a stage over: an unfinished folder from an earlier run is removed (our tools refuse to mix runs)."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    return folder


def train_recipe(recipe: Recipe, info: dict, folder: Path, steps: int, curve: list[str]) -> tuple[float, str]:
    """train_ldm with the recipe: (wall seconds less the evaluations', the match during training) (reused when
    there). `curve`: train.eval_* overrides that score the judge's match at intervals (evaluation during training)."""
    out = folder / f"{recipe.name}-{steps}"
    record = out / "bench.json"
    # reused only if trained on these data, this autoencoder and these settings
    # the config's hash too: `new` has no overrides, so only the file tells an old config's model from today's
    config = hashlib.sha256((REPO / "configs/ldm/tiny.yaml").read_bytes()).hexdigest()
    made_of = {"data": info.get("data"), "ae": info["ae"], "ae_steps": info["ae_steps"], "config": config,
               "overrides": [*recipe.overrides(), *curve], "latents": recipe.latents}
    done = record.is_file() and (out / "model.safetensors").is_file()
    if not (done and json.loads(record.read_text()).get("made_of") == made_of):
        clear(out)
        source = ["--latents", info["latents"]] if recipe.latents else ["--data", info["shards"]]
        seconds = tool("tools/train_ldm.py", "--config", "configs/ldm/tiny.yaml", *source, "--out", str(out),
                       "--max-steps", str(steps), f"model.autoencoder_ckpt={info['ae']}", "train.sample_every=100000",
                       "train.ckpt_every=100000", "train.log_every=50", *recipe.overrides(), *curve,
                       log=folder / f"train_ldm-{recipe.name}.log")
        record.write_text(json.dumps({"train_s": seconds, "made_of": made_of}))
    import csv

    with open(out / "metrics.csv") as f:
        evals = [row for row in csv.DictReader(f) if row.get("eval_accuracy")]
    spent = sum(float(row["eval_seconds"]) for row in evals)
    trace = " / ".join(f"{float(row['eval_accuracy']):.0%}" for row in evals)
    return json.loads(record.read_text())["train_s"] - spent, trace


def curve_overrides(data: DataSet, path: Path, steps: int, recipe: Recipe) -> list[str]:
    """train.eval_* for a match curve during training: the judge saved as TorchScript at `path`, up to 16 prompts
    x 4 images (DDIM at the recipe's steps and scale), 5 evaluations."""
    prompts = data.prompts()
    shown = list(prompts)[:: max(1, len(prompts) // 16)][:16]
    return [f"train.eval_every={max(1, steps // 5)}", f"train.eval_classifier={path}",
            f"train.eval_prompts={json.dumps(shown)}",
            f"train.eval_labels={json.dumps([joint_label(prompts[p], data.attributes) for p in shown])}",
            "train.eval_images_per_prompt=4", f"train.eval_steps={recipe.sample_steps}",
            f"train.eval_scale={recipe.scale}"]


# Scores.

def diversity(images: np.ndarray, groups: list[np.ndarray]) -> float:
    """Mean over groups of the mean pairwise RMS distance within the group ([0, 1] pixels)."""
    values = []
    for idx in groups:
        x = images[idx].reshape(len(idx), -1)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
        values.append(d[np.triu_indices(len(idx), 1)].mean())
    return float(np.mean(values))


def score(recipe: Recipe, data: DataSet, judge, ckpt: Path, per_prompt: int, real_spread: dict) -> dict:
    import torch

    import ldm

    model = ldm.load_model(ckpt)
    prompts = data.prompts()
    captions = list(prompts)
    start = time.perf_counter()
    images = model.generate(captions, steps=recipe.sample_steps, sampler=recipe.sampler,
                            guidance_scale=recipe.scale, seed=0, n_samples=per_prompt, height=SIZE, width=SIZE,
                            batch_size=64)
    gen_s = time.perf_counter() - start
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    want = np.array([prompts[c] for c in captions for _ in range(per_prompt)])
    got = judge_labels(judge, x)
    right = (got == want)
    match = right.all(1)
    groups = [np.arange(k * per_prompt, (k + 1) * per_prompt) for k in range(len(captions))]
    per_prompt_rate = [match[g].mean() for g in groups]
    spread = diversity(x.numpy(), groups)
    row = {"match": float(match.mean()), "diversity": spread / real_spread[data.name], "gen_s": gen_s,
           "images": len(images), "grid": images}
    if len(data.attributes) > 1:
        row["worst"] = ", ".join(f"{name} {right[:, a].mean():.0%}" for a, (name, _) in enumerate(data.attributes))
    else:
        worst = int(np.argmin(per_prompt_rate))
        row["worst"] = f"{captions[worst]} {per_prompt_rate[worst]:.0%}"
    return row


SWEEP = [("ddim", 25, 5.0), ("dpmpp_2m_karras", 10, 5.0), ("dpmpp_2m", 10, 5.0), ("dpmpp_2m_karras", 20, 5.0),
         ("dpmpp_2m_karras", 20, 2.0), ("dpmpp_2m_karras", 20, 3.0), ("dpmpp_2m_karras", 20, 7.5), ("euler_a", 20, 5.0)]


def eval_sweep(recipe: Recipe, data: DataSet, judge, ckpt: Path, per_prompt: int, spread: dict) -> list[str]:
    """The recipe's model scored with each of SWEEP's (sampler, steps, scale)."""
    import dataclasses

    lines = []
    for sampler, steps, scale in SWEEP:
        row = score(dataclasses.replace(recipe, sampler=sampler, sample_steps=steps, scale=scale), data, judge, ckpt,
                    per_prompt, spread)
        print(f"[{data.name}] {sampler} {steps} steps, scale {scale:g}: match {row['match']:.1%}, diversity "
              f"{row['diversity']:.2f}")
        lines.append(f"| {data.name} | {sampler} | {steps} | {scale:g} | {row['match']:.1%} | {row['worst']} | "
                     f"{row['diversity']:.2f} | {row['images'] / row['gen_s']:.1f} |")
    return lines


def real_diversity(data: DataSet, per_prompt: int) -> float:
    x = data.images.astype(np.float32) / 255
    rng = np.random.default_rng(0)
    groups = []
    for labels in data.prompts().values():
        idx = np.flatnonzero((data.labels == np.array(labels)).all(1))
        groups.append(rng.choice(idx, size=min(per_prompt, len(idx)), replace=False))
    return diversity(x, groups)


def judge_checks(data: DataSet, judge, held, ae_path: str) -> tuple[float, float]:
    """The judge's accuracy on held-out real images and on the autoencoder's reconstructions of them."""
    import torch

    import ldm

    x = torch.from_numpy(data.images[held.numpy()]).float() / 255
    want = data.labels[held.numpy()]
    real = float((judge_labels(judge, x) == want).all(1).mean())
    ae = ldm.load_autoencoder(ae_path)
    with torch.no_grad():
        recon = torch.cat([ae.decode(ae.encode(chunk * 2 - 1).mode()) for chunk in x.split(256)])
    recon = ((recon.clamp(-1, 1) + 1) / 2 * 255).round() / 255  # as saved images
    return real, float((judge_labels(judge, recon) == want).all(1).mean())


def grid_picture(data: DataSet, rows: dict[str, dict], path: Path, columns: int = 8) -> None:
    """One block per recipe: up to 10 prompts (one row each), `columns` seeds, 2x, the recipe's name above."""
    from ldm.images import make_grid

    prompts = list(data.prompts())
    shown = prompts[:: max(1, len(prompts) // 10)][:10]
    blocks = []
    for name, row in rows.items():
        per = len(row["grid"]) // len(prompts)
        tiles = [row["grid"][prompts.index(p) * per + k] for p in shown for k in range(min(columns, per))]
        block = make_grid(tiles, columns=min(columns, per))
        block = block.resize((block.width * 2, block.height * 2), Image.NEAREST)
        labelled = Image.new("RGB", (block.width, block.height + 14), "white")
        labelled.paste(block, (0, 14))
        ImageDraw.Draw(labelled).text((2, 1), name, fill="black")
        blocks.append(labelled)
    gap = 8
    out = Image.new("RGB", (sum(b.width for b in blocks) + gap * (len(blocks) - 1), max(b.height for b in blocks)),
                    "white")
    x = 0
    for block in blocks:
        out.paste(block, (x, 0))
        x += block.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    out.save(tmp)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="shapes,digits", help="comma-separated: shapes, digits")
    p.add_argument("--recipes", default="today,new", help="comma-separated recipe names (--list)")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every recipe's LDM steps (0.5: a quicker, rougher look)")
    p.add_argument("--ae-steps", type=int, default=1500, help="autoencoder steps per data set (default 1500)")
    p.add_argument("--per-prompt", type=int, default=0,
                   help="generated images per prompt (default: 20 for digits, 4 for shapes' 64 prompts)")
    p.add_argument("--no-curve", dest="curve", action="store_false",
                   help="skip the evaluation during training (train.eval_every with the judge, 5 times a run)")
    p.add_argument("--eval-sweep", action="store_true",
                   help="also score the last recipe's model with other samplers, step counts and guidance scales")
    p.add_argument("--work", default=None, help="work folder, kept (default: a temporary one, removed)")
    p.add_argument("--grid", default="docs/learning-{dataset}.png", help="grid picture per data set ('' = none)")
    p.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    p.add_argument("--section", default=None,
                   help="its section (default: 'learning' for today,new, else 'learning ablation')")
    args = p.parse_args()
    if args.list:
        for r in RECIPES.values():
            print(f"{r.name:18s} {r.steps:5d} steps  {r.about}")
        return
    datasets = [d for d in args.datasets.split(",") if d]
    recipes = [r for r in args.recipes.split(",") if r]
    for name in datasets:
        if name not in DATASETS:
            raise InputError(f"--datasets: unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    for name in recipes:
        if name not in RECIPES:
            raise InputError(f"--recipes: unknown recipe {name!r}; see --list")
    if args.steps_scale <= 0 or args.ae_steps < 1 or args.per_prompt < 0:
        raise InputError("--steps-scale must be > 0, --ae-steps >= 1 and --per-prompt >= 0")

    import tempfile

    import torch

    started, t0 = datetime.datetime.now(), time.perf_counter()
    load = os.getloadavg()[0]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="ldm-learning-")
    work = Path(args.work or tmp.name)
    lines, sweep_lines, leak_lines = [], [], []
    try:
        for name in datasets:
            data = DATASETS[name]()
            per_prompt = args.per_prompt or (20 if name == "digits" else 4)
            info = prepare(data, work, args.ae_steps, any(RECIPES[r].latents for r in recipes))
            judge, held = train_judge(data)
            judge_real, judge_recon = judge_checks(data, judge, held, info["ae"])
            spread = {name: real_diversity(data, max(per_prompt, 8))}
            if (leak := layout_leak(data, info["ae"])) is not None:
                leak_lines.append(f"- {name}: a linear probe reads the position from x_T (the latent noised to t = "
                                  f"T - 1) for {leak['scaled_linear']:.1%} of held-out images under SD's "
                                  f"scaled_linear schedule, {leak['zero terminal SNR']:.1%} with zero terminal "
                                  f"SNR; chance {leak['chance']:.1%} (bench/learning_data.py, layout_leak)")
                print(f"[{name}] {leak_lines[-1][2:]}")
            print(f"[{name}] {len(data.images)} images, {len(data.prompts())} prompts; judge: {judge_real:.1%} on "
                  f"held-out real images, {judge_recon:.1%} on their reconstructions; autoencoder "
                  f"{info['ae_s'] / 60:.1f} min")
            judge_file = work / name / "judge.pt"
            if args.curve:  # once per data set: train_ldm's eval_classifier
                save_joint_judge(judge, judge_file)
            rows = {}
            for rname in recipes:
                recipe = RECIPES[rname]
                steps = max(1, round(recipe.steps * args.steps_scale))
                curve = curve_overrides(data, judge_file, steps, recipe) if args.curve else []
                train_s, trace = train_recipe(recipe, info, work / name, steps, curve)
                ckpt = work / name / f"{rname}-{steps}" / "model.safetensors"
                row = score(recipe, data, judge, ckpt, per_prompt, spread)
                row.update(train_s=train_s, steps=steps, trace=trace or "-")
                rows[rname] = row
                print(f"[{name}] {rname}: match {row['match']:.1%} (worst {row['worst']}), diversity "
                      f"{row['diversity']:.2f}, train {train_s / 60:.1f} min, {row['images'] / row['gen_s']:.1f} img/s")
            lines += [f"| {name} | {r} | {RECIPES[r].about} | {row['steps']} | {row['train_s'] / 60:.1f} | "
                      f"**{row['match']:.1%}** | {row['worst']} | {row['diversity']:.2f} | "
                      f"{row['images'] / row['gen_s']:.1f} | {row['trace']} |" for r, row in rows.items()]
            if args.eval_sweep:
                sweep_lines += eval_sweep(RECIPES[recipes[-1]], data, judge, ckpt, per_prompt, spread)
            lines.append(f"| {name} | (judge) | real held-out images / their autoencoder reconstructions | | "
                         f"{info['ae_s'] / 60:.1f} (AE) | {judge_real:.1%} / {judge_recon:.1%} | | 1.00 | | |")
            if args.grid:
                grid_picture(data, rows, REPO / args.grid.format(dataset=name))
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - t0
    argv = " ".join(sys.argv[1:])
    text = "\n".join([
        "## Learning efficiency: what a small model trained on a CPU draws, per recipe"
        + ("" if set(recipes) <= {"today", "new"} else " (ablation)"),
        "",
        f"`python bench/learning.py{' ' + argv if argv else ''}`, {started:%Y-%m-%d}, {machine()}, load average "
        f"{load:.2f} at the start. python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads). Total run time {total / 60:.0f} min.",
        "",
        f"Autoencoder: configs/autoencoder/tiny.yaml, {args.ae_steps} steps per data set; LDM: configs/ldm/tiny.yaml "
        "with each recipe's changes (bench/learning.py, RECIPES). `match`: generated images the judge (a CNN trained "
        "on the real images) assigns to their prompt (shapes: shape, colour and position all right); `worst`: the "
        "weakest prompt (digits) or each attribute's share (shapes); `diversity`: pairwise spread within a prompt, "
        "generated over real; `train min`: train_ldm's wall time less its evaluations; `match during training`: "
        "train_ldm's own `eval_accuracy` (train.eval_every with the judge as `eval_classifier`, up to 16 prompts x 4 "
        "images, DDIM) at each fifth of the run.",
        "",
        "| data | recipe | what it is | LDM steps | train min | match | worst | diversity | gen img/s | "
        "match during training |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        *lines,
        *(["", "What the noise at the last step leaves of the layout:", "", *leak_lines] if leak_lines else []),
        *(["", "How the last recipe's model is sampled (`--eval-sweep`): the same model and judge, other samplers, "
           "steps and guidance scales.", "",
           "| data | sampler | steps | scale | match | worst | diversity | gen img/s |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |", *sweep_lines] if sweep_lines else []),
    ])
    print(text)
    if args.out:
        # today vs new is the headline; other recipe lists (one change at a time) are the ablation's section
        section = args.section or ("learning" if set(recipes) <= {"today", "new"} else "learning ablation")
        write_section(section, text, args.out)


if __name__ == "__main__":
    run_cli(main)
