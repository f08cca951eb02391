"""For tests that start the service as a process of its own and talk to it over a socket."""

import socket
import subprocess
import time
from pathlib import Path

import httpx2 as httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_ready(
    base: str, process: "subprocess.Popen[bytes]", log: Path | None = None, seconds: float = 30
) -> None:
    """Poll `base`/readyz until it answers 200; fail (with the server's log) if it exits first."""
    deadline = time.monotonic() + seconds

    def output() -> str:
        return "" if log is None else "\n" + log.read_text()

    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"server exited:{output()}"
        assert time.monotonic() < deadline, f"server did not become ready:{output()}"
        time.sleep(0.1)
