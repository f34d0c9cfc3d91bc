"""When the VLM answers, and on which frame: a trigger policy and a single-slot answer worker.

The detector keeps pace with the stream; the VLM is slower and runs in its own
thread. ``Trigger`` decides when a frame deserves an answer (every N seconds,
or when the set of detected classes/counts changes). ``AnswerWorker`` holds at
most one pending job: a newer job replaces an older one that has not started
(it is counted as superseded), so answers always describe the latest frame and
nothing queues up behind the model. This module knows nothing about sources,
detectors or files.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge_vit.errors import EdgeVitError
from edge_vit.types import Answer, GroundedPrompt
from edge_vit.vlm.base import GenerationConfig, VLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggerConfig:
    every_s: float | None = 5.0  # answer at least this often (None: never on a timer)
    on_change: bool = True  # answer when the detected classes/counts change
    min_interval_s: float = 0.0  # never trigger more often than this

    def __post_init__(self) -> None:
        if self.every_s is not None and self.every_s < 0:
            raise EdgeVitError(f"--every must be >= 0 seconds, got {self.every_s}")
        if self.every_s is None and not self.on_change:
            raise EdgeVitError("no VLM trigger: give --every SECONDS or --on-change")


class Trigger:
    """Decides per frame whether to ask the VLM; the first frame always triggers."""

    def __init__(self, config: TriggerConfig) -> None:
        self.config = config
        self._last_time: float | None = None
        self._last_signature: object = None

    def __call__(self, now: float, signature: object) -> str | None:
        """Return the reason ("first", "change", "timer") to answer this frame, or None."""
        c = self.config
        reason = None
        if self._last_time is None:
            reason = "first"
        elif now - self._last_time < c.min_interval_s:
            reason = None
        elif c.on_change and signature != self._last_signature:
            reason = "change"
        elif c.every_s is not None and now - self._last_time >= c.every_s:
            reason = "timer"
        if reason is not None:
            self._last_time = now
        # Track the signature on every frame, so a change is seen once, not until the next answer.
        self._last_signature = signature
        return reason


@dataclass(frozen=True)
class AnswerJob:
    frame_id: int
    image: np.ndarray
    prompt: GroundedPrompt
    frame_time: float
    reason: str = ""


class AnswerWorker:
    """Runs VLM jobs one at a time in a background thread; keeps only the newest pending job.

    Callbacks run on the worker thread: ``on_token(frame_id, text)`` for each
    streamed piece, ``on_answer(answer)`` when a job ends, ``on_error(job, exc)``
    when one fails (the worker carries on with the next job).
    """

    def __init__(
        self,
        vlm: VLM,
        config: GenerationConfig,
        on_answer: Callable[[Answer], None],
        on_token: Callable[[int, str], None] | None = None,
        on_error: Callable[[AnswerJob, Exception], None] | None = None,
    ) -> None:
        self.vlm = vlm
        self.config = config
        self.on_answer = on_answer
        self.on_token = on_token
        self.on_error = on_error
        self._cond = threading.Condition()
        self._pending: AnswerJob | None = None
        self._busy = False
        self._closing = False
        self._cancel = threading.Event()
        self.submitted = 0
        self.superseded = 0
        self.answered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="vlm-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy or self._pending is not None

    def submit(self, job: AnswerJob) -> None:
        with self._cond:
            if self._closing:
                return
            if self._pending is not None:
                self.superseded += 1
            self._pending = job
            self.submitted += 1
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                self._run(job)
            except Exception as exc:  # one bad frame must not end the stream
                self.failed += 1
                if self.on_error is not None:
                    self.on_error(job, exc)
                else:
                    log.exception("VLM job for frame %d failed", job.frame_id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, job: AnswerJob) -> None:
        pieces: list[str] = []
        stats = None
        for step in self.vlm.generate(job.image, job.prompt.text, self.config, cancel=self._cancel):
            if step.done:
                stats = step.stats
                break
            pieces.append(step.text)
            if self.on_token is not None and step.text:
                self.on_token(job.frame_id, step.text)
        timings = dict(stats.timings()) if stats is not None else {}
        timings["frame_age"] = (time.time() - job.frame_time) * 1000.0
        answer = Answer(
            text="".join(pieces).strip(),
            frame_id=job.frame_id,
            prompt=job.prompt.instruction,
            timings=timings,
            new_tokens=stats.new_tokens if stats is not None else len(pieces),
            finish_reason=stats.finish_reason if stats is not None else "stop",
            frame_time=job.frame_time,
            grounding=job.prompt.grounding,
        )
        self.answered += 1
        self.on_answer(answer)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is running or pending; True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, cancel: bool = False, timeout: float | None = 30.0) -> None:
        """Stop the worker. ``cancel`` drops the pending job and stops the running one at its next token
        (its partial answer is still reported, marked "cancelled"); otherwise both finish first."""
        with self._cond:
            if cancel:
                if self._pending is not None:
                    self.superseded += 1
                self._pending = None
                self._cancel.set()
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
