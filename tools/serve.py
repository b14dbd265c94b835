#!/usr/bin/env python
"""Serve a model over HTTP: the AUTOMATIC1111 web UI's API (/sdapi/v1/...) and a web page at /.

    python tools/serve.py                                        # the embedded default model on http://127.0.0.1:7860
    python tools/serve.py --ckpt v1-5-pruned-emaonly.safetensors --port 7861
    python tools/serve.py --models-dir models/Stable-diffusion --lora-dir models/Lora --listen --api-auth me:secret

A1111 clients (the `webuiapi` package, editor plug-ins, bots) work unchanged: point them at
http://HOST:PORT. Requests run one at a time on the model, in order; at most --queue-size wait, and
more are answered 503 with Retry-After. The API schema is at /docs. Ctrl+C (or SIGTERM) stops
cleanly: waiting requests are answered 503, the running one is interrupted.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.choices import ATTENTION_BACKENDS
from ldm import InputError
from ldm.cli import HelpFormatter, pick_device, run_cli

if TYPE_CHECKING:
    import uvicorn

    from ldm.server.worker import Worker


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """A1111's --api-auth: user:password[,user2:password2]."""
    if text is None:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InputError(f"--api-auth takes user:password (several joined by commas), got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is a clear error (port 0: any free port)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port, or stop the "
                         "program using it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def command_line_flags(args: argparse.Namespace, *, port: int) -> dict:
    """GET /sdapi/v1/cmd-flags: the flags this server runs with, under their argparse names, with A1111's names
    for the same things (`ckpt_dir` = --models-dir, `api`, `nowebui`); the port actually bound; the
    --api-auth password never (A1111 shows it; here only whether auth is on)."""
    return {**vars(args), "port": port, "api": True, "nowebui": False, "ckpt_dir": args.models_dir,
            "api_auth": "(set)" if args.api_auth else None}


def make_server(config: uvicorn.Config, worker: Worker) -> uvicorn.Server:
    """uvicorn's server that, on SIGINT / SIGTERM, also stops the worker: waiting requests are answered 503 and
    the running one is interrupted, so the shutdown does not wait for the queue to drain."""
    import uvicorn  # imported here, as the server starts: --help answers without it

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, worker: Worker):
            super().__init__(config)
            self.worker = worker

        def handle_exit(self, sig, frame) -> None:
            """uvicorn's own, less its re-raising of the signal after the shutdown: a clean stop exits with 0."""
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl+C: stop without waiting for the connections
            elif not self.should_exit:  # once, though a launcher (timeout, a shell) may pass the signal on again
                print("stopping: interrupting the running request, answering waiting ones 503", flush=True)
                self.should_exit = True
            self.worker.stop()

    return Server(config, worker)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint to serve first (default: the embedded model)")
    p.add_argument("--config", default=None, help="original-style YAML for an original-format --ckpt")
    p.add_argument("--models-dir", default=None,
                   help="a folder of checkpoints (.safetensors, .ckpt, diffusers folders) clients may switch to")
    p.add_argument("--lora-dir", default=None, help="the folder where <lora:NAME:WEIGHT> in a prompt finds NAME")
    p.add_argument("--embeddings-dir", default=None, help="a folder of textual-inversion embeddings")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--listen", action="store_true", help="listen on all addresses (0.0.0.0), as A1111's --listen")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS", help="require HTTP Basic auth (A1111's flag)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: bf16 autocast on CUDA, bf16 denoiser weights on CPUs with native bf16 for large "
                        "models, fp32 elsewhere")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS, help="attention implementation")
    p.add_argument("--queue-size", type=int, default=8, help="most requests waiting (the running one not counted)")
    # The limits' defaults are ldm.server.jobs.Limits', filled in after parsing (that module loads torch);
    # tests/test_startup.py checks these help texts against them.
    p.add_argument("--max-pixels", type=int, default=None, help="most width x height of one image (default: 4194304)")
    p.add_argument("--max-steps", type=int, default=None, help="most sampling steps per request (default: 150)")
    p.add_argument("--max-images", type=int, default=None, help="most batch_size x n_iter per request (default: 16)")
    p.add_argument("--native-scale-limit", type=float, default=None,
                   help="sizes past this many times the model's native size are sampled at the native size and "
                        "upscaled (0: never) (default: 4.0)")
    p.add_argument("--outdir", default="outputs/server", help="where requests with save_images: true are written")
    args = p.parse_args()
    # torch, the model stack and the web server load only now: --help and bad flags answer without them
    import uvicorn

    from ldm.denoisers.attention import set_attention_backend
    from ldm.server.app import create_app
    from ldm.server.jobs import Limits
    from ldm.server.models import Models
    from ldm.server.worker import Worker

    for name in ("max_pixels", "max_steps", "max_images", "native_scale_limit"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(Limits, name))
    for name in ("queue_size", "max_pixels", "max_steps", "max_images"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be from 0 to 65535, got {args.port}")
    auth = parse_auth(args.api_auth)
    host = "0.0.0.0" if args.listen else args.host
    sock = bind(host, args.port)  # before the model loads: a busy port fails at once
    device = pick_device(args.device)
    set_attention_backend(args.attention)
    models = Models(ckpt=args.ckpt, config=args.config, models_dir=args.models_dir, lora_dir=args.lora_dir,
                    embeddings_dir=args.embeddings_dir, device=device, precision=args.precision)
    models.load()
    print(f"model: {models.current.title} on {device}", flush=True)
    worker = Worker(args.queue_size)
    limits = Limits(args.max_pixels, args.max_steps, args.max_images, args.native_scale_limit)
    app = create_app(models, worker, limits, precision=args.precision, outdir=Path(args.outdir), auth=auth,
                     flags=command_line_flags(args, port=sock.getsockname()[1]))
    if not is_loopback(host) and auth is None:
        print(f"warning: listening on {host} with no --api-auth: anyone on the network can use this server",
              file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    server = make_server(config, worker)
    shown = sock.getsockname()
    url_host = "127.0.0.1" if host == "0.0.0.0" else host
    print(f"Running on http://{url_host}:{shown[1]} (API: /sdapi/v1, schema: /docs); Ctrl+C stops", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        worker.join()
    print("stopped", flush=True)


if __name__ == "__main__":
    run_cli(main)
