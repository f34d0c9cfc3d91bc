"""Frame sources on OpenCV: webcams, V4L2 devices, video files, network streams, image folders.

``open_source(spec)`` turns what the user typed after ``--source`` into an iterable of ``Frame``s.

- Files, folders and single images yield every frame in order, as fast as the consumer takes
  them, and end at the end of the input. A truncated video stops cleanly after its good frames;
  unreadable images in a folder are skipped, logged and counted in ``stats.corrupt``.
- Live sources (webcam index, ``/dev/video*``, ``rtsp://``/``http://``/... URLs) are read on a
  background thread into a one-frame "latest" slot: the consumer always gets the newest frame, an
  unconsumed frame that gets overwritten is counted in ``stats.dropped``, nothing is queued. When
  reads fail or no frame arrives for ``stall_timeout_s`` (a watchdog: a read can hang), the stream
  is reopened with exponential back-off and ``stats.reconnects`` counts the attempts.
- A file opened with ``SourceConfig(realtime=True)`` is paced to its fps and drops frames like a
  live camera, but still ends at the end of the file.

Threading rule for live sources: each capture object is opened, read and released by one
``_CaptureWorker`` thread only. The watchdog never touches a capture; it *abandons* a hung worker
(which releases its capture when its read finally returns) and starts a fresh one.

This module knows nothing about detectors, models or the scheduler; it only produces frames.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from edge_vit.errors import SourceError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
DEVICE_PREFIXES = ("/dev/video", "/dev/v4l/")  # /dev/v4l/by-id/... are stable links to /dev/video*
_WATCHDOG_POLL_S = 0.05  # how often the watchdog looks at its worker; also bounds close() latency
_JOIN_TIMEOUT_S = 1.0  # close() waits this long for threads to release their captures
_FALLBACK_FPS = 30.0  # realtime pacing of a file that reports no fps


# ---------------------------------------------------------------------------------------------
# Types crossing the boundary


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame: ``image`` [H, W, 3] uint8 BGR; ``index`` counts frames delivered by this source
    (0-based, keeps increasing across reconnects); ``timestamp`` is ``time.time()`` at capture."""

    image: np.ndarray
    index: int
    timestamp: float


@dataclass
class SourceStats:
    """Counters of one source, safe to update from several threads.

    ``frames``: delivered to the consumer. ``corrupt``: empty or malformed frames skipped, and
    unreadable images in a folder. ``dropped``: live frames overwritten before the consumer took
    them. ``reconnects``: attempts to reopen a live stream after it failed or stalled.
    """

    frames: int = 0
    corrupt: int = 0
    dropped: int = 0
    reconnects: int = 0
    # Re-entrant: close() and snapshot() may run in a signal handler on a thread that holds it.
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    def add_frame(self) -> int:
        """Count one delivered frame and return its index."""
        with self._lock:
            self.frames += 1
            return self.frames - 1

    def add_corrupt(self) -> None:
        with self._lock:
            self.corrupt += 1

    def add_dropped(self) -> None:
        with self._lock:
            self.dropped += 1

    def add_reconnect(self) -> None:
        with self._lock:
            self.reconnects += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"frames": self.frames, "corrupt": self.corrupt, "dropped": self.dropped,
                    "reconnects": self.reconnects}


class SourceKind(str, Enum):
    WEBCAM = "webcam"
    DEVICE = "device"
    FILE = "file"
    URL = "url"
    FOLDER = "folder"
    IMAGE = "image"


