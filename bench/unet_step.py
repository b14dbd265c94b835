#!/usr/bin/env python
"""Speed of one SD / SDXL UNet step: ours (`ldm.unet.UNetModel`) vs diffusers' `UNet2DConditionModel`.

    python bench/unet_step.py                              # SD-v1 and SD-v2, latent 32x32, eager and channels_last
    python bench/unet_step.py --layouts xl                 # the SDXL base UNet (2.57B parameters), latent 32x32
    python bench/unet_step.py --sizes 32 64                # also 64x64 (512 px; several seconds a step on a CPU)
    python bench/unet_step.py --variants eager compile     # torch.compile too (minutes of compiling on a CPU)
    python bench/unet_step.py --device cuda --sizes 64     # on a GPU: bf16 by default
    python bench/unet_step.py --device cuda --sizes 64 --variants eager fused_qkv channels_last cuda_graphs
    python bench/unet_step.py --repeats 3 --out ''         # fewer repeats; print only, write no file

For each layout (the full-size `unet_config` of `ldm.original_configs.SD_V1` / `SD_V2`,
`use_checkpoint` off, or the `network_config` of `ldm.formats.sgm.SDXL_BASE`) it builds our UNet with random weights (seed 0). The original init zeroes
the output convs, which would make both outputs exactly 0, so every all-zero parameter is refilled
with random values (seed 1) before the comparison. The same original-format state dict (keys
`model.diffusion_model.*`) goes through diffusers' own converter
(`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`) into a
`UNet2DConditionModel`. The diffusers model is built on the meta device and takes the converted
tensors by assignment, so on the CPU in fp32 eager the two models share weight storage where the
converter did not copy.

One step: batch 2 (classifier-free guidance), `torch.inference_mode()`, timestep 500, context
(2, 77, 768) for v1, (2, 77, 1024) for v2 and (2, 77, 2048) for xl; fp32 on the CPU and bf16 on CUDA unless `--dtype`
says otherwise. Each variant (eager NCHW, fused_qkv, channels_last, compile, cuda_graphs) is
applied to both models. The first call of each model is the warm-up, and its outputs give the max
abs difference between the two. Then the median wall time of `--repeats` calls (64x64:
`--repeats-64`), the two models' calls alternating. FLOPs per step come from
`torch.utils.flop_counter.FlopCounterMode` on our eager model, counted once per size before the
variants (matmuls, convs and SDPA; elementwise ops and norms are not counted). The peak is the median
time of a large square `torch.mm` in the same dtype. Writes its section of bench/RESULTS.md (SDXL
rows go to a section of their own, so the SD-v1/v2 section keeps its last run).

SDXL's vector conditioning: diffusers takes `added_cond_kwargs={"text_embeds": [2, 1280], "time_ids": [2, 6]}`
and embeds the six size numbers itself (`addition_embed_type="text_time"`, 256 Fourier features each);
ours takes the finished vector y [2, 2816] = (text_embeds, Fourier features of the same time_ids made with
`ldm.denoisers.embeddings.timestep_embedding`), which is what sgm's conditioner hands its UNet. Both get
the same numbers.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from machine import RESULTS, machine, resolve_device_dtype, write_section  # bench/machine.py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PREFIX = "model.diffusion_model."


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("eager", "fused_qkv", "channels_last", "compile", "cuda_graphs")
# layout -> (table label, results section); SDXL rows get a section of their own
LAYOUTS = {"v1": ("SD-v1", "sd"), "v2": ("SD-v2", "sd"), "xl": ("SDXL-base", "xl")}
TIME_EMBED_DIM = 256  # SDXL: Fourier features per size number (sgm ConcatTimestepEmbedderND outdim)


def original_config(name: str) -> dict:
    from ldm.formats.original_configs import SD_V1, SD_V2
    from ldm.formats.sgm import SDXL_BASE
    return {"v1": SD_V1, "v2": SD_V2, "xl": SDXL_BASE}[name]


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_pair(fns: list, repeats: int, device: str) -> list[float]:
    """Median wall time in ms of each function, the calls interleaved (a, b, a, b, ...) so that a change
    in the machine's load during the run hits every function alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def mm_peak(device: str, dtype: torch.dtype) -> float:
    """Achieved GFLOP/s of a large square matmul in `dtype` (2048 on the CPU, 8192 on a GPU; median of 10)."""
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        torch.mm(a, b)
        (ms,) = timed_pair([lambda: torch.mm(a, b)], 10, device)
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


