"""2 MB pages for the memory a session allocates while it loads (Linux): the decoder's weights.

Decode streams every decoder weight once per token (SmolVLM-256M int8: 135 MB a token). On 4 KB pages
that is ~33,000 page translations a token, most of them TLB misses; ONNX Runtime allocates with plain
``malloc``, and with transparent huge pages in ``madvise`` mode (the usual default) that memory never gets
2 MB pages. ``new_memory_on_huge_pages`` notes the process's anonymous mappings before a session is created
and asks the kernel to rebuild what appeared meanwhile on 2 MB pages (``madvise(MADV_HUGEPAGE)`` for later
faults, ``madvise(MADV_COLLAPSE)`` for what is already there; Linux 6.1+). Measured on the int8
SmolVLM-256M decoder, 2 cores: +3 % decode tok/s (median of 17 paired runs), 0.04-0.5 s at load
(benchmarks/README.md).

Only memory mapped during the block is touched: what the session puts into memory the process already
had (freed earlier, reused by ``malloc``) stays on its pages. In a fresh process, and after a detector was
loaded first as ``edge-vit run`` does, 126-186 MB of the 256M int8 decoder's load was new.

It changes where bytes live, never their values, and it must never fail a load: anything the kernel
refuses (other OS, older kernel, THP set to ``never``, a range it cannot collapse) is counted and left
as it was. It must not touch file mappings or memory that existed before the session (Python's own heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman-common.h
MADV_COLLAPSE = 25  # Linux 6.1+: synchronous, independent of the THP "enabled" setting (except "never")
MAPS = "/proc/self/maps"


@dataclass
class HugePageReport:
    """What ``new_memory_on_huge_pages`` did: bytes collapsed onto 2 MB pages, ranges refused, time taken."""

    enabled: bool = True
    collapsed_bytes: int = 0
    refused: int = 0
    seconds: float = 0.0
    supported: bool = True  # False: not Linux, or /proc/self/maps or libc unavailable

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "collapsed_mb": round(self.collapsed_bytes / 2**20, 1),
                "refused": self.refused, "seconds": round(self.seconds, 3), "supported": self.supported}


def anonymous_ranges(maps_text: str) -> list[tuple[int, int]]:
    """Private writable anonymous mappings (and the brk heap) in ``/proc/<pid>/maps`` text, as [start, end)."""
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p":
            continue
        name = fields[5] if len(fields) > 5 else ""
        if name and name != "[heap]":  # files, stacks, vdso: not ours to touch
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        ranges.append((start, end))
    return ranges


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``after`` that no range of ``before`` covered (a grown heap contributes its new top)."""
    old = sorted(before)
    out = []
    for start, end in sorted(after):
        pieces = [(start, end)]
        for o_start, o_end in old:
            if o_start >= end:
                break
            kept = []
            for a, b in pieces:
                if o_end <= a or o_start >= b:
                    kept.append((a, b))
                    continue
                if a < o_start:
                    kept.append((a, o_start))
                if o_end < b:
                    kept.append((o_end, b))
            pieces = kept
        out.extend(pieces)
    return out


def huge_page_spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each range shrunk to whole 2 MB pages (only those can be collapsed); ranges under one page dropped."""
    spans = []
    for start, end in ranges:
        a = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        b = end & ~(HUGE_PAGE - 1)
        if b > a:
            spans.append((a, b))
    return spans


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _read_maps() -> str | None:
    try:
        # mapped files' names may be any bytes; only the addresses and permissions are read
        with open(MAPS, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def collapse(spans: list[tuple[int, int]], report: HugePageReport) -> None:
    """madvise each 2 MB-aligned span onto huge pages; what the kernel refuses is counted, never raised."""
    madvise = _libc_madvise()
    if madvise is None:
        report.supported = False
        return
    for start, end in spans:
        madvise(start, end - start, MADV_HUGEPAGE)  # later faults in the range: 2 MB pages too
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            report.collapsed_bytes += end - start
        else:
            report.refused += 1


@contextmanager
def new_memory_on_huge_pages(enabled: bool = True) -> Iterator[HugePageReport]:
    """Around a session's creation: what it allocated is put on 2 MB pages when the block ends."""
    report = HugePageReport(enabled=enabled)
    if not enabled:
        yield report
        return
    before = _read_maps()
    if before is None:
        report.supported = False
        yield report
        return
    yield report
    t0 = time.perf_counter()
    after = _read_maps()
    if after is None:
        report.supported = False
        return
    collapse(huge_page_spans(new_ranges(anonymous_ranges(before), anonymous_ranges(after))), report)
    report.seconds = time.perf_counter() - t0
