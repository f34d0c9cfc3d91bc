"""LLaVA-style visual instruction data from a YOLO dataset: symbolic scenes, exact questions, the writer.

Each labelled image becomes a *symbolic scene* (class, position word and,
where the dataset has an attributes sidecar, colour and size of every box), as
in LLaVA. A teacher (``finetune.teachers``) turns the scene into samples of
three kinds: ``conversation`` (several short question/answer turns),
``detailed`` (one long description) and ``reasoning`` (one question that needs
a step of reasoning, answered with the reason). The first human turn carries
the grounding text exactly as the runtime builds it, by calling
:func:`edge_vit.grounding.ground` on the labels (confidence 1.0), so training
and inference see the same prompt.

Answers written here are exact with respect to the labels and short enough to
check by their first word (see :func:`answer_key`):

==========  =====================================  ===========================
kind        example question                       answer starts with
==========  =====================================  ===========================
count       How many circles are there?            the number as digits: "2 circles."
exists      Is there a red star?                   "Yes." / "No."
colour      What colour is the square?             the colour word: "Red."
position    Where is the blue circle?              a grid word: "Top-left."
size        What size is the star at top?          "Small." / "Medium." / "Large."
==========  =====================================  ===========================

:func:`scene_questions` is the function the shapes benchmark reuses.
What it knows nothing about: HTTP, models, tokenizers, how images look.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from edge_vit.grounding import (GroundingConfig, PositionStyle, approx_token_count, describe_position, ground, plural,
                                sanitize_name)
from edge_vit.types import Detections
from finetune.dataset import DataYaml, ImageRecord, dataset_hash, load_data_yaml, read_split
from finetune.shapes import COLOUR_NAMES, SHAPE_CLASSES, SIZES

__all__ = [
    "FORMAT_VERSION",
    "TEMPLATE_VERSION",
    "QUESTION_KINDS",
    "REASONING_KINDS",
    "SampleKind",
    "SceneObject",
    "Scene",
    "QA",
    "Teacher",
    "InstructConfig",
    "plural",
    "count_phrase",
    "scene_questions",
    "reasoning_questions",
    "describe_scene",
    "answer_key",
    "answer_matches",
    "scene_from_record",
    "build_instruct_data",
    "build_instruct_rendered",
]

FORMAT_VERSION = "llava-conversation-v1"
TEMPLATE_VERSION = "template-v1"
QUESTION_KINDS = ("count", "exists", "colour", "position", "size")
REASONING_KINDS = ("compare", "relation", "remove", "common_colour", "largest")
_POSITION_ORDER = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")


class SampleKind(str, Enum):
    """LLaVA's three kinds of instruction data."""

    CONVERSATION = "conversation"
    DETAILED = "detailed"
    REASONING = "reasoning"


@dataclass(frozen=True)
class SceneObject:
    """One object of a symbolic scene. ``box`` is normalized [x1, y1, x2, y2]; attributes may be unknown (None)."""

    name: str
    position: str
    colour: str | None = None
    size: str | None = None
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def from_shape(cls, obj: Mapping[str, Any], image_size: tuple[int, int]) -> "SceneObject":
        """From a shapes-world object dict (attributes sidecar or clip ground truth) in an image of (height, width)."""
        h, w = image_size
        x1, y1, x2, y2 = (float(v) for v in obj["xyxy"])
        return cls(
            name=str(obj["class"]),
            position=describe_position((x1, y1, x2, y2), image_size, PositionStyle.WORDS),
            colour=obj.get("colour"), size=obj.get("size"), box=(x1 / w, y1 / h, x2 / w, y2 / h),
        )


@dataclass(frozen=True)
class Scene:
    """One image as text-level facts: its objects, the same boxes as Detections, and scene attributes."""

    image: str  # path relative to the dataset root
    image_size: tuple[int, int]  # (height, width)
    objects: tuple[SceneObject, ...]
    detections: Detections
    classes: tuple[str, ...]  # every class name of the dataset, for questions about absent classes
    background: str | None = None


@dataclass(frozen=True)
class QA:
    """One question and its answer; ``kind`` is a QUESTION_KINDS/REASONING_KINDS name, or "" when free-form."""

    question: str
    answer: str
    kind: str = ""


