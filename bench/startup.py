#!/usr/bin/env python
"""Start-up time: each tool's `--help`, `import ldm`, and the default model's txt2img end to end, split.

    python bench/startup.py                                        # this tree
    python bench/startup.py --baseline /tmp/startup-before         # and another tree, side by side
    python bench/startup.py --baseline /tmp/startup-before --threads 1   # one thread: steadier on busy cores
    python bench/startup.py --tree /tmp/other --out ''             # another tree alone; print only

A tree is a folder with common/, autoencoder/, ldm/ and tools/; it runs with this interpreter (the same
packages) and PYTHONPATH=TREE, so a copy of the tree from before a change measures the change. With
`--baseline` the two trees' runs alternate, so a change in the machine's load hits both alike.

Every number is a fresh process (`subprocess.run`), timed from just before the start to its exit: wall
seconds (median of the repeats) and CPU seconds (user + system of the process, its median). CPU time
moves less than wall time when other work shares the cores.
- `TOOL --help`: each of tools/*.py, `--help-repeats` times (default 5).
- `python -c pass` and `python -c "import ldm"`: the bare interpreter, and the package import.
- `txt2img.py --prompt "red apple"`: the default model (embedded, 50 DDIM steps, one 32x32 image, into a
  fresh temp folder), `--repeats` times (default 3), split by timestamps taken inside the process (a
  wrapper hooks two functions as their modules load; the tool itself is unchanged):
  start-up (interpreter, imports, flags: until `load_model` is called), load (`load_model`, the file's
  hash, set-up: until `generate` is called), generate (text encoding, the sampling loop, the VAE
  decode), write (the PNG files, and the interpreter's exit).
- Import self-time by package: one more txt2img run under `python -X importtime`, each module's own
  import time summed by top-level package (importtime's overhead included, so only the shares count).
Writes its section of bench/RESULTS.md (`--out`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import RESULTS, machine, write_section  # bench/machine.py

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "red apple"

# Runs a tool in this process with two functions timed (time.time(), comparable with the parent's clock):
# ldm.formats.loading.load_model and LatentDiffusion.generate, hooked as their modules finish loading, before
# any importer binds them. argv: EVENTS_FILE TOOL ARGS...
DRIVER = r"""
import atexit, functools, importlib.abc, importlib.machinery, json, runpy, sys, time
events = {}
events_file, tool, *args = sys.argv[1:]

def timed(fn, name):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        events.setdefault(name + "_start", time.time())
        try:
            return fn(*a, **k)
        finally:
            events[name + "_end"] = time.time()
    return wrapper

def after_loading(module):
    module.load_model = timed(module.load_model, "load")

def after_pipeline(module):
    module.LatentDiffusion.generate = timed(module.LatentDiffusion.generate, "generate")

HOOKS = {"ldm.formats.loading": after_loading, "ldm.pipeline": after_pipeline}

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module
        def run(module):
            exec_module(module)
            HOOKS[name](module)
        spec.loader.exec_module = run
        return spec

sys.meta_path.insert(0, Hook())
atexit.register(lambda: json.dump(events, open(events_file, "w")))
sys.argv = [tool, *args]
runpy.run_path(tool, run_name="__main__")
"""


THREADS: dict[str, str] = {}  # OMP_NUM_THREADS for the measured processes (--threads)


def timed_run(command: list[str], tree: Path, cwd: Path) -> tuple[float, float, float]:
    """(start time.time(), wall s, CPU s) of one process; it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(tree), **THREADS}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, t0 = time.time(), time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} (PYTHONPATH={tree}) failed:\n{result.stderr[-3000:]}")
    return start, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def txt2img_run(tree: Path, cwd: Path) -> dict[str, float]:
    """One default-model txt2img run, split at `load_model` and `generate` (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        events_file = Path(tmp) / "events.json"
        command = [sys.executable, "-c", DRIVER, str(events_file), str(tree / "tools" / "txt2img.py"),
                   "--prompt", PROMPT, "--outdir", str(Path(tmp) / "out")]
        start, wall, cpu = timed_run(command, tree, cwd)
        e = json.loads(events_file.read_text())
        if not (Path(tmp) / "out" / "samples" / "00000.png").is_file():
            raise SystemExit(f"txt2img in {tree} wrote no image")
    end = start + wall
    return {"total": wall, "cpu": cpu, "startup": e["load_start"] - start, "load": e["generate_start"] - e["load_start"],
            "generate": e["generate_end"] - e["generate_start"], "write": end - e["generate_end"]}


def import_self_times(tree: Path, cwd: Path) -> dict[str, float]:
    """Seconds of own import time per top-level package in one txt2img run (`-X importtime`)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-X", "importtime", str(tree / "tools" / "txt2img.py"), "--prompt", PROMPT,
                   "--outdir", tmp]
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(tree), **THREADS}, cwd=cwd,
                                capture_output=True, text=True)
    totals: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, own, _, name = (part.strip() for part in line.replace("import time:", "|", 1).split("|"))
            if own.isdigit():
                totals[name.split(".")[0]] += int(own) / 1e6
    return dict(totals)


def measure(tree: Path, cwd: Path, tools: list[str], *, helps: bool, txt2img: bool) -> dict[str, list]:
    """One round in `tree`: name -> [(wall, cpu)] (`--help` and imports), or [split dict] (txt2img)."""
    out: dict[str, list] = {}
    if helps:
        for tool in tools:
            out[f"{tool} --help"] = [timed_run([sys.executable, str(tree / "tools" / tool), "--help"], tree, cwd)[1:]]
        out["python -c pass"] = [timed_run([sys.executable, "-c", "pass"], tree, cwd)[1:]]
        out["python -c 'import ldm'"] = [timed_run([sys.executable, "-c", "import ldm"], tree, cwd)[1:]]
    if txt2img:
        out["txt2img"] = [txt2img_run(tree, cwd)]
    return out


