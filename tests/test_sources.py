"""Frame sources: parsing, files, folders, and live streams that stall, drop and come back.

Live tests run a real HTTP MJPEG server (``multipart/x-mixed-replace``, read by FFmpeg's mpjpeg
demuxer) on 127.0.0.1 in a thread. Every frame carries its sequence number as a 16-bit pattern of
black and white blocks, so a test can decode which server frame it got.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_vit.errors import SourceError
from edge_vit.stream.sources import (
    Frame,
    LiveSource,
    SourceConfig,
    SourceKind,
    natural_key,
    open_source,
    parse_source,
)

from mjpeg_server import POST_OUTAGE_SEQ, H, W, MjpegServer, decode_seq, encode_seq, free_port, jpeg  # noqa: F401


class FakeCapture:
    """A capture that returns the given frames (ints become encoded frames, None an empty frame),
    then fails (``then="fail"``) or hangs in read() until ``unblock`` is set (``then="hang"``)."""

    def __init__(self, frames: list[int | None], then: str = "fail", unblock: threading.Event | None = None,
                 period_s: float = 0.0) -> None:
        self.frames = list(frames)
        self.then = then
        self.unblock = unblock or threading.Event()
        self.period_s = period_s
        self.reading = False
        self.released = threading.Event()
        self.released_while_reading = False
        self.read_threads: set[str] = set()
        self.release_thread: str | None = None

    def isOpened(self) -> bool:
        return True

    def get(self, prop_id: int) -> float:
        return 0.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reading = True
        self.read_threads.add(threading.current_thread().name)
        try:
            assert not self.released.is_set(), "read() after release()"
            if self.period_s:
                time.sleep(self.period_s)
            if self.frames:
                seq = self.frames.pop(0)
                return True, (np.zeros((0, 0, 3), np.uint8) if seq is None else encode_seq(seq))
            if self.then == "hang":
                self.unblock.wait(30)
            return False, None
        finally:
            self.reading = False

    def release(self) -> None:
        self.released_while_reading |= self.reading
        self.release_thread = threading.current_thread().name
        self.released.set()


def fake_opener(captures: list[FakeCapture | None]):
    """An open_capture callable handing out ``captures`` in turn (None: fails to open), then failing."""
    pending = list(captures)

    class Closed(FakeCapture):
        def isOpened(self) -> bool:
            return False

    def open_capture():
        capture = pending.pop(0) if pending else None
        return capture if capture is not None else Closed([])

    return open_capture


class Consumer:
    """Iterates a source on a thread until ``stop_when(frames)`` holds (then keeps iterating, as a
    real consumer would, until the source ends or is closed)."""

    def __init__(self, source, stop_when) -> None:
        self.source = source
        self.frames: list[Frame] = []
        self.enough = threading.Event()
        self.ended_at: float | None = None
        self._stop_when = stop_when
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for frame in self.source:
            self.frames.append(frame)
            if self._stop_when(self.frames):
                self.enough.set()
        self.ended_at = time.monotonic()
        self.enough.set()

    def wait(self, timeout_s: float) -> list[Frame]:
        self.enough.wait(timeout_s)
        return list(self.frames)

    def close_source(self) -> float:
        """close() the source; returns how long after the call the iteration ended."""
        t0 = time.monotonic()
        self.source.close()
        self.thread.join(3)
        assert not self.thread.is_alive(), "iteration did not end after close()"
        return self.ended_at - t0


FAST = SourceConfig(open_timeout_s=2, read_timeout_s=2, stall_timeout_s=0.5, backoff_initial_s=0.1,
                    backoff_max_s=0.4)


# ---------------------------------------------------------------------------------------------
# parse_source


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "folder").mkdir()
    for name in ("a.jpg", "b.JPEG", "c.png", "d.bmp", "e.webp", "f.tif", "g.TIFF", "clip.mp4", "clip.mkv", "noext"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize(("spec", "kind", "target"), [
    ("0", SourceKind.WEBCAM, 0),
    ("12", SourceKind.WEBCAM, 12),
    (" 1 ", SourceKind.WEBCAM, 1),
    ("/dev/video0", SourceKind.DEVICE, "/dev/video0"),
    ("/dev/video12", SourceKind.DEVICE, "/dev/video12"),
    ("/dev/v4l/by-id/usb-cam-video-index0", SourceKind.DEVICE, "/dev/v4l/by-id/usb-cam-video-index0"),
    ("rtsp://cam.local:554/stream1", SourceKind.URL, "rtsp://cam.local:554/stream1"),
    ("rtsps://user:pw@cam/s", SourceKind.URL, "rtsps://user:pw@cam/s"),
    ("rtmp://host/live/key", SourceKind.URL, "rtmp://host/live/key"),
    ("http://127.0.0.1:8080/video.mjpg", SourceKind.URL, "http://127.0.0.1:8080/video.mjpg"),
    ("HTTPS://host/x.m3u8", SourceKind.URL, "HTTPS://host/x.m3u8"),
    ("udp://@:1234", SourceKind.URL, "udp://@:1234"),
    ("tcp://127.0.0.1:9000", SourceKind.URL, "tcp://127.0.0.1:9000"),
    ("{tmp}/folder", SourceKind.FOLDER, "{tmp}/folder"),
    ("{tmp}/a.jpg", SourceKind.IMAGE, "{tmp}/a.jpg"),
    ("{tmp}/b.JPEG", SourceKind.IMAGE, "{tmp}/b.JPEG"),
    ("{tmp}/c.png", SourceKind.IMAGE, "{tmp}/c.png"),
    ("{tmp}/d.bmp", SourceKind.IMAGE, "{tmp}/d.bmp"),
    ("{tmp}/e.webp", SourceKind.IMAGE, "{tmp}/e.webp"),
    ("{tmp}/f.tif", SourceKind.IMAGE, "{tmp}/f.tif"),
    ("{tmp}/g.TIFF", SourceKind.IMAGE, "{tmp}/g.TIFF"),
    ("{tmp}/clip.mp4", SourceKind.FILE, "{tmp}/clip.mp4"),
    ("{tmp}/clip.mkv", SourceKind.FILE, "{tmp}/clip.mkv"),
    ("{tmp}/noext", SourceKind.FILE, "{tmp}/noext"),
])
def test_parse_source(media: Path, spec: str, kind: SourceKind, target) -> None:
    spec = spec.replace("{tmp}", str(media))
    target = target.replace("{tmp}", str(media)) if isinstance(target, str) else target
    assert parse_source(spec) == (kind, target)


@pytest.mark.parametrize("spec", ["{tmp}/missing.mp4", "{tmp}/missing_dir/", "", "ftp://host/x.mp4", "-1", "1.5"])
def test_parse_source_not_found(media: Path, spec: str) -> None:
    spec = spec.replace("{tmp}", str(media))
    with pytest.raises(SourceError, match="source not found"):
        parse_source(spec)


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["img10.jpg", "img2.jpg", "IMG1.jpg", "img1b.jpg", "img0002.png", "a.jpg"]
    assert sorted(names, key=natural_key) == ["a.jpg", "IMG1.jpg", "img1b.jpg", "img2.jpg", "img0002.png", "img10.jpg"]


# ---------------------------------------------------------------------------------------------
# Files, folders, images


def write_mp4(path: Path, n: int = 30, fps: float = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert writer.isOpened()
    for seq in range(n):
        writer.write(encode_seq(seq))
    writer.release()
    return path


def faststart(data: bytes) -> bytes:
    """Move the moov box of an MP4 before its mdat and shift the chunk offsets (like ffmpeg's
    +faststart), so that a truncated copy still has its index: an interrupted download."""
    def boxes(buf, start, end):
        while start < end:
            size, kind = struct.unpack(">I4s", buf[start:start + 8])
            yield kind, start, size
            start += size

    top = {kind: (start, size) for kind, start, size in boxes(data, 0, len(data))}
    (moov_at, moov_size), (mdat_at, mdat_size) = top[b"moov"], top[b"mdat"]
    assert mdat_at < moov_at
    moov = bytearray(data[moov_at:moov_at + moov_size])

    def shift(start, end):
        for kind, at, size in boxes(moov, start, end):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift(at + 8, at + size)
            elif kind == b"stco":
                (count,) = struct.unpack(">I", moov[at + 12:at + 16])
                for k in range(count):
                    o = at + 16 + 4 * k
                    moov[o:o + 4] = struct.pack(">I", struct.unpack(">I", moov[o:o + 4])[0] + moov_size)

    shift(8, moov_size)
    return data[:mdat_at] + bytes(moov) + data[mdat_at:mdat_at + mdat_size]


@pytest.mark.timeout(30)
def test_video_file_delivers_every_frame_in_order_then_stops(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "clip.mp4")
    with open_source(str(path)) as source:
        assert not source.is_live and source.fps == pytest.approx(30) and source.name == str(path)
        frames = list(source)
    assert [decode_seq(f.image) for f in frames] == list(range(30))
    assert [f.index for f in frames] == list(range(30))
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    assert source.stats.snapshot() == {"frames": 30, "corrupt": 0, "dropped": 0, "reconnects": 0}
    assert list(source) == []  # plays once
    source.close()  # idempotent


@pytest.mark.timeout(30)
def test_truncated_video_stops_cleanly_after_good_frames(tmp_path: Path, caplog) -> None:
    data = faststart(write_mp4(tmp_path / "clip.mp4").read_bytes())
    whole = tmp_path / "fast.mp4"
    whole.write_bytes(data)
    with open_source(str(whole)) as source:
        assert [decode_seq(f.image) for f in source] == list(range(30))  # the rewrite itself is sound
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with caplog.at_level(logging.WARNING), open_source(str(cut)) as source:
        frames = list(source)
    assert 0 < len(frames) < 30
    assert [decode_seq(f.image) for f in frames[:-1]] == list(range(len(frames) - 1))  # the last may be damaged
    assert "truncated" in caplog.text


def test_truncated_video_without_index_is_a_source_error(tmp_path: Path) -> None:
    data = write_mp4(tmp_path / "clip.mp4").read_bytes()  # OpenCV writes the moov index at the end
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="not a readable video"):
        open_source(str(cut))


def test_missing_path_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source not found: .*nope.mp4"):
        open_source(str(tmp_path / "nope.mp4"))


def test_non_video_file_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(SourceError, match=r"notes\.mp4 is not a readable video"):
        open_source(str(path))


def test_empty_folder_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(tmp_path))


def test_folder_natural_order_skips_and_counts_corrupt_images(tmp_path: Path, caplog) -> None:
    for seq, name in [(10, "img10.jpg"), (2, "img2.png"), (1, "img1.jpg"), (3, "IMG3.bmp")]:
        assert cv2.imwrite(str(tmp_path / name), encode_seq(seq))
    (tmp_path / "img5.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    (tmp_path / "img6.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING), open_source(str(tmp_path)) as source:
        assert not source.is_live and source.fps is None
        frames = list(source)
    assert [decode_seq(f.image) for f in frames] == [1, 2, 3, 10]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert source.stats.corrupt == 2 and source.stats.frames == 4
    assert "img5.jpg" in caplog.text and "img6.png" in caplog.text


def test_single_image_is_one_frame(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    cv2.imwrite(str(path), encode_seq(77))
    with open_source(str(path)) as source:
        frames = list(source)
    assert len(frames) == 1 and decode_seq(frames[0].image) == 77 and frames[0].index == 0


@pytest.mark.timeout(30)
def test_file_close_from_another_thread_ends_iteration(tmp_path: Path) -> None:
    source = open_source(str(write_mp4(tmp_path / "clip.mp4", n=300)))
    consumer = Consumer(source, lambda fs: len(fs) >= 5)
    consumer.wait(10)
    assert consumer.close_source() < 0.5
    frames = consumer.frames
    assert 5 <= len(frames) < 300
    source.close()


@pytest.mark.timeout(30)
def test_realtime_file_is_paced_and_drops_for_a_slow_consumer(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "clip.mp4", n=30, fps=30)  # one second of video
    t0 = time.monotonic()
    seqs = []
    with open_source(str(path), SourceConfig(realtime=True)) as source:
        assert source.is_live
        for frame in source:
            seqs.append(decode_seq(frame.image))
            time.sleep(0.1)
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 5
    assert 5 <= len(seqs) < 20 and seqs == sorted(set(seqs)) and seqs[-1] >= 27
    assert source.stats.dropped >= 10 and source.stats.frames == len(seqs)


# ---------------------------------------------------------------------------------------------
# Live streams


@pytest.mark.timeout(30)
def test_unreachable_url_is_a_source_error_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}/x.mjpg"
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot open stream http://127\.0\.0\.1"):
        open_source(url, SourceConfig(open_timeout_s=2))
    assert time.monotonic() - t0 < 3


@pytest.mark.timeout(30)
def test_silent_server_hits_the_open_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog), never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.mjpg"
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="cannot open stream"):
            open_source(url, SourceConfig(open_timeout_s=1))
        assert time.monotonic() - t0 < 4


def test_missing_device_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="cannot open stream /dev/video987"):
        open_source("/dev/video987")


def test_url_password_is_redacted_in_errors() -> None:
    with pytest.raises(SourceError) as info:
        open_source(f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/s", SourceConfig(open_timeout_s=1))
    assert "hunter2" not in str(info.value) and "admin:***@" in str(info.value)


@pytest.mark.timeout(60)
def test_mjpeg_stream_frames_are_new_and_in_order() -> None:
    with MjpegServer(fps=30) as server, open_source(server.url, FAST) as source:
        assert source.is_live and source.name == server.url
        consumer = Consumer(source, lambda fs: len(fs) >= 20)
        consumer.wait(10)
        assert consumer.close_source() < 0.5
        frames = consumer.frames
    seqs = [decode_seq(f.image) for f in frames]
    assert len(frames) >= 20 and seqs == sorted(set(seqs))  # never the same frame twice
    assert [f.index for f in frames] == list(range(len(frames)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outage", ["stall", "drop"])
def test_live_stream_reconnects_after_an_outage(outage: str, caplog) -> None:
    # "stall": the connection stays open and silent, and read_timeout_s (30 s) is longer than the
    # test, so only the watchdog (stall_timeout_s=0.5) can notice; it must abandon the capture
    # stuck in read(). "drop": the server closes the connection, read() fails at once.
    # New connections during the 2 s outage are closed by the server, exercising the back-off.
    config = SourceConfig(open_timeout_s=2, read_timeout_s=30, stall_timeout_s=0.5,
                          backoff_initial_s=0.1, backoff_max_s=0.4)
    with caplog.at_level(logging.WARNING, logger="edge_vit.stream.sources"), \
            MjpegServer(fps=30, pre_frames=20, outage=outage, outage_s=2.0) as server, \
            open_source(server.url, config) as source:
        post = lambda fs: sum(decode_seq(f.image) >= POST_OUTAGE_SEQ for f in fs)  # noqa: E731
        consumer = Consumer(source, lambda fs: post(fs) >= 15)
        frames = consumer.wait(15)
        close_s = consumer.close_source()
        stats = source.stats.snapshot()
    seqs = [decode_seq(f.image) for f in frames]
    before = [s for s in seqs if s < POST_OUTAGE_SEQ]
    after = [s for s in seqs if s >= POST_OUTAGE_SEQ]
    assert len(before) >= 10, seqs  # most of the 20 pre-outage frames (the consumer keeps up)
    assert len(after) >= 15, (seqs, stats, server.connections)
    assert seqs == before + after  # nothing stale after the outage
    assert seqs == sorted(set(seqs))  # never the same frame twice
    assert after[0] < POST_OUTAGE_SEQ + 10  # picked up right when the server came back
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(a.timestamp <= b.timestamp for a, b in zip(frames, frames[1:]))
    gap = frames[len(before)].timestamp - frames[len(before) - 1].timestamp
    assert 1.5 < gap < 4  # the outage lasted 2 s from the server's side
    assert stats["reconnects"] >= 1 and server.refused >= 1  # at least one attempt failed during the outage
    assert stats["frames"] == len(frames)
    assert close_s < 1.0
    assert "reconnect attempt" in caplog.text
    if outage == "stall":
        assert "no frame for 0.5 s" in caplog.text


@pytest.mark.timeout(60)
def test_slow_consumer_gets_the_latest_frame_and_drops_are_counted() -> None:
    with MjpegServer(fps=50) as server, open_source(server.url, FAST) as source:
        lags, seqs = [], []
        for frame in source:
            seq = decode_seq(frame.image)
            with server.lock:
                lags.append(server.last_sent - seq)
            seqs.append(seq)
            if len(seqs) == 8:
                break
            time.sleep(0.25)  # a slow model
        stats = source.stats.snapshot()
    assert stats["dropped"] >= 40, stats  # ~12 frames arrive per 0.25 s, only one is taken
    assert min(b - a for a, b in zip(seqs, seqs[1:])) >= 5, seqs
    assert max(lags[1:]) <= 10, lags  # the newest frame, not one queued since the last take


# ---------------------------------------------------------------------------------------------
# Live sources with fake captures: the threading rules, deterministically


def start_fake(captures: list[FakeCapture | None], config: SourceConfig) -> LiveSource:
    open_capture = fake_opener(captures)
    return LiveSource("fake", open_capture, config).start(open_capture())


@pytest.mark.timeout(30)
def test_watchdog_abandons_a_read_that_hangs_forever() -> None:
    unblock = threading.Event()
    hung = FakeCapture([0, 1, 2], then="hang", unblock=unblock, period_s=0.02)
    fresh = FakeCapture([100, 101, 102, 103], then="hang", unblock=unblock, period_s=0.02)
    source = start_fake([hung, None, fresh], SourceConfig(stall_timeout_s=0.5, backoff_initial_s=0.05))
    try:
        consumer = Consumer(source, lambda fs: decode_seq(fs[-1].image) == 103)
        frames = consumer.wait(10)
        seqs = [decode_seq(f.image) for f in frames]
        # A consumer slowed down by a busy machine may miss some (dropped) but never the last
        # frame before the hang, and never sees one twice or out of order.
        assert seqs == sorted(set(seqs)) and set(seqs) <= {0, 1, 2, 100, 101, 102, 103}
        assert 2 in seqs and seqs[-1] == 103, seqs
        assert source.stats.frames + source.stats.dropped == 7
        assert [f.index for f in frames] == list(range(len(frames)))
        assert source.stats.reconnects >= 2  # one open failed, the next one worked
        assert not hung.released.is_set()  # still inside read(): nobody may release it under its feet
        assert consumer.close_source() < 1.0
    finally:
        unblock.set()
    assert hung.released.wait(3) and fresh.released.wait(3)
    for capture in (hung, fresh):
        assert not capture.released_while_reading
        assert capture.read_threads == {capture.release_thread}  # one thread owns each capture


@pytest.mark.timeout(30)
def test_corrupt_live_frames_are_skipped_and_counted() -> None:
    source = start_fake([FakeCapture([0, None, 1, None, None, 2], period_s=0.02)],
                        SourceConfig(max_reconnects=0))
    with source:
        seqs = [decode_seq(f.image) for f in source]  # ends: the read fails and no reconnect is allowed
    assert source.stats.corrupt == 3
    assert seqs[-1] == 2 and set(seqs) <= {0, 1, 2} and source.stats.frames + source.stats.dropped == 3


@pytest.mark.timeout(30)
def test_iteration_ends_when_max_reconnects_is_exceeded(caplog) -> None:
    config = SourceConfig(backoff_initial_s=0.05, backoff_max_s=0.1, max_reconnects=3)
    source = start_fake([FakeCapture([0, 1], period_s=0.02), FakeCapture([2], period_s=0.02)], config)
    with caplog.at_level(logging.WARNING), source:
        t0 = time.monotonic()
        seqs = [decode_seq(f.image) for f in source]
    assert 1 in seqs and seqs[-1] == 2 and seqs == sorted(set(seqs))
    # The first capture fails; attempt 1 opens the second (a good frame resets the count);
    # then 3 failed attempts, and the source gives up.
    assert source.stats.reconnects == 4
    assert time.monotonic() - t0 < 3
    assert "giving up after 3 reconnect attempts" in caplog.text


@pytest.mark.timeout(30)
def test_close_unblocks_a_waiting_consumer() -> None:
    unblock = threading.Event()
    source = start_fake([FakeCapture([], then="hang", unblock=unblock)], SourceConfig(stall_timeout_s=60))
    try:
        consumer = Consumer(source, lambda fs: True)
        assert consumer.wait(0.3) == [] and consumer.thread.is_alive()
        assert consumer.close_source() < 0.5
        source.close()  # idempotent
        assert list(source) == []
    finally:
        unblock.set()


@pytest.mark.timeout(30)
def test_close_from_many_threads_at_once() -> None:
    source = start_fake([FakeCapture(list(range(1000)), period_s=0.002)], FAST)
    consumer = Consumer(source, lambda fs: len(fs) >= 3)
    consumer.wait(5)
    closers = [threading.Thread(target=source.close) for _ in range(8)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(3)
    consumer.thread.join(3)
    assert not consumer.thread.is_alive() and not any(t.is_alive() for t in closers)
