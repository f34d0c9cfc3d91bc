"""TensorRT build plans without a GPU: profiles, limits, memory and precision against hand-computed values,
the decoder graph preparation checked with ONNX Runtime, and the CLI on a machine without TensorRT.

The numbers are those of SmolVLM-256M (text: 576 hidden, 30 layers, 9 heads, 3 KV heads, head_dim 64,
max_position_embeddings 8192, vocab 49280; 64 image tokens per 512 px tile, up to 4x4 + 1 tiles).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from edge_vit.errors import EdgeVitError, ModelLoadError
from export import io_spec
from export.io_spec import DecoderShape
from export.trt_profiles import (
    DECODE,
    ENGINE_FILES,
    PREFILL,
    EngineLimits,
    ShapeRange,
    check_quantized_graphs,
    decoder_profile_for,
    decoder_profiles,
    decoder_step_shapes,
    embed_profiles,
    engine_memory_estimate,
    is_norm_layer,
    kv_cache_bytes,
    kv_slots,
    max_tiles_for_processor,
    network_plan,
    pin_to_fp32,
    plan_from_manifest,
    plan_limits,
    tensorrt_install_hint,
    vision_profile,
)

SMOLVLM = DecoderShape(num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576, vocab_size=49280,
                       max_positions=8192)
LLAVA_7B = DecoderShape(num_layers=32, num_kv_heads=32, head_dim=128, hidden_size=4096, vocab_size=32064,
                        max_positions=4096)
SMOLVLM_MANIFEST = {
    "decoder": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "hidden_size": 576, "vocab_size": 49280,
                "max_positions": 8192},
    "tiling": {"tile_size": 512, "tokens_per_tile": 64, "processor_splits_images": True},
    "graph_bytes": {"vision_encoder.onnx": 400_000_000, "embed_tokens.onnx": 113_541_120,
                    "decoder_model_merged.onnx": 540_000_000},
}
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------- limits from the model config


def test_smolvlm_default_limits():
    # 17 tiles = 4x4 grid of 512 px tiles (longest edge 2048) + the global tile.
    assert max_tiles_for_processor(2048, 512, True) == 17
    assert max_tiles_for_processor(2048, 512, False) == 1
    limits = plan_limits(SMOLVLM, tokens_per_tile=64, max_tiles=17)
    # max prompt: 17 x (64 + 3 markup) + 512 text = 1651 -> 1664 (multiple of 64); context: max_position_embeddings.
    # opt prompt: one tile (67) + 128 text = 195 -> 256; opt past: 256 + 32.
    assert limits == EngineLimits(max_tiles=17, max_prompt=1664, max_context=8192, opt_tiles=1, opt_prompt=256,
                                  opt_past=288)


@pytest.mark.parametrize("shape, tokens, tiles, expected_prompt", [
    (SMOLVLM, 64, 1, 640),  # single tile: 67 + 512 = 579 -> 640
    (LLAVA_7B, 576, 1, 1152),  # llava-1.5 at 336 px: 579 + 512 = 1091 -> 1152
    (DecoderShape(2, 2, 16, 64, 600, 512), 4, 5, 256),  # tiny: 547 -> 576, capped at half of 512
])
def test_default_max_prompt(shape, tokens, tiles, expected_prompt):
    assert plan_limits(shape, tokens, tiles).max_prompt == expected_prompt


@pytest.mark.parametrize("kwargs, flag", [
    (dict(max_tiles=17, max_context=9000), "--max-context"),  # beyond max_position_embeddings
    (dict(max_tiles=17, max_prompt=1000), "--max-prompt"),  # 17 x 64 = 1088 image tokens do not fit
    (dict(max_tiles=1, max_prompt=8192), "--max-prompt"),  # no room for an answer
    (dict(max_tiles=0), "--max-tiles"),
])
def test_limits_that_cannot_work_name_the_flag(kwargs, flag):
    with pytest.raises(EdgeVitError, match=flag):
        plan_limits(SMOLVLM, 64, **kwargs)


# ---------------------------------------------------------------- profiles


def test_vision_profile():
    profile = vision_profile(1, 1, 17, 512)
    assert dict(profile.shapes) == {"pixel_values": ShapeRange((1, 3, 512, 512), (1, 3, 512, 512), (17, 3, 512, 512))}
    with pytest.raises(EdgeVitError):
        vision_profile(2, 1, 4, 512)


def test_embed_profiles():
    prefill, decode = embed_profiles(max_prompt=1664, opt_prompt=256)
    assert prefill.shapes["input_ids"] == ShapeRange((1, 1), (1, 256), (1, 1664))
    assert decode.shapes["input_ids"] == ShapeRange((1, 1), (1, 1), (1, 1))


def test_smolvlm_decoder_profiles():
    prefill, decode = decoder_profiles(SMOLVLM, max_prompt=1664, max_context=8192, opt_prompt=256, opt_past=288)
    names = set(io_spec.decoder_inputs(30))
    assert set(prefill.shapes) == set(decode.shapes) == names and len(names) == 3 + 60
    # prefill: S 1/256/1664, past 0/0/(8192 - 1664 = 6528), mask = S + past
    assert prefill.shapes["inputs_embeds"] == ShapeRange((1, 1, 576), (1, 256, 576), (1, 1664, 576))
    assert prefill.shapes["position_ids"] == ShapeRange((1, 1), (1, 256), (1, 1664))
    assert prefill.shapes["attention_mask"] == ShapeRange((1, 1), (1, 256), (1, 8192))
    assert prefill.shapes["past_key_values.29.value"] == ShapeRange((1, 3, 0, 64), (1, 3, 0, 64), (1, 3, 6528, 64))
    # decode: S = 1, past 1/288/8191, mask 2/289/8192
    assert decode.shapes["inputs_embeds"] == ShapeRange((1, 1, 576), (1, 1, 576), (1, 1, 576))
    assert decode.shapes["attention_mask"] == ShapeRange((1, 2), (1, 289), (1, 8192))
    assert decode.shapes["past_key_values.0.key"] == ShapeRange((1, 3, 1, 64), (1, 3, 288, 64), (1, 3, 8191, 64))


def test_runtime_shapes_fall_in_the_right_profile():
    prefill, decode = decoder_profiles(SMOLVLM, max_prompt=1664, max_context=8192)
    profiles = {PREFILL: prefill, DECODE: decode}
    for past, seq, expected in [(0, 100, PREFILL), (0, 1664, PREFILL), (0, 1, PREFILL), (100, 1, DECODE),
                                (8191, 1, DECODE)]:
        shapes = decoder_step_shapes(SMOLVLM, past, seq)
        assert shapes["past_key_values.3.key"] == (1, 3, past, 64) and shapes["attention_mask"] == (1, past + seq)
        assert decoder_profile_for(past, seq) == expected
        assert profiles[expected].contains(shapes)
    assert not prefill.contains(decoder_step_shapes(SMOLVLM, 0, 1665))  # over --max-prompt
    assert not decode.contains(decoder_step_shapes(SMOLVLM, 8192, 1))  # over --max-context
    assert not decode.contains(decoder_step_shapes(SMOLVLM, 0, 1))


def test_kv_buffers_alternate():
    # call 0 (prefill) reads the empty slot 0 and writes slot 1; call 1 reads what call 0 wrote, and so on.
    assert [kv_slots(step) for step in range(4)] == [(0, 1), (1, 0), (0, 1), (1, 0)]


def test_shape_range_checks_its_order():
    with pytest.raises(ValueError):
        ShapeRange((1, 5), (1, 4), (1, 8))
    with pytest.raises(ValueError):
        ShapeRange((1,), (1, 1), (1, 1))


# ---------------------------------------------------------------- memory


def test_kv_cache_bytes_smolvlm():
    # 2 (K, V) x 30 layers x 3 heads x 64 dims = 11,520 values per token
    assert kv_cache_bytes(SMOLVLM, 1, 2) == 23_040  # fp16: 22.5 KiB per token
    assert kv_cache_bytes(SMOLVLM, 8192, 2) == 188_743_680  # 180 MiB at 8192 tokens
    assert kv_cache_bytes(SMOLVLM, 8192, 4) == 377_487_360  # fp32: 360 MiB
    assert kv_cache_bytes(LLAVA_7B, 4096, 2) == 2 * 1024**3  # 512 KiB per token, 2 GiB at 4096


def test_memory_estimate_smolvlm():
    limits = plan_limits(SMOLVLM, 64, 17)
    memory = engine_memory_estimate(SMOLVLM, limits, tokens_per_tile=64, image_size=512, kv_dtype_bytes=2)
    assert memory.kv_bytes_per_token == 23_040
    assert memory.kv_cache_bytes == 188_743_680
    assert memory.kv_buffers_bytes == 377_487_360  # two alternating caches: 360 MiB
    assert memory.logits_bytes == 49_280 * 4  # last position only: 192.5 KiB
    assert memory.logits_all_positions_bytes == 1664 * 49_280 * 4 == 328_007_680  # avoided: 312.8 MiB
    io = (17 * 3 * 512 * 512 * 4  # pixels 53,477,376
          + 17 * 64 * 576 * 4  # image features 2,506,752
          + 2 * 1664 * 576 * 4  # embeddings 7,667,712
          + 1664 * 8 + 2 * 8192 * 8  # ids, mask, positions
          + 49_280 * 4)
    assert memory.io_buffers_bytes == io == 63_993_344
    assert memory.total_bytes == 377_487_360 + 63_993_344


def test_plan_from_manifest_smolvlm():
    plan = plan_from_manifest(SMOLVLM_MANIFEST, {"size": {"longest_edge": 2048}})
    assert plan.limits.max_tiles == 17 and plan.limits.max_prompt == 1664 and plan.limits.max_context == 8192
    assert plan.memory.weights_bytes == (400_000_000 + 113_541_120 + 540_000_000) // 2  # fp16 engines
    assert [p.name for p in plan.profiles[io_spec.DECODER]] == ["prefill", "decode"]
    assert plan.profiles[io_spec.VISION_ENCODER][0].shapes["pixel_values"].max == (17, 3, 512, 512)
    text = "\n".join(plan.lines())
    assert "360.0 MiB for the two alternating buffers" in text and "past 1/288/8191" in text
    small = plan_from_manifest(SMOLVLM_MANIFEST, {"size": {"longest_edge": 2048}}, max_tiles=1, max_context=2048,
                               fp16=False)
    assert small.limits.max_prompt == 640 and small.memory.kv_buffers_bytes == 2 * kv_cache_bytes(SMOLVLM, 2048, 4)
    with pytest.raises(EdgeVitError, match="lacks"):
        plan_from_manifest({"tiling": {}}, {})


# ---------------------------------------------------------------- precision


def test_network_plan_tensorrt10():
    fp16 = network_plan("10.3.0", fp16=True)
    assert not fp16.strongly_typed and fp16.flags == ("FP16", "PREFER_PRECISION_CONSTRAINTS")
    assert fp16.pin_norms_fp32 and fp16.kv_dtype == "float16"
    assert fp16.clear_flags == ()
    fp32 = network_plan("10.13.2", fp16=False)
    assert fp32.flags == () and fp32.kv_dtype == "float32" and not fp32.pin_norms_fp32
    assert fp32.clear_flags == ("TF32",)  # true fp32, comparable with ONNX Runtime
    assert "INT8" in network_plan("10.3.0", fp16=True, int8=True, graph_has_qdq=True).flags
    assert "INT8" not in network_plan("10.3.0", fp16=True, int8=True, graph_has_qdq=False).flags  # unquantized graph
    assert "FP8" in network_plan("10.3.0", fp16=True, fp8=True, graph_has_qdq=True, compute_capability=(8, 9)).flags


@pytest.mark.parametrize("version, kwargs, message", [
    ("10.3.0", dict(fp16=True, fp8=True, compute_capability=(8, 7)), "sm_87"),  # Jetson Orin has no FP8
    ("11.0.1", dict(fp16=True), "--no-fp16"),  # strongly typed only
    ("8.6.1", dict(fp16=True), "TensorRT 10"),
])
def test_network_plan_refusals(version, kwargs, message):
    with pytest.raises(EdgeVitError, match=message):
        network_plan(version, **kwargs)


def test_tensorrt11_builds_strongly_typed_fp32():
    plan = network_plan("11.0.1", fp16=False)
    assert plan.strongly_typed and plan.flags == () and plan.kv_dtype == "float32"


def test_int8_needs_qdq_graphs():
    with pytest.raises(EdgeVitError, match="QuantizeLinear"):
        check_quantized_graphs(True, False, [])
    check_quantized_graphs(True, False, ["decoder_model_merged.onnx"])
    check_quantized_graphs(False, False, [])


@pytest.mark.parametrize("name, expected", [
    ("/model/layers.0/input_layernorm/Pow", True),
    ("/model/layers.12/post_attention_layernorm/ReduceMean", True),
    ("/model/norm/Mul_1", True),
    ("/vision_model/encoder/layers.0/layer_norm1/LayerNormalization", True),
    ("/vision_model/post_layernorm/Add", True),
    ("/model/layers.0/self_attn/q_proj/MatMul", False),
    ("/lm_head/MatMul", False),
    ("/model/layers.0/mlp/act_fn/Sigmoid", False),
    ("/connector/modality_projection/proj/MatMul", False),
])
def test_norm_layers_found_by_name(name, expected):
    assert is_norm_layer(name) is expected


def test_only_float_math_of_norms_is_pinned():
    assert pin_to_fp32("/model/norm/Pow", "ELEMENTWISE", True)
    assert pin_to_fp32("/model/norm/ReduceMean", "REDUCE", True)
    assert not pin_to_fp32("/model/norm/Cast", "CAST", True)
    assert not pin_to_fp32("/model/norm/Constant", "CONSTANT", True)
    assert not pin_to_fp32("/model/norm/Shape", "SHAPE", False)
    assert not pin_to_fp32("/model/layers.0/mlp/down_proj/MatMul", "MATRIX_MULTIPLY", True)


def test_install_hints():
    assert "pip install edge-vit[trt]" in tensorrt_install_hint(jetson=False)
    assert "JetPack" in tensorrt_install_hint(jetson=True) and "pip install" not in tensorrt_install_hint(jetson=True)
    for jetson in (True, False):
        assert "\n" not in tensorrt_install_hint(jetson)


# ---------------------------------------------------------------- the decoder graph TensorRT builds from


@pytest.fixture(scope="module")
def onnx_export(tiny_idefics3, tmp_path_factory):
    from export.onnx_export import export_vlm_onnx

    folder = tmp_path_factory.mktemp("trt-onnx")
    export_vlm_onnx(tiny_idefics3, folder)
    return folder


def _decoder_feeds(rng, past: int, seq: int, kv_dtype=np.float32) -> dict:
    feeds = {
        "inputs_embeds": rng.standard_normal((1, seq, 64)).astype(np.float32),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    for name in io_spec.past_names(2):
        feeds[name] = rng.standard_normal((1, 2, past, 16)).astype(kv_dtype)
    return feeds


def test_prepared_decoder_matches_the_export(onnx_export):
    """Last-token logits and an fp16 KV cache: same last logits as the exported graph (ONNX Runtime, CPU)."""
    import onnx
    import onnxruntime as ort

    from export.trt import prepare_decoder

    source = onnx_export / io_spec.DECODER
    prepared = prepare_decoder(source, num_layers=2, kv_dtype="float16")
    onnx.checker.check_model(prepared)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(prepared.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in ours.get_inputs()} | {o.name: o.type for o in ours.get_outputs()}
    assert types["past_key_values.1.value"] == types["present.0.key"] == "tensor(float16)"
    assert types["inputs_embeds"] == types["logits"] == "tensor(float)"
    rng = np.random.default_rng(0)
    for past, seq, atol in [(0, 9, 1e-5), (9, 1, 2e-3)]:  # prefill (empty cache), then one decode step
        feeds = _decoder_feeds(rng, past, seq)
        expected = ref.run(None, feeds)
        half = {k: v.astype(np.float16) if k.startswith("past") else v for k, v in feeds.items()}
        got = ours.run(None, half)
        assert got[0].shape == (1, 1, 600)
        np.testing.assert_allclose(got[0][0, -1], expected[0][0, -1], atol=atol)
        assert got[1].dtype == np.float16 and got[1].shape == (1, 2, past + seq, 16)
        np.testing.assert_allclose(got[1].astype(np.float32), expected[1], atol=2e-3)


def test_last_token_logits_without_a_matmul_producer():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.trt import last_token_logits

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 5])],
    )
    model = last_token_logits(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9))
    onnx.checker.check_model(model)
    x = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, x[:, -1:])


def test_plan_build_reads_the_export(onnx_export):
    from export.trt import plan_build

    plan = plan_build(onnx_export)
    # tiny Idefics3: 64 px tiles (4 tokens), processor longest edge 128 -> 2x2 + 1 tiles; 512 positions
    assert (plan.limits.max_tiles, plan.limits.max_prompt, plan.limits.max_context) == (5, 256, 512)
    assert plan.shape == DecoderShape(2, 2, 16, 64, 600, 512)


def test_int8_without_quantized_graphs_fails_before_tensorrt(onnx_export, tmp_path):
    from export.trt import TrtBuildOptions, build_trt_engines

    with pytest.raises(EdgeVitError, match="QuantizeLinear"):
        build_trt_engines(onnx_export, tmp_path / "engines", TrtBuildOptions(int8=True))


# ---------------------------------------------------------------- CLI and runtime guards


def test_cli_plan_only_needs_no_tensorrt(onnx_export, tmp_path):
    result = run_cli("export", "trt", "--onnx-dir", str(onnx_export), "--out", str(tmp_path / "e"), "--plan-only",
                     "--max-context", "384")
    assert result.returncode == 0, result.stderr
    assert "profile 1 (decode)" in result.stdout and "context <= 384" in result.stdout
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_says_what_to_install(onnx_export, tmp_path):
    result = run_cli("export", "trt", "--onnx-dir", str(onnx_export), "--out", str(tmp_path / "e"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install edge-vit[trt]" in lines[0], result.stderr
    assert result.stdout == ""


def test_cli_rejects_a_folder_without_graphs(tmp_path):
    result = run_cli("export", "trt", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "e"), "--plan-only")
    assert result.returncode == 2 and "edge-vit export onnx" in result.stderr


def test_cli_rejects_impossible_limits(onnx_export, tmp_path):
    result = run_cli("export", "trt", "--onnx-dir", str(onnx_export), "--out", str(tmp_path / "e"), "--plan-only",
                     "--max-prompt", "600")
    assert result.returncode == 2 and "--max-prompt" in result.stderr


def test_trt_backend_guards(onnx_export, tmp_path):
    from edge_vit.vlm import Backend, load_vlm
    from edge_vit.vlm.trt_backend import TrtVLM, check_compatible

    with pytest.raises(EdgeVitError, match="--device cuda"):
        load_vlm(str(tmp_path), Backend.TRT, device="cpu")
    with pytest.raises(ModelLoadError, match="edge-vit export trt"):
        TrtVLM.load(onnx_export)  # an ONNX folder is not an engine folder
    folder = tmp_path / "engines"
    folder.mkdir()
    for name in ENGINE_FILES.values():
        (folder / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="did not finish"):
        TrtVLM.load(folder)
    manifest = {"tensorrt": "10.3.0", "device": {"name": "Orin", "compute_capability": [8, 7]}}
    check_compatible(manifest, "10.3.0", "Orin", (8, 7))
    with pytest.raises(ModelLoadError, match="rebuild"):
        check_compatible(manifest, "10.3.0", "NVIDIA H100", (9, 0))
    with pytest.raises(ModelLoadError, match="rebuild"):
        check_compatible(manifest, "10.7.0", "Orin", (8, 7))


def test_trt_backend_imports_without_torch_or_tensorrt():
    import subprocess
    import sys

    code = ("import sys, edge_vit.vlm.trt_backend, export.trt, export.trt_profiles, export.yolo; "
            "print('torch' in sys.modules, 'tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- the builder and runtime against a stand-in


def _fake_tensorrt():
    """The TensorRT API subset edge-vit calls, backed by ONNX Runtime on host pointers.

    It checks the Python side of ``export.trt`` and ``TrtVLM`` on CPU: profiles handed to the builder,
    buffers, shapes, 256-byte aligned addresses, the alternating KV buffers and the generate loop. Real
    TensorRT (parsing, kernels, empty tensors) is tested by tests/test_trt_gpu.py on a GPU.
    """
    import ctypes
    import enum
    import pickle
    import types

    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.calls = []
    dtypes = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("HALF", np.float16),
              "tensor(int64)": ("INT64", np.int64)}
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT64")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 FP8 TF32 PREFER_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC USER_MANAGED")
    layer_types = {"Pow": "ELEMENTWISE", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE",
                   "Sqrt": "UNARY", "ReduceMean": "REDUCE", "Cast": "CAST", "MatMul": "MATRIX_MULTIPLY"}
    trt.LayerType = enum.Enum("LayerType", "ELEMENTWISE UNARY REDUCE CAST MATRIX_MULTIPLY OTHER")

    class Tensor:
        def __init__(self, name):
            self.name, self.dtype = name, trt.DataType.FLOAT

    class Layer:
        def __init__(self, node):
            self.name, self.precision = node.name, None
            self.type = trt.LayerType[layer_types.get(node.op_type, "OTHER")]
            self.outputs = [Tensor(o) for o in node.output]
            self.num_outputs = len(self.outputs)

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dtype):
            self.outputs[i].dtype = dtype

    class Network:
        def load(self, data: bytes):
            self.model = onnx.load_from_string(data)
            self.inputs = [i.name for i in self.model.graph.input]
            self.layers = [Layer(n) for n in self.model.graph.node]
            self.num_inputs, self.num_layers = len(self.inputs), len(self.layers)

        def get_input(self, i):
            return Tensor(self.inputs[i])

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data, path=None):
            self.network.load(data)
            return True

        def parse_from_file(self, path):
            self.network.load(Path(path).read_bytes())
            return True

    class Profile(dict):
        def set_shape(self, name, min, opt, max):
            self[name] = (tuple(min), tuple(opt), tuple(max))

    class Config:
        def __init__(self):
            self.flags, self.profiles = set(), []

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: memoryview(bytes(data) + b"t"))

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def add_optimization_profile(self, profile):
            self.profiles.append(dict(profile))
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            pinned = sum(layer.precision is not None for layer in network.layers)
            trt.calls.append(("build", sorted(config.flags), pinned))
            return pickle.dumps({"onnx": network.model.SerializeToString(), "profiles": config.profiles})

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.profile, self.memory = engine, {}, {}, 0, None

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

        def set_optimization_profile_async(self, profile, stream):
            self.profile = profile

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profiles[self.profile][name]
            self.shapes[name] = tuple(shape)
            return len(shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shape, hi))

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return ptr % 64 == 0  # host allocations are 64-byte aligned; CUDA's 256 is checked on offsets below

        def execute_async_v3(self, stream):
            feeds = {}
            for name, dtype in self.engine.inputs:
                shape, n = self.shapes[name], int(np.prod(self.shapes[name]))
                raw = (ctypes.c_byte * (n * np.dtype(dtype).itemsize)).from_address(self.addresses[name])
                feeds[name] = np.frombuffer(raw, dtype=dtype, count=n).reshape(shape).copy()
            outputs = self.engine.session.run([n for n, _ in self.engine.outputs], feeds)
            for (name, dtype), value in zip(self.engine.outputs, outputs):
                value = np.ascontiguousarray(value, dtype=dtype)
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            trt.calls.append(("run", self.profile))
            return True

    class Engine:
        def __init__(self, blob):
            self.session = ort.InferenceSession(blob["onnx"], providers=["CPUExecutionProvider"])
            self.profiles = blob["profiles"]
            self.inputs = [(i.name, dtypes[i.type][1]) for i in self.session.get_inputs()]
            self.outputs = [(o.name, dtypes[o.type][1]) for o in self.session.get_outputs()]
            self.io = [(i.name, trt.TensorIOMode.INPUT, dtypes[i.type][0]) for i in self.session.get_inputs()] + \
                      [(o.name, trt.TensorIOMode.OUTPUT, dtypes[o.type][0]) for o in self.session.get_outputs()]
            self.num_io_tensors, self.num_optimization_profiles = len(self.io), len(self.profiles)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return next(mode for n, mode, _ in self.io if n == name)

        def get_tensor_dtype(self, name):
            return trt.DataType[next(t for n, _, t in self.io if n == name)]

        def get_tensor_profile_shape(self, name, profile):
            return [list(s) for s in self.profiles[profile][name]]

        def get_device_memory_size_for_profile_v2(self, profile):
            return 4096

        def create_execution_context(self, strategy=None):
            return Context(self)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: Engine(pickle.loads(data))})
    return trt


@pytest.mark.parametrize("fp16", [False, True])
def test_builder_and_runtime_logic_with_a_stand_in(onnx_export, tmp_path, monkeypatch, fp16):
    """Build through the stand-in, then TrtVLM on CPU memory gives ONNX Runtime's greedy tokens (5 tiles)."""
    import contextlib
    import sys
    import types

    import torch

    import export.trt
    from edge_vit.vlm import Backend, GenerationConfig, TilingPolicy, load_vlm
    from edge_vit.vlm.trt_backend import TrtVLM, check_trt_folder
    from export.trt import TrtBuildOptions, build_trt_engines

    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(export.trt, "cuda_capability", lambda: ("Stand-in GPU", (8, 7)))
    stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    result = build_trt_engines(onnx_export, tmp_path / "engines",
                               TrtBuildOptions(fp16=fp16, max_context=385, workspace_gb=1))
    builds = [c for c in trt.calls if c[0] == "build"]
    expected_flags = ["FP16", "PREFER_PRECISION_CONSTRAINTS"] if fp16 else []
    assert [flags for _, flags, _ in builds] == [expected_flags] * 3
    assert builds[2][2] > 0 if fp16 else builds[2][2] == 0  # decoder norm layers pinned to fp32
    assert result.manifest["kv_dtype"] == ("float16" if fp16 else "float32")
    assert (tmp_path / "engines" / "timing.cache").read_bytes() == b"t"
    assert (tmp_path / "engines" / "tokenizer.json").is_file()

    from transformers import AutoConfig, AutoProcessor

    folder, manifest = check_trt_folder(result.out_dir)
    vlm = TrtVLM(folder, manifest, AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder),
                 device="cpu", tiling=TilingPolicy.SPLIT)
    # 385 tokens x 2 heads x 16 dims = 12,320 values, padded to 12,352 (fp32) / 12,416 (fp16): aligned addresses
    assert tuple(vlm.kv.shape) == (2, 4, 12416 if fp16 else 12352) and vlm.max_context == 385
    offsets = [ptr - vlm.kv.data_ptr() for slot in vlm._kv_addresses for ptr in slot.values()]
    assert len(set(offsets)) == 8 and all(offset % 256 == 0 for offset in offsets)
    onnx_vlm = load_vlm(str(onnx_export), Backend.ONNX, threads=1, tiling=TilingPolicy.SPLIT)
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    trt.calls.clear()
    steps = list(vlm.generate(frame, "How many circles are there?", cfg))
    tokens = [s.token_id for s in steps[:-1]]
    assert steps[-1].stats.tiles == 5 and steps[-1].stats.decode_steps == 15
    assert tokens == [s.token_id for s in onnx_vlm.generate(frame, "How many circles are there?", cfg) if not s.done]
    # prefill: vision, embedding and decoder on profile 0; each decode step: embedding and decoder on profile 1
    assert trt.calls.count(("run", 0)) == 3 and trt.calls.count(("run", 1)) == 2 * 15
    assert [s.token_id for s in vlm.generate(frame, "How many circles are there?", cfg)][:-1] == tokens
