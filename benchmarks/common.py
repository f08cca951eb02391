"""Helpers shared by the benchmark scripts: timing, peak memory, the default model."""

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from engines.models.zoo import build_model


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return interleaved_medians_ms({"run": run}, repeats, warmup)["run"]


def interleaved_medians_ms(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median latency of each case, timed round-robin so machine drift hits all alike."""
    for run in cases.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(times) for name, times in samples.items()}


def reset_peak_rss() -> None:
    """Linux: make VmHWM (peak resident memory) start again from the current RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def default_model_folder(repository: Path) -> Path:
    return build_model("efficientnet-lite0", repository)
