"""train.fsdp: FSDP2 training equals DDP and one process, sharded checkpoints resume on any number of ranks, the
export equals the gathered EMA, and bad combinations stop with one line.

The distributed parts run this file as a worker (`python -m torch.distributed.run ... tests/test_fsdp.py MODE OUT`)
on the CPU with gloo, on fixed tensors: the same global batch of 8 samples each step, split by rank (and by
micro-batch), so every way of training sees the same data and only the arithmetic's order may differ.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if __name__ == "__main__":  # the worker: `helpers` and the tools are beside / above this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, write_caption_shards

CAPTIONS = ["red apple", "grinning face", "yellow star", "blue heart"] * 2  # the global batch: 8 samples
STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")
# tools/train_ldm.py on configs/ldm/tiny.yaml (random autoencoder), as tests/test_train_ldm.py runs it
FAST = ["train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "train.num_workers=0",
        "train.shuffle_buffer=20", "train.sample_steps=2", "model.random_autoencoder=true"]


# --- the worker ------------------------------------------------------------------------------------------

def tiny_model(seed: int):
    """configs/ldm/tiny.yaml's model (random autoencoder; UNet and a trained text encoder) from `seed`."""
    from common.config import read_yaml
    from ldm.formats.loading import model_from_training_config

    torch.manual_seed(seed)
    section = read_yaml(REPO / "configs/ldm/tiny.yaml")["model"]
    return model_from_training_config({**section, "random_autoencoder": True})


