"""TensorRT engines from an `edge-vit export onnx` folder: one engine per graph, built with the TensorRT Python API.

``build_trt_engines(onnx_dir, out_dir, options)`` reads the export's manifest, derives the
optimization profiles and memory plan from the model config (``export.trt_profiles``, pure and
tested without a GPU), prepares the decoder graph, parses each graph with ``trt.OnnxParser``,
adds the profiles, sets the precision flags, loads and saves a timing cache, and writes
``*.engine`` files, the processor/tokenizer files and ``edge_vit_trt.json`` (last: its presence
marks a complete build) into ``out_dir``. ``edge_vit.vlm.trt_backend.TrtVLM`` loads that folder.

Decoder preparation (ONNX to ONNX, checked on CPU with ONNX Runtime):
- ``logits`` keeps only the last position (a Slice before ``lm_head``): prefill then neither
  computes nor stores [prompt, vocab] logits (313 MiB at SmolVLM's 1664-token max prompt).
- with --fp16, the KV cache inputs/outputs become float16 (Casts at the graph edge): half the
  cache memory and bandwidth, the math inside stays as the builder decides.

Engines are specific to the GPU model and TensorRT version they were built with. ``tensorrt``
is imported only inside the functions that need it; without it the CLI prints one line saying
what to install.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_vit.errors import EdgeVitError, ModelLoadError
from export import io_spec
from export.trt_profiles import (
    ENGINE_FILES,
    TRT_MANIFEST,
    TRT_MANIFEST_VERSION,
    NetworkPlan,
    Profile,
    TrtPlan,
    check_quantized_graphs,
    network_plan,
    pin_to_fp32,
    plan_from_manifest,
    tensorrt_install_hint,
)

log = logging.getLogger(__name__)

# ONNX Runtime's dynamic quantization writes these; TensorRT's parser does not take them (it takes Q/DQ).
UNSUPPORTED_QUANT_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv"}
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")  # processor, tokenizer, configs
INT64_MAX = 2**63 - 1
LAST_TOKEN_SLICE = "/edge_vit/last_token_slice"  # the node last_token_logits inserts


@dataclass(frozen=True)
class TrtBuildOptions:
    fp16: bool = True
    int8: bool = False
    fp8: bool = False
    max_tiles: int | None = None  # default: the most tiles the export's processor makes
    max_prompt: int | None = None  # default: every tile + 512 text tokens (at most half the context)
    max_context: int | None = None  # default: the model's max_position_embeddings
    workspace_gb: float | None = None  # TensorRT's scratch limit while building; None: TensorRT decides
    timing_cache: Path | None = None  # default: OUT/timing.cache

    def __post_init__(self) -> None:
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise EdgeVitError(f"--workspace-gb must be > 0, got {self.workspace_gb}")


@dataclass(frozen=True)
class TrtBuildResult:
    out_dir: Path
    engine_bytes: dict[str, int]
    seconds: float
    manifest: dict = field(repr=False)


# ---------------------------------------------------------------- environment


def is_jetson() -> bool:
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def import_tensorrt():
    """The tensorrt module, or a one-line user error saying what to install (exit code 2 in the CLI)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgeVitError(tensorrt_install_hint(is_jetson())) from None
    return trt


