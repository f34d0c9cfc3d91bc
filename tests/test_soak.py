"""Soak: thousands of small frames through the real pipeline; memory stays flat and answers don't slow down."""

import gc
import statistics

import psutil
import pytest

from edge_vit.detector import Detector, DetectorConfig
from edge_vit.stream.runner import RunConfig, StreamRunner
from edge_vit.stream.scheduler import TriggerConfig
from edge_vit.stream.sources import SourceConfig, open_source
from edge_vit.tiny import write_clip
from edge_vit.vlm import GenerationConfig, load_vlm


class Probe:
    """A sink that samples this process's RSS every 100 frames and keeps answer latencies."""

    def __init__(self):
        self.proc = psutil.Process()
        self.rss = []  # (frame, bytes)
        self.answers = []  # (frame, vlm_total ms)
        self.types = {}

    def write(self, event):
        self.types[event["type"]] = self.types.get(event["type"], 0) + 1
        if event["type"] == "detections" and event["frame"] % 100 == 0:
            self.rss.append((event["frame"], self.proc.memory_info().rss))
        elif event["type"] == "answer":
            self.answers.append((event["frame"], event["timings"]["vlm_total"]))

    def close(self):
        pass


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_3000_frames_flat_memory_and_latency(tmp_path, tiny_yolo, tiny_idefics3):
    n = 3000
    clip = write_clip(tmp_path / "soak.mp4", n_frames=n, width=96, height=64, seed=3)
    detector = Detector.load(DetectorConfig(model=str(tiny_yolo), imgsz=64, conf=0.05, track=True))
    vlm = load_vlm(str(tiny_idefics3))
    probe = Probe()
    config = RunConfig(prompt="How many shapes?", trigger=TriggerConfig(every_s=0.0, on_change=True),
                       generation=GenerationConfig(max_new_tokens=8, min_new_tokens=8), status_every_s=2.0)
    gc.collect()
    summary = StreamRunner(open_source(str(clip), SourceConfig()), detector, vlm, config, [probe]).run()
    assert summary.frames == n and summary.stopped_by == "end"
    assert len(probe.answers) > 50, "the VLM should answer continuously"
    # Memory: after warm-up (first 500 frames), RSS grows less than 10% to the end.
    warm = [r for f, r in probe.rss if f >= 500]
    growth = (max(warm) - warm[0]) / warm[0]
    assert growth < 0.10, f"RSS grew {growth:.1%} from {warm[0] >> 20} MiB to {max(warm) >> 20} MiB"
    # Latency: the last third of answers is not slower than the first third (1.5x margin for a busy CI box).
    third = len(probe.answers) // 3
    first = statistics.median(t for _, t in probe.answers[1:third])  # skip the very first (warm-up)
    last = statistics.median(t for _, t in probe.answers[-third:])
    print(f"soak: {summary.frames} frames, {len(probe.answers)} answers, RSS {warm[0] >> 20} -> {max(warm) >> 20} MiB "
          f"({growth:+.1%}), answer latency median {first:.1f} ms (first third) vs {last:.1f} ms (last third)")
    assert last < 1.5 * first, f"answer latency grew from {first:.1f} ms to {last:.1f} ms"
