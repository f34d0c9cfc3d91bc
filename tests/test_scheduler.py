"""Trigger policy and the single-slot answer worker, with a scripted fake VLM (no model needed)."""

import threading
import time

import numpy as np
import pytest

from edge_vit.errors import EdgeVitError, PromptTooLongError
from edge_vit.stream.scheduler import AnswerJob, AnswerWorker, Trigger, TriggerConfig
from edge_vit.types import GroundedPrompt
from edge_vit.vlm.base import GenerationConfig, GenerationStats, Step


class FakeVLM:
    """Yields one token per ``delay`` seconds; records which frames it saw."""

    name = "fake"
    max_context = 100

    def __init__(self, delay=0.01, fail_on=()):
        self.delay = delay
        self.fail_on = set(fail_on)
        self.seen = []
        self.started = threading.Event()

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, image, prompt, config=GenerationConfig(), cancel=None):
        frame_id = int(image[0, 0, 0])
        self.seen.append(frame_id)
        self.started.set()
        if frame_id in self.fail_on:
            raise PromptTooLongError("too long")
        stats = GenerationStats(finish_reason="length")
        for i in range(config.max_new_tokens):
            time.sleep(self.delay)
            stats.new_tokens += 1
            yield Step(text=f"t{i} ", token_id=i)
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
        yield Step(stats=stats)


def job(i):
    img = np.full((4, 4, 3), i, np.uint8)
    return AnswerJob(i, img, GroundedPrompt(text="q", instruction="q", grounding=""), time.time())


@pytest.mark.parametrize(
    "config, events, expected",
    [
        # (time, signature) per frame → reason
        (TriggerConfig(every_s=5, on_change=False), [(0, "a"), (1, "b"), (5, "b"), (6, "c"), (10.5, "c")],
         ["first", None, "timer", None, "timer"]),
        (TriggerConfig(every_s=None, on_change=True), [(0, "a"), (1, "a"), (2, "b"), (3, "b"), (99, "b")],
         ["first", None, "change", None, None]),
        (TriggerConfig(every_s=10, on_change=True), [(0, "a"), (1, "b"), (2, "b"), (12, "b")],
         ["first", "change", None, "timer"]),
        (TriggerConfig(every_s=0, on_change=False), [(0, "a"), (0.1, "a"), (0.2, "a")], ["first", "timer", "timer"]),
        # a change during the minimum interval is not replayed later
        (TriggerConfig(every_s=None, on_change=True, min_interval_s=2), [(0, "a"), (1, "b"), (3, "b")],
         ["first", None, None]),
    ],
)
def test_trigger_table(config, events, expected):
    trigger = Trigger(config)
    assert [trigger(t, sig) for t, sig in events] == expected


def test_trigger_needs_a_reason():
    with pytest.raises(EdgeVitError):
        TriggerConfig(every_s=None, on_change=False)


def test_newer_job_supersedes_pending_one_and_answers_use_latest_frame():
    vlm = FakeVLM(delay=0.02)
    answers = []
    worker = AnswerWorker(vlm, GenerationConfig(max_new_tokens=5), on_answer=answers.append)
    worker.submit(job(1))
    assert vlm.started.wait(5)
    for i in range(2, 7):  # arrive while frame 1 is being answered
        worker.submit(job(i))
    assert worker.wait_idle(10)
    worker.close()
    assert vlm.seen == [1, 6]
    assert [a.frame_id for a in answers] == [1, 6]
    assert worker.superseded == 4 and worker.answered == 2
    assert answers[0].text == "t0 t1 t2 t3 t4" and answers[0].finish_reason == "length"
    assert answers[0].timings["frame_age"] >= 0


def test_close_with_cancel_reports_partial_answer():
    vlm = FakeVLM(delay=0.05)
    answers = []
    tokens = []
    worker = AnswerWorker(vlm, GenerationConfig(max_new_tokens=200), on_answer=answers.append,
                          on_token=lambda f, t: tokens.append((f, t)))
    worker.submit(job(3))
    assert vlm.started.wait(5)
    time.sleep(0.2)
    worker.submit(job(4))  # pending: dropped on cancel
    t0 = time.monotonic()
    worker.close(cancel=True)
    assert time.monotonic() - t0 < 2
    assert [a.frame_id for a in answers] == [3]
    assert answers[0].finish_reason == "cancelled" and 0 < answers[0].new_tokens < 200
    assert tokens and all(f == 3 for f, _ in tokens)


def test_close_without_cancel_drains():
    vlm = FakeVLM(delay=0.01)
    answers = []
    worker = AnswerWorker(vlm, GenerationConfig(max_new_tokens=3), on_answer=answers.append)
    worker.submit(job(1))
    worker.close(cancel=False)
    assert [a.frame_id for a in answers] == [1] and answers[0].finish_reason == "length"


def test_a_failing_job_is_reported_and_the_worker_goes_on():
    vlm = FakeVLM(delay=0.0, fail_on={2})
    answers, errors = [], []
    worker = AnswerWorker(vlm, GenerationConfig(max_new_tokens=2), on_answer=answers.append,
                          on_error=lambda j, e: errors.append((j.frame_id, str(e))))
    worker.submit(job(2))
    worker.wait_idle(5)
    worker.submit(job(3))
    worker.close()
    assert errors == [(2, "too long")] and [a.frame_id for a in answers] == [3] and worker.failed == 1
