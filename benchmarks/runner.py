"""Runs a scenario: every stage, every backend, the baselines, the stream and the roofline, in one process.

Each figure is timed on the product's own code path: ``open_source`` for decoding, ``Detector.detect`` for
the detector (Ultralytics' pre/infer/post split), ``ground`` for the grounding, ``load_vlm(...).generate``
for the VLM (its ``GenerationStats``: preprocess, vision, prefill, time to first token, decode; the time between
streamed tokens), and ``StreamRunner`` for the stream. An answer's latency is frame in hand → last token:
detector + grounding + VLM, as the runner does them. Warm-up iterations run first and are not counted.

One case that fails does not stop the suite: it is reported with its error (status "failed") and the exit code
says so; a case that cannot run on this machine is "skipped" with the reason.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.measure import ResourceMonitor, machine_info, release_memory, summarize
from benchmarks.prepare import Skip, Workspace
from benchmarks.scenario import (
    TORCH_DTYPES,
    BackendSpec,
    DetectorBackend,
    DetectorSpec,
    PromptSpec,
    Scenario,
    Tiling,
    VlmBackend,
    VlmSpec,
    to_dict,
)

SCHEMA = "edge-vit-bench/1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Footprint:
    """What one decode step reads: decoder weights (bytes) and K+V bytes per cached position."""

    weight_bytes: int
    kv_position_bytes: int
    source: str


class Suite:
    """State of one run: the scenario, its workspace, the loaded pipeline detector, and the results so far."""

    def __init__(self, scenario: Scenario, scenario_path: Path, workspace: Workspace,
                 progress: Callable[[str], None]) -> None:
        self.s = scenario
        self.path = scenario_path
        self.ws = workspace
        self.progress = progress
        self.cuda = scenario.device.startswith("cuda")
        from benchmarks.tegrastats import available

        self.tegra = available()
        self.failed = 0

    def monitor(self) -> ResourceMonitor:
        return ResourceMonitor(cuda=self.cuda and _cuda_available(), tegrastats=self.tegra)

    def guarded(self, case: dict, fn: Callable[[], dict]) -> dict:
        """Run one case: ``fn`` returns its figures; Skip → skipped with the reason; any error → failed."""
        self.progress(f"case {case['id']}")
        t0 = time.perf_counter()
        try:
            case.update(fn())
            case["status"] = "ok"
        except Skip as exc:
            case.update(status="skipped", reason=str(exc))
            self.progress(f"  skipped: {exc}")
        except Exception as exc:  # one broken case is reported, the suite goes on
            self.failed += 1
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            case.update(status="failed", reason=f"{type(exc).__name__}: {message}")
            self.progress(f"  FAILED: {type(exc).__name__}: {message}\n{traceback.format_exc()}")
        case["wall_s"] = round(time.perf_counter() - t0, 2)
        release_memory()
        return case


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_suite(scenario: Scenario, scenario_path: Path, work_dir: Path,
              progress: Callable[[str], None] = lambda _: None) -> dict:
    """Run every case of ``scenario``; returns the results (see report.py for the layout)."""
    from benchmarks.roofline import measure_bandwidth

    t_start = time.perf_counter()
    s = scenario
    if s.threads is not None:
        import torch

        torch.set_num_threads(s.threads)
    machine = machine_info(s.device)
    suite = Suite(s, scenario_path, Workspace(work_dir, s.device, progress), progress)
    progress(f"scenario {scenario_path} on {machine['cpu']} ({machine['cores_logical']} cores), "
             f"load average {machine['load_avg_start']}")

    progress("measuring memory bandwidth")
    bandwidth = measure_bandwidth(s.roofline.megabytes, s.roofline.repeats, s.threads)
    progress(f"  {bandwidth['gb_s']} GB/s (copy {bandwidth['copy_gb_s']}, read {bandwidth['read_gb_s']})")

    clip = suite.ws.clip(s.clip)
    frames = _read_frames(clip, 16)
    source = suite.guarded({"id": "source/decode", "kind": "source"}, lambda: bench_source(clip, s))

    detector_cases, detector_baselines = bench_detectors(suite, frames)
    pipeline = _load_pipeline_detector(suite)
    grounding_cases, vlm_cases, vlm_baselines = bench_vlms(suite, frames, pipeline, bandwidth)
    stream = bench_stream(suite, clip, frames) if s.stream is not None else None

    _attach_vlm_ratios(vlm_cases, vlm_baselines)
    _attach_detector_ratios(detector_cases, detector_baselines)
    if stream is not None and stream.get("status") == "ok":
        _attach_stream_ratios(stream, vlm_baselines, s)

    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["max_rss_mb"] = _max_rss_mb()
    return {
        "schema": SCHEMA,
        "machine": machine,
        "config": {"scenario": str(scenario_path), "name": scenario_path.stem, "work_dir": str(work_dir),
                   "scenario_data": to_dict(s)},
        "source": source,
        "detectors": detector_cases,
        "grounding": grounding_cases,
        "vlm": vlm_cases,
        "baselines": {"vlm": vlm_baselines, "detector": detector_baselines},
        "stream": stream,
        "roofline": _roofline_summary(bandwidth, vlm_cases, vlm_baselines),
        "summary": _summary(suite, [source], detector_cases, grounding_cases, vlm_cases, vlm_baselines,
                            detector_baselines, [stream] if stream else [], time.perf_counter() - t_start),
    }


def _max_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------------------------------ source


def _read_frames(clip: Path, limit: int) -> list[np.ndarray]:
    from edge_vit.stream.sources import open_source

    frames = []
    with open_source(str(clip)) as source:
        for frame in source:
            frames.append(frame.image)
            if len(frames) >= limit:
                break
    if not frames:
        from edge_vit.errors import SourceError

        raise SourceError(f"{clip} holds no readable frames")
    return frames


def bench_source(clip: Path, s: Scenario) -> dict:
    """Per-frame decode time of ``open_source`` on the clip (file source, every frame), replayed as needed."""
    from edge_vit.stream.sources import open_source

    warmup = max(1, s.iterations.warmup)
    wanted = warmup + s.iterations.source
    samples: list[float] = []
    shape = None
    while len(samples) < wanted:
        with open_source(str(clip)) as source:
            fps = source.fps
            it = iter(source)
            while len(samples) < wanted:
                t0 = time.perf_counter()
                frame = next(it, None)
                if frame is None:
                    break
                samples.append((time.perf_counter() - t0) * 1000)
                shape = frame.image.shape
    return {"stages": {"decode": summarize(samples[warmup:])}, "frame": list(shape[:2][::-1]) if shape else None,
            "clip_fps": fps, "clip": str(clip)}


# ------------------------------------------------------------------------------------------ detectors


def _detector_config(suite: Suite, spec: DetectorSpec, backend: DetectorBackend):
    from edge_vit.detector import DetectorConfig

    model = suite.ws.detector_file(spec, backend)
    device = suite.s.device if backend is not DetectorBackend.ONNX or suite.cuda else "cpu"
    return DetectorConfig(model=str(model), conf=spec.conf, imgsz=spec.imgsz, device=device, prefer_exported=False)


def bench_detectors(suite: Suite, frames: list[np.ndarray]) -> tuple[list[dict], list[dict]]:
    from benchmarks.baselines import yolo_predict_baseline
    from edge_vit.detector import Detector

    s = suite.s
    it = s.iterations
    cases, baselines = [], []
    for spec in s.detectors:
        if s.baselines.detector:
            def baseline(spec=spec) -> dict:
                pt = suite.ws.detector_pt(spec)
                with suite.monitor() as mon:
                    result = yolo_predict_baseline(str(pt), frames, spec.imgsz, max(1, it.warmup), it.detector,
                                                   device=s.device)
                return {**result, "memory": mon.result}

            baselines.append(suite.guarded({"id": f"{spec.name}/baseline", "kind": "detector_baseline",
                                            "detector": spec.name, "imgsz": spec.imgsz,
                                            "path": "YOLO(...).predict, PyTorch"}, baseline))
        for backend in spec.backends:
            def case(spec=spec, backend=backend) -> dict:
                config = _detector_config(suite, spec, backend)
                with suite.monitor() as mon:
                    t0 = time.perf_counter()
                    detector = Detector.load(config)
                    load_ms = (time.perf_counter() - t0) * 1000
                    samples = _detect_samples(detector, frames, max(1, it.warmup), it.detector)
                del detector
                return {"stages": {k: summarize(v) for k, v in samples.items()}, "memory": mon.result,
                        "load_ms": round(load_ms, 1), "model_file": config.model,
                        "fps": round(1000 / np.median(samples["detect"]), 2)}

            cases.append(suite.guarded({"id": f"{spec.name}/{backend.value}", "kind": "detector",
                                        "detector": spec.name, "backend": backend.value, "imgsz": spec.imgsz,
                                        "random_weights": spec.model.arch is not None}, case))
    return cases, baselines


def _detect_samples(detector, frames: list[np.ndarray], warmup: int, iterations: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = defaultdict(list)
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        _, timings = detector.detect(frames[i % len(frames)])
        wall = (time.perf_counter() - t0) * 1000
        if i < warmup:
            continue
        for key, value in timings.items():
            samples[key].append(value)
        samples["detect"].append(wall)
    return samples


def _load_pipeline_detector(suite: Suite):
    """The detector that runs in front of the VLM; None (VLM cases then fail with the reason) if it cannot load."""
    from edge_vit.detector import Detector

    p = suite.s.pipeline
    try:
        return Detector.load(_detector_config(suite, suite.s.detector(p.detector), p.backend))
    except Skip as exc:
        suite.progress(f"pipeline detector {p.detector}/{p.backend.value} unavailable: {exc}")
        return exc


# ------------------------------------------------------------------------------------------ VLMs


def synthetic_scene(n: int, names: dict[int, str], image_size: tuple[int, int], seed: int = 0):
    """A fixed scene of ``n`` objects for grounding (random-weight detectors find nothing): common COCO classes when
    the detector has them, boxes and confidences from a seeded generator."""
    from edge_vit.types import Detections

    preferred = [i for i, name in names.items() if name in ("person", "car", "bicycle", "dog", "chair", "bottle")]
    classes = preferred or sorted(names)[:6]
    rng = np.random.default_rng(seed)
    h, w = image_size
    wh = rng.uniform(0.05, 0.3, (n, 2)) * (w, h)
    xy = rng.uniform(0, 1, (n, 2)) * ((w, h) - wh)
    return Detections(np.concatenate([xy, xy + wh], axis=1), rng.uniform(0.3, 0.95, n),
                      np.asarray([classes[i % len(classes)] for i in range(n)]), names, (h, w))


def _prepare_vlm(suite: Suite, spec: VlmSpec, backend: BackendSpec) -> str:
    """Build (or find in the work dir) the folder this backend loads. Called before a case's memory monitor
    starts: an export or a quantization run in this process would otherwise count as the case's memory."""
    if backend.backend is VlmBackend.TORCH:
        return suite.ws.vlm_folder(spec)  # a folder, or a cached hub id
    if backend.backend is VlmBackend.ONNX:
        if suite.cuda:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise Skip("ONNX Runtime has no CUDA provider here (pip install -e '.[gpu]' for onnxruntime-gpu)")
        return str(suite.ws.onnx_folder(spec, backend.precision))
    return str(suite.ws.trt_folder(spec))


