"""TensorRT on a real GPU: engines built from tiny ONNX exports give the same greedy tokens as ONNX Runtime.

Every test here is marked ``gpu`` (the conftest skips them without CUDA) and also needs the
``tensorrt`` module. Tiny local Idefics3 and LLaVA models; nothing is downloaded.
"""

import json
import threading

import numpy as np
import pytest
from helpers import run_cli

from edge_vit.errors import PromptTooLongError
from edge_vit.vlm import Backend, GenerationConfig, TilingPolicy, collect, load_vlm
from export import io_spec
from export.trt_profiles import DECODE, ENGINE_FILES, PREFILL, TRT_MANIFEST

pytestmark = pytest.mark.gpu

PROMPT = "How many circles are there?"


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt")


@pytest.fixture(scope="module")
def frame():
    return np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def onnx_exports(tiny_idefics3, tiny_llava, tmp_path_factory):
    from export.onnx_export import export_vlm_onnx

    out = {}
    for kind, source in (("idefics3", tiny_idefics3), ("llava", tiny_llava)):
        folder = tmp_path_factory.mktemp(f"trt-src-{kind}")
        export_vlm_onnx(source, folder)
        out[kind] = folder
    return out


def _build(onnx_dir, out_dir, **options):
    from export.trt import TrtBuildOptions, build_trt_engines

    return build_trt_engines(onnx_dir, out_dir, TrtBuildOptions(**options))


@pytest.fixture(scope="module")
def fp32_engines(trt, onnx_exports, tmp_path_factory):
    """kind -> build result of fp32 engines (bit-comparable with ONNX Runtime's fp32 graphs)."""
    return {kind: _build(folder, tmp_path_factory.mktemp(f"trt-fp32-{kind}"), fp16=False, max_context=384)
            for kind, folder in onnx_exports.items()}


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def pair(request, onnx_exports, fp32_engines):
    """(onnx VLM on CPU, trt VLM) of the same model."""
    kind = request.param
    onnx_vlm = load_vlm(str(onnx_exports[kind]), Backend.ONNX, threads=2)
    trt_vlm = load_vlm(str(fp32_engines[kind].out_dir), Backend.TRT, device="cuda")
    return onnx_vlm, trt_vlm


def _tokens(vlm, frame, cfg, prompt=PROMPT):
    return [s.token_id for s in vlm.generate(frame, prompt, cfg) if not s.done]


def test_greedy_tokens_identical_to_onnx_runtime(pair, frame):
    onnx_vlm, trt_vlm = pair
    cfg = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    ours = _tokens(trt_vlm, frame, cfg)
    assert len(ours) == 24 and ours == _tokens(onnx_vlm, frame, cfg)


def test_streamed_text_and_stats(pair, frame):
    onnx_vlm, trt_vlm = pair
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    text, stats = collect(trt_vlm.generate(frame, "Describe the scene.", cfg))
    assert text == collect(onnx_vlm.generate(frame, "Describe the scene.", cfg))[0]
    assert stats.new_tokens == 12 and stats.decode_steps == 11 and stats.finish_reason == "length"
    assert stats.image_tokens == stats.tiles * trt_vlm.tokens_per_tile and stats.ttft_ms > 0


def test_repeated_generations_reuse_the_buffers(pair, frame):
    _, trt_vlm = pair
    kv = trt_vlm.kv.data_ptr()
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    first = _tokens(trt_vlm, frame, cfg)
    assert _tokens(trt_vlm, frame, cfg) == first and trt_vlm.kv.data_ptr() == kv


def test_split_tiling_matches_onnx_runtime(onnx_exports, fp32_engines, frame):
    onnx_vlm = load_vlm(str(onnx_exports["idefics3"]), Backend.ONNX, tiling=TilingPolicy.SPLIT, threads=2)
    trt_vlm = load_vlm(str(fp32_engines["idefics3"].out_dir), Backend.TRT, device="cuda",
                       tiling=TilingPolicy.SPLIT)
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    steps = list(trt_vlm.generate(frame, PROMPT, cfg))
    assert steps[-1].stats.tiles == 5  # 2x2 grid + the global tile
    assert [s.token_id for s in steps[:-1]] == _tokens(onnx_vlm, frame, cfg)


def test_engines_carry_the_planned_profiles(trt, fp32_engines):
    from export.trt import TrtBuildOptions, plan_build

    result = fp32_engines["idefics3"]
    manifest = json.loads((result.out_dir / TRT_MANIFEST).read_text())
    assert manifest["logits"] == "last" and manifest["kv_dtype"] == "float32"
    assert (result.out_dir / "timing.cache").stat().st_size > 0
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((result.out_dir / ENGINE_FILES[io_spec.DECODER]).read_bytes())
    assert engine.num_optimization_profiles == 2
    plan = plan_build(manifest["source"]["onnx_dir"], TrtBuildOptions(fp16=False, max_context=384))
    plan_profiles = plan.profiles[io_spec.DECODER]
    limits = manifest["limits"]
    for index in (PREFILL, DECODE):
        for name in ("inputs_embeds", "attention_mask", "past_key_values.1.value"):
            got = [tuple(s) for s in engine.get_tensor_profile_shape(name, index)]
            expected = plan_profiles[index].shapes[name]
            assert got[0] == expected.min and got[2] == expected.max
            if index == DECODE and name == "attention_mask":
                assert got[2] == (1, limits["max_context"]) == (1, 384)


