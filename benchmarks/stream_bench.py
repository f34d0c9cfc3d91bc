"""The stream scenario: a clip played at its native fps (``SourceConfig(realtime=True)``) through the product's
``StreamRunner`` (detector on every frame it gets, grounding, the VLM answering continuously on the latest frame).

Reports what a camera user sees: the detector's sustained fps, frames dropped because the pipeline was busy,
answer latency, and the age of the frame each answer describes (capture → answer complete). Models are loaded
and warmed up (one detection, one answer) before the clip starts, so start-up is not in the figures.

``edge-vit bench`` runs it as its stream case; on its own it compares the detector's ONNX Runtime threads
spinning between runs (ONNX Runtime's default) with not (``DetectorConfig.ort_spinning``, what ``edge-vit run``
uses when a VLM shares the CPU), interleaved, each run with a freshly loaded detector:

    python -m benchmarks.stream_bench --vlm runs/smolvlm-256m-int8 --backend onnx --detector yolo26n.onnx \
        --imgsz 640 --detector-spinning on,off --rounds 2

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def compare_spinning(args: argparse.Namespace) -> dict:
    """``run_stream`` with the detector spinning on and off, alternating, one VLM for all runs."""
    from dataclasses import replace

    import cv2

    from edge_vit.detector import Detector, DetectorConfig
    from edge_vit.grounding import GroundingConfig
    from edge_vit.vlm import Backend, TilingPolicy, load_vlm

    clip = args.clip
    if clip is None:
        from edge_vit.tiny import write_clip

        clip = str(write_clip(Path(tempfile.mkdtemp(prefix="edge-vit-stream-")) / "clip.mp4",
                              n_frames=int(args.seconds * 15), fps=15.0, width=640, height=480))
    cap = cv2.VideoCapture(clip)
    ok, warm = cap.read()
    cap.release()
    if not ok:
        raise SystemExit(f"stream_bench: cannot read a frame from {clip}")
    vlm = load_vlm(args.vlm, Backend(args.backend), tiling=TilingPolicy.SINGLE, threads=args.threads)
    base = DetectorConfig(model=args.detector, imgsz=args.imgsz, device="cpu", prefer_exported=False)
    settings = [s.strip() for s in args.detector_spinning.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            detector = Detector.load(replace(base, ort_spinning=setting == "on"))
            result = run_stream(clip, detector, vlm, args.prompt, GroundingConfig(), args.new_tokens, warm)
            result["detector_spinning_off"] = detector.spinning_off
            if result["errors"]:
                raise SystemExit(f"stream_bench: the run failed: {result['first_error']}")
            runs[setting].append(result)
            del detector

    def med(setting: str, value) -> float | None:
        values = [v for v in (value(r) for r in runs[setting]) if v is not None]
        return round(statistics.median(values), 2) if values else None

    summary = {s: {"detector_fps": med(s, lambda r: r["detector_fps"]), "drop_rate": med(s, lambda r: r["drop_rate"]),
                   "answers": med(s, lambda r: r["answers"]),
                   **{key: med(s, lambda r, key=key: r["stages"][key].get("p50"))
                      for key in ("detect", "decode_tok_s", "ttft", "vlm_total", "frame_age")}}
               for s in settings}
    return {"benchmark": "stream_bench", "clip": clip, "vlm": args.vlm, "backend": args.backend,
            "detector": args.detector, "imgsz": args.imgsz, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "summary": summary, "runs": runs, "cpu_count": os.cpu_count()}


def print_table(report: dict) -> None:
    print(f"{report['detector']} at {report['imgsz']} px, {report['vlm']} ({report['backend']}), "
          f"{report['new_tokens']} tokens per answer, medians of {report['rounds']} runs (p50 within a run)")
    print(f"{'spinning':<9} {'det fps':>7} {'dropped':>7} {'detect ms':>9} {'answers':>7} {'decode tok/s':>12} "
          f"{'TTFT ms':>8} {'answer ms':>9} {'frame age ms':>12}")
    for setting, row in report["summary"].items():
        cells = [row["detector_fps"], row["drop_rate"], row["detect"], row["answers"], row["decode_tok_s"],
                 row["ttft"], row["vlm_total"], row["frame_age"]]
        widths = (7, 7, 9, 7, 12, 8, 9, 12)
        print(f"{setting:<9} " + " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_bench",
                                description="the stream case with the detector's ONNX Runtime spinning on and off")
    p.add_argument("--vlm", required=True, help="VLM folder (an export folder with --backend onnx)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="onnx")
    p.add_argument("--detector", required=True, help="an .onnx YOLO detector (ONNX Runtime on the CPU)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--clip", default=None, help="video played in real time (default: a generated 640x480 15-fps clip)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the generated clip")
    p.add_argument("--detector-spinning", default="on,off", help="comma-separated: on, off")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="VLM intra-op threads (default: the backend's)")
    p.add_argument("--prompt", default="Describe the scene in one sentence.")
    args = p.parse_args(argv)
    bad = [s for s in args.detector_spinning.split(",") if s.strip() not in ("on", "off")]
    if bad or not args.detector_spinning.strip():
        p.error(f"--detector-spinning takes on and/or off, comma-separated; got {args.detector_spinning!r}")
    if not args.detector.endswith(".onnx") or not Path(args.detector).is_file():
        p.error(f"--detector {args.detector}: expected an existing .onnx file (spinning is an ONNX Runtime setting)")
    if args.rounds < 1 or args.new_tokens < 1 or args.seconds <= 0:
        p.error("--rounds and --new-tokens must be at least 1, --seconds above 0")
    if args.clip is not None and not Path(args.clip).is_file():
        p.error(f"--clip {args.clip}: no such file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edge_vit.detector import ultralytics_logs_to_stderr

    ultralytics_logs_to_stderr()  # stdout: the table and the JSON line only
    report = compare_spinning(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