def _load_vlm(suite: Suite, folder: str, backend: BackendSpec, tiling: Tiling):
    """The product's VLM in ``folder`` (from :func:`_prepare_vlm`) for this backend/precision, and its decode
    footprint (weights, KV bytes per position)."""
    import json

    from benchmarks.roofline import kv_bytes_per_position, onnx_decoder_bytes, torch_decoder_bytes
    from edge_vit.vlm import Backend, TilingPolicy, load_vlm
    from export import io_spec

    s = suite.s
    policy = TilingPolicy(tiling.value)
    if backend.backend is VlmBackend.TORCH:
        dtype = TORCH_DTYPES[backend.precision]
        vlm = load_vlm(folder, Backend.TORCH, device=s.device, dtype=dtype, tiling=policy)
        shape = io_spec.DecoderShape.from_text_config(vlm.model.config.get_text_config())
        element = next(vlm.model.parameters()).element_size()
        return vlm, Footprint(torch_decoder_bytes(vlm.model),
                              kv_bytes_per_position(shape.num_layers, shape.num_kv_heads, shape.head_dim, element),
                              f"PyTorch text-model parameters + lm_head at {dtype}")
    if backend.backend is VlmBackend.ONNX:
        vlm = load_vlm(folder, Backend.ONNX, device=s.device, threads=s.threads, tiling=policy)
        d = vlm.decoder
        weights, source = onnx_decoder_bytes(Path(folder), backend.precision.value)
        return vlm, Footprint(weights,
                              kv_bytes_per_position(d.num_layers, d.kv_heads, d.head_dim, np.dtype(d.cache_dtype).itemsize),
                              source)
    from export.trt_profiles import ENGINE_FILES, TRT_MANIFEST

    vlm = load_vlm(folder, Backend.TRT, device=s.device, tiling=policy)
    manifest = json.loads((Path(folder) / TRT_MANIFEST).read_text(encoding="utf-8"))
    shape = manifest["decoder"]
    kv_element = 2 if manifest.get("kv_dtype", "float16") == "float16" else 4
    return vlm, Footprint((Path(folder) / ENGINE_FILES[io_spec.DECODER]).stat().st_size,
                          kv_bytes_per_position(shape["num_layers"], shape["num_kv_heads"], shape["head_dim"], kv_element),
                          "size of the decoder engine (fp16)")