@dataclass(frozen=True)
class SourceConfig:
    """How sources open and recover. Timeouts in seconds.

    ``open_timeout_s`` / ``read_timeout_s`` go to FFmpeg for URLs. ``stall_timeout_s``: the
    watchdog reopens a live stream that delivers no frame for this long (0 turns the watchdog off).
    Back-off starts at ``backoff_initial_s``, doubles up to ``backoff_max_s``, and resets after a
    good frame. ``max_reconnects``: consecutive failed attempts (no frame in between) before the
    source gives up and iteration ends; None retries forever. ``realtime``: play files at their
    fps and drop frames when the consumer is slow, like a live camera.
    """

    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    stall_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_reconnects: int | None = None
    realtime: bool = False

    def __post_init__(self) -> None:
        if self.open_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("SourceConfig: open and read timeouts must be > 0")
        if self.stall_timeout_s < 0:
            raise ValueError("SourceConfig: stall_timeout_s must be >= 0 (0 turns the watchdog off)")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("SourceConfig: need 0 < backoff_initial_s <= backoff_max_s")
        if self.max_reconnects is not None and self.max_reconnects < 0:
            raise ValueError("SourceConfig: max_reconnects must be >= 0 or None")


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` that sources use (tests pass fakes)."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...
    def get(self, prop_id: int) -> float: ...


class Source(Protocol):
    """What every source offers: iterate for frames; close() (idempotent, from any thread) ends it."""

    name: str
    is_live: bool  # frames arrive on the source's clock and can be dropped
    fps: float | None  # nominal, as reported by the backend
    stats: SourceStats

    def __iter__(self) -> Iterator[Frame]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Source: ...
    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------------------------
# Parsing and opening


def parse_source(spec: str) -> tuple[SourceKind, str | int]:
    """Classify a ``--source`` value: webcam index, device, URL, folder, image or video file."""
    text = spec.strip()
    if re.fullmatch(r"[0-9]+", text):
        return SourceKind.WEBCAM, int(text)
    if text.startswith(DEVICE_PREFIXES):
        return SourceKind.DEVICE, text
    if text.lower().startswith(URL_SCHEMES):
        return SourceKind.URL, text
    path = Path(text)
    if text and path.is_dir():
        return SourceKind.FOLDER, text
    if text and path.exists():
        return (SourceKind.IMAGE if path.suffix.lower() in IMAGE_EXTENSIONS else SourceKind.FILE), text
    raise SourceError(f"source not found: {spec}")


def open_source(spec: str, config: SourceConfig = SourceConfig()) -> Source:
    """Open what ``spec`` names (see ``parse_source``). Raises SourceError for a missing path, a
    file that is not a readable video, an image folder without images, or a stream that cannot be
    opened at start-up (later failures of a live stream are retried, not raised)."""
    kind, target = parse_source(spec)
    name = _redact(spec.strip())
    if kind in (SourceKind.WEBCAM, SourceKind.DEVICE):
        return _open_live(name, partial(_open_camera, target), config,
                          hint="no such camera, or it is busy")
    if kind is SourceKind.URL:
        return _open_live(name, partial(_open_url, str(target), config), config,
                          hint=f"unreachable, refused or not a video stream; waited up to {config.open_timeout_s:g} s")
    path = Path(str(target))
    if kind is SourceKind.FOLDER:
        images = list_images(path)
        if not images:
            raise SourceError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}")
        return ImageSource(name, images)
    if kind is SourceKind.IMAGE:
        return ImageSource(name, [path])
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise SourceError(f"{path} is not a readable video (FFmpeg cannot open it)")
    if config.realtime:
        return PacedFileSource(name, capture).start()
    return VideoFileSource(name, capture)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` in natural order (img2 before img10); dotfiles skipped."""
    paths = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(paths, key=lambda p: (natural_key(p.name), p.name))


def natural_key(name: str) -> list[str | int]:
    """Sort key where digit runs compare as numbers: ``img2`` < ``img10``."""
    parts = re.split(r"([0-9]+)", name)  # odd positions are the digit runs
    return [int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)]


def _open_url(url: str, config: SourceConfig) -> Capture:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(config.open_timeout_s * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(config.read_timeout_s * 1000)]
    return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def _open_camera(target: str | int) -> Capture:
    backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
    return cv2.VideoCapture(target, backend)


def _open_or_none(open_capture: Callable[[], Capture]) -> Capture | None:
    """Open a capture; None (after releasing it) when it does not open or the backend raises."""
    try:
        capture = open_capture()
    except cv2.error as exc:
        logger.debug("capture open raised: %s", exc)
        return None
    if not capture.isOpened():
        capture.release()
        return None
    return capture


def _open_live(name: str, open_capture: Callable[[], Capture], config: SourceConfig, hint: str) -> LiveSource:
    capture = _open_or_none(open_capture)
    if capture is None:
        raise SourceError(f"cannot open stream {name} ({hint})")
    return LiveSource(name, open_capture, config, fps=_nominal_fps(capture)).start(capture)


def _nominal_fps(capture: Capture) -> float | None:
    fps = capture.get(cv2.CAP_PROP_FPS)
    return float(fps) if math.isfinite(fps) and 0 < fps < 1000 else None


def _is_bgr_image(image: object) -> bool:
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.size > 0)


def _redact(spec: str) -> str:
    """Hide the password of ``scheme://user:password@host`` in names and messages."""
    return re.sub(r"(//[^/@:]+):[^/@]*@", r"\1:***@", spec)


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Files and images: every frame, in order, read on the consumer's thread


