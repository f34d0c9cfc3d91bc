"""argparse value types shared by every ``edge-vit`` subcommand: numbers checked at parse time.

A bad value becomes argparse's own one-line usage error (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable


def _checked(cast: Callable[[str], float], ok: Callable[[float], bool], rule: str):
    def parse(text: str):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in "invalid int value" messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, ">= 1")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
nonneg_float = _checked(float, lambda v: v >= 0, ">= 0")
fraction = _checked(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def int_in(lo: int, hi: int):
    return _checked(int, lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")
