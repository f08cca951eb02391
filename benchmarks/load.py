"""Load test against the real server: throughput, latency and status counts under concurrency.

    python -m benchmarks.load [--levels 1,8,32,128] [--seconds 10] [--soak-seconds 600]

Starts `onnx-explain serve` as a subprocess over a fresh copy of the default model, drives it
with a small asyncio load generator (raw keep-alive HTTP/1.1 on uvloop), and prints per
scenario (predict, gradcam, occlusion) and concurrency level: requests/s, p50 and p99 latency,
and counts by status. Then it measures the engine's own batched Grad-CAM throughput in this
process at batch sizes 1 to 32 and prints the ratio of the server's Grad-CAM throughput at
concurrency 32 to the best of them (target >= 0.8). With --soak-seconds it runs Grad-CAM at
concurrency 32 for that long and prints the server's resident memory over time (target: flat
within 10%). Requirements checked: no 5xx but 503/504, every request answered.

    python -m benchmarks.load --big-jobs-seconds 8

measures instead the latency of short requests (predict and Grad-CAM, p50/p95, one client
each) alone and while big jobs (occlusion and SmoothGrad, one client each) run beside them, on a
server whose batch work has one thread and on one with the default batch threads (issue 17).
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import cv2
import httpx2
import numpy as np
import uvloop

from benchmarks.common import default_model_folder
from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.pipeline import seeds_for
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from service.settings import Settings

MODEL = "efficientnet-lite0"
Outcome = TypeVar("Outcome")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its child processes (uvicorn's workers)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(OSError):
            total += rss_mib(int(child))
    return total


def scenarios(image_b64: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "predict": (f"/v1/models/{MODEL}/predict", {"image": image_b64, "top_k": 5}),
        "gradcam": (
            f"/v1/models/{MODEL}/explain",
            {"image": image_b64, "method": "gradcam", "output": {"format": "png"}},
        ),
        "occlusion": (
            f"/v1/models/{MODEL}/explain",
            {
                "image": image_b64,
                "method": "occlusion",
                "params": {"window": 32, "stride": 32},
                "output": {"format": "png", "size": "model"},
            },
        ),
        "big-occlusion": (
            f"/v1/models/{MODEL}/explain",
            {
                "image": image_b64,
                "method": "occlusion",
                "params": {"window": 32, "stride": 16},
                "output": {"format": "png", "size": "model"},
            },
        ),
        "smoothgrad": (
            f"/v1/models/{MODEL}/explain",
            {
                "image": image_b64,
                "method": "smoothgrad",
                "params": {"samples": 25},
                "output": {"format": "png", "size": "model"},
            },
        ),
    }


SHORT = ("predict", "gradcam")
BIG = ("big-occlusion", "smoothgrad")


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "no answers"
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    return f"p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  n={len(latencies)}"


async def short_and_big(
    port: int, all_scenarios: dict[str, tuple[str, dict[str, Any]]], seconds: float, big: bool
) -> dict[str, tuple[int, collections.Counter[str], list[float], float]]:
    """One client per short scenario, and (with `big`) one per big job, all at once."""
    names = [*SHORT, *(BIG if big else ())]
    outcomes = await asyncio.gather(
        *(drive(port, *all_scenarios[name], 1, seconds) for name in names)
    )
    return dict(zip(names, outcomes, strict=True))


def short_latency_under_big_jobs(root: Path, image_b64: str, threads: int, seconds: float) -> int:
    """Short requests' latency alone and beside big jobs, with one batch thread and with the
    default batch threads; returns the count of bad answers."""
    default_batch = Settings(workers=1).batch_threads_per_session
    all_scenarios = scenarios(image_b64)
    bad = 0
    print(
        f"short requests beside big jobs ({', '.join(BIG)}), {threads} thread(s) for short "
        f"requests, one client per scenario, {seconds:g} s per cell"
    )
    for batch_threads in dict.fromkeys((1, default_batch)):
        port = free_port()
        server = start_server(
            root / "models", root / "cache", port, threads, batch_threads=batch_threads
        )
        try:
            for name in (*SHORT, *BIG):  # graphs built before anything is timed
                run(drive(port, *all_scenarios[name], 1, 0.1))
            for big in (False, True):
                cells = run(short_and_big(port, all_scenarios, seconds if big else 2.0, big))
                label = "beside big jobs" if big else "alone"
                for name, (sent, statuses, latencies, elapsed) in cells.items():
                    bad += sent - sum(statuses.values())
                    bad += sum(n for status, n in statuses.items() if status != "200")
                    if name in SHORT:
                        print(
                            f"  batch threads {batch_threads}, {label:<15} {name:<9} "
                            f"{percentiles(latencies)}"
                        )
                    else:
                        print(
                            f"  batch threads {batch_threads}, {label:<15} {name:<13} "
                            f"{len(latencies) / elapsed:.2f} jobs/s  {percentiles(latencies)}"
                        )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return bad


class Connection:
    """A minimal keep-alive HTTP/1.1 client for one worker: the request bytes are built once.

    httpx costs the load generator a millisecond or more of CPU per request, and here it
    shares the machine with the server, so the generator is kept as light as it can be.
    """

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines if line)
            }
            await reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return int(status_line.split(" ", 2)[1])
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.streams is not None:
            _, writer = self.streams
            self.streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def build_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(content)}\r\n\r\n"
    )
    return head.encode() + content


async def drive(
    port: int, path: str, body: dict[str, Any], concurrency: int, seconds: float
) -> tuple[int, collections.Counter[str], list[float], float]:
    """Closed-loop load: `concurrency` workers send requests back to back for `seconds`."""
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    sent = 0
    request = build_request("127.0.0.1", port, path, body)
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal sent
        connection = Connection("127.0.0.1", port, request)
        try:
            while time.monotonic() < stop:
                sent += 1
                started = time.monotonic()
                try:
                    status = await asyncio.wait_for(connection.send(), timeout=120)
                    statuses[str(status)] += 1
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    statuses[type(exc).__name__] += 1
                latencies.append(time.monotonic() - started)
        finally:
            await connection.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return sent, statuses, latencies, elapsed


def run(coroutine: Coroutine[Any, Any, Outcome]) -> Outcome:
    """asyncio.run on uvloop: the load generator's own event loop costs less CPU."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def start_server(
    repository: Path,
    cache: Path,
    port: int,
    threads: int,
    workers: int = 1,
    batch_threads: int = 0,
) -> subprocess.Popen[bytes]:
    """`batch_threads`: of the sessions running long jobs (0: the service's default)."""
    env = {
        **os.environ,
        "ONNX_EXPLAIN_MODEL_REPOSITORY": str(repository),
        "ONNX_EXPLAIN_CACHE_DIR": str(cache),
        "ONNX_EXPLAIN_PROVIDERS": "cpu",
        "ONNX_EXPLAIN_INTRA_OP_THREADS": str(threads),
        "ONNX_EXPLAIN_WORKERS": str(workers),
        "ONNX_EXPLAIN_LOG_LEVEL": "warning",
        "ONNX_EXPLAIN_MAX_IN_FLIGHT": "256",
        "ONNX_EXPLAIN_MAX_QUEUE": "256",
        "ONNX_EXPLAIN_BATCH_INTRA_OP_THREADS": str(batch_threads),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


ENGINE_BATCHES = (1, 2, 4, 8, 16, 32)


def engine_gradcam_throughput(
    folder: Path, cache: Path, threads: int, image: np.ndarray
) -> dict[int, float]:
    """Grad-CAM images per second when the engine runs batches directly, per batch size
    (median over about 100 images each). The server is compared with the best of them."""
    model = LoadedModel(
        MODEL, folder, RuntimeOptions(providers="cpu", intra_op_threads=threads), cache
    )
    tensor = preprocess([image], model.config.input)
    key = GraphKey(model.default_layer, wrt_input=False, guided=False, top_k_seeds=False)
    throughput = {}
    for size in ENGINE_BATCHES:
        batch = np.repeat(tensor, size, axis=0)
        seeds = seeds_for([281] * size, model.num_classes)
        model.gradients.run(key, model.input_name, batch, seeds=seeds)
        rates = []
        for _ in range(max(8, 96 // size)):
            started = time.monotonic()
            model.gradients.run(key, model.input_name, batch, seeds=seeds)
            rates.append(size / (time.monotonic() - started))
        throughput[size] = statistics.median(rates)
    return throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="per server session (0: the service's default)"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--soak-seconds", type=float, default=0.0)
    parser.add_argument("--scenarios", default="predict,gradcam,occlusion")
    parser.add_argument(
        "--big-jobs-seconds",
        type=float,
        default=0.0,
        help="measure only short requests beside big jobs, this long per cell",
    )
    args = parser.parse_args()
    args.threads = args.threads or Settings(workers=args.workers).threads_per_session
    levels = [int(level) for level in args.levels.split(",")]

    import skimage.data

    image: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
    # A JPEG, as cameras and browsers send; the body is serialised once, not per request,
    # so the load generator spends its CPU on sending rather than on encoding.
    encoded, jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert encoded
    image_b64 = base64.b64encode(jpeg.tobytes()).decode()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = default_model_folder(root / "models")
        if args.big_jobs_seconds > 0:
            bad = short_latency_under_big_jobs(root, image_b64, args.threads, args.big_jobs_seconds)
            print(f"non-200 answers or unanswered requests: {bad}")
            return
        port = free_port()
        server = start_server(root / "models", root / "cache", port, args.threads, args.workers)
        throughput: dict[tuple[str, int], float] = {}
        bad = 0
        try:
            print(
                f"server pid {server.pid}, {args.workers} worker(s) x {args.threads} onnxruntime "
                f"thread(s), {args.seconds:g} s per cell"
            )
            header = f"{'scenario':<10}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  statuses"
            print(header)
            all_scenarios = scenarios(image_b64)
            for name in args.scenarios.split(","):
                path, body = all_scenarios[name]
                run(drive(port, path, body, 2, 2.0))  # warm-up, graphs built
                for level in levels:
                    sent, statuses, latencies, elapsed = run(
                        drive(port, path, body, level, args.seconds)
                    )
                    answered = sum(statuses.values())
                    ok = statuses.get("200", 0)
                    bad += sum(
                        count
                        for status, count in statuses.items()
                        if not status.isdigit()
                        or (status.startswith("5") and status not in ("503", "504"))
                    )
                    bad += sent - answered
                    throughput[(name, level)] = ok / elapsed
                    p50 = statistics.median(latencies) * 1000
                    p99 = float(np.percentile(latencies, 99)) * 1000
                    print(
                        f"{name:<10}{level:>5}{ok / elapsed:>9.1f}{p50:>9.1f}{p99:>9.1f}  "
                        f"{dict(sorted(statuses.items()))} sent={sent}"
                    )
            if args.soak_seconds > 0:
                path, body = all_scenarios["gradcam"]
                print(f"soak: gradcam at concurrency 32 for {args.soak_seconds:g} s")
                samples = []
                chunk = 30.0
                elapsed_total = 0.0
                while elapsed_total < args.soak_seconds:
                    sent, statuses, _, elapsed = run(drive(port, path, body, 32, chunk))
                    elapsed_total += elapsed
                    samples.append(rss_mib(server.pid))
                    bad += sent - sum(statuses.values())
                    print(
                        f"  t={elapsed_total:6.0f} s  rss={samples[-1]:.0f} MiB  {dict(statuses)}"
                    )
                settled = samples[1:] or samples
                spread = (max(settled) - min(settled)) / min(settled)
                print(f"soak RSS spread after the first sample: {spread:.1%} (target <= 10%)")
        finally:
            server.terminate()
            server.wait(timeout=30)
        if ("gradcam", 32) in throughput:
            # The engine gets every thread the server's sessions have between them.
            engine_threads = args.threads * args.workers
            by_batch = engine_gradcam_throughput(folder, root / "cache", engine_threads, image)
            best = max(by_batch, key=lambda size: by_batch[size])
            rates = ", ".join(f"{size}: {rate:.1f}" for size, rate in by_batch.items())
            print(f"engine batched gradcam, {engine_threads} thread(s), img/s by batch: {rates}")
            served = throughput[("gradcam", 32)]
            print(
                f"server at 32: {served:.1f} req/s; engine's best: {by_batch[best]:.1f} img/s "
                f"(batch {best}); ratio {served / by_batch[best]:.2f} (target >= 0.8)"
            )
        print(f"5xx other than 503/504, transport errors or unanswered requests: {bad}")


if __name__ == "__main__":
    main()