class VideoFileSource(_Closing):
    """Every frame of a video file in order, as fast as the consumer takes them; plays once.

    Stops at the end of the file or at the first failed read (a truncated file ends after its
    good frames). close() may come from another thread: the capture is released by whichever of
    close() and the reading thread comes last, never during a read.
    """

    is_live = False

    def __init__(self, name: str, capture: Capture) -> None:
        self.name = name
        self.stats = SourceStats()
        self.fps = _nominal_fps(capture)
        self._capture = capture
        self._expected = int(max(capture.get(cv2.CAP_PROP_FRAME_COUNT), 0))
        self._reads = 0
        self._lock = threading.RLock()  # guards the flags below (RLock: close() may be a signal handler)
        self._read_lock = threading.Lock()  # one read at a time when several threads iterate
        self._closed = False
        self._busy = False
        self._released = False

    def __iter__(self) -> Iterator[Frame]:
        while (read := self._read()) is not None:
            image, timestamp = read
            yield Frame(image, self.stats.add_frame(), timestamp)
        self.close()

    def _read(self) -> tuple[np.ndarray, float] | None:
        with self._read_lock:
            while True:
                with self._lock:
                    if self._closed:
                        return None
                    self._busy = True
                try:
                    ok, image = self._capture.read()
                    timestamp = time.time()
                finally:
                    with self._lock:
                        self._busy = False
                        closed = self._closed
                    if closed:
                        self._release()
                if closed:
                    return None
                if not ok:
                    if self._reads < self._expected:
                        logger.warning("%s: read failed after %d of %d frames; stopping (truncated or damaged file?)",
                                       self.name, self._reads, self._expected)
                    return None
                self._reads += 1
                if _is_bgr_image(image):
                    return image, timestamp
                self.stats.add_corrupt()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._busy
        if not busy:  # otherwise the reading thread releases after its read returns
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._capture.release()


class ImageSource(_Closing):
    """Image files in the given order, one frame each (a folder, or a single image).

    Unreadable or corrupt files are skipped with a warning and counted in ``stats.corrupt``.
    """

    is_live = False
    fps = None

    def __init__(self, name: str, paths: Sequence[Path]) -> None:
        self.name = name
        self.stats = SourceStats()
        self._paths = list(paths)
        self._next = 0
        self._lock = threading.RLock()
        self._closed = False

    def __iter__(self) -> Iterator[Frame]:
        while (path := self._take_path()) is not None:
            image = _read_image(path)
            timestamp = time.time()
            if image is None:
                logger.warning("%s: skipping unreadable image %s", self.name, path)
                self.stats.add_corrupt()
                continue
            yield Frame(image, self.stats.add_frame(), timestamp)

    def _take_path(self) -> Path | None:
        with self._lock:
            if self._closed or self._next >= len(self._paths):
                return None
            self._next += 1
            return self._paths[self._next - 1]

    def close(self) -> None:
        with self._lock:
            self._closed = True


def _read_image(path: Path) -> np.ndarray | None:
    """Decode an image file to BGR uint8, or None. (imdecode of the bytes also handles non-ASCII paths.)"""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return image if _is_bgr_image(image) else None


