"""How fast this machine's memory reads: what bounds decode speed, which reads every active weight once per token.

    bandwidth = memory_bandwidth(platform, device_kind, count, data_dir)   # a Bandwidth (bytes/s or unknown)
    tokens_per_s = bandwidth.bytes_per_s / config.decode_bytes(context)    # the most decode can reach

On a CPU it is measured: every core takes the maximum of its part of a 256 MB array, the best of repeats
over ~0.3 s (close to what `bench/bandwidth.py` measures with jax, and what our kernels stream at), then
kept in DATA/bandwidth.json for this machine (CPU model, cores, RAM), so a later setup asks no time. On a
GPU or TPU it is the device's spec-sheet figure, times the devices (a mesh reads its shards in parallel),
or unknown for a device not listed here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chat_app import paths

MEASURED_BYTES = 256 << 20  # larger than any CPU's last-level cache
MEASURE_SECONDS = 0.3
# Spec-sheet HBM bandwidth (bytes/s) by a part of jax's device_kind; the first that matches wins.
DEVICE_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12),
    ("L40S", 0.86e12), ("L4", 0.3e12), ("A10", 0.6e12), ("RTX 4090", 1.0e12), ("RTX 3090", 0.94e12),
    ("TPU v6 lite", 1.64e12), ("TPU v5 lite", 0.82e12), ("TPU v5", 2.76e12), ("TPU v4", 1.2e12),
)


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float | None  # None: unknown
    source: str  # in words: "measured", "spec sheet", or why it is unknown

    def describe(self) -> str:
        if self.bytes_per_s is None:
            return f"memory speed unknown ({self.source})"
        rate = f"{self.bytes_per_s / 1e12:.2f} TB/s" if self.bytes_per_s >= 1e12 else f"{self.bytes_per_s / 1e9:.1f} GB/s"
        return f"reads memory at {rate} ({self.source})"

    def tokens_per_s(self, bytes_per_token: int) -> float | None:
        return None if self.bytes_per_s is None else self.bytes_per_s / bytes_per_token


def memory_bandwidth(platform_name: str, device_kind: str, count: int, data_dir: Path) -> Bandwidth:
    """The read bandwidth the model's devices have together: measured (and cached) on CPU, else the spec."""
    if platform_name == "cpu":  # simulated CPU devices share one memory
        return Bandwidth(cpu_bandwidth(data_dir), "measured")
    per_device = next((rate for part, rate in DEVICE_BANDWIDTH if part in device_kind), None)
    if per_device is None:
        return Bandwidth(None, f"no figure for {device_kind}")
    return Bandwidth(per_device * count, "spec sheet" + (f", {count} devices" if count > 1 else ""))


def cpu_bandwidth(data_dir: Path, measure=None) -> float:
    """Bytes/s this CPU reads: DATA/bandwidth.json's figure when it was measured on this machine, else
    `measure()` (default: `measure_read_bandwidth`), saved there. A data dir that cannot be written only
    means measuring again next time."""
    path, machine = paths.bandwidth_path(data_dir), _machine()
    try:
        saved = json.loads(path.read_text())
        if saved["machine"] == machine and float(saved["bytes_per_s"]) > 0:
            return float(saved["bytes_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    bytes_per_s = (measure or measure_read_bandwidth)()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"machine": machine, "bytes_per_s": bytes_per_s,
                                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        partial.replace(path)
    except OSError:
        pass
    return bytes_per_s


def measure_read_bandwidth(nbytes: int = MEASURED_BYTES, seconds: float = MEASURE_SECONDS) -> float:
    """Bytes/s of the fastest of repeated parallel reads of `nbytes` (each core reduces its own part;
    numpy releases the GIL in the reduction) during about `seconds`."""
    threads = os.cpu_count() or 1
    data = np.ones(nbytes // 4, np.float32)  # written once: every page is mapped before timing
    parts = np.array_split(data, threads)
    best, started = float("inf"), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        while True:
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
            if start - started > seconds:
                break
    return data.nbytes / best


def _machine() -> str:
    """What the measured figure belongs to: CPU model, cores, RAM (a changed machine measures again)."""
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return f"{model_name}, {os.cpu_count()} cores, {ram} bytes of RAM"
