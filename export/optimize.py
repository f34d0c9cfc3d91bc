"""Fused and quantized variants of an ``edge-vit export onnx`` folder for ONNX Runtime on CPU, validated.

``optimize_onnx_folder(onnx_dir, out_dir, OptimizeOptions(...))`` reads the fp32
export and writes a folder the ONNX backend loads unchanged (same three graph
files, same inputs and outputs, same processor files, a manifest written last;
quantized ones add an optional prefill graph):

- fusion: ONNX Runtime's transformer optimizer (``optimize_model``, model type
  "gpt2" for the Llama-style decoder, "vit" for the vision tower) fuses RMSNorm
  into ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``,
  rotary embeddings into ``RotaryEmbedding``, LayerNorm + residual into
  ``SkipLayerNormalization`` and tanh-GELU into ``FastGelu``. Its attention
  fusions do not match the SDPA graphs torch exports, so two passes here do:
  each decoder layer's attention (rotary, KV-cache concat, repeat_kv, SDPA)
  becomes one ``GroupQueryAttention`` (rotary inside, the cache IO unchanged),
  each vision layer's attention one ``Attention`` with packed QKV weights.
  The decoder's q/k/v projections become one MatMul feeding GQA's packed QKV
  input, gate/up one MatMul and a Split: fewer, larger GEMVs per token.
- quantization (decoder): int8 or int4 weight-only block quantization into
  ``MatMulNBits`` (ONNX Runtime's own packing kernels; symmetric, blocks of 128
  for int8 and 32 for int4), computed with int8 activations
  (``accuracy_level=4``: VNNI dot products) — every MatMul with a constant
  weight, ``lm_head`` included. Beside it, ``decoder_prefill.onnx``: the same
  decoder with int8 per-column ``DynamicQuantizeMatMul`` GEMMs (u8s8 VNNI), which
  the ONNX backend runs the prompt through: 2-3x faster than MatMulNBits over a
  prompt's rows. With ``int8_kernel="dynamic"`` an int8 decoder is that graph
  itself, for the prompt and each new token alike, and no second graph is
  written: less memory, about as fast, further from fp32 (README). The vision encoder gets int8 dynamic
  quantization (``QAttention`` / ``DynamicQuantizeMatMul``, per-tensor) and is
  kept only if its features stay within ``min_vision_cosine`` of fp32. The token
  embedding (a table lookup) stays fp32.
- ``logits``: the prefill graph returns the last position only, the decode graph the last
  ``io_spec.LOOKUP_LOGITS_POSITIONS`` (one on a decode step; a prompt-lookup draft verified in one pass)
  (a Slice before ``lm_head``, as for TensorRT):
  generation reads nothing else, and lm_head over every prompt position was about
  a fifth of the 256M model's int8 prefill.
- validation against the fp32 folder on grounded prompts over synthetic frames:
  vision feature cosine, greedy token agreement, and teacher-forced logits
  (cosine, top-1 agreement, max abs diff) — the last is meaningful even for
  random-weight models whose greedy tokens are noise.

Op-type counts before/after, the settings and the validation numbers go into
the manifest under ``optimization``; the export's other keys stay as they were.
Heavy imports (onnx, onnxruntime, transformers) happen inside the functions.
The graphs need ONNX Runtime's com.microsoft operators: TensorRT engines are
built from the fp32 export, not from these folders.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError, ModelLoadError
from export import io_spec

MS_DOMAIN = "com.microsoft"
# Op types the passes here create or that ORT's fusions create (what the summary prints).
FUSED_OP_TYPES = ("GroupQueryAttention", "Attention", "QAttention", "MultiHeadAttention", "RotaryEmbedding", "Split",
                  "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
                  "SkipLayerNormalization", "FastGelu", "BiasGelu", "Gelu", "QuickGelu", "MatMulNBits",
                  "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "FusedMatMul", "MatMul")
LOGITS_COSINE_NOTE = 0.99  # below this, summary_lines says the variant needs checking on real data
_LARGE_GRAPH = 1_800_000_000  # protobuf's limit is 2 GB; larger graphs keep their weights in FILE_data


class Quantization(str, Enum):
    INT8 = "int8"
    INT4 = "int4"


# Measured on the SmolVLM-256M decoder, 2 cores (README): int8 block 128 decodes ~20% faster than block 32
# (and prefills faster) for a small accuracy cost; int4 keeps block 32, where rounding error matters more.
DEFAULT_BLOCK_SIZE = {Quantization.INT8: 128, Quantization.INT4: 32}


def parse_quantization(value: str | Quantization | None) -> Quantization | None:
    """``None`` for no quantization; a user-facing error for anything but int8/int4."""
    if value is None or isinstance(value, Quantization):
        return value
    try:
        return Quantization(str(value).lower())
    except ValueError:
        choices = ", ".join(q.value for q in Quantization)
        raise EdgeVitError(f"--quantize must be one of {choices}, got '{value}'") from None


@dataclass(frozen=True)
class OptimizeOptions:
    fuse: bool = True  # ORT transformer fusions + the attention passes
    quantize: Quantization | None = None  # decoder weights; None keeps fp32
    quantize_vision: bool = True  # int8 vision encoder when quantizing (kept only where accuracy holds)
    block_size: int | None = None  # MatMulNBits block along K; None: DEFAULT_BLOCK_SIZE of the precision
    symmetric: bool = True  # no zero points: measured as fast or faster, and smaller
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (VNNI); 0 = dequantize to fp32
    # int8 decoder GEMMs: "nbits" (MatMulNBits blocks + the prefill graph, as int4) or "dynamic"
    # (DynamicQuantizeMatMul, per-column weights, uint8 activations per tensor; prompt and decode alike, no
    # prefill graph). Measured on the SmolVLM-256M architecture (README): dynamic decodes 2-6% faster and
    # needs one decoder graph fewer (-146 MB), but its teacher-forced top-1 agreement with fp32 is 81% vs 89%.
    # GPTQ writes nbits.
    int8_kernel: str = "nbits"
    min_vision_cosine: float = 0.99  # int8 vision features vs fp32, per image token (the minimum)
    # with quantize: also write decoder_prefill.onnx, the decoder with per-column int8 DynamicQuantizeMatMul
    # GEMMs for the prompt (MatMulNBits is the faster kernel for one row, this one for many)
    prefill_graph: bool = True
    # decoder weight rounding: "rtn" (nearest level) or "gptq" (error-compensated on calibration sequences:
    # export.calibrate); both on the same symmetric grid and the same MatMulNBits nodes
    method: str = "rtn"
    calibration_prompts: int = 16  # gptq: grounded prompts + their fp32 answers (other frames than validation's)
    gptq_damp: float = 0.01  # gptq: H's diagonal dampening, a fraction of its mean
    validate: bool = True
    validation_prompts: int = 4
    validation_tokens: int = 32
    threads: int | None = None  # ORT intra-op threads for validation (None: ORT's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", parse_quantization(self.quantize))
        if self.block_size is not None and self.block_size not in (16, 32, 64, 128, 256):
            raise EdgeVitError(f"block size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.int8_kernel not in ("dynamic", "nbits"):
            raise EdgeVitError(f"--int8-kernel must be dynamic or nbits, got '{self.int8_kernel}'")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeVitError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if not 0 < self.min_vision_cosine <= 1:
            raise EdgeVitError(f"min vision cosine must be in (0, 1], got {self.min_vision_cosine}")
        if self.validation_prompts < 1 or self.validation_tokens < 1:
            raise EdgeVitError("validation needs at least one prompt and one token")
        if not self.fuse and self.quantize is None:
            raise EdgeVitError("nothing to do: pass --optimize and/or --quantize int8|int4")
        if self.method not in ("rtn", "gptq"):
            raise EdgeVitError(f"--method must be rtn or gptq, got '{self.method}'")
        if self.method == "gptq" and self.quantize is None:
            raise EdgeVitError("--method gptq rounds quantized weights: add --quantize int4 (or int8)")
        if self.method == "gptq" and not self.symmetric:
            raise EdgeVitError("--method gptq writes the symmetric grid; it cannot be combined with zero points")
        if self.calibration_prompts < 1:
            raise EdgeVitError("GPTQ needs at least one calibration prompt")
        if not 0 < self.gptq_damp < 1:
            raise EdgeVitError(f"GPTQ dampening must be in (0, 1), got {self.gptq_damp}")

    @property
    def int8_columns(self) -> bool:
        """Whether the decoder's weights go into per-column DynamicQuantizeMatMul (int8, round to nearest)."""
        return self.quantize is Quantization.INT8 and self.int8_kernel == "dynamic" and self.method == "rtn"

    @property
    def writes_prefill_graph(self) -> bool:
        """Whether decoder_prefill.onnx is written: quantized to MatMulNBits, with ``prefill_graph``."""
        return self.quantize is not None and self.prefill_graph and not self.int8_columns

    @property
    def block(self) -> int:
        """The MatMulNBits block size used (the precision's default unless set)."""
        if self.block_size is not None:
            return self.block_size
        return DEFAULT_BLOCK_SIZE[self.quantize or Quantization.INT8]

    @property
    def variant(self) -> str:
        return ((self.quantize.value if self.quantize else "fp32") + ("-gptq" if self.method == "gptq" else "") +
                ("-fused" if self.fuse else ""))


