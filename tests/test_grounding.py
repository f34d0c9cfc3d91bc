"""Tests of edge_vit.grounding: tables of cases for the format, properties for the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_vit.grounding import (
    MAX_NAME_CHARS,
    GroundingConfig,
    ObjectOrder,
    PositionStyle,
    approx_token_count,
    counts_signature,
    describe_position,
    describe_size,
    ground,
    question_counts,
    question_relevance,
    sanitize_name,
)
from edge_vit.types import Detections, GroundedPrompt

NAMES = {0: "person", 1: "car", 2: "dog"}
# Property tests: no deadline (first calls are slower), no example database written into the tree,
# and big generated inputs (500 boxes) are intended.
PROPERTY = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def dets(boxes, conf, cls, names=NAMES, size=(600, 300), tid=None) -> Detections:
    return Detections(
        xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        confidence=np.asarray(conf, dtype=np.float32),
        class_id=np.asarray(cls, dtype=np.int64),
        names=names,
        image_size=size,
        tracker_id=None if tid is None else np.asarray(tid),
    )


def around(cx: float, cy: float, r: float = 1.0) -> list[float]:
    return [cx - r, cy - r, cx + r, cy + r]


# --- describe_position -------------------------------------------------------------------------

# Frame is 600 high, 300 wide: thirds at x = 100, 200 and y = 200, 400.
SIZE = (600, 300)


@pytest.mark.parametrize(
    "box, expected",
    [
        (around(50, 100), "top-left"),
        (around(150, 100), "top"),
        (around(250, 100), "top-right"),
        (around(50, 300), "left"),
        (around(150, 300), "center"),
        (around(250, 300), "right"),
        (around(50, 500), "bottom-left"),
        (around(150, 500), "bottom"),
        (around(250, 500), "bottom-right"),
        # Cells are [0, 1/3), [1/3, 2/3), [2/3, 1]: a centre on a boundary belongs to the next cell.
        (around(100, 300), "center"),
        (around(99.5, 300), "left"),
        (around(200, 300), "right"),
        (around(199.5, 300), "center"),
        (around(150, 200), "center"),
        (around(150, 199.5), "top"),
        (around(150, 400), "bottom"),
        ([0, 0, 300, 600], "center"),  # the whole frame
        ([0, 0, 0, 0], "top-left"),  # degenerate point at the origin
        ([300, 600, 300, 600], "bottom-right"),  # degenerate point at the far corner
        ([-500, -500, -10, -10], "top-left"),  # wholly outside: clipped to the corner
        ([290, 590, 5000, 5000], "bottom-right"),
        ([250, 500, 50, 100], "center"),  # inverted corners are sorted
        ([float("nan")] * 4, "top-left"),
        ([float("-inf"), 0, float("inf"), 600], "center"),
    ],
)
def test_position_words(box, expected):
    assert describe_position(box, SIZE, PositionStyle.WORDS) == expected


@pytest.mark.parametrize(
    "box, expected",
    [
        ([30, 60, 150, 300], "[0.10, 0.10, 0.50, 0.50]"),
        ([0, 0, 300, 600], "[0.00, 0.00, 1.00, 1.00]"),
        ([100, 200, 200, 400], "[0.33, 0.33, 0.67, 0.67]"),
        ([-30, -60, 600, 1200], "[0.00, 0.00, 1.00, 1.00]"),  # clipped to the frame
        ([150, 300, 30, 60], "[0.10, 0.10, 0.50, 0.50]"),  # inverted corners are sorted
        ([-0.0, -0.0, 0, 0], "[0.00, 0.00, 0.00, 0.00]"),  # never "-0.00"
        ([float("nan"), 0, float("inf"), 600], "[0.00, 0.00, 1.00, 1.00]"),
    ],
)
def test_position_boxes(box, expected):
    assert describe_position(box, SIZE, PositionStyle.BOXES) == expected


@pytest.mark.parametrize("box", [around(50, 100), [0, 0, 300, 600], [float("nan")] * 4])
def test_position_none(box):
    assert describe_position(box, SIZE, PositionStyle.NONE) == ""


def test_position_accepts_style_value():
    assert describe_position(around(50, 100), SIZE, "words") == "top-left"


# --- format ------------------------------------------------------------------------------------


def test_golden_example():
    d = dets(
        [around(50, 100), around(150, 300), around(250, 500)],
        [0.9, 0.8, 0.7],
        [0, 0, 1],
        tid=[3, 4, 9],
    )
    p = ground(d, "What is happening?")
    assert p.grounding == (
        "Detected objects: 2 person, 1 car.\n"
        "- person #3 at top-left\n"
        "- person #4 at center\n"
        "- car #9 at bottom-right"
    )
    assert p.text == p.grounding + "\nWhat is happening?"
    assert p.instruction == "What is happening?"
    assert p.mentioned == (0, 1, 2)
    assert p.counts == {"car": 1, "person": 2}
    assert p.tokens == approx_token_count(p.grounding)


def test_empty_detections():
    p = ground(Detections.empty(NAMES, SIZE), "Anything?")
    assert p.grounding == "Detected objects: none."
    assert p.text == "Detected objects: none.\nAnything?"
    assert p.mentioned == ()
    assert p.counts == {}


def test_empty_instruction_gives_grounding_only():
    p = ground(dets([around(50, 100)], [0.5], [1]), "")
    assert p.text == p.grounding == "Detected objects: 1 car.\n- car at top-left"


def test_without_tracker_ids_no_hash():
    p = ground(dets([around(50, 100)], [0.5], [0]), "q")
    assert "#" not in p.grounding


def test_include_confidence():
    d = dets([around(50, 100), around(250, 500)], [0.874, 0.5], [0, 2])
    p = ground(d, "q", GroundingConfig(include_confidence=True))
    assert p.grounding.splitlines()[1:] == ["- person at top-left (0.87)", "- dog at bottom-right (0.50)"]
    assert "(0." not in ground(d, "q").grounding  # off by default


def test_boxes_and_none_styles():
    d = dets([[30, 60, 150, 300]], [0.5], [1], tid=[7])
    assert ground(d, "q", GroundingConfig(positions=PositionStyle.BOXES)).grounding.splitlines()[1] == (
        "- car #7 at [0.10, 0.10, 0.50, 0.50]"
    )
    assert ground(d, "q", GroundingConfig(positions=PositionStyle.NONE)).grounding.splitlines()[1] == "- car #7"


def test_counts_line_sorted_by_count_then_name():
    d = dets([around(50, 100)] * 6, [0.5] * 6, [2, 1, 0, 1, 2, 2])
    first = ground(d, "q").grounding.splitlines()[0]
    assert first == "Detected objects: 3 dog, 2 car, 1 person."


@pytest.mark.parametrize(
    "order, expected",
    [
        (ObjectOrder.CONFIDENCE, (2, 0, 3, 1)),  # 0 and 3 tie on confidence: lower index first
        (ObjectOrder.AREA, (0, 3, 1, 2)),  # 0 and 3 tie on area, as do 1 and 2
    ],
)
def test_order(order, expected):
    boxes = [around(50, 50, 10), around(50, 50, 5), around(150, 300, 5), around(50, 50, 10)]
    d = dets(boxes, [0.8, 0.1, 0.9, 0.8], [0] * 4)
    assert ground(d, "q", GroundingConfig(order=order)).mentioned == expected


def test_order_area_differs_from_confidence():
    boxes = [
        around(150, 300, 5),  # small, most confident
        [-1000, -1000, 8, 8],  # huge box, but only 8x8 of it is in the frame: smallest visible area
        around(150, 300, 50),  # largest visible area
        around(50, 100, 20),
        around(250, 500, 20),  # ties with 3: lower index first
    ]
    d = dets(boxes, [0.99, 0.5, 0.1, 0.2, 0.3], [0] * 5)
    assert ground(d, "q", GroundingConfig(order=ObjectOrder.CONFIDENCE)).mentioned == (0, 1, 4, 3, 2)
    assert ground(d, "q", GroundingConfig(order=ObjectOrder.AREA)).mentioned == (2, 3, 4, 0, 1)


COLOUR_NAMES = {0: "red square", 1: "yellow square", 2: "green star", 3: "box"}


@pytest.mark.parametrize(
    "instruction, expected",
    [
        # nothing named: confidence order
        ("Describe the scene.", (2, 0, 1, 3)),
        # class word: both squares first (by confidence), the rest after
        ("How many squares are there?", (0, 1, 2, 3)),
        # class word and grid position: the square at bottom before the other square
        ("What colour is the square at bottom?", (1, 0, 2, 3)),
        # colour and class: 2 words for the red square, 1 for the yellow one
        ("Where is the red square?", (0, 1, 2, 3)),
        # plural "-es" and capitals
        ("Any BOXES here?", (3, 2, 0, 1)),
        # a position word alone
        ("What is at the top-left?", (0, 2, 1, 3)),
    ],
)
def test_order_question(instruction, expected):
    boxes = [around(50, 100), around(150, 500), around(250, 300), around(250, 100)]
    d = dets(boxes, [0.8, 0.7, 0.9, 0.1], [0, 1, 2, 3], names=COLOUR_NAMES)
    assert ground(d, instruction, GroundingConfig(order=ObjectOrder.QUESTION)).mentioned == expected
    # the other orders ignore the instruction
    assert ground(d, instruction, GroundingConfig()).mentioned == (2, 0, 1, 3)


def test_order_question_keeps_the_named_object_under_a_tight_budget():
    boxes = [around(50, 100)] * 6 + [around(150, 500)]
    d = dets(boxes, [0.9] * 6 + [0.1], [0] * 6 + [2], names=COLOUR_NAMES)
    tight = GroundingConfig(max_tokens=40, order=ObjectOrder.QUESTION)
    p = ground(d, "Is there a star?", tight)
    assert 0 < len(p.mentioned) < 7 and p.mentioned[0] == 6
    assert "- green star at bottom" in p.grounding.splitlines()
    assert 6 not in ground(d, "Is there a star?", GroundingConfig(max_tokens=40)).mentioned


def test_question_relevance_matches_plurals_irregular_ones_too():
    d = dets([around(50, 100), around(150, 500), around(250, 300)], [0.5] * 3, [0, 1, 2])  # person, car, dog
    assert question_relevance(d, "How many people are near the cars?", GroundingConfig()).tolist() == [1, 1, 0]
    assert question_relevance(d, "Is the dog at right?", GroundingConfig()).tolist() == [0, 0, 2]  # dog box centre: right


def test_question_relevance_counts_size_words_only_when_written():
    d = dets([[0, 0, 20, 20], [0, 0, 290, 590]], [0.5, 0.5], [2, 2], names=COLOUR_NAMES)
    sizes = GroundingConfig(size_words=(0.145, 0.25))
    assert question_relevance(d, "the small star", sizes).tolist() == [2, 1]
    assert question_relevance(d, "the small star", GroundingConfig()).tolist() == [1, 1]
    assert question_relevance(d, "", sizes).tolist() == [0, 0]
    # with positions as boxes there are no position words to match
    boxes = GroundingConfig(positions=PositionStyle.BOXES)
    assert question_relevance(d, "the star at top-left", boxes).tolist() == [1, 1]
    assert question_relevance(d, "the star at top-left", GroundingConfig()).tolist() == [2, 1]


SHAPE_NAMES = {0: "red circle", 1: "purple square", 2: "purple triangle", 3: "green square", 4: "red square",
               5: "traffic light", 6: "person", 7: "green hexagon"}


@pytest.mark.parametrize(
    "instruction, expected",
    [
        # a colour alone sums over the classes that have it
        ("How many purple objects are there?", [("purple", 2)]),
        # colour and shape together: only the class with both (a red circle and a green square do not count)
        ("Is there a red square?", [("red square", 0)]),
        # a class of the model that is not in the frame counts 0
        ("How many green hexagons?", [("green hexagon", 0)]),
        # nothing named: no phrase (the total is on the line anyway)
        ("How many objects are there in total?", []),
        # two phrases, irregular plural, multi-word class name
        ("How many traffic lights and people?", [("traffic light", 1), ("person", 2)]),
        ("How many lights?", [("light", 1)]),
        ("Are there more circles than squares?", [("circle", 1), ("square", 2)]),
        # punctuation ends a phrase; a run no class has all of counts word by word; repeats once
        ("Count the red, green squares", [("red", 1), ("green square", 1)]),
        ("Is there a person circle?", [("person", 2), ("circle", 1)]),
        ("Squares? SQUARES!", [("square", 2)]),
        # words that are not class words (and no instruction)
        ("Describe the scene.", []),
        ("", []),
    ],
)
def test_question_counts(instruction, expected):
    objects = [0, 1, 2, 3, 5, 6, 6]  # red circle, purple square, purple triangle, green square, light, 2 people
    d = dets([around(10 * i + 5, 10) for i in range(len(objects))], [0.9 - 0.1 * i for i in range(len(objects))],
             objects, names=SHAPE_NAMES)
    assert question_counts(d, instruction) == expected


def test_counts_line_after_the_header_only_when_asked_for():
    d = dets([around(50, 100), around(150, 500), around(250, 300)], [0.9, 0.8, 0.7], [1, 2, 0], names=SHAPE_NAMES)
    q = "How many purple objects are there?"
    on = ground(d, q, GroundingConfig(question_counts=True, max_tokens=200))
    lines = on.grounding.splitlines()
    assert lines[1] == "Counts: 3 in all, purple: 2."
    assert lines[2:] == ground(d, q, GroundingConfig(max_tokens=200)).grounding.splitlines()[1:]
    assert "Counts" not in ground(d, q, GroundingConfig(max_tokens=200)).grounding
    none = ground(dets([], [], [], names=SHAPE_NAMES), "Any red squares?", GroundingConfig(question_counts=True))
    assert none.grounding == "Detected objects: none.\nCounts: 0 in all, red square: 0."
    # the line is dropped, not cut, when it does not fit beside the header
    tight = GroundingConfig(question_counts=True, max_tokens=30)
    assert ground(d, q, tight).grounding.splitlines()[0].startswith("Detected objects")
    assert "Counts" not in ground(d, q, tight).grounding
    assert approx_token_count(ground(d, q, tight).grounding) <= 30


def test_confidence_ties_broken_by_index_and_nan_last():
    d = dets([around(50, 100)] * 4, [0.5, float("nan"), 0.5, 0.9], [0] * 4)
    assert ground(d, "q").mentioned == (3, 0, 2, 1)


@pytest.mark.parametrize(
    "max_objects, lines, summary",
    [(0, 0, None), (1, 1, 3), (3, 3, 1), (4, 4, None), (10, 4, None)],  # max_objects=0: counts line only
)
def test_max_objects(max_objects, lines, summary):
    d = dets([around(50, 100)] * 4, [0.1, 0.2, 0.3, 0.4], [0] * 4)
    p = ground(d, "q", GroundingConfig(max_objects=max_objects))
    out = p.grounding.splitlines()
    assert out[0] == "Detected objects: 4 person."
    assert p.mentioned == (3, 2, 1, 0)[:lines]
    if summary is None:
        assert len(out) == 1 + lines
    else:
        assert out[-1] == f"- and {summary} more not listed"
        assert len(out) == 2 + lines


def test_budget_leaves_room_for_summary():
    d = dets([around(50, 100)] * 50, np.linspace(1, 0, 50), [0] * 50)
    p = ground(d, "q", GroundingConfig(max_tokens=40))
    out = p.grounding.splitlines()
    assert 0 < len(p.mentioned) < 50
    assert out[-1] == f"- and {50 - len(p.mentioned)} more not listed"
    assert approx_token_count(p.grounding) <= 40


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("traffic\nlight", "traffic light"),
        ("  stop\t\tsign \r\n", "stop sign"),
        ("a\u2028b\u2029c\x85d", "a b c d"),  # unicode line and paragraph separators
        ("bad\x00\x1b[31mred", "bad [31mred"),  # control characters
        ("evil\u202eenil", "evilenil"),  # bidi override: invisible, dropped
        ("\ud800x", "x"),  # lone surrogate
        ("漢字 🙂", "漢字 🙂"),
        ("", ""),
        ("x" * 100, "x" * (MAX_NAME_CHARS - 3) + "..."),
    ],
)
def test_sanitize_name(raw, expected):
    assert sanitize_name(raw) == expected


def test_names_sanitized_in_prompt():
    names = {0: "traffic\nlight", 1: "", 2: "traffic light", 3: "- fake line\n- another"}
    d = dets([around(50, 100)] * 4, [0.9, 0.8, 0.7, 0.6], [0, 1, 2, 3], names=names)
    p = ground(d, "q")
    out = p.grounding.splitlines()
    # "traffic\nlight" and "traffic light" print the same, so they are counted together.
    assert out[0] == "Detected objects: 2 traffic light, 1 - fake line - another, 1 class 1."
    assert out[1:] == [
        "- traffic light at top-left",
        "- class 1 at top-left",
        "- traffic light at top-left",
        "- - fake line - another at top-left",
    ]
    assert p.counts == d.counts()  # raw names, as Detections reports them


def test_many_classes_truncate_counts_line():
    n = 300
    names = {i: f"thing{i:03d}" for i in range(n)}
    d = dets([around(150, 300)] * n, np.linspace(1, 0.01, n), np.arange(n), names=names)
    p = ground(d, "q", GroundingConfig(max_tokens=150))
    first = p.grounding.splitlines()[0]
    assert first.startswith("Detected objects: 1 thing000, 1 thing001")
    assert first.endswith(" objects).") and "more classes (" in first
    assert approx_token_count(first) <= 75  # a cut counts line keeps half the budget for object lines
    assert len(p.mentioned) > 0
    assert approx_token_count(p.grounding) <= 150


@pytest.mark.parametrize(
    "n, max_tokens, expected",
    [
        (250, 8, "250 objects."),
        (1, 8, "1 object."),
        (250, 15, "Detected objects: 250 objects."),
        (0, 8, "No objects."),
        (0, 9, "Detected objects: none."),
    ],
)
def test_shortest_forms(n, max_tokens, expected):
    # A long class name, so that the full counts line ("250 traffic light") does not fit either.
    d = dets([around(50, 100)] * n, [0.5] * n, [0] * n, names={0: "traffic light"})
    p = ground(d, "q", GroundingConfig(max_tokens=max_tokens))
    assert p.grounding == expected
    assert p.tokens <= max_tokens


def test_hard_cut_with_strict_counter():
    d = dets([around(50, 100)] * 5, [0.5] * 5, [0] * 5)
    p = ground(d, "q", GroundingConfig(max_tokens=8), count_tokens=len)  # one token per character
    assert len(p.grounding) <= 8 and "Objects detected.".startswith(p.grounding)
    assert p.mentioned == ()


def test_unsatisfiable_counter_gives_empty_grounding():
    p = ground(dets([around(50, 100)], [0.5], [0]), "q", count_tokens=lambda text: 1000)
    assert p.grounding == "" and p.text == "\nq"


def test_custom_header():
    p = ground(dets([around(50, 100)], [0.5], [0]), "q", GroundingConfig(header="Objects in view"))
    assert p.grounding.startswith("Objects in view: 1 person.")


def test_ground_does_not_mutate_input():
    d = dets([around(50, 100), around(250, 500)], [0.2, 0.9], [0, 1], tid=[1, 2])
    before = (d.xyxy.copy(), d.confidence.copy(), d.class_id.copy(), d.tracker_id.copy(), dict(d.names))
    ground(d, "q", GroundingConfig(order=ObjectOrder.AREA))
    assert all(np.array_equal(a, b) for a, b in zip(before[:4], (d.xyxy, d.confidence, d.class_id, d.tracker_id)))
    assert before[4] == d.names


# --- size words ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, expected",
    [
        ([0, 0, 29, 10], "small"),  # longer side 29 of the shorter frame side 300: 0.097 < 0.1
        ([0, 0, 10, 30], "medium"),  # exactly 0.1: not below the first threshold
        ([100, 100, 130, 189], "medium"),
        ([100, 100, 130, 190], "large"),  # 90 / 300 = 0.3
        ([-500, 0, 20, 20], "small"),  # clipped to the frame first: 20 px visible
        ([290, 0, 270, 20], "small"),  # inverted corners
    ],
)
def test_describe_size(box, expected):
    assert describe_size(box, SIZE, (0.1, 0.3)) == expected


def test_size_words_in_lines_not_in_counts():
    d = dets([[0, 0, 20, 20], [0, 300, 200, 500]], [0.9, 0.8], [0, 1], tid=[4, 7])
    p = ground(d, "Where is the small person?", GroundingConfig(size_words=(0.1, 0.3)))
    assert p.grounding.split("\n") == [
        "Detected objects: 1 car, 1 person.",
        "- small person #4 at top-left",
        "- large car #7 at bottom",
    ]
    plain = ground(d, "Where is the small person?", GroundingConfig())
    assert "small" not in plain.grounding and "large" not in plain.grounding  # off by default


def test_config_size_words_coerced_to_floats():
    c = GroundingConfig(size_words=("0.1", 1))
    assert c.size_words == (0.1, 1.0)


# --- config ------------------------------------------------------------------------------------


def test_config_defaults():
    c = GroundingConfig()
    assert (c.positions, c.max_tokens, c.max_objects, c.order, c.include_confidence, c.header) == (
        PositionStyle.WORDS,
        96,
        None,
        ObjectOrder.CONFIDENCE,
        False,
        "Detected objects",
    )


def test_config_coerces_enum_values():
    c = GroundingConfig(positions="boxes", order="area")
    assert c.positions is PositionStyle.BOXES and c.order is ObjectOrder.AREA


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 7},
        {"max_tokens": -1},
        {"max_tokens": 8.5},
        {"max_objects": -1},
        {"positions": "grid"},
        {"order": "size"},
        {"header": " \n "},
        {"size_words": (0.3, 0.1)},
        {"size_words": (0.0, 0.5)},
        {"size_words": (0.2, 1.5)},
        {"size_words": (0.2,)},
        {"size_words": "small"},
        {"question_counts": "yes"},
    ],
)
def test_config_rejects(kwargs):
    with pytest.raises(ValueError):
        GroundingConfig(**kwargs)


# --- approx_token_count and counts_signature ---------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0),
        ("abc", 1),
        ("abcd", 2),
        ("123", 3),  # one token per digit
        ("[0.12]", 6),  # one per digit and punctuation mark
        ("é", 2),  # one per UTF-8 byte outside ASCII
        ("🙂", 4),
        ("- person #3 at top-left", 11),  # 19 letters and spaces, 1 digit, 3 punctuation
    ],
)
def test_approx_token_count(text, expected):
    assert approx_token_count(text) == expected


@given(st.text(), st.text())
@settings(max_examples=100, **PROPERTY)
def test_approx_token_count_is_subadditive_and_monotone(a, b):
    # Appending never lowers the estimate, and the join costs at most one token of rounding.
    assert approx_token_count(a) <= approx_token_count(a + b) <= approx_token_count(a) + approx_token_count(b) + 1


def test_approx_token_count_survives_lone_surrogates():
    assert approx_token_count("\ud800") == 3


def test_counts_signature():
    a = dets([around(50, 100), around(150, 300), around(250, 500)], [0.9, 0.8, 0.7], [1, 0, 1])
    b = dets([around(250, 500), around(50, 100), around(150, 300)], [0.1, 0.2, 0.3], [0, 1, 1])
    c = dets([around(50, 100), around(150, 300)], [0.9, 0.8], [1, 0])
    assert counts_signature(a) == (("car", 2), ("person", 1))
    assert counts_signature(a) == counts_signature(b)  # boxes moved, same classes and counts
    assert counts_signature(a) != counts_signature(c)
    assert counts_signature(Detections.empty(NAMES, SIZE)) == ()


# --- properties --------------------------------------------------------------------------------

# Characters that stress sanitizing and counting: whitespace of every kind, controls, invisible
# format characters, combining marks, CJK, emoji with a zero-width joiner.
NAME_CHARS = list("abcXYZ _-#,.:()[]0123456789\n\t\r\x0b\x0c\x00\x1b\x85") + [
    "\u00a0", "\u2028", "\u2029", "\u200b", "\u200d", "\u202e", "\u0301", "é", "ß", "漢", "字", "🙂", "👩",
]


@st.composite
def detections_strategy(draw) -> Detections:
    n = draw(st.one_of(st.integers(0, 8), st.integers(0, 500)))
    h, w = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names_list = draw(st.lists(st.text(max_size=12), max_size=6))  # hypothesis' own unicode, "" included
    for _ in range(draw(st.sampled_from([0, 3, 40, 300]))):
        names_list.append("".join(rng.choice(NAME_CHARS, size=rng.integers(0, 16))))
    names = dict(enumerate(names_list))
    # A few ids beyond ``names``: Detections prints those as the id itself.
    class_id = rng.integers(0, len(names) + 3, n)
    corners = rng.uniform(-0.5, 1.5, (n, 4)) * np.array([w, h, w, h])
    kind = rng.integers(0, 4, n)
    corners[kind == 1, 2:] = corners[kind == 1, :2]  # degenerate: a point
    corners[kind == 2] = corners[kind == 2][:, [2, 3, 0, 1]]  # corners in any order
    conf = rng.uniform(0, 1, n)
    if draw(st.booleans()):
        conf = np.round(conf, 1)  # many ties
    tid = rng.integers(0, 10_000, n) if draw(st.booleans()) else None
    return Detections(corners, conf, class_id, names, (h, w), tracker_id=tid)


configs = st.builds(
    GroundingConfig,
    positions=st.sampled_from(PositionStyle),
    max_tokens=st.integers(8, 400),
    max_objects=st.one_of(st.none(), st.integers(0, 30)),
    order=st.sampled_from(ObjectOrder),
    include_confidence=st.booleans(),
    size_words=st.one_of(st.none(), st.just((0.1, 0.3)), st.just((0.5, 1.0))),
    question_counts=st.booleans(),
)
instructions = st.one_of(st.just(""), st.text(max_size=40))


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _expected_order(d: Detections, order: ObjectOrder, instruction: str = "", cfg: GroundingConfig | None = None
                    ) -> list[int]:
    # question: relevance (its word matching has its own table above) first, then confidence
    first = [0] * len(d)
    if order is ObjectOrder.QUESTION:
        first = [-int(r) for r in question_relevance(d, instruction, cfg)]
    if order in (ObjectOrder.CONFIDENCE, ObjectOrder.QUESTION):
        score = [float(c) for c in d.confidence]
    else:
        h, w = d.image_size
        score = []
        for b in d.xyxy:
            x1, x2 = sorted(np.clip(b[[0, 2]].astype(np.float64), 0, w))
            y1, y2 = sorted(np.clip(b[[1, 3]].astype(np.float64), 0, h))
            score.append(float((x2 - x1) * (y2 - y1)))
    score = [-math.inf if math.isnan(s) else s for s in score]
    return sorted(range(len(d)), key=lambda i: (first[i], -score[i], i))


def _display(d: Detections) -> list[str]:
    return [sanitize_name(name) or f"class {int(c)}" for name, c in zip(d.class_names, d.class_id)]


def _expected_line(d: Detections, i: int, name: str, cfg: GroundingConfig) -> str:
    line = "- " + name
    if cfg.size_words is not None:
        h, w = d.image_size
        x1, x2 = sorted(np.clip(d.xyxy[i][[0, 2]].astype(np.float64), 0, w))
        y1, y2 = sorted(np.clip(d.xyxy[i][[1, 3]].astype(np.float64), 0, h))
        side = max(x2 - x1, y2 - y1) / min(h, w)
        small, medium = cfg.size_words
        line = "- " + ("small" if side < small else "medium" if side < medium else "large") + " " + name
    if d.tracker_id is not None:
        line += f" #{int(d.tracker_id[i])}"
    if cfg.positions is not PositionStyle.NONE:
        line += " at " + describe_position(d.xyxy[i], d.image_size, cfg.positions)
    if cfg.include_confidence:
        line += f" ({float(d.confidence[i]):.2f})"
    return line


def _check_counts_line(line: str, d: Detections, display: list[str], cfg: GroundingConfig, allow_cut: bool) -> str:
    """The first line is one of the documented forms, and its numbers add up to len(d); returns which form."""
    n, head = len(d), cfg.header
    if n == 0:
        forms = [f"{head}: none.", "No objects."]
        assert line in forms or (allow_cut and "No objects.".startswith(line)), line
        return "none"
    per_class: dict[str, int] = {}
    for name in display:
        per_class[name] = per_class.get(name, 0) + 1
    entries = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{c} {name}" for name, c in entries]
    if line == f"{head}: {', '.join(shown)}.":  # not truncated: every object is counted
        assert sum(per_class.values()) == n
        return "full"
    for m in range(1, len(entries)):  # truncated: shown counts plus "(M objects)" add up to n
        rest = n - sum(c for _, c in entries[:m])
        more = f"{_plural(len(entries) - m, 'more class', 'more classes')} ({_plural(rest, 'object', 'objects')})"
        if line == f"{head}: {', '.join(shown[:m])}, and {more}.":
            return "cut"
    objects = _plural(n, "object", "objects")
    forms = [f"{head}: {objects} of {len(entries)} classes.", f"{head}: {objects}.", f"{objects}.", "Objects detected."]
    assert line in forms or (allow_cut and "Objects detected.".startswith(line)), line
    return "short"


def check_prompt(
    d: Detections, instruction: str, cfg: GroundingConfig, count, allow_cut: bool = False
) -> tuple[GroundedPrompt, str]:
    """Every property of a valid prompt; returns the prompt and the form of its counts line."""
    p = ground(d, instruction, cfg, count)
    assert ground(d, instruction, cfg, count) == p  # deterministic
    assert count(p.grounding) <= cfg.max_tokens  # the budget holds
    assert p.tokens == count(p.grounding)
    assert p.instruction == instruction and p.counts == d.counts()
    assert p.text == (p.grounding + "\n" + instruction if instruction else p.grounding)
    assert p.text.endswith(instruction)

    n, mentioned = len(d), p.mentioned
    assert len(set(mentioned)) == len(mentioned) and all(0 <= i < n for i in mentioned)
    limit = n if cfg.max_objects is None else min(n, cfg.max_objects)
    assert list(mentioned) == _expected_order(d, cfg.order, instruction, cfg)[: len(mentioned)] and len(mentioned) <= limit

    display = _display(d)
    lines = p.grounding.split("\n")
    form = _check_counts_line(lines[0], d, display, cfg, allow_cut)
    body = lines[1:]
    if cfg.question_counts and body and body[0].startswith("Counts: "):  # only right after the header, if at all
        counted = "".join(f", {phrase}: {c}" for phrase, c in question_counts(d, instruction))
        assert body[0] == f"Counts: {n} in all{counted}."
        body = body[1:]
    assert not any(line.startswith("Counts: ") for line in body)
    if mentioned and len(mentioned) < n:
        assert body[-1] == f"- and {n - len(mentioned)} more not listed"
        body = body[:-1]
    assert body == [_expected_line(d, i, display[i], cfg) for i in mentioned]  # one line per mentioned object, in order
    return p, form


@given(detections_strategy(), instructions, configs)
@settings(max_examples=100, **PROPERTY)
def test_property_valid_prompt(d, instruction, cfg):
    check_prompt(d, instruction, cfg, approx_token_count)


@given(detections_strategy(), configs)
@settings(max_examples=60, **PROPERTY)
def test_property_valid_with_word_counter(d, cfg):
    # A counter with very different proportions: one token per whitespace-separated word.
    check_prompt(d, "Describe the scene.", cfg, lambda text: len(text.split()))


@given(detections_strategy(), configs)
@settings(max_examples=60, **PROPERTY)
def test_property_valid_with_byte_counter(d, cfg):
    # One token per UTF-8 byte, plus a BOS token: the header may need cutting by characters.
    def count(text: str) -> int:
        return 1 + len(text.encode("utf-8", "surrogatepass"))

    check_prompt(d, "q", cfg, count, allow_cut=True)


@pytest.fixture(scope="module")
def bpe_count():
    """A real byte-level BPE, trained here on a few prompt-like lines (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["Detected objects: 2 person, 1 car.", "- person #3 at top-left", "- car at [0.12, 0.50, 0.33, 0.90]"]
    tok.train_from_iterator(corpus * 50, trainer=trainer)
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


@given(d=detections_strategy(), cfg=configs)
@settings(max_examples=40, **PROPERTY)
def test_property_valid_with_bpe_counter(bpe_count, d, cfg):
    check_prompt(d, "What is the person doing?", cfg, bpe_count)


@given(detections_strategy(), st.sampled_from(PositionStyle), st.booleans())
@settings(max_examples=25, **PROPERTY)
def test_property_everything_fits_a_large_budget(d, positions, with_conf):
    # With room to spare every object is listed and the counts line is complete.
    cfg = GroundingConfig(positions=positions, include_confidence=with_conf, max_tokens=1_000_000)
    p, form = check_prompt(d, "q", cfg, approx_token_count)
    assert form == ("full" if len(d) else "none")
    assert sorted(p.mentioned) == list(range(len(d)))
    assert p.grounding.count("\n") == len(d)  # no summary line
