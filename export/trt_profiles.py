"""TensorRT build plans for the exported VLM graphs: optimization profiles, precision and memory, as pure functions.

Everything the engine builder (``export.trt``) and the runtime (``edge_vit.vlm.trt_backend``)
decide about shapes is computed here from the model's config (``DecoderShape``), the export
manifest (tile size, image tokens per tile) and the user's limits, so it can be checked on a
machine without a GPU. No tensorrt, torch or onnx imports.

The decoder runs in two regimes, and gets one optimization profile for each, on ONE engine
(one copy of the weights; one execution context per profile, sharing scratch memory):

- profile 0, prefill: ``sequence`` 1..max_prompt (opt: one tile plus a typical grounded
  prompt), ``past_sequence`` 0..max_context-max_prompt (0 for a fresh prompt);
- profile 1, decode: ``sequence`` exactly 1, ``past_sequence`` 1..max_context-1.

TensorRT picks kernels at the profile's opt shape, so the decode profile gets GEMV-shaped
kernels for one token instead of prefill's GEMMs. The KV cache follows the graph contract
(``present`` = ``past`` + new, concatenated, [B, H_kv, P+S, Dh]); the runtime keeps two
preallocated buffers per cache tensor sized for ``max_context`` and alternates them (the
present of step t, written with the layout of length P+S, is exactly the past of step t+1),
so nothing is allocated or repacked while decoding.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from edge_vit.errors import EdgeVitError
from export import io_spec
from export.io_spec import DecoderShape

# Files written by `edge-vit export trt` (the graph stem + .engine) and its manifest (written last).
ENGINE_FILES = {graph: graph.replace(".onnx", ".engine") for graph in io_spec.GRAPH_FILES}
TRT_MANIFEST = "edge_vit_trt.json"
TRT_MANIFEST_VERSION = 1

PREFILL, DECODE = 0, 1  # decoder / embedding profile indices

# Prompt budget: the chat template, the grounding text (96 tokens by default) and the question fit in
# 512 tokens; a typical grounded prompt is about 128. Each Idefics3 tile adds markup around its image
# tokens: <fake_token_around_image>, <row_r_col_c> or <global-img>, and a newline at the end of a row.
DEFAULT_TEXT_TOKENS = 512
OPT_TEXT_TOKENS = 128
OPT_NEW_TOKENS = 32  # decode's opt past: a prompt plus the middle of a typical answer
IMAGE_MARKUP_TOKENS = 3
ROUND_TOKENS = 64  # prompt limits are rounded up to a multiple of this


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one input, as TensorRT's ``IOptimizationProfile.set_shape`` takes them."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 0 <= lo <= mid <= hi:
                raise ValueError(f"need 0 <= min <= opt <= max per dimension, got {self.min} {self.opt} {self.max}")

    def contains(self, shape: Iterable[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a shape range for every input of one graph."""

    name: str
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)

    def contains(self, shapes: Mapping[str, Iterable[int]]) -> bool:
        return set(shapes) == set(self.shapes) and all(self.shapes[k].contains(v) for k, v in shapes.items())

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: asdict(v) for k, v in self.shapes.items()}}


def _fixed(*shape: int) -> ShapeRange:
    return ShapeRange(shape, shape, shape)


def vision_profile(tiles_min: int, tiles_opt: int, tiles_max: int, image_size: int, channels: int = 3) -> Profile:
    """vision_encoder: pixel_values [tiles, C, S, S]; only the tile count varies."""
    if not 1 <= tiles_min <= tiles_opt <= tiles_max:
        raise EdgeVitError(f"tiles need 1 <= min <= opt <= max, got {tiles_min}, {tiles_opt}, {tiles_max}")
    return Profile("vision", {
        "pixel_values": ShapeRange((tiles_min, channels, image_size, image_size),
                                   (tiles_opt, channels, image_size, image_size),
                                   (tiles_max, channels, image_size, image_size)),
    })


def embed_profiles(max_prompt: int, opt_prompt: int, batch: int = 1) -> tuple[Profile, Profile]:
    """embed_tokens: input_ids [B, S]; prefill takes the whole prompt, decode one token."""
    return (
        Profile("prefill", {"input_ids": ShapeRange((batch, 1), (batch, opt_prompt), (batch, max_prompt))}),
        Profile("decode", {"input_ids": _fixed(batch, 1)}),
    )


