"""Scenario files: what one ``edge-vit bench`` run measures, as typed, validated dataclasses loaded from YAML.

A scenario names the models (real architectures with random weights, tiny local
models, or your own checkpoints), the VLM backends and precisions, tiling,
prompts with and without grounding, the number of new tokens (min = max, so runs
compare), iteration counts, the baselines, the stream run and the roofline
measurement. ``load_scenario(path)`` checks every key and value; an unknown key
or a bad value is a ``ScenarioError`` (one line, exit code 2 from the CLI).

The dataclasses are the schema: field names are the YAML keys, field types are
checked on load (ints, floats, bools, strings, enums, nested sections, lists).
This module knows nothing about models or timing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class ScenarioError(EdgeVitError):
    """A scenario file that cannot be used: unknown key, wrong type, impossible combination."""


class VlmBackend(str, Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TRT = "trt"


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


# What each backend can run; anything else is refused on load.
BACKEND_PRECISIONS = {
    VlmBackend.TORCH: (Precision.FP32, Precision.BF16, Precision.FP16),
    VlmBackend.ONNX: (Precision.FP32, Precision.INT8, Precision.INT4),
    VlmBackend.TRT: (Precision.FP16,),
}
TORCH_DTYPES = {Precision.FP32: "float32", Precision.BF16: "bfloat16", Precision.FP16: "float16"}


class DetectorBackend(str, Enum):
    TORCH = "torch"  # the .pt through Ultralytics/PyTorch
    ONNX = "onnx"  # exported with `edge-vit export yolo` (NMS-free end-to-end where the head has it)
    ENGINE = "engine"  # TensorRT engine through Ultralytics (CUDA only)


class Tiling(str, Enum):
    SINGLE = "single"
    SPLIT = "split"


class TinyVlm(str, Enum):
    IDEFICS3 = "idefics3"
    LLAVA = "llava"


# ------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class VlmModel:
    """Exactly one of: ``reference`` (a real architecture from export/configs, random weights), ``tiny``
    (a tiny model built by edge_vit.tiny), ``path`` (your checkpoint folder or a cached hub id)."""

    reference: str | None = None
    tiny: TinyVlm | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("reference", "tiny", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of reference, tiny, path (got {', '.join(given) or 'none'})")
        if self.reference is not None:
            from export.reference_models import REFERENCE_MODELS

            if self.reference not in REFERENCE_MODELS:
                raise ValueError(f"unknown reference '{self.reference}'; expected one of {', '.join(REFERENCE_MODELS)}")

    @property
    def random_weights(self) -> bool:
        return self.path is None


@dataclass(frozen=True)
class VlmSpec:
    name: str
    model: VlmModel


@dataclass(frozen=True)
class DetectorModel:
    """Exactly one of: ``arch`` (an Ultralytics model YAML such as yolo26n.yaml: random weights, built offline)
    or ``path`` (your trained .pt)."""

    arch: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("arch", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of arch, path (got {', '.join(given) or 'none'})")
        if self.arch is not None and not self.arch.endswith((".yaml", ".yml")):
            raise ValueError(f"arch must be an Ultralytics model YAML such as yolo26n.yaml, got '{self.arch}'")
        if self.path is not None and not self.path.endswith(".pt"):
            raise ValueError(f"path must be a trained YOLO .pt file, got '{self.path}'")


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    model: DetectorModel
    imgsz: int = 640
    backends: tuple[DetectorBackend, ...] = (DetectorBackend.TORCH, DetectorBackend.ONNX)
    conf: float = 0.25

    def __post_init__(self) -> None:
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 and >= 32, got {self.imgsz}")
        if not self.backends:
            raise ValueError("backends must not be empty")


@dataclass(frozen=True)
class BackendSpec:
    backend: VlmBackend
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        allowed = BACKEND_PRECISIONS[self.backend]
        if self.precision not in allowed:
            raise ValueError(f"backend {self.backend.value} runs {', '.join(p.value for p in allowed)}; "
                             f"got precision {self.precision.value}")

    @property
    def label(self) -> str:
        return f"{self.backend.value}-{self.precision.value}"


@dataclass(frozen=True)
class PromptSpec:
    """One prompt variant. ``grounding`` puts detections in front of the instruction; ``objects`` = N grounds a
    fixed synthetic scene of N objects (random-weight detectors find nothing), null grounds what the pipeline
    detector really found."""

    name: str
    instruction: str = "Describe what you see in one sentence."
    grounding: bool = True
    objects: int | None = 8
    grounding_tokens: int = 96

    def __post_init__(self) -> None:
        if self.objects is not None and self.objects < 0:
            raise ValueError(f"objects must be >= 0 or null, got {self.objects}")
        if self.grounding_tokens < 8:
            raise ValueError(f"grounding_tokens must be >= 8, got {self.grounding_tokens}")


@dataclass(frozen=True)
class ClipSpec:
    """The clip every stage reads: a generated clip of moving shapes (width x height at fps for seconds), or
    ``path`` to your own video (then width/height/fps/seconds are the file's own)."""

    width: int = 512
    height: int = 512
    fps: float = 15.0
    seconds: float = 4.0
    path: str | None = None

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(f"width and height must be >= 16, got {self.width}x{self.height}")
        if self.fps <= 0 or self.seconds <= 0:
            raise ValueError("fps and seconds must be > 0")


@dataclass(frozen=True)
class Iterations:
    """Measured iterations per case (warm-up runs come first and are not counted)."""

    warmup: int = 1
    source: int = 60
    detector: int = 50
    grounding: int = 200
    vlm: int = 8
    baseline_vlm: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value < (0 if f.name == "warmup" else 1):
                raise ValueError(f"{f.name} must be >= {0 if f.name == 'warmup' else 1}, got {value}")


@dataclass(frozen=True)
class PipelineSpec:
    """The detector (and its backend) that runs in front of the VLM in every answer-latency measurement."""

    detector: str
    backend: DetectorBackend = DetectorBackend.ONNX


@dataclass(frozen=True)
class Baselines:
    """The path a user takes without edge-vit: transformers ``generate`` (eager PyTorch, fp32, the model's DEFAULT
    processor settings, so SmolVLM splits images) and ``YOLO(...).predict`` in PyTorch."""

    vlm: bool = True
    detector: bool = True


@dataclass(frozen=True)
class StreamSpec:
    """The scenario's clip played at its native fps through the full pipeline (StreamRunner), the VLM answering
    continuously (a new answer starts on the latest frame as soon as the last one ends)."""

    vlm: str
    backend: BackendSpec
    detector: str
    detector_backend: DetectorBackend = DetectorBackend.ONNX
    prompt: str = "grounded"
    new_tokens: int = 16
    tiling: Tiling = Tiling.SINGLE

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {self.new_tokens}")


@dataclass(frozen=True)
class RooflineSpec:
    """Memory bandwidth measurement: copies of a ``megabytes`` array, best of ``repeats``."""

    megabytes: int = 1024
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.megabytes < 16 or self.repeats < 1:
            raise ValueError("megabytes must be >= 16 and repeats >= 1")


@dataclass(frozen=True)
class Scenario:
    description: str
    vlms: tuple[VlmSpec, ...]
    backends: tuple[BackendSpec, ...]
    prompts: tuple[PromptSpec, ...]
    detectors: tuple[DetectorSpec, ...]
    pipeline: PipelineSpec
    new_tokens: int = 32
    tiling: tuple[Tiling, ...] = (Tiling.SINGLE,)
    device: str = "cpu"
    threads: int | None = None
    clip: ClipSpec = field(default_factory=ClipSpec)
    iterations: Iterations = field(default_factory=Iterations)
    baselines: Baselines = field(default_factory=Baselines)
    stream: StreamSpec | None = None
    roofline: RooflineSpec = field(default_factory=RooflineSpec)

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {self.new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        kind, _, index = self.device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got '{self.device}'")
        for label, items in (("vlms", self.vlms), ("detectors", self.detectors), ("prompts", self.prompts)):
            names = [i.name for i in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{label}: names must be unique, got {names}")
        if not self.vlms or not self.backends or not self.prompts or not self.detectors or not self.tiling:
            raise ValueError("vlms, backends, prompts, detectors and tiling must not be empty")
        detectors = {d.name: d for d in self.detectors}
        for where, name, backend in (("pipeline", self.pipeline.detector, self.pipeline.backend),) + (
                (("stream", self.stream.detector, self.stream.detector_backend),) if self.stream else ()):
            if name not in detectors:
                raise ValueError(f"{where}.detector '{name}' is not one of the detectors: {', '.join(detectors)}")
            if backend not in detectors[name].backends:
                raise ValueError(f"{where}: detector '{name}' is not measured with backend {backend.value}")
        if self.stream is not None:
            if self.stream.vlm not in {v.name for v in self.vlms}:
                raise ValueError(f"stream.vlm '{self.stream.vlm}' is not one of the vlms")
            if self.stream.prompt not in {p.name for p in self.prompts}:
                raise ValueError(f"stream.prompt '{self.stream.prompt}' is not one of the prompts")

    def prompt(self, name: str) -> PromptSpec:
        return next(p for p in self.prompts if p.name == name)

    def detector(self, name: str) -> DetectorSpec:
        return next(d for d in self.detectors if d.name == name)

    def vlm(self, name: str) -> VlmSpec:
        return next(v for v in self.vlms if v.name == name)


# ------------------------------------------------------------------------------------------ loading


def scenario_path(name_or_path: str) -> Path:
    """A shipped scenario by name (``full``, ``quick``, ...) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"scenario file not found: {name_or_path}")
        return path
    shipped = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ScenarioError(f"unknown scenario '{name_or_path}'; shipped: {', '.join(shipped_scenarios())} "
                            f"(or give a path to a .yaml file)")
    return shipped


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> tuple[Scenario, Path]:
    """Read and validate a scenario; returns it and its path. Raises ScenarioError with a one-line message."""
    import yaml

    path = scenario_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ScenarioError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return parse_scenario(raw, str(path)), path


def parse_scenario(raw: Any, source: str = "scenario") -> Scenario:
    return _build(Scenario, raw, source, "")


def to_dict(value: Any) -> Any:
    """The scenario as plain JSON-able data (enums as their values)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    return value


def _build(cls: type, raw: Any, source: str, where: str) -> Any:
    label = where or "top level"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: {label} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ScenarioError(f"{source}: unknown key '{_join(where, str(unknown[0]))}' "
                            f"(allowed in {label}: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ScenarioError(f"{source}: missing key '{_join(where, missing[0])}'")
    values = {name: _convert(hints[name], value, source, _join(where, name)) for name, value in raw.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{source}: {label}: {exc}") from None


def _convert(tp: Any, value: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ScenarioError(f"{source}: '{where}' must not be null")
        return _convert(args[0], value, source, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ScenarioError(f"{source}: '{where}' must be a list, got {type(value).__name__}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ScenarioError(f"{source}: '{where}' must be one of {', '.join(str(m.value) for m in tp)}, "
                                f"got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{source}: '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{source}: '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{source}: '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    raise TypeError(f"scenario schema: unsupported type {tp!r} at {where}")  # a bug in the schema, not the file


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