def test_kv_buffers_are_sized_from_the_profile(fp32_engines):
    vlm = load_vlm(str(fp32_engines["idefics3"].out_dir), Backend.TRT, device="cuda")
    # two slots x (2 layers x K, V) x (2 KV heads x 384 tokens x 16 dims)
    assert tuple(vlm.kv.shape) == (2, 4, 2 * 384 * 16)
    assert vlm.max_context == 384 and vlm.max_prompt == 192  # half the context (the default cap)
    assert tuple(vlm.logits.shape) == (1, 1, 600)


def test_prompt_over_the_engine_limit_is_a_user_error(pair, frame):
    _, trt_vlm = pair
    with pytest.raises(PromptTooLongError):
        list(trt_vlm.generate(frame, "circle " * 400, GenerationConfig(max_new_tokens=4)))


def test_cancel_stops_after_the_current_token(pair, frame):
    _, trt_vlm = pair
    cancel = threading.Event()
    steps = []
    for step in trt_vlm.generate(frame, PROMPT, GenerationConfig(max_new_tokens=20, min_new_tokens=20), cancel):
        steps.append(step)
        cancel.set()
    assert steps[-1].stats.finish_reason == "cancelled" and steps[-1].stats.new_tokens == 1


def test_fp16_engines_stay_close_to_fp32(trt, onnx_exports, fp32_engines, tmp_path, frame):
    result = _build(onnx_exports["idefics3"], tmp_path / "fp16", fp16=True, max_context=384)
    assert result.manifest["kv_dtype"] == "float16"
    vlms = [load_vlm(str(out), Backend.TRT, device="cuda") for out in (fp32_engines["idefics3"].out_dir,
                                                                           result.out_dir)]
    assert str(vlms[1].kv.dtype) == "torch.float16"
    logits = []
    for vlm in vlms:  # prefill logits through the backend's own stages
        inputs = vlm._prepare(frame, PROMPT)
        ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int64)
        tiles = vlm._tiles(inputs)
        with vlm._torch.cuda.stream(vlm.stream):
            vlm._vision(tiles)
            vlm._embed_prompt(ids, ids[0] == vlm.image_token_id, tiles.shape[0])
            vlm._decoder(0, 0, ids.shape[1])
            logits.append(vlm._fetch_logits().copy())
    a, b = logits
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.999 and np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


def test_cli_builds_engines(trt, onnx_exports, tmp_path):
    out = tmp_path / "cli-engines"
    result = run_cli("export", "trt", "--onnx-dir", str(onnx_exports["llava"]), "--out", str(out), "--no-fp16",
                     "--max-context", "256", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((out / name).is_file() for name in ENGINE_FILES.values()) and (out / TRT_MANIFEST).is_file()
    assert "--backend trt" in result.stdout


def test_yolo_engine_gives_the_onnx_boxes(trt, tmp_path):
    """fp32 engine (TF32 matmuls, Ultralytics' default) vs the ONNX export, both NMS-free, through the Detector."""
    from test_export_yolo import _spread_yolo

    from edge_vit.detector import Detector, DetectorConfig, prefer_exported
    from edge_vit.tiny import render_shapes_frame
    from export.yolo import YoloExportOptions, export_yolo

    pt = _spread_yolo(tmp_path / "y.pt")
    onnx_result = export_yolo(str(pt), YoloExportOptions(imgsz=128))
    engine_result = export_yolo(str(pt), YoloExportOptions(format="engine", imgsz=128))
    assert engine_result.path == pt.with_suffix(".engine")
    assert prefer_exported(str(pt), "cuda:0") == str(engine_result.path)
    frame = render_shapes_frame(3, 256, 256)[0]
    onnx_det, _ = Detector.load(DetectorConfig(model=str(onnx_result.path), imgsz=128, device="cpu")).detect(frame)
    engine_det, _ = Detector.load(DetectorConfig(model=str(engine_result.path), imgsz=128, device="0")).detect(frame)
    a, b = np.argsort(-onnx_det.confidence)[:10], np.argsort(-engine_det.confidence)[:10]
    assert len(a) == 10
    np.testing.assert_allclose(engine_det.confidence[b], onnx_det.confidence[a], atol=1e-2)
    np.testing.assert_allclose(engine_det.xyxy[b], onnx_det.xyxy[a], atol=2.0)
