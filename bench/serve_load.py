#!/usr/bin/env python
"""Load on the HTTP server (tools/serve.py): many concurrent txt2img clients against one model worker.

    python bench/serve_load.py                 # 16 clients x 4 requests, --queue-size 4, 10 steps, 2 rounds
    python bench/serve_load.py --retry         # clients honour Retry-After and retry until served
    python bench/serve_load.py --clients 3 --requests 2 --steps 2 --out ''   # quick check; print only

It starts the real server (`tools/serve.py --port 0 --queue-size Q`, the embedded default model) in a
subprocess, sends one warm-up request, then runs `--rounds` rounds of load: `--clients` threads, each
with its own HTTP session, start together and send `--requests` txt2img requests one after another
(32x32, `--steps` DDIM steps, every request its own seed). Without `--retry` a client that gets a 503
goes on to its next request, so the 503s show the queue bound; with `--retry` it sleeps Retry-After
seconds and sends the same request again until it is served.

Checks (any failure exits 1):
- every request answered exactly once, with an image (200) or a 503; no other status, no connection error;
  with --retry, every request ends with an image;
- no image lost or duplicated: each 200 carries one 32x32 PNG whose info.all_seeds is exactly its own seed
  (and whose PNG "parameters" text says that seed); no seed or pixel content comes back twice; the
  server's completed-job count (/progress state.job_no) grows by exactly the number of 200s;
- the queue bound: every 503 is a QueueFull with a Retry-After of at least 1 s, and /progress, polled
  during the load, never shows more than queue-size + 1 jobs (waiting + running);
- memory: the server's RSS (/proc/PID/status VmRSS, sampled every --sample-ms) after the last round is
  within max(--rss-tolerance-pct of it, --rss-tolerance-mb) of its RSS after round 1;
- the server's log has no ERROR, WARNING or traceback, it stays up, and it stops with exit code 0 on SIGTERM.
Latency is per HTTP attempt (send to full response): p50 / p95 (nearest rank) / max of the 200s and of the
503s; "end-to-end" is the first send to the image, retries included. Writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import requests
from PIL import Image

from machine import RESULTS, machine, write_section  # bench/machine.py

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a smiling face", "a red heart", "a cat face", "a thumbs up", "a yellow star", "a green tree")
SIZE = 32
MIB = 1024 * 1024


# -- the server ---------------------------------------------------------------------------------------

class Server:
    """`python tools/serve.py --port 0 ARGS` in a subprocess; its output is kept in `lines`."""

    def __init__(self, *args: str, timeout: float = 120):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def drain() -> None:  # keep reading so the pipe never fills up
            for line in self.process.stdout:
                self.lines.append(line)
                found = re.search(r"Running on (http://\S+)", line)
                if found and not self.url:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout)
        if not self.url:
            self.process.kill()
            raise SystemExit("the server did not start:\n" + "".join(self.lines))

    def rss(self) -> int | None:
        """VmRSS in bytes, None once the process is gone."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def progress(self, session: requests.Session) -> dict:
        return session.get(self.url + "/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=30).json()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Monitor(threading.Thread):
    """Samples the server's RSS every `interval` s and, every 4th sample, the jobs in it (/progress job_count)."""

    def __init__(self, server: Server, interval: float):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.peak_rss, self.most_jobs, self.samples, self.poll_errors = 0, 0, 0, []
        self.halt = threading.Event()

    def reset(self) -> None:
        self.peak_rss, self.most_jobs = 0, 0

    def run(self) -> None:
        session, tick = requests.Session(), 0
        while not self.halt.is_set():
            rss = self.server.rss()
            if rss is not None:
                self.peak_rss, self.samples = max(self.peak_rss, rss), self.samples + 1
            if tick % 4 == 0:
                try:
                    self.most_jobs = max(self.most_jobs, self.server.progress(session)["state"]["job_count"])
                except (requests.RequestException, ValueError, KeyError) as exc:
                    self.poll_errors.append(f"{type(exc).__name__}: {exc}")
            tick += 1
            self.halt.wait(self.interval)


# -- the clients --------------------------------------------------------------------------------------

def check_image(record: dict, answer: dict) -> None:
    """Fill `record` from a 200's JSON: what is wrong with it (`bad`), and its pixels' hash."""
    images, seed = answer.get("images") or [], record["seed"]
    try:
        seeds = json.loads(answer["info"])["all_seeds"]
    except (KeyError, TypeError, ValueError):
        seeds = None
    if len(images) != 1 or seeds != [seed]:
        record["bad"] = f"seed {seed}: {len(images)} images, all_seeds {seeds}"
        return
    try:
        image = Image.open(io.BytesIO(base64.b64decode(images[0])))
        image.load()
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the image is bad
        record["bad"] = f"seed {seed}: not a PNG ({type(exc).__name__}: {exc})"
        return
    if image.size != (SIZE, SIZE) or f"Seed: {seed}," not in image.info.get("parameters", ""):
        record["bad"] = f"seed {seed}: {image.size[0]}x{image.size[1]} PNG, parameters {image.info.get('parameters')!r}"
        return
    record["pixels"] = hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


def one_request(session: requests.Session, url: str, seed: int, client: int, args) -> dict:
    """Send one txt2img request (again after each 503 with --retry) and say how it ended."""
    body = {"prompt": PROMPTS[client % len(PROMPTS)], "width": SIZE, "height": SIZE, "steps": args.steps,
            "seed": seed, "sampler_name": "DDIM", "cfg_scale": 7.5}
    first = time.perf_counter()
    record = {"seed": seed, "client": client, "status": None, "retries": 0, "rejected": [], "retry_after_bad": 0,
              "retry_after": set(), "first": first}
    deadline = first + args.timeout
    while True:
        sent = time.perf_counter()
        try:
            response = session.post(url + "/sdapi/v1/txt2img", json=body, timeout=max(1.0, deadline - sent))
        except requests.RequestException as exc:
            record.update(status=f"{type(exc).__name__}", error=str(exc)[:200], end=time.perf_counter())
            break
        latency = time.perf_counter() - sent
        if response.status_code == 503:
            record["rejected"].append(latency)
            try:
                retry_after = int(response.headers.get("Retry-After", ""))
                queue_full = response.json().get("error") == "QueueFull"
            except ValueError:
                retry_after, queue_full = 0, False
            record["retry_after"].add(retry_after)
            if retry_after < 1 or not queue_full:
                record["retry_after_bad"] += 1
            if args.retry and time.perf_counter() + max(retry_after, 1) < deadline:
                record["retries"] += 1
                time.sleep(max(retry_after, 1))
                continue
        record.update(status=response.status_code, latency=latency, total=time.perf_counter() - first,
                      end=time.perf_counter())
        if response.status_code == 200:
            try:
                check_image(record, response.json())
            except ValueError as exc:
                record["bad"] = f"seed {seed}: the body is not JSON ({exc})"
        elif response.status_code != 503:
            record["error"] = response.text[:200]
        break
    return record


def run_round(server: Server, monitor: Monitor, round_no: int, args) -> dict:
    session = requests.Session()
    jobs_before = server.progress(session)["state"]["job_no"]
    rss_before = server.rss()
    records: list[list[dict]] = [[] for _ in range(args.clients)]
    start = threading.Barrier(args.clients + 1)

    def client(k: int) -> None:
        own = requests.Session()
        start.wait()
        for i in range(args.requests):
            seed = 1000 + ((round_no - 1) * args.clients + k) * args.requests + i  # distinct over all rounds
            records[k].append(one_request(own, server.url, seed, k, args))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for thread in threads:
        thread.start()
    monitor.reset()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    peak, most_jobs = monitor.peak_rss, monitor.most_jobs
    time.sleep(args.settle)  # let the worker finish its bookkeeping and the allocator settle
    jobs_after = server.progress(session)["state"]["job_no"]
    flat = [r for rs in records for r in rs]
    for r in flat:
        r["first"], r["end"] = r["first"] - began, r["end"] - began
    return {"round": round_no, "records": flat, "wall": wall, "jobs": jobs_after - jobs_before,
            "rss_before": rss_before, "rss_peak": max(peak, monitor.peak_rss), "rss_after": server.rss(),
            "most_jobs": most_jobs}


# -- the report ---------------------------------------------------------------------------------------

def quantiles(values: list[float], scale: float, digits: int) -> str:
    """'p50 / p95 / max' (nearest rank) of `values` x `scale`, or '-' for none."""
    if not values:
        return "-"
    ordered = sorted(values)
    return " / ".join(f"{v * scale:.{digits}f}" for v in (rank(ordered, 0.5), rank(ordered, 0.95), ordered[-1]))


def rank(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(r: dict) -> dict:
    recs = r["records"]
    ok = [x for x in recs if x["status"] == 200]
    return {**r, "ok": ok, "n": len(recs), "n200": len(ok), "n503": sum(x["status"] == 503 for x in recs),
            "other": [x for x in recs if x["status"] not in (200, 503)], "retries": sum(x["retries"] for x in recs),
            "rejected": [t for x in recs for t in x["rejected"]], "bad": [x["bad"] for x in ok if "bad" in x],
            "retry_after_bad": sum(x["retry_after_bad"] for x in recs),
            "max_retries": max((x["retries"] for x in recs), default=0),
            "retry_after": sorted(set().union(*(x["retry_after"] for x in recs)))}


def note(s: dict, clients: int) -> str:
    """When the 503s came, and how the images were shared among the clients."""
    per_client = [sum(x["client"] == k for x in s["ok"]) for k in range(clients)]
    ends = [x["end"] for x in s["records"] if x["status"] == 503]
    when = f"its {len(ends)} final 503s came {min(ends):.2f}-{max(ends):.2f} s into it" if ends else "no final 503"
    return (f"round {s['round']}: {when} ({s['wall']:.1f} s); images per client {min(per_client)}-{max(per_client)}"
            f" ({sum(n == 0 for n in per_client)} of {clients} clients got none); most retries of one request "
            f"{s['max_retries']}")


def table(rounds: list[dict]) -> str:
    header = ["round", "requests", "200", "503", "other", "retries (most of one)", "200 latency p50 / p95 / max (s)",
              "end-to-end p50 / p95 / max (s)", "503 latency p50 / p95 / max (ms)", "wall (s)", "images/s",
              "most jobs in server", "job_no +", "RSS before / peak / after (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for s in rounds:
        rss = " / ".join(f"{(s[k] or 0) / MIB:.0f}" for k in ("rss_before", "rss_peak", "rss_after"))
        lines.append("| " + " | ".join([
            str(s["round"]), str(s["n"]), str(s["n200"]), str(s["n503"]), str(len(s["other"])),
            f"{s['retries']} ({s['max_retries']})",
            quantiles([x["latency"] for x in s["ok"]], 1, 2), quantiles([x["total"] for x in s["ok"]], 1, 2),
            quantiles(s["rejected"], 1000, 0), f"{s['wall']:.1f}", f"{s['n200'] / s['wall']:.2f}",
            str(s["most_jobs"]), str(s["jobs"]), rss]) + " |")
    return "\n".join(lines)


def interpretation(rounds: list[dict], args, alone: float) -> str:
    """One paragraph on what the numbers say, from the numbers (`alone`: a lone request's latency)."""
    last = rounds[-1]
    served = sorted(x["latency"] for s in rounds for x in s["ok"])
    total = sorted(x["total"] for s in rounds for x in s["ok"])
    p50 = served[len(served) // 2] if served else float("nan")
    per_image = sum(s["wall"] for s in rounds) / max(1, sum(s["n200"] for s in rounds))
    after_1, after_n = rounds[0]["rss_after"] or 0, last["rss_after"] or 0
    memory = (f"The server's RSS moved {(after_n - after_1) / MIB:+.1f} MiB from after round 1 to after round "
              f"{last['round']} (peak {max(s['rss_peak'] for s in rounds) / MIB:.0f} MiB).")
    retry_after = "/".join(map(str, sorted(set().union(*(s["retry_after"] for s in rounds))))) or "-"
    speed = (f"{per_image:.2f} s of wall time per image ({1 / per_image:.2f} images/s) against {alone:.2f} s for a "
             f"lone request")
    if not args.retry:
        refused = [x for s in rounds for x in s["records"] if x["status"] == 503]
        counts, refusals = sorted({s["n200"] for s in rounds}), sorted({s["n503"] for s in rounds})
        per_client = [sum(x["client"] == k for x in s["ok"]) for s in rounds for k in range(args.clients)]
        return (f"Interpretation: the server holds {args.queue_size} waiting + 1 running request (at most "
                f"{max(s['most_jobs'] for s in rounds)} seen in it), so {'-'.join(map(str, counts))} of "
                f"{args.clients * args.requests} requests per round got an image and the other "
                f"{'-'.join(map(str, refusals))} a 503 (Retry-After {retry_after} s) within "
                f"{max((x['latency'] for x in refused), default=0) * 1000:.0f} ms, all of them in the first "
                f"{max((x['end'] for x in refused), default=0):.2f} s of a round: refused clients used up their "
                f"requests at once, and a client admitted once was served again (images per client "
                f"{min(per_client)}-{max(per_client)}). A served request took {p50:.1f} s (p50), queued behind up to "
                f"{args.queue_size} others; {speed}. {memory}")
    text = (f"Interpretation: every request ended with an image, after {sum(s['retries'] for s in rounds)} retries in "
            f"all (Retry-After {retry_after} s); {speed}. An admitted request took {p50:.1f} s (p50), but end to end "
            f"(retries included) the p95 was {rank(total, 0.95):.1f} s and the slowest "
            f"{total[-1]:.1f} s ({max(s['max_retries'] for s in rounds)} retries for one request)")
    fair = args.clients * per_image  # in a fair (first come, first served) order, the others go at most once first
    if total and total[-1] > 2 * fair:
        text += (f", over twice the {fair:.1f} s in which each of the {args.clients} clients could have been served "
                 "once: retries are not served in order, so a client that keeps waking when the queue is full loses "
                 "the race to others however long it has waited")
    return f"{text}. {memory}"


def checks(rounds: list[dict], args, log_problems: list[str], alive: bool, exit_code: int, rss_after_warmup: int,
           poll_errors: list[str]) -> list[tuple[str, bool, str]]:
    total = args.clients * args.requests
    found = []
    answered = all(s["n"] == total and s["n200"] + s["n503"] + len(s["other"]) == s["n"] for s in rounds)
    others = [f"round {s['round']}: seed {x['seed']} -> {x['status']} {x.get('error', '')}"
              for s in rounds for x in s["other"]]
    found.append(("every request answered exactly once (200 or 503, no other status)", answered and not others,
                  "; ".join(others[:3]) or f"{len(rounds)} x {total} requests, other statuses 0"))
    if args.retry:
        served = [s["n200"] for s in rounds]
        found.append(("--retry: every request ends with an image", all(n == total for n in served),
                      f"200s per round {served} of {total}"))
    seeds = [x["seed"] for s in rounds for x in s["ok"]]
    pixels = [x["pixels"] for s in rounds for x in s["ok"] if "pixels" in x]
    bad = [b for s in rounds for b in s["bad"]]
    found.append(("each 200 is one 32x32 PNG with exactly its own seed; no seed or pixels twice",
                  not bad and len(set(seeds)) == len(seeds) and len(set(pixels)) == len(pixels) == len(seeds),
                  "; ".join(bad[:3]) or f"{len(seeds)} images, {len(set(seeds))} seeds, {len(set(pixels))} distinct"))
    jobs = [(s["jobs"], s["n200"]) for s in rounds]
    found.append(("server job_no grows by the number of 200s", all(j == n for j, n in jobs),
                  ", ".join(f"round {s['round']}: +{j} for {n}" for s, (j, n) in zip(rounds, jobs))))
    most = max(s["most_jobs"] for s in rounds)
    n_bad = sum(s["retry_after_bad"] for s in rounds)
    found.append(((f"queue bound: jobs in server <= queue size + 1 = {args.queue_size + 1}; 503s are QueueFull "
                   "with Retry-After >= 1"), most <= args.queue_size + 1 and n_bad == 0 and not poll_errors,
                  f"most seen {most}; {n_bad} 503s without a good Retry-After"
                  + (f"; /progress failed {len(poll_errors)}x: {poll_errors[0]}" if poll_errors else "")))
    first, last = rounds[0]["rss_after"] or 0, rounds[-1]["rss_after"] or 0
    allowed = max(args.rss_tolerance_pct / 100 * first, args.rss_tolerance_mb * MIB)
    found.append(((f"memory stable: RSS after round {rounds[-1]['round']} - after round 1 <= "
                   f"max({args.rss_tolerance_pct:g}%, {args.rss_tolerance_mb:g} MiB)"),
                  len(rounds) < 2 or (first > 0 and last - first <= allowed),
                  (f"after warm-up {rss_after_warmup / MIB:.0f} MiB, after round 1 {first / MIB:.0f} MiB, after "
                   f"round {rounds[-1]['round']} {last / MIB:.0f} MiB ({(last - first) / MIB:+.1f} MiB, allowed "
                   f"{allowed / MIB:.0f})" + ("; one round: nothing to compare" if len(rounds) < 2 else ""))))
    found.append(("server log clean, server up throughout, exit code 0 on SIGTERM",
                  not log_problems and alive and exit_code == 0,
                  f"{len(log_problems)} ERROR/WARNING/traceback lines"
                  + (f" (first: {log_problems[0].strip()[:120]})" if log_problems else "")
                  + f"; alive {alive}; exit code {exit_code}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    parser.add_argument("--queue-size", type=int, default=4, help="the server's --queue-size")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of load on the same server")
    parser.add_argument("--retry", action="store_true", help="honour Retry-After: retry each 503 until served")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take, retries included")
    parser.add_argument("--sample-ms", type=float, default=25, help="RSS sampling interval")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a round before RSS 'after'")
    parser.add_argument("--rss-tolerance-pct", type=float, default=3.0, help="memory check: allowed growth, %%")
    parser.add_argument("--rss-tolerance-mb", type=float, default=16.0, help="memory check: allowed growth, MiB")
    parser.add_argument("--server-log", default="", help="also write the server's output to this file")
    parser.add_argument("--out", default=str(RESULTS), help="results file ('' = print only)")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.queue_size, args.steps, args.rounds) < 1:
        parser.error("--clients, --requests, --queue-size, --steps and --rounds must be >= 1")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    server = Server("--queue-size", str(args.queue_size))
    print(f"server pid {server.process.pid} at {server.url}, RSS {server.rss() / MIB:.0f} MiB", flush=True)
    monitor = Monitor(server, args.sample_ms / 1000)
    rounds: list[dict] = []
    try:
        warm = requests.post(server.url + "/sdapi/v1/txt2img", timeout=300,
                             json={"prompt": "warm-up", "width": SIZE, "height": SIZE, "steps": args.steps, "seed": 1})
        if warm.status_code != 200:
            raise SystemExit(f"warm-up request: {warm.status_code} {warm.text[:300]}")
        alone = []
        for seed in (2, 3, 4):  # lone requests on the idle server: the time one image takes without load
            sent = time.perf_counter()
            requests.post(server.url + "/sdapi/v1/txt2img", timeout=300, json={
                "prompt": "alone", "width": SIZE, "height": SIZE, "steps": args.steps, "seed": seed}).raise_for_status()
            alone.append(time.perf_counter() - sent)
        alone = sorted(alone)[1]
        time.sleep(args.settle)
        rss_after_warmup = server.rss()
        monitor.start()
        for round_no in range(1, args.rounds + 1):
            s = summarize(run_round(server, monitor, round_no, args))
            rounds.append(s)
            print(f"round {round_no}: {s['n200']} x 200, {s['n503']} x 503, {len(s['other'])} other, "
                  f"{s['retries']} retries, {s['wall']:.1f} s, RSS after {s['rss_after'] / MIB:.0f} MiB", flush=True)
        alive = server.process.poll() is None
    finally:
        monitor.halt.set()
        exit_code = server.stop()
    log_problems = [line for line in server.lines if re.search(r"ERROR|WARNING|Traceback", line)]
    found = checks(rounds, args, log_problems, alive, exit_code, rss_after_warmup, monitor.poll_errors)
    elapsed = time.perf_counter() - started

    results = table(rounds) + "\n\n" + "\n".join(f"- {note(s, args.clients)}" for s in rounds)
    verdicts = "\n".join(["| check | result | detail |", "| --- | --- | --- |"]
                         + [f"| {name} | {'pass' if ok else '**FAIL**'} | {detail} |" for name, ok, detail in found])
    print()
    print(results)
    print()
    print(verdicts)
    print(f"\n{interpretation(rounds, args, alone)}\n\n{elapsed:.0f} s")
    if log_problems:
        print("\nserver log lines:\n" + "".join(log_problems[:20]), file=sys.stderr)
    if args.server_log:
        Path(args.server_log).write_text("".join(server.lines))
    failed = [name for name, ok, _ in found if not ok]

    if args.out:
        command = "python bench/serve_load.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        mode = "clients retry after each 503 (Retry-After) until served" if args.retry else \
            "no retries: a 503 ends the request"
        text = f"""## HTTP server under load: {args.clients} clients x {args.requests} requests, queue {args.queue_size}, {"retry" if args.retry else "no retry"}

`{command}`, {datetime.date.today().isoformat()}, {machine()}, load average {load:.2f} at the start.
python {platform.python_version()}, torch {version("torch")}, fastapi {version("fastapi")}, uvicorn {version("uvicorn")}.
`tools/serve.py --port 0 --queue-size {args.queue_size}` (embedded default model, CPU); one warm-up request and 3 lone
requests (median {alone:.2f} s), then {args.rounds} rounds: {args.clients} threads start together, each sends {args.requests} txt2img requests one after another
({SIZE}x{SIZE}, DDIM {args.steps} steps, CFG 7.5, each its own seed); {mode}. Latency per HTTP attempt,
p50 / p95 (nearest rank) / max; end-to-end: first send to image. Most jobs in server: /progress job_count
(waiting + running), polled every {4 * args.sample_ms:g} ms. RSS: the server's VmRSS, sampled every {args.sample_ms:g} ms;
"after" {args.settle:g} s after the round. Total run time {elapsed:.0f} s.

{results}

{verdicts}

{interpretation(rounds, args, alone)}
"""
        write_section("serve_load" + (" retry" if args.retry else ""), text, args.out)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
