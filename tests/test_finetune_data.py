"""Instruction data from YOLO datasets: exact template answers, grounding, bad input, teachers, CLI."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_vit.errors import EdgeVitError
from edge_vit.grounding import GroundingConfig, PositionStyle, ground
from edge_vit.types import Detections
from finetune.dataset import load_data_yaml, read_split
from finetune.instruct import (
    QUESTION_KINDS,
    InstructConfig,
    SampleKind,
    SceneObject,
    answer_key,
    answer_matches,
    build_instruct_data,
    plural,
    reasoning_questions,
    scene_questions,
)
from finetune.shapes import COLOUR_NAMES, SHAPE_CLASSES, SIZES, ShapesConfig, generate_shapes
from finetune.teachers import OpenAITeacher, TemplateTeacher, load_prompts, parse_qa

POSITIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fd") / "shapes"
    generate_shapes(out, ShapesConfig(images=12, imgsz=160, seed=3, test_fraction=0.0))
    return out


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


def _build(ds: Path, out: Path, prompts, **kw) -> tuple[list[dict], dict]:
    manifest = build_instruct_data(ds / "data.yaml", out, TemplateTeacher(prompts), InstructConfig(**kw))
    return json.loads((out / "instruct.json").read_text()), manifest


# ---------------------------------------------------------------- an oracle, written apart from the generator

_SINGULAR = {plural(c): c for c in SHAPE_CLASSES}
_CLASS = "|".join(SHAPE_CLASSES)
_PLURALS = "|".join(_SINGULAR)
_COLOUR = "|".join(COLOUR_NAMES)
_POS = "|".join(sorted(POSITIONS, key=len, reverse=True))


def _refer(ref: str, objects: list[SceneObject]) -> list[SceneObject]:
    m = re.fullmatch(rf"the (?:({_COLOUR}) )?(?:(small|medium|large) )?({_CLASS})(?: at ({_POS}))?", ref)
    assert m, ref
    colour, size, name, pos = m.groups()
    return [o for o in objects if o.name == name and (colour is None or o.colour == colour)
            and (size is None or o.size == size) and (pos is None or o.position == pos)]


def oracle(question: str, objects: list[SceneObject]) -> str:
    """The exact expected answer's key for a scene question, from the objects alone."""
    q = question
    if m := re.fullmatch(rf"(?:How many|Count the) (?:({_COLOUR}) )?({_PLURALS}|objects)(?: are there\?| are in the image\?| in the image\.| are there in total\?| can you see\?)", q):
        colour, noun = m.groups()
        hits = [o for o in objects if (noun == "objects" or o.name == _SINGULAR[noun]) and (colour is None or o.colour == colour)]
        return str(len(hits))
    if m := re.fullmatch(rf"(?:Is there an?|Can you see an?) (?:({_COLOUR}) )?({_CLASS})(?: in the image)?\?", q):
        colour, name = m.groups()
        return "yes" if any(o.name == name and (colour is None or o.colour == colour) for o in objects) else "no"
    if m := re.fullmatch(rf"Are there any ({_PLURALS})\?", q):
        return "yes" if any(o.name == _SINGULAR[m.group(1)] for o in objects) else "no"
    for pattern, attr in ((r"What colour is (.+)\?|Which colour does (.+) have\?", "colour"),
                          (r"Where is (.+)\?|In which part of the image is (.+)\?", "position"),
                          (r"What size is (.+)\?|Is (.+) small, medium or large\?", "size")):
        if m := re.fullmatch(pattern, q):
            hits = _refer(m.group(1) or m.group(2), objects)
            assert len(hits) == 1, (q, hits)
            return getattr(hits[0], attr)
    raise AssertionError(f"unknown question form: {q}")


def _objects_from_sidecar(ds: Path, image_rel: str) -> list[SceneObject]:
    side = ds / image_rel.replace("images/", "attributes/", 1).replace(".png", ".json")
    attrs = json.loads(side.read_text())
    h, w = attrs["image_size"]
    return [SceneObject.from_shape(o, (h, w)) for o in attrs["objects"]]