@dataclass(frozen=True)
class OptimizeResult:
    out_dir: Path
    variant: str
    graph_bytes: dict[str, int]
    op_counts: dict[str, dict[str, dict[str, int]]]  # graph -> before/after/runtime -> op type -> count
    validation: dict | None
    seconds: float
    manifest: dict = field(repr=False)


# ---------------------------------------------------------------- checks (cheap, before any heavy import)


def read_export_manifest(onnx_dir: str | Path) -> dict:
    """The manifest of a complete, not yet optimized ``edge-vit export onnx`` folder (user-facing errors)."""
    from edge_vit.vlm.onnx_backend import check_onnx_folder

    path = check_onnx_folder(onnx_dir)
    try:
        manifest = json.loads((path / io_spec.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{onnx_dir}': {io_spec.MANIFEST} is not valid JSON ({exc})") from None
    if "optimization" in manifest:
        raise EdgeVitError(f"'{onnx_dir}' is already an optimized export ({manifest['optimization'].get('variant')}); "
                           f"give the fp32 folder that `edge-vit export onnx` wrote")
    if "decoder" not in manifest or "model_type" not in manifest:
        raise ModelLoadError(f"'{onnx_dir}': {io_spec.MANIFEST} lacks 'decoder'/'model_type'; export again")
    return manifest


def check_out_dir(out_dir: str | Path, *, not_same_as: str | Path | None = None) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"--out '{out}' is a file; give a folder for the optimized graphs")
    if not_same_as is not None and out.exists() and out.resolve() == Path(not_same_as).resolve():
        raise EdgeVitError("--out must be a different folder than --onnx-dir (the fp32 export is the reference)")
    return out


# ---------------------------------------------------------------- graph helpers


def op_counts(model) -> dict[str, int]:
    """Op type -> number of nodes in the main graph (contrib ops by their bare name)."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: (-kv[1], kv[0])))


class _Graph:
    """Producer/consumer/initializer indexes over a ModelProto's main graph (rebuild after edits)."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.model = model
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                if name:
                    self.consumers.setdefault(name, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}

    def const(self, name: str):
        """numpy value of an initializer or a Constant node's output; None otherwise."""
        if name in self.inits:
            return self._to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return self._to_array(a.t)
        return None

    def parent(self, node, index: int, op_type: str):
        found = self.producer.get(node.input[index]) if index < len(node.input) else None
        return found if found is not None and found.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str | None = None):
        users = [c for c in self.consumers.get(name, []) if c.op_type != "Shape"]
        if len(users) != 1 or (op_type is not None and users[0].op_type != op_type):
            return None
        return users[0]


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _perm(node) -> tuple[int, ...]:
    return tuple(_attr(node, "perm", ()) or ())


def _scalar_factor(g: _Graph, node):
    """Mul/Div by a scalar constant -> (data input, factor); anything else -> (None, None)."""
    a, b = node.input[0], node.input[1]
    cb, ca = g.const(b), g.const(a)
    if cb is not None and cb.size == 1:
        value = float(cb.reshape(()))
        return a, (value if node.op_type == "Mul" else 1.0 / value)
    if ca is not None and ca.size == 1 and node.op_type == "Mul":
        return b, float(ca.reshape(()))
    return None, None


def _after_softmax(g: _Graph, name: str) -> str:
    """Skip the NaN guard torch's SDPA export puts after Softmax: Where(IsNaN(p), 0, p)."""
    users = g.consumers.get(name, [])
    wheres = [u for u in users if u.op_type == "Where"]
    if len(wheres) == 1 and all(u.op_type in ("IsNaN", "Where") for u in users):
        return wheres[0].output[0]
    return name


def _split_heads(g: _Graph, name: str) -> str | None:
    """``Transpose(0,2,1,3)(Reshape(x))`` -> x, the [B, S, heads * head_dim] projection."""
    t = g.producer.get(name)
    if t is None or t.op_type != "Transpose" or _perm(t) != (0, 2, 1, 3):
        return None
    r = g.parent(t, 0, "Reshape")
    return r.input[0] if r is not None else None


