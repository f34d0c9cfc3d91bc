"""The stream scenario: a clip played at its native fps (``SourceConfig(realtime=True)``) through the product's
``StreamRunner`` (detector on every frame it gets, grounding, the VLM answering continuously on the latest frame).

Reports what a camera user sees: the detector's sustained fps, frames dropped because the pipeline was busy,
answer latency, and the age of the frame each answer describes (capture → answer complete). Models are loaded
and warmed up (one detection, one answer) before the clip starts, so start-up is not in the figures.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.measure import summarize


class _ListSink:
    """Keeps every event the runner emits."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def write(self, event: dict) -> None:
        self.events.append(dict(event))

    def close(self) -> None:
        pass


def run_stream(clip: str, detector, vlm, prompt: str, grounding, new_tokens: int, warm_frame: np.ndarray) -> dict:
    """Play ``clip`` in real time through StreamRunner; ``grounding`` is a GroundingConfig or None."""
    from edge_vit.stream.runner import RunConfig, StreamRunner
    from edge_vit.stream.scheduler import TriggerConfig
    from edge_vit.stream.sources import SourceConfig, open_source
    from edge_vit.vlm.base import GenerationConfig, collect

    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    detector.detect(warm_frame)
    collect(vlm.generate(warm_frame, prompt, generation))

    # every_s=0: a new answer is asked for on every frame; the single-slot worker keeps only the newest, so the VLM
    # answers back to back, always on the latest frame.
    config = RunConfig(prompt=prompt, grounding=grounding, trigger=TriggerConfig(every_s=0.0, on_change=True),
                       generation=generation, status_every_s=3600.0)
    sink = _ListSink()
    source = open_source(clip, SourceConfig(realtime=True))
    nominal_fps = source.fps
    t0 = time.monotonic()
    summary = StreamRunner(source, detector, vlm, config, [sink]).run()
    wall_s = time.monotonic() - t0

    detections = [e for e in sink.events if e["type"] == "detections"]
    answers = [e for e in sink.events if e["type"] == "answer"]
    errors = [e for e in sink.events if e["type"] == "error"]
    final = next((e for e in reversed(sink.events) if e["type"] == "status" and e.get("final")), {})
    stages: dict[str, dict] = {}
    for key in ("detect_pre", "detect_infer", "detect_post"):
        stages[key] = summarize([e["timings"].get(key) for e in detections])
    stages["detect"] = summarize([sum(e["timings"].values()) for e in detections])
    for key in ("ttft", "vlm_total", "decode_tok_s", "frame_age"):
        stages[key] = summarize([a["timings"].get(key) for a in answers])
    processed = summary.frames
    dropped = int(final.get("dropped", 0))
    return {
        "clip_fps": nominal_fps,
        "frames_processed": processed,
        "frames_dropped": dropped,
        "drop_rate": round(dropped / (processed + dropped), 4) if processed + dropped else 0.0,
        "detector_fps": round(float(final.get("fps", processed / max(wall_s, 1e-9))), 2),
        "answers": len(answers),
        "superseded": int(final.get("superseded", 0)),
        "errors": len(errors),
        "first_error": errors[0]["message"] if errors else None,
        "elapsed_s": round(wall_s, 2),
        "stages": stages,
    }
