"""The offline demo's inputs: a generated shapes clip and locally built models, cached in a work folder.

Until trained demo models ship with the package, the models are tiny and random:
the demo proves the whole pipeline runs offline (detector → grounding → VLM →
JSONL + annotated video), not that the answers are meaningful. It says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NOTICE = (
    "edge-vit demo: running the full pipeline offline on a generated clip with tiny, randomly initialized "
    "models built locally. Their detections and answers are NOT meaningful; they show the machinery "
    "(detector -> grounding -> streamed VLM answers -> JSONL + annotated video). Point `edge-vit run` at real "
    "models for real answers."
)


@dataclass(frozen=True)
class DemoPaths:
    clip: Path
    detector: Path
    vlm: Path
    jsonl: Path
    video: Path
    imgsz: int = 320
    conf: float = 0.05
    notice: str = NOTICE


def prepare_demo(workdir: Path, frames: int = 90) -> DemoPaths:
    """Build (once) the demo models and clip in ``workdir``; later calls reuse them."""
    from edge_vit.tiny import build_tiny_idefics3, build_tiny_yolo, write_clip

    workdir.mkdir(parents=True, exist_ok=True)
    vlm = workdir / "tiny-idefics3"
    if not (vlm / "config.json").exists():
        build_tiny_idefics3(vlm)
    detector = workdir / "tiny-yolo26n.pt"
    if not detector.exists():
        build_tiny_yolo(detector)
    clip = workdir / f"shapes-{frames}.mp4"
    if not clip.exists():
        write_clip(clip, n_frames=frames)
    return DemoPaths(clip=clip, detector=detector, vlm=vlm, jsonl=workdir / "demo.jsonl", video=workdir / "demo.mp4")