def _merge_heads(g: _Graph, av):
    """The Reshape after ``Transpose(0,2,1,3)(attn @ V)``: its output [B, S, heads * head_dim] feeds o_proj."""
    t = g.only_consumer(av.output[0], "Transpose")
    if t is None or _perm(t) != (0, 2, 1, 3):
        return None
    return g.only_consumer(t.output[0], "Reshape")


def _walk_up(g: _Graph, name: str, stop_op: str):
    """Up through reshapes, transposes, repeat_kv (Unsqueeze/Expand) and scalar scales to ``stop_op``.

    Returns (node, product of the scale factors) or (None, None).
    """
    scale = 1.0
    while True:
        node = g.producer.get(name)
        if node is None:
            return None, None
        if node.op_type == stop_op:
            return node, scale
        if node.op_type in ("Mul", "Div"):
            name, factor = _scalar_factor(g, node)
            if name is None:
                return None, None
            scale *= factor
        elif node.op_type in ("Unsqueeze", "Expand", "Reshape", "Transpose"):
            name = node.input[0]
        else:
            return None, None


def _walk_down_to_matmul(g: _Graph, name: str):
    """From the key cache down through repeat_kv/transposes/scales to the QK MatMul (or None)."""
    for user in g.consumers.get(name, []):
        node = user
        while node is not None and node.op_type in ("Unsqueeze", "Expand", "Reshape", "Transpose", "Mul", "Div"):
            node = g.only_consumer(node.output[0])
        if node is not None and node.op_type == "MatMul":
            return node
    return None


def _replace_nodes(model, dead_ids: set[int], new_nodes: list) -> None:
    keep = [n for n in model.graph.node if id(n) not in dead_ids]
    del model.graph.node[:]
    model.graph.node.extend(keep + new_nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    prune(model)
    topo_sort(model)


def prune(model) -> None:
    """Drop nodes and initializers no graph output depends on; graph inputs stay as they are (the IO contract)."""
    import onnx

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    needed: set[str] = set()
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(i for i in node.input if i)
        for a in node.attribute:  # If/Loop bodies read names of the outer graph
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            stack.extend(i for sub in subgraphs for sn in sub.node for i in sn.input if i)
    for container, keep in ((graph.node, lambda n: id(n) in live), (graph.initializer, lambda t: t.name in needed),
                            (graph.value_info, lambda v: v.name in needed)):
        kept = [x for x in container if keep(x)]
        del container[:]
        container.extend(kept)


def topo_sort(model) -> None:
    """Order nodes so each comes after its inputs' producers (Kahn's algorithm, stable)."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    import heapq

    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise RuntimeError("graph has a cycle after fusion")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


# ---------------------------------------------------------------- attention passes


def fuse_group_query_attention(model, num_heads: int, kv_num_heads: int, num_layers: int,
                               max_positions: int | None = None) -> int:
    """Each decoder layer's attention -> one com.microsoft ``GroupQueryAttention`` (do_rotary); returns the count.

    Needs ORT's ``RotaryEmbedding`` fusion first (its cos/sin caches feed GQA). Matched per layer from
    the cache outputs: ``present.i.key = Concat(past, RotaryEmbedding(k))``, ``present.i.value =
    Concat(past, v)``, the QK MatMul below the key cache, Softmax (NaN guard), the AV MatMul and the
    head merge. GQA takes the projections [B, S, heads*head_dim], the caches in the same BNSH layout,
    ``position_ids`` for rotary, and lengths from ``attention_mask`` (batch 1, no padding: what the
    runtime feeds). Graph inputs and outputs do not change.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(model)
    new_nodes: list = []
    dead: set[int] = set()
    for i in range(num_layers):
        concat_k, concat_v = g.producer.get(f"present.{i}.key"), g.producer.get(f"present.{i}.value")
        if concat_k is None or concat_v is None or concat_k.op_type != "Concat" or concat_v.op_type != "Concat":
            continue
        past_k, k_rotated = concat_k.input
        past_v, v_heads = concat_v.input
        k_rot = g.producer.get(k_rotated)
        if k_rot is None or k_rot.op_type != "RotaryEmbedding":
            continue
        k_in, v_in = _split_heads(g, k_rot.input[0]), _split_heads(g, v_heads)
        qk = _walk_down_to_matmul(g, concat_k.output[0])
        if qk is None or k_in is None or v_in is None:
            continue
        k_top, k_scale = _walk_up(g, qk.input[1], "Concat")
        q_rot, q_scale = _walk_up(g, qk.input[0], "RotaryEmbedding")
        if k_top is not concat_k or q_rot is None:
            continue
        q_in = _split_heads(g, q_rot.input[0])
        after_qk = g.only_consumer(qk.output[0])
        softmax = after_qk if after_qk is not None and after_qk.op_type == "Softmax" else (
            g.only_consumer(after_qk.output[0], "Softmax") if after_qk is not None and after_qk.op_type == "Add"
            else None)
        if softmax is None or q_in is None:
            continue
        av = [u for u in g.consumers.get(_after_softmax(g, softmax.output[0]), []) if u.op_type == "MatMul"]
        if len(av) != 1:
            continue
        v_top, v_scale = _walk_up(g, av[0].input[1], "Concat")
        merge = _merge_heads(g, av[0])
        same_rotary = list(q_rot.input[1:4]) == list(k_rot.input[1:4]) and \
            _attr(q_rot, "interleaved", 0) == _attr(k_rot, "interleaved", 0)
        if v_top is not concat_v or v_scale != 1.0 or merge is None or not same_rotary \
                or _attr(q_rot, "rotary_embedding_dim", 0) not in (0, None):
            continue
        position_ids, cos, sin = q_rot.input[1:4]
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q_in, k_in, v_in, past_k, past_v, "gqa_seqlens_k", "gqa_total_sequence_length", cos, sin, position_ids],
            [merge.output[0], concat_k.output[0], concat_v.output[0]],
            name=f"GroupQueryAttention_{i}", domain=MS_DOMAIN, num_heads=num_heads, kv_num_heads=kv_num_heads,
            scale=float(q_scale * k_scale), do_rotary=1, rotary_interleaved=int(_attr(q_rot, "interleaved", 0)),
        ))
        dead.update(id(n) for n in (concat_k, concat_v, merge))
    fused = len(new_nodes)
    if not fused:
        return 0
    # seqlens_k = sum(mask) - 1 (int32 [B]); total_sequence_length = mask.shape[1] (int32 scalar)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa_one"),
                                    numpy_helper.from_array(np.array(1, np.int64), "gqa_one_scalar")])
    new_nodes += [
        helper.make_node("ReduceSum", ["attention_mask", "gqa_one"], ["gqa_mask_sum"], name="gqa_ReduceSum",
                         keepdims=0),
        helper.make_node("Sub", ["gqa_mask_sum", "gqa_one"], ["gqa_seqlens_k64"], name="gqa_Sub"),
        helper.make_node("Cast", ["gqa_seqlens_k64"], ["gqa_seqlens_k"], name="gqa_CastSeqlens", to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["gqa_mask_shape"], name="gqa_Shape"),
        helper.make_node("Gather", ["gqa_mask_shape", "gqa_one_scalar"], ["gqa_total64"], name="gqa_Gather", axis=0),
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total_sequence_length"], name="gqa_CastTotal",
                         to=TensorProto.INT32),
    ]
    _replace_nodes(model, dead, new_nodes)
    if max_positions:
        _trim_rotary_caches(model, max_positions)
    return fused