def bench_vlms(suite: Suite, frames: list[np.ndarray], pipeline, bandwidth: dict
               ) -> tuple[list[dict], list[dict], list[dict]]:
    s = suite.s
    grounding_cases: list[dict] = []
    cases: list[dict] = []
    baselines: list[dict] = []
    for spec in s.vlms:
        grounded_done = False
        for backend in s.backends:
            for tiling in s.tiling:
                group = [{"id": f"{spec.name}/{backend.label}/{tiling.value}/{p.name}", "kind": "vlm",
                          "vlm": spec.name, "backend": backend.backend.value, "precision": backend.precision.value,
                          "tiling": tiling.value, "prompt": p.name, "grounding": p.grounding,
                          "random_weights": spec.model.random_weights} for p in s.prompts]
                ran = _vlm_group(suite, spec, backend, tiling, group, frames, pipeline, bandwidth,
                                 grounding_cases if not grounded_done else None)
                grounded_done = grounded_done or ran
                cases.extend(group)
        if s.baselines.vlm:
            baselines.append(_vlm_baseline(suite, spec, frames, bandwidth))
    return grounding_cases, cases, baselines


def _vlm_group(suite: Suite, spec: VlmSpec, backend: BackendSpec, tiling: Tiling, group: list[dict],
               frames: list[np.ndarray], pipeline, bandwidth: dict, grounding_cases: list[dict] | None) -> bool:
    """Load one VLM (model × backend × precision × tiling) and measure every prompt with it. The memory figures
    cover the load and all prompts. Returns True if the model loaded (grounding was then measured with it)."""
    from benchmarks.roofline import roofline

    s = suite.s
    state: dict = {}

    def load() -> dict:
        if isinstance(pipeline, Exception):
            raise Skip(f"the pipeline detector cannot run here: {pipeline}")
        folder = _prepare_vlm(suite, spec, backend)
        state["folder"] = folder
        monitor = suite.monitor()
        monitor.__enter__()
        state["monitor"] = monitor
        t0 = time.perf_counter()
        state["vlm"], state["footprint"] = _load_vlm(suite, folder, backend, tiling)
        state["load_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return {}

    first = suite.guarded({"id": f"{spec.name}/{backend.label}/{tiling.value} (load)"}, load)
    if first["status"] != "ok":
        if "monitor" in state:
            state["monitor"].__exit__(None, None, None)
        for case in group:
            case.update(status=first["status"], reason=first["reason"], wall_s=first["wall_s"])
        return False
    vlm, footprint = state["vlm"], state["footprint"]
    try:
        if grounding_cases is not None:
            for prompt in s.prompts:
                if prompt.grounding and prompt.objects is not None:
                    grounding_cases.append(suite.guarded(
                        {"id": f"{spec.name}/{prompt.name}", "kind": "grounding", "vlm": spec.name,
                         "prompt": prompt.name, "objects": prompt.objects},
                        lambda prompt=prompt: _bench_grounding(vlm, prompt, pipeline, frames[0], s)))
        for case, prompt in zip(group, s.prompts):
            def measure(prompt=prompt) -> dict:
                result = _vlm_samples(vlm, prompt, frames, pipeline, s)
                tok_s = result["stages"]["decode_tok_s"].get("p50")
                context = result["tokens"]["prompt_tokens"] + s.new_tokens / 2
                result["roofline"] = {**roofline(bandwidth["gb_s"], footprint.weight_bytes, footprint.kv_position_bytes,
                                                 context, tok_s), "weights_from": footprint.source}
                return result

            suite.guarded(case, measure)
    finally:
        state["monitor"].__exit__(None, None, None)
        del vlm, state["vlm"]
    memory = state["monitor"].result
    floor = _gemv_floor(suite, backend, state["folder"]) if any(c["status"] == "ok" for c in group) else None
    for case in group:
        if case["status"] == "ok":
            case.update(memory=memory, load_ms=state["load_ms"])
            if floor and case.get("roofline"):
                measured = case["roofline"].get("measured_tok_s")
                case["roofline"].update(gemv_floor_tok_s=floor,
                                        share_of_gemv_floor=round(measured / floor, 3) if measured else None)
    return True


def _gemv_floor(suite: Suite, backend: BackendSpec, folder: str) -> float | None:
    """ONNX on CPU: tok/s of the decoder's own weight GEMVs alone (``benchmarks.onnx_speed.gemv_floor_graph``),
    the most a decode step can reach with these kernels. Measured after the case's memory monitor closed
    (its session holds the weights once more). None elsewhere."""
    if backend.backend is not VlmBackend.ONNX or suite.cuda:
        return None
    from benchmarks.onnx_speed import gemv_floor_ms

    try:
        return round(1000 / gemv_floor_ms(Path(folder), suite.s.threads or 0), 1)
    except Exception as exc:  # an extra figure: its failure must not fail the measured case
        log.warning("GEMV floor of %s not measured: %s", folder, str(exc).splitlines()[0] if str(exc) else exc)
        return None


def _bench_grounding(vlm, prompt: PromptSpec, pipeline, frame: np.ndarray, s: Scenario) -> dict:
    from edge_vit.grounding import GroundingConfig, ground

    scene = synthetic_scene(prompt.objects, pipeline.names, frame.shape[:2])
    config = GroundingConfig(max_tokens=prompt.grounding_tokens)
    warmup = max(1, s.iterations.warmup)
    samples = []
    for i in range(warmup + s.iterations.grounding):
        t0 = time.perf_counter()
        grounded = ground(scene, prompt.instruction, config, vlm.count_tokens)
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1000)
    return {"stages": {"grounding": summarize(samples)}, "grounding_tokens": grounded.tokens,
            "text": grounded.grounding}


