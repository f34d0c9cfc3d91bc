"""The detector stage: an Ultralytics YOLO model (``.pt``, ``.yaml``, ``.onnx``, ``.engine``) turned into ``Detections``.

Ultralytics does the pre-processing, inference, NMS (or the NMS-free head) and
tracking (ByteTrack/BoT-SORT through ``model.track``); this module only chooses
options, validates the model path and converts results (and, next to a VLM on the
same CPU, reopens Ultralytics' ONNX Runtime session with spinning off:
``no_spin_session``). It must not reimplement YOLO pre/post-processing.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_vit.errors import EdgeVitError, ModelLoadError
from edge_vit.types import Detections

DETECTOR_SUFFIXES = (".pt", ".yaml", ".yml", ".onnx", ".engine")
log = logging.getLogger(__name__)

# Names Ultralytics can fetch from its release assets when online (e.g. "yolo26n.pt", "yolo11s.pt").
_ASSET_NAME = re.compile(r"^yolo(v\d+|\d+)[nsmlx]?(-\w+)?\.(pt|yaml)$")


@dataclass(frozen=True)
class DetectorConfig:
    model: str = "yolo26n.pt"
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int = 640
    classes: tuple[str, ...] | None = None  # class names to keep; None keeps all
    device: str | None = None  # "cpu", "0", "cuda:0"; None lets Ultralytics choose
    track: bool = False
    tracker: str = "bytetrack.yaml"
    half: bool = False
    max_det: int = 300
    # NMS over all classes together (Ultralytics' agnostic_nms): one box per object when the classes exclude
    # each other, as the demo's colour-shape labels do; off by default, as in Ultralytics.
    agnostic_nms: bool = False
    prefer_exported: bool = True  # load foo.onnx (CPU) / foo.engine (CUDA) exported next to foo.pt; see prefer_exported
    # An .onnx model on ONNX Runtime's CPU provider: let its threads spin between runs (ONNX Runtime's default,
    # what Ultralytics opens). False when something else computes on the same cores meanwhile, as the VLM
    # worker of `edge-vit run` does: the spinning threads cost it ~40% of its decode speed (no_spin_session).
    ort_spinning: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise EdgeVitError(f"--conf must be in [0, 1], got {self.conf}")
        if not 0.0 < self.iou <= 1.0:
            raise EdgeVitError(f"--iou must be in (0, 1], got {self.iou}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise EdgeVitError(f"--imgsz must be a multiple of 32 and >= 32, got {self.imgsz}")

    def box_settings(self) -> dict:
        """The settings the boxes depend on, for a record of how a run or a report was made."""
        return {"imgsz": self.imgsz, "conf": self.conf, "iou": self.iou, "agnostic_nms": self.agnostic_nms}


def ultralytics_logs_to_stderr() -> list[logging.StreamHandler]:
    """Point Ultralytics' log handlers that write to stdout at stderr; returns the handlers moved.

    Ultralytics binds its handler to stdout at import and logs while loading a model ("Loading x.onnx for
    ONNX Runtime inference...") and validating; our CLIs keep stdout for answers and reports. Never done on
    import: a program using this package keeps Ultralytics' own behaviour.
    """
    from ultralytics.utils import LOGGER

    moved = [h for h in LOGGER.handlers if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout]
    for handler in moved:
        handler.setStream(sys.stderr)
    return moved


def check_detector_path(model: str) -> None:
    """Fail early, in one line, on a path that cannot be a YOLO model."""
    path = Path(model)
    if path.exists():
        if path.is_dir() and not model.rstrip("/").endswith(("_openvino_model", "_saved_model", "_ncnn_model")):
            raise ModelLoadError(f"detector '{model}' is a folder; expected a YOLO file ({', '.join(DETECTOR_SUFFIXES)})")
        return
    if _ASSET_NAME.match(model):
        return  # a release asset name: a .yaml builds offline, a .pt is fetched by Ultralytics if online
    raise ModelLoadError(f"detector model not found: '{model}' (expected a YOLO file: {', '.join(DETECTOR_SUFFIXES)})")


class Detector:
    """Runs a loaded Ultralytics model on BGR frames."""

    def __init__(self, model: Any, config: DetectorConfig) -> None:
        self.model = model
        self.config = config
        self.names: dict[int, str] = dict(model.names)
        self.class_ids = resolve_classes(config.classes, self.names)
        self._no_spin_session: Any = None  # the session no_spin_session put in Ultralytics' backend

    @property
    def spinning_off(self) -> bool:
        """True once the ONNX Runtime session runs with spinning off (``ort_spinning=False``, after a call)."""
        return self._no_spin_session is not None

    @classmethod
    def load(cls, config: DetectorConfig) -> "Detector":
        check_detector_path(config.model)
        if config.prefer_exported:
            config = replace(config, model=prefer_exported(config.model, config.device or _default_device()))
        from ultralytics import YOLO

        try:
            model = YOLO(config.model, task="detect")
        except Exception as exc:  # Ultralytics raises many types for a bad file or a failed download
            first = str(exc).strip().splitlines()[0].strip("❌ ") if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"cannot load detector '{config.model}': expected an Ultralytics YOLO model "
                f"({', '.join(DETECTOR_SUFFIXES)}) ({first})"
            ) from None
        if getattr(model, "task", "detect") != "detect":
            raise ModelLoadError(f"detector '{config.model}' is a '{model.task}' model; expected a detection model")
        return cls(model, config)

    def detect(self, frame: np.ndarray) -> tuple[Detections, dict[str, float]]:
        """Detections for one BGR frame and Ultralytics' stage timings in ms."""
        c = self.config
        kwargs = dict(
            conf=c.conf, iou=c.iou, imgsz=c.imgsz, classes=self.class_ids, device=c.device,
            max_det=c.max_det, agnostic_nms=c.agnostic_nms, verbose=False,
        )
        if c.half:  # only when asked: Ultralytics warns about the option even when it is False
            kwargs["half"] = True
        if c.track:
            results = self.model.track(frame, persist=True, tracker=c.tracker, **kwargs)
        else:
            results = self.model.predict(frame, **kwargs)
        if not c.ort_spinning and c.model.endswith(".onnx"):
            self._no_spin_session = no_spin_session(self.model, c.model, self._no_spin_session)
        result = results[0]
        speed = result.speed or {}
        timings = {
            "detect_pre": float(speed.get("preprocess") or 0.0),
            "detect_infer": float(speed.get("inference") or 0.0),
            "detect_post": float(speed.get("postprocess") or 0.0),
        }
        return Detections.from_ultralytics(result), timings


def prefer_exported(model_path: str, device: str) -> str:
    """The file to load for ``model_path``: for ``foo.pt``, an exported ``foo.onnx`` on CPU or ``foo.engine`` on CUDA
    when it sits next to it and is not older than the .pt (an older one is stale); otherwise ``model_path``.

    ``device`` is spelled as Ultralytics takes it (cpu, cuda, cuda:0, 0, 0,1). Exports run at the
    image size they were exported with.
    """
    path = Path(model_path)
    kind = device.strip().lower()
    if path.suffix != ".pt" or not path.is_file():
        return model_path
    if kind.startswith("cpu"):
        exported = path.with_suffix(".onnx")
    elif kind.startswith("cuda") or kind.replace(",", "").isdigit():
        exported = path.with_suffix(".engine")
    else:
        return model_path  # mps and others: no exported format preferred
    if not exported.is_file():
        return model_path
    if exported.stat().st_mtime < path.stat().st_mtime:
        log.info("detector: %s is older than %s; loading the .pt (export it again to use it)", exported.name, path.name)
        return model_path
    log.info("detector: loading %s, exported from %s, for device %s", exported, path.name, device)
    return str(exported)


def no_spin_session(model: Any, onnx_path: str, current: Any = None) -> Any:
    """Reopen the ONNX Runtime session of a loaded Ultralytics ``model`` with spinning off; returns that session.

    ONNX Runtime's intra-op threads busy-wait for a while after each run by default. On a 2-core CPU, with the
    VLM decoding in another thread and the detector on every frame, those threads took the VLM's cores:
    SmolVLM-256M int8 decoded 42-49 tok/s next to the 320-px demo detector at 15 fps and 78-80 without
    spinning (105 alone); next to YOLO26n at 640 px 36-37 against 47 (benchmarks/README.md, stream).
    Ultralytics opens the session itself with default options (``AutoBackend`` takes none), and creates
    its predictor at the first ``predict``/``track``, so this runs after a call and reopens the session
    whenever the predictor holds one it did not get from here (``current``). Only CPU-provider sessions:
    a CUDA/TensorRT session's threads wait on the GPU, not on these cores. Where Ultralytics keeps no such
    session (a .pt model, another version's layout), nothing changes and ``current`` comes back.
    """
    backend = getattr(getattr(getattr(model, "predictor", None), "model", None), "backend", None)
    session = getattr(backend, "session", None)
    if session is None or session is current or not hasattr(session, "get_providers"):
        return current
    if session.get_providers() != ["CPUExecutionProvider"]:
        return current
    import onnxruntime as ort

    old = session.get_session_options()
    options = ort.SessionOptions()
    options.intra_op_num_threads = old.intra_op_num_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    backend.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    return backend.session


def _default_device() -> str:
    """The device Ultralytics picks when none is given: the first GPU if there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_classes(classes: tuple[str, ...] | None, names: dict[int, str]) -> list[int] | None:
    """Map class names (or ids as strings) to the model's ids; unknown names are a user error."""
    if not classes:
        return None
    by_name = {v.lower(): k for k, v in names.items()}
    ids = []
    for item in classes:
        key = item.strip().lower()
        if key.isdigit() and int(key) in names:
            ids.append(int(key))
        elif key in by_name:
            ids.append(by_name[key])
        else:
            shown = ", ".join(list(names.values())[:12]) + (", ..." if len(names) > 12 else "")
            raise EdgeVitError(f"unknown class '{item}' for this detector; it knows: {shown}")
    return sorted(set(ids))
