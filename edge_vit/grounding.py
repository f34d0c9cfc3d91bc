"""Turn one frame's Detections into short text that grounds the VLM's prompt.

This is LLaVA's "symbolic scene representation" idea: the detector's output is
written as plain text in front of the user's instruction, so a small VLM can
count and locate objects it would otherwise miss. The text looks like::

    Detected objects: 2 person, 1 car.
    - person #3 at top-left
    - car at bottom-right
    - and 1 more not listed

With ``size_words`` each line also says how big the box is ("- small car at
bottom-right"), so questions that pick an object out by its size ("the small
car") can be answered from the text.

With ``question_counts`` a second line counts what the instruction asks about:
the objects in all, and each class phrase the instruction names ("How many red
cars?" -> "Counts: 3 in all, red car: 1."), zero included for a class of the
model that is not in the frame. A count over several classes ("red" covers red
car and red bus) is then read off the text instead of summed by the model.

What it guarantees: ``count_tokens(grounding) <= config.max_tokens`` for any
input (hundreds of boxes, hundreds of classes, any unicode in class names),
measured with the ``count_tokens`` given to :func:`ground`. Only whole lines
that fit are written; when even the shortest header does not fit, the text is
cut by characters until it does. The guarantee is only as good as that
counter: the default :func:`approx_token_count` over-estimates BPE tokenizers
rather than counting exactly, so pass the model's tokenizer when the budget
must be exact. A counter that counts more than ``max_tokens`` for the empty
string cannot be satisfied; the grounding is then empty.

What it knows nothing about: images, models, tokenizers, chat templates, the
image tokens the VLM adds. Everything here is a pure, deterministic function of
its arguments.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from dataclasses import dataclass, fields
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from edge_vit.types import Detections, GroundedPrompt

__all__ = [
    "PositionStyle",
    "ObjectOrder",
    "GroundingConfig",
    "approx_token_count",
    "sanitize_name",
    "describe_position",
    "describe_size",
    "question_relevance",
    "question_counts",
    "plural",
    "SIZE_WORDS",
    "ground",
    "counts_signature",
]

# Longer class names are cut: one absurd name must not eat the whole budget.
MAX_NAME_CHARS = 40
_GRID_WORDS = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
SIZE_WORDS = ("small", "medium", "large")
_DIGITS = "0123456789"
_PUNCTUATION = string.punctuation
# Last-resort headers carry no number, so cutting them by characters cannot produce a wrong count.
_LAST_RESORT_SOME = "Objects detected."
_LAST_RESORT_NONE = "No objects."


class PositionStyle(str, Enum):
    """How each listed object's place in the frame is written."""

    WORDS = "words"  # 3x3 grid cell of the box centre: "top-left" ... "bottom-right"
    BOXES = "boxes"  # normalized [x1, y1, x2, y2], 2 decimals (LLaVA style)
    NONE = "none"  # class (and tracker id) only


class ObjectOrder(str, Enum):
    """Which objects are listed first when the budget is tight (ties: lower index first)."""

    CONFIDENCE = "confidence"
    AREA = "area"  # visible area, i.e. the box clipped to the frame
    # The objects the instruction names first (more of their line's words named: class words, grid position,
    # size word), then by confidence. A question about "the square at bottom" gets that square's line first,
    # and kept when the budget cuts the list; a small language model then reads its answer off the first line
    # instead of having to pick the one line among several that matches (see the README's demo section).
    QUESTION = "question"


