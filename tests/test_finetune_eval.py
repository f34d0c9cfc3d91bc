"""The held-out shapes benchmark: scoring, prompts through the runtime's functions, the judge, the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_vit.grounding import GroundingConfig, ground
from edge_vit.types import Detections
from edge_vit.vlm import GenerationConfig
from edge_vit.vlm.base import GenerationStats, Step
from finetune.evaluate import (
    BenchConfig,
    accuracy_table,
    answer_questions,
    evaluate,
    format_table,
    judge_scores,
    parse_judge_scores,
    render_benchmark,
    score,
)
from finetune.instruct import QUESTION_KINDS
from finetune.shapes import SHAPE_CLASSES

SMALL = BenchConfig(seed=7, size=6, imgsz=64, per_kind=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread avoids OpenMP spin-waiting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    items, data_yaml = render_benchmark(root, SMALL)
    return root, items, data_yaml


def _frame_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


class TruthDetector:
    """Detections straight from the benchmark's YOLO labels (what a perfect detector would return)."""

    def __init__(self, root: Path) -> None:
        import cv2

        self.by_frame = {}
        self.calls = 0
        for png in sorted((root / "images" / "val").glob("*.png")):
            frame = cv2.imread(str(png))
            h, w = frame.shape[:2]
            rows = [list(map(float, line.split())) for line in
                    (root / "labels" / "val" / (png.stem + ".txt")).read_text().splitlines() if line.strip()]
            xyxy = np.array([[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                             for _, cx, cy, bw, bh in rows], np.float64).reshape(-1, 4)
            self.by_frame[_frame_key(frame)] = Detections(
                xyxy=xyxy, confidence=np.ones(len(rows)), class_id=np.array([int(r[0]) for r in rows], np.int64),
                names=dict(enumerate(SHAPE_CLASSES)), image_size=(h, w))

    def detect(self, frame):
        self.calls += 1
        return self.by_frame[_frame_key(frame)], {}


class FakeVLM:
    """A VLM protocol object: answers from a table keyed by (frame, question), recording every prompt it gets."""

    name = "fake"
    max_context = 4096

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.prompts: list[str] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, image, prompt, config=GenerationConfig(), cancel=None):
        self.prompts.append(prompt)
        text = self.answers.get((_frame_key(image), prompt.splitlines()[-1]), "")
        yield Step(text=text, token_id=0)
        yield Step(stats=GenerationStats(new_tokens=1))


def _truth_table(root: Path, items, transform=lambda kind, answer: answer) -> dict:
    import cv2

    keys = {it.image: _frame_key(cv2.imread(str(root / it.image))) for it in items}
    return {(keys[it.image], it.question): transform(it.kind, it.answer) for it in items}


WRONG = {"count": "99 things.", "exists": "Maybe.", "colour": "Plaid.", "position": "Nowhere.", "size": "Huge."}


@pytest.mark.parametrize("oracle, expected", [("truth", 1.0), ("wrong", 0.0)])
def test_scorer_gives_100_percent_to_the_truth_and_0_to_wrong_answers(bench, oracle, expected):
    root, items, _ = bench
    transform = (lambda kind, answer: answer) if oracle == "truth" else (lambda kind, answer: WRONG[kind])
    vlm = FakeVLM(_truth_table(root, items, transform))
    detector = TruthDetector(root)
    records = answer_questions(items, root, detector, vlm, grounding=GroundingConfig(), generation=GenerationConfig())
    records += answer_questions(items, root, detector, vlm, grounding=None, generation=GenerationConfig())
    table = accuracy_table(records)
    assert set(table) == {"grounded", "ungrounded"}
    for cond in table:
        assert table[cond]["all"]["total"] == len(items)
        assert {k for k in table[cond] if k != "all"} <= set(QUESTION_KINDS)
        for row in table[cond].values():
            assert row["accuracy"] == expected and row["correct"] == round(expected * row["total"])
    assert detector.calls == 2 * SMALL.size  # once per image and condition


