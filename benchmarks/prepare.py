"""What a scenario runs on, built once into a work folder: model folders, ONNX exports (fp32, int8, int4),
TensorRT engines, YOLO checkpoints and exports, and the clip.

Every artifact is made by the product's own offline steps (``build_reference_model``, ``edge_vit.tiny``,
``export_vlm_onnx``, ``export.optimize``, ``build_trt_engines``, ``export_yolo``) and marked complete with a
small key file; a later run reuses it while the key (the spec and the source of the step that made it)
matches. A step that cannot run on this machine raises ``Skip`` with the reason (no CUDA, no TensorRT, no
quantizer in this build); the case is then reported as skipped, not failed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

from benchmarks.scenario import ClipSpec, DetectorBackend, DetectorSpec, Precision, VlmSpec

DEFAULT_WORK_DIR = Path.home() / ".cache" / "edge-vit" / "bench"
_MARKER = ".edge-vit-bench.json"
_ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """This case cannot run on this machine or build; the message says why."""


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.is_file() else str(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _spec(value) -> object:
    return asdict(value) if is_dataclass(value) else value


class Workspace:
    """Artifacts under ``root``; ``log`` gets one line per build step."""

    def __init__(self, root: Path, device: str = "cpu", log: Callable[[str], None] = lambda _: None) -> None:
        self.root = Path(root)
        self.device = device
        self.log = log
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- bookkeeping

    def _done(self, folder: Path, key: str) -> bool:
        marker = folder / _MARKER
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("key") == key
        except (OSError, ValueError):
            return False

    def _build(self, folder: Path, key: str, what: str, build: Callable[[Path], None]) -> Path:
        """Run ``build(tmp)`` into a fresh temporary folder and move it to ``folder``, unless it is already there."""
        if self._done(folder, key):
            return folder
        self.log(f"building {what} -> {folder}")
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"key": key, "what": what}) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder

    # ---------------------------------------------------------------------------------- VLMs

    def vlm_key(self, spec: VlmSpec) -> str:
        m = spec.model
        if m.reference is not None:
            from export.reference_models import config_paths

            return _sha("reference", m.reference, *config_paths(m.reference), _ROOT / "export" / "reference_models.py")
        if m.tiny is not None:
            return _sha("tiny", m.tiny.value, _ROOT / "edge_vit" / "tiny.py")
        path = Path(m.path)
        config = path / "config.json"
        return _sha("path", str(path.resolve()) if path.exists() else m.path,
                    config.stat().st_mtime if config.is_file() else None)

    def vlm_folder(self, spec: VlmSpec) -> str:
        """The transformers folder (or cached hub id) of a VLM spec, built first when it is a reference or tiny model."""
        m = spec.model
        if m.path is not None:
            return m.path
        folder = self.root / "vlm" / (m.reference or f"tiny-{m.tiny.value}")
        if m.reference is not None:
            from export.reference_models import build_reference_model

            def build(tmp: Path) -> None:
                build_reference_model(m.reference, tmp)
        else:
            from edge_vit import tiny

            builder = {"idefics3": tiny.build_tiny_idefics3, "llava": tiny.build_tiny_llava}[m.tiny.value]

            def build(tmp: Path) -> None:
                builder(tmp)
        return str(self._build(folder, self.vlm_key(spec), f"VLM {spec.name}", build))

    def onnx_folder(self, spec: VlmSpec, precision: Precision) -> Path:
        """The ``edge-vit export onnx`` folder of a VLM at fp32, or its int8/int4 version through export.optimize."""
        base_key = _sha(self.vlm_key(spec), _ROOT / "export" / "onnx_export.py", _ROOT / "export" / "onnx_configs.py")
        base = self.root / "onnx" / f"{spec.name}-{base_key[:8]}" / "fp32"
        source = self.vlm_folder(spec)

        def export(tmp: Path) -> None:
            from export.onnx_export import export_vlm_onnx

            export_vlm_onnx(source, tmp)

        self._build(base, base_key, f"ONNX export of {spec.name}", export)
        if precision is Precision.FP32:
            return base
        optimize = _optimize_module()
        key = _sha(base_key, precision.value, _variant_options(precision), _ROOT / "export" / "optimize.py")
        out = base.parent / precision.value

        def quantize(tmp: Path) -> None:
            run_optimize(optimize, base, tmp, precision)

        return self._build(out, key, f"{precision.value} ONNX of {spec.name}", quantize)

    def trt_folder(self, spec: VlmSpec) -> Path:
        """fp16 TensorRT engines of a VLM (CUDA and TensorRT only)."""
        check_trt(self.device)
        onnx_dir = self.onnx_folder(spec, Precision.FP32)
        key = _sha(onnx_dir.parent.name, "trt-fp16", _ROOT / "export" / "trt.py", _ROOT / "export" / "trt_profiles.py")
        out = onnx_dir.parent / "trt-fp16"

        def build(tmp: Path) -> None:
            from export.trt import TrtBuildOptions, build_trt_engines

            build_trt_engines(onnx_dir, tmp, TrtBuildOptions(fp16=True))

        return self._build(out, key, f"TensorRT fp16 engines of {spec.name}", build)

    # ---------------------------------------------------------------------------------- detectors

    def detector_pt(self, spec: DetectorSpec) -> Path:
        if spec.model.path is not None:
            path = Path(spec.model.path)
            if not path.is_file():
                from edge_vit.errors import ModelLoadError

                raise ModelLoadError(f"detector '{spec.name}': {path} not found")
            return path
        arch = spec.model.arch
        stem = Path(arch).stem
        folder = self.root / "detectors" / stem

        def build(tmp: Path) -> None:
            from ultralytics import YOLO

            YOLO(arch).save(str(tmp / f"{stem}.pt"))

        self._build(folder, _sha("arch", arch), f"detector {stem} (random weights)", build)
        return folder / f"{stem}.pt"

    def detector_file(self, spec: DetectorSpec, backend: DetectorBackend) -> Path:
        """The file Ultralytics loads for this backend: the .pt, or an export of it at the spec's image size."""
        pt = self.detector_pt(spec)
        if backend is DetectorBackend.TORCH:
            return pt
        from edge_vit.errors import EdgeVitError

        if backend is DetectorBackend.ENGINE:
            check_trt(self.device)
        fmt = "onnx" if backend is DetectorBackend.ONNX else "engine"
        folder = self.root / "detectors" / f"{pt.stem}-{_sha(str(pt.resolve()), pt.stat().st_mtime)[:8]}-{fmt}-{spec.imgsz}"

        def export(tmp: Path) -> None:
            from export.yolo import YoloExportOptions, export_yolo

            options = YoloExportOptions(format=fmt, imgsz=spec.imgsz, half=fmt == "engine")
            try:
                export_yolo(str(pt), options, tmp / f"{pt.stem}.{fmt}")
            except EdgeVitError as exc:
                raise Skip(str(exc)) from None

        self._build(folder, _sha(str(pt.resolve()), pt.stat().st_mtime, fmt, spec.imgsz,
                                 _ROOT / "export" / "yolo.py"), f"{fmt} export of {spec.name}", export)
        return folder / f"{pt.stem}.{fmt}"

    # ---------------------------------------------------------------------------------- clip

    def clip(self, spec: ClipSpec) -> Path:
        """The scenario's video: the user's file, or a generated clip of moving shapes."""
        if spec.path is not None:
            from edge_vit.errors import SourceError

            if not Path(spec.path).is_file():
                raise SourceError(f"clip not found: {spec.path}")
            return Path(spec.path)
        frames = max(1, round(spec.fps * spec.seconds))
        folder = self.root / "clips" / f"shapes-{spec.width}x{spec.height}-{spec.fps:g}fps-{frames}"

        def build(tmp: Path) -> None:
            from edge_vit.tiny import write_clip

            write_clip(tmp / "clip.mp4", n_frames=frames, fps=spec.fps, width=spec.width, height=spec.height)

        self._build(folder, _sha(_spec(spec), _ROOT / "edge_vit" / "tiny.py"), "clip", build)
        return folder / "clip.mp4"