def cuda_capability() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of the current CUDA device; a user error without one."""
    import torch

    if not torch.cuda.is_available():
        raise EdgeVitError("building or running TensorRT engines needs an NVIDIA GPU with CUDA; none is visible here")
    index = torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


# ---------------------------------------------------------------- the ONNX folder


def read_onnx_export(onnx_dir: str | Path) -> tuple[Path, dict, dict]:
    """(folder, manifest, preprocessor config) of a complete `edge-vit export onnx` folder; user errors otherwise."""
    path = Path(onnx_dir)
    missing = [name for name in io_spec.GRAPH_FILES if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise ModelLoadError(
            f"'{onnx_dir}' has no exported ONNX graphs ({', '.join(missing or io_spec.GRAPH_FILES)}); "
            f"run `edge-vit export onnx --vlm MODEL --out {onnx_dir}` first"
        )
    manifest_file = path / io_spec.MANIFEST
    if not manifest_file.is_file():
        raise ModelLoadError(f"'{onnx_dir}' has graphs but no {io_spec.MANIFEST}: the ONNX export did not finish")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{manifest_file} is not valid JSON ({exc})") from None
    preprocessor: dict = {}
    pre_file = path / "preprocessor_config.json"
    if pre_file.is_file():
        preprocessor = json.loads(pre_file.read_text(encoding="utf-8"))
    return path, manifest, preprocessor


def plan_build(onnx_dir: str | Path, options: TrtBuildOptions = TrtBuildOptions()) -> TrtPlan:
    """The profiles and memory plan for a folder; milliseconds, no TensorRT needed."""
    _, manifest, preprocessor = read_onnx_export(onnx_dir)
    return plan_from_manifest(manifest, preprocessor, max_tiles=options.max_tiles, max_prompt=options.max_prompt,
                              max_context=options.max_context, fp16=options.fp16)


def graph_op_types(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def check_graph_ops(name: str, ops: set[str]) -> bool:
    """Whether a graph carries Q/DQ nodes; a user error for quantized ops TensorRT cannot parse."""
    bad = sorted(ops & UNSUPPORTED_QUANT_OPS)
    if bad:
        raise EdgeVitError(
            f"{name} holds {', '.join(bad)} (ONNX Runtime dynamic quantization), which TensorRT does not parse; "
            f"build from the fp32 export or a Q/DQ-quantized one"
        )
    return bool(ops & QDQ_OPS)


# ---------------------------------------------------------------- decoder graph preparation (pure ONNX)


def last_token_logits(model, positions: int = 1):
    """Make ``logits`` [B, S, V] into [B, 1, V] (the last position) by slicing the hidden states before lm_head.

    ``positions`` > 1 keeps the last that many instead ([B, min(S, positions), V]): what prompt lookup
    decoding needs to verify a draft in one pass, for the price of one row on a decode step.

    Falls back to slicing the logits when the producer is not a MatMul. Works on a model loaded
    without external data (initializers are not touched). Returns the same ModelProto, changed; a
    graph already sliced is returned as it is. Used for TensorRT engines and by ``export.optimize``.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    if "logits" not in producers:
        raise ValueError("the decoder graph has no 'logits' output")
    if any(node.name == LAST_TOKEN_SLICE for node in graph.node):
        return model
    index = producers["logits"]
    node = graph.node[index]
    consts = {
        "last_token_starts": np.array([-positions], dtype=np.int64),
        "last_token_ends": np.array([INT64_MAX], dtype=np.int64),
        "last_token_axes": np.array([1], dtype=np.int64),
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    initializers = {init.name for init in graph.initializer}
    if node.op_type == "MatMul" and node.input[0] not in initializers:
        hidden = node.input[0]  # [B, S, D]
        sliced = f"{hidden}_last_token"
        graph.node.insert(index, helper.make_node("Slice", [hidden, *consts], [sliced], name=LAST_TOKEN_SLICE))
        node.input[0] = sliced
    else:
        node.output[list(node.output).index("logits")] = "logits_all_positions"
        graph.node.insert(index + 1, helper.make_node("Slice", ["logits_all_positions", *consts], ["logits"],
                                                      name=LAST_TOKEN_SLICE))
    for output in graph.output:
        if output.name == "logits":
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            if positions == 1:
                dim.dim_value = 1
            else:
                dim.dim_param = "logits_positions"
    _drop_value_info(graph, {"logits"})
    return model


def kv_cache_dtype(model, num_layers: int, dtype: str = "float16"):
    """Give the KV cache inputs/outputs ``dtype`` with Casts at the graph edge (the math inside is unchanged)."""
    from onnx import TensorProto, helper

    if dtype == "float32":
        return model
    if dtype != "float16":
        raise ValueError(f"kv cache dtype must be float16 or float32, got {dtype}")
    graph = model.graph
    half, full = TensorProto.FLOAT16, TensorProto.FLOAT
    past = set(io_spec.past_names(num_layers))
    present = set(io_spec.present_names(num_layers))
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    missing = sorted((past - set(inputs)) | (present - set(outputs)))
    if missing:
        raise ValueError(f"the decoder graph lacks KV cache tensors: {missing[:3]}")
    renamed = {name: f"{name}_fp32" for name in past | present}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for i, name in enumerate(node.output):
            if name in present:
                node.output[i] = renamed[name]
    casts_in = [helper.make_node("Cast", [name], [renamed[name]], to=full, name=f"/trt/cast_in/{name}")
                for name in io_spec.past_names(num_layers)]
    casts_out = [helper.make_node("Cast", [renamed[name]], [name], to=half, name=f"/trt/cast_out/{name}")
                 for name in io_spec.present_names(num_layers)]
    for offset, cast in enumerate(casts_in):
        graph.node.insert(offset, cast)
    graph.node.extend(casts_out)
    for name in past:
        inputs[name].type.tensor_type.elem_type = half
    for name in present:
        outputs[name].type.tensor_type.elem_type = half
    _drop_value_info(graph, set(renamed) | set(renamed.values()))
    return model


def _drop_value_info(graph, names: set[str]) -> None:
    keep = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def prepare_decoder(path: Path, num_layers: int, kv_dtype: str):
    """The decoder graph (without external weights loaded) with last-token logits and the KV cache type."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model = last_token_logits(model)
    return kv_cache_dtype(model, num_layers, kv_dtype)


# ---------------------------------------------------------------- building


def _add_profiles(trt, builder, config, network, profiles: tuple[Profile, ...]) -> None:
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        if set(profile.shapes) != inputs:
            raise RuntimeError(f"profile '{profile.name}' covers {sorted(set(profile.shapes) ^ inputs)[:3]} "
                               f"differently from the network's inputs")
        trt_profile = builder.create_optimization_profile()
        for name, rng in profile.shapes.items():
            trt_profile.set_shape(name, min=rng.min, opt=rng.opt, max=rng.max)
        if config.add_optimization_profile(trt_profile) < 0:
            raise RuntimeError(f"TensorRT rejected optimization profile '{profile.name}'")


def _pin_norms(trt, network) -> int:
    floats = {trt.DataType.FLOAT, trt.DataType.HALF}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        float_out = layer.num_outputs > 0 and layer.get_output(0).dtype in floats
        if pin_to_fp32(layer.name, layer.type.name, float_out):
            layer.precision = trt.DataType.FLOAT
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.DataType.FLOAT)
            pinned += 1
    return pinned


def build_engine(trt, logger, source: Path, profiles: tuple[Profile, ...], plan: NetworkPlan, *,
                 model_bytes: bytes | None = None, workspace_gb: float | None = None, timing_cache=None) -> bytes:
    """Parse one graph (from ``model_bytes`` if given, external weights next to ``source``) and build its engine."""
    builder = trt.Builder(logger)
    flags = 0  # explicit batch is the only mode in TensorRT 10
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model_bytes, str(source)) if model_bytes is not None else parser.parse_from_file(str(source))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeVitError(f"TensorRT could not parse {source.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if plan.pin_norms_fp32:
        log.info("%s: %d normalization layers pinned to fp32", source.name, _pin_norms(trt, network))
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    _add_profiles(trt, builder, config, network, profiles)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeVitError(f"TensorRT could not build an engine from {source.name} (see the TensorRT log above); "
                           f"a lower --max-prompt/--max-context or a larger --workspace-gb may help")
    return bytes(serialized)


def build_trt_engines(onnx_dir: str | Path, out_dir: str | Path,
                      options: TrtBuildOptions = TrtBuildOptions()) -> TrtBuildResult:
    """Build the three engines of an ONNX export into ``out_dir`` (see the module docstring)."""
    src, onnx_manifest, preprocessor = read_onnx_export(onnx_dir)
    plan = plan_from_manifest(onnx_manifest, preprocessor, max_tiles=options.max_tiles,
                              max_prompt=options.max_prompt, max_context=options.max_context, fp16=options.fp16)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"--out '{out}' is a file; give a folder for the engines")
    if out.resolve() == src.resolve():
        raise EdgeVitError("--out must be a different folder than --onnx-dir")
    qdq = {graph: check_graph_ops(graph, graph_op_types(src / graph)) for graph in io_spec.GRAPH_FILES}
    check_quantized_graphs(options.int8, options.fp8, [g for g, has in qdq.items() if has])
    trt = import_tensorrt()
    gpu, capability = cuda_capability()
    plans = {graph: network_plan(trt.__version__, fp16=options.fp16, int8=options.int8, fp8=options.fp8,
                                 graph_has_qdq=qdq[graph], compute_capability=capability)
             for graph in io_spec.GRAPH_FILES}

    out.mkdir(parents=True, exist_ok=True)
    (out / TRT_MANIFEST).unlink(missing_ok=True)  # written last: its presence marks a complete build
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(options.timing_cache) if options.timing_cache else out / "timing.cache"
    cache_config = trt.Builder(logger).create_builder_config()
    timing_cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    engine_bytes: dict[str, int] = {}
    for graph in io_spec.GRAPH_FILES:
        t = time.perf_counter()
        model_bytes = None
        if graph == io_spec.DECODER:
            model_bytes = prepare_decoder(src / graph, plan.shape.num_layers, plans[graph].kv_dtype).SerializeToString()
        engine = build_engine(trt, logger, src / graph, plan.profiles[graph], plans[graph], model_bytes=model_bytes,
                              workspace_gb=options.workspace_gb, timing_cache=timing_cache)
        (out / ENGINE_FILES[graph]).write_bytes(engine)
        engine_bytes[ENGINE_FILES[graph]] = len(engine)
        seconds[graph] = round(time.perf_counter() - t, 2)
        log.info("built %s in %.1f s", ENGINE_FILES[graph], seconds[graph])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(timing_cache.serialize()))

    for item in src.iterdir():
        if item.is_file() and item.suffix in SUPPORT_SUFFIXES and item.name != io_spec.MANIFEST:
            shutil.copy2(item, out / item.name)
    manifest = _manifest(trt, plan, plans, options, src, onnx_manifest, gpu, capability, seconds, engine_bytes)
    (out / TRT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return TrtBuildResult(out_dir=out, engine_bytes=engine_bytes, seconds=time.perf_counter() - t0, manifest=manifest)


def _manifest(trt, plan: TrtPlan, plans: dict[str, NetworkPlan], options: TrtBuildOptions, src: Path,
              onnx_manifest: dict, gpu: str, capability: tuple[int, int], seconds: dict, engine_bytes: dict) -> dict:
    return {
        "manifest_version": TRT_MANIFEST_VERSION,
        "tensorrt": trt.__version__,
        "device": {"name": gpu, "compute_capability": list(capability)},
        "engines": dict(ENGINE_FILES),
        "engine_bytes": engine_bytes,
        "precision": {"fp16": options.fp16, "int8": options.int8, "fp8": options.fp8,
                      "networks": {graph: asdict(p) for graph, p in plans.items()}},
        "kv_dtype": plans[io_spec.DECODER].kv_dtype,
        "logits": "last",
        "limits": asdict(plan.limits),
        "decoder": asdict(plan.shape),
        "tiling": {"tile_size": plan.tile_size, "tokens_per_tile": plan.tokens_per_tile},
        "profiles": {ENGINE_FILES[g]: [p.to_json() for p in ps] for g, ps in plan.profiles.items()},
        "memory_estimate": asdict(plan.memory),
        "build_seconds": seconds,
        "source": {"onnx_dir": str(src), "manifest": onnx_manifest},
    }


def describe(result: TrtBuildResult) -> list[str]:
    """Lines the CLI prints after a build."""
    lines = [f"  {name:<30} {size / 1e6:9.1f} MB" for name, size in result.engine_bytes.items()]
    return lines + [f"built in {result.seconds:.1f} s with TensorRT {result.manifest['tensorrt']} on "
                    f"{result.manifest['device']['name']}"]


__all__ = ["TrtBuildOptions", "TrtBuildResult", "build_trt_engines", "plan_build", "import_tensorrt",
           "last_token_logits", "kv_cache_dtype", "prepare_decoder", "read_onnx_export"]
