"""`edge-vit run` end to end, as a user runs it: a subprocess, real files, tiny local models."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import count_video_frames, read_jsonl, run_cli


def by_type(events, kind):
    return [e for e in events if e["type"] == kind]


def test_run_on_clip_writes_jsonl_and_video(tmp_path, clip, tiny_yolo, tiny_idefics3):
    out, video = tmp_path / "out.jsonl", tmp_path / "out.mp4"
    r = run_cli("run", "--source", str(clip), "--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                "--imgsz", "64", "--conf", "0.0", "--jsonl", str(out), "--save-video", str(video),
                "--max-frames", "30", "--every", "0.2", "--max-new-tokens", "8", "--track")
    assert r.returncode == 0, r.stderr
    events = read_jsonl(out)
    assert events[0]["type"] == "start" and events[-1]["type"] == "status" and events[-1]["final"]
    assert events[0]["grounding"] == {"positions": "words", "max_tokens": 96, "max_objects": None,
                                      "order": "confidence", "include_confidence": False,
                                      "header": "Detected objects", "size_words": None,
                                      "question_counts": False}
    dets = by_type(events, "detections")
    assert [e["frame"] for e in dets] == list(range(30))
    assert all(set(e["timings"]) == {"detect_pre", "detect_infer", "detect_post"} for e in dets)
    answers = by_type(events, "answer")
    assert answers, "no answer events"
    for a in answers:
        assert {"frame", "prompt", "answer", "timings", "grounding"} <= set(a)
        assert a["prompt"].startswith("Describe") and a["grounding"].startswith("Detected objects")
        assert a["timings"]["ttft"] > 0 and a["new_tokens"] >= 1
    assert events[-1]["frames"] == 30 and events[-1]["stopped_by"] == "max_frames"
    assert count_video_frames(video) == 30
    assert "[frame 0]" in r.stdout  # answers stream to the console


def test_lookup_as_the_readme_runs_it_gives_the_same_answers(tmp_path, clip, tiny_yolo, tiny_idefics3):
    """--lookup N: answers identical to decoding one token a pass; the answer events count the drafts."""
    answers = {}
    for lookup in ("0", "4"):
        out = tmp_path / f"lookup{lookup}.jsonl"
        r = run_cli("run", "--source", str(clip), "--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                    "--imgsz", "64", "--conf", "0.0", "--jsonl", str(out), "--max-frames", "4", "--every", "0",
                    "--max-new-tokens", "40", "--prompt", "Describe the scene. Describe the scene.",
                    "--lookup", lookup)
        assert r.returncode == 0, r.stderr
        answers[lookup] = {a["frame"]: a for a in by_type(read_jsonl(out), "answer")}
    common = sorted(set(answers["0"]) & set(answers["4"]))
    assert common, "no frame answered in both runs"
    for frame in common:
        plain, lookup = answers["0"][frame], answers["4"][frame]
        assert plain["grounding"] == lookup["grounding"] and plain["answer"] == lookup["answer"]
        assert "draft_tokens" not in plain["timings"]
    drafted = [a["timings"] for a in answers["4"].values() if "draft_tokens" in a["timings"]]
    assert drafted and all(0 <= t["accepted_tokens"] <= t["draft_tokens"] for t in drafted)


def test_grounding_counts_line_as_the_readme_runs_it(tmp_path, clip, tiny_yolo, tiny_idefics3):
    """--grounding-counts: the line after the header counts the frame's detections and the class the prompt
    names (the tiny detector's classes are named "0".."79")."""
    out = tmp_path / "out.jsonl"
    r = run_cli("run", "--source", str(clip), "--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                "--imgsz", "64", "--conf", "0.0", "--jsonl", str(out), "--max-frames", "6", "--every", "0",
                "--max-new-tokens", "4", "--prompt", "How many 7 are there?", "--grounding-counts")
    assert r.returncode == 0, r.stderr
    events = read_jsonl(out)
    assert events[0]["grounding"]["question_counts"] is True
    counts = {e["frame"]: e["counts"] for e in by_type(events, "detections")}
    answers = by_type(events, "answer")
    assert answers, "no answer events"
    for a in answers:
        lines = a["grounding"].splitlines()
        frame = counts[a["frame"]]
        assert lines[0].startswith("Detected objects")
        assert lines[1] == f"Counts: {sum(frame.values())} in all, 7: {frame.get('7', 0)}."


def test_llava_on_image_folder_without_grounding(tmp_path, tiny_yolo, tiny_llava):
    import cv2
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (1, 2, 10):
        cv2.imwrite(str(folder / f"img{i}.jpg"), np.full((60, 80, 3), 20 * i, np.uint8))
    (folder / "img3.jpg").write_bytes(b"not a jpeg")  # corrupt: skipped and counted
    out = tmp_path / "out.jsonl"
    r = run_cli("run", "--source", str(folder), "--vlm", str(tiny_llava), "--detector", str(tiny_yolo),
                "--imgsz", "64", "--no-grounding", "--every", "0", "--max-new-tokens", "4", "--jsonl", str(out),
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    events = read_jsonl(out)
    assert len(by_type(events, "detections")) == 3
    assert all(a["grounding"] == "" for a in by_type(events, "answer"))
    assert events[-1]["corrupt"] == 1 and events[-1]["stopped_by"] == "end"


def test_detector_only_from_yaml(tmp_path, clip):
    out = tmp_path / "out.jsonl"
    # yolo26n.yaml builds offline (random weights), as the "done when" command uses it
    r = run_cli("run", "--source", str(clip), "--vlm", "none", "--detector", "yolo26n.yaml", "--imgsz", "64",
                "--jsonl", str(out), "--max-frames", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    events = read_jsonl(out)
    types = [e["type"] for e in events if not (e["type"] == "status" and not e.get("final"))]
    assert types == ["start"] + ["detections"] * 5 + ["status"]  # (periodic status events may come between)


def test_prompt_longer_than_context_is_reported_not_fatal(tmp_path, clip, tiny_yolo, tiny_idefics3):
    out = tmp_path / "out.jsonl"
    r = run_cli("run", "--source", str(clip), "--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                "--imgsz", "64", "--prompt", "red circle " * 300, "--max-frames", "3", "--jsonl", str(out),
                "--quiet")
    assert r.returncode == 0, r.stderr
    events = read_jsonl(out)
    errors = by_type(events, "error")
    assert errors and "exceeds the model's context" in errors[0]["message"]
    assert len(by_type(events, "detections")) == 3 and events[-1]["errors"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size-words", "0.3,0.1"], "argument --size-words: must satisfy 0 < SMALL < MEDIUM <= 1"),
        (["--size-words", "small"], "argument --size-words: must be two numbers"),
        (["--grounding-tokens", "0"], "argument --grounding-tokens: must be >= 1"),
        (["--grounding-order", "alphabetical"], "argument --grounding-order: invalid choice: 'alphabetical'"),
        (["--lookup", "16"], "argument --lookup: must be in [0, 15], got 16"),
    ],
)
def test_bad_flag_values_are_usage_errors(args, message):
    # argparse's own error: the usage line, then one error line; exit 2, no traceback.
    r = run_cli("run", "--source", "x.mp4", *args, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith(f"edge-vit run: error: {message}"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "/nonexistent/clip.mp4"], "source not found: /nonexistent/clip.mp4"),
        (["--source", "http://127.0.0.1:9/none.mjpg"], "cannot open stream"),
        (["--detector", "/nonexistent/model.pt"], "detector model not found"),
        (["--detector", "{notmodel}"], "expected an Ultralytics YOLO model"),
        (["--vlm", "{emptydir}"], "expected a transformers model folder"),
        (["--vlm", "{notmodel}"], "expected a transformers model folder"),
        (["--classes", "unicorn"], "unknown class 'unicorn'"),
        (["--imgsz", "100"], "--imgsz must be a multiple of 32"),
        (["--iou", "0"], "--iou must be in (0, 1], got 0.0"),
        (["--jsonl", "/proc/forbidden/out.jsonl"], "cannot write JSONL file"),
        (["--backend", "trt", "--lookup", "2"], "--lookup works with --backend torch or onnx"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, clip, tiny_yolo, tiny_idefics3, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.pt").write_text("not a model")
    fill = {"{emptydir}": str(tmp_path / "empty"), "{notmodel}": str(tmp_path / "model.pt")}
    args = [fill.get(a, a) for a in args]
    base = {"--source": str(clip), "--detector": str(tiny_yolo), "--vlm": str(tiny_idefics3), "--imgsz": "64"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    r = run_cli("run", *flat, "--max-frames", "2", timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-vit: error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_complete_outputs(tmp_path, tiny_yolo, tiny_idefics3, sig):
    from edge_vit.tiny import write_clip

    long_clip = write_clip(tmp_path / "long.mp4", n_frames=400, width=160, height=120)
    out, video = tmp_path / "out.jsonl", tmp_path / "out.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_vit", "run", "--source", str(long_clip), "--vlm", str(tiny_idefics3),
         "--detector", str(tiny_yolo), "--imgsz", "64", "--jsonl", str(out), "--save-video", str(video),
         "--every", "0", "--max-new-tokens", "400", "--realtime"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and '"type":"answer"' in out.read_text():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no answer before the deadline")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    events = read_jsonl(out)  # every line parses
    final = events[-1]
    assert final["type"] == "status" and final["final"] and final["stopped_by"] == "signal"
    frames = len(by_type(events, "detections"))
    assert 0 < frames < 400
    assert count_video_frames(video) == frames


@pytest.mark.timeout(180)
def test_run_reconnects_to_a_live_stream_and_continues(tmp_path, tiny_yolo, tiny_idefics3):
    """A live MJPEG stream drops for 2 s mid-run; the run reconnects and keeps detecting and answering."""
    from mjpeg_server import POST_OUTAGE_SEQ, MjpegServer

    out = tmp_path / "out.jsonl"
    with MjpegServer(fps=20, pre_frames=30, outage="drop", outage_s=2.0, lifetime_s=120) as server:
        r = run_cli("run", "--source", server.url, "--vlm", str(tiny_idefics3), "--detector", str(tiny_yolo),
                    "--imgsz", "64", "--jsonl", str(out), "--max-frames", "60", "--every", "0.3",
                    "--max-new-tokens", "4", "--stall-timeout", "1", "--quiet", timeout=150)
        served_after = server.next_seq - POST_OUTAGE_SEQ
    assert r.returncode == 0, r.stderr
    events = read_jsonl(out)
    final = events[-1]
    assert final["reconnects"] >= 1 and final["frames"] == 60 and final["stopped_by"] == "max_frames"
    dets = by_type(events, "detections")
    times = [e["time"] for e in dets]
    gaps = [b - a for a, b in zip(times, times[1:])]
    outage_at = max(range(len(gaps)), key=gaps.__getitem__)
    assert gaps[outage_at] > 1.5  # the outage is visible in the frame times...
    assert 10 <= outage_at + 1 < 60  # ...with frames before it and after it
    assert served_after > 0
    answers_after = [a for a in by_type(events, "answer") if a["time"] > times[outage_at + 1]]
    assert answers_after, "the VLM keeps answering after the reconnect"


def _max_cross_class_iou(objects, any_class: bool = False) -> float:
    """The largest IoU between two boxes of different classes (``any_class``: of any classes) in one frame's
    objects."""
    best = 0.0
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if a["class_id"] == b["class_id"] and not any_class:
                continue
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["xyxy"], b["xyxy"]
            inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
            union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
            best = max(best, inter / union if union > 0 else 0.0)
    return best


def test_agnostic_nms_keeps_one_box_per_place_across_classes(tmp_path):
    """--agnostic-nms: NMS over all classes together, so no two kept boxes of any classes overlap above --iou.

    The shipped demo detector (colour-shape classes, NMS after its one-to-many head) on 12 benchmark scenes:
    class by class it keeps an "orange square" on top of an "orange hexagon" in some of them (seen on 3 of
    these 12); across classes, one box per shape. (A random tiny YOLO gives every box the same class, so it
    cannot show this.)
    """
    from edge_vit.demo import ASSETS, DETECTOR_FILE
    from finetune.evaluate import BenchConfig, render_benchmark

    detector = ASSETS / DETECTOR_FILE
    if not detector.is_file():
        pytest.skip("the demo detector is not installed")
    render_benchmark(tmp_path / "bench", BenchConfig(seed=2026, size=12, imgsz=320))
    runs = {}
    for flag, iou in (("--no-agnostic-nms", "0.7"), ("--agnostic-nms", "0.7"), ("--agnostic-nms", "0.5")):
        out = tmp_path / f"{flag}-{iou}.jsonl"
        r = run_cli("run", "--source", str(tmp_path / "bench" / "images" / "val"), "--vlm", "none",
                    "--detector", str(detector), "--imgsz", "256", "--jsonl", str(out), "--quiet", flag,
                    "--iou", iou)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""  # --quiet; Ultralytics' "Loading ... for ONNX Runtime inference" goes to stderr
        runs[flag, iou] = events = read_jsonl(out)
        assert events[0]["detector_settings"] == {"imgsz": 256, "conf": 0.25, "iou": float(iou), "track": False,
                                                  "agnostic_nms": flag == "--agnostic-nms"}
    # --iou 0.5 (the demo's): no two kept boxes of any classes overlap above it; at 0.7 some did (one shape,
    # two boxes: seen on 1 of these 12 scenes at IoU 0.66).
    any_class = {iou: [_max_cross_class_iou(e["objects"], any_class=True)
                       for e in by_type(runs["--agnostic-nms", iou], "detections")] for iou in ("0.7", "0.5")}
    assert len(any_class["0.5"]) == 12 and max(any_class["0.5"]) <= 0.5 < max(any_class["0.7"])
    runs = {flag: runs[flag, "0.7"] for flag in ("--no-agnostic-nms", "--agnostic-nms")}
    per_class = [_max_cross_class_iou(e["objects"]) for e in by_type(runs["--no-agnostic-nms"], "detections")]
    agnostic = [_max_cross_class_iou(e["objects"]) for e in by_type(runs["--agnostic-nms"], "detections")]
    assert len(per_class) == len(agnostic) == 12
    assert max(per_class) > 0.7
    assert max(agnostic) <= 0.7
