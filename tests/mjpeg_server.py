"""A loopback HTTP MJPEG server for live-source tests, and frames that carry their sequence number.

FFmpeg (inside OpenCV) reads ``multipart/x-mixed-replace`` JPEG streams with its mpjpeg demuxer, so
this is a real live stream as a camera or an MJPEG proxy would serve it, on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading
import time

import cv2
import numpy as np

W, H = 160, 120
POST_OUTAGE_SEQ = 1000  # the server numbers frames sent after an outage from here


# ---------------------------------------------------------------------------------------------
# Helpers: frames that carry their number, a loopback MJPEG server, fake captures


def encode_seq(seq: int) -> np.ndarray:
    """A 160x120 BGR frame showing ``seq`` as 16 blocks (2 rows x 8 columns), white = 1, MSB first."""
    image = np.zeros((H, W, 3), np.uint8)
    for bit in range(16):
        if seq >> (15 - bit) & 1:
            row, col = divmod(bit, 8)
            image[row * 60:(row + 1) * 60, col * 20:(col + 1) * 20] = 255
    image[:, :, 2] = np.maximum(image[:, :, 2], 40)  # a tint, so the frame is not plain grey
    return image


def decode_seq(image: np.ndarray) -> int:
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    seq = 0
    for bit in range(16):
        row, col = divmod(bit, 8)
        block = image[row * 60 + 8:(row + 1) * 60 - 8, col * 20 + 5:(col + 1) * 20 - 5, 1]
        seq = seq << 1 | int(block.mean() > 127)
    return seq


def jpeg(seq: int) -> bytes:
    return cv2.imencode(".jpg", encode_seq(seq), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MjpegServer:
    """A loopback HTTP MJPEG server that can have one outage, and stops by itself after ``lifetime_s``.

    Connections before the outage get frames numbered 0, 1, 2, ...; after ``pre_frames`` of them
    the outage starts and lasts ``outage_s``: the open connection then either stalls (``"stall"``:
    open, nothing sent, until the server stops) or is dropped (``"drop"``), and every new
    connection during the outage is closed at once. Connections after it get frames numbered from
    POST_OUTAGE_SEQ. ``pre_frames=None``: no outage.
    """

    def __init__(self, *, fps: float = 30, pre_frames: int | None = None, outage: str = "stall",
                 outage_s: float = 2.0, lifetime_s: float = 20.0) -> None:
        self.fps, self.pre_frames, self.outage, self.outage_s = fps, pre_frames, outage, outage_s
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + lifetime_s
        self.outage_start: float | None = None
        self.next_seq = 0
        self.last_sent = -1
        self.connections = 0
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> MjpegServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.listener.close()

    def _running(self) -> bool:
        return not self.stop_event.is_set() and time.monotonic() < self.deadline

    def _phase(self) -> str:
        if self.outage_start is None:
            return "before"
        return "outage" if time.monotonic() < self.outage_start + self.outage_s else "after"

    def _accept_loop(self) -> None:
        while self._running():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(2)
                conn.recv(4096)  # the request
                with self.lock:
                    phase = self._phase()
                    self.connections += 1
                    if phase == "outage":
                        self.refused += 1
                        return
                    if phase == "after" and self.next_seq < POST_OUTAGE_SEQ:
                        self.next_seq = POST_OUTAGE_SEQ
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                while self._running():
                    with self.lock:
                        if phase == "before" and self.pre_frames is not None and self.next_seq >= self.pre_frames:
                            if self.outage_start is None:
                                self.outage_start = time.monotonic()
                            break
                        seq = self.next_seq
                        self.next_seq += 1
                    part = jpeg(seq)
                    conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(part)
                                 + part + b"\r\n")
                    with self.lock:
                        self.last_sent = max(self.last_sent, seq)
                    time.sleep(1 / self.fps)
                if self.outage == "stall":  # keep the connection open and silent until the server stops
                    while self._running():
                        time.sleep(0.02)
            except OSError:
                pass  # the client went away
