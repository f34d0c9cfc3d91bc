"""The ONNX Runtime VLM backend: the three graphs of ``edge-vit export onnx`` on CPU, CUDA or TensorRT.

Same split and same steps as the torch backend: vision encoder (+ connector)
over the processor's tiles, token embedding with the image features put into
the image-token slots, then the decoder over ``inputs_embeds`` with an empty
cache (prefill) and one token at a time with the cache (decode). It yields the
same ``Step``s and ``GenerationStats``.

It loads only an export folder (graphs, config, processor, tokenizer and the
manifest written last by the exporter); it never converts or downloads. Imports
at module load: numpy and onnxruntime. transformers is imported when a folder
is loaded (for the processor); torch and optimum are never needed here.

IO binding: on CUDA/TensorRT the KV cache stays on the device between steps
(outputs bound to device memory and fed back as the next inputs) and the
decode logits land in a preallocated host buffer. On CPU plain ``run`` is as
fast (numpy inputs are not copied; see ``OrtConfig.io_binding``), so the simpler
path is the default there.

Shared KV buffer: when every decoder layer's attention is a com.microsoft
GroupQueryAttention (the ``export.optimize`` variants, read from the manifest at
load), each layer's cache is one preallocated max-length buffer bound as both
``past_key_values.N.*`` and ``present.N.*``; GQA writes the new positions into it
in place instead of returning a new, longer ``present`` every step (+10-16 %
decode tok/s on the int8 SmolVLM-256M decoder; benchmarks/README.md). Plain
exports (standard attention, growing KV ``Concat``) keep the paths above.

Prefill graph: the quantized variants also hold ``decoder_prefill.onnx``, the same
decoder with int8 ``DynamicQuantizeMatMul`` GEMMs, faster than the decode graph's
``MatMulNBits`` over a prompt's many rows. On CPU the prompt goes through it and
every new token through the decoder; both write the same KV buffers (each session
has its own binding of them). An int8 variant written with ``--int8-kernel dynamic``
has that graph as its decoder and no second one.

Huge pages: on CPU (Linux), the memory the decoder session allocates while it loads, its weights, is put on
2 MB pages (``edge_vit.vlm.hugepages``): decode reads all of it every token (+3 % decode tok/s measured).
``OrtConfig(huge_pages=False)`` leaves it on the kernel's default pages.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort

from edge_vit.errors import EdgeVitError, ModelLoadError
from edge_vit.vlm.base import (
    GenerationConfig,
    GenerationStats,
    Step,
    TilingPolicy,
    apply_tiling,
    bgr_to_pil,
    chat_text,
    check_context,
    check_model_type,
    decode_stream,
    stop_token_ids,
)
from edge_vit.vlm.hugepages import HugePageReport, new_memory_on_huge_pages
from export import io_spec

log = logging.getLogger(__name__)


class ExecutionProvider(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


# ORT provider names, best first; CPU last so unsupported nodes still run.
PROVIDER_CHAINS = {
    ExecutionProvider.CPU: ("CPUExecutionProvider",),
    ExecutionProvider.CUDA: ("CUDAExecutionProvider", "CPUExecutionProvider"),
    ExecutionProvider.TENSORRT: ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


@dataclass(frozen=True)
class OrtConfig:
    """How the graphs run: execution provider, device, threads, IO binding."""

    provider: ExecutionProvider = ExecutionProvider.CPU
    device_id: int = 0
    threads: int | None = None  # intra-op threads; None = ONNX Runtime's default (one per physical core)
    io_binding: bool | None = None  # None = on for CUDA/TensorRT, off for CPU (no gain measured there)
    # None = on where the decoder's attention is GroupQueryAttention (optimized exports), off otherwise;
    # True = require it (a plain export is an error); False = the growing-cache paths above.
    share_kv_buffer: bool | None = None
    # decoder_prefill.onnx (export.optimize's int8 variants): None = use it on CPU when the folder has it
    # (its DynamicQuantizeMatMul kernels are CPU ones); True = require it; False = prompts go through the
    # decoder graph too.
    prefill_graph: bool | None = None
    # Linux: the decoder session's memory (its weights) on 2 MB pages after it loads (edge_vit.vlm.hugepages;
    # +3 % decode tok/s measured); None = on for the CPU provider, where decode streams weights from RAM.
    huge_pages: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "provider", ExecutionProvider(self.provider))
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @classmethod
    def for_device(cls, device: str = "cpu", provider: str | ExecutionProvider | None = None,
                   threads: int | None = None, io_binding: bool | None = None) -> "OrtConfig":
        """``device`` as the CLI spells it (cpu, cuda, cuda:1); ``provider`` overrides the provider it implies."""
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise EdgeVitError(f"device must be cpu, cuda or cuda:N for the onnx backend, got '{device}'")
        chosen = ExecutionProvider(provider) if provider is not None else ExecutionProvider(kind)
        return cls(provider=chosen, device_id=int(index or 0), threads=threads, io_binding=io_binding)

    @property
    def uses_huge_pages(self) -> bool:
        return self.huge_pages if self.huge_pages is not None else self.provider is ExecutionProvider.CPU

    @property
    def uses_io_binding(self) -> bool:
        return self.io_binding if self.io_binding is not None else self.provider is not ExecutionProvider.CPU


def provider_list(config: OrtConfig, available: list[str] | None = None) -> list:
    """ORT ``providers=`` for the config; a one-line error naming what to install if the provider is missing."""
    available = list(ort.get_available_providers() if available is None else available)
    chain = PROVIDER_CHAINS[config.provider]
    if chain[0] not in available:
        trt = config.provider is ExecutionProvider.TENSORRT
        extra = " with the TensorRT libraries on the library path" if trt else ""
        raise EdgeVitError(
            f"execution provider '{config.provider.value}' ({chain[0]}) is not available in this onnxruntime "
            f"(available: {', '.join(available)}); install the GPU build: pip install edge-vit[gpu]{extra}"
        )
    options = {"device_id": config.device_id}
    return [(name, options) if name != "CPUExecutionProvider" else name for name in chain if name in available]


def check_onnx_folder(folder: str | Path) -> Path:
    """Cheap check that ``folder`` holds a complete ``edge-vit export onnx`` output; returns it as a Path."""
    path = Path(folder)
    missing = [name for name in io_spec.GRAPH_FILES if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise ModelLoadError(
            f"'{folder}' has no exported ONNX graphs ({', '.join(missing or io_spec.GRAPH_FILES)}); "
            f"run `edge-vit export onnx --vlm MODEL --out {folder}` first"
        )
    if not (path / io_spec.MANIFEST).is_file():
        raise ModelLoadError(
            f"'{folder}' holds graphs but no {io_spec.MANIFEST}: the export did not finish; "
            f"run `edge-vit export onnx --vlm MODEL --out {folder}` again"
        )
    return path


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _session(path: Path, config: OrtConfig, providers: list, *, spin_between_runs: bool = False,
             threads: int | None = None) -> ort.InferenceSession:
    """One graph's session. Each session has its own intra-op thread pool, whose threads by default keep
    spinning for a while after ``Run`` returns: on two cores the vision encoder's spinning threads took
    CPU from the prefill that follows (SmolVLM-256M int8 prefill 235 -> 145 ms without it), the prefill
    graph's from the first decode step. Only the decoder, called once per token, keeps spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    threads = threads or config.threads
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spin_between_runs:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only; ORT warns about every node it leaves on CPU
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


