"""Where a run's results go: JSONL events, an annotated video, the console.

Each sink takes plain event dicts (and, for video, frames); none of them knows
about models or sources. Every sink is safe to close twice and flushes on close,
so an interrupted run leaves complete files: every JSONL line is valid JSON and
the video file is finalized.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from edge_vit.errors import EdgeVitError
from edge_vit.types import Detections


class Sink(Protocol):
    def write(self, event: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed per line so a crash or kill loses at most the line being written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8")
        except OSError as exc:
            raise EdgeVitError(f"cannot write JSONL file {path}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def write(self, event: dict) -> None:
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=_json_default)
        with self._lock:
            if self._fh is None:
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class ConsoleSink:
    """Human-readable output: answers stream token by token to stdout, status lines go to stderr."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None, show_detections: bool = False) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.show_detections = show_detections
        self._lock = threading.Lock()
        self._open_answer: int | None = None

    def token(self, frame_id: int, text: str) -> None:
        with self._lock:
            if self._open_answer != frame_id:
                self._end_line()
                self.out.write(f"[frame {frame_id}] ")
                self._open_answer = frame_id
            self.out.write(text)
            self.out.flush()

    def _end_line(self) -> None:
        if self._open_answer is not None:
            self.out.write("\n")
            self.out.flush()
            self._open_answer = None

    def write(self, event: dict) -> None:
        kind = event.get("type")
        with self._lock:
            if kind == "answer":
                if self._open_answer != event["frame"]:  # nothing was streamed (e.g. an empty answer)
                    self._end_line()
                    self.out.write(f"[frame {event['frame']}] {event['answer']}")
                    self._open_answer = event["frame"]
                t = event["timings"]
                self.out.write(
                    f"  ({event['finish_reason']}; ttft {t.get('ttft', 0):.0f} ms, "
                    f"{t.get('decode_tok_s', 0):.1f} tok/s)"
                )
                self._end_line()
            elif kind == "status":
                self._end_line()
                self.err.write(
                    "status: {frames} frames, {fps:.1f} fps, {answers} answers, {dropped} dropped, "
                    "{corrupt} corrupt, {reconnects} reconnects\n".format(**event)
                )
            elif kind == "error":
                self._end_line()
                self.err.write(f"error (frame {event.get('frame')}): {event['message']}\n")
            elif kind == "detections" and self.show_detections:
                self._end_line()
                self.err.write(f"frame {event['frame']}: {event['counts']}\n")
            self.err.flush()

    def close(self) -> None:
        with self._lock:
            self._end_line()


def annotate(frame: np.ndarray, detections: Detections, answer: str = "") -> np.ndarray:
    """Boxes and labels drawn with Ultralytics' own Annotator, plus the latest answer at the top."""
    from ultralytics.utils.plotting import Annotator, colors

    # cv2 drawing (pil=False): Ultralytics' PIL path would fetch a font from the network.
    ann = Annotator(frame.copy(), pil=False, example="abc")
    names = detections.class_names
    for i in range(len(detections)):
        label = names[i]
        if detections.tracker_id is not None:
            label = f"{label} #{int(detections.tracker_id[i])}"
        label = f"{label} {detections.confidence[i]:.2f}".encode("ascii", "replace").decode()
        ann.box_label(detections.xyxy[i].tolist(), label, color=colors(int(detections.class_id[i]), True))
    if answer:
        width = max(20, frame.shape[1] // 9)
        lines = textwrap.wrap(answer.encode("ascii", "replace").decode(), width)[:4]
        y = 4
        for line in lines:
            (_, h), _ = _text_size(line, ann)
            y += h + 6
            ann.text([4, y], line, txt_color=(255, 255, 255), box_color=(40, 40, 40))
    return ann.result()


def _text_size(text: str, ann) -> tuple[tuple[int, int], int]:
    import cv2

    return cv2.getTextSize(text, 0, fontScale=ann.sf, thickness=ann.tf)


class VideoSink:
    """Annotated frames to a video file (OpenCV); ``close`` finalizes the container so the file stays playable."""

    def __init__(self, path: str | Path, fps: float = 15.0) -> None:
        self.path = Path(path)
        self.fps = fps if fps and fps > 0 else 15.0
        self._writer = None
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.frames = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeVitError(f"cannot write video file {path}: {exc.strerror}") from None

    def write_frame(self, image: np.ndarray) -> None:
        import cv2

        with self._lock:
            h, w = image.shape[:2]
            if self._writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
                self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
                if not self._writer.isOpened():
                    self._writer = None
                    raise EdgeVitError(f"cannot write video file {self.path} (use .mp4 or .avi)")
                self._size = (w, h)
            if (w, h) != self._size:  # a live source may change resolution after a reconnect
                image = cv2.resize(image, self._size)
            self._writer.write(image)
            self.frames += 1

    def write(self, event: dict) -> None:  # frames come through write_frame
        pass

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.release()
                self._writer = None