def prepare(model: torch.nn.Module, variant: str) -> float:
    """Fuse / lay out / compile a model for a variant (variants run in VARIANTS order on the same model);
    returns the seconds it took (compiling happens at the first call)."""
    from ldm.denoisers.attention import fuse_qkv_projections

    start = time.perf_counter()
    fuse = variant == "fused_qkv"
    if hasattr(model, "fuse_qkv_projections"):  # diffusers
        if fuse:
            model.fuse_qkv_projections()
        elif getattr(model, "original_attn_processors", None) is not None:
            model.unfuse_qkv_projections()
    else:
        fuse_qkv_projections(model, fuse)
    if variant in ("channels_last", "compile", "cuda_graphs"):
        model.to(memory_format=torch.channels_last)
    if variant in ("compile", "cuda_graphs"):
        model.compile(mode="reduce-overhead" if variant == "cuda_graphs" else "default")
    return time.perf_counter() - start


def build(name: str, original: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from ldm.denoisers.unet import UNetConfig, UNetModel

    original = copy.deepcopy(original)
    model_params = original["model"]["params"]
    if "unet_config" in model_params:  # SD 1.x/2.x (ldm)
        params = model_params["unet_config"]["params"]
        params["use_checkpoint"] = False
        config = UNetConfig.from_original(params)
    else:  # SDXL (sgm): always spatial transformers, no legacy head rule, as ldm.formats.sgm.from_sgm_config
        params = model_params["network_config"]["params"]
        config = UNetConfig.from_original({"use_spatial_transformer": True, "legacy": False, **params})
    torch.manual_seed(0)
    ours = UNetModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.any():  # zero-initialised output convs: refill so the comparison means something
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = create_unet_diffusers_config_from_ldm(original, checkpoint)
        converted = convert_ldm_unet_checkpoint(checkpoint, config)
    del checkpoint
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    missing, unexpected = theirs.load_state_dict(converted, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    theirs.eval()
    del converted
    ours_storage = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    shared = sum(p.nbytes for p in theirs.parameters() if p.untyped_storage().data_ptr() in ours_storage)
    total = sum(p.nbytes for p in theirs.parameters())
    count = sum(p.numel() for p in ours.parameters())
    print(f"[{name}] built: {count / 1e6:.0f}M parameters ({total / 1024 ** 3:.2f} GiB); diffusers shares "
          f"{shared / 1024 ** 3:.2f} GiB of its weights with ours; peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    return ours, theirs, params["context_dim"], count


def make_inputs(name: str, size: int, context_dim: int, device: str, dtype: torch.dtype) -> dict:
    """x, t, context, and for SDXL our vector y and diffusers' added_cond_kwargs made from the same numbers."""
    from ldm.denoisers.embeddings import timestep_embedding

    gen = torch.Generator().manual_seed(2)
    inputs = {"x": torch.randn(2, 4, size, size, generator=gen).to(device, dtype),
              "t": torch.tensor([500, 500], device=device),
              "context": torch.randn(2, 77, context_dim, generator=gen).to(device, dtype), "y": None, "added": None}
    if name == "xl":
        text_embeds = torch.randn(2, 1280, generator=gen)  # the pooled OpenCLIP bigG vector
        pixels = 8 * size  # original size, crop top-left, target size: as SDXL pipelines set them
        time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2, dtype=torch.float32)
        fourier = timestep_embedding(time_ids.flatten(), TIME_EMBED_DIM).reshape(2, -1)
        inputs["y"] = torch.cat([text_embeds, fourier], dim=1).to(device, dtype)
        inputs["added"] = {"text_embeds": text_embeds.to(device, dtype), "time_ids": time_ids.to(device)}
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32], help="latent sizes (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls at sizes below 64 (default 5)")
    parser.add_argument("--repeats-64", type=int, default=3, help="timed calls at 64 and above (default 3)")
    parser.add_argument("--layouts", nargs="+", default=["v1", "v2"], choices=list(LAYOUTS),
                        help="v1, v2 (SD, the default) and xl (SDXL base: 2.57B parameters, 10.3 GB in fp32; "
                             "its results go to a section of their own)")
    parser.add_argument("--variants", nargs="+", default=["eager", "channels_last"], choices=VARIANTS,
                        help="how both models run: eager NCHW, fused_qkv (eager, one GEMM for Q/K/V), "
                             "channels_last, compile (torch.compile of the channels-last model; minutes of "
                             "compiling per model and size on a CPU), cuda_graphs (compile mode reduce-overhead; CUDA)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and inputs (auto: fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    args = parser.parse_args()
    if any(s % 8 or s <= 0 for s in args.sizes) or args.repeats < 1 or args.repeats_64 < 1:
        parser.error("sizes must be positive multiples of 8; repeats at least 1")
    resolve_device_dtype(parser, args)
    device, dtype = args.device, DTYPES[args.dtype]
    if "cuda_graphs" in args.variants and device != "cuda":
        parser.error("the cuda_graphs variant needs --device cuda")

    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak = mm_peak(device, dtype)
    print(f"{args.dtype} mm: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads, {device})", flush=True)

    rows, built = [], {}
    for name in args.layouts:
        ours, theirs, context_dim, count = build(name, original_config(name))
        built[name] = count
        if (device, dtype) != ("cpu", torch.float32):  # (a no-op .to() would still make diffusers warn)
            ours.to(device, dtype)
            theirs.to(device, dtype)

        gflop: dict[int, float] = {}
        for size in args.sizes:  # counted on the plain eager model, before any variant fuses or compiles it
            i = make_inputs(name, size, context_dim, device, dtype)
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                ours(i["x"], i["t"], i["context"], y=i["y"])
            gflop[size] = counter.get_total_flops() / 1e9
        for variant in [v for v in VARIANTS if v in args.variants]:
            setup = [prepare(ours, variant), prepare(theirs, variant)]
            for size in args.sizes:
                repeats = args.repeats if size < 64 else args.repeats_64
                i = make_inputs(name, size, context_dim, device, dtype)
                x, t, ctx, y, added = i["x"], i["t"], i["context"], i["y"], i["added"]
                # A CUDA graph replay reuses its output buffers: each call starts a new graph step, and the
                # warm-up outputs are copied before the other model runs.
                graphs = variant == "cuda_graphs"

                def call_ours():
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    return ours(x, t, ctx, y=y)

                def call_theirs():
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    return theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

                with torch.inference_mode():
                    first = []
                    for fn in (call_ours, call_theirs):
                        sync(device)
                        start = time.perf_counter()
                        first.append(fn().clone())
                        sync(device)
                        first.append(time.perf_counter() - start)
                    a, first_ours, b, first_theirs = first
                    diff = (a.float() - b.float()).abs().max().item()
                    scale = a.float().abs().max().item()
                    ours_ms, theirs_ms = timed_pair([call_ours, call_theirs], repeats, device)
                achieved = gflop[size] / (ours_ms * 1e-3)
                row = {"layout": LAYOUTS[name][0], "section": LAYOUTS[name][1], "size": size, "variant": variant, "ours": ours_ms, "theirs": theirs_ms,
                       "gflop": gflop[size], "gflops": achieved, "pct": 100 * achieved / peak, "diff": diff,
                       "scale": scale, "repeats": repeats,
                       "first": (setup[0] + first_ours, setup[1] + first_theirs)}
                rows.append(row)
                print(f"[{name} {size}x{size} {variant}] ours {ours_ms:.0f} ms, diffusers {theirs_ms:.0f} ms, "
                      f"{gflop[size]:.0f} GFLOP, max abs diff {diff:.2e} (output max {scale:.2f}); first call "
                      f"{row['first'][0]:.1f} s / {row['first'][1]:.1f} s", flush=True)
        ours = theirs = None  # free this layout before the next is built
        gc.collect()
        print(f"[{name}] done; peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)

    tables = {section: results_table([r for r in rows if r["section"] == section])
              for section in dict.fromkeys(r["section"] for r in rows)}
    print()
    print("\n\n".join(tables.values()))
    elapsed = time.perf_counter() - started
    memory = (f"peak RSS {peak_rss_gib():.1f} GiB" if device == "cpu"
              else f"peak allocated {torch.cuda.max_memory_allocated() / 1024 ** 3:.1f} GiB")
    print(f"\n{elapsed:.0f} s, {memory}")
    if not args.out:
        return
    command = "python bench/unet_step.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    threads = f" ({torch.get_num_threads()} threads)" if device == "cpu" else f" ({torch.cuda.get_device_name()})"
    for section, table in tables.items():
        these = [r for r in rows if r["section"] == section]
        repeats = ", ".join(f"{r['size']}x{r['size']}: {r['repeats']}" for r in {r["size"]: r for r in these}.values())
        if section == "sd":
            title, key = f"One UNet step: ours vs diffusers ({device}, {args.dtype})", f"unet_step {device} {args.dtype}"
            what = ("Full-size SD-v1 / SD-v2 UNet layouts (860M / 866M parameters), random weights shared by both "
                    "models, batch 2\n(CFG), {dtype} weights and inputs on {device}, `torch.inference_mode()`, "
                    "timestep 500, context 77 tokens.")
        else:
            title = f"One SDXL UNet step: ours vs diffusers ({device}, {args.dtype})"
            key = f"unet_step xl {device} {args.dtype}"
            what = (f"The full-size SDXL base UNet (`ldm.formats.sgm.SDXL_BASE`, {built['xl'] / 1e6:.0f}M parameters), "
                    "random weights shared by both models, batch 2\n(CFG), {dtype} weights and inputs on {device}, "
                    "`torch.inference_mode()`, timestep 500, context 77 tokens of width 2048. Vector conditioning: "
                    "diffusers gets\n`added_cond_kwargs` (text_embeds [2, 1280], time_ids [2, 6] = latent size x 8, "
                    "crop 0, 0, latent size x 8);\nours gets y [2, 2816] = text_embeds and `timestep_embedding` "
                    "(256 Fourier features) of the same time_ids.")
        text = f"""## {title}

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__}{threads}, diffusers {diffusers.__version__}. Total run time {elapsed:.0f} s, {memory} (the whole run).

{what.format(dtype=args.dtype, device=device)}
Variants apply to both models alike: `eager` (NCHW), `fused_qkv` (eager; ours `ldm.attention.fuse_qkv_projections`,
diffusers `fuse_qkv_projections()`), `channels_last` (`model.to(memory_format=torch.channels_last)`), `compile`
(channels-last plus `model.compile()`), `cuda_graphs` (channels-last plus `model.compile(mode="reduce-overhead")`).
Median of timed calls after one warm-up call ({repeats}); the calls of the two models alternate. `ours it/s` is steps per second of a batch-2 (one image with CFG) step.
GFLOP per step is from `FlopCounterMode` on our eager model (matmuls, convs, attention; elementwise work not counted).
Peak: a large square `torch.mm` in {args.dtype} at {peak:.1f} GFLOP/s. Max abs diff is between the two models'
outputs on the warm-up call (outputs reach about {max(r['scale'] for r in these):.1f} in absolute value).

{table}
"""
        write_section(key, text, args.out)


def results_table(rows: list[dict]) -> str:
    lines = ["| layout | latent | variant | ours ms | diffusers ms | ours / diffusers | ours it/s | GFLOP per step "
             "| ours GFLOP/s | % of mm peak | max abs diff |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['size']}x{r['size']} | {r['variant']} | {r['ours']:.0f} | {r['theirs']:.0f} "
                     f"| {r['ours'] / r['theirs']:.3f} | {1e3 / r['ours']:.2f} | {r['gflop']:.0f} | {r['gflops']:.1f} "
                     f"| {r['pct']:.0f}% | {r['diff']:.1e} |")
    table = "\n".join(lines)
    compiled = [r for r in rows if r["variant"] in ("compile", "cuda_graphs")]
    if compiled:
        table += "\n\nFirst call with compiling (s, ours / diffusers): " + "; ".join(
            f"{r['layout']} {r['size']}x{r['size']} {r['variant']} {r['first'][0]:.0f} / {r['first'][1]:.0f}"
            for r in compiled)
    return table


if __name__ == "__main__":
    main()
