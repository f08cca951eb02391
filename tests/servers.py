"""For tests that start the service as a process of its own and talk to it over a socket."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_ready(
    base: str,
    process: "subprocess.Popen[bytes]",
    log: Path | None = None,
    seconds: float = 30,
    path: str = "/readyz",
) -> None:
    """Poll `base` + `path` until it answers 200; fail (with the log) if the server exits first."""
    deadline = time.monotonic() + seconds

    def output() -> str:
        return "" if log is None else "\n" + log.read_text()

    while True:
        try:
            if httpx2.get(f"{base}{path}", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        assert process.poll() is None, f"server exited:{output()}"
        assert time.monotonic() < deadline, f"server did not become ready:{output()}"
        time.sleep(0.1)


def start_service(
    repository: Path, port: int, log: Path, **settings: str
) -> "subprocess.Popen[bytes]":
    """`onnx-explain serve` over `repository` on the CPU (2 threads), its output in `log`.

    `settings` are more ONNX_EXPLAIN_* variables, by name without the prefix (e.g.
    CACHE_DIR="...").
    """
    env = {
        **os.environ,
        "ONNX_EXPLAIN_MODEL_REPOSITORY": str(repository),
        "ONNX_EXPLAIN_PROVIDERS": "cpu",
        "ONNX_EXPLAIN_INTRA_OP_THREADS": "2",
        "ONNX_EXPLAIN_LOG_LEVEL": "warning",
        **{f"ONNX_EXPLAIN_{name}": value for name, value in settings.items()},
    }
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def serving(repository: Path, log: Path, seconds: float = 30, **settings: str) -> Iterator[str]:
    """`start_service` on a free port, ready: its base URL; the process stops afterwards."""
    port = free_port()
    process = start_service(repository, port, log, **settings)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, process, log, seconds)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
