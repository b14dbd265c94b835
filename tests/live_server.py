"""A real `tools/serve.py` process on a free localhost port, for tests that talk HTTP to it."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from helpers import REPO


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)  # everything it printed, stdout and stderr together

    @property
    def api(self) -> str:
        return self.url + "/sdapi/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def text(self) -> str:
        return "".join(self.output)


@contextlib.contextmanager
def start_server(*args: str, timeout: float = 120) -> Iterator[LiveServer]:
    """`python tools/serve.py --port 0 ARGS`, ready to answer; stopped with SIGTERM (then killed) afterwards."""
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:  # keep reading so the pipe never fills up
        for line in process.stdout:
            output.append(line)
            found = re.search(r"Running on (http://\S+)", line)
            if found and not url:
                url.append(found.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1) and time.monotonic() < deadline:
        pass
    if not url:
        process.kill()
        raise RuntimeError("the server did not start:\n" + "".join(output))
    server = LiveServer(url[0], process, output)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