def _trim_rotary_caches(model, max_positions: int) -> None:
    """ORT's rotary fusion writes cos/sin caches for 131k positions; the model's context is enough."""
    from onnx import numpy_helper

    caches = {n.input[7] for n in model.graph.node if n.op_type == "GroupQueryAttention"} | \
             {n.input[8] for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    for t in model.graph.initializer:
        if t.name in caches and len(t.dims) == 2 and t.dims[0] > max_positions:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:max_positions].copy(), t.name))


def _projection(g: _Graph, name: str):
    """``[Add(bias)](MatMul(x, W))`` with initializer W [D_in, D_out] -> (x, W, bias) or None."""
    import numpy as np

    node, bias = g.producer.get(name), None
    if node is not None and node.op_type == "Add":
        for a, b in ((0, 1), (1, 0)):
            value, mm = g.const(node.input[a]), g.producer.get(node.input[b])
            if value is not None and value.ndim == 1 and mm is not None and mm.op_type == "MatMul":
                node, bias = mm, value
                break
        else:
            return None
    if node is None or node.op_type != "MatMul" or node.input[1] not in g.inits:
        return None
    weight = g.const(node.input[1])
    if weight.ndim != 2:
        return None
    return node.input[0], weight, bias if bias is not None else np.zeros(weight.shape[1], weight.dtype)


def _heads_up(g: _Graph, name: str, key: bool):
    """Q (or K^T) operand of the QK MatMul -> (projection [B, S, D], scale) through scales, transposes, Reshape."""
    scale, perms = 1.0, []
    wanted = [[(0, 2, 3, 1)], [(0, 1, 3, 2), (0, 2, 1, 3)]] if key else [[(0, 2, 1, 3)]]
    while True:
        node = g.producer.get(name)
        if node is None:
            return None, None
        if node.op_type in ("Mul", "Div"):
            name, factor = _scalar_factor(g, node)
            if name is None:
                return None, None
            scale *= factor
        elif node.op_type == "Transpose":
            perms.append(_perm(node))
            name = node.input[0]
        elif node.op_type == "Reshape":
            return (node.input[0], scale) if perms in wanted else (None, None)
        else:
            return None, None


def fuse_vision_attention(model, num_heads: int) -> int:
    """Bidirectional self-attention (q/k/v projections, SDPA without mask, head merge) -> one com.microsoft
    ``Attention`` with packed QKV weights [D, 3D]; returns the count."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = _Graph(model)
    new_nodes: list = []
    dead: set[int] = set()
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        qk = g.parent(softmax, 0, "MatMul")
        av = [u for u in g.consumers.get(_after_softmax(g, softmax.output[0]), []) if u.op_type == "MatMul"]
        merge = _merge_heads(g, av[0]) if qk is not None and len(av) == 1 else None
        if merge is None:
            continue
        (q3, sq), (k3, sk) = _heads_up(g, qk.input[0], key=False), _heads_up(g, qk.input[1], key=True)
        v3 = _split_heads(g, av[0].input[1])
        projections = [_projection(g, x) if x is not None else None for x in (q3, k3, v3)]
        if any(p is None for p in projections) or len({p[0] for p in projections}) != 1:
            continue
        weight = np.concatenate([p[1] for p in projections], axis=1).astype(np.float32)  # [D, 3D]
        bias = np.concatenate([p[2] for p in projections]).astype(np.float32)  # [3D]
        if weight.shape[1] != 3 * weight.shape[0] or weight.shape[0] % num_heads:
            continue
        base = f"attention_{len(new_nodes)}"
        model.graph.initializer.extend([numpy_helper.from_array(weight, base + "_qkv_weight"),
                                        numpy_helper.from_array(bias, base + "_qkv_bias")])
        new_nodes.append(helper.make_node(
            "Attention", [projections[0][0], base + "_qkv_weight", base + "_qkv_bias"], [merge.output[0]],
            name=f"Attention_{len(new_nodes)}", domain=MS_DOMAIN, num_heads=num_heads, scale=float(sq * sk)))
        dead.add(id(merge))
    if new_nodes:
        _replace_nodes(model, dead, new_nodes)
    return len(new_nodes)


def pack_shared_input_matmuls(model) -> int:
    """MatMuls that read the same activation with constant weights (q/k/v, gate/up) -> one MatMul on the
    concatenated weights [K, N1+N2+...] and a Split; a Split feeding a GroupQueryAttention's q/k/v
    becomes its packed QKV input. Fewer, larger GEMVs per token; returns the number of MatMuls removed.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(model)
    groups: dict[str, list] = {}
    for node in model.graph.node:
        w = g.inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT:
            groups.setdefault(node.input[0], []).append(node)
    new_nodes: list = []
    dead: set[int] = set()
    removed = 0
    for a, members in groups.items():
        if len(members) < 2 or len({g.inits[m.input[1]].dims[0] for m in members}) != 1:
            continue
        weights = [g.const(m.input[1]) for m in members]
        sizes = [w.shape[1] for w in weights]
        base = f"{members[0].name or members[0].output[0]}_packed"
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), base + "_weight"))
        packed = base + "_output"
        new_nodes.append(helper.make_node("MatMul", [a, base + "_weight"], [packed], name=base))
        outputs = [m.output[0] for m in members]
        gqa = [u for u in g.consumers.get(outputs[0], []) if u.op_type == "GroupQueryAttention"]
        if len(members) == 3 and len(gqa) == 1 and list(gqa[0].input[:3]) == outputs and \
                all(len(g.consumers.get(o, [])) == 1 for o in outputs):
            gqa[0].input[0], gqa[0].input[1], gqa[0].input[2] = packed, "", ""  # packed QKV [B, S, (Nq+2Nkv)*H]
        else:
            model.graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), base + "_split"))
            new_nodes.append(helper.make_node("Split", [packed, base + "_split"], outputs, name=base + "_Split",
                                              axis=-1))
        dead.update(id(m) for m in members)
        removed += len(members) - 1
    if new_nodes:
        _replace_nodes(model, dead, new_nodes)
    return removed


