"""Jetson ``tegrastats`` lines → typed samples, and a monitor that records them while a benchmark case runs.

Formats understood (one line per interval):

- JetPack 6 (L4T 36, Orin): an optional ``MM-DD-YYYY HH:MM:SS`` prefix, ``RAM 2791/7620MB (lfb 2x4MB)
  SWAP 0/3810MB (cached 0MB) CPU [8%@729,...] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] ... cpu@47.5C ...
  VDD_IN 4402mW/4402mW VDD_CPU_GPU_CV 641mW/641mW VDD_SOC 1442mW/1442mW``
- JetPack 5 (L4T 35, Orin / Xavier): the same fields, ``GR3D_FREQ 0%@[305,305]`` on AGX Orin, rails such as
  ``VDD_GPU_SOC 3174mW/3174mW VIN_SYS_5V0 2418mW/2418mW``, and disabled sensors at ``-256C``.
- JetPack 4 (L4T 32, Nano / TX2 / Xavier): ``GR3D_FREQ 9%`` or ``9%@921``, rails without units
  (``POM_5V_IN 3410/3410``), ``IRAM``, ``off`` CPU cores.

Power rails are "instant/average" in milliwatts. The board's input power is ``VDD_IN`` (Orin Nano/NX, Xavier
NX), ``POM_5V_IN`` (Nano, TX2) or, on AGX Orin, which has no input rail, the sum of its rails
(``total_power_source`` says which). Unknown fields are ignored, so a newer format degrades to fewer fields.
This module knows nothing about the benchmark; it parses text and runs one subprocess.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

_DATE = re.compile(r"^\s*\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%@(\d+)$")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_DISABLED_C = -256.0
# Rails that measure the whole board's input, best first.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class Rail:
    instant_mw: float
    average_mw: float


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line. Missing fields are None (or empty)."""

    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    swap_used_mb: float | None = None
    swap_total_mb: float | None = None
    cpu_load: tuple[float | None, ...] = ()  # percent per core; None for a core that is off
    cpu_mhz: tuple[float | None, ...] = ()
    emc_percent: float | None = None
    gpu_percent: float | None = None  # GR3D_FREQ: the integrated GPU's load
    gpu_mhz: float | None = None  # first GPC's clock when several are listed
    temperatures_c: dict[str, float] = field(default_factory=dict)  # enabled sensors only
    rails: dict[str, Rail] = field(default_factory=dict)

    @property
    def total_power_mw(self) -> float | None:
        """The board's input power: VDD_IN / POM_5V_IN, or the sum of all rails when there is no input rail."""
        for name in INPUT_RAILS:
            if name in self.rails:
                return self.rails[name].instant_mw
        return sum(r.instant_mw for r in self.rails.values()) if self.rails else None

    @property
    def total_power_source(self) -> str | None:
        for name in INPUT_RAILS:
            if name in self.rails:
                return name
        return "sum of rails" if self.rails else None


def parse_line(line: str) -> TegraSample | None:
    """Parse one tegrastats line; None when it carries none of the known fields (a blank or foreign line)."""
    text = _DATE.sub("", line.strip())
    if not text:
        return None
    values: dict = {}
    if m := _RAM.search(text):
        values["ram_used_mb"], values["ram_total_mb"] = float(m[1]), float(m[2])
    if m := _SWAP.search(text):
        values["swap_used_mb"], values["swap_total_mb"] = float(m[1]), float(m[2])
    if m := _CPU.search(text):
        loads, clocks = [], []
        for core in m[1].split(","):
            core = core.strip()
            cm = _CPU_CORE.match(core)
            loads.append(float(cm[1]) if cm else None)
            clocks.append(float(cm[2]) if cm else None)
        values["cpu_load"], values["cpu_mhz"] = tuple(loads), tuple(clocks)
    if m := _EMC.search(text):
        values["emc_percent"] = float(m[1])
    if m := _GR3D.search(text):
        values["gpu_percent"] = float(m[1])
        if m[2]:
            values["gpu_mhz"] = float(m[2].split(",")[0])
    # Temperatures: NAME@12.5C; the CPU list's "8%@729" never matches (a percent sign precedes the @).
    temps = {name: float(v) for name, v in _TEMP.findall(text) if float(v) != _DISABLED_C}
    if temps:
        values["temperatures_c"] = temps
    rails = {name: Rail(float(a), float(b)) for name, a, b in _RAIL.findall(text)
             if name not in ("RAM", "SWAP", "IRAM")}
    if rails:
        values["rails"] = rails
    return TegraSample(**values) if values else None


def parse_lines(lines) -> list[TegraSample]:
    return [s for s in (parse_line(line) for line in lines) if s is not None]


def summarize(samples: list[TegraSample]) -> dict:
    """Peak memory, mean/peak board power, mean GPU load and per-rail means over a run's samples."""
    if not samples:
        return {"samples": 0}
    out: dict = {"samples": len(samples)}
    ram = [s.ram_used_mb for s in samples if s.ram_used_mb is not None]
    if ram:
        out["ram_used_mb_peak"] = max(ram)
        out["ram_total_mb"] = next(s.ram_total_mb for s in samples if s.ram_total_mb is not None)
    swap = [s.swap_used_mb for s in samples if s.swap_used_mb is not None]
    if swap:
        out["swap_used_mb_peak"] = max(swap)
    power = [s.total_power_mw for s in samples if s.total_power_mw is not None]
    if power:
        out["power_mw_mean"] = sum(power) / len(power)
        out["power_mw_peak"] = max(power)
        out["power_source"] = next(s.total_power_source for s in samples if s.total_power_source)
    gpu = [s.gpu_percent for s in samples if s.gpu_percent is not None]
    if gpu:
        out["gpu_percent_mean"] = sum(gpu) / len(gpu)
    rails: dict[str, list[float]] = {}
    for s in samples:
        for name, rail in s.rails.items():
            rails.setdefault(name, []).append(rail.instant_mw)
    if rails:
        out["rails_mw_mean"] = {name: sum(v) / len(v) for name, v in rails.items()}
    return out


def available() -> bool:
    return shutil.which("tegrastats") is not None


class TegrastatsMonitor:
    """Runs ``tegrastats --interval MS`` while in use and keeps the parsed samples.

    ``command`` replaces the executable (tests pass a script that prints recorded lines).
    """

    def __init__(self, interval_ms: int = 100, command: list[str] | None = None) -> None:
        self.command = command or ["tegrastats", "--interval", str(interval_ms)]
        self.samples: list[TegraSample] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "TegrastatsMonitor":
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      bufsize=1)
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            sample = parse_line(line)
            if sample is not None:
                with self._lock:
                    self.samples.append(sample)

    def stop(self) -> list[TegraSample]:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        with self._lock:
            return list(self.samples)

    def __enter__(self) -> "TegrastatsMonitor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_samples(monitor: TegrastatsMonitor, n: int, timeout_s: float = 5.0) -> bool:
    """Block until the monitor holds ``n`` samples (tests), or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with monitor._lock:
            if len(monitor.samples) >= n:
                return True
        time.sleep(0.01)
    return False
