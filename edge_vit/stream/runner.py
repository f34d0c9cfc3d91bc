"""The run loop: frames from a source through the detector, the grounding and the answer worker to the sinks.

It composes stages that are built elsewhere (the CLI builds them from flags) and
owns only the loop, the counters and the shutdown order: stop reading, finish
or cancel the VLM job, write the final status, close the sinks. It never opens
files or loads models itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edge_vit.detector import Detector
from edge_vit.grounding import GroundingConfig, counts_signature, ground
from edge_vit.stream.scheduler import AnswerJob, AnswerWorker, Trigger, TriggerConfig
from edge_vit.stream.sinks import ConsoleSink, Sink, VideoSink, annotate
from edge_vit.types import Answer, Detections, GroundedPrompt
from edge_vit.vlm.base import GenerationConfig, VLM


@dataclass(frozen=True)
class RunConfig:
    """What the loop asks and when. ``prompts``: several instructions asked in turn (the k-th submitted
    answer job asks ``prompts[k % n]``); empty means ``(prompt,)``, so single-prompt callers need not set it."""

    prompt: str = ""
    prompts: tuple[str, ...] = ()
    max_frames: int | None = None
    grounding: GroundingConfig | None = field(default_factory=GroundingConfig)  # None: ungrounded prompts
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    status_every_s: float = 5.0
    detections_events: bool = True

    def __post_init__(self) -> None:
        prompts = tuple(self.prompts) or (self.prompt,)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "prompt", self.prompt or prompts[0])


@dataclass
class RunSummary:
    frames: int = 0
    answers: int = 0
    errors: int = 0
    stopped_by: str = "end"  # "end" | "max_frames" | "signal"
    elapsed_s: float = 0.0
    last_status: dict = field(default_factory=dict)


class StreamRunner:
    def __init__(
        self,
        source: Any,
        detector: Detector,
        vlm: VLM | None,
        config: RunConfig,
        sinks: list[Sink],
        video: VideoSink | None = None,
        console: ConsoleSink | None = None,
    ) -> None:
        self.source = source
        self.detector = detector
        self.vlm = vlm
        self.config = config
        self.sinks = list(sinks)
        self.video = video
        self.console = console
        self.stop_event = threading.Event()
        self._emit_lock = threading.Lock()
        self._latest_answer = ""
        self._summary = RunSummary()
        self._asked = 0  # answer jobs submitted: picks the next prompt of the rotation
        self._questions: dict[int, str] = {}  # frame id -> instruction, for the console (several prompts)
        self._streaming_frame: int | None = None

    # Events from the main loop and the worker thread go through one lock, so sinks see whole events in order.
    def emit(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 3))
        with self._emit_lock:
            for sink in self.sinks:
                sink.write(event)

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler): stops reading and cancels the VLM job."""
        self.stop_event.set()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def _on_token(self, frame_id: int, text: str) -> None:
        # With several prompts the console line must say which question it answers; the JSONL event does anyway.
        if len(self.config.prompts) > 1 and frame_id != self._streaming_frame:
            self._streaming_frame = frame_id
            text = f"{self._questions.get(frame_id, '')} -> {text}"
        self.console.token(frame_id, text)

    def _on_answer(self, answer: Answer) -> None:
        self._questions.pop(answer.frame_id, None)
        self._latest_answer = answer.text
        self._summary.answers += 1
        self.emit(answer.to_event())

    def _on_error(self, job: AnswerJob, exc: Exception) -> None:
        self._questions.pop(job.frame_id, None)
        self._summary.errors += 1
        self.emit({"type": "error", "frame": job.frame_id, "stage": "vlm", "message": str(exc) or type(exc).__name__})

    def _prompt(self, detections: Detections, instruction: str) -> GroundedPrompt:
        c = self.config
        if c.grounding is None:
            return GroundedPrompt(text=instruction, instruction=instruction, grounding="", counts=detections.counts())
        return ground(detections, instruction, c.grounding, count_tokens=self.vlm.count_tokens)

    def _status(self, worker: AnswerWorker | None, t0: float, window: tuple[float, int], final: bool) -> dict:
        now = time.monotonic()
        w_time, w_frames = window
        stats = self.source.stats.snapshot() if hasattr(self.source, "stats") else {}
        event = {
            "type": "status",
            "frames": self._summary.frames,
            "fps": round((self._summary.frames - w_frames) / max(now - w_time, 1e-6), 2),
            "answers": self._summary.answers,
            "superseded": worker.superseded if worker else 0,
            "errors": self._summary.errors,
            "dropped": int(stats.get("dropped", 0)),
            "corrupt": int(stats.get("corrupt", 0)),
            "reconnects": int(stats.get("reconnects", 0)),
            "elapsed_s": round(now - t0, 2),
        }
        if final:
            event["final"] = True
            event["fps"] = round(self._summary.frames / max(now - t0, 1e-6), 2)
            event["stopped_by"] = self._summary.stopped_by
        return event

    def run(self) -> RunSummary:
        c = self.config
        worker = None
        if self.vlm is not None:
            worker = AnswerWorker(
                self.vlm, c.generation, on_answer=self._on_answer,
                on_token=self._on_token if self.console is not None else None, on_error=self._on_error,
            )
        trigger = Trigger(c.trigger)
        t0 = time.monotonic()
        window = (t0, 0)
        det_config = self.detector.config
        # A detector of the caller's own (the runner needs only detect() and config.model) has none to record.
        settings = ({**det_config.box_settings(), "track": det_config.track}
                    if hasattr(det_config, "box_settings") else {})
        self.emit({
            "type": "start", "source": getattr(self.source, "name", str(self.source)),
            "detector": det_config.model, "detector_settings": settings,
            "vlm": getattr(self.vlm, "name", None), "prompt": c.prompt,
            "grounding": c.grounding.as_json() if c.grounding is not None else None,
            **({"prompts": list(c.prompts)} if len(c.prompts) > 1 else {}),
        })
        try:
            for frame in self.source:
                if self.stop_event.is_set():
                    break
                self._process(frame, trigger, worker)
                if time.monotonic() - window[0] >= c.status_every_s:
                    self.emit(self._status(worker, t0, window, final=False))
                    window = (time.monotonic(), self._summary.frames)
                # Checked after the frame, so a live source is not waited on for a frame we would not use.
                if c.max_frames is not None and self._summary.frames >= c.max_frames:
                    self._summary.stopped_by = "max_frames"
                    break
            if self.stop_event.is_set():
                self._summary.stopped_by = "signal"
        finally:
            if worker is not None:
                # On a signal: cancel; at the end of input: let the last answer finish.
                worker.close(cancel=self.stop_event.is_set())
            close = getattr(self.source, "close", None)
            if close is not None:
                close()
            final = self._status(worker, t0, window, final=True)
            self._summary.last_status = final
            self._summary.elapsed_s = time.monotonic() - t0
            self.emit(final)
            for sink in self.sinks:
                sink.close()
            if self.video is not None:
                self.video.close()
        return self._summary

    def _process(self, frame: Any, trigger: Trigger, worker: AnswerWorker | None) -> None:
        detections, timings = self.detector.detect(frame.image)
        self._summary.frames += 1
        if self.config.detections_events:
            self.emit({
                "type": "detections", "frame": frame.index, "counts": detections.counts(),
                "objects": detections.to_json(), "timings": {k: round(v, 3) for k, v in timings.items()},
            })
        # With several prompts, a frame is offered to the trigger only while the worker is idle: a job that
        # replaced a pending one would skip that one's question, and with a steady VLM/detector speed ratio the
        # same questions would be skipped every round. The trigger still sees every class/count change, because
        # its signature is only updated when it is asked.
        rotate = len(self.config.prompts) > 1
        if worker is not None and not (rotate and worker.busy):
            reason = trigger(time.monotonic(), counts_signature(detections))
            if reason is not None:
                instruction = self.config.prompts[self._asked % len(self.config.prompts)]
                try:
                    prompt = self._prompt(detections, instruction)
                except Exception as exc:  # a grounding failure is reported and the stream goes on
                    self._summary.errors += 1
                    self.emit({"type": "error", "frame": frame.index, "stage": "grounding", "message": str(exc)})
                else:
                    self._asked += 1
                    if rotate:
                        self._questions[frame.index] = instruction
                    worker.submit(AnswerJob(frame.index, frame.image, prompt, frame.timestamp, reason))
        if self.video is not None:
            self.video.write_frame(annotate(frame.image, detections, self._latest_answer))