def test_accuracy_counts_half_right_per_kind():
    records = [
        {"kind": "count", "answer": "2 circles.", "prediction": "Two.", "grounded": True},
        {"kind": "count", "answer": "2 circles.", "prediction": "3 circles.", "grounded": True},
        {"kind": "exists", "answer": "Yes.", "prediction": "yes, there is", "grounded": False},
        {"kind": "position", "answer": "Top-left.", "prediction": "Top.", "grounded": False},
    ]
    t = accuracy_table(records)
    assert t["grounded"]["count"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert t["ungrounded"]["exists"]["accuracy"] == 1.0 and t["ungrounded"]["position"]["accuracy"] == 0.0
    assert t["ungrounded"]["all"] == {"correct": 1, "total": 2, "accuracy": 0.5}


@pytest.mark.parametrize("kind, prediction, answer, ok", [
    ("count", "2 circles.", "2 circles.", True),
    ("count", "Two circles.", "2 circles.", True),
    ("count", "There are 2.", "2 circles.", False),  # the number must come first
    ("exists", "No, there is none.", "No.", True),
    ("colour", "red", "Red.", True),
    ("position", "top-left corner", "Top-left.", True),
    ("position", "Top.", "Top-left.", False),
    ("size", "", "Small.", False),
])
def test_score_checks_the_first_word(kind, prediction, answer, ok):
    assert score(kind, prediction, answer) is ok


def test_benchmark_is_seeded_and_apart_from_training_images(tmp_path, bench):
    from finetune.shapes import ShapesConfig, generate_shapes

    root, items, data_yaml = bench
    again, _ = render_benchmark(tmp_path / "again", SMALL)
    assert again == items
    assert (tmp_path / "again" / "images" / "val" / "000003.png").read_bytes() == \
        (root / "images" / "val" / "000003.png").read_bytes()
    other, _ = render_benchmark(tmp_path / "other", BenchConfig(seed=8, size=6, imgsz=64))
    assert other != items
    # The training splits of the same seed are other images.
    train = generate_shapes(tmp_path / "train", ShapesConfig(images=6, imgsz=64, seed=SMALL.seed, val_fraction=0.0,
                                                             test_fraction=0.0))
    train_pngs = {p.read_bytes() for p in (train.data_yaml.parent / "images" / "train").glob("*.png")}
    assert not train_pngs & {p.read_bytes() for p in (root / "images" / "val").glob("*.png")}
    kinds = {it.kind for it in items}
    assert {"count", "exists", "position"} <= kinds
    meta = json.loads((root / "questions.json").read_text())
    assert len(meta["questions"]) == len(items) and len(meta["scenes"]) == SMALL.size


def test_prompts_are_the_runtime_prompts(bench):
    """Grounded: edge_vit.grounding.ground with the VLM's own token counter, as `edge-vit run`; else the question."""
    import cv2

    root, items, _ = bench
    vlm = FakeVLM({})
    detector = TruthDetector(root)
    cfg = GroundingConfig(max_tokens=40)
    records = answer_questions(items, root, detector, vlm, grounding=cfg, generation=GenerationConfig())
    for it, r in zip(items, records):
        detections, _ = detector.detect(cv2.imread(str(root / it.image)))
        assert r["prompt"] == ground(detections, it.question, cfg, count_tokens=vlm.count_tokens).text
    records = answer_questions(items, root, detector, vlm, grounding=None, generation=GenerationConfig())
    assert [r["prompt"] for r in records] == [it.question for it in items]


def test_evaluate_reports_gain_and_formats_a_table(bench, tmp_path):
    root, items, _ = bench
    # Right only when grounded: the fake answers from the truth when the prompt carries detections.
    truth = _truth_table(root, items)

    class GroundedOnly(FakeVLM):
        def generate(self, image, prompt, config=GenerationConfig(), cancel=None):
            grounded = prompt.startswith("Detected objects")
            self.answers = truth if grounded else {}
            yield from super().generate(image, prompt, config, cancel)

    report, records = evaluate(vlm=GroundedOnly({}), detector=TruthDetector(root), bench=SMALL, root=tmp_path / "b",
                               generation=GenerationConfig(), grounding=GroundingConfig())
    assert report["accuracy"]["grounded"]["all"]["accuracy"] == 1.0
    assert report["accuracy"]["ungrounded"]["all"]["accuracy"] == 0.0
    assert report["grounding_gain"]["all"] == 1.0 and report["questions"] == len(items)
    # A perfect detector: every image's detections are the truth, so det-exact covers every grounded question.
    assert report["detector_exact"] == {"images": SMALL.size, "of": SMALL.size, "share": 1.0}
    assert report["accuracy"]["detector_exact"] == report["accuracy"]["grounded"]
    table = format_table(report)
    assert table.splitlines()[0].split() == ["kind", "grounded", "ungrounded", "det-exact", "questions"]
    assert "all" in table and "100.0%" in table


def test_det_exact_leaves_out_images_the_detector_got_wrong(bench, tmp_path):
    """An object missed in one image, and one moved to another grid cell in another: those two images'
    questions leave the det-exact column, and their recorded detections say what was seen."""
    root, items, _ = bench
    detector = TruthDetector(root)
    frames = sorted((k, d) for k, d in detector.by_frame.items() if len(d))
    (miss_key, miss), (move_key, move) = frames[0], frames[1]
    detector.by_frame[miss_key] = Detections(xyxy=miss.xyxy[1:], confidence=miss.confidence[1:],
                                             class_id=miss.class_id[1:], names=miss.names, image_size=miss.image_size)
    h, w = move.image_size
    moved = move.xyxy.copy()
    x0, y0, x1, y1 = moved[0]
    cx = (x0 + x1) / 2
    shift = (w * 5 / 6 - cx) if cx < w / 3 else (w / 6 - cx)  # into the right or left column
    moved[0] = [x0 + shift, y0, x1 + shift, y1]
    detector.by_frame[move_key] = Detections(xyxy=moved, confidence=move.confidence, class_id=move.class_id,
                                             names=move.names, image_size=move.image_size)
    truth = _truth_table(root, items)
    report, records = evaluate(vlm=FakeVLM(truth), detector=detector, bench=SMALL, root=tmp_path / "b",
                               generation=GenerationConfig(), grounding=GroundingConfig(), ungrounded=False)
    wrong = {r["image"] for r in records if not r["detector_exact"]}
    assert len(wrong) == 2 and report["detector_exact"]["images"] == SMALL.size - 2
    assert report["accuracy"]["detector_exact"]["all"]["total"] == sum(r["image"] not in wrong for r in records)
    missed = next(r for r in records if r["image"] in wrong and r["detections"] < len(truth_objects(r, root)))
    assert len(missed["detected"]) == len(truth_objects(missed, root)) - 1


def truth_objects(record, root):
    return json.loads((root / "questions.json").read_text())["scenes"][record["image"]]["objects"]


# ---------------------------------------------------------------- judge


class _Judge(BaseHTTPRequestHandler):
    seen: list = []
    reply = "8 6\nAssistant 2 is close but less exact."

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append(body)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": _Judge.reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    _Judge.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_through_the_teachers_http_client(judge_server, bench):
    from finetune.teachers import OpenAITeacher, load_prompts

    root, items, _ = bench
    scenes = json.loads((root / "questions.json").read_text())["scenes"]
    records = [{"image": it.image, "question": it.question, "answer": it.answer, "prediction": "1 circle.",
                "grounded": k % 2 == 0, "kind": it.kind} for k, it in enumerate(items[:4])]
    client = OpenAITeacher(judge_server, "judge-model", load_prompts(), max_retries=0, temperature=0.0)
    out = judge_scores(records, scenes, client)
    assert out["grounded"] == {"model_score": 6.0, "reference_score": 8.0, "relative_score": 75.0, "judged": 2,
                               "unparsed": 0}
    assert len(_Judge.seen) == 4
    sent = _Judge.seen[0]
    assert sent["model"] == "judge-model"
    user = sent["messages"][1]["content"]
    assert items[0].question in user and items[0].answer in user and "The image shows" in user


@pytest.mark.parametrize("text, parsed", [
    ("8 6\nwhy", (8.0, 6.0)), ("7.5, 9", (7.5, 9.0)), ("Scores: 8 6", None), ("11 3", None), ("", None),
])
def test_judge_reply_parsing(text, parsed):
    assert parse_judge_scores(text) == parsed


# ---------------------------------------------------------------- the CLI, end to end


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from edge_vit.cli import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def adapter(tiny_idefics3, tmp_path_factory) -> Path:
    """A 2-step stage-2 adapter for the tiny Idefics3 (trained on a few shapes images)."""
    from finetune.instruct import InstructConfig, build_instruct_data
    from finetune.shapes import ShapesConfig, generate_shapes
    from finetune.teachers import TemplateTeacher, load_prompts
    from finetune.train import TrainConfig, run_training

    tmp = tmp_path_factory.mktemp("eval-adapter")
    shapes = generate_shapes(tmp / "shapes", ShapesConfig(images=3, imgsz=64, seed=2, val_fraction=0.0,
                                                          test_fraction=0.0))
    build_instruct_data(shapes.data_yaml, tmp / "data", TemplateTeacher(load_prompts()), InstructConfig())
    run_training(TrainConfig(model=str(tiny_idefics3), data=str(tmp / "data" / "instruct.json"), out=str(tmp / "a"),
                             stage=2, max_steps=2, progress=False))
    return tmp / "a"


def test_eval_cli_end_to_end(capsys, tiny_idefics3, tiny_yolo, adapter, judge_server, tmp_path):
    """Tiny Idefics3 + adapter and a random YOLO through the real runtime: report structure, files, judge."""
    out = tmp_path / "eval"
    rc, stdout, err = _cli(capsys, "finetune", "eval", "--vlm", str(tiny_idefics3), "--adapter", str(adapter),
                           "--detector", str(tiny_yolo), "--seed", "3", "--size", "3", "--imgsz", "64",
                           "--out", str(out), "--max-new-tokens", "6", "--judge-endpoint", judge_server,
                           "--judge-model", "judge", "--agnostic-nms", "--iou", "0.5", "--size-words", "0.2,0.4",
                           "--grounding-order", "question", "--grounding-counts")
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    report = json.loads(lines[-1])
    # det-exact: the random COCO-class YOLO is "exactly right" only on images with nothing in them, if any.
    exact = ["det-exact"] if "detector_exact" in report["accuracy"] else []
    assert lines[0].split() == ["kind", "grounded", "ungrounded", *exact, "questions"]
    assert report == json.loads((out / "report.json").read_text())
    assert report["type"] == "eval" and report["images"] == 3 and report["adapter"] == str(adapter)
    detector = dict(report["detector_settings"])
    assert Path(detector.pop("model")).stem == tiny_yolo.stem  # the .pt, or an .onnx exported next to it
    assert detector == {"imgsz": 64, "conf": 0.25, "iou": 0.5, "agnostic_nms": True}
    assert report["grounding"]["size_words"] == [0.2, 0.4] and report["grounding"]["positions"] == "words"
    assert report["grounding"]["order"] == "question" and report["grounding"]["question_counts"] is True
    grounded = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all("\nCounts: " in r["prompt"] for r in grounded if r["grounded"])
    for cond in ("grounded", "ungrounded"):
        table = report["accuracy"][cond]
        assert table["all"]["total"] == report["questions"] > 0
        assert sum(v["total"] for k, v in table.items() if k != "all") == report["questions"]
        assert all(0.0 <= v["accuracy"] <= 1.0 for v in table.values())
    det = report["detector_val"]
    assert 0.0 <= det["map50"] <= 1.0 and det["classes_match"] is False  # a random COCO-class YOLO
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * report["questions"]
    assert all(a["correct"] == score(a["kind"], a["prediction"], a["answer"]) for a in answers)
    assert report["judge"]["grounded"]["judged"] == report["questions"]
    assert len(_Judge.seen) == 2 * report["questions"]
    assert (out / "benchmark" / "data.yaml").is_file()


@pytest.mark.parametrize("case", ["missing detector", "not a model", "bad adapter", "judge without model", "bad iou"])
def test_eval_bad_inputs_end_with_one_error_line(case, capsys, tiny_idefics3, tiny_yolo, tmp_path):
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    base = ["finetune", "eval", "--size", "1", "--imgsz", "64", "--out", str(tmp_path / "o")]
    args = {
        "missing detector": ["--vlm", str(tiny_idefics3), "--detector", str(tmp_path / "nope.pt")],
        "not a model": ["--vlm", str(not_model), "--detector", str(tiny_yolo)],
        "bad adapter": ["--vlm", str(tiny_idefics3), "--adapter", str(not_model), "--detector", str(tiny_yolo)],
        "judge without model": ["--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                                "--judge-endpoint", "http://127.0.0.1:9/v1"],
        "bad iou": ["--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo), "--iou", "1.5"],
    }[case]
    rc, _, err = _cli(capsys, *base, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge-vit: error:"), err
    assert not (tmp_path / "o").exists()


def test_benchmark_kinds_and_colour_shape_labels(tmp_path):
    """By default the benchmark asks the four kinds the grounding can answer (size is opt-in); with the
    colour-shape scheme its YOLO labels name colour and shape, so the demo detector's mAP is measured."""
    from finetune.shapes import class_names

    config = BenchConfig(seed=7, size=6, imgsz=160, labels="colour-shape")
    items, data_yaml = render_benchmark(tmp_path / "cs", config)
    assert {it.kind for it in items} <= {"count", "exists", "colour", "position"}
    assert {"count", "exists"} <= {it.kind for it in items}
    import yaml

    names = list(yaml.safe_load(data_yaml.read_text())["names"].values())
    assert names == list(class_names("colour-shape"))
    for attr in sorted((tmp_path / "cs" / "attributes" / "val").glob("*.json")):
        objects = json.loads(attr.read_text())["objects"]
        ids = [int(line.split()[0]) for line in (tmp_path / "cs" / "labels" / "val" / (attr.stem + ".txt")).read_text().splitlines()]
        assert [names[i] for i in ids] == [f"{o['colour']} {o['class']}" for o in objects]
    # The same seed with size questions asked: same images, the size questions added.
    with_size, _ = render_benchmark(tmp_path / "s", BenchConfig(seed=7, size=6, imgsz=160,
                                                                kinds=("count", "exists", "colour", "position", "size")))
    assert [it for it in with_size if it.kind != "size"] == items and any(it.kind == "size" for it in with_size)
    with pytest.raises(Exception, match="kinds"):
        BenchConfig(kinds=("count", "weather"))


def test_eval_onnx_backend_gives_the_torch_answers(capsys, tiny_idefics3, tiny_yolo, tmp_path):
    """--backend onnx scores the exported graphs: the same predictions as torch, question for question."""
    from export.onnx_export import export_vlm_onnx

    folder = tmp_path / "onnx"
    export_vlm_onnx(str(tiny_idefics3), folder)
    preds = {}
    for backend, vlm in (("torch", tiny_idefics3), ("onnx", folder)):
        out = tmp_path / backend
        rc, stdout, err = _cli(capsys, "finetune", "eval", "--vlm", str(vlm), "--backend", backend,
                               "--detector", str(tiny_yolo), "--seed", "4", "--size", "3", "--imgsz", "64",
                               "--out", str(out), "--max-new-tokens", "6", "--no-map", "--no-progress")
        assert rc == 0, err
        assert json.loads(stdout.strip().splitlines()[-1])["backend"] == backend
        preds[backend] = [(a["question"], a["grounded"], a["prediction"])
                          for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())]
    assert preds["onnx"] == preds["torch"] and len(preds["torch"]) > 0
    rc, _, err = _cli(capsys, "finetune", "eval", "--vlm", str(tiny_idefics3), "--backend", "onnx",
                      "--detector", str(tiny_yolo))
    assert rc == 2 and len(err.strip().splitlines()) == 1