def global_batch(model, step: int) -> tuple[torch.Tensor, ...]:
    """Step `step`'s 8 samples: noisy latents, timesteps, tokens and the target of the denoiser's output."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    target = torch.randn(8, 4, 8, 8, generator=g)
    return x, t, model.text_encoder.tokenize(CAPTIONS), target


class Run:
    """A model trained as tools/train_ldm.py trains it (its `parallel` and `make_optimizer`, gradient sync,
    clipping, AdamW, EMA), on `global_batch`: this rank's rows, in `accum` micro-batches."""

    def __init__(self, kind: str, world, *, seed: int = 0, accum: int = 1, rank: int = 0, world_size: int = 1):
        from torch.nn.parallel import DistributedDataParallel

        sys.path.insert(0, str(REPO / "tools"))
        from train_ldm import make_optimizer, parallel

        from ldm.training.config import TrainConfig
        from ldm.training.ema import EMA
        from ldm.training.trainable import Trainable

        self.cfg = TrainConfig(fsdp=kind == "fsdp", grad_clip=1.0, lr=1e-3)
        self.model = tiny_model(seed)
        self.trainable = Trainable(self.model.denoiser, self.model.text_encoder)
        if kind == "ddp":
            self.net = DistributedDataParallel(self.trainable)
        elif kind == "fsdp":
            self.net = parallel(self.trainable, self.cfg, world)
        else:  # one process, the whole batch
            self.net, rank, world_size = self.trainable, 0, 1
        self.ema = EMA(self.trainable, decay=0.9)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.cfg, world.device)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.accum, self.rank, self.world_size, self.step = accum, rank, world_size, 0
        self.first_grads: dict[str, torch.Tensor] = {}

    def train_step(self) -> float:
        """One optimizer step; the loss averaged over the global batch."""
        from ldm.training.distributed import all_reduce_mean, gradient_sync

        x, t, tokens, target = global_batch(self.model, self.step)
        rows = torch.arange(8).chunk(self.world_size)[self.rank]
        losses = []
        for micro, part in enumerate(rows.chunk(self.accum)):
            with gradient_sync(self.net, sync=micro == self.accum - 1):
                loss = (self.net(x[part], t[part], tokens[part]) - target[part]).pow(2).mean(dim=(1, 2, 3))
                (loss.mean() / self.accum).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.step == 0:  # the first step's (clipped) gradients: the optimizer's input, not yet Adam-normalised
            self.first_grads = {name: p.grad.detach().clone() for name, p in self.trainable.named_parameters()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.trainable, self.step)
        self.step += 1
        mean = torch.cat(losses).mean()
        return all_reduce_mean(mean).item() if self.world_size > 1 else mean.item()

    def full_state(self, keep: bool, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """Weights, EMA shadows, AdamW state (and the first step's gradients) as full tensors (gathered under FSDP:
        every rank calls it)."""
        from ldm.training.distributed import full_tensors

        names = {p: name for name, p in self.trainable.named_parameters()}
        state = {f"weight/{name}": p for name, p in self.trainable.named_parameters()}
        state.update({f"ema/{name}": v for name, v in self.ema.shadow.items()})
        state.update({f"grad/{name}": v for name, v in self.first_grads.items()} if grads else {})
        for p in self.params:
            state.update({f"adam/{names[p]}/{k}": v for k, v in self.optimizer.state[p].items()})
        return {k: v.float().cpu() for k, v in full_tensors(state, keep=keep).items()}


def max_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """The largest |a - b| of each group of tensors (weight, ema, adam); the same keys are required."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    out: dict[str, float] = {}
    for key in a:
        group = key.split("/")[0]
        diff = (a[key] - b[key]).abs().max().item() if a[key].numel() else 0.0
        if diff > out.get(group, 0.0):
            print(f"{key}: {diff:.3g}", file=sys.stderr)  # for a failure's report
        out[group] = max(out.get(group, 0.0), diff)
    return out


def worker(mode: str, out: Path) -> None:
    import ldm.pipeline  # noqa: F401  (it attaches LatentDiffusion.generate)
    from ldm.training.checkpoints import export_ema, list_checkpoints
    from ldm.training.distributed import cleanup_distributed, setup_distributed
    from ldm.training.sharded import ema_weights, restore_sharded_checkpoint, save_sharded_checkpoint

    world = setup_distributed("cpu")
    split = dict(rank=world.rank, world_size=world.world_size)
    result: dict = {"world_size": world.world_size}
    start = time.perf_counter()
    if mode == "equivalence":  # (a) and (d): one process on the global batch, DDP, FSDP, FSDP with accumulation
        runs = {"one_process": Run("plain", world), "ddp": Run("ddp", world, **split),
                "fsdp": Run("fsdp", world, **split), "fsdp_accum2": Run("fsdp", world, accum=2, **split)}
        result["losses"] = {name: [run.train_step() for _ in range(STEPS)] for name, run in runs.items()}
        states = {name: run.full_state(keep=world.is_main, grads=True) for name, run in runs.items()}
        if world.is_main:
            result["max_diff_to_one_process"] = {name: max_differences(state, states["one_process"])
                                                 for name, state in states.items()}
            result["max_diff_fsdp_accum2_to_fsdp"] = max_differences(states["fsdp_accum2"], states["fsdp"])
    elif mode == "save":  # 2 steps, a checkpoint, the export and a sample of the EMA weights; then a 3rd step
        run = Run("fsdp", world, **split)
        result["losses"] = [run.train_step() for _ in range(2)]
        save_sharded_checkpoint(out / "checkpoints", 2, run.model, run.net, run.ema, run.optimizer, run.scaler,
                                keep=2, is_main=world.is_main)
        saved = run.full_state(keep=world.is_main)
        export_ema(out / "model.safetensors", run.model, run.ema, is_main=world.is_main)
        with ema_weights(run.model, run.trainable, run.ema, is_main=world.is_main) as parts:
            if parts:
                model, trainable, ema = parts
                with ema.applied_to(trainable):
                    image = model.generate(["red apple"], steps=2, seed=0, height=32, width=32)[0]
                np.save(out / "sample.npy", np.asarray(image))
        result["losses"].append(run.train_step())
        after = run.full_state(keep=world.is_main)
        if world.is_main:
            torch.save({"saved": saved, "after": after}, out / "expected.pt")
    elif mode.startswith("load"):  # another init, the checkpoint loaded, compared; then the 3rd step
        run = Run("fsdp", world, seed=123, **split)
        folder = list_checkpoints(out / "checkpoints")[-1]
        run.step = restore_sharded_checkpoint(folder, run.net, run.ema, run.optimizer, run.scaler)
        loaded = run.full_state(keep=world.is_main)
        result["step"], result["ema_num_updates"] = run.step, run.ema.num_updates
        result["loss_step3"] = run.train_step()
        after = run.full_state(keep=world.is_main)
        if world.is_main:
            expected = torch.load(out / "expected.pt", weights_only=True)
            result["max_diff_loaded"] = max_differences(loaded, expected["saved"])
            result["max_diff_after_step3"] = max_differences(after, expected["after"])
    result["seconds"] = time.perf_counter() - start
    if world.is_main:
        (out / f"{mode}.json").write_text(json.dumps(result, indent=1))
    cleanup_distributed()


# --- the tests -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of 16 real images with captions."""
    return write_caption_shards(tmp_path_factory.mktemp("fsdp_data"), CAPTIONS[:4])


def train(*args: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = (*TORCHRUN, "--nproc_per_node", str(ranks)) if ranks > 1 else (sys.executable,)
    cmd = [*launcher, str(REPO / "tools" / "train_ldm.py"), "--config", str(REPO / "configs/ldm/tiny.yaml"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def metrics(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]


def weight_checksums(run: Path, rank: int) -> list[float]:
    """The sum of |weights| after each step, as train.log_sample_keys logs it (the full weights under FSDP)."""
    return [float(line.split("\t")[2]) for line in (run / "sample_keys" / f"rank{rank}.tsv").read_text().splitlines()]

def run_worker(mode: str, out: Path, ranks: int) -> dict:
    """This file as a worker on `ranks` processes (1: plain python, a 1-rank group); rank 0's result."""
    launcher = (*TORCHRUN, "--nproc_per_node", str(ranks)) if ranks > 1 else (sys.executable,)
    result = subprocess.run([*launcher, str(Path(__file__).resolve()), mode, str(out)], capture_output=True,
                            text=True, cwd=REPO, env=ENV, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads((out / f"{mode}.json").read_text())


def convert(monkeypatch, capsys, *args) -> tuple[int, str]:
    """tools/convert_checkpoint.py in this process, as run_cli runs it: (exit code, stderr)."""
    from ldm.cli import run_cli

    sys.path.insert(0, str(REPO / "tools"))
    import convert_checkpoint

    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", *map(str, args)])
    capsys.readouterr()
    try:
        run_cli(convert_checkpoint.main)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_one_process_saves_and_exports_a_sharded_checkpoint(tmp_path, monkeypatch, capsys):
    """fsdp with one process (a 1-rank group): the checkpoint's layout; the folder read here without a process
    group equals the run's export (the gathered EMA), and the converter's file generates the image that the
    gathered EMA weights generated in the run."""
    import ldm
    from common.checkpoint import read_checkpoint
    from ldm.training.checkpoints import checkpoint_problem, list_checkpoints
    from ldm.training.sharded import read_training_checkpoint

    run_worker("save", tmp_path, ranks=1)
    folder = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert folder.name == "step_00000002" and checkpoint_problem(folder) is None
    marker = json.loads((folder / "COMPLETE").read_text())
    assert sorted(marker["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "frozen.safetensors", "resume.pt"]
    exported, _ = read_checkpoint(tmp_path / "model.safetensors")
    tensors, metadata = read_training_checkpoint(folder)
    assert tensors.keys() == exported.keys() and all(torch.equal(tensors[k], exported[k]) for k in tensors)
    assert metadata["ema"] == "true"
    raw, _ = read_training_checkpoint(folder, ema=False)
    assert not all(torch.equal(raw[k], tensors[k]) for k in tensors if k.startswith("denoiser."))
    code, err = convert(monkeypatch, capsys, folder, tmp_path / "converted.safetensors")
    assert code == 0, err
    converted = ldm.load_model(tmp_path / "converted.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in converted.state_dict().items())
    image = converted.generate(["red apple"], steps=2, seed=0)[0]
    assert np.array_equal(np.asarray(image), np.load(tmp_path / "sample.npy"))  # the run's gathered-EMA sample
    own = ldm.load_model(tmp_path / "model.safetensors").generate(["red apple"], steps=2, seed=0)[0]
    assert np.array_equal(np.asarray(image), np.asarray(own))


def test_the_converter_refuses_what_is_not_a_whole_checkpoint(tmp_path, monkeypatch, capsys):
    """One line each: an unfinished (.tmp) folder, a truncated shard, a folder that is no checkpoint."""
    partial = tmp_path / "checkpoints" / ".tmp-step_00000009"
    (partial / "dcp").mkdir(parents=True)
    error = one_line_error(*convert(monkeypatch, capsys, partial, tmp_path / "a.safetensors"))
    assert "is not a complete training checkpoint (no COMPLETE marker" in error
    damaged = tmp_path / "checkpoints" / "step_00000004"
    (damaged / "dcp").mkdir(parents=True)
    (damaged / "dcp" / "__0_0.distcp").write_bytes(b"x" * 100)
    (damaged / "COMPLETE").write_text(json.dumps({"step": 4, "files": {"dcp/__0_0.distcp": 5000}}))
    error = one_line_error(*convert(monkeypatch, capsys, damaged, tmp_path / "b.safetensors"))
    assert error == f"error: {damaged} is damaged: dcp/__0_0.distcp is truncated (100 of 5000 bytes)"
    (damaged / "dcp" / "__0_0.distcp").write_bytes(b"x" * 5000)  # whole in size, but no DCP directory
    error = one_line_error(*convert(monkeypatch, capsys, damaged, tmp_path / "b.safetensors"))
    assert error.startswith(f"error: checkpoint not found: {damaged / 'frozen.safetensors'}")
    (tmp_path / "empty").mkdir()
    assert one_line_error(*convert(monkeypatch, capsys, tmp_path / "empty", tmp_path / "c.safetensors"))
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".convert-*"))


@pytest.mark.slow
def test_fsdp_trains_as_ddp_and_one_process(tmp_path):
    """(a) 2 ranks of 4 samples with FSDP = with DDP = one process with the 8 (float tolerance: the
    reductions' order differs); (d) FSDP with 2 micro-batches of 2 = 1 of 4."""
    result = run_worker("equivalence", tmp_path, ranks=2)
    print(json.dumps(result, indent=1))
    reference = result["losses"]["one_process"]
    # The gradients agree to float rounding; Adam divides each by its own running RMS, which magnifies rounding
    # in near-zero gradients to a few 1e-5 of the weights after 3 steps of lr 1e-3 (measured: DDP 7e-6, FSDP
    # 9e-6, FSDP with 2 micro-batches 4e-5).
    for name in ("ddp", "fsdp", "fsdp_accum2"):
        np.testing.assert_allclose(result["losses"][name], reference, rtol=1e-6)
        diff = result["max_diff_to_one_process"][name]
        assert diff["grad"] < 1e-6 and diff["adam"] < 1e-6 and diff["weight"] < 1e-4 and diff["ema"] < 1e-4, name
    diff = result["max_diff_fsdp_accum2_to_fsdp"]
    assert diff["grad"] < 1e-6 and diff["weight"] < 1e-4
    assert reference[0] != reference[-1]  # it trains


@pytest.mark.slow
@pytest.mark.parametrize("saved_on,loaded_on", [(2, 1), (2, 2), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, saved_on, loaded_on):
    """(b) the state gathered after loading = the state gathered before saving, bit for bit, on any number of
    ranks; the next step then matches the uninterrupted run's (float tolerance across rank counts)."""
    from ldm.training.checkpoints import list_checkpoints

    saved = run_worker("save", tmp_path, ranks=saved_on)
    marker = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "COMPLETE").read_text())
    assert sorted(marker["files"]) == ["dcp/.metadata", *[f"dcp/__{r}_0.distcp" for r in range(saved_on)],
                                       "frozen.safetensors", "resume.pt"]
    loaded = run_worker("load", tmp_path, ranks=loaded_on)
    print(json.dumps({"saved": saved, "loaded": loaded}, indent=1))
    assert loaded["step"] == 2 and loaded["ema_num_updates"] == 2
    assert loaded["max_diff_loaded"] == {"weight": 0.0, "ema": 0.0, "adam": 0.0}  # bit for bit
    assert max(loaded["max_diff_after_step3"].values()) < 1e-4  # another rank count: float rounding (above)
    assert loaded["loss_step3"] == pytest.approx(saved["losses"][2], rel=1e-5)


def test_fsdp_refuses_lora_and_fp16(shards, tmp_path):
    from common.errors import InputError
    from ldm.training.config import TrainConfig

    result = train("--init", "default", "--lora-rank", "4", "--lora-alpha", "4", "--data", shards, "--out",
                   str(tmp_path / "run"), "--max-steps", "1", *FAST, "train.fsdp=true", check=False)
    assert one_line_error(result.returncode, result.stderr) == (
        "error: train.fsdp shards a fully trained model; LoRA (--lora-rank) trains small adapters on a frozen one, "
        "which DDP handles: drop train.fsdp=true")
    assert not (tmp_path / "run" / "metrics.csv").exists()
    with pytest.raises(InputError, match="fsdp does not take precision fp16"):
        TrainConfig.from_dict({"fsdp": True, "precision": "fp16"})
    with pytest.raises(InputError, match="fsdp is true or false, got 'yes'"):
        TrainConfig.from_dict({"fsdp": "yes"})


@pytest.mark.slow
def test_train_ldm_with_fsdp_matches_ddp_and_resumes_on_other_rank_counts(shards, tmp_path):
    """tools/train_ldm.py end to end on 2 ranks, each reading its own shard (the same samples with DDP and with
    FSDP): the same losses and weights as DDP, a sample grid from the gathered EMA, a sharded checkpoint
    whose export is the run's model.safetensors; resumed on 1 rank it loads the same EMA and trains on (bf16
    autocast), and that 1-rank checkpoint resumes on 2 ranks (with 2 micro-batches a step); without
    train.fsdp it is refused in one line.

    fp32 for the comparison: under bf16 autocast the weights' last-bit differences after a step (the
    reductions' order) flip some bf16 roundings, and the losses part by ~1e-4 from step 2 on (measured: DDP
    0.86692, 0.70800; FSDP 0.86685, 0.70792; step 1 equal)."""
    from common.checkpoint import read_checkpoint
    from ldm.training.sharded import read_training_checkpoint

    common = ["--data", shards, *FAST, "train.ckpt_every=1000", "train.log_sample_keys=true",
              "train.resampled=false"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    train("--out", str(ddp), "--max-steps", "3", *common, "train.precision=fp32", ranks=2)
    result = train("--out", str(fsdp), "--max-steps", "3", *common, "train.precision=fp32", "train.fsdp=true",
                   ranks=2)
    assert "train.fsdp: FSDP2 (fully_shard) over 2 rank(s), gloo" in result.stdout
    print("losses: ddp", metrics(ddp), "fsdp", metrics(fsdp))
    np.testing.assert_allclose(metrics(fsdp), metrics(ddp), rtol=1e-6)
    for rank in (0, 1):
        print(f"checksums rank {rank}: ddp", weight_checksums(ddp, rank), "fsdp", weight_checksums(fsdp, rank))
        np.testing.assert_allclose(weight_checksums(fsdp, rank), weight_checksums(ddp, rank), rtol=1e-6)
    assert (fsdp / "samples" / "step_00000003.png").is_file()  # drawn on rank 0 with the gathered EMA weights
    folder = fsdp / "checkpoints" / "step_00000003"
    assert sorted(json.loads((folder / "COMPLETE").read_text())["files"]) == [
        "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "frozen.safetensors", "resume.pt"]
    exported = read_checkpoint(fsdp / "model.safetensors")[0]
    ddp_exported = read_checkpoint(ddp / "model.safetensors")[0]
    print("max |EMA fsdp - EMA ddp|", max((exported[k] - ddp_exported[k]).abs().max().item() for k in exported))
    assert all(torch.allclose(exported[k], ddp_exported[k], atol=1e-4) for k in exported)
    tensors = read_training_checkpoint(folder)[0]
    assert all(torch.equal(tensors[k], exported[k]) for k in exported)
    # Resumed on 1 rank at step 3: nothing to train, the loaded EMA exported again, bit for bit.
    (fsdp / "model.safetensors").rename(tmp_path / "exported_on_2_ranks.safetensors")
    result = train("--out", str(fsdp), "--max-steps", "3", *common, "train.fsdp=true", "--resume")
    assert f"resumed at step 3 from {folder}" in result.stdout
    again = read_checkpoint(fsdp / "model.safetensors")[0]
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    # On 1 rank it trains on, and its checkpoint (one shard file) resumes on 2 ranks.
    train("--out", str(fsdp), "--max-steps", "4", *common, "train.fsdp=true", "train.ckpt_every=4",
          "train.precision=bf16", "--resume")
    assert sorted(json.loads((fsdp / "checkpoints" / "step_00000004" / "COMPLETE").read_text())["files"]) == [
        "dcp/.metadata", "dcp/__0_0.distcp", "frozen.safetensors", "resume.pt"]
    result = train("--out", str(fsdp), "--max-steps", "5", *common, "train.fsdp=true", "train.precision=bf16",
                   "train.grad_accum=2", "--resume", ranks=2)
    assert "resumed at step 4" in result.stdout and "global batch 4 x 2 x 2 = 16" in result.stdout
    assert (fsdp / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    result = train("--out", str(fsdp), "--max-steps", "6", *common, "--resume", check=False)
    assert one_line_error(result.returncode, result.stderr) == (
        f"error: {fsdp / 'checkpoints' / 'step_00000005'} is a sharded checkpoint (written with train.fsdp=true): "
        "resume it with train.fsdp=true, or export it: tools/convert_checkpoint.py FOLDER OUT.safetensors")


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