def _vlm_samples(vlm, prompt: PromptSpec, frames: list[np.ndarray], detector, s: Scenario) -> dict:
    """Frame in hand → answer, ``warmup + iterations`` times: detect, ground, generate (min = max new tokens)."""
    from edge_vit.grounding import GroundingConfig, ground
    from edge_vit.vlm import GenerationConfig

    generation = GenerationConfig(max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens)
    grounding = GroundingConfig(max_tokens=prompt.grounding_tokens) if prompt.grounding else None
    scene = (synthetic_scene(prompt.objects, detector.names, frames[0].shape[:2])
             if prompt.grounding and prompt.objects is not None else None)
    samples: dict[str, list[float]] = defaultdict(list)
    tokens: dict = {}
    cuda = s.device.startswith("cuda")
    for i in range(s.iterations.warmup + s.iterations.vlm):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        detections, _ = detector.detect(frame)
        t1 = time.perf_counter()
        text, grounding_tokens = prompt.instruction, 0
        if grounding is not None:
            grounded = ground(scene if scene is not None else detections, prompt.instruction, grounding,
                              vlm.count_tokens)
            text, grounding_tokens = grounded.text, grounded.tokens
        t2 = time.perf_counter()
        stamps: list[float] = []
        stats = None
        for step in vlm.generate(frame, text, generation):
            if step.done:
                stats = step.stats
            else:
                stamps.append(time.perf_counter())
        if cuda:
            import torch

            torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i < s.iterations.warmup:
            continue
        samples["detect"].append((t1 - t0) * 1000)
        samples["grounding"].append((t2 - t1) * 1000)
        samples["preprocess"].append(stats.preprocess_ms)
        samples["vision"].append(stats.vision_ms)
        samples["prefill"].append(stats.prefill_ms)
        samples["ttft"].append(stats.ttft_ms)
        samples["decode"].append(stats.decode_ms)
        samples["vlm_total"].append(stats.total_ms)
        samples["answer"].append((t3 - t0) * 1000)
        samples["decode_tok_s"].append(stats.decode_tok_s)
        samples["itl"].extend((np.diff(stamps) * 1000).tolist())
        tokens = {"prompt_tokens": stats.prompt_tokens, "image_tokens": stats.image_tokens, "tiles": stats.tiles,
                  "new_tokens": stats.new_tokens, "grounding_tokens": grounding_tokens}
    return {"stages": {k: summarize(v) for k, v in samples.items()}, "tokens": tokens}