class Teacher(Protocol):
    """Writes the question/answer turns of one sample; returns [] when it cannot (the sample is skipped)."""

    def info(self) -> dict: ...

    def write(self, scene: Scene, kind: SampleKind, rng: np.random.Generator) -> list[QA]: ...


# ---------------------------------------------------------------- words

def count_phrase(n: int, noun: str) -> str:
    """"1 circle", "0 circles", "3 red squares" (the noun may carry adjectives)."""
    return f"{n} {noun if n == 1 else plural(noun)}"


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _words(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------- referring to one object


def _refs(i: int, objects: Sequence[SceneObject], exclude: str) -> list[str]:
    """Phrases ("the red circle", "the circle at top-left", ...) that pick out only object ``i``.

    ``exclude`` names the attribute being asked about, which the phrase must not use.
    """
    o = objects[i]

    def unique(match: Callable[[SceneObject], bool]) -> bool:
        return sum(1 for p in objects if match(p)) == 1

    out = []
    if unique(lambda p: p.name == o.name):
        out.append(f"the {o.name}")
    if exclude != "colour" and o.colour and unique(lambda p: p.name == o.name and p.colour == o.colour):
        out.append(f"the {o.colour} {o.name}")
    if exclude != "position" and unique(lambda p: p.name == o.name and p.position == o.position):
        out.append(f"the {o.name} at {o.position}")
    if exclude != "size" and o.size and unique(lambda p: p.name == o.name and p.size == o.size):
        out.append(f"the {o.size} {o.name}")
    return list(dict.fromkeys(out))


def _pick(rng: np.random.Generator, items: Sequence, k: int) -> list:
    if not items:
        return []
    idx = rng.permutation(len(items))[:k]
    return [items[int(i)] for i in idx]


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------- questions with exact answers


def scene_questions(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    *,
    classes: Sequence[str] = SHAPE_CLASSES,
    colours: Sequence[str] = COLOUR_NAMES,
    per_kind: int = 2,
) -> list[tuple[str, str, str]]:
    """Up to ``per_kind`` (kind, question, answer) triples per kind of QUESTION_KINDS, shuffled.

    ``classes`` and ``colours`` are the vocabulary for questions about what is
    *not* there (defaults: the shapes world's). Colour and size questions are
    asked only where the objects carry those attributes; a colour count or
    colour existence question only when every object's colour is known.
    Answers are exact with respect to ``objects`` and start with the checkable
    word (see :func:`answer_key`). For a shapes-world benchmark::

        objects = [SceneObject.from_shape(o, (h, w)) for o in attributes["objects"]]
        for kind, question, answer in scene_questions(objects, np.random.default_rng(seed)):
            correct = answer_matches(kind, model_reply, answer)
    """
    objs = list(objects)
    present = sorted({o.name for o in objs})
    absent = [c for c in dict.fromkeys(classes) if c not in present]
    all_colours = bool(objs) and all(o.colour for o in objs)
    colour_vocab = list(dict.fromkeys([*colours, *(o.colour for o in objs if o.colour)]))
    out: list[tuple[str, str, str]] = []

    def balanced(pos: list, neg: list, k: int, p_pos: float) -> list:
        """Up to k targets, each present with probability ``p_pos`` while both kinds are left.

        Present targets run out first in sparse scenes (and empty scenes have
        none), so ``p_pos`` above 0.5 is what keeps yes/no near even.
        """
        pos, neg = _pick(rng, pos, k), _pick(rng, neg, k)
        chosen = []
        while len(chosen) < k and (pos or neg):
            first, second = (pos, neg) if rng.random() < p_pos else (neg, pos)
            chosen.append((first or second).pop())
        return chosen

    # count
    count_qs = []
    for name in balanced(present, absent, per_kind, 0.75):
        n = sum(o.name == name for o in objs)
        q = _choice(rng, ("How many {p} are there?", "How many {p} are in the image?", "Count the {p} in the image."))
        count_qs.append((q.format(p=plural(name)), f"{count_phrase(n, name)}."))
    count_qs.append((_choice(rng, ("How many objects are there in total?", "How many objects can you see?")),
                     f"{count_phrase(len(objs), 'object')}."))
    if all_colours:  # a colour that is there more often than not, so that zero is not the usual answer
        colour = _choice(rng, [o.colour for o in objs]) if rng.random() < 0.6 else _choice(rng, colour_vocab)
        n = sum(o.colour == colour for o in objs)
        count_qs.append((f"How many {colour} objects are there?", f"{count_phrase(n, colour + ' object')}."))
        name = _choice(rng, present)
        same_class = [o.colour for o in objs if o.name == name]
        colour = _choice(rng, same_class) if rng.random() < 0.6 else _choice(rng, colour_vocab)
        n = sum(o.colour == colour and o.name == name for o in objs)
        count_qs.append((f"How many {colour} {plural(name)} are there?", f"{count_phrase(n, colour + ' ' + name)}."))
    out += [("count", q, a) for q, a in _pick(rng, count_qs, per_kind)]

    # exists
    exist_qs = []
    for name in balanced(present, absent, per_kind, 0.7):
        yes = any(o.name == name for o in objs)
        q = _choice(rng, ("Is there {a} in the image?", "Can you see {a}?", "Are there any {p}?"))
        exist_qs.append((q.format(a=_a(name), p=plural(name)), "Yes." if yes else "No."))
    if all_colours:
        seen = sorted({(o.colour, o.name) for o in objs})
        unseen = [(c, n) for n in present for c in colour_vocab if (c, n) not in seen]
        for colour, name in balanced(seen, unseen, 1, 0.5):
            yes = (colour, name) in seen
            exist_qs.append((f"Is there {_a(colour + ' ' + name)}?", "Yes." if yes else "No."))
    out += [("exists", q, a) for q, a in _pick(rng, exist_qs, per_kind)]

    # colour, position, size of one object that a phrase picks out
    for kind, attr, templates in (
        ("colour", "colour", ("What colour is {r}?", "Which colour does {r} have?")),
        ("position", "position", ("Where is {r}?", "In which part of the image is {r}?")),
        ("size", "size", ("What size is {r}?", "Is {r} small, medium or large?")),
    ):
        qs = []
        for i in rng.permutation(len(objs)).tolist():
            value = getattr(objs[i], attr)
            refs = _refs(i, objs, exclude=attr)
            if value and refs:
                qs.append((_choice(rng, templates).format(r=_choice(rng, refs)), f"{_cap(value)}."))
            if len(qs) == per_kind:
                break
        out += [(kind, q, a) for q, a in qs]
    return [out[i] for i in rng.permutation(len(out)).tolist()]


def reasoning_questions(
    objects: Sequence[SceneObject],
    rng: np.random.Generator,
    *,
    classes: Sequence[str] = SHAPE_CLASSES,
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) triples that need one step of reasoning, each answered with its reason, shuffled.

    The answer's first word is checkable like a scene question's: compare and
    relation start with Yes/No, remove with a number, common_colour with a
    colour; largest answers with the phrase that names the object.
    """
    objs = list(objects)
    n = len(objs)
    present = sorted({o.name for o in objs})
    vocab = list(dict.fromkeys([*present, *classes]))
    per_class = Counter(o.name for o in objs)
    out: list[tuple[str, str, str]] = []

    if len(vocab) >= 2:
        a = _choice(rng, present) if present and rng.random() < 0.7 else _choice(rng, vocab)
        b = _choice(rng, [c for c in vocab if c != a])
        na, nb = per_class[a], per_class[b]
        out.append(("compare", f"Are there more {plural(a)} than {plural(b)}?",
                    f"{'Yes' if na > nb else 'No'}. The image has {count_phrase(na, a)} and {count_phrase(nb, b)}."))

    if vocab:
        name = _choice(rng, present) if present and rng.random() < 0.8 else _choice(rng, vocab)
        k = per_class[name]
        rest = f"{count_phrase(n - k, 'object')}. The image has {count_phrase(n, 'object')}"
        rest += f", including {count_phrase(k, name)}." if k else f" and no {plural(name)}."
        out.append(("remove", f"If all the {plural(name)} were removed, how many objects would be left?", rest))

    referable = [(i, r) for i in range(n) for r in _refs(i, objs, exclude="position")[:1]]
    with_box = [(i, r) for i, r in referable if objs[i].box is not None]
    if len(with_box) >= 2:
        (i, ra), (j, rb) = _pick(rng, with_box, 2)
        ca = _centre(objs[i].box)
        cb = _centre(objs[j].box)
        axis_options = []
        if abs(ca[0] - cb[0]) > 0.1:
            axis_options.append(("to the left of", "to the right of", ca[0] < cb[0]))
        if abs(ca[1] - cb[1]) > 0.1:
            axis_options.append(("above", "below", ca[1] < cb[1]))
        if axis_options:
            rel, opposite, truth = _choice(rng, axis_options)
            asked, other = (rel, opposite) if rng.random() < 0.5 else (opposite, rel)
            holds = truth if asked == rel else not truth
            actual = asked if holds else other
            out.append(("relation", f"Is {ra} {asked} {rb}?",
                        f"{'Yes' if holds else 'No'}. {_cap(ra)} is {actual} {rb}."))

    if n >= 2 and all(o.colour for o in objs):
        tally = Counter(o.colour for o in objs).most_common()
        if tally[0][1] >= 2 and (len(tally) == 1 or tally[0][1] > tally[1][1]):
            colour, k = tally[0]
            out.append(("common_colour", "Which colour is the most common among the objects?",
                        f"{_cap(colour)}. {k} of the {n} objects are {colour}."))

    if n >= 2 and all(o.box is not None for o in objs):
        areas = [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in objs]
        order = sorted(range(n), key=lambda i: -areas[i])
        top = order[0]
        refs = _refs(top, objs, exclude="")
        if refs and areas[top] > 1.25 * areas[order[1]]:
            out.append(("largest", "Which object is the largest?", f"{_cap(refs[0])}."))
    return [out[i] for i in rng.permutation(len(out)).tolist()]


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


_BACKGROUND_PHRASES = {"flat": "a plain background", "gradient": "a gradient background",
                       "noise": "a mottled background", "texture": "a textured background"}


def describe_scene(objects: Sequence[SceneObject], background: str | None = None, max_listed: int = 12) -> str:
    """A detailed description: counts per class, then every object (reading order) with its attributes."""
    objs = list(objects)
    bg = _BACKGROUND_PHRASES.get(background or "", f"a {background} background" if background else "")
    if not objs:
        return f"The image shows no objects{', only ' + bg if bg else ''}."
    per_class = sorted(Counter(o.name for o in objs).items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [count_phrase(c, name) for name, c in per_class]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"The image shows {count_phrase(len(objs), 'object')}: {listing}."
    if bg:
        text += f" They are on {bg}."

    def reading_order(o: SceneObject) -> tuple[int, float]:
        """Grid row first (top to bottom), then left to right by box centre (or grid column)."""
        cell = _POSITION_ORDER.index(o.position) if o.position in _POSITION_ORDER else 4
        return cell // 3, _centre(o.box)[0] if o.box else float(cell % 3)

    ordered = sorted(objs, key=reading_order)
    phrases = [_a(_words(o.size, o.colour, o.name)) + (f" at {o.position}" if o.position else "")
               for o in ordered[:max_listed]]
    if len(ordered) > max_listed:
        phrases.append(f"{count_phrase(len(ordered) - max_listed, 'more object')}")
    sentence = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + f" There is {sentence}."


# ---------------------------------------------------------------- checking answers

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_COUNT_KINDS = {"count", "remove"}


def answer_key(kind: str, text: str) -> str:
    """The part of an answer that decides whether it is right.

    count/remove: the leading number as digits ("2 circles." → "2", "Two." → "2");
    the phrase kinds (largest, free-form): the whole answer, lowercased, without
    punctuation; every other kind: the first word, lowercased, without
    punctuation ("Top-left." → "top-left", "Yes, ..." → "yes").
    """
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())
    if not words:
        return ""
    if kind in _COUNT_KINDS:
        return _NUMBER_WORDS.get(words[0], words[0])
    if kind in ("largest", ""):
        return " ".join(w for w in words if w not in ("the", "a", "an"))
    return words[0]


def answer_matches(kind: str, prediction: str, answer: str) -> bool:
    """True when ``prediction`` agrees with the exact ``answer`` on its checkable part."""
    return answer_key(kind, prediction) == answer_key(kind, answer) != ""


# ---------------------------------------------------------------- scenes from a dataset


def _question_class(label_name: str) -> str:
    """The class a question names for a label class: "red circle" -> "circle" (colour-shape labels)."""
    colour, _, rest = label_name.partition(" ")
    return rest if colour in COLOUR_NAMES and rest else label_name


def scene_from_record(record: ImageRecord, names: Mapping[int, str]) -> Scene:
    """The symbolic scene of one labelled image; class names as the grounding writes them."""
    h, w = record.image_size
    display = {cid: sanitize_name(n) or f"class {cid}" for cid, n in names.items()}
    xyxy = np.array([b.xyxy(record.image_size) for b in record.boxes], np.float64).reshape(-1, 4)
    objects = []
    for i, box in enumerate(record.boxes):
        attrs = record.attributes[i] if i < len(record.attributes) and record.attributes[i] else {}
        colour = attrs.get("colour") if isinstance(attrs.get("colour"), str) else None
        size = attrs.get("size") if attrs.get("size") in SIZES else None
        x1, y1, x2, y2 = xyxy[i].tolist()
        # The sidecar's class is the object's name in questions: with labels that carry the colour
        # ("red circle"), questions still ask about "circles" and "red circles", as on the shapes benchmark.
        name = sanitize_name(attrs["class"]) if isinstance(attrs.get("class"), str) else ""
        objects.append(SceneObject(
            name=name or display[box.class_id], position=describe_position(xyxy[i], (h, w), PositionStyle.WORDS),
            colour=colour, size=size, box=(x1 / w, y1 / h, x2 / w, y2 / h),
        ))
    detections = Detections(
        xyxy=xyxy, confidence=np.ones(len(xyxy)), class_id=np.array([b.class_id for b in record.boxes], np.int64),
        names=dict(names), image_size=(h, w),
    )
    return Scene(image=record.rel, image_size=(h, w), objects=tuple(objects), detections=detections,
                 classes=tuple(dict.fromkeys(_question_class(display[c]) for c in sorted(display))),
                 background=record.scene_attributes.get("background"))


# ---------------------------------------------------------------- the writer


@dataclass(frozen=True)
class InstructConfig:
    """Options of :func:`build_instruct_data`; ``grounding`` is the runtime's GroundingConfig (recorded in the manifest)."""

    split: str = "train"
    seed: int = 0
    samples_per_image: int = 3
    kinds: tuple[SampleKind, ...] = (SampleKind.CONVERSATION, SampleKind.DETAILED, SampleKind.REASONING)
    ungrounded_fraction: float = 0.0
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    count_tokens: Callable[[str], int] = approx_token_count

    def __post_init__(self) -> None:
        from edge_vit.errors import EdgeVitError

        object.__setattr__(self, "kinds", tuple(SampleKind(k) for k in self.kinds))
        if not self.kinds:
            raise EdgeVitError("instruct: need at least one sample kind")
        if self.samples_per_image < 1:
            raise EdgeVitError(f"instruct: samples per image must be >= 1, got {self.samples_per_image}")
        if not 0.0 <= self.ungrounded_fraction <= 1.0:
            raise EdgeVitError(f"instruct: ungrounded fraction must be in [0, 1], got {self.ungrounded_fraction}")
        if self.seed < 0:
            raise EdgeVitError(f"instruct: seed must be >= 0, got {self.seed}")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _grounding_json(config: GroundingConfig, count_tokens: Callable[[str], int]) -> dict:
    out = config.as_json()
    out["count_tokens"] = getattr(count_tokens, "__qualname__", type(count_tokens).__name__)
    return out


def _sample(scene: Scene, qas: list[QA], kind: SampleKind, grounded: bool, config: InstructConfig,
            sample_id: str) -> dict:
    first = qas[0].question
    if grounded:
        first = ground(scene.detections, first, config.grounding, config.count_tokens).text
    turns = []
    for k, qa in enumerate(qas):
        turns.append({"from": "human", "value": ("<image>\n" + first) if k == 0 else qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return {
        "id": sample_id,
        "image": scene.image,
        "conversations": turns,
        "kind": kind.value,
        "meta": {
            "split": config.split,
            "grounded": grounded,
            "objects": len(scene.objects),
            "image_size": list(scene.image_size),
            "qa_kinds": [qa.kind for qa in qas],
        },
    }


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_instruct_data(dataset: str | Path | DataYaml, out_dir: str | Path, teacher: Teacher,
                        config: InstructConfig = InstructConfig()) -> dict:
    """Write ``out_dir/instruct.json`` (LLaVA conversation list) and ``out_dir/manifest.json``; returns the manifest.

    Sample ``j`` of an image draws from a Generator seeded by (seed, the
    image's relative path, j), so a sample does not change when other images
    are added or removed. Its kind cycles through ``config.kinds``. With
    probability ``ungrounded_fraction`` (one draw per sample, made before the
    teacher runs) the sample is written without the grounding text, for
    ablations; raising the fraction only turns more samples ungrounded.
    """
    data = dataset if isinstance(dataset, DataYaml) else load_data_yaml(dataset)
    records, report = read_split(data, config.split)
    source = {
        "data_yaml": str(data.yaml_path.absolute()),
        "root": str(data.root),
        "split": config.split,
        "hash": dataset_hash(data, records),
        "names": {str(k): v for k, v in data.names.items()},
    }
    counts = {"objects": report.objects, "images_without_labels": report.images_without_labels,
              "images_with_attributes": report.images_with_attributes}
    return _write_instruct(records, data.names, out_dir, teacher, config, source, counts, report.skipped_json())


def build_instruct_rendered(out_dir: str | Path, teacher: Teacher, config: InstructConfig = InstructConfig(), *,
                            seed: int, images: int, imgsz: int = 256, labels: str = "colour-shape",
                            workers: int = 1) -> dict:
    """:func:`build_instruct_data` of shapes-world scenes rendered in memory (``finetune.shapes.render_records``):
    the samples a written dataset of that seed would give, without writing ``images`` images first."""
    from finetune.shapes import GENERATOR_VERSION, class_names, render_records

    records = render_records(seed, images, imgsz, labels, workers=workers)
    names = dict(enumerate(class_names(labels)))
    source = {"rendered": {"generator": GENERATOR_VERSION, "seed": seed, "images": images, "imgsz": imgsz,
                           "labels": labels}, "split": "train", "names": {str(k): v for k, v in names.items()}}
    counts = {"objects": sum(len(r.boxes) for r in records), "images_without_labels": 0,
              "images_with_attributes": len(records)}
    return _write_instruct(records, names, out_dir, teacher, config, source, counts, {})


def _write_instruct(records: Sequence[ImageRecord], names: Mapping[int, str], out_dir: str | Path, teacher: Teacher,
                    config: InstructConfig, source: dict, counts: dict, skipped: dict) -> dict:
    samples = []
    by_kind: Counter = Counter()
    qa_kinds: Counter = Counter()
    failures = 0
    grounded_n = 0
    for record in records:
        scene = scene_from_record(record, names)
        h = _stable_int(record.rel)
        for j in range(config.samples_per_image):
            kind = config.kinds[(h + j) % len(config.kinds)]
            ungrounded = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(h, j, 1))).random() \
                < config.ungrounded_fraction
            rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(h, j, 0)))
            qas = teacher.write(scene, kind, rng)
            if not qas:
                failures += 1
                continue
            stem = record.rel.rsplit(".", 1)[0]
            samples.append(_sample(scene, qas, kind, not ungrounded, config, f"{stem}#{j}"))
            by_kind[kind.value] += 1
            qa_kinds.update(qa.kind or "free" for qa in qas)
            grounded_n += not ungrounded
    out = Path(out_dir)
    _write_json(out / "instruct.json", samples)
    info = teacher.info()
    manifest = {
        "format": FORMAT_VERSION,
        "output": "instruct.json",
        "dataset": source,
        "teacher": info,
        "prompt_version": info.get("prompt_version"),
        "seed": config.seed,
        "samples_per_image": config.samples_per_image,
        "kinds": [k.value for k in config.kinds],
        "ungrounded_fraction": config.ungrounded_fraction,
        "grounding": _grounding_json(config.grounding, config.count_tokens),
        "counts": {
            "images": len(records),
            **counts,
            "samples": len(samples),
            "by_kind": {k.value: by_kind.get(k.value, 0) for k in SampleKind},
            "grounded": grounded_n,
            "ungrounded": len(samples) - grounded_n,
            "qa_by_kind": dict(sorted(qa_kinds.items())),
        },
        "skipped": {**skipped, "teacher_failures": failures},
    }
    _write_json(out / "manifest.json", manifest)
    return manifest