@dataclass
class _Cache:
    """One generation's KV cache: ``past_key_values.*`` (numpy arrays or bound OrtValues) and its length."""

    past: dict[str, Any]
    length: int = 0
    logits: np.ndarray | None = None  # IO binding: preallocated [1, 1, V] host buffer for decode steps
    capacity: int | None = None  # shared KV buffer: positions the buffers hold (None: the cache grows)
    binding: Any = None  # shared KV buffer: the generation's IO binding, caches bound once
    prefill_binding: Any = None  # shared KV buffer: the same caches bound to the prefill session


class _Decoder:
    """decoder_model_merged.onnx; ``run`` extends a ``_Cache`` and returns the last position's logits [V],
    ``run_rows`` the logits of each of the input's positions the graph returns, [R, V]; ``discard`` drops
    the cache's last positions (prompt lookup's rejected drafts).

    The cache lives in the caller's generation, not here, so one loaded model can serve generations
    from several threads.
    """

    def __init__(self, session: ort.InferenceSession, prefill: ort.InferenceSession | None = None,
                 logit_rows: int | None = None) -> None:
        self.session = session
        self.prefill = prefill  # decoder_prefill.onnx: same IO, runs the prompt (sequence > 1) when given
        inputs = {i.name: i for i in session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.")) // 2
        self.past_names = io_spec.past_names(self.num_layers)
        self.present_names = io_spec.present_names(self.num_layers)
        self.output_names = io_spec.decoder_outputs(self.num_layers)
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = _NP_TYPES[first.type]
        self.embed_dtype = _NP_TYPES[inputs["inputs_embeds"].type]
        # export.optimize's graphs return the last position's logits only ([B, 1, V]) or, since prompt lookup,
        # the last few (manifest: optimization.logits_positions); the export's, every one (None)
        rows = session.get_outputs()[0].shape[1]
        self.logit_rows = rows if isinstance(rows, int) else logit_rows
        if prefill is not None and [(i.name, i.type) for i in prefill.get_inputs()] != \
                [(i.name, i.type) for i in session.get_inputs()]:
            raise ModelLoadError(f"{io_spec.DECODER_PREFILL} does not take the inputs of {io_spec.DECODER}")

    def session_for(self, cache: _Cache, seq: int) -> ort.InferenceSession:
        # the prompt only (an empty cache): a prompt-lookup draft is verified by the decode graph, which
        # returns its positions' logits and computes them as the decode steps would
        return self.prefill if seq > 1 and cache.length == 0 and self.prefill is not None else self.session

    def rows_for(self, session: ort.InferenceSession, seq: int) -> int:
        """How many logits rows ``session`` returns for ``seq`` input positions: the prefill graph the last
        position's; the decode graph up to ``logit_rows`` (every position when None)."""
        if session is self.prefill:
            return 1
        return seq if self.logit_rows is None else min(seq, self.logit_rows)

    def run(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run(cache, embeds, attention_mask)[0, -1].copy()  # [V]

    def run_rows(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run(cache, embeds, attention_mask)[0].copy()  # [R, V]

    def discard(self, cache: _Cache, n: int) -> None:
        """Drop the cache's last ``n`` positions."""
        raise NotImplementedError

    def _run(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _empty_past(self) -> np.ndarray:
        return np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)  # [B, H_kv, 0, Dh]

    def new_cache(self, max_length: int | None = None) -> _Cache:
        """An empty cache; ``max_length`` (prompt + new tokens) matters only to the shared-buffer decoder."""
        empty = self._empty_past()
        return _Cache({name: empty for name in self.past_names})

    def _feeds(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        seq = embeds.shape[1]
        return {
            "inputs_embeds": embeds.astype(self.embed_dtype, copy=False),  # [1, S, D]
            "attention_mask": attention_mask,  # [1, P+S]
            "position_ids": np.arange(cache.length, cache.length + seq, dtype=np.int64)[None],  # [1, S]
        }


class _PlainDecoder(_Decoder):
    """``session.run`` with numpy in and out; the cache round-trips through numpy (no copy on CPU)."""

    def discard(self, cache: _Cache, n: int) -> None:
        cache.length -= n
        cache.past = {name: np.ascontiguousarray(value[:, :, : cache.length]) for name, value in cache.past.items()}

    def _run(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = self._feeds(cache, embeds, attention_mask)
        feeds.update(cache.past)
        outputs = self.session_for(cache, embeds.shape[1]).run(self.output_names, feeds)
        cache.past = dict(zip(self.past_names, outputs[1:]))
        cache.length += embeds.shape[1]
        return outputs[0]  # [1, R, V]


class _BoundDecoder(_Decoder):
    """IO binding: the cache stays where the provider computed it; decode logits go to a preallocated buffer."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int,
                 prefill: ort.InferenceSession | None = None, logit_rows: int | None = None) -> None:
        super().__init__(session, prefill, logit_rows)
        self.device, self.device_id = device, device_id
        vocab = session.get_outputs()[0].shape[2]
        self.vocab = int(vocab) if isinstance(vocab, int) else None

    def new_cache(self, max_length: int | None = None) -> _Cache:
        empty = ort.OrtValue.ortvalue_from_numpy(self._empty_past(), self.device, self.device_id)
        logits = np.empty((1, 1, self.vocab), dtype=np.float32) if self.vocab else None
        return _Cache({name: empty for name in self.past_names}, logits=logits)

    def discard(self, cache: _Cache, n: int) -> None:
        # rare (a growing cache on an accelerator): through host memory
        cache.length -= n
        cache.past = {name: ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(value.numpy()[:, :, : cache.length]), self.device, self.device_id)
            for name, value in cache.past.items()}

    def _run(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        session = self.session_for(cache, embeds.shape[1])
        binding = session.io_binding()
        for name, value in self._feeds(cache, embeds, attention_mask).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in cache.past.items():
            binding.bind_ortvalue_input(name, value)
        buffer = cache.logits if self.rows_for(session, embeds.shape[1]) == 1 else None
        if buffer is not None:
            binding.bind_output("logits", "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.past = dict(zip(self.past_names, outputs[1:]))
        cache.length += embeds.shape[1]
        return buffer if buffer is not None else outputs[0].numpy()  # [1, R, V]


class _SharedKVDecoder(_Decoder):
    """GroupQueryAttention graphs: one max-length KV buffer per layer, bound as both past and present.

    GQA sees ``past_key`` and ``present_key`` at the same address and writes the step's keys and values
    at position ``seqlens_k - S + 1`` of the buffer in place; it reads the valid length from the graph's
    ``attention_mask`` (``seqlens_k = sum(mask) - 1``, ``total_sequence_length = mask.shape[1]``, computed
    in the graph by ``export.optimize``), so the mask stays [1, length so far] and ``position_ids`` the
    absolute positions, exactly as on the growing path. Always IO binding (``session.run`` cannot write
    into a given buffer), on CPU too.
    """

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int, max_positions: int,
                 prefill: ort.InferenceSession | None = None, logit_rows: int | None = None) -> None:
        super().__init__(session, prefill, logit_rows)
        self.device, self.device_id = device, device_id
        self.max_positions = int(max_positions)
        vocab = session.get_outputs()[0].shape[2]
        self.vocab = int(vocab) if isinstance(vocab, int) else None

    def new_cache(self, max_length: int | None = None) -> _Cache:
        # Buffer length = this generation's prompt + max_new_tokens (capped at the model's context), not the
        # context itself: that is all it can use, and the buffers stay small (SmolVLM-256M: 46 KB a position
        # over its 60 buffers, 12 MB for a 200-token prompt + 64 tokens vs 377 MB for its 8192 positions).
        # GQA's cost per step follows the valid length, not the buffer's, so the exact fit costs nothing.
        capacity = min(int(max_length), self.max_positions) if max_length else self.max_positions
        shape = (1, self.kv_heads, capacity, self.head_dim)  # [B, H_kv, max_len, Dh]
        # zeroed (not just allocated) so positions past the valid length never hold stale values
        past = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype), self.device,
                                                       self.device_id) for name in self.past_names}
        def bind(session: ort.InferenceSession):
            binding = session.io_binding()
            binding.bind_output("logits", "cpu")  # bound first: output 0 of get_outputs() (rebinding keeps the slot)
            for past_name, present_name in zip(self.past_names, self.present_names):
                binding.bind_ortvalue_input(past_name, past[past_name])
                binding.bind_ortvalue_output(present_name, past[past_name])  # the same buffer: updated in place
            return binding

        logits = np.empty((1, 1, self.vocab), dtype=np.float32) if self.vocab else None
        return _Cache(past, logits=logits, capacity=capacity, binding=bind(self.session),
                      prefill_binding=bind(self.prefill) if self.prefill is not None else None)

    def discard(self, cache: _Cache, n: int) -> None:
        # GQA reads the valid length from attention_mask: positions past it are overwritten by the next run
        cache.length -= n

    def _run(self, cache: _Cache, embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        seq = embeds.shape[1]
        if cache.length + seq > cache.capacity:
            raise RuntimeError(
                f"KV cache full: {cache.length} + {seq} positions exceed the {cache.capacity} the shared buffer "
                f"was allocated for (new_cache(max_length)); allocate it for prompt + max_new_tokens")
        if attention_mask.shape[1] != cache.length + seq:
            raise RuntimeError(f"attention_mask covers {attention_mask.shape[1]} positions, expected "
                               f"{cache.length + seq} (GQA reads the valid cache length from it)")
        session = self.session_for(cache, seq)
        binding = cache.prefill_binding if session is self.prefill else cache.binding
        for name, value in self._feeds(cache, embeds, attention_mask).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        buffer = cache.logits
        rows = self.rows_for(session, seq)
        if buffer is not None and rows > 1:  # a prompt or a lookup draft: a buffer of its own, [1, R, V]
            buffer = np.empty((1, rows, self.vocab), dtype=np.float32)
        if buffer is not None:
            binding.bind_output("logits", "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        cache.length += seq
        return buffer if buffer is not None else binding.get_outputs()[0].numpy()  # [1, R, V]


def uses_group_query_attention(manifest: dict) -> bool:
    """Whether ``export.optimize`` fused every decoder layer's attention into GroupQueryAttention.

    Read from the manifest (the optimizer records the fused count); a partly fused decoder would still
    grow some layers' caches by ``Concat`` and cannot share buffers, so it counts as not fused.
    """
    layers = manifest.get("decoder", {}).get("num_layers")
    fused = (manifest.get("optimization") or {}).get("fusions", {}).get("GroupQueryAttention", 0)
    return bool(layers) and fused == layers


class OnnxVLM:
    """Three ONNX Runtime sessions plus the model's processor, behind the same interface as ``TorchVLM``."""

    def __init__(self, name: str, vision: ort.InferenceSession, embed: ort.InferenceSession, decoder: _Decoder,
                 processor: Any, model_config: Any, tiling: TilingPolicy = TilingPolicy.SINGLE,
                 generation_config: Any = None, manifest: dict | None = None,
                 huge_pages: HugePageReport | None = None) -> None:
        self.name = name
        self.vision = vision  # vision_encoder.onnx
        self.embed = embed  # embed_tokens.onnx
        self.decoder = decoder  # decoder_model_merged.onnx with its cache handling
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tiling = TilingPolicy(tiling)
        self.manifest = manifest or {}
        self.huge_pages = huge_pages or HugePageReport(enabled=False)  # what load() put on 2 MB pages
        self.model_type = check_model_type(model_config.model_type, name)
        text_config = model_config.get_text_config()
        self.max_context = int(getattr(text_config, "max_position_embeddings", 2048))
        image_token = getattr(model_config, "image_token_id", None)
        self.image_token_id = int(image_token if image_token is not None else model_config.image_token_index)
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        self.providers = decoder.session.get_providers()
        self._vision_dtype = _NP_TYPES[vision.get_inputs()[0].type]
        self._warned_lookup = False
        apply_tiling(processor, self.tiling)

    @classmethod
    def load(cls, folder: str | Path, *, ort_config: OrtConfig = OrtConfig(),
             tiling: TilingPolicy = TilingPolicy.SINGLE, trust_remote_code: bool = False) -> "OnnxVLM":
        """Open an ``edge-vit export onnx`` folder: three sessions, its processor, config and manifest."""
        from transformers import AutoConfig, AutoProcessor, GenerationConfig as HFGenerationConfig

        path = check_onnx_folder(folder)
        providers = provider_list(ort_config)  # a missing provider fails before anything loads
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            check_model_type(model_config.model_type, str(folder))
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load ONNX export '{folder}': {str(exc).splitlines()[0]}") from None
        try:
            generation_config = HFGenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        manifest = json.loads((path / io_spec.MANIFEST).read_text(encoding="utf-8"))
        vision = _session(path / io_spec.VISION_ENCODER, ort_config, providers)
        embed = _session(path / io_spec.EMBED_TOKENS, ort_config, providers, threads=1)  # a table lookup: no pool
        with new_memory_on_huge_pages(ort_config.uses_huge_pages) as huge_pages:
            decoder_session = _session(path / io_spec.DECODER, ort_config, providers, spin_between_runs=True)
        has_prefill = (path / io_spec.DECODER_PREFILL).is_file()
        if ort_config.prefill_graph and not has_prefill:
            raise EdgeVitError(f"'{folder}' has no {io_spec.DECODER_PREFILL}: write it with "
                               f"`edge-vit export optimize --quantize int8|int4`")
        use_prefill = has_prefill and (ort_config.prefill_graph if ort_config.prefill_graph is not None
                                       else ort_config.provider is ExecutionProvider.CPU)
        prefill = _session(path / io_spec.DECODER_PREFILL, ort_config, providers) if use_prefill else None
        device = "cpu" if ort_config.provider is ExecutionProvider.CPU else "cuda"
        gqa = uses_group_query_attention(manifest)
        logit_rows = (manifest.get("optimization") or {}).get("logits_positions")
        if ort_config.share_kv_buffer and not gqa:
            raise EdgeVitError(f"'{folder}': a shared KV buffer needs a decoder whose attention is "
                               f"GroupQueryAttention (an `edge-vit export optimize` variant); this one is not")
        if gqa and ort_config.share_kv_buffer is not False:
            max_positions = int(manifest.get("decoder", {}).get("max_positions") or
                                getattr(model_config.get_text_config(), "max_position_embeddings", 2048))
            decoder: _Decoder = _SharedKVDecoder(decoder_session, device, ort_config.device_id, max_positions,
                                                 prefill, logit_rows)
        elif ort_config.uses_io_binding:
            decoder = _BoundDecoder(decoder_session, device, ort_config.device_id, prefill, logit_rows)
        else:
            decoder = _PlainDecoder(decoder_session, prefill, logit_rows)
        return cls(str(folder), vision, embed, decoder, processor, model_config, tiling=tiling,
                   generation_config=generation_config, manifest=manifest, huge_pages=huge_pages)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, image: np.ndarray, prompt: str) -> dict[str, np.ndarray]:
        return dict(self.processor(text=chat_text(self.processor, prompt), images=[bgr_to_pil(image)],
                                   return_tensors="np"))

    def _tiles(self, inputs: dict[str, np.ndarray]) -> np.ndarray:  # -> [tiles, 3, S, S]
        pixels = inputs["pixel_values"]
        if pixels.ndim == 5:  # Idefics3: [1, tiles, 3, S, S] (+ pixel_attention_mask [1, tiles, S, S])
            mask = inputs.get("pixel_attention_mask")
            if mask is not None and not np.all(mask):
                raise RuntimeError("the exported vision encoder takes full tiles only; the processor padded a tile")
            pixels = pixels[0]
        return np.ascontiguousarray(pixels, dtype=self._vision_dtype)

    def _embed(self, input_ids: np.ndarray) -> np.ndarray:  # [1, S] -> [1, S, D]
        return self.embed.run(None, {"input_ids": input_ids.astype(np.int64, copy=False)})[0]

    def generate(
        self,
        image: np.ndarray,
        prompt: str,
        config: GenerationConfig = GenerationConfig(),
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        stats = GenerationStats()
        t_start = time.perf_counter()
        inputs = self._prepare(image, prompt)
        input_ids = inputs["input_ids"].astype(np.int64)  # [1, T]
        stats.prompt_tokens = int(input_ids.shape[1])
        check_context(stats.prompt_tokens, config, self.max_context)
        tiles = self._tiles(inputs)
        t_pre = time.perf_counter()
        stats.preprocess_ms = (t_pre - t_start) * 1000

        feats = self.vision.run(None, {"pixel_values": tiles})[0]  # [tiles, tokens_per_tile, D]
        feats = feats.reshape(-1, feats.shape[-1])  # [N_img, D]
        t_vis = time.perf_counter()
        stats.vision_ms = (t_vis - t_pre) * 1000
        mask = input_ids[0] == self.image_token_id  # [T]
        stats.image_tokens = int(mask.sum())
        stats.tiles = int(tiles.shape[0])
        if stats.image_tokens != feats.shape[0]:
            raise RuntimeError(f"{stats.image_tokens} image tokens in the prompt but {feats.shape[0]} features")
        embeds = self._embed(input_ids)  # [1, T, D]
        embeds[0, mask] = feats.astype(embeds.dtype, copy=False)
        # One ones-row for the whole generation; each step passes a view of it as the attention mask.
        ones = np.ones((1, stats.prompt_tokens + config.max_new_tokens), dtype=np.int64)
        attention = inputs["attention_mask"].astype(np.int64)  # [1, T]
        decoder = self.decoder
        cache = decoder.new_cache(ones.shape[1])  # room for the prompt and every new token
        logits = decoder.run(cache, embeds, attention)  # [V]
        stats.prefill_ms = (time.perf_counter() - t_vis) * 1000

        def step(tokens: list[int]) -> np.ndarray:  # [n, V]
            step_embeds = self._embed(np.array([tokens], dtype=np.int64))  # [1, n, D]
            return decoder.run_rows(cache, step_embeds, ones[:, : cache.length + len(tokens)])

        # prompt lookup needs the logits of every drafted position: as many as the decode graph returns
        if config.lookup_tokens and decoder.logit_rows == 1 and not self._warned_lookup:
            self._warned_lookup = True
            log.warning("%s: its decode graph returns the last position's logits only, so prompt lookup is off; "
                        "write the folder again with `edge-vit export optimize` for it", self.name)
        yield from decode_stream(logits, step, self.tokenizer, self.stop_ids, config, cancel, stats, t_start,
                                 discard=lambda n: decoder.discard(cache, n), prompt_ids=input_ids[0].tolist(),
                                 max_step_tokens=decoder.logit_rows or config.lookup_tokens + 1)