def _vlm_baseline(suite: Suite, spec: VlmSpec, frames: list[np.ndarray], bandwidth: dict) -> dict:
    from benchmarks.baselines import vlm_generate_baseline
    from benchmarks.roofline import kv_bytes_per_position, roofline, torch_decoder_bytes
    from export import io_spec

    s = suite.s
    plain = next((p for p in s.prompts if not p.grounding), s.prompts[0])

    def run() -> dict:
        folder = suite.ws.vlm_folder(spec)
        with suite.monitor() as mon:
            result, model = vlm_generate_baseline(folder, frames, plain.instruction, s.new_tokens,
                                                  s.iterations.warmup, s.iterations.baseline_vlm, device=s.device)
        shape = io_spec.DecoderShape.from_text_config(model.config.get_text_config())
        weights = torch_decoder_bytes(model)
        del model
        tok_s = result["stages"].get("decode_tok_s", {}).get("p50")
        context = result["tokens"]["prompt_tokens"] + s.new_tokens / 2
        result["roofline"] = {**roofline(bandwidth["gb_s"], weights,
                                         kv_bytes_per_position(shape.num_layers, shape.num_kv_heads, shape.head_dim, 4),
                                         context, tok_s), "weights_from": "PyTorch text-model parameters + lm_head at float32"}
        return {**result, "memory": mon.result}

    return suite.guarded({"id": f"{spec.name}/baseline", "kind": "vlm_baseline", "vlm": spec.name,
                          "backend": "transformers-generate", "precision": "fp32", "tiling": "processor default",
                          "prompt": plain.name, "grounding": False,
                          "path": "transformers generate, eager fp32, default processor"}, run)