def _detections_from_label(ds: Path, image_rel: str, size: tuple[int, int]) -> Detections:
    h, w = size
    rows = [list(map(float, line.split()))
            for line in (ds / image_rel.replace("images/", "labels/", 1).replace(".png", ".txt")).read_text().splitlines()]
    xyxy = [((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h) for _, cx, cy, bw, bh in rows]
    return Detections(np.array(xyxy).reshape(-1, 4), np.ones(len(rows)), [int(r[0]) for r in rows],
                      dict(enumerate(SHAPE_CLASSES)), (h, w))


# ---------------------------------------------------------------- the template teacher on the shapes world


def test_template_answers_are_exact_and_grounding_is_the_runtimes(shapes_ds, prompts, tmp_path):
    samples, manifest = _build(shapes_ds, tmp_path, prompts)
    assert manifest["counts"]["samples"] == len(samples) == 3 * manifest["counts"]["images"]
    n = manifest["counts"]["images"]
    assert n == 10 and manifest["counts"]["by_kind"] == {"conversation": n, "detailed": n, "reasoning": n}
    checked = 0
    for s in samples:
        assert (shapes_ds / s["image"]).is_file()
        assert s["kind"] in {k.value for k in SampleKind}
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        objects = _objects_from_sidecar(shapes_ds, s["image"])
        first = turns[0]["value"]
        assert first.startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        question = first.split("\n")[-1]
        dets = _detections_from_label(shapes_ds, s["image"], tuple(s["meta"]["image_size"]))
        assert first == "<image>\n" + ground(dets, question, GroundingConfig()).text
        questions = [question] + [t["value"] for t in turns[2::2]]
        answers = [t["value"] for t in turns[1::2]]
        for kind, q, a in zip(s["meta"]["qa_kinds"], questions, answers):
            if kind in QUESTION_KINDS:
                assert answer_key(kind, a) == oracle(q, objects), (s["id"], q, a)
                checked += 1
        if s["kind"] == "detailed":
            n = len(objects)
            assert answers[0].startswith(f"The image shows {n} object" if n else "The image shows no objects")
    assert checked >= 20


def test_same_seed_same_bytes_and_another_seed_differs(shapes_ds, prompts, tmp_path):
    _build(shapes_ds, tmp_path / "a", prompts, seed=5)
    _build(shapes_ds, tmp_path / "b", prompts, seed=5)
    _build(shapes_ds, tmp_path / "c", prompts, seed=6)
    a, b, c = ((tmp_path / x / "instruct.json").read_bytes() for x in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_manifest_records_what_made_the_data(shapes_ds, prompts, tmp_path):
    config = GroundingConfig(positions=PositionStyle.BOXES, max_tokens=64)
    samples, m = _build(shapes_ds, tmp_path, prompts, grounding=config, samples_per_image=2, split="val")
    assert m["dataset"]["split"] == "val" and m["counts"]["images"] == 2 and len(samples) == 4
    assert m["dataset"]["hash"].startswith("sha256:")
    assert m["teacher"]["name"] == "template" and m["prompt_version"] == "v1"
    assert set(m["teacher"]["prompt_sha256"]) == {"conversation.txt", "detailed.txt", "reasoning.txt",
                                                  "detailed_questions.txt"}
    assert m["grounding"]["positions"] == "boxes" and m["grounding"]["max_tokens"] == 64
    assert m["skipped"]["bad_label_lines"] == 0 and m["skipped"]["teacher_failures"] == 0
    assert any(re.search(r"\[\d\.\d\d, ", s["conversations"][0]["value"]) for s in samples), "boxes style used"
    # The hash follows the labels.
    label = next((shapes_ds / "labels/val").glob("*.txt"))
    copy = tmp_path / "copy"
    shutil.copytree(shapes_ds, copy)
    (copy / "data.yaml").write_text((shapes_ds / "data.yaml").read_text().replace(str(shapes_ds), str(copy)))
    (copy / "labels/val" / label.name).write_text("0 0.5 0.5 0.1 0.1\n")
    _, m2 = _build(copy, tmp_path / "out2", prompts, split="val")
    assert m2["dataset"]["hash"] != m["dataset"]["hash"]


def test_ungrounded_fraction(shapes_ds, prompts, tmp_path):
    def ungrounded_ids(fraction: float) -> set[str]:
        samples, m = _build(shapes_ds, tmp_path / str(fraction), prompts, ungrounded_fraction=fraction)
        ids = {s["id"] for s in samples if not s["meta"]["grounded"]}
        assert m["counts"]["ungrounded"] == len(ids)
        for s in samples:
            first = s["conversations"][0]["value"]
            assert ("Detected objects" in first) == s["meta"]["grounded"]
            if not s["meta"]["grounded"]:
                assert first.count("\n") == 1  # "<image>\n" + question only
        return ids

    none, some, more, everything = (ungrounded_ids(f) for f in (0.0, 0.3, 0.6, 1.0))
    assert not none and len(everything) == 30
    assert some <= more and 0 < len(some) < len(more) < 30


# ---------------------------------------------------------------- questions for the evaluation

_objects = st.lists(
    st.builds(SceneObject, name=st.sampled_from(SHAPE_CLASSES), position=st.sampled_from(POSITIONS),
              colour=st.sampled_from(COLOUR_NAMES), size=st.sampled_from(SIZES)),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(objects=_objects, seed=st.integers(0, 2**32 - 1))
def test_scene_questions_are_exact_for_any_scene(objects, seed):
    triples = scene_questions(objects, np.random.default_rng(seed))
    kinds = {k for k, _, _ in triples}
    assert {"count", "exists"} <= kinds
    for kind, q, a in triples:
        assert kind in QUESTION_KINDS
        assert answer_key(kind, a) == oracle(q, objects), (q, a)
        if kind == "count":
            assert re.match(r"^\d+ ", a)
        if kind == "exists":
            assert a in ("Yes.", "No.")
    for kind, q, a in reasoning_questions(objects, np.random.default_rng(seed)):
        assert answer_matches(kind, a, a)
        if kind == "remove":
            assert re.match(r"^\d+ object", a)


def test_scene_questions_without_attributes_skip_colour_and_size():
    objects = [SceneObject("person", "left"), SceneObject("person", "right"), SceneObject("car", "center")]
    triples = scene_questions(objects, np.random.default_rng(0), classes=["person", "car", "dog"], per_kind=3)
    kinds = {k for k, _, _ in triples}
    assert "colour" not in kinds and "size" not in kinds and {"count", "exists", "position"} <= kinds
    for kind, q, a in triples:
        if q == "How many people are there?":
            assert a == "2 people."
        if q.startswith("Where is the person at"):
            raise AssertionError("a position question must not give the position away")


def test_answer_matching():
    assert answer_matches("count", "Two circles, I think.", "2 circles.")
    assert answer_matches("count", "2", "2 circles.")
    assert not answer_matches("count", "3 circles.", "2 circles.")
    assert answer_matches("exists", "yes, there is one", "Yes.")
    assert not answer_matches("exists", "No.", "Yes.")
    assert answer_matches("position", "Top-left.", "Top-left.") and not answer_matches("position", "top", "Top-left.")
    assert answer_matches("colour", "red", "Red.") and not answer_matches("colour", "", "Red.")


# ---------------------------------------------------------------- bad input


def _mini_dataset(root: Path, shapes_ds: Path, train: str | list = "images/train", names=None) -> Path:
    """Three shapes images (with their labels and no sidecar) under ``root``, plus a data.yaml."""
    import yaml

    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem in ("000000", "000001", "000002"):
        shutil.copy(shapes_ds / f"images/train/{stem}.png", root / f"images/train/{stem}.png")
    data = {"path": str(root), "train": train, "val": "images/train", "names": names or list(SHAPE_CLASSES)}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_bad_label_lines_are_reported_counted_and_only_they_are_lost(shapes_ds, prompts, tmp_path, caplog):
    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds)
    labels = tmp_path / "ds/labels/train"
    (labels / "000000.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"          # 1 good
        "1 0.5 0.5 0.2\n"              # 2 wrong field count
        "2 0.5 abc 0.2 0.2\n"          # 3 non-numeric
        "9 0.5 0.5 0.2 0.2\n"          # 4 class out of range
        "3 0.5 1.5 0.2 0.2\n"          # 5 outside [0, 1]
        "\n"                           # 6 blank: ignored, not an error
        "4 0.25 0.25 0.1 0.1\n"        # 7 good
        "1.5 0.5 0.5 0.2 0.2\n"        # 8 class id not an integer
        "0 nan 0.5 0.2 0.2\n"          # 9 not finite
        "2 0.1 0.1 0.3 0.1 0.2 0.3\n"  # 10 polygon (3 points): its box, good
    )
    (labels / "000001.txt").write_text("1 0.5 0.5 0.3 0.3\n-1 0.5 0.5 0.3 0.3\n3 0.2 0.8 0.1 0.1 0.5\n")
    # 000002.png has no label file: an image with zero objects, valid.
    with caplog.at_level(logging.WARNING, logger="finetune.dataset"):
        m = build_instruct_data(yaml_path, tmp_path / "out", TemplateTeacher(prompts), InstructConfig())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = {(str(labels / "000000.txt"), n) for n in (2, 3, 4, 5, 8, 9)} | {(str(labels / "000001.txt"), n) for n in (2, 3)}
    got = set()
    for w in warnings:
        assert "\n" not in w and w.endswith("line skipped")
        path, line, _ = w.split(":", 2)
        got.add((path, int(line)))
    assert got == expected
    skipped = m["skipped"]
    assert skipped["bad_label_lines"] == 8
    assert skipped["bad_label_lines_by_reason"] == {"class_out_of_range": 3, "coordinates_out_of_range": 1,
                                                    "field_count": 2, "non_numeric": 2}
    assert m["counts"]["images"] == 3 and m["counts"]["objects"] == 4  # 3 good lines + 1 good line
    assert m["counts"]["images_without_labels"] == 1
    records, _ = read_split(load_data_yaml(yaml_path), "train")
    by_name = {Path(r.rel).name: r for r in records}
    assert [b.line for b in by_name["000000.png"].boxes] == [1, 7, 10]
    poly = by_name["000000.png"].boxes[2]
    assert (poly.class_id, poly.cx, poly.cy, poly.w, poly.h) == pytest.approx((2, 0.2, 0.2, 0.2, 0.2))
    assert by_name["000002.png"].boxes == () and by_name["000002.png"].label_path is None
    samples = json.loads((tmp_path / "out/instruct.json").read_text())
    empty = [s for s in samples if s["image"] == "images/train/000002.png"]
    assert len(empty) == 3 and all("Detected objects: none." in s["conversations"][0]["value"] for s in empty)


def test_label_without_image_and_listed_image_missing(shapes_ds, tmp_path, caplog):
    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds)
    (tmp_path / "ds/labels/train/000000.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "ds/labels/train/orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "ds/list.txt").write_text("./images/train/000000.png\n./images/train/gone.png\n")
    with caplog.at_level(logging.WARNING, logger="finetune.dataset"):
        records, report = read_split(load_data_yaml(yaml_path), "train")
    assert len(records) == 3 and report.labels_without_image == 1
    assert any("orphan.txt: label file has no image" in r.getMessage() for r in caplog.records)
    import yaml

    data = yaml.safe_load(yaml_path.read_text())
    data["train"] = "list.txt"
    yaml_path.write_text(yaml.safe_dump(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.dataset"):
        records, report = read_split(load_data_yaml(yaml_path), "train")
    assert [r.rel for r in records] == ["images/train/000000.png"] and report.missing_images == 1
    assert any("list.txt:2: image" in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records)


def test_train_as_folder_list_of_folders_or_txt_file(shapes_ds, tmp_path):
    import yaml

    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds)
    root = tmp_path / "ds"
    (root / "images/more").mkdir()
    (root / "labels/more").mkdir()
    shutil.move(root / "images/train/000002.png", root / "images/more/000002.png")
    (root / "labels/train/000000.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "labels/more/000002.txt").write_text("1 0.5 0.5 0.2 0.2\n2 0.2 0.2 0.1 0.1\n")
    (root / "lists").mkdir()
    # "./x" is relative to the list file, "x" to the dataset root, absolute paths stay as they are.
    (root / "lists/train.txt").write_text(
        f"./../images/train/000000.png\nimages/train/000001.png\n{root / 'images/more/000002.png'}\n")

    def rels(train) -> list[tuple[str, int]]:
        data = yaml.safe_load((root / "data.yaml").read_text())
        data["train"] = train
        (root / "data.yaml").write_text(yaml.safe_dump(data))
        records, _ = read_split(load_data_yaml(root / "data.yaml"), "train")
        return [(r.rel, len(r.boxes)) for r in records]

    both = [("images/more/000002.png", 2), ("images/train/000000.png", 1), ("images/train/000001.png", 0)]
    assert rels("images") == both
    assert rels(["images/train", "images/more"]) == both
    assert rels(["images/train", "images/more", "images/train"]) == both  # listed twice: used once
    assert rels("lists/train.txt") == both
    assert rels("images/train") == both[1:]


@pytest.mark.parametrize("entry", ["../../etc", "/etc", "images/../../outside", ["images/train", "/tmp"]])
def test_paths_escaping_the_root_are_refused(shapes_ds, tmp_path, entry):
    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds, train=entry)
    (tmp_path / "outside").mkdir()
    with pytest.raises(EdgeVitError, match="outside the dataset root") as err:
        read_split(load_data_yaml(yaml_path), "train")
    assert "\n" not in str(err.value)


def test_paths_escaping_the_root_via_cli_exit_2(shapes_ds, tmp_path, capsys):
    from edge_vit.cli import main

    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds, train="../../etc")
    assert main(["finetune", "data", "--dataset", str(yaml_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-vit: error:") and "outside the dataset root" in err and "\n" not in err
    assert not (tmp_path / "o/instruct.json").exists()


def test_symlink_out_of_the_root_is_refused(shapes_ds, tmp_path):
    yaml_path = _mini_dataset(tmp_path / "ds", shapes_ds, train="linked")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ds/linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EdgeVitError, match="outside the dataset root"):
        read_split(load_data_yaml(yaml_path), "train")


@pytest.mark.parametrize("content, message", [
    (None, "dataset file not found"),
    ("train: [images\nnames: {", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("train: images/train\nval: images/train\n", "needs 'names'"),
    ("train: images/train\nval: images/train\nnames: [a, b]\nnc: 3\n", "does not match"),
    ("train: images/train\nnames: [a]\npath: /no/such/root\n", "is not a folder"),
])
def test_bad_data_yaml_is_one_line(tmp_path, content, message):
    path = tmp_path / "data.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeVitError, match=message) as err:
        load_data_yaml(path)
    assert "\n" not in str(err.value)


def test_missing_or_empty_split_is_one_line(shapes_ds, tmp_path):
    with pytest.raises(EdgeVitError, match="no 'test' entry"):
        read_split(load_data_yaml(shapes_ds / "data.yaml"), "test")
    (tmp_path / "images").mkdir()
    (tmp_path / "images/broken.png").write_bytes(b"not a png")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [a]\n")
    with pytest.raises(EdgeVitError, match="has no usable images"):
        read_split(load_data_yaml(tmp_path / "data.yaml"), "train")


# ---------------------------------------------------------------- the OpenAI-compatible teacher


class _FakeChat(BaseHTTPRequestHandler):
    """Mimics POST /v1/chat/completions; the test sets ``plan``: status codes to return first, then 200s."""

    plan: list[int] = []
    seen: list[dict] = []
    content_for: dict = {}

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status = type(self).plan.pop(0) if type(self).plan else 200
        if status == 0:  # stall past the client's timeout, then hang up
            time.sleep(0.5)
            return
        if status != 200:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "try again"}}')
            return
        system = body["messages"][0]["content"]
        kind = "conversation" if "conversation between" in system else "detailed" if "detailed description" in system else "reasoning"
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": type(self).content_for[kind]}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _FakeChat.plan, _FakeChat.seen = [], []
    _FakeChat.content_for = {
        "conversation": "Q: How many circles are there?\nA: 2 circles.\n\nQ: Is there a star?\nA: No.",
        "detailed": "The image shows two shapes on a plain background.",
        "reasoning": "**Q:** Are there more circles than squares?\n**A:** Yes. There are 2 circles and 1 square.",
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.handle_error = lambda request, address: None  # a stalled reply's broken pipe is expected
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_teacher_retries_and_writes_samples(shapes_ds, prompts, tmp_path, chat_server):
    _FakeChat.plan = [500, 429]  # one server error, one rate limit, then success
    teacher = OpenAITeacher(chat_server, "tiny-teacher", prompts, api_key="sk-test", backoff_s=0.01, max_retries=3)
    m = build_instruct_data(shapes_ds / "data.yaml", tmp_path, teacher, InstructConfig(split="val"))
    samples = json.loads((tmp_path / "instruct.json").read_text())
    assert len(samples) == 6 and m["counts"]["samples"] == 6
    assert teacher.retries == 2 and len(_FakeChat.seen) == 6 + 2
    first = _FakeChat.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "tiny-teacher" and "Objects" in first["body"]["messages"][1]["content"]
    conv = next(s for s in samples if s["kind"] == "conversation")
    assert [t["value"] for t in conv["conversations"][1:]] == ["2 circles.", "Is there a star?", "No."]
    assert conv["conversations"][0]["value"].endswith("\nHow many circles are there?")
    reason = next(s for s in samples if s["kind"] == "reasoning")
    assert reason["conversations"][1]["value"].startswith("Yes. There are")
    detailed = next(s for s in samples if s["kind"] == "detailed")
    assert detailed["conversations"][0]["value"].split("\n")[-1] in prompts.detailed_questions
    assert m["teacher"]["name"] == "openai" and m["teacher"]["model"] == "tiny-teacher"
    assert m["prompt_version"] == "v1"


def test_openai_teacher_retries_a_timeout(prompts, chat_server):
    _FakeChat.plan = [0]
    teacher = OpenAITeacher(chat_server, "m", prompts, timeout_s=0.2, backoff_s=0.01)
    assert teacher.chat("system: a conversation between", "user", 0).startswith("Q: How many")
    assert teacher.retries == 1


def test_openai_teacher_unparsable_reply_skips_the_sample(shapes_ds, prompts, tmp_path, chat_server):
    _FakeChat.content_for["conversation"] = "I cannot help with that."
    teacher = OpenAITeacher(chat_server, "m", prompts, backoff_s=0.01)
    m = build_instruct_data(shapes_ds / "data.yaml", tmp_path, teacher,
                            InstructConfig(split="val", kinds=(SampleKind.CONVERSATION,), samples_per_image=1))
    assert m["counts"]["samples"] == 0 and m["skipped"]["teacher_failures"] == 2


def test_openai_teacher_client_error_is_not_retried(prompts, chat_server):
    _FakeChat.plan = [401]
    teacher = OpenAITeacher(chat_server, "m", prompts, backoff_s=0.01)
    with pytest.raises(EdgeVitError, match="HTTP 401.*OPENAI_API_KEY"):
        teacher.chat("system", "user", 0)
    assert len(_FakeChat.seen) == 1


def test_unreachable_endpoint_is_one_line_exit_2(shapes_ds, tmp_path, capsys):
    from edge_vit.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(tmp_path),
                 "--split", "val", "--teacher", "openai", "--endpoint", f"http://127.0.0.1:{port}/v1",
                 "--model", "m", "--retries", "1", "--backoff", "0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "cannot reach the teacher endpoint" in err and "2 tries" in err


def test_parse_qa_tolerates_common_formats():
    text = "1. Question: How many?\nAnswer: 3 circles.\nThey are red.\n\nQ: Is it big?\nA: No."
    assert parse_qa(text) == [("How many?", "3 circles. They are red."), ("Is it big?", "No.")]
    assert parse_qa("no pairs here") == []


# ---------------------------------------------------------------- CLI


def test_cli_data_end_to_end(shapes_ds, tmp_path, capsys):
    from edge_vit.cli import main

    out = tmp_path / "instr"
    code = main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(out),
                 "--samples-per-image", "2", "--kinds", "conversation,reasoning", "--ungrounded-fraction", "0.5",
                 "--positions", "none", "--grounding-tokens", "48", "--grounding-order", "question",
                 "--grounding-counts"])
    assert code == 0
    assert "wrote 20 samples" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["kinds"] == ["conversation", "reasoning"] and m["ungrounded_fraction"] == 0.5
    assert m["grounding"]["positions"] == "none" and m["grounding"]["max_tokens"] == 48
    assert m["grounding"]["order"] == "question" and m["grounding"]["question_counts"] is True
    grounded = [s["conversations"][0]["value"] for s in json.loads((out / "instruct.json").read_text())
                if "Detected objects" in s["conversations"][0]["value"]]
    assert grounded and all("\nCounts: " in text for text in grounded)
    assert m["counts"]["by_kind"]["detailed"] == 0
    assert main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(out),
                 "--kinds", "poems"]) == 2


