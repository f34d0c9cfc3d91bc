"""The typed objects that cross each stage boundary: Detections, GroundedPrompt, Answer.

Plain dataclasses over numpy arrays, validated on creation, so the stages stay
pure functions of these values. Nothing here imports torch or Ultralytics; the
``from_ultralytics`` constructor only reads attributes of the object it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    """Boxes of one frame: ``xyxy`` [N, 4] pixels, ``confidence`` [N], ``class_id`` [N], ``tracker_id`` [N] or None.

    ``names`` maps class ids to names for the whole model, not only the present classes.
    ``image_size`` is (height, width) of the frame the boxes refer to.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    names: Mapping[int, str]
    image_size: tuple[int, int]
    tracker_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        n = len(xyxy)
        conf = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        cls = np.asarray(self.class_id, dtype=np.int64).reshape(-1)
        if len(conf) != n or len(cls) != n:
            raise ValueError(f"Detections: {n} boxes but {len(conf)} confidences and {len(cls)} class ids")
        tid = None
        if self.tracker_id is not None:
            tid = np.asarray(self.tracker_id, dtype=np.int64).reshape(-1)
            if len(tid) != n:
                raise ValueError(f"Detections: {n} boxes but {len(tid)} tracker ids")
        h, w = self.image_size
        if h <= 0 or w <= 0:
            raise ValueError(f"Detections: image_size must be positive, got {self.image_size}")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "confidence", conf)
        object.__setattr__(self, "class_id", cls)
        object.__setattr__(self, "tracker_id", tid)
        object.__setattr__(self, "names", dict(self.names))
        object.__setattr__(self, "image_size", (int(h), int(w)))

    @classmethod
    def empty(cls, names: Mapping[int, str], image_size: tuple[int, int]) -> "Detections":
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), names, image_size)

    @classmethod
    def from_ultralytics(cls, result: Any) -> "Detections":
        """Build from one ``ultralytics.engine.results.Results`` (predict or track output)."""
        boxes = result.boxes
        h, w = result.orig_shape[:2]
        if boxes is None or len(boxes) == 0:
            return cls.empty(result.names, (h, w))
        tid = boxes.id.cpu().numpy() if getattr(boxes, "id", None) is not None else None
        return cls(
            xyxy=boxes.xyxy.cpu().numpy(),
            confidence=boxes.conf.cpu().numpy(),
            class_id=boxes.cls.cpu().numpy(),
            names=result.names,
            image_size=(h, w),
            tracker_id=tid,
        )

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> "Detections":
        """Boolean mask, integer array or slice; returns a new Detections."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(
            xyxy=self.xyxy[index],
            confidence=self.confidence[index],
            class_id=self.class_id[index],
            names=self.names,
            image_size=self.image_size,
            tracker_id=None if self.tracker_id is None else self.tracker_id[index],
        )

    @property
    def class_names(self) -> list[str]:
        return [self.names.get(int(c), str(int(c))) for c in self.class_id]

    @property
    def area(self) -> np.ndarray:
        wh = np.clip(self.xyxy[:, 2:] - self.xyxy[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]

    def counts(self) -> dict[str, int]:
        """Objects per class name, sorted by name (stable across frames)."""
        out: dict[str, int] = {}
        for name in self.class_names:
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> list[dict]:
        rows = []
        for i in range(len(self)):
            row = {
                "class": self.names.get(int(self.class_id[i]), str(int(self.class_id[i]))),
                "class_id": int(self.class_id[i]),
                "confidence": round(float(self.confidence[i]), 4),
                "xyxy": [round(float(v), 1) for v in self.xyxy[i]],
            }
            if self.tracker_id is not None:
                row["track_id"] = int(self.tracker_id[i])
            rows.append(row)
        return rows


@dataclass(frozen=True)
class GroundedPrompt:
    """The instruction text given to the VLM, plus what the grounding put into it.

    ``mentioned`` holds the indices (into the frame's Detections) of the objects
    listed one by one; the rest were only summarized in counts.
    """

    text: str
    instruction: str
    grounding: str
    mentioned: tuple[int, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    tokens: int = 0


@dataclass(frozen=True)
class Answer:
    """One VLM answer about one frame, with per-stage timings in milliseconds."""

    text: str
    frame_id: int
    prompt: str
    timings: Mapping[str, float]
    new_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled" | "error"
    frame_time: float = 0.0  # wall-clock time (time.time()) the frame was captured
    grounding: str = ""  # the detection text that was put in front of the prompt

    @property
    def decode_tokens_per_s(self) -> float:
        return float(self.timings.get("decode_tok_s", 0.0))

    def to_event(self) -> dict:
        return {
            "type": "answer",
            "frame": self.frame_id,
            "prompt": self.prompt,
            "grounding": self.grounding,
            "answer": self.text,
            "new_tokens": self.new_tokens,
            "finish_reason": self.finish_reason,
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
        }