# ------------------------------------------------------------------------------------------ stream


def bench_stream(suite: Suite, clip: Path, frames: list[np.ndarray]) -> dict:
    from benchmarks.stream_bench import run_stream
    from edge_vit.detector import Detector
    from edge_vit.grounding import GroundingConfig

    s = suite.s
    st = s.stream
    prompt = s.prompt(st.prompt)

    def run() -> dict:
        # as `edge-vit run` loads it next to a VLM: ONNX Runtime threads not spinning between frames
        detector = Detector.load(replace(_detector_config(suite, s.detector(st.detector), st.detector_backend),
                                         ort_spinning=False))
        folder = _prepare_vlm(suite, s.vlm(st.vlm), st.backend)
        with suite.monitor() as mon:
            vlm, _ = _load_vlm(suite, folder, st.backend, st.tiling)
            grounding = GroundingConfig(max_tokens=prompt.grounding_tokens) if prompt.grounding else None
            result = run_stream(str(clip), detector, vlm, prompt.instruction, grounding, st.new_tokens, frames[0])
            del vlm
        return {**result, "detector_spinning_off": detector.spinning_off, "memory": mon.result}

    return suite.guarded({"id": f"stream/{st.vlm}/{st.backend.label}/{st.detector}-{st.detector_backend.value}",
                          "kind": "stream", "vlm": st.vlm, "backend": st.backend.backend.value,
                          "precision": st.backend.precision.value, "detector": st.detector,
                          "detector_backend": st.detector_backend.value, "prompt": st.prompt,
                          "new_tokens": st.new_tokens}, run)