@dataclass(frozen=True)
class GroundingConfig:
    """Options of :func:`ground`.

    ``max_tokens`` budgets the grounding text only, not the user's instruction.
    ``include_confidence`` is off by default: published ablations found that
    confidence numbers in the prompt add noise rather than help.
    ``size_words`` (off by default) are two thresholds on a box's longer side
    over the frame's shorter side: below the first the object is "small",
    below the second "medium", else "large". What counts as small depends on
    the scene, so there is no default; the shapes demo uses the shapes world's.
    ``question_counts`` (off by default) adds the counts line of :func:`question_counts`
    after the header, when it fits the budget.
    """

    positions: PositionStyle = PositionStyle.WORDS
    max_tokens: int = 96
    max_objects: int | None = None
    order: ObjectOrder = ObjectOrder.CONFIDENCE
    include_confidence: bool = False
    header: str = "Detected objects"
    size_words: tuple[float, float] | None = None
    question_counts: bool = False

    def __post_init__(self) -> None:
        # Enum(value) accepts members and their string values, rejects anything else.
        object.__setattr__(self, "positions", PositionStyle(self.positions))
        object.__setattr__(self, "order", ObjectOrder(self.order))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)):
            raise ValueError(f"GroundingConfig: max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 8:
            raise ValueError(f"GroundingConfig: max_tokens must be >= 8, got {self.max_tokens}")
        if self.max_objects is not None:
            if isinstance(self.max_objects, bool) or not isinstance(self.max_objects, (int, np.integer)):
                raise ValueError(f"GroundingConfig: max_objects must be an int or None, got {self.max_objects!r}")
            if self.max_objects < 0:
                raise ValueError(f"GroundingConfig: max_objects must be >= 0, got {self.max_objects}")
        if not sanitize_name(self.header):
            raise ValueError("GroundingConfig: header must contain visible text")
        if self.size_words is not None:
            try:
                small, medium = (float(v) for v in self.size_words)
            except (TypeError, ValueError):
                raise ValueError(f"GroundingConfig: size_words must be two numbers, got {self.size_words!r}") from None
            if not 0.0 < small < medium <= 1.0:
                raise ValueError(f"GroundingConfig: size_words must satisfy 0 < small < medium <= 1, "
                                 f"got {self.size_words!r}")
            object.__setattr__(self, "size_words", (small, medium))
        if not isinstance(self.question_counts, (bool, np.bool_)):
            raise ValueError(f"GroundingConfig: question_counts must be a bool, got {self.question_counts!r}")
        object.__setattr__(self, "question_counts", bool(self.question_counts))

    def as_json(self) -> dict:
        """The settings as plain JSON values (enums by value), for manifests, reports and start events."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value
        return out


def approx_token_count(text: str) -> int:
    """A cheap, deterministic over-estimate of a BPE tokenizer's count for ``text``.

    Letters and spaces count 1 token per 3 characters (BPE averages about 4 on
    English); digits and ASCII punctuation count 1 each, since Llama/Qwen-style
    tokenizers split numbers into digits and "[0.12, 0.34]" is mostly
    punctuation; other characters count 1 per UTF-8 byte, the most a byte-level
    BPE can spend on them.
    """
    if not text:
        return 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    non_ascii_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    digits = sum(text.count(d) for d in _DIGITS)
    punct = sum(text.count(p) for p in _PUNCTUATION)
    letters = ascii_chars - digits - punct
    return math.ceil(letters / 3) + digits + punct + non_ascii_bytes


def sanitize_name(name: str) -> str:
    """One-line, printable form of a class name: whitespace runs become one space, control characters go.

    Names longer than ``MAX_NAME_CHARS`` are cut and end in "...".
    """
    chars = []
    for ch in str(name):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs"):  # control characters (newlines, escapes) and lone surrogates
            chars.append(" ")
        elif cat != "Cf":  # format characters (bidi overrides, zero-width) are invisible; drop them
            chars.append(ch)
    out = " ".join("".join(chars).split())
    if len(out) > MAX_NAME_CHARS:
        out = out[: MAX_NAME_CHARS - 3].rstrip() + "..."
    return out


def describe_position(xyxy: Sequence[float], image_size: tuple[int, int], style: PositionStyle) -> str:
    """Where a box is in a frame of ``image_size`` (height, width): a grid word, a normalized box, or "".

    Boxes may be inverted, degenerate or out of frame: corners are sorted and
    clipped to the frame; non-finite coordinates count as the frame's edge
    (NaN as 0). Grid cells are [0, 1/3), [1/3, 2/3), [2/3, 1] of each axis.
    """
    style = PositionStyle(style)
    if style is PositionStyle.NONE:
        return ""
    h, w = image_size
    x1, y1, x2, y2 = _clip_boxes(np.asarray(xyxy), h, w)[0].tolist()
    if style is PositionStyle.BOXES:
        # "+ 0.0" turns -0.0 into 0.0, which would print as "-0.00".
        return "[" + ", ".join(f"{v + 0.0:.2f}" for v in (x1 / w, y1 / h, x2 / w, y2 / h)) + "]"
    # Compare 3 * centre with the frame size rather than centre / size with 1/3: exact at the boundaries.
    cx3, cy3 = 1.5 * (x1 + x2), 1.5 * (y1 + y2)
    col = 0 if cx3 < w else 1 if cx3 < 2 * w else 2
    row = 0 if cy3 < h else 1 if cy3 < 2 * h else 2
    return _GRID_WORDS[row][col]


def describe_size(xyxy: Sequence[float], image_size: tuple[int, int], thresholds: tuple[float, float]) -> str:
    """"small" / "medium" / "large": the box's longer side over the frame's shorter side, against ``thresholds``.

    The box is clipped to the frame first (as in :func:`describe_position`), so
    a box hanging off the edge is sized by what is visible.
    """
    h, w = image_size
    x1, y1, x2, y2 = _clip_boxes(np.asarray(xyxy), h, w)[0].tolist()
    side = max(x2 - x1, y2 - y1) / max(min(h, w), 1)
    return SIZE_WORDS[0] if side < thresholds[0] else SIZE_WORDS[1] if side < thresholds[1] else SIZE_WORDS[2]


def counts_signature(detections: Detections) -> tuple[tuple[str, int], ...]:
    """Sorted (class name, count) pairs: changes exactly when the set of classes or their counts does."""
    return tuple(sorted(detections.counts().items()))


def ground(
    detections: Detections,
    instruction: str,
    config: GroundingConfig = GroundingConfig(),
    count_tokens: Callable[[str], int] = approx_token_count,
) -> GroundedPrompt:
    """Write ``detections`` as text within ``config.max_tokens`` and put it before ``instruction``.

    The first line counts objects per class (most frequent first, then by
    name). One line per object follows, in ``config.order``: the first k of
    that order, for the largest k whose text fits. A last line says how many
    objects were left out, when some were listed and some were not. The budget
    is measured with ``count_tokens``, called O(log k) times; if that counter
    is not monotone (a longer text counting fewer tokens), fewer objects than
    would fit may be listed, but the budget still holds.
    """
    n = len(detections)
    display = _display_names(detections)
    candidates = _ordered_indices(detections, config, instruction, display)
    has_lines = len(candidates) > 0
    header = _choose_header(display, n, has_lines, config, count_tokens)
    header_fits = count_tokens(header) <= config.max_tokens
    if header_fits and config.question_counts:  # the counts line only beside a header that fits, and only whole
        with_counts = header + "\n" + _counts_line(n, question_counts(detections, instruction, display))
        if count_tokens(with_counts) <= config.max_tokens:
            header = with_counts

    mentioned: tuple[int, ...] = ()
    if header_fits:
        lines: list[str] = []  # built lazily: a small budget needs only the first few

        def listing(k: int) -> str:
            while len(lines) < k:
                i = candidates[len(lines)]
                lines.append(_object_line(detections, i, display[i], config))
            left_out = n - k
            summary = f"\n- and {left_out} more not listed" if k and left_out else ""
            return "\n".join([header, *lines[:k]]) + summary

        k = _largest_fitting(lambda k: count_tokens(listing(k)) <= config.max_tokens, len(candidates))
        grounding, mentioned = listing(k), tuple(candidates[:k])
    else:
        grounding = _cut_to_fit(header, config.max_tokens, count_tokens)

    text = grounding + "\n" + instruction if instruction else grounding
    return GroundedPrompt(
        text=text,
        instruction=instruction,
        grounding=grounding,
        mentioned=mentioned,
        counts=detections.counts(),
        tokens=count_tokens(grounding),
    )


def _clip_boxes(xyxy: np.ndarray, h: int, w: int) -> np.ndarray:
    """[N, 4] pixel boxes with corners sorted and clipped to the frame; NaN becomes 0, infinities the edges."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    xs = np.clip(np.nan_to_num(b[:, [0, 2]], nan=0.0, posinf=w, neginf=0.0), 0, w)
    ys = np.clip(np.nan_to_num(b[:, [1, 3]], nan=0.0, posinf=h, neginf=0.0), 0, h)
    xs.sort(axis=1)
    ys.sort(axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # [N, 4]


def _display_names(detections: Detections) -> list[str]:
    """Sanitized class name per object; an empty name becomes "class <id>"."""
    cache: dict[int, str] = {}
    out = []
    for cid, raw in zip(detections.class_id.tolist(), detections.class_names):
        if cid not in cache:
            cache[cid] = sanitize_name(raw) or f"class {cid}"
        out.append(cache[cid])
    return out


def _ordered_indices(detections: Detections, config: GroundingConfig, instruction: str,
                     display: Sequence[str]) -> list[int]:
    """Indices in listing order, cut to ``max_objects``; NaN scores sort last."""
    n = len(detections)
    if config.order is ObjectOrder.AREA:
        boxes = _clip_boxes(detections.xyxy, *detections.image_size)
        score = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # in pixels, so equal boxes tie exactly
    else:
        score = detections.confidence.astype(np.float64)
    score = np.nan_to_num(score, nan=-np.inf)
    keys = [np.arange(n), -score]
    if config.order is ObjectOrder.QUESTION:
        keys.append(-question_relevance(detections, instruction, config, display))
    # lexsort: last key is primary; the index breaks ties so the order is total.
    order = np.lexsort(keys).tolist()
    return order if config.max_objects is None else order[: config.max_objects]


_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")

_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "foot": "feet", "tooth": "teeth", "goose": "geese", "knife": "knives", "leaf": "leaves",
              "sheep": "sheep", "fish": "fish", "deer": "deer", "scissors": "scissors", "skis": "skis",
              "glasses": "glasses", "series": "series", "species": "species"}


def plural(name: str) -> str:
    """English plural of a class name (its last word): circle → circles, person → people, bus → buses.

    The teacher writes its questions with it; :func:`question_relevance` matches a question's plurals with it.
    """
    head, _, last = name.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        word = _IRREGULAR[low]
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif len(low) > 1 and low.endswith("y") and low[-2] not in "aeiou":
        word = last[:-1] + "ies"
    elif not low[-1:].isalpha():
        word = last
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def question_relevance(detections: Detections, instruction: str, config: GroundingConfig,
                       display: Sequence[str] | None = None) -> np.ndarray:
    """[N] how many words of each object's grounding line the instruction names (ObjectOrder.QUESTION).

    An object's words are its class name's (each also as its :func:`plural`), its grid position ("top-left",
    with ``positions="words"``) and its size word (with ``size_words``). ``display``: the objects' class names
    as the grounding writes them (computed when not given). Pure string matching: it ranks lines, it answers
    nothing.
    """
    asked = set(_WORD.findall(instruction.lower()))
    out = np.zeros(len(detections), np.int64)
    if not asked:
        return out
    display = _display_names(detections) if display is None else display
    for i in range(len(detections)):
        named = 0
        for word in set(_WORD.findall(display[i].lower())):
            named += word in asked or plural(word) in asked
        if config.positions is PositionStyle.WORDS:
            named += describe_position(detections.xyxy[i], detections.image_size, PositionStyle.WORDS) in asked
        if config.size_words is not None:
            named += describe_size(detections.xyxy[i], detections.image_size, config.size_words) in asked
        out[i] = named
    return out


_GAP = re.compile(r"\s*")


def question_counts(detections: Detections, instruction: str,
                    display: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """(phrase, count) for each class phrase the instruction names, in the instruction's order.

    A phrase is a run of consecutive instruction words (no punctuation between them) that are words of the
    model's class names, ``detections.names`` (a word's :func:`plural` counts as the word): "red cars" ->
    "red car", "traffic lights" -> "traffic light", "purple objects" -> "purple". A run that no single class
    name has all the words of ("person car") counts word by word. The count is the number of detected objects
    whose class name has every word of the phrase, 0 for a class of the model not in the frame. Pure string
    matching over the detections: it counts boxes, it does not read the image.
    """
    names = [sanitize_name(v).lower() for v in detections.names.values()]
    display = _display_names(detections) if display is None else display
    object_words = [set(_WORD.findall(name.lower())) for name in display]
    class_words = [set(_WORD.findall(name)) for name in names] + object_words
    base: dict[str, str] = {}
    for words in class_words:
        for word in words:
            base.setdefault(word, word)
            base.setdefault(plural(word).lower(), word)

    runs: list[list[str]] = []
    end = None
    asked = instruction.lower()
    for match in _WORD.finditer(asked):
        word = base.get(match.group())
        joined = end is not None and _GAP.fullmatch(asked, end, match.start()) is not None
        if word is None:
            end = None
            continue
        if joined and runs:
            if word not in runs[-1]:
                runs[-1].append(word)
        else:
            runs.append([word])
        end = match.end()

    phrases: list[tuple[str, ...]] = []
    for run in runs:
        parts = [tuple(run)] if any(set(run) <= words for words in class_words) else [(w,) for w in run]
        phrases.extend(p for p in parts if p not in phrases)
    return [(" ".join(p), sum(set(p) <= words for words in object_words)) for p in phrases]


def _counts_line(n: int, counts: Sequence[tuple[str, int]]) -> str:
    return f"Counts: {n} in all" + "".join(f", {phrase}: {c}" for phrase, c in counts) + "."


def _object_line(detections: Detections, i: int, name: str, config: GroundingConfig) -> str:
    size = ("" if config.size_words is None else
            describe_size(detections.xyxy[i], detections.image_size, config.size_words) + " ")
    line = f"- {size}{name}"
    if detections.tracker_id is not None:
        line += f" #{int(detections.tracker_id[i])}"
    pos = describe_position(detections.xyxy[i], detections.image_size, config.positions)
    if pos:
        line += " at " + pos
    if config.include_confidence:
        line += f" ({float(detections.confidence[i]):.2f})"
    return line


def _plural(n: int, word: str, plural: str) -> str:
    return f"{n} {word if n == 1 else plural}"


def _choose_header(
    display: list[str], n: int, has_lines: bool, config: GroundingConfig, count_tokens: Callable[[str], int]
) -> str:
    """The richest counts line that fits; the last fallback is returned even if it does not fit.

    The full counts line may use the whole budget. A cut one gets at most half
    of it when objects are to be listed, so that the object lines (which also
    name classes) keep the other half.
    """
    head = sanitize_name(config.header)
    limit = config.max_tokens
    if n == 0:
        for text in (f"{head}: none.", _LAST_RESORT_NONE):
            if count_tokens(text) <= limit:
                return text
        return _LAST_RESORT_NONE

    per_class: dict[str, int] = {}
    for name in display:
        per_class[name] = per_class.get(name, 0) + 1
    entries = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{c} {name}" for name, c in entries]

    full = f"{head}: {', '.join(shown)}."
    if count_tokens(full) <= limit:
        return full

    cut_limit = limit // 2 if has_lines else limit
    totals = np.cumsum([c for _, c in entries]).tolist()  # objects in the first m classes: totals[m - 1]

    def cut_line(m: int) -> str:
        more_classes = _plural(len(entries) - m, "more class", "more classes")
        more_objects = _plural(n - totals[m - 1], "object", "objects")
        return f"{head}: {', '.join(shown[:m])}, and {more_classes} ({more_objects})."

    m = _largest_fitting(lambda m: count_tokens(cut_line(m)) <= cut_limit, len(entries) - 1)
    if m:
        return cut_line(m)

    objects = _plural(n, "object", "objects")
    fallbacks = [f"{head}: {objects}.", f"{objects}.", _LAST_RESORT_SOME]
    if len(entries) > 1:
        fallbacks.insert(0, f"{head}: {objects} of {len(entries)} classes.")
    for text in fallbacks:
        if count_tokens(text) <= limit:
            return text
    return _LAST_RESORT_SOME


def _largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """Largest k in [0, upper] with ``fits(k)``, taking ``fits(0)`` as true; O(log k) calls.

    Gallops (1, 3, 7, ...) then bisects, so a small budget costs a few calls
    whatever ``upper`` is. Every k returned was checked (or is 0), so the result
    fits even when ``fits`` is not monotone; it may then not be the largest.
    """
    lo, hi, step = 0, upper + 1, 1  # fits(lo) holds; hi is out of range or known not to fit
    while lo + step < hi:
        if not fits(lo + step):
            hi = lo + step
            break
        lo, step = lo + step, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _cut_to_fit(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """Drop characters from the end until ``text`` fits; each pass shortens it, so the loop ends."""
    while text:
        tokens = count_tokens(text)
        if tokens <= max_tokens:
            break
        keep = min(len(text) - 1, len(text) * max_tokens // max(tokens, 1))
        text = text[:keep].rstrip()
    return text
