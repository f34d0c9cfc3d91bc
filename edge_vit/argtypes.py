"""argparse value types shared by every ``edge-vit`` subcommand (numbers checked at parse time), and the
grounding flags that ``run``, ``finetune data`` and ``finetune eval`` share, so the three write the same prompt.

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


def turn_range(text: str) -> tuple[int, int]:
    """"3,5": a minimum and maximum number of turns, 1 <= MIN <= MAX."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two whole numbers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {lo},{hi}")
    return lo, hi


def size_thresholds(text: str) -> tuple[float, float]:
    """"0.145,0.25": the two box-size thresholds of the grounding's size words (small below the first...)."""
    from edge_vit.grounding import GroundingConfig

    try:
        small, medium = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers SMALL,MEDIUM (e.g. 0.15,0.25), got {text!r}") from None
    try:  # GroundingConfig owns the bound
        return GroundingConfig(size_words=(small, medium)).size_words
    except ValueError:
        raise argparse.ArgumentTypeError(f"must satisfy 0 < SMALL < MEDIUM <= 1, got {text!r}") from None


def add_grounding_args(group, tokens_help: str = "token budget of the grounding text") -> None:
    """--positions, --grounding-tokens, --size-words, --grounding-order and --grounding-counts on ``group`` (a
    parser or an argument group)."""
    from edge_vit.grounding import ObjectOrder, PositionStyle

    group.add_argument("--positions", choices=[s.value for s in PositionStyle], default=PositionStyle.WORDS.value)
    group.add_argument("--grounding-tokens", type=positive_int, default=96, help=tokens_help)
    group.add_argument("--size-words", type=size_thresholds, default=None, metavar="SMALL,MEDIUM",
                       help="say each object's size: small when its box's longer side is below SMALL of the "
                            "frame's shorter side, medium below MEDIUM, else large (off by default; a model "
                            "tuned with them needs them at run time too)")
    group.add_argument("--grounding-order", choices=[o.value for o in ObjectOrder],
                       default=ObjectOrder.CONFIDENCE.value,
                       help="which objects are listed first: confidence (default), area, or question (those the "
                            "instruction names by class, position or size word first; a model tuned with it needs "
                            "it at run time too)")
    group.add_argument("--grounding-counts", action="store_true",
                       help="add a counts line for what the instruction asks about: the objects in all and each "
                            "class phrase it names ('How many red cars?' -> 'Counts: 3 in all, red car: 1.'); a "
                            "model tuned with it needs it at run time too")


def grounding_from_args(args: argparse.Namespace):
    """The GroundingConfig that :func:`add_grounding_args`' flags describe."""
    from edge_vit.grounding import GroundingConfig, ObjectOrder, PositionStyle

    return GroundingConfig(positions=PositionStyle(args.positions), max_tokens=args.grounding_tokens,
                           size_words=args.size_words,
                           order=ObjectOrder(args.grounding_order), question_counts=args.grounding_counts)