# ------------------------------------------------------------------------------------------ ratios, roofline


def _p50(case: dict | None, stage: str) -> float | None:
    if not case or case.get("status") != "ok":
        return None
    return case.get("stages", {}).get(stage, {}).get("p50")


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num and den else None


def _attach_vlm_ratios(cases: list[dict], baselines: list[dict]) -> None:
    """Speed-up over the model's baseline (>1 is faster): baseline p50 ÷ ours for times, ours ÷ baseline for tok/s."""
    by_model = {b["vlm"]: b for b in baselines}
    for case in cases:
        base = by_model.get(case["vlm"])
        if case.get("status") != "ok":
            continue
        case["vs_baseline"] = {
            "baseline": base["id"] if base else None,
            "answer": _ratio(_p50(base, "answer"), _p50(case, "answer")),
            "ttft": _ratio(_p50(base, "ttft"), _p50(case, "ttft")),
            "vlm_total": _ratio(_p50(base, "vlm_total"), _p50(case, "vlm_total")),
            "decode_tok_s": _ratio(_p50(case, "decode_tok_s"), _p50(base, "decode_tok_s")),
        }


def _attach_detector_ratios(cases: list[dict], baselines: list[dict]) -> None:
    by_name = {b["detector"]: b for b in baselines}
    for case in cases:
        if case.get("status") != "ok":
            continue
        base = by_name.get(case["detector"])
        case["vs_baseline"] = {"baseline": base["id"] if base else None,
                               "detect": _ratio(_p50(base, "detect"), _p50(case, "detect")),
                               "detect_infer": _ratio(_p50(base, "detect_infer"), _p50(case, "detect_infer"))}


def _attach_stream_ratios(stream: dict, vlm_baselines: list[dict], s: Scenario) -> None:
    """The stream's answer latency and frame age against the same model's baseline answer (one request on an idle
    machine), and its sustained detector fps as a share of the clip's fps (1.0 = keeps up with the camera)."""
    vbase = next((b for b in vlm_baselines if b["vlm"] == s.stream.vlm), None)
    clip_fps = stream.get("clip_fps")
    stream["vs_baseline"] = {
        "vlm_baseline": vbase["id"] if vbase else None,
        "answer": _ratio(_p50(vbase, "answer"), _p50(stream, "vlm_total")),
        "frame_age": _ratio(_p50(vbase, "answer"), _p50(stream, "frame_age")),
        "detector_fps_of_clip": _ratio(stream.get("detector_fps"), clip_fps),
    }


def _roofline_summary(bandwidth: dict, cases: list[dict], baselines: list[dict]) -> dict:
    rows = []
    for case in baselines + cases:
        if case.get("status") == "ok" and case.get("roofline"):
            r = case["roofline"]
            rows.append({"id": case["id"], "backend": case["backend"], "precision": case["precision"],
                         "measured_tok_s": r["measured_tok_s"], "roofline_tok_s": r["roofline_tok_s"],
                         "share": r["share"], "bytes_per_token": r["bytes_per_token"],
                         "gemv_floor_tok_s": r.get("gemv_floor_tok_s")})
    return {**bandwidth, "cases": rows}


def _summary(suite: Suite, *groups_and_time) -> dict:
    *groups, seconds = groups_and_time
    counts: dict[str, int] = defaultdict(int)
    skipped, failed = [], []
    for group in groups:
        for case in group:
            if not case:
                continue
            counts[case.get("status", "ok")] += 1
            if case.get("status") == "skipped":
                skipped.append({"id": case["id"], "reason": case["reason"]})
            elif case.get("status") == "failed":
                failed.append({"id": case["id"], "reason": case["reason"]})
    return {"ok": counts["ok"], "skipped": skipped, "failed": failed, "seconds": round(seconds, 1)}
