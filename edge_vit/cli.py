"""The ``edge-vit`` command line: thin subcommands that build the stages from flags and call the library.

User mistakes (missing files, unreachable streams, folders that are not models)
end with one line on stderr and exit code 2; Ctrl-C / SIGTERM during a run
finish cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from edge_vit.argtypes import add_grounding_args, grounding_from_args, int_in, nonneg_float, positive_int
from edge_vit.errors import EdgeVitError

DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_DETECTOR = "yolo26n.pt"
DEFAULT_PROMPT = "Describe what you see in one sentence."


def add_run_arguments(p: argparse.ArgumentParser, *, source_required: bool = True) -> None:
    from edge_vit.vlm import Backend, TilingPolicy

    g = p.add_argument_group("input")
    g.add_argument("--source", required=source_required,
                   help="webcam index (0), device (/dev/video0), video file, RTSP/HTTP URL or image folder")
    g.add_argument("--max-frames", type=positive_int, default=None, help="stop after N frames")
    g.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=False,
                   help="play files at their native fps and drop frames when behind, like a live camera")
    g.add_argument("--stall-timeout", type=nonneg_float, default=5.0,
                   help="live sources: reconnect when no frame arrives for this many seconds")
    g = p.add_argument_group("detector")
    g.add_argument("--detector", default=DEFAULT_DETECTOR, help="Ultralytics model: .pt, .yaml, .onnx or .engine")
    g.add_argument("--imgsz", type=int, default=640, help="detector input size (multiple of 32)")
    g.add_argument("--conf", type=float, default=0.25, help="detector confidence threshold")
    g.add_argument("--iou", type=float, default=0.7,
                   help="NMS IoU threshold: a box overlapping a kept one by more is dropped (Ultralytics' iou)")
    g.add_argument("--classes", default=None, help="comma-separated class names (or ids) to keep, e.g. person,car")
    g.add_argument("--agnostic-nms", action=argparse.BooleanOptionalAction, default=False,
                   help="NMS across classes: one box per object when an object can only be one class")
    g.add_argument("--prefer-exported", action=argparse.BooleanOptionalAction, default=True,
                   help="for foo.pt, load foo.onnx (CPU) or foo.engine (CUDA) exported next to it when not older")
    g.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                   help="track objects across frames (ByteTrack) so they keep ids")
    g = p.add_argument_group("VLM")
    g.add_argument("--vlm", default=DEFAULT_VLM, help="model folder or cached hub id; 'none' runs the detector only")
    g.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.TORCH.value)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 (VLM and detector)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="torch backend dtype")
    g.add_argument("--prompt", action="append", default=None,
                   help="the instruction the VLM answers about each chosen frame; repeat it to ask several in turn "
                        f"(default: {DEFAULT_PROMPT!r})")
    g.add_argument("--max-new-tokens", type=positive_int, default=48)
    g.add_argument("--lookup", type=int_in(0, 15), default=0, metavar="N",  # the ONNX decode graph: 16 rows
                   help="prompt lookup decoding: verify up to N tokens copied from the prompt per forward pass "
                        "(greedy answers unchanged; torch and onnx backends; 0: off). Pays off for long answers "
                        "that repeat the grounding, on GPUs more than on small CPUs (README)")
    g.add_argument("--tiling", choices=[t.value for t in TilingPolicy], default=TilingPolicy.SINGLE.value,
                   help="single: one vision tile per frame (fast); split: the processor's own image splitting")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the model folder/hub (off by default)")
    g = p.add_argument_group("grounding")
    g.add_argument("--grounding", action=argparse.BooleanOptionalAction, default=True,
                   help="put the detections (classes, counts, positions) into the prompt")
    add_grounding_args(g)
    g = p.add_argument_group("when to answer")
    g.add_argument("--every", type=nonneg_float, default=5.0, help="answer at least every N seconds (0: every frame)")
    g.add_argument("--on-change", action=argparse.BooleanOptionalAction, default=True,
                   help="answer when the detected classes or counts change")
    g = p.add_argument_group("output")
    g.add_argument("--jsonl", default=None, help="write events (detections, answers, status) to this JSONL file")
    g.add_argument("--save-video", default=None, help="write the annotated video here (.mp4 or .avi)")
    g.add_argument("--status-every", type=nonneg_float, default=5.0, help="seconds between status events")
    g.add_argument("--quiet", action="store_true", help="no console output (files only)")


def build_and_run(args: argparse.Namespace) -> int:
    """Build every stage from parsed flags and run the stream; returns the exit code."""
    from edge_vit.detector import Detector, DetectorConfig, check_detector_path, ultralytics_logs_to_stderr
    from edge_vit.stream.runner import RunConfig, StreamRunner
    from edge_vit.stream.scheduler import TriggerConfig
    from edge_vit.stream.sinks import ConsoleSink, JsonlSink, VideoSink
    from edge_vit.stream.sources import SourceConfig, open_source, parse_source
    from edge_vit.vlm import Backend, GenerationConfig, TilingPolicy, load_vlm

    device = args.device
    detector_config = DetectorConfig(
        model=args.detector, conf=args.conf, iou=args.iou, imgsz=args.imgsz, track=args.track,
        prefer_exported=args.prefer_exported, agnostic_nms=args.agnostic_nms,
        classes=tuple(c for c in args.classes.split(",") if c.strip()) if args.classes else None,
        device=device,
        # the VLM worker decodes on the same cores while the detector runs on every frame
        ort_spinning=args.vlm.lower() == "none",
    )
    trigger = TriggerConfig(every_s=args.every, on_change=args.on_change)
    grounding = grounding_from_args(args) if args.grounding else None
    prompts = tuple(args.prompt) if args.prompt else (DEFAULT_PROMPT,)
    run_config = RunConfig(
        prompt=prompts[0], prompts=prompts, max_frames=args.max_frames, grounding=grounding, trigger=trigger,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, lookup_tokens=args.lookup),
        status_every_s=args.status_every,
    )
    # Cheap checks first: a missing file, a folder that is not a model or an unwritable output fail in a
    # second, before any model loads. The source opens last, so a live stream is not read (and frames
    # not dropped) while the models load.
    parse_source(args.source)
    if args.lookup and Backend(args.backend) is Backend.TRT:
        raise EdgeVitError("--lookup works with --backend torch or onnx; the TensorRT engines decode one token a pass")
    if args.vlm.lower() != "none" and Backend(args.backend) is Backend.TORCH:
        from edge_vit.vlm.torch_backend import check_model_folder

        check_model_folder(args.vlm)
    elif args.vlm.lower() != "none" and Backend(args.backend) is Backend.ONNX:
        from edge_vit.vlm.onnx_backend import check_onnx_folder

        check_onnx_folder(args.vlm)
    check_detector_path(args.detector)
    sinks: list = []
    try:
        console = None if args.quiet else ConsoleSink()
        if console is not None:
            sinks.append(console)
        if args.jsonl:
            sinks.append(JsonlSink(args.jsonl))
        video = VideoSink(args.save_video) if args.save_video else None
        ultralytics_logs_to_stderr()
        detector = Detector.load(detector_config)
        vlm = None
        if args.vlm.lower() != "none":
            vlm = load_vlm(args.vlm, Backend(args.backend), device=device, dtype=args.dtype,
                           tiling=TilingPolicy(args.tiling), trust_remote_code=args.trust_remote_code)
        source = open_source(args.source, SourceConfig(stall_timeout_s=args.stall_timeout, realtime=args.realtime))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    if video is not None and getattr(source, "fps", None):
        video.fps = source.fps  # the annotated video plays at the source's rate
    runner = StreamRunner(source, detector, vlm, run_config, sinks, video=video, console=console)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _stop(signum, frame):  # first signal: finish cleanly; a second one: default behaviour
        runner.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, _stop)
    try:
        summary = runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not args.quiet:
        print(f"done: {summary.frames} frames, {summary.answers} answers, stopped by {summary.stopped_by}"
              + (f"; events in {args.jsonl}" if args.jsonl else "")
              + (f"; video in {args.save_video}" if args.save_video else ""), file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return build_and_run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from edge_vit.demo import DEMO_QUESTIONS, format_score, models_line, prepare_demo, score_demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    paths = prepare_demo(Path(args.workdir), assets=args.assets)
    print(models_line(paths), file=sys.stderr)
    questions = args.prompt or [q.text for q in DEMO_QUESTIONS]
    argv = [
        "run", "--source", str(paths.clip), "--detector", str(paths.detector), "--vlm", str(paths.vlm),
        "--backend", paths.vlm_backend,
        "--imgsz", str(paths.imgsz), "--conf", str(paths.conf), "--iou", str(paths.iou),
        "--grounding-tokens", str(paths.grounding_tokens),
        "--jsonl", str(paths.jsonl), "--save-video", str(paths.video),
        # Every frame may be answered: with several questions the runner asks the next one whenever the VLM is free.
        "--every", "0", "--max-new-tokens", "24", "--status-every", "2",
    ]
    for question in questions:
        argv += ["--prompt", question]
    if paths.agnostic_nms:
        argv.append("--agnostic-nms")
    if paths.size_words:
        argv += ["--size-words", ",".join(str(v) for v in paths.size_words)]
    argv += ["--grounding-order", paths.grounding_order]
    if paths.grounding_counts:
        argv.append("--grounding-counts")
    if args.max_frames:
        argv += ["--max-frames", str(args.max_frames)]
    if args.quiet:
        argv.append("--quiet")
    code = build_and_run(build_parser().parse_args(argv))
    if code != 0:
        return code
    score = score_demo(paths.jsonl, paths.truth)
    if args.prompt and not score.total:
        print("accuracy: not measured; your own questions (--prompt) have no ground truth in the clip", file=sys.stderr)
    else:
        print(format_score(score), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-vit", description="YOLO detections ground a compact VLM on edge devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (reconnects, skipped files)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run detector + VLM on a camera, stream, video file or image folder")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="the shipped demo models on a bundled clip, offline, scored against its truth")
    p.add_argument("--workdir", default=".demo", help="where demo.jsonl and demo.mp4 are written")
    p.add_argument("--max-frames", type=positive_int, default=None, help="stop after N frames of the clip")
    p.add_argument("--prompt", action="append", default=None,
                   help="ask your own question instead of the demo's (repeatable); it has no accuracy")
    p.add_argument("--assets", default=None, help="folder of the demo models (default: the ones in the package)")
    p.add_argument("--quiet", action="store_true", help="no streamed answers (the accuracy table is still printed)")
    p.set_defaults(func=cmd_demo)
    from finetune.cli import add_finetune_commands
    add_finetune_commands(sub)
    from export.cli import add_export_commands
    add_export_commands(sub)
    from benchmarks.cli import add_bench_commands
    add_bench_commands(sub)
    from edge_vit.deploy.cli import add_deploy_commands
    add_deploy_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # OpenCV and its FFmpeg print C-level warnings (e.g. each refused connection) straight to stderr;
        # our own messages say the same in one line. Read when cv2 first opens a capture.
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeVitError as exc:
        print(f"edge-vit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edge-vit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