# ---------------------------------------------------------------- fusion and quantization of one graph


def ort_fusions(path: Path, model_type: str, num_heads: int, hidden_size: int):
    """ONNX Runtime's transformer optimizer (Python fusions only, no ORT session) -> ModelProto."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    # Its attention and embedding fusions do not match torch's SDPA graphs (the passes above do).
    options.enable_attention = options.enable_embed_layer_norm = options.enable_qordered_matmul = False
    with _quiet_logging():
        optimized = optimize_model(str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=0, optimization_options=options, only_onnxruntime=False)
    return optimized.model


@contextmanager
def _quiet_logging():
    """ORT's optimizer and quantizer log notes at INFO/WARNING on module and root loggers; errors only here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _replace_weight_matmuls(model, replace) -> int:
    """Each MatMul whose B is a 2-D fp32 initializer -> ``replace(node, weight [K, N], weight_name)``, which
    returns (the new node, its new initializers). fp32 weights no other node reads are dropped and the
    com.microsoft opset is added. Returns how many MatMuls were replaced."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for n in graph.node for name in n.input)
    nodes, added, replaced, count = [], [], set(), 0
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        new_node, new_inits = replace(node, numpy_helper.to_array(w), w.name)
        nodes.append(new_node)
        added.extend(new_inits)
        uses[w.name] -= 1
        if uses[w.name] == 0:
            replaced.add(w.name)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced] + added
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


def quantize_matmul_nbits(model, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                          hessians: dict | None = None, damp: float = 0.01, report: dict | None = None) -> int:
    """Every MatMul with a 2-D fp32 initializer weight -> com.microsoft ``MatMulNBits``; returns the count.

    Block-wise along K with ONNX Runtime's own packing kernels (what ``MatMulNBitsQuantizer`` calls,
    without its onnx_ir dependency). Symmetric: no zero points (int4 centre 8, int8 centre 128).
    ``hessians`` (activation name -> [K, K], from ``export.calibrate.matmul_hessians``): GPTQ instead of
    round-to-nearest, on the same symmetric grid, for every MatMul whose input has one; ``report`` then
    receives each weight's calibration output error relative to round-to-nearest.
    """
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    from export import calibrate

    pack = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    activation = calibrate.weight_matmul_inputs(model) if hessians else {}
    if hessians and not symmetric:
        raise EdgeVitError("GPTQ here writes the symmetric grid; drop the asymmetric setting")

    def replace(node, weight, weight_name):
        k, n = weight.shape
        blocks = -(-k // block_size)
        hessian = hessians.get(activation.get(node.name)) if hessians else None
        if hessian is not None:
            codes, scales = calibrate.gptq_codes(weight, hessian, bits, block_size, damp)
            packed, zero_points = calibrate.pack_codes(codes, bits), None
            if report is not None:
                rtn = calibrate.dequantize(*calibrate.rtn_codes(weight, bits, block_size), bits, k)
                gptq = calibrate.dequantize(codes, scales, bits, k)
                report[node.name] = (calibrate.squared_output_error(weight, gptq, hessian) /
                                     max(calibrate.squared_output_error(weight, rtn, hessian), 1e-30))
        else:
            if blocks * block_size != k:
                weight = np.pad(weight, ((0, blocks * block_size - k), (0, 0)))
            per_byte = 8 // bits
            packed = np.zeros((n, blocks, block_size // per_byte), dtype=np.uint8)
            zero_points = np.zeros((n, -(-blocks // per_byte)), dtype=np.uint8)
            scales = np.zeros((n, blocks), dtype=np.float32)
            pack(packed, np.ascontiguousarray(weight, dtype=np.float32), scales, zero_points, block_size, n, k,
                 symmetric)
        name = f"{weight_name}_q{bits}"
        inits = [numpy_helper.from_array(packed, name), numpy_helper.from_array(scales, name + "_scales")]
        inputs = [node.input[0], name, name + "_scales"]
        if not symmetric:
            inits.append(numpy_helper.from_array(zero_points, name + "_zero_points"))
            inputs.append(name + "_zero_points")
        extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
        return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                                domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block_size, **extra), inits

    return _replace_weight_matmuls(model, replace)


def quantize_matmul_int8_columns(model) -> int:
    """Every MatMul with a 2-D fp32 initializer weight -> com.microsoft ``DynamicQuantizeMatMul``; the count.

    Weights int8, symmetric, one scale per output column (a column with outliers keeps its own range:
    about 10x less error than one scale per tensor, at the same speed on this CPU); activations
    quantized to uint8 per tensor at run time. ONNX Runtime runs it as a u8s8 GEMM (VNNI): for a
    prompt's rows 2-3x faster than ``MatMulNBits`` with int8 compute, as fast for one row.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    def replace(node, weight, weight_name):
        scale = np.abs(weight).max(axis=0) / 127.0
        scale[scale == 0] = 1.0  # an all-zero column stays zero
        quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        name = f"{weight_name}_i8c"
        inits = [numpy_helper.from_array(quantized, name),
                 numpy_helper.from_array(scale.astype(np.float32), name + "_scale")]
        return helper.make_node("DynamicQuantizeMatMul", [node.input[0], name, name + "_scale"], list(node.output),
                                name=f"{node.name}_I8C", domain=MS_DOMAIN), inits

    return _replace_weight_matmuls(model, replace)


def quantize_int8_dynamic(model, work_dir: Path):
    """int8 dynamic quantization (weights QInt8 per tensor, activations u8 at run time) -> ModelProto.

    Per tensor, not per channel: ONNX Runtime fuses per-tensor MatMulInteger into DynamicQuantizeMatMul
    and Attention into QAttention; the per-channel graph keeps extra Mul/Cast nodes and measured
    about 3x slower for the vision encoder on this CPU.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = work_dir / "fp32.onnx", work_dir / "int8.onnx"
    _save(model, src)
    with _quiet_logging():
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Attention"], per_channel=False,
                         weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(str(dst))


def _save(model, path: Path) -> None:
    import onnx

    path.unlink(missing_ok=True)
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    if model.ByteSize() > _LARGE_GRAPH:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
    else:
        onnx.save_model(model, str(path))


def runtime_op_counts(path: Path, work_dir: Path) -> dict[str, int]:
    """Op types after ONNX Runtime's own load-time fusions on CPU (e.g. Sigmoid*x -> QuickGelu,
    MatMulInteger+scale -> DynamicQuantizeMatMul): what the session actually runs."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(work_dir / f"runtime_{path.name}")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"runtime_{path.name}_data")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))


