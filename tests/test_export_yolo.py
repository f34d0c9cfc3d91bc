"""YOLO export through Ultralytics, offline: the NMS-free (1, 300, 6) ONNX output, the same boxes as the .pt,
the detector picking up an export next to its .pt, and the CLI as a user runs it.

The model is YOLO26n from its YAML with random weights, re-initialised so its scores spread out (the
default init makes every feature vanish and every score equal); nothing is downloaded.
"""

import importlib.util
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from edge_vit.detector import Detector, DetectorConfig, prefer_exported
from edge_vit.errors import EdgeVitError, ModelLoadError
from export.yolo import (
    YoloExportOptions,
    YoloFormat,
    check_yolo_export,
    export_kwargs,
    export_yolo,
    precision_kwargs,
)

IMGSZ = 128
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _spread_yolo(path: Path) -> Path:
    """YOLO26n with fan-in scaled conv weights and sharper class logits, saved as a .pt."""
    import torch
    from torch import nn
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolo26n.yaml")
    head = model.model.model[-1]
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for branch in (head.cv3, head.one2one_cv3):
            for seq in branch:
                seq[-1].bias.fill_(-2.0)
                seq[-1].weight.mul_(20)
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(pt, onnx result): the .pt and its ONNX export next to it."""
    folder = tmp_path_factory.mktemp("yolo-export")
    pt = _spread_yolo(folder / "spread-yolo26n.pt")
    return pt, export_yolo(str(pt), YoloExportOptions(imgsz=IMGSZ))


@pytest.fixture(scope="module")
def frame():
    from edge_vit.tiny import render_shapes_frame

    # Square: the .pt letterboxes to the minimal rectangle, the fixed-size export to the full square;
    # a square frame gives both the same input.
    return render_shapes_frame(3, 256, 256)[0]


def test_onnx_export_keeps_the_end_to_end_output(exported):
    pt, result = exported
    assert result.path == pt.with_suffix(".onnx") and result.path.is_file()
    assert result.output_shape == (1, 300, 6)  # x1, y1, x2, y2, score, class: no NMS afterwards
    assert result.end2end is True


def test_exported_onnx_gives_the_same_boxes_as_the_pt(exported, frame):
    """The ONNX through the Detector vs the .pt with the same NMS-free head (Ultralytics' nms=False)."""
    from ultralytics import YOLO

    from edge_vit.types import Detections

    pt, result = exported
    detector = Detector.load(DetectorConfig(model=str(result.path), imgsz=IMGSZ, conf=0.25, device="cpu"))
    ours, timings = detector.detect(frame)
    ref = Detections.from_ultralytics(
        YOLO(str(pt), task="detect").predict(frame, imgsz=IMGSZ, conf=0.25, nms=False, device="cpu", verbose=False)[0]
    )
    assert len(ref.confidence) >= 20 and timings["detect_infer"] > 0
    a, b = np.argsort(-ref.confidence)[:20], np.argsort(-ours.confidence)[:20]
    np.testing.assert_allclose(ours.confidence[b], ref.confidence[a], atol=1e-3)
    np.testing.assert_allclose(ours.xyxy[b], ref.xyxy[a], atol=0.5)  # pixels of a 256 px frame
    np.testing.assert_array_equal(ours.class_id[b], ref.class_id[a])


def test_detector_prefers_the_export_next_to_the_pt(exported):
    pt, result = exported
    assert Detector.load(DetectorConfig(model=str(pt), imgsz=IMGSZ, device="cpu")).config.model == str(result.path)
    kept = Detector.load(DetectorConfig(model=str(pt), imgsz=IMGSZ, device="cpu", prefer_exported=False))
    assert kept.config.model == str(pt)


def _touch(path: Path, mtime: float) -> Path:
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("files, device, expected", [
    ({"m.pt": 100, "m.onnx": 200}, "cpu", "m.onnx"),
    ({"m.pt": 100, "m.onnx": 100}, "cpu", "m.onnx"),  # same second (coarse file systems): not stale
    ({"m.pt": 200, "m.onnx": 100}, "cpu", "m.pt"),  # older than the .pt: stale
    ({"m.pt": 100, "m.onnx": 200}, "cuda", "m.pt"),  # CUDA wants an engine
    ({"m.pt": 100, "m.onnx": 200, "m.engine": 200}, "cuda:0", "m.engine"),
    ({"m.pt": 100, "m.engine": 200}, "0", "m.engine"),
    ({"m.pt": 100, "m.engine": 200}, "cpu", "m.pt"),
    ({"m.pt": 100, "m.onnx": 200}, "mps", "m.pt"),
])
def test_prefer_exported(tmp_path, files, device, expected):
    for name, mtime in files.items():
        _touch(tmp_path / name, mtime)
    assert prefer_exported(str(tmp_path / "m.pt"), device) == str(tmp_path / expected)


def test_prefer_exported_leaves_other_paths_alone(tmp_path):
    _touch(tmp_path / "m.onnx", 100)
    assert prefer_exported(str(tmp_path / "m.onnx"), "cpu") == str(tmp_path / "m.onnx")
    assert prefer_exported("yolo26n.pt", "cpu") == "yolo26n.pt"  # not on disk (an asset name)
    assert prefer_exported(str(tmp_path / "m.yaml"), "cpu") == str(tmp_path / "m.yaml")


def test_export_kwargs_are_nms_free_and_offline():
    kwargs = export_kwargs(YoloExportOptions(imgsz=320, half=True), simplify=False, has_quantize=True)
    assert kwargs["nms"] is False and kwargs["simplify"] is False and kwargs["quantize"] == 16
    assert kwargs["format"] == "onnx" and kwargs["imgsz"] == 320 and kwargs["dynamic"] is False
    engine = export_kwargs(YoloExportOptions(format="engine", int8=True, data="d.yaml", workspace_gb=2),
                           simplify=True, has_quantize=True)
    assert engine["device"] == "0" and engine["quantize"] == 8 and engine["data"] == "d.yaml"
    assert engine["workspace"] == 2
    assert precision_kwargs(half=True, int8=False, has_quantize=False) == {"half": True, "int8": False}
    assert precision_kwargs(half=False, int8=False, has_quantize=True) == {"quantize": None}


@pytest.mark.parametrize("kwargs, message", [
    (dict(imgsz=100), "--imgsz"),
    (dict(half=True, int8=True), "one of"),
    (dict(int8=True), "--data"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(EdgeVitError, match=message):
        YoloExportOptions(**kwargs)


def test_bad_paths(exported, tmp_path):
    pt, _ = exported
    with pytest.raises(ModelLoadError, match=".pt"):
        check_yolo_export(str(tmp_path / "missing.pt"), YoloExportOptions())
    with pytest.raises(EdgeVitError, match="must end in .onnx"):
        check_yolo_export(str(pt), YoloExportOptions(), tmp_path / "x.engine")
    with pytest.raises(EdgeVitError, match="not found"):
        check_yolo_export(str(pt), YoloExportOptions(int8=True, data=str(tmp_path / "none.yaml")))
    assert check_yolo_export(str(pt), YoloExportOptions(format=YoloFormat.ONNX)) == pt.with_suffix(".onnx")


def test_cli_exports_to_out(exported, tmp_path):
    pt, _ = exported
    out = tmp_path / "sub" / "detector.onnx"
    t0 = time.time()
    result = run_cli("export", "yolo", "--model", str(pt), "--imgsz", str(IMGSZ), "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and out.stat().st_mtime >= t0 - 1
    assert "(1, 300, 6)" in result.stdout and "NMS-free" in result.stdout
    assert not (tmp_path / "sub" / "spread-yolo26n.onnx").exists()


def test_cli_no_end2end_writes_the_raw_head(exported, tmp_path):
    pt, _ = exported
    out = tmp_path / "raw.onnx"
    result = run_cli("export", "yolo", "--model", str(pt), "--imgsz", str(IMGSZ), "--out", str(out), "--no-end2end",
                     timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "raw head: NMS after" in result.stdout and f"(1, {4 + 80}," in result.stdout


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_engine_without_tensorrt_says_what_to_install(exported):
    pt, _ = exported
    result = run_cli("export", "yolo", "--model", str(pt), "--format", "engine")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "pip install edge-vit[trt]" in result.stderr


def test_cli_int8_without_data(exported):
    pt, _ = exported
    result = run_cli("export", "yolo", "--model", str(pt), "--int8")
    assert result.returncode == 2 and "--data" in result.stderr


def test_no_end2end_exports_the_one_to_many_head_and_the_detector_runs_nms(exported, frame, tmp_path):
    """--no-end2end: the raw one-to-many head (NMS after), whose boxes match the .pt predicting with that head."""
    from ultralytics import YOLO

    from edge_vit.detector import Detector, DetectorConfig

    pt, _ = exported
    assert export_kwargs(YoloExportOptions(end2end=False), simplify=False, has_quantize=True)["nms"] is None
    raw = export_yolo(str(pt), YoloExportOptions(imgsz=IMGSZ, end2end=False), tmp_path / "raw.onnx")
    assert raw.end2end is False and raw.output_shape[0] == 1 and raw.output_shape[1] == 4 + 80
    dets, _ = Detector.load(DetectorConfig(model=str(raw.path), imgsz=IMGSZ, conf=0.25)).detect(frame)
    model = YOLO(str(pt))
    model.model.model[-1].end2end = False  # the .pt's one-to-many head, as exported
    ref = model.predict(frame, imgsz=IMGSZ, conf=0.25, verbose=False)[0].boxes
    assert len(dets) == len(ref) > 0
    order = np.lexsort(dets.xyxy.T[::-1])
    ref_xyxy = ref.xyxy.numpy()
    assert np.allclose(dets.xyxy[order], ref_xyxy[np.lexsort(ref_xyxy.T[::-1])], atol=1.0)


DEMO = Path(__file__).parents[1] / "edge_vit" / "assets" / "demo"


def _clip_frames(n: int) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(DEMO / "clip.mp4"))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    return frames


def _spinning_entry(session) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        return None


@pytest.mark.skipif(not (DEMO / "detector.onnx").is_file(), reason="the demo detector is not built")
def test_detector_without_spinning_reopens_ultralytics_onnx_session():
    """ort_spinning=False: the CPU session Ultralytics opened is reopened with spinning off, the boxes unchanged,
    and again whenever Ultralytics makes a new predictor."""
    config = DetectorConfig(model=str(DEMO / "detector.onnx"), imgsz=320, agnostic_nms=True, iou=0.5, device="cpu")
    spinning, quiet = Detector.load(config), Detector.load(replace(config, ort_spinning=False))
    frames = _clip_frames(3)
    for frame in frames:
        a, _ = spinning.detect(frame)
        b, _ = quiet.detect(frame)
        assert len(a.xyxy) >= 3
        np.testing.assert_array_equal(a.xyxy, b.xyxy)
        np.testing.assert_array_equal(a.class_id, b.class_id)
        np.testing.assert_array_equal(a.confidence, b.confidence)
    session = quiet.model.predictor.model.backend.session
    assert session is quiet._no_spin_session and _spinning_entry(session) == "0"
    assert quiet.spinning_off and not spinning.spinning_off
    assert _spinning_entry(spinning.model.predictor.model.backend.session) is None  # Ultralytics' own, untouched
    quiet.model.predictor = None  # Ultralytics builds a new predictor (and session) on the next call
    quiet.detect(frames[0])
    again = quiet.model.predictor.model.backend.session
    assert again is not session and again is quiet._no_spin_session and _spinning_entry(again) == "0"


def test_detector_without_spinning_leaves_a_pt_model_alone(tiny_yolo):
    detector = Detector.load(DetectorConfig(model=str(tiny_yolo), imgsz=64, device="cpu", ort_spinning=False))
    detections, _ = detector.detect(np.zeros((64, 64, 3), np.uint8))
    assert detector._no_spin_session is None and detections.xyxy.shape[1] == 4


@pytest.mark.parametrize("vlm, spinning", [("none", True), ("tiny", False)])
def test_run_turns_detector_spinning_off_when_a_vlm_shares_the_cpu(monkeypatch, tiny_idefics3, clip, vlm, spinning):
    """edge-vit run: with a VLM answering in its worker the detector's ONNX Runtime threads do not spin."""
    from edge_vit.cli import main

    seen = []

    def load(cls, config):
        seen.append(config)
        raise EdgeVitError("stop after the detector config")

    monkeypatch.setattr(Detector, "load", classmethod(load))
    argv = ["run", "--source", str(clip), "--detector", "yolo26n.yaml",
            "--vlm", str(tiny_idefics3) if vlm == "tiny" else "none"]
    assert main(argv) == 2
    assert [c.ort_spinning for c in seen] == [spinning]