# ---------------------------------------------------------------------------------------------
# Live: a one-frame slot filled by a background thread


class _LatestFrame:
    """A one-item buffer: put() replaces an unconsumed item (counted as dropped); get() waits for a
    new item. finish(): the producer is done, the last item is still delivered. close(): get()
    returns None at once."""

    def __init__(self, stats: SourceStats) -> None:
        self._stats = stats
        self._cond = threading.Condition(threading.RLock())  # RLock: close() may be a signal handler
        self._item: tuple[np.ndarray, float] | None = None
        self._finished = False
        self._closed = False

    def put(self, item: tuple[np.ndarray, float]) -> None:
        with self._cond:
            if self._closed or self._finished:
                return
            if self._item is not None:
                self._stats.add_dropped()
            self._item = item
            self._cond.notify_all()

    def get(self) -> tuple[np.ndarray, float] | None:
        with self._cond:
            while self._item is None and not (self._closed or self._finished):
                self._cond.wait()
            if self._closed:
                return None
            item, self._item = self._item, None
            return item

    def finish(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()


class _CaptureWorker:
    """One capture and the daemon thread that alone opens (unless given), reads and releases it.

    ``abandon()`` makes the worker publish nothing more and release its capture as soon as the
    read in progress returns; the caller does not wait for that (a read may hang).
    """

    def __init__(self, name: str, open_capture: Callable[[], Capture], capture: Capture | None,
                 publish: Callable[[tuple[np.ndarray, float]], None], stats: SourceStats) -> None:
        self._open_capture = open_capture
        self._capture = capture
        self._publish = publish
        self._stats = stats
        self._lock = threading.Lock()
        self._abandoned = False
        self.finished = threading.Event()
        self.failure = "stream ended"
        self.started_at = time.monotonic()
        self.opened = capture is not None
        self.progress_at = self.started_at  # monotonic time of the open or of the last good frame
        self.frames = 0
        self._thread = threading.Thread(target=self._run, name=f"edge-vit-capture[{name}]", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        capture = self._capture
        self._capture = None
        try:
            if capture is None:
                capture = _open_or_none(self._open_capture)
                if capture is None:
                    self.failure = "reopen failed"
                    return
                self.progress_at = time.monotonic()
                self.opened = True
            while not self._abandoned:
                ok, image = capture.read()
                timestamp = time.time()
                if not ok:
                    self.failure = "read failed"
                    return
                if not _is_bgr_image(image):
                    self._stats.add_corrupt()
                    continue
                with self._lock:  # after abandon() returns, nothing more is published
                    if self._abandoned:
                        return
                    self.progress_at = time.monotonic()
                    self.frames += 1
                    self._publish((image, timestamp))
        except Exception as exc:  # a backend error is a stream failure, handled by reconnecting
            logger.warning("capture error: %r", exc)
            self.failure = f"capture error: {exc!r}"
        finally:
            if capture is not None:
                try:
                    capture.release()
                except Exception as exc:
                    logger.warning("capture release failed: %r", exc)
            self.finished.set()


class LiveSource(_Closing):
    """A camera or network stream read on background threads; the consumer gets the newest frame.

    A watchdog thread owns the reconnect policy: when the current ``_CaptureWorker`` ends (read
    failed, stream closed) or delivers no frame for ``stall_timeout_s``, it abandons that worker,
    waits the back-off and starts a new worker that reopens the stream. Iteration blocks for a
    frame newer than the last one and ends on close() or when ``max_reconnects`` is exceeded.
    Always close() a started source (or use ``with``): its threads run until then.
    """

    is_live = True

    def __init__(self, name: str, open_capture: Callable[[], Capture], config: SourceConfig,
                 fps: float | None = None) -> None:
        self.name = name
        self.fps = fps
        self.stats = SourceStats()
        self._open_capture = open_capture
        self._config = config
        self._slot = _LatestFrame(self.stats)
        self._closed = threading.Event()
        self._lock = threading.RLock()
        self._worker: _CaptureWorker | None = None
        self._watchdog: threading.Thread | None = None

    def start(self, capture: Capture) -> LiveSource:
        """Start reading from ``capture`` (already open; the source owns it from now on)."""
        with self._lock:
            if self._watchdog is not None:
                raise RuntimeError("LiveSource.start() called twice")
            self._worker = self._new_worker(capture)
            self._watchdog = threading.Thread(target=self._watch, name=f"edge-vit-watchdog[{self.name}]", daemon=True)
            self._watchdog.start()
        return self

    def __iter__(self) -> Iterator[Frame]:
        while (item := self._slot.get()) is not None:
            image, timestamp = item
            yield Frame(image, self.stats.add_frame(), timestamp)

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._slot.close()  # wakes a consumer waiting in iteration
        watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(_JOIN_TIMEOUT_S)
        worker = self._worker
        if worker is not None:
            worker.abandon()
            worker.join(_JOIN_TIMEOUT_S)  # usually one frame interval; a hung read is left behind

    def _new_worker(self, capture: Capture | None) -> _CaptureWorker:
        return _CaptureWorker(self.name, self._open_capture, capture, self._slot.put, self.stats)

    def _watch(self) -> None:
        config = self._config
        failures = 0  # consecutive reconnect attempts without a good frame
        delay = config.backoff_initial_s
        worker = self._worker
        assert worker is not None
        while (reason := self._wait_for_trouble(worker)) is not None:
            worker.abandon()
            if worker.frames:
                failures, delay = 0, config.backoff_initial_s
            if config.max_reconnects is not None and failures >= config.max_reconnects:
                logger.error("%s: %s; giving up after %d reconnect attempts", self.name, reason, failures)
                self._slot.finish()
                return
            failures += 1
            logger.warning("%s: %s; reconnect attempt %d in %.2g s", self.name, reason, failures, delay)
            if self._closed.wait(delay):
                return
            with self._lock:
                if self._closed.is_set():
                    return
                self.stats.add_reconnect()
                worker = self._worker = self._new_worker(None)
            delay = min(delay * 2, config.backoff_max_s)

    def _wait_for_trouble(self, worker: _CaptureWorker) -> str | None:
        """Block until ``worker`` fails or stalls (returns why) or the source is closed (None)."""
        config = self._config
        while not self._closed.is_set():
            if worker.finished.wait(_WATCHDOG_POLL_S):
                return worker.failure
            if config.stall_timeout_s <= 0:
                continue
            idle = time.monotonic() - worker.progress_at
            if worker.opened and idle > config.stall_timeout_s:
                return f"no frame for {config.stall_timeout_s:g} s"
            if not worker.opened and idle > config.open_timeout_s + config.stall_timeout_s:
                return f"reopen hung for {idle:.1f} s"
        return None


class PacedFileSource(_Closing):
    """A video file played on its own clock, like a camera: a thread reads it at its fps into a
    one-frame slot, so a slow consumer gets the newest frame and the rest count as dropped.
    Ends after the last frame of the file (or the first failed read)."""

    is_live = True

    def __init__(self, name: str, capture: Capture) -> None:
        self.name = name
        self.stats = SourceStats()
        self.fps = _nominal_fps(capture)
        self._capture = capture
        self._slot = _LatestFrame(self.stats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"edge-vit-paced[{name}]", daemon=True)

    def start(self) -> PacedFileSource:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[Frame]:
        while (item := self._slot.get()) is not None:
            image, timestamp = item
            yield Frame(image, self.stats.add_frame(), timestamp)

    def close(self) -> None:
        self._stop.set()
        self._slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        period = 1.0 / (self.fps or _FALLBACK_FPS)
        start = time.monotonic()
        reads = 0
        try:
            while not self._stop.is_set():
                ok, image = self._capture.read()
                if not ok:
                    return
                reads += 1
                if not _is_bgr_image(image):
                    self.stats.add_corrupt()
                    continue
                wait = start + (reads - 1) * period - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                self._slot.put((image, time.time()))
        finally:
            self._capture.release()
            self._slot.finish()
