"""edge_vit.vlm.hugepages: which memory is put on 2 MB pages, and that the kernel really does it (Linux)."""

import ctypes
import mmap
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_vit.vlm import hugepages
from edge_vit.vlm.hugepages import HUGE_PAGE, anonymous_ranges, huge_page_spans, new_memory_on_huge_pages, new_ranges

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234   /usr/bin/python3.11
55d0c2000000-55d0c4000000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
7f0000800000-7f0000a00000 rw-p 00000000 08:01 99     /usr/lib/libonnxruntime.so
7f0000a00000-7f0000c00000 rw-s 00000000 00:05 7      /dev/zero (deleted)
7f0000c00000-7f0000e00000 r--p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_only_private_writable_anonymous_memory_and_the_heap_are_candidates():
    assert anonymous_ranges(MAPS) == [(0x55D0C2000000, 0x55D0C4000000), (0x7F0000000000, 0x7F0000800000)]


@pytest.mark.parametrize("before, after, expected", [
    ([], [(0, 10)], [(0, 10)]),  # a new mapping
    ([(0, 10)], [(0, 10)], []),  # nothing allocated
    ([(0, 10)], [(0, 25)], [(10, 25)]),  # the heap grew: only its new top
    ([(10, 20)], [(0, 30)], [(0, 10), (20, 30)]),  # new memory merged on both sides of an old range
    ([(0, 5), (8, 12)], [(0, 15)], [(5, 8), (12, 15)]),
    ([(0, 10), (20, 30)], [(0, 10), (40, 50)], [(40, 50)]),  # an old range gone, a new one elsewhere
])
def test_new_ranges_are_what_no_earlier_range_covered(before, after, expected):
    assert new_ranges(before, after) == expected


def test_spans_are_whole_aligned_huge_pages():
    h = HUGE_PAGE
    assert huge_page_spans([(1, 3 * h + 5)]) == [(h, 3 * h)]
    assert huge_page_spans([(h + 1, 2 * h + 1)]) == []  # no whole page inside
    assert huge_page_spans([(0, h), (4 * h, 6 * h)]) == [(0, h), (4 * h, 6 * h)]


def test_disabled_touches_nothing():
    with new_memory_on_huge_pages(False) as report:
        data = np.ones(16 * HUGE_PAGE // 8)
    assert not report.enabled and report.collapsed_bytes == 0 and report.refused == 0 and data.sum() > 0


def _kernel_can_collapse() -> str | None:
    """Why MADV_COLLAPSE cannot work on this machine, or None when it should."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    if (major, minor) < (6, 1):
        return f"kernel {platform.release()} has no MADV_COLLAPSE (6.1+)"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        return "transparent huge pages are off"
    return None


def _anon_huge_kb(start: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [start, end) in /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            lo, hi = int(head.group(1), 16), int(head.group(2), 16)
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_memory_mapped_inside_the_block_ends_on_huge_pages():
    reason = _kernel_can_collapse()
    if reason:
        pytest.skip(reason)
    # A private anonymous mapping made inside the block, as ONNX Runtime's large weight buffers are. (A numpy
    # array could land in memory the process already had, which is left alone by design.)
    size = 64 * 2**20
    with new_memory_on_huge_pages() as report:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        data = np.frombuffer(memory, dtype=np.float64)
        data[:] = 1.0  # touched: 4 KB pages now, as after a session's load
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    try:
        assert report.enabled and report.supported
        assert report.collapsed_bytes >= size - 2 * HUGE_PAGE, report  # all but the unaligned ends
        assert _anon_huge_kb(start, start + size) >= (size - 2 * HUGE_PAGE) // 1024
        assert float(data.sum()) == data.size  # values unchanged
    finally:
        del data
        memory.close()


def test_nothing_is_attempted_where_the_maps_cannot_be_read(monkeypatch):
    monkeypatch.setattr(hugepages, "_read_maps", lambda: None)
    with new_memory_on_huge_pages() as report:
        pass
    assert report.enabled and not report.supported and report.collapsed_bytes == 0


def test_mapped_file_names_in_any_encoding_do_not_stop_a_load(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    maps.write_bytes(MAPS.encode() + b"7f1000000000-7f1000200000 rw-p 00000000 08:01 5 /data/mod\xe8le.onnx\n")
    monkeypatch.setattr(hugepages, "MAPS", str(maps))
    assert anonymous_ranges(hugepages._read_maps()) == anonymous_ranges(MAPS)