# -------------------------------------------------------------------------------------- quantization, TensorRT


def _optimize_module():
    try:
        return importlib.import_module("export.optimize")
    except ModuleNotFoundError as exc:
        if exc.name in ("export.optimize",):
            raise Skip("needs export optimize: export/optimize.py (fusion + int8/int4 quantization of an export "
                       "folder) is not in this build") from None
        raise


def run_optimize(optimize, src: Path, out: Path, precision: Precision) -> None:
    """Quantize the fp32 export ``src`` into ``out`` with ``export.optimize.optimize_onnx_folder``, as the variant
    of that name in ``benchmarks.onnx_speed.VARIANTS`` (fused; decoder weights quantized), so both benchmarks
    measure the same folders. Validation against fp32 is export.optimize's own job (and its tests'); it is off
    here, as in onnx_speed."""
    entry, options_cls = getattr(optimize, "optimize_onnx_folder", None), getattr(optimize, "OptimizeOptions", None)
    if entry is None or options_cls is None:
        raise Skip("needs export optimize: export/optimize.py has no optimize_onnx_folder / OptimizeOptions")
    entry(src, out, options_cls(**{"validate": False, **_variant_options(precision)}))


def _variant_options(precision: Precision) -> dict:
    """OptimizeOptions keywords of ``precision``'s variant in ``benchmarks.onnx_speed.VARIANTS`` (part of the
    cache key: a changed variant rebuilds its folder)."""
    try:
        from benchmarks.onnx_speed import VARIANTS
    except ImportError:
        VARIANTS = {}
    return dict(VARIANTS.get(precision.value) or {"quantize": precision.value})


def check_trt(device: str) -> None:
    """Raise Skip unless TensorRT can run here: a CUDA device in the scenario, a GPU, and the tensorrt package."""
    if not device.startswith("cuda"):
        raise Skip(f"TensorRT runs on a CUDA GPU; this scenario's device is '{device}'")
    import torch

    if not torch.cuda.is_available():
        raise Skip("TensorRT needs a CUDA GPU; torch sees none on this machine")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise Skip("TensorRT is not installed (pip install -e '.[trt]'; on a Jetson it comes with JetPack)") from None