def test_cli_dense_conversations_turns_and_per_kind(shapes_ds, tmp_path, capsys):
    """--turns and --per-kind: longer conversations, more questions of each kind, answers still exact."""
    from edge_vit.cli import main

    out = tmp_path / "dense"
    assert main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(out),
                 "--samples-per-image", "1", "--kinds", "conversation", "--turns", "8,10", "--per-kind", "5"]) == 0
    samples = json.loads((out / "instruct.json").read_text())
    teacher = json.loads((out / "manifest.json").read_text())["teacher"]
    assert (teacher["min_turns"], teacher["max_turns"], teacher["per_kind"]) == (8, 10, 5)
    turns = [len(s["conversations"]) // 2 for s in samples]
    kinds = [k for s in samples for k in s["meta"]["qa_kinds"]]
    assert max(turns) >= 8 and all(t <= 10 for t in turns)
    checked = 0
    for s in samples:
        objects = _objects_from_sidecar(shapes_ds, s["image"])
        conv = s["conversations"]
        questions = [conv[0]["value"].split("\n")[-1]] + [t["value"] for t in conv[2::2]]
        for kind, q, a in zip(s["meta"]["qa_kinds"], questions, [t["value"] for t in conv[1::2]]):
            assert answer_key(kind, a) == oracle(q, objects), (s["id"], q, a)
            checked += 1
    assert checked == len(kinds) >= 70
    # Three questions of one kind in one conversation: the default (2 per kind) never allows it.
    assert any(max(Counter(s["meta"]["qa_kinds"]).values()) >= 3 for s in samples)
    default = TemplateTeacher(load_prompts(), min_turns=8, max_turns=10)
    assert default.per_kind == 2
    for bad in (["--turns", "5,3"], ["--turns", "0,2"], ["--turns", "x"], ["--per-kind", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(tmp_path / "o"), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"edge-vit finetune data: error: argument {bad[0]}: "), err[-1]
    assert not (tmp_path / "o").exists()


def test_focus_gives_its_kind_that_share_of_the_turns(prompts):
    """TemplateTeacher(focus=(kind, share)): each turn is a question of that kind with probability share (while
    the scene has both), the rest keep the other kinds; the answers stay exact."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    scenes = [SimpleNamespace(classes=SHAPE_CLASSES, background=None, objects=tuple(
        SceneObject(name=str(rng.choice(SHAPE_CLASSES)), position=str(rng.choice(POSITIONS)),
                    colour=str(rng.choice(COLOUR_NAMES)), size=str(rng.choice(SIZES)))
        for _ in range(int(rng.integers(1, 7))))) for _ in range(400)]

    def turns(teacher):
        return [(scene, qa) for k, scene in enumerate(scenes)
                for qa in teacher.write(scene, SampleKind.CONVERSATION, np.random.default_rng(k))]

    def share(pairs, kind="count"):
        return sum(qa.kind == kind for _, qa in pairs) / len(pairs)

    plain = turns(TemplateTeacher(prompts, min_turns=1, max_turns=1))
    focused = turns(TemplateTeacher(prompts, min_turns=1, max_turns=1, focus=("count", 0.75)))
    assert len(plain) == len(focused) == len(scenes)
    assert share(plain) < 0.3 and abs(share(focused) - 0.75) < 0.06, (share(plain), share(focused))
    # Longer conversations: a scene has at most per_kind (2) position questions, then the turns go to the others.
    longer = turns(TemplateTeacher(prompts, min_turns=3, max_turns=5, focus=("position", 1.0)))
    assert 0.3 < share(longer, "position") < 0.7 and share(longer, "position") > 2 * share(turns(
        TemplateTeacher(prompts, min_turns=3, max_turns=5)), "position")
    for scene, qa in focused + longer:
        assert answer_key(qa.kind, qa.answer) == oracle(qa.question, scene.objects), qa
    for bad in (("counting", 0.5), ("count", 0.0), ("count", 1.5)):
        with pytest.raises(ValueError, match="focus must be"):
            TemplateTeacher(prompts, focus=bad)


def test_cli_focus_is_recorded_and_checked(shapes_ds, tmp_path, capsys):
    from edge_vit.cli import main

    out = tmp_path / "focus"
    assert main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(out),
                 "--samples-per-image", "4", "--kinds", "conversation", "--turns", "1,1", "--focus", "count:1"]) == 0
    samples = json.loads((out / "instruct.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["teacher"]["focus"] == {"kind": "count", "share": 1.0}
    assert {k for s in samples for k in s["meta"]["qa_kinds"]} == {"count"}
    for bad, message in ((["--focus", "count"], "expected KIND:SHARE"), (["--focus", "shape:0.5"], "KIND must be one of"),
                         (["--focus", "count:0"], "SHARE must be in (0, 1]")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(tmp_path / "o"), *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("edge-vit finetune data: error: argument --focus: ") and message in err[-1], err[-1]


def test_size_words_in_the_grounding_are_the_datasets_sizes(shapes_ds, tmp_path):
    from edge_vit.cli import main
    from finetune.shapes import SIZE_THRESHOLDS

    out = tmp_path / "instr"
    assert main(["finetune", "data", "--dataset", str(shapes_ds / "data.yaml"), "--out", str(out),
                 "--kinds", "conversation", "--samples-per-image", "1",
                 "--size-words", ",".join(map(str, SIZE_THRESHOLDS))]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["grounding"]["size_words"] == list(SIZE_THRESHOLDS)
    listed = 0
    for s in json.loads((out / "instruct.json").read_text()):
        first = s["conversations"][0]["value"]
        dets = _detections_from_label(shapes_ds, s["image"], tuple(s["meta"]["image_size"]))
        config = GroundingConfig(size_words=SIZE_THRESHOLDS)
        assert first == "<image>\n" + ground(dets, first.split("\n")[-1], config).text
        lines = [line for line in first.split("\n") if line.startswith("- ")]
        # Sizes from the label boxes name each object as the shapes world drew it (its sidecar's size).
        truth = sorted((o.size, o.name, o.position) for o in _objects_from_sidecar(shapes_ds, s["image"]))
        said = sorted(tuple(re.fullmatch(r"- (\w+) (\w+) at ([\w-]+)", line).groups()) for line in lines)
        assert said == truth, s["id"]
        listed += len(lines)
    assert listed >= 10


# ---------------------------------------------------------------- colour-shape labels (the demo detector's classes)


def test_colour_shape_labels_ground_with_colours_and_ask_about_shapes(tmp_path, prompts):
    """With "red circle" labels, the grounding names colour and shape (what the detector will say) while
    the questions still ask about circles and red circles, with answers exact from the sidecar."""
    from finetune.shapes import class_names

    ds = tmp_path / "cs"
    generate_shapes(ds, ShapesConfig(images=12, imgsz=160, seed=3, val_fraction=0.0, test_fraction=0.0,
                                     labels="colour-shape"))
    names = class_names("colour-shape")
    records, report = read_split(load_data_yaml(ds / "data.yaml"), "train")
    assert report.images_with_attributes == 12
    assert all(a is not None for r in records for a in r.attributes)  # every box matched its sidecar object
    samples, manifest = _build(ds, tmp_path / "out", prompts)
    checked = 0
    for s in samples:
        turns = s["conversations"]
        first = turns[0]["value"]
        question = first.split("\n")[-1]
        rows = [list(map(float, line.split())) for line in
                (ds / s["image"].replace("images/", "labels/", 1).replace(".png", ".txt")).read_text().splitlines()]
        h, w = s["meta"]["image_size"]
        xyxy = [((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h) for _, cx, cy, bw, bh in rows]
        dets = Detections(np.array(xyxy).reshape(-1, 4), np.ones(len(rows)), [int(r[0]) for r in rows],
                          dict(enumerate(names)), (h, w))
        assert first == "<image>\n" + ground(dets, question, GroundingConfig()).text
        objects = _objects_from_sidecar(ds, s["image"])
        header = first.split("\n")[1]
        for name, n in Counter(f"{o.colour} {o.name}" for o in objects).items():
            assert f"{n} {name}" in header  # the grounding carries the colour
        questions = [question] + [t["value"] for t in turns[2::2]]
        for kind, q, a in zip(s["meta"]["qa_kinds"], questions, [t["value"] for t in turns[1::2]]):
            assert not re.search(rf"\b({_COLOUR}) ({_COLOUR})\b", q), q  # never "red red circles"
            if kind in QUESTION_KINDS:
                assert answer_key(kind, a) == oracle(q, objects), (s["id"], q, a)
                checked += 1
    assert checked >= 10


def test_scenes_rendered_in_memory_give_the_written_datasets_samples(tmp_path, prompts):
    """build_instruct_rendered (stage 0's scenes, no images written) writes exactly the samples that
    generate_shapes + build_instruct_data give for the same seed, whatever the number of workers."""
    from finetune.instruct import build_instruct_rendered
    from finetune.shapes import render_records

    ds = tmp_path / "cs"
    generate_shapes(ds, ShapesConfig(images=10, imgsz=160, seed=5, val_fraction=0.0, test_fraction=0.0,
                                     labels="colour-shape"))
    written, _ = read_split(load_data_yaml(ds / "data.yaml"), "train")
    rendered = render_records(5, 10, 160, "colour-shape", workers=2)
    assert [(r.rel, r.boxes, r.attributes, dict(r.scene_attributes)) for r in rendered] == \
        [(r.rel, r.boxes, r.attributes, dict(r.scene_attributes)) for r in sorted(written, key=lambda r: r.rel)]
    assert render_records(5, 10, 160, "colour-shape") == rendered
    config = InstructConfig(samples_per_image=3, kinds=("conversation", "conversation", "detailed"))
    from_files = build_instruct_data(ds / "data.yaml", tmp_path / "files", TemplateTeacher(prompts), config)
    in_memory = build_instruct_rendered(tmp_path / "memory", TemplateTeacher(prompts), config, seed=5, images=10,
                                        imgsz=160, workers=2)
    assert (tmp_path / "memory" / "instruct.json").read_text() == (tmp_path / "files" / "instruct.json").read_text()
    assert in_memory["counts"] == from_files["counts"]
    assert in_memory["counts"]["by_kind"] == {"conversation": 20, "detailed": 10, "reasoning": 0}
    assert in_memory["dataset"]["rendered"] == {"generator": "shapes-v1", "seed": 5, "images": 10, "imgsz": 160,
                                                "labels": "colour-shape"}
    with pytest.raises(EdgeVitError, match="count >= 1"):
        render_records(5, 0, 160)