def decoder_profiles(
    shape: DecoderShape,
    max_prompt: int,
    max_context: int,
    batch: int = 1,
    opt_prompt: int | None = None,
    opt_past: int | None = None,
) -> tuple[Profile, Profile]:
    """decoder_model_merged: (prefill, decode) profiles over inputs_embeds, attention_mask, position_ids, past_*.

    Prefill: S in [1, max_prompt], P in [0, max_context - max_prompt] (opt 0: a fresh prompt).
    Decode: S = 1, P in [1, max_context - 1] (opt: a typical prompt plus half an answer).
    attention_mask spans P + S in both.
    """
    if not 1 <= max_prompt < max_context:
        raise EdgeVitError(f"need 1 <= max_prompt < max_context, got {max_prompt} and {max_context}")
    opt_prompt = min(opt_prompt or max_prompt, max_prompt)
    opt_past = min(opt_past or opt_prompt + OPT_NEW_TOKENS, max_context - 1)
    b, h, d, dh = batch, shape.num_kv_heads, shape.hidden_size, shape.head_dim
    prefill_past_max = max_context - max_prompt

    def shapes(seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict[str, ShapeRange]:
        total = tuple(s + p for s, p in zip(seq, past))
        out = {
            "inputs_embeds": ShapeRange(*((b, s, d) for s in seq)),
            "attention_mask": ShapeRange(*((b, t) for t in total)),
            "position_ids": ShapeRange(*((b, s) for s in seq)),
        }
        kv = ShapeRange(*((b, h, p, dh) for p in past))
        out.update({name: kv for name in io_spec.past_names(shape.num_layers)})
        return out

    prefill = Profile("prefill", shapes(seq=(1, opt_prompt, max_prompt), past=(0, 0, prefill_past_max)))
    decode = Profile("decode", shapes(seq=(1, 1, 1), past=(1, opt_past, max_context - 1)))
    return prefill, decode


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class EngineLimits:
    """What the engines accept: tiles per frame, prompt tokens (image included), context (prompt + answer)."""

    max_tiles: int
    max_prompt: int
    max_context: int
    opt_tiles: int = 1
    opt_prompt: int = 0
    opt_past: int = 0


def round_up(n: int, multiple: int = ROUND_TOKENS) -> int:
    return int(math.ceil(n / multiple) * multiple)


def max_tiles_for_processor(longest_edge: int | None, tile_size: int, splits_images: bool) -> int:
    """Most tiles the processor makes from one frame: a (edge/tile)^2 grid plus the global tile, or one."""
    if not splits_images or not longest_edge:
        return 1
    per_side = int(math.ceil(longest_edge / tile_size))
    return per_side * per_side + 1 if per_side > 1 else 1


def prompt_tokens_for(tiles: int, tokens_per_tile: int, text_tokens: int) -> int:
    """Prompt length of ``tiles`` tiles (image tokens and their markup) plus ``text_tokens`` of text."""
    return tiles * (tokens_per_tile + IMAGE_MARKUP_TOKENS) + text_tokens


def plan_limits(
    shape: DecoderShape,
    tokens_per_tile: int,
    max_tiles: int,
    max_prompt: int | None = None,
    max_context: int | None = None,
) -> EngineLimits:
    """Fill in defaults from the model config and check the user's limits; a user error names the flag to change.

    max_context defaults to the model's max_position_embeddings; max_prompt to every tile plus
    ``DEFAULT_TEXT_TOKENS`` of text, rounded up to a multiple of 64 and at most half the context.
    """
    if max_tiles < 1:
        raise EdgeVitError(f"--max-tiles must be >= 1, got {max_tiles}")
    max_context = shape.max_positions if max_context is None else max_context
    if not 2 <= max_context <= shape.max_positions:
        raise EdgeVitError(
            f"--max-context must be in [2, {shape.max_positions}] (the model's max_position_embeddings), "
            f"got {max_context}"
        )
    if max_prompt is None:
        max_prompt = min(round_up(prompt_tokens_for(max_tiles, tokens_per_tile, DEFAULT_TEXT_TOKENS)),
                         max_context // 2)
    image_tokens = max_tiles * tokens_per_tile
    if not image_tokens < max_prompt < max_context:
        raise EdgeVitError(
            f"--max-prompt must hold the image ({max_tiles} tiles x {tokens_per_tile} = {image_tokens} tokens) plus "
            f"text and be below --max-context {max_context}, got {max_prompt}; "
            f"lower --max-tiles or raise --max-context"
        )
    opt_prompt = min(round_up(prompt_tokens_for(1, tokens_per_tile, OPT_TEXT_TOKENS)), max_prompt)
    opt_past = min(opt_prompt + OPT_NEW_TOKENS, max_context - 1)
    return EngineLimits(max_tiles=max_tiles, max_prompt=max_prompt, max_context=max_context,
                        opt_tiles=1, opt_prompt=opt_prompt, opt_past=opt_past)


def engine_profiles(shape: DecoderShape, limits: EngineLimits, image_size: int,
                    channels: int = 3) -> dict[str, tuple[Profile, ...]]:
    """graph file -> its profiles, in the order they are added to the builder config."""
    return {
        io_spec.VISION_ENCODER: (vision_profile(1, limits.opt_tiles, limits.max_tiles, image_size, channels),),
        io_spec.EMBED_TOKENS: embed_profiles(limits.max_prompt, limits.opt_prompt),
        io_spec.DECODER: decoder_profiles(shape, limits.max_prompt, limits.max_context,
                                          opt_prompt=limits.opt_prompt, opt_past=limits.opt_past),
    }


# ---------------------------------------------------------------- runtime shapes


def decoder_step_shapes(shape: DecoderShape, past: int, seq: int, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Input shapes of one decoder call with ``past`` cached tokens and ``seq`` new ones."""
    out = {
        "inputs_embeds": (batch, seq, shape.hidden_size),
        "attention_mask": (batch, past + seq),
        "position_ids": (batch, seq),
    }
    kv = (batch, shape.num_kv_heads, past, shape.head_dim)
    out.update({name: kv for name in io_spec.past_names(shape.num_layers)})
    return out


def decoder_profile_for(past: int, seq: int) -> int:
    """Which profile runs a call: one token after a cache is decode, anything else prefill."""
    return DECODE if seq == 1 and past >= 1 else PREFILL


def aligned_elements(count: int, element_bytes: int, alignment: int = 256) -> int:
    """``count`` rounded up so that consecutive buffers of it stay ``alignment``-byte aligned
    (TensorRT requires 256-byte aligned tensor addresses)."""
    per = max(1, alignment // math.gcd(alignment, element_bytes))
    return int(math.ceil(count / per) * per)


def kv_slots(step: int) -> tuple[int, int]:
    """(past buffer, present buffer) of decoder call ``step`` (0 = prefill): the two buffers alternate."""
    return step % 2, (step + 1) % 2


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory the runtime allocates itself (bytes); TensorRT's own scratch comes on top (<= workspace)."""

    kv_bytes_per_token: int
    kv_cache_bytes: int  # one full cache at max_context
    kv_buffers_bytes: int  # the two alternating buffers the runtime preallocates
    io_buffers_bytes: int  # pixels, image features, embeddings, ids, masks, logits
    logits_bytes: int
    logits_all_positions_bytes: int  # what a full-sequence logits output would need at max_prompt
    weights_bytes: int  # engine weights, estimated from the ONNX graph sizes and the precision
    total_bytes: int

    def lines(self) -> list[str]:
        mib = 1 << 20
        return [
            f"KV cache: {self.kv_bytes_per_token / 1024:.1f} KiB/token, {self.kv_cache_bytes / mib:.1f} MiB at max "
            f"context, {self.kv_buffers_bytes / mib:.1f} MiB for the two alternating buffers",
            f"I/O buffers: {self.io_buffers_bytes / mib:.1f} MiB (last-token logits {self.logits_bytes / 1024:.0f} KiB "
            f"instead of {self.logits_all_positions_bytes / mib:.1f} MiB for every position)",
            f"weights: ~{self.weights_bytes / mib:.0f} MiB; total before TensorRT scratch: "
            f"~{self.total_bytes / mib:.0f} MiB",
        ]


def kv_cache_bytes(shape: DecoderShape, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """Keys and values of every layer for ``tokens`` positions: 2 x L x H_kv x Dh x tokens x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * tokens * dtype_bytes * batch


def engine_memory_estimate(
    shape: DecoderShape,
    limits: EngineLimits,
    tokens_per_tile: int,
    image_size: int,
    kv_dtype_bytes: int,
    weights_bytes: int = 0,
    io_dtype_bytes: int = 4,
    channels: int = 3,
) -> MemoryEstimate:
    """What ``TrtVLM`` preallocates for these limits (batch 1), plus the engines' weights."""
    per_token = kv_cache_bytes(shape, 1, kv_dtype_bytes)
    cache = per_token * limits.max_context
    logits = shape.vocab_size * 4  # last position only, fp32
    io = (
        limits.max_tiles * channels * image_size * image_size * 4  # pixel_values, fp32
        + limits.max_tiles * tokens_per_tile * shape.hidden_size * io_dtype_bytes  # image_features
        + 2 * limits.max_prompt * shape.hidden_size * io_dtype_bytes  # embed output + decoder inputs_embeds
        + limits.max_prompt * 8  # input_ids
        + 2 * limits.max_context * 8  # attention_mask ones + position ids
        + logits
    )
    return MemoryEstimate(
        kv_bytes_per_token=per_token,
        kv_cache_bytes=cache,
        kv_buffers_bytes=2 * cache,
        io_buffers_bytes=io,
        logits_bytes=logits,
        logits_all_positions_bytes=limits.max_prompt * shape.vocab_size * 4,
        weights_bytes=weights_bytes,
        total_bytes=2 * cache + io + weights_bytes,
    )


# ---------------------------------------------------------------- precision


@dataclass(frozen=True)
class NetworkPlan:
    """How one graph becomes a network: strongly typed or not, builder flags, what stays fp32, the KV cache type."""

    strongly_typed: bool
    flags: tuple[str, ...]  # trt.BuilderFlag member names to set
    pin_norms_fp32: bool  # keep normalization layers in fp32 (weakly typed fp16 only)
    kv_dtype: str  # "float16" or "float32": the decoder's past/present I/O type
    clear_flags: tuple[str, ...] = ()  # flags TensorRT sets by default that this build turns off


def trt_major(version: str) -> int:
    return int(version.split(".", 1)[0])


def network_plan(
    trt_version: str,
    *,
    fp16: bool,
    int8: bool = False,
    fp8: bool = False,
    graph_has_qdq: bool = False,
    compute_capability: tuple[int, int] | None = None,
) -> NetworkPlan:
    """Precision settings for one graph, or a one-line user error.

    TensorRT 10: weakly typed networks; --fp16 sets the FP16 flag (normalization layers pinned to fp32,
    KV cache I/O in fp16 to halve its memory and bandwidth); --int8/--fp8 allow those kernels where the
    graph carries Q/DQ nodes (explicit quantization; implicit INT8 calibration is deprecated in
    TensorRT 10 and unsuitable for a decoder with a KV cache). Without --fp16 the build is true fp32:
    TensorRT's default TF32 matmuls are turned off. TensorRT 11+: networks are strongly typed and
    take precision from the graph, so reduced precision must be in the ONNX already.
    """
    major = trt_major(trt_version)
    if major < 10:
        raise EdgeVitError(f"TensorRT {trt_version} is too old: edge-vit builds engines with TensorRT 10 or newer")
    if fp8 and compute_capability is not None and tuple(compute_capability) < (8, 9):
        cc = f"sm_{compute_capability[0]}{compute_capability[1]}"
        raise EdgeVitError(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is {cc}")
    if major >= 11:
        if fp16:
            raise EdgeVitError(
                f"TensorRT {trt_version} builds strongly typed networks only: precision comes from the ONNX graphs, "
                f"which are fp32; build with --no-fp16, or use TensorRT 10 for --fp16"
            )
        return NetworkPlan(strongly_typed=True, flags=(), pin_norms_fp32=False, kv_dtype="float32",
                           clear_flags=("TF32",))
    flags: list[str] = []
    if fp16:
        flags += ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    if graph_has_qdq and int8:
        flags.append("INT8")
    if graph_has_qdq and fp8:
        flags.append("FP8")
    return NetworkPlan(strongly_typed=False, flags=tuple(flags), pin_norms_fp32=fp16,
                       kv_dtype="float16" if fp16 else "float32", clear_flags=() if fp16 else ("TF32",))


def check_quantized_graphs(int8: bool, fp8: bool, qdq_graphs: Iterable[str]) -> None:
    """--int8 / --fp8 need at least one graph with Q/DQ nodes; say how to get one otherwise."""
    if (int8 or fp8) and not list(qdq_graphs):
        kind = "--int8" if int8 else "--fp8"
        raise EdgeVitError(
            f"{kind} needs ONNX graphs with QuantizeLinear/DequantizeLinear nodes (explicit quantization, e.g. "
            f"NVIDIA ModelOpt or ONNX Runtime static QDQ quantization); these graphs have none"
        )


_NORM_NAME = re.compile(r"(^|[/._])(\w*layer_?norm\w*|norm|ln_\w+|\w*rms_?norm\w*)([/._]|$)", re.IGNORECASE)


def is_norm_layer(name: str) -> bool:
    """Whether a TensorRT layer (named after its ONNX node, e.g. ``/model/layers.0/input_layernorm/Pow``)
    belongs to a normalization module, whose reductions overflow or lose precision in fp16."""
    return bool(_NORM_NAME.search(name))


# Layer kinds that do float math inside a normalization module; casts, shapes and constants keep their types.
PINNABLE_LAYER_TYPES = frozenset({"ELEMENTWISE", "UNARY", "REDUCE", "NORMALIZATION"})


def pin_to_fp32(name: str, layer_type: str, float_output: bool) -> bool:
    """Whether the builder pins this layer (and its output) to fp32 in a weakly typed fp16 build."""
    return float_output and layer_type in PINNABLE_LAYER_TYPES and is_norm_layer(name)


# ---------------------------------------------------------------- install hint


def tensorrt_install_hint(jetson: bool) -> str:
    """One line telling what to install for `edge-vit export trt` / `--backend trt`."""
    if jetson:
        return ("TensorRT is not importable here; on Jetson it comes with JetPack: install it with "
                "`sudo apt install nvidia-jetpack` (python3-libnvinfer) and use that Python or a venv "
                "with --system-site-packages")
    return "TensorRT is not installed; install it with `pip install edge-vit[trt]` (needs an NVIDIA GPU and driver)"


# ---------------------------------------------------------------- the whole plan


@dataclass(frozen=True)
class TrtPlan:
    """Everything `edge-vit export trt` will build, derived from an ONNX export's manifest and the user's limits."""

    shape: DecoderShape
    tile_size: int
    tokens_per_tile: int
    limits: EngineLimits
    profiles: dict[str, tuple[Profile, ...]]
    memory: MemoryEstimate

    def lines(self) -> list[str]:
        lim = self.limits
        out = [
            f"decoder: {self.shape.num_layers} layers, {self.shape.num_kv_heads} KV heads x {self.shape.head_dim}, "
            f"hidden {self.shape.hidden_size}, vocab {self.shape.vocab_size}, max positions {self.shape.max_positions}",
            f"limits: tiles 1..{lim.max_tiles} ({self.tokens_per_tile} image tokens per {self.tile_size} px tile), "
            f"prompt <= {lim.max_prompt}, context <= {lim.max_context} tokens",
        ]
        for graph, profiles in self.profiles.items():
            for i, profile in enumerate(profiles):
                first = next(iter(profile.shapes.items()))
                extra = ""
                if "past_key_values.0.key" in profile.shapes:
                    past = profile.shapes["past_key_values.0.key"]
                    extra = f", past {past.min[2]}/{past.opt[2]}/{past.max[2]}"
                out.append(f"  {ENGINE_FILES[graph]} profile {i} ({profile.name}): {first[0]} "
                           f"{first[1].min}/{first[1].opt}/{first[1].max}{extra}")
        return out + self.memory.lines()


def plan_from_manifest(
    manifest: Mapping,
    preprocessor: Mapping | None = None,
    *,
    max_tiles: int | None = None,
    max_prompt: int | None = None,
    max_context: int | None = None,
    fp16: bool = True,
) -> TrtPlan:
    """The build plan for an `edge-vit export onnx` folder (its manifest and preprocessor_config.json)."""
    try:
        shape = DecoderShape(**{k: int(v) for k, v in manifest["decoder"].items()})
        tiling = manifest["tiling"]
        tile_size, tokens_per_tile = int(tiling["tile_size"]), int(tiling["tokens_per_tile"])
        splits = bool(tiling.get("processor_splits_images", False))
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeVitError(f"the ONNX export's {io_spec.MANIFEST} lacks {exc}; export it again") from None
    if max_tiles is None:
        size = (preprocessor or {}).get("size") or {}
        max_tiles = max_tiles_for_processor(size.get("longest_edge"), tile_size, splits)
    limits = plan_limits(shape, tokens_per_tile, max_tiles, max_prompt, max_context)
    graph_bytes = sum(int(v) for v in (manifest.get("graph_bytes") or {}).values())
    weights = graph_bytes // 2 if fp16 else graph_bytes  # fp32 graphs; fp16 engines hold half
    memory = engine_memory_estimate(shape, limits, tokens_per_tile, tile_size, kv_dtype_bytes=2 if fp16 else 4,
                                    weights_bytes=weights)
    return TrtPlan(shape=shape, tile_size=tile_size, tokens_per_tile=tokens_per_tile, limits=limits,
                   profiles=engine_profiles(shape, limits, tile_size), memory=memory)
