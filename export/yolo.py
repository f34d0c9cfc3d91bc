"""YOLO detector export through Ultralytics: ONNX (CPU, ONNX Runtime) or a TensorRT engine (CUDA), NMS-free.

``export_yolo(model, options)`` delegates to ``YOLO(model).export(...)`` and only chooses the
options, checks what a user can fix first, and moves the file where it was asked for (by default
next to the ``.pt``, where ``edge_vit.detector.prefer_exported`` finds it):

- ``nms=False`` keeps YOLO26's end-to-end one-to-one head: output ``(1, 300, 6)`` (x1, y1, x2,
  y2, score, class), no NMS afterwards. Ultralytics' default ``nms=None`` would export the raw
  ``(1, 84, 8400)`` head that still needs NMS. Models without an end-to-end head (YOLO11 and
  older) export their raw head either way, and Ultralytics runs NMS on it.
- Offline: nothing may be pip-installed during an export, so ``simplify`` (onnxslim) is used only
  when onnxslim is already installed, ``--int8`` needs a local ``--data`` dataset for calibration
  (Ultralytics would otherwise download coco8), and a TensorRT export checks for TensorRT and a
  GPU before Ultralytics would try to install anything.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from edge_vit.errors import EdgeVitError, ModelLoadError


class YoloFormat(str, Enum):
    ONNX = "onnx"
    ENGINE = "engine"

    @property
    def suffix(self) -> str:
        return f".{self.value}"


@dataclass(frozen=True)
class YoloExportOptions:
    format: YoloFormat = YoloFormat.ONNX
    imgsz: int = 640
    half: bool = False
    int8: bool = False
    data: str | None = None  # dataset YAML for INT8 calibration (local images)
    device: str | None = None  # engine: the CUDA device ("0"); onnx: where Ultralytics traces (default cpu)
    workspace_gb: float | None = None  # engine only
    # True: the NMS-free one-to-one head, output (1, 300, 6). False: the one-to-many head, which needs NMS
    # after it (Ultralytics' predictor runs it); more accurate when the one-to-one head is under-trained.
    end2end: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", YoloFormat(self.format))
        if self.imgsz < 32 or self.imgsz % 32:
            raise EdgeVitError(f"--imgsz must be a multiple of 32 and >= 32, got {self.imgsz}")
        if self.half and self.int8:
            raise EdgeVitError("choose one of --half and --int8")
        if self.int8 and not self.data:
            raise EdgeVitError("--int8 needs --data DATA.yaml with local images to calibrate on")


@dataclass(frozen=True)
class YoloExportResult:
    path: Path
    output_shape: tuple | None  # ONNX: the graph's first output, e.g. (1, 300, 6); engine: None
    end2end: bool | None  # NMS-free end-to-end output (from the ONNX metadata)
    seconds: float


def default_output(model: str | Path, fmt: YoloFormat) -> Path:
    """Next to the .pt, with the format's suffix: where the detector looks for an export."""
    return Path(model).with_suffix(fmt.suffix)


def check_yolo_export(model: str, options: YoloExportOptions, out: str | Path | None = None) -> Path:
    """Cheap checks before Ultralytics loads; returns the output path."""
    path = Path(model)
    if path.suffix != ".pt" or not path.is_file():
        raise ModelLoadError(f"--model must be a trained YOLO .pt file on disk, got '{model}'")
    if options.data and not Path(options.data).is_file():
        raise EdgeVitError(f"--data '{options.data}' not found (a dataset YAML with local images)")
    target = Path(out) if out else default_output(path, options.format)
    if target.suffix != options.format.suffix:
        raise EdgeVitError(
            f"--out must end in {options.format.suffix} for --format {options.format.value}, got '{target}'"
        )
    if target.is_dir():
        raise EdgeVitError(f"--out '{target}' is a folder; give a file path")
    if options.format is YoloFormat.ENGINE:
        from export.trt import cuda_capability, import_tensorrt

        import_tensorrt()
        cuda_capability()
        if options.device is not None and options.device.strip().lower().startswith("cpu"):
            raise EdgeVitError("a TensorRT engine is built on a GPU: drop --device cpu")
    return target


def precision_kwargs(half: bool, int8: bool, has_quantize: bool) -> dict:
    """Ultralytics' precision arguments: ``quantize`` (8.4+, which deprecates half/int8) or the older flags."""
    if has_quantize:
        return {"quantize": 8 if int8 else 16 if half else None}
    return {"half": half, "int8": int8}


def export_kwargs(options: YoloExportOptions, *, simplify: bool, has_quantize: bool) -> dict:
    """The arguments for ``YOLO.export``: NMS-free end-to-end output, static batch-1 shapes, nothing downloaded."""
    # Ultralytics 8.4: nms=False keeps the end-to-end head; nms=None exports the raw one-to-many head.
    kwargs = dict(format=options.format.value, imgsz=options.imgsz, nms=False if options.end2end else None,
                  simplify=simplify, dynamic=False,
                  batch=1, verbose=False, **precision_kwargs(options.half, options.int8, has_quantize))
    if options.int8:
        kwargs["data"] = options.data
    if options.format is YoloFormat.ENGINE:
        kwargs["device"] = options.device or "0"
        if options.workspace_gb:
            kwargs["workspace"] = options.workspace_gb
    elif options.device:
        kwargs["device"] = options.device
    return kwargs


def onnx_output(path: Path) -> tuple[tuple | None, bool | None]:
    """(first output shape, end2end flag from Ultralytics' metadata) of an exported ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    meta = {p.key: p.value for p in model.metadata_props}
    end2end = meta.get("end2end")
    return shape, (end2end == "True") if end2end is not None else None


def export_yolo(model: str, options: YoloExportOptions = YoloExportOptions(), out: str | Path | None = None
                ) -> YoloExportResult:
    """Export ``model`` (.pt) with Ultralytics; the file lands at ``out`` (default: next to the .pt)."""
    target = check_yolo_export(model, options, out)
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT

    kwargs = export_kwargs(options, simplify=importlib.util.find_spec("onnxslim") is not None,
                           has_quantize="quantize" in DEFAULT_CFG_DICT)
    t0 = time.perf_counter()
    try:
        written = YOLO(model, task="detect").export(**kwargs)
    except Exception as exc:  # Ultralytics raises many types (AssertionError for bad options, RuntimeError, ...)
        first = str(exc).strip().splitlines()[0].strip("❌ ") if str(exc).strip() else type(exc).__name__
        raise EdgeVitError(f"YOLO export to {options.format.value} failed: {first}") from None
    seconds = time.perf_counter() - t0
    written = Path(written)
    target.parent.mkdir(parents=True, exist_ok=True)
    if written.resolve() != target.resolve():
        shutil.move(str(written), str(target))
    shape, end2end = onnx_output(target) if options.format is YoloFormat.ONNX else (None, None)
    return YoloExportResult(path=target, output_shape=shape, end2end=end2end, seconds=seconds)