def merge(into: dict[str, list], new: dict[str, list]) -> None:
    for key, values in new.items():
        into.setdefault(key, []).extend(values)


def median(values: list[float]) -> float:
    return statistics.median(values)


def check_tree(parser: argparse.ArgumentParser, tree: str) -> Path:
    path = Path(tree).resolve()
    missing = [d for d in ("common", "autoencoder", "ldm", "tools") if not (path / d).is_dir()]
    if missing:
        parser.error(f"{tree} is not a tree of this project: no {', '.join(missing)}/ in it")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tree", default=str(ROOT), help="the tree to measure")
    parser.add_argument("--baseline", default=None, help="a second tree measured alongside (e.g. a copy from before)")
    parser.add_argument("--name", default=None, help="--tree's column name (default: 'after' with --baseline)")
    parser.add_argument("--baseline-name", default="before", help="--baseline's column name")
    parser.add_argument("--help-repeats", type=int, default=5, help="runs of each --help and import")
    parser.add_argument("--repeats", type=int, default=3, help="txt2img runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the measured processes (default: torch's, one per core)")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    args = parser.parse_args()
    if args.help_repeats < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--help-repeats, --repeats and --threads must be >= 1")
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    trees = {}
    if args.baseline:
        trees[args.baseline_name] = check_tree(parser, args.baseline)
    trees[args.name or ("after" if args.baseline else "this tree")] = check_tree(parser, args.tree)
    tools = sorted(p.name for p in (trees[list(trees)[-1]] / "tools").glob("*.py"))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    results: dict[str, dict[str, list]] = {name: {} for name in trees}
    imports: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as cwd:  # no tree on the path but PYTHONPATH's
        for r in range(max(args.help_repeats, args.repeats)):
            for name, tree in trees.items():
                merge(results[name], measure(tree, Path(cwd), tools, helps=r < args.help_repeats,
                                             txt2img=r < args.repeats))
            print(f"round {r + 1}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        for name, tree in trees.items():
            imports[name] = import_self_times(tree, Path(cwd))
    elapsed = time.perf_counter() - started

    names = list(trees)
    header = "| command | " + " | ".join(f"{n} wall s | {n} CPU s" for n in names) + " |"
    lines = [header, "| --- |" + " ---: | ---: |" * len(names)]
    for key in [f"{tool} --help" for tool in tools] + ["python -c pass", "python -c 'import ldm'"]:
        cells = []
        for n in names:
            runs = results[n].get(key, [])
            cells += [f"{median([w for w, _ in runs]):.2f}", f"{median([c for _, c in runs]):.2f}"] if runs else ["-", "-"]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    parts = [("total", f'`txt2img.py --prompt "{PROMPT}"`, end to end'), ("startup", "start-up: interpreter, imports, flags"),
             ("load", "load: `load_model`, hash, set-up"), ("generate", "generate: text, 50 DDIM steps, decode"),
             ("write", "write: PNGs, exit")]
    for part, label in parts:
        cells = []
        for n in names:
            runs = results[n]["txt2img"]
            cells += [f"{median([run[part] for run in runs]):.2f}",
                      f"{median([run['cpu'] for run in runs]):.2f}" if part == "total" else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    packages = sorted(set().union(*imports.values()), key=lambda p: -max(imports[n].get(p, 0) for n in names))[:12]
    import_lines = ["| package | " + " | ".join(f"{n} s" for n in names) + " |", "| --- |" + " ---: |" * len(names)]
    import_lines += [f"| {p} | " + " | ".join(f"{imports[n].get(p, 0):.2f}" for n in names) + " |" for p in packages]
    import_lines.append("| all | " + " | ".join(f"{sum(imports[n].values()):.2f}" for n in names) + " |")
    import_table = "\n".join(import_lines)
    print(f"\n{table}\n\nImport self-time by package, one txt2img run under -X importtime:\n\n{import_table}\n\n"
          f"{elapsed:.0f} s")
    if not args.out:
        return
    import torch

    command = "python bench/startup.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    where = ", ".join(f"{n}: `{tree}`" for n, tree in trees.items())
    n_threads = args.threads or os.cpu_count()
    spin_note = ("\nWith more than one thread on cores that other work keeps busy, `generate` varies by orders of magnitude "
                 "(OpenMP's\nthreads spin waiting for each other; bench/README.md): compare start-up, load and write, "
                 "or see the `--threads 1`\nsection.") if n_threads > 1 else ""
    threads = f" ({args.threads} thread{'s' * (args.threads > 1)})" if args.threads else ""
    text = f"""## Start-up time: `--help` of every tool, `import ldm`, default-model txt2img end to end{threads}

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {torch.__version__}, {n_threads} thread{'s' * (n_threads > 1)}. Trees ({where})
run with the same interpreter and packages (PYTHONPATH=tree), their runs alternating. Fresh processes; wall:
median of {args.help_repeats} runs (`--help`, imports) or {args.repeats} (txt2img); CPU: user + system seconds of
the process, median. The txt2img rows under the first split each run by timestamps inside the process (medians;
see bench/README.md). Total run time {elapsed:.0f} s.{spin_note}

{table}

Import self-time by package (one txt2img run under `-X importtime`; each module's own time, summed by
top-level package; the 12 largest):

{import_table}
"""
    write_section("startup" + (f" threads{args.threads}" if args.threads else ""), text, args.out)


if __name__ == "__main__":
    main()
