import numpy as np
import pytest

from edge_vit.types import Answer, Detections

NAMES = {0: "person", 1: "car", 2: "dog"}


def make(n=3, tracker=False):
    xyxy = np.array([[0, 0, 10, 10], [5, 5, 25, 15], [50, 40, 60, 80]][:n], dtype=float)
    return Detections(
        xyxy=xyxy, confidence=np.array([0.9, 0.5, 0.7][:n]), class_id=np.array([0, 1, 0][:n]),
        names=NAMES, image_size=(100, 200), tracker_id=np.array([7, 8, 9][:n]) if tracker else None,
    )


def test_validation_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 boxes but 2 confidences"):
        Detections(np.zeros((3, 4)), np.zeros(2), np.zeros(3), NAMES, (10, 10))
    with pytest.raises(ValueError, match="tracker ids"):
        Detections(np.zeros((3, 4)), np.zeros(3), np.zeros(3), NAMES, (10, 10), tracker_id=np.zeros(1))
    with pytest.raises(ValueError, match="image_size"):
        Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), NAMES, (0, 10))


def test_boolean_indexing_returns_new_object():
    d = make(tracker=True)
    people = d[d.class_id == 0]
    assert len(people) == 2 and people.class_names == ["person", "person"]
    assert people.tracker_id.tolist() == [7, 9]
    assert len(d) == 3  # the original is untouched
    assert d[1].class_names == ["car"]


def test_counts_area_and_json():
    d = make()
    assert d.counts() == {"car": 1, "person": 2}
    assert d.area.tolist() == [100.0, 200.0, 400.0]
    rows = d.to_json()
    assert rows[1] == {"class": "car", "class_id": 1, "confidence": 0.5, "xyxy": [5.0, 5.0, 25.0, 15.0]}
    assert "track_id" not in rows[0]
    assert make(tracker=True).to_json()[0]["track_id"] == 7


def test_empty():
    d = Detections.empty(NAMES, (10, 20))
    assert len(d) == 0 and d.counts() == {} and d.to_json() == []


def test_from_ultralytics_with_track_ids():
    import torch
    from ultralytics.engine.results import Results

    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0, 5.0, 0.8, 1.0], [10.0, 10.0, 20.0, 20.0, 6.0, 0.6, 0.0]])
    r = Results(orig_img=np.zeros((48, 64, 3), np.uint8), path="x.jpg", names=NAMES, boxes=boxes)
    d = Detections.from_ultralytics(r)
    assert d.image_size == (48, 64)
    assert d.tracker_id.tolist() == [5, 6]
    assert d.class_names == ["car", "person"]
    np.testing.assert_allclose(d.confidence, [0.8, 0.6])


def test_from_ultralytics_real_model(tiny_yolo):
    from ultralytics import YOLO

    r = YOLO(str(tiny_yolo)).predict(np.zeros((64, 96, 3), np.uint8), imgsz=64, conf=0.0, verbose=False)[0]
    d = Detections.from_ultralytics(r)
    assert d.image_size == (64, 96)
    assert len(d) == len(r.boxes) and d.tracker_id is None
    assert set(d.names) == set(r.names)


def test_answer_event():
    a = Answer(text="two cars", frame_id=4, prompt="count", timings={"ttft": 12.3456, "decode_tok_s": 30.0})
    ev = a.to_event()
    assert ev["type"] == "answer" and ev["frame"] == 4 and ev["answer"] == "two cars"
    assert ev["timings"]["ttft"] == 12.346 and a.decode_tokens_per_s == 30.0
