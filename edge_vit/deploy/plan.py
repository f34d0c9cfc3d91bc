"""A Jetson deployment as a plan (checks, memory budget, build-or-reuse decisions, files) and its execution.

``plan_deploy(options, target)`` reads the ONNX export and decides everything without building or
writing: milliseconds, and the same on any machine, which is what ``--dry-run`` prints.
``execute(plan, builders)`` then builds what the plan says (``export.trt.build_trt_engines`` for
the VLM, ``export.yolo.export_yolo`` for the detector; both injectable) and writes the files,
the deployment record (``edge_vit_deploy.json``) last.

Engines are reused only when the folder's ``edge_vit_trt.json`` says they were built by this
TensorRT release for this GPU (compute capability), with these precision flags and limits, from
this very ONNX export; the detector engine when the record names the same .pt (sha256), TensorRT,
GPU, input size and precision. Anything else is rebuilt: engines are not portable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from edge_vit.cli import DEFAULT_DETECTOR, DEFAULT_PROMPT
from edge_vit.deploy import service
from edge_vit.deploy.budget import Budget, BudgetOptions, DetectorFootprint, VisionShape, memory_budget
from edge_vit.deploy.target import Check, Status, Target, same_tensorrt, target_checks
from edge_vit.errors import EdgeVitError, ModelLoadError
from export.trt import TrtBuildOptions, read_onnx_export
from export.trt_profiles import (
    ENGINE_FILES,
    TRT_MANIFEST,
    TRT_MANIFEST_VERSION,
    EngineLimits,
    max_tiles_for_processor,
    plan_from_manifest,
)
from export.yolo import YoloExportOptions, YoloFormat

DEPLOY_RECORD = "edge_vit_deploy.json"
DEPLOY_RECORD_VERSION = 1
ENGINES_DIR = "vlm-trt"
DEFAULT_IMAGE = "edge-vit:jetson"


@dataclass(frozen=True)
class DeployOptions:
    model_dir: Path  # an `edge-vit export onnx` folder
    out: Path  # engines, run.json, the unit or docker script, the record
    user: str  # the account the systemd unit runs as
    detector: str = DEFAULT_DETECTOR  # `edge-vit run`'s default: where Ultralytics downloads it (the working dir)
    source: str = "/dev/video0"
    prompt: str = DEFAULT_PROMPT
    service_name: str = "edge-vit"
    container: bool = False
    image: str = DEFAULT_IMAGE
    fp16: bool = True
    tiling: str = "single"  # single: the engines take one tile; split: the processor's most tiles
    max_prompt: int | None = None
    max_context: int | None = None
    workspace_gb: float | None = None
    imgsz: int = 640
    run_extra: tuple[str, ...] = ()  # more `edge-vit run` flags, after `--`
    executable: tuple[str, ...] = ()  # how the unit starts edge-vit; () = default_executable()


class Action(str, Enum):
    BUILD = "build"
    REUSE = "reuse"
    USE = "use"  # a file given ready-made (a detector .engine or .onnx)


@dataclass(frozen=True)
class EngineStep:
    what: str
    action: Action
    path: Path  # where the engine(s) will be
    source: Path
    reason: str
    options: Any = None  # TrtBuildOptions / YoloExportOptions for a build

    def line(self, dry_run: bool) -> str:
        verb = f"would {self.action.value}" if dry_run else f"{self.action.value}s"
        source = f" from {self.source}" if self.action is Action.BUILD else ""
        return f"  {self.what}: {verb} {self.path}{source} ({self.reason})"


@dataclass(frozen=True)
class PlannedFile:
    path: Path
    content: str
    mode: int = 0o644


@dataclass(frozen=True)
class DeployPlan:
    options: DeployOptions
    target: Target
    checks: tuple[Check, ...]
    budget: Budget
    vlm: EngineStep
    detector: EngineStep
    files: tuple[PlannedFile, ...]  # the deployment record last
    next_steps: tuple[str, ...]

    @property
    def problems(self) -> list[str]:
        """What stops a real run, one line each: failed checks, then a budget that does not fit."""
        out = [f"target check failed: {c.detail}" if c.name == "Jetson" else f"{c.name}: {c.detail}"
               for c in self.checks if c.status is Status.FAIL]
        if self.budget.fits is False:
            out.append(self.budget.refusal())
        return out

    def verdict(self) -> str:
        if not self.problems:
            return "verdict: a real run would build what is marked above, write the files and exit 0"
        return "verdict: a real run would stop (exit 2): " + "; ".join(self.problems)

    def lines(self, dry_run: bool) -> list[str]:
        out = ["target checks:", *(c.line() for c in self.checks)]
        out += [f"target check failed: {c.detail}" for c in self.checks if c.name == "Jetson"
                and c.status is Status.FAIL]
        out += self.budget.table()
        out += ["engines:", self.vlm.line(dry_run), self.detector.line(dry_run)]
        if dry_run:
            out.append("files (nothing is written in a dry run):")
            for f in self.files:
                out += [f"--- {f.path} ---", *f.content.rstrip("\n").split("\n")]
        return out


@dataclass(frozen=True)
class Builders:
    """What builds engines; tests pass stand-ins.

    vlm(onnx_dir, out_dir, TrtBuildOptions) and detector(pt_path, YoloExportOptions, engine_path).
    """

    vlm: Callable[[Path, Path, TrtBuildOptions], Any]
    detector: Callable[[str, YoloExportOptions, Path], Any]

    @classmethod
    def real(cls) -> "Builders":
        def vlm(onnx_dir, out_dir, options):
            from export.trt import build_trt_engines

            return build_trt_engines(onnx_dir, out_dir, options)

        def detector(model, options, out):
            from export.yolo import export_yolo

            return export_yolo(model, options, out)

        return cls(vlm=vlm, detector=detector)


def default_executable() -> tuple[str, ...]:
    """The ``edge-vit`` script of this environment (a venv's bin/), else this Python with ``-m edge_vit``."""
    script = Path(sys.executable).parent / "edge-vit"
    return (str(script),) if script.is_file() else (sys.executable, "-m", "edge_vit")


def validate_run_args(args: tuple[str, ...]) -> None:
    """Parse the service's arguments with the real ``edge-vit`` parser: a bad flag fails here, not at boot."""
    from edge_vit.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(list(args))
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["invalid arguments"])[-1].split("error: ", 1)[-1]
        raise EdgeVitError(f"the service's `edge-vit {' '.join(args[:1])}` arguments are invalid: {last}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- engines: build or reuse


def engines_mismatch(trt_manifest: dict, *, target: Target, options: TrtBuildOptions, limits: EngineLimits,
                     onnx_manifest: dict) -> str | None:
    """Why an existing engine folder cannot be reused here; None when it can."""
    if target.tensorrt is None or target.compute_capability is None:
        return "this machine's TensorRT version or GPU is unknown, so they cannot be matched"
    if trt_manifest.get("manifest_version") != TRT_MANIFEST_VERSION:
        return f"{TRT_MANIFEST} is from another edge-vit version"
    built = str(trt_manifest.get("tensorrt"))
    if not same_tensorrt(built, target.tensorrt):
        return f"built with TensorRT {built}, this is TensorRT {target.tensorrt}"
    cc = tuple((trt_manifest.get("device") or {}).get("compute_capability") or ())
    if cc != tuple(target.compute_capability):
        want = target.compute_capability
        return f"built for sm_{''.join(map(str, cc))}, this GPU is sm_{want[0]}{want[1]}"
    precision = trt_manifest.get("precision") or {}
    for flag in ("fp16", "int8", "fp8"):
        if bool(precision.get(flag)) != bool(getattr(options, flag)):
            return f"built with {flag}={bool(precision.get(flag))}, asked for {flag}={bool(getattr(options, flag))}"
    if trt_manifest.get("limits") != asdict(limits):
        old = trt_manifest.get("limits") or {}
        return (f"built for tiles <= {old.get('max_tiles')}, prompt <= {old.get('max_prompt')}, context <= "
                f"{old.get('max_context')}, not these limits")
    if (trt_manifest.get("source") or {}).get("manifest") != onnx_manifest:
        return "built from a different ONNX export"
    return None


def plan_vlm_engines(engines: Path, model_dir: Path, onnx_manifest: dict, target: Target,
                     options: TrtBuildOptions, limits: EngineLimits) -> EngineStep:
    existing = _read_json(engines / TRT_MANIFEST)
    missing = [name for name in ENGINE_FILES.values() if not (engines / name).is_file()]
    if existing is None or missing:
        reason = f"no {TRT_MANIFEST} there" if existing is None else f"{missing[0]} is missing"
    else:
        reason = engines_mismatch(existing, target=target, options=options, limits=limits,
                                  onnx_manifest=onnx_manifest)
        if reason is None:
            return EngineStep("VLM engines", Action.REUSE, engines, model_dir,
                              f"{TRT_MANIFEST} matches TensorRT {existing['tensorrt']}, "
                              f"sm_{''.join(map(str, existing['device']['compute_capability']))}, these options")
    precision = "fp16" if options.fp16 else "fp32"
    return EngineStep("VLM engines", Action.BUILD, engines, model_dir,
                      f"{precision}, tiles <= {limits.max_tiles}, prompt <= {limits.max_prompt}, context <= "
                      f"{limits.max_context}; {reason}", options)


def detector_record(source: Path, engine: Path, target: Target, options: YoloExportOptions) -> dict:
    """What the deployment record says about a detector engine built from ``source`` (for the reuse check)."""
    return {
        "source": str(source), "sha256": _sha256(source) if source.is_file() else None, "engine": str(engine),
        "tensorrt": target.tensorrt, "compute_capability": list(target.compute_capability or ()),
        "imgsz": options.imgsz, "half": options.half,
    }


def _same_detector(previous: dict, record: dict) -> bool:
    """Every field equal; TensorRT versions compared as one release (10.3.0 == 10.3.0.30)."""
    if not isinstance(previous.get("tensorrt"), str) or not isinstance(record.get("tensorrt"), str):
        return False
    return (same_tensorrt(previous["tensorrt"], record["tensorrt"])
            and all(previous.get(k) == record.get(k) for k in set(previous) | set(record) if k != "tensorrt"))


def plan_detector(detector: Path, out: Path, target: Target, imgsz: int, fp16: bool,
                  previous: dict | None) -> tuple[EngineStep, dict | None]:
    """(step, record entry): a .pt becomes OUT/<stem>.engine; a ready .engine or .onnx is used as it is."""
    suffix = detector.suffix.lower()
    if suffix == ".engine":
        return EngineStep("detector", Action.USE, detector, detector,
                          "a TensorRT engine given ready-made: it must come from this device and TensorRT"), None
    if suffix == ".onnx":
        return EngineStep("detector", Action.USE, detector, detector,
                          "ONNX Runtime; on the GPU it needs onnxruntime-gpu for JetPack (docs/jetson.md)"), None
    if suffix != ".pt":
        raise ModelLoadError(f"--detector must be a YOLO .pt (converted to a TensorRT engine here), .engine or "
                             f".onnx file, got '{detector}'")
    options = YoloExportOptions(format=YoloFormat.ENGINE, imgsz=imgsz, half=fp16)
    engine = out / f"{detector.stem}.engine"
    record = detector_record(detector, engine, target, options)
    what = f"TensorRT, {'fp16' if fp16 else 'fp32'}, {imgsz} px"
    if not engine.is_file():
        reason = "no engine there"
    elif not previous:
        reason = f"no {DEPLOY_RECORD} says how it was built"
    elif target.tensorrt is None or target.compute_capability is None:
        reason = "this machine's TensorRT version or GPU is unknown, so they cannot be matched"
    elif _same_detector(previous, record):
        return EngineStep("detector", Action.REUSE, engine, detector, f"{what}; {DEPLOY_RECORD} matches"), record
    else:
        reason = f"{DEPLOY_RECORD} differs (model file, TensorRT, GPU, input size or precision)"
    return EngineStep("detector", Action.BUILD, engine, detector, f"{what}; {reason}", options), record


# ---------------------------------------------------------------- the plan


def plan_deploy(options: DeployOptions, target: Target) -> DeployPlan:
    """Every decision of a deployment; reads the export and the previous record, builds and writes nothing."""
    model_dir, out = options.model_dir.resolve(), options.out.resolve()
    name = service.check_service_name(options.service_name)
    _, onnx_manifest, preprocessor = read_onnx_export(model_dir)
    if out == model_dir:
        raise EdgeVitError("--out must be a different folder than --model-dir")
    if options.tiling not in ("single", "split"):
        raise EdgeVitError(f"--tiling must be single or split, got '{options.tiling}'")
    tiling = onnx_manifest.get("tiling") or {}
    max_tiles = 1 if options.tiling == "single" else max_tiles_for_processor(
        (preprocessor.get("size") or {}).get("longest_edge"), int(tiling.get("tile_size", 1)),
        bool(tiling.get("processor_splits_images")))
    build = TrtBuildOptions(fp16=options.fp16, max_tiles=max_tiles, max_prompt=options.max_prompt,
                            max_context=options.max_context, workspace_gb=options.workspace_gb)
    limits = plan_from_manifest(onnx_manifest, preprocessor, max_tiles=max_tiles, max_prompt=options.max_prompt,
                                max_context=options.max_context, fp16=options.fp16).limits

    detector = Path(options.detector).expanduser().resolve()
    previous = _read_json(out / DEPLOY_RECORD) or {}
    det_step, det_record = plan_detector(detector, out, target, options.imgsz, options.fp16, previous.get("detector"))
    engines = out / ENGINES_DIR
    vlm_step = plan_vlm_engines(engines, model_dir, onnx_manifest, target, build, limits)

    config = _read_json(model_dir / "config.json") or {}
    weights = detector.stat().st_size if detector.is_file() else 0
    budget = memory_budget(onnx_manifest, BudgetOptions(
        build=build, detector=DetectorFootprint(detector.name, weights, options.imgsz),
        vision=VisionShape.from_config(config)), target.mem_total, target.mem_available)

    camera = service.video_device(options.source)
    source = options.source
    if camera is None and "://" not in source and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    checks = target_checks(target, camera=camera, user=None if options.container else options.user)
    if not detector.is_file():
        checks.append(Check("detector", Status.FAIL, f"{detector} not found: pass --detector PATH (a YOLO .pt "
                                                     f"is converted to a TensorRT engine here)"))
    args = service.run_args(source=source, vlm=engines, detector=det_step.path, imgsz=options.imgsz,
                            prompt=options.prompt, tiling=options.tiling, extra=options.run_extra)
    validate_run_args(args)
    spec = service.ServiceSpec(name=name, user=options.user, working_dir=out,
                               executable=options.executable or default_executable(), args=args)

    if options.container:
        service_file = out / f"{name}-docker-run.sh"
        mounts = [(str(out), "rw")]
        if det_step.action is Action.USE and det_step.path.parent != out:
            mounts.append((str(det_step.path.parent), "ro"))
        if camera is None and Path(source).exists():
            mounts.append((str(Path(source) if Path(source).is_dir() else Path(source).parent), "ro"))
        content = service.docker_script(spec, image=options.image, devices=(camera,) if camera else (),
                                        volumes=tuple(mounts))
        files = [PlannedFile(service_file, content, 0o755)]
        next_steps = (
            f"docker build -f docker/Dockerfile.jetson -t {options.image} .   (once, in the edge-vit repository)",
            f"sh {service_file}",
            f"docker logs -f {name}",
            "the engines must come from the image's TensorRT: run this deploy inside the image (docs/jetson.md)",
        )
    else:
        service_file = out / f"{name}.service"
        files = [PlannedFile(service_file, service.unit_file(spec))]
        next_steps = (
            f"sudo cp {service_file} /etc/systemd/system/{name}.service",
            f"sudo systemctl daemon-reload && sudo systemctl enable --now {name}",
            f"journalctl -u {name} -f",
        )
    files.insert(0, PlannedFile(out / service.RUN_CONFIG, service.run_config(spec, service_file)))
    record = _record(options, name, target, build, limits, engines, det_record, budget, files)
    files.append(PlannedFile(out / DEPLOY_RECORD, json.dumps(record, indent=2) + "\n"))
    return DeployPlan(options=options, target=target, checks=tuple(checks), budget=budget, vlm=vlm_step,
                      detector=det_step, files=tuple(files), next_steps=next_steps)


def _record(options: DeployOptions, name: str, target: Target, build: TrtBuildOptions, limits: EngineLimits,
            engines: Path, detector: dict | None, budget: Budget, files: list[PlannedFile]) -> dict:
    return {
        "manifest_version": DEPLOY_RECORD_VERSION,
        "service": {"name": name, "kind": "docker" if options.container else "systemd"},
        "model_dir": str(options.model_dir.resolve()),
        "engines": str(engines),
        "build": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(build).items()},
        "limits": asdict(limits),
        "detector": detector,
        "target": {
            "model": target.model, "module": target.module.name if target.module else None,
            "l4t": target.l4t.version if target.l4t else None, "jetpack": target.l4t.jetpack if target.l4t else None,
            "tensorrt": target.tensorrt, "cuda": target.cuda,
            "compute_capability": list(target.compute_capability) if target.compute_capability else None,
            "power_mode": target.power_mode, "mem_total": target.mem_total,
        },
        "budget": {"total_bytes": budget.total_bytes, "device_total": budget.device_total,
                   "device_available": budget.device_available},
        "files": [str(f.path) for f in files],
    }


# ---------------------------------------------------------------- execution


@dataclass
class DeployResult:
    built: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def execute(plan: DeployPlan, builders: Builders | None = None) -> DeployResult:
    """Build what the plan says, then write its files (the record last). Refuses a plan with problems."""
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more above)" if len(plan.problems) > 1 else ""
        raise EdgeVitError(plan.problems[0] + more)
    builders = builders or Builders.real()
    result = DeployResult()
    out = plan.options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = out / DEPLOY_RECORD
    record.unlink(missing_ok=True)  # written last: its presence marks a complete deployment
    if plan.vlm.action is Action.BUILD:
        builders.vlm(plan.vlm.source, plan.vlm.path, plan.vlm.options)
        result.built.append(str(plan.vlm.path))
    if plan.detector.action is Action.BUILD:
        builders.detector(str(plan.detector.source), plan.detector.options, plan.detector.path)
        result.built.append(str(plan.detector.path))
    for f in plan.files:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        f.path.write_text(f.content, encoding="utf-8")
        f.path.chmod(f.mode)
        result.written.append(f.path)
    return result