def _io_signature(model) -> tuple:
    def sig(values):
        return tuple((v.name, v.type.tensor_type.elem_type) for v in values)

    inits = {t.name for t in model.graph.initializer}
    return sig([i for i in model.graph.input if i.name not in inits]), sig(model.graph.output)


# ---------------------------------------------------------------- the folder


def optimize_onnx_folder(onnx_dir: str | Path, out_dir: str | Path, options: OptimizeOptions = OptimizeOptions(),
                         *, source_label: str | None = None) -> OptimizeResult:
    """Write the fused/quantized variant of an fp32 export to ``out_dir``; validate it against the export.

    ``source_label`` replaces the fp32 folder's path in the manifest (e.g. when it is a temporary folder).
    """
    import tempfile

    import onnx
    from transformers import AutoConfig

    from export.trt import last_token_logits

    source = Path(onnx_dir)
    manifest = read_export_manifest(source)
    out = check_out_dir(out_dir, not_same_as=source)
    out.mkdir(parents=True, exist_ok=True)
    (out / io_spec.MANIFEST).unlink(missing_ok=True)  # written last: marks a complete folder
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(source)
    text, vision = config.get_text_config(), config.vision_config
    shape = io_spec.DecoderShape(**manifest["decoder"])

    counts: dict[str, dict[str, dict[str, int]]] = {}
    fusions: dict[str, int] = {}
    precision = {io_spec.VISION_ENCODER: "fp32", io_spec.EMBED_TOKENS: "fp32", io_spec.DECODER: "fp32"}
    with tempfile.TemporaryDirectory(prefix="edge-vit-opt-", dir=out) as tmp:
        # decoder
        path = source / io_spec.DECODER
        model = onnx.load(str(path))
        before, io = op_counts(model), _io_signature(model)
        if options.fuse:
            model = ort_fusions(path, "gpt2", text.num_attention_heads, text.hidden_size)
            fusions["GroupQueryAttention"] = fuse_group_query_attention(
                model, text.num_attention_heads, shape.num_kv_heads, shape.num_layers, shape.max_positions)
            fusions["packed_matmuls_removed"] = pack_shared_input_matmuls(model)  # q|k|v, gate|up
        # Generation reads only the last position's logits: lm_head over the whole prompt was ~20% of the
        # 256M model's int8 prefill (49,280 x 576 per position). The decode graph keeps the last
        # LOOKUP_LOGITS_POSITIONS (one row on a decode step), so a prompt-lookup draft is verified in one pass.
        if options.writes_prefill_graph:
            prefill = last_token_logits(copy.deepcopy(model))
            fusions["DynamicQuantizeMatMul (prefill)"] = quantize_matmul_int8_columns(prefill)
            precision[io_spec.DECODER_PREFILL] = "int8 (per-column weights, dynamic activations)"
            counts[io_spec.DECODER_PREFILL] = _write_graph(prefill, io_spec.DECODER_PREFILL, io, before, out, Path(tmp))
            del prefill
        else:
            (out / io_spec.DECODER_PREFILL).unlink(missing_ok=True)
            (out / f"{io_spec.DECODER_PREFILL}_data").unlink(missing_ok=True)
        last_token_logits(model, io_spec.LOOKUP_LOGITS_POSITIONS)
        if options.int8_columns:
            fusions["DynamicQuantizeMatMul"] = quantize_matmul_int8_columns(model)
            precision[io_spec.DECODER] = options.quantize.value
        elif options.quantize is not None:
            bits = 8 if options.quantize is Quantization.INT8 else 4
            hessians, errors = None, {}
            if options.method == "gptq":
                from export import calibrate

                t_cal = time.perf_counter()
                feeds = calibrate.calibration_sequences(source, options.calibration_prompts,
                                                        skip=options.validation_prompts, threads=options.threads)
                hessians = calibrate.matmul_hessians(model, feeds, Path(tmp), threads=options.threads)
                gptq_report = {"calibration_sequences": len(feeds),
                               "calibration_tokens": int(sum(f["inputs_embeds"].shape[1] for f in feeds)),
                               "calibration_seconds": round(time.perf_counter() - t_cal, 1)}
            fusions["MatMulNBits"] = quantize_matmul_nbits(model, bits, options.block, options.symmetric,
                                                           options.accuracy_level, hessians=hessians,
                                                           damp=options.gptq_damp, report=errors)
            if hessians is not None:
                ratios = sorted(errors.values())
                gptq_report.update(weights=len(ratios), output_error_vs_rtn={
                    "median": round(ratios[len(ratios) // 2], 4), "max": round(ratios[-1], 4)} if ratios else None)
            precision[io_spec.DECODER] = options.quantize.value
        counts[io_spec.DECODER] = _write_graph(model, io_spec.DECODER, io, before, out, Path(tmp))
        del model

        # vision encoder
        path = source / io_spec.VISION_ENCODER
        model = onnx.load(str(path))
        before, io = op_counts(model), _io_signature(model)
        if options.fuse:
            model = ort_fusions(path, "vit", vision.num_attention_heads, vision.hidden_size)
            fusions["Attention"] = fuse_vision_attention(model, vision.num_attention_heads)
        vision_fp32 = out / ".vision_encoder_fp32.onnx"  # the fallback if int8 misses the accuracy bar
        if options.quantize is not None and options.quantize_vision:
            if options.validate:
                _save(model, vision_fp32)
            model = quantize_int8_dynamic(model, Path(tmp))
            precision[io_spec.VISION_ENCODER] = "int8"
        counts[io_spec.VISION_ENCODER] = _write_graph(model, io_spec.VISION_ENCODER, io, before, out, Path(tmp))
        del model

    shutil.copy2(source / io_spec.EMBED_TOKENS, out / io_spec.EMBED_TOKENS)
    for item in source.iterdir():  # config, processor, tokenizer, generation config
        if item.is_file() and item.name not in (*io_spec.GRAPH_FILES, io_spec.DECODER_PREFILL, io_spec.MANIFEST) and \
                not item.name.endswith(".onnx_data"):
            shutil.copy2(item, out / item.name)

    settings = _settings(options)
    optimized = {**manifest, "graph_bytes": _graph_bytes(out), "logits": "last"}  # the prompt's: last position
    if options.quantize is not None and options.method == "gptq":
        settings["decoder"]["gptq"] = gptq_report
    optimized["optimization"] = {
        "variant": options.variant, "source_onnx_dir": source_label or str(source), "fused": options.fuse,
        "precision": precision, "settings": settings, "fusions": fusions, "op_counts": counts,
        "validation": None, "seconds": None,
        "logits_positions": io_spec.LOOKUP_LOGITS_POSITIONS,  # decode graph: the last this-many positions
        "runtime": "onnxruntime (CPU; com.microsoft contrib ops); build TensorRT engines from the fp32 export",
    }
    validation = None
    if options.validate:
        # OnnxVLM loads only folders with a manifest: a provisional one while validating, removed on failure.
        (out / io_spec.MANIFEST).write_text(json.dumps(optimized, indent=2) + "\n", encoding="utf-8")
        try:
            validation = validate_variant(source, out, options, vision_fallback=vision_fp32)
        except BaseException:
            (out / io_spec.MANIFEST).unlink(missing_ok=True)
            raise
        finally:
            vision_fp32.unlink(missing_ok=True)
        if validation["vision"].get("int8_rejected"):
            precision[io_spec.VISION_ENCODER] = "fp32"
            vision_path = out / io_spec.VISION_ENCODER
            counts[io_spec.VISION_ENCODER]["after"] = op_counts(onnx.load(str(vision_path), load_external_data=False))
            with tempfile.TemporaryDirectory(prefix="edge-vit-opt-", dir=out) as tmp:
                counts[io_spec.VISION_ENCODER]["runtime"] = runtime_op_counts(vision_path, Path(tmp))
        optimized["graph_bytes"] = _graph_bytes(out)
    seconds = time.perf_counter() - t0
    optimized["optimization"].update(validation=validation, seconds=round(seconds, 1))
    (out / io_spec.MANIFEST).write_text(json.dumps(optimized, indent=2) + "\n", encoding="utf-8")
    return OptimizeResult(out_dir=out, variant=options.variant, graph_bytes=optimized["graph_bytes"],
                          op_counts=counts, validation=validation, seconds=seconds, manifest=optimized)


def _write_graph(model, name: str, io: tuple, before: dict, out: Path, work_dir: Path) -> dict:
    """Save ``model`` as ``out/name`` after checking it kept the inputs/outputs ``io``; its op counts before,
    after and as ONNX Runtime loads it."""
    _check_io(io, model, name)
    after = op_counts(model)
    _save(model, out / name)
    return {"before": before, "after": after, "runtime": runtime_op_counts(out / name, work_dir)}


def _check_io(expected: tuple, model, name: str) -> None:
    if _io_signature(model) != expected:
        raise RuntimeError(f"optimizing {name} changed its inputs/outputs; the runtime could not load it")


def _graph_bytes(out: Path) -> dict[str, int]:
    sizes = {}
    for name in (*io_spec.GRAPH_FILES, io_spec.DECODER_PREFILL):
        if name == io_spec.DECODER_PREFILL and not (out / name).is_file():
            continue
        data = out / f"{name}_data"
        sizes[name] = (out / name).stat().st_size + (data.stat().st_size if data.exists() else 0)
    return sizes


def _settings(options: OptimizeOptions) -> dict[str, Any]:
    settings: dict[str, Any] = {"fusion": {"decoder": "onnxruntime optimize_model(gpt2) + GroupQueryAttention pass "
                                                      "+ qkv and gate/up packing",
                                           "vision": "onnxruntime optimize_model(vit) + Attention pass"}
                                if options.fuse else None}
    if options.int8_columns:
        settings["decoder"] = {"method": "DynamicQuantizeMatMul", "bits": 8, "weights": "int8 per column, symmetric",
                               "activations": "uint8 per tensor", "lm_head": "quantized", "rounding": "rtn"}
    elif options.quantize is not None:
        settings["decoder"] = {"method": "MatMulNBits weight-only", "bits": 8 if options.quantize is Quantization.INT8
                               else 4, "block_size": options.block, "symmetric": options.symmetric,
                               "accuracy_level": options.accuracy_level, "lm_head": "quantized",
                               "rounding": options.method}
    if options.quantize is not None:
        if options.method == "gptq":
            settings["decoder"]["gptq_damp"] = options.gptq_damp
        settings["decoder_prefill"] = ({"graph": io_spec.DECODER_PREFILL, "method": "DynamicQuantizeMatMul",
                                        "weights": "int8 per column, symmetric", "activations": "uint8 per tensor",
                                        "used_for": "the prompt (sequence > 1) on CPU"}
                                       if options.writes_prefill_graph else None)
        settings["vision"] = ({"method": "quantize_dynamic", "weights": "QInt8 per tensor", "activations": "QUInt8",
                               "ops": ["MatMul", "Attention"], "min_cosine": options.min_vision_cosine}
                              if options.quantize_vision else "fp32 (--no-quantize-vision)")
    return settings


# ---------------------------------------------------------------- validation against the fp32 export


def validation_cases(n: int, count_tokens) -> list[tuple[Any, str]]:
    """``n`` (frame, grounded prompt) pairs: synthetic shape scenes and their detections as grounding."""
    import numpy as np

    from edge_vit.grounding import GroundingConfig, ground
    from edge_vit.tiny import SHAPE_CLASSES, render_shapes_frame
    from edge_vit.types import Detections

    instructions = ("Describe what you see in one sentence.", "How many shapes are there, and where?",
                    "Which object is closest to the top-left corner?", "What colour is the largest shape?")
    names = dict(enumerate(SHAPE_CLASSES))
    cases = []
    for i in range(n):
        frame, truth = render_shapes_frame(t=5 * i, width=512, height=512, n_shapes=3 + i % 4, seed=i)
        detections = Detections(
            xyxy=np.array([t["xyxy"] for t in truth], np.float32), confidence=np.linspace(0.9, 0.5, len(truth)),
            class_id=np.array([SHAPE_CLASSES.index(t["class"]) for t in truth]), names=names,
            image_size=frame.shape[:2])
        prompt = ground(detections, instructions[i % len(instructions)], GroundingConfig(max_tokens=96),
                        count_tokens=count_tokens)
        cases.append((frame, prompt.text))
    return cases


def _cosine_rows(a, b):
    import numpy as np

    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def validate_variant(reference_dir: Path, variant_dir: Path, options: OptimizeOptions,
                     vision_fallback: Path | None = None) -> dict:
    """Vision features, greedy tokens and teacher-forced logits of ``variant_dir`` vs the fp32 ``reference_dir``.

    If the variant's int8 vision encoder misses ``options.min_vision_cosine`` and ``vision_fallback``
    (its fp32 graph) exists, the fallback replaces it before the token checks.
    """
    import numpy as np

    from edge_vit.vlm.base import GenerationConfig
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig

    ort_config = OrtConfig(threads=options.threads)
    ref = OnnxVLM.load(reference_dir, ort_config=ort_config)
    var = OnnxVLM.load(variant_dir, ort_config=ort_config)
    cases = validation_cases(options.validation_prompts, ref.count_tokens)

    # vision: same tiles through both encoders
    prepared = [ref._prepare(frame, prompt) for frame, prompt in cases]
    tiles = [ref._tiles(inputs) for inputs in prepared]
    ref_feats = [ref.vision.run(None, {"pixel_values": t})[0] for t in tiles]
    var_feats = [var.vision.run(None, {"pixel_values": t})[0] for t in tiles]
    vision = _feature_stats(ref_feats, var_feats)
    if vision["cosine_min"] < options.min_vision_cosine and vision_fallback is not None and vision_fallback.exists():
        shutil.move(str(vision_fallback), str(variant_dir / io_spec.VISION_ENCODER))
        vision = {"int8_rejected": f"int8 feature cosine {vision['cosine_min']:.4f} < {options.min_vision_cosine}; "
                                   f"kept fp32", "int8": vision}
        var = OnnxVLM.load(variant_dir, ort_config=ort_config)
        vision.update(_feature_stats(ref_feats, [var.vision.run(None, {"pixel_values": t})[0] for t in tiles]))

    # greedy generation through the product's code path, fixed length
    n_tokens = options.validation_tokens
    config = GenerationConfig(max_new_tokens=n_tokens, min_new_tokens=n_tokens)
    matches = total = identical = 0
    first_divergence = []
    cos_all, top1, max_diff = [], [], 0.0
    for (frame, prompt), inputs, feats in zip(cases, prepared, ref_feats):
        ref_tokens = [s.token_id for s in ref.generate(frame, prompt, config) if not s.done]
        var_tokens = [s.token_id for s in var.generate(frame, prompt, config) if not s.done]
        same = [a == b for a, b in zip(ref_tokens, var_tokens)]
        matches, total = matches + sum(same), total + len(ref_tokens)
        identical += int(ref_tokens == var_tokens)
        first_divergence.append(same.index(False) if False in same else len(same))
        # teacher forcing: the reference's prompt (fp32 image features) + its own tokens through both decoders
        ref_logits, var_logits = (_forced_logits(vlm, inputs, feats, ref_tokens) for vlm in (ref, var))
        cos_all.append(_cosine_rows(ref_logits, var_logits))
        top1.append(ref_logits.argmax(-1) == var_logits.argmax(-1))
        max_diff = max(max_diff, float(np.abs(ref_logits - var_logits).max()))
    cos_all, top1 = np.concatenate(cos_all), np.concatenate(top1)
    return {
        "prompts": len(cases), "tokens_per_prompt": n_tokens,
        "vision": vision,
        "greedy": {"token_agreement": round(matches / max(total, 1), 4), "identical_sequences": identical,
                   "first_divergence": first_divergence},
        "teacher_forced": {"top1_agreement": round(float(top1.mean()), 4),
                           "logits_cosine_mean": round(float(cos_all.mean()), 6),
                           "logits_cosine_min": round(float(cos_all.min()), 6),
                           "logits_max_abs_diff": max_diff, "positions": int(top1.size)},
    }


def _feature_stats(ref_feats: list, var_feats: list) -> dict:
    import numpy as np

    cos = np.concatenate([_cosine_rows(a, b) for a, b in zip(ref_feats, var_feats)])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_feats, var_feats))
    scale = max(float(np.abs(a).max()) for a in ref_feats)
    return {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": diff, "max_abs_reference": scale}


def _forced_logits(vlm, inputs: dict, feats, tokens: list[int]):
    """Logits [len(tokens), V] of ``vlm``'s decoder for the prompt + ``tokens``, teacher-forced.

    Through the generation's own path: the prompt in one prefill, then ``tokens[:-1]`` one step each
    with the KV cache. (The optimized decoders return the last position's logits only, so one pass
    over the whole sequence would not show them.)
    """
    import numpy as np

    input_ids = inputs["input_ids"].astype(np.int64)  # [1, T]
    embeds = vlm._embed(input_ids)  # [1, T, D]
    embeds[0, input_ids[0] == vlm.image_token_id] = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype)
    decoder = vlm.decoder
    length = input_ids.shape[1]
    cache = decoder.new_cache(length + len(tokens))
    rows = [decoder.run(cache, embeds, np.ones((1, length), np.int64))]
    for token in tokens[:-1]:
        length += 1
        rows.append(decoder.run(cache, vlm._embed(np.array([[token]], np.int64)), np.ones((1, length), np.int64)))
    return np.stack(rows)  # the positions that predict ``tokens``


def summary_lines(result: OptimizeResult) -> list[str]:
    """What the CLI prints: fused op counts per graph (before -> after), sizes, validation."""
    lines = [f"variant {result.variant}: {result.out_dir}"]
    for graph, both in result.op_counts.items():
        before, after = both["before"], both["after"]
        changed = [op for op in FUSED_OP_TYPES if before.get(op, 0) != after.get(op, 0)]
        shown = ", ".join(f"{op} {before.get(op, 0)}->{after.get(op, 0)}" for op in changed) or "unchanged"
        total = f"nodes {sum(before.values())}->{sum(after.values())}"
        lines.append(f"  {graph:<28} {result.graph_bytes[graph] / 1e6:8.1f} MB  {total}; {shown}")
        runtime = both.get("runtime") or {}
        added = [f"{op} {n}" for op, n in runtime.items() if op in FUSED_OP_TYPES and n > after.get(op, 0)]
        if added:
            lines.append(f"  {'':<28} {'':>8}     + at load, ONNX Runtime fuses: {', '.join(added)}")
    v = result.validation
    if v:
        vis, tf, gr = v["vision"], v["teacher_forced"], v["greedy"]
        note = f" ({vis['int8_rejected']})" if vis.get("int8_rejected") else ""
        lines.append(f"  vision features vs fp32: cosine min {vis['cosine_min']:.4f}, max abs diff "
                     f"{vis['max_abs_diff']:.3g}{note}")
        lines.append(f"  teacher-forced logits vs fp32 ({tf['positions']} positions): top-1 agreement "
                     f"{tf['top1_agreement']:.1%}, cosine mean {tf['logits_cosine_mean']:.5f}, max abs diff "
                     f"{tf['logits_max_abs_diff']:.3g}")
        prompts = f"{v['prompts']} prompt{'s' if v['prompts'] != 1 else ''}"
        lines.append(f"  greedy tokens vs fp32 ({prompts} x {v['tokens_per_prompt']} tokens): agreement "
                     f"{gr['token_agreement']:.1%}, identical sequences {gr['identical_sequences']}/{v['prompts']}")
        if tf["logits_cosine_mean"] < LOGITS_COSINE_NOTE:
            lines.append(f"  note: logits cosine below {LOGITS_COSINE_NOTE} - answers will differ from fp32; "
                         f"check this variant on real data (or use int8) before deploying it")
    lines.append(f"  done in {result.seconds:.1f} s")
    return lines
