"""Measurement helpers: percentile summaries, a peak-memory monitor, and a description of the machine.

``summarize`` turns samples (ms) into n/mean/min/p50/p90/p99/max. ``ResourceMonitor`` samples the process's
resident memory on a thread while a case runs (peak RSS), reads ``torch.cuda.max_memory_allocated`` on CUDA and
records ``tegrastats`` on a Jetson. ``machine_info`` names the CPU, cores, RAM, OS and library versions.
Nothing here knows about models or scenarios.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import os
import platform
import re
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
_VERSIONED = ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "ultralytics", "optimum", "optimum-onnx",
              "onnx", "numpy", "opencv-python", "tensorrt")


def summarize(values: list[float]) -> dict:
    """n, mean, min, p50, p90, p99, max of ``values`` (linear-interpolated percentiles); {"n": 0} when empty."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    p = np.percentile(arr, PERCENTILES)
    return {"n": int(arr.size), "mean": _r(arr.mean()), "min": _r(arr.min()),
            "p50": _r(p[0]), "p90": _r(p[1]), "p99": _r(p[2]), "max": _r(arr.max())}


def _r(x: float) -> float:
    return round(float(x), 3)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next case's peak RSS starts low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class ResourceMonitor:
    """Peak resident memory of this process while in use (sampled every ``interval_s``), CUDA peak allocation
    when ``cuda`` is set, and tegrastats samples on a Jetson when ``tegrastats`` is set."""

    def __init__(self, interval_s: float = 0.02, cuda: bool = False, tegrastats: bool = False) -> None:
        self.interval_s = interval_s
        self.cuda = cuda
        self.tegrastats = tegrastats
        self.rss_before_mb = 0.0
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tegra = None

    def __enter__(self) -> "ResourceMonitor":
        import psutil

        release_memory()
        self._process = psutil.Process()
        self.rss_before_mb = self.peak_rss_mb = self._process.memory_info().rss / 2**20
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self.tegrastats:
            from benchmarks.tegrastats import TegrastatsMonitor

            self._tegra = TegrastatsMonitor().start()
        self._thread = threading.Thread(target=self._sample, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)
        self.result = self._result()

    def _result(self) -> dict:
        out = {"rss_before_mb": round(self.rss_before_mb, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
               "peak_rss_delta_mb": round(self.peak_rss_mb - self.rss_before_mb, 1)}
        if self.cuda:
            import torch

            out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self._tegra is not None:
            from benchmarks.tegrastats import summarize as tegra_summary

            out["tegrastats"] = tegra_summary(self._tegra.stop())
        return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, RAM, OS, Python and library versions, date, load average, GPU / Jetson where present."""
    import psutil

    from export.trt import is_jetson

    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "jetson": is_jetson(),
        "device": device,
    }
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_slug(info: dict) -> str:
    """A short folder-safe name for the machine: ``intel-xeon-processor-2c``."""
    cpu = re.sub(r"\((r|tm)\)", "", info.get("cpu", "cpu").lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")[:40].strip("-")
    name = f"{cpu}-{info.get('cores_logical')}c"
    if info.get("gpu"):
        name += "-" + re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")[:30]
    return name


class Stopwatch:
    """``with Stopwatch() as sw: ...``; then ``sw.ms``."""

    def __enter__(self) -> "Stopwatch":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms = (time.perf_counter() - self.t0) * 1000
