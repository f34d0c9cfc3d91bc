import io
import json

import numpy as np

from edge_vit.stream.sinks import ConsoleSink, JsonlSink, VideoSink, annotate
from edge_vit.types import Detections
from helpers import count_video_frames, read_jsonl


def test_jsonl_lines_are_valid_and_flushed_per_event(tmp_path):
    sink = JsonlSink(tmp_path / "sub" / "out.jsonl")
    sink.write({"type": "status", "value": np.float32(1.5), "arr": np.arange(3), "text": "ünïcode \n line"})
    # flushed before close: a reader (or a crash) sees the complete line now
    assert json.loads((tmp_path / "sub" / "out.jsonl").read_text().splitlines()[0])["value"] == 1.5
    sink.write({"type": "answer", "answer": "ok"})
    sink.close()
    sink.close()  # idempotent
    sink.write({"type": "late"})  # ignored after close, never raises
    events = read_jsonl(tmp_path / "sub" / "out.jsonl")
    assert [e["type"] for e in events] == ["status", "answer"]
    assert events[0]["arr"] == [0, 1, 2] and events[0]["text"] == "ünïcode \n line"


def test_video_sink_writes_a_playable_file(tmp_path):
    sink = VideoSink(tmp_path / "out.mp4", fps=10)
    for i in range(12):
        frame = np.full((96, 128, 3), i * 10, np.uint8)
        if i == 5:
            frame = np.zeros((48, 64, 3), np.uint8)  # a resolution change after a reconnect
        sink.write_frame(frame)
    sink.close()
    sink.close()
    assert count_video_frames(tmp_path / "out.mp4") == 12


def test_annotate_draws_boxes_labels_and_answer():
    frame = np.full((120, 160, 3), 255, np.uint8)
    det = Detections(np.array([[10, 20, 60, 80]]), np.array([0.9]), np.array([0]), {0: "shape\u00e9"}, (120, 160),
                     tracker_id=np.array([4]))
    out = annotate(frame, det, "two shapes at the top")
    assert out.shape == frame.shape and out is not frame
    assert (frame == 255).all()  # the input frame is not modified
    assert (out[20:80, 10] != 255).any()  # box edge drawn
    assert (out[:20, :100] != 255).any()  # answer text at the top


def test_console_streams_tokens_then_closes_the_line():
    out, err = io.StringIO(), io.StringIO()
    c = ConsoleSink(out, err)
    c.token(3, "two ")
    c.token(3, "cars")
    c.write({"type": "answer", "frame": 3, "answer": "two cars", "finish_reason": "stop",
             "timings": {"ttft": 120.0, "decode_tok_s": 30.0}})
    c.write({"type": "status", "frames": 10, "fps": 9.5, "answers": 1, "dropped": 0, "corrupt": 0, "reconnects": 1})
    assert out.getvalue() == "[frame 3] two cars  (stop; ttft 120 ms, 30.0 tok/s)\n"
    assert "1 reconnects" in err.getvalue()
