"""The TensorRT VLM backend: the engines of ``edge-vit export trt`` run with the TensorRT runtime on one CUDA stream.

Same split and same steps as the torch and onnx backends (vision encoder + connector over the
processor's tiles, token embedding with the image features put into the image-token slots,
decoder prefill, then one token at a time with the KV cache), and the same ``Step``s and
``GenerationStats``.

Memory is allocated once, at load, as torch CUDA tensors (no pycuda): input/output buffers
sized from the engines' optimization-profile maxima, the KV cache as two alternating buffers
per cache tensor sized for the profile's max context (``export.trt_profiles.kv_slots``), one
scratch block shared by every execution context (they never run at the same time), and a
pinned host buffer for the last position's logits. A generation only sets shapes and
addresses and enqueues ``execute_async_v3``; the host waits once per token, for the logits.

The decoder engine has two profiles, prefill and decode, each with its own execution context
(see ``export.trt_profiles``). Loading checks that the engines were built with this TensorRT
version on this GPU model; engines are not portable.

Imports at module load: numpy only. torch, tensorrt and transformers are imported by ``load``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge_vit.errors import EdgeVitError, ModelLoadError, PromptTooLongError
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
from export import io_spec
from export.trt_profiles import (
    DECODE,
    ENGINE_FILES,
    PREFILL,
    TRT_MANIFEST,
    aligned_elements,
    decoder_step_shapes,
    kv_slots,
)


def check_trt_folder(folder: str | Path) -> tuple[Path, dict]:
    """Cheap check that ``folder`` holds a complete ``edge-vit export trt`` build; returns it and its manifest."""
    path = Path(folder)
    missing = [name for name in ENGINE_FILES.values() if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise ModelLoadError(
            f"'{folder}' has no TensorRT engines ({', '.join(missing or ENGINE_FILES.values())}); "
            f"run `edge-vit export trt --onnx-dir ONNX_DIR --out {folder}` first"
        )
    manifest_file = path / TRT_MANIFEST
    if not manifest_file.is_file():
        raise ModelLoadError(
            f"'{folder}' holds engines but no {TRT_MANIFEST}: the build did not finish; build it again"
        )
    return path, json.loads(manifest_file.read_text(encoding="utf-8"))


def check_compatible(manifest: dict, trt_version: str, gpu: str, capability: tuple[int, int]) -> None:
    """Engines run only with the TensorRT version and GPU model (compute capability) they were built for."""
    built_cc = tuple(manifest["device"]["compute_capability"])
    if manifest["tensorrt"] != trt_version or built_cc != tuple(capability):
        raise ModelLoadError(
            f"these engines were built with TensorRT {manifest['tensorrt']} for {manifest['device']['name']} "
            f"(sm_{built_cc[0]}{built_cc[1]}); this is TensorRT {trt_version} on {gpu} "
            f"(sm_{capability[0]}{capability[1]}): rebuild them here with `edge-vit export trt`"
        )


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


def _torch_dtype(torch, dtype):
    """The torch dtype of a ``trt.DataType`` (by its name, e.g. HALF -> torch.float16)."""
    return getattr(torch, _TORCH_DTYPES[dtype.name])


class _Engine:
    """One deserialized engine: one execution context per optimization profile, all on a shared scratch block."""

    def __init__(self, trt, runtime, path: Path) -> None:
        self.trt = trt
        self.name = path.name
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(f"TensorRT could not load {path} (built with another TensorRT version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.num_profiles = self.engine.num_optimization_profiles
        self.contexts: list[Any] = []

    def scratch_bytes(self) -> int:
        get = getattr(self.engine, "get_device_memory_size_for_profile_v2", None) or \
            self.engine.get_device_memory_size_for_profile
        return max(int(get(p)) for p in range(self.num_profiles))

    def create_contexts(self, scratch_ptr: int | None, scratch_size: int, stream_handle: int) -> None:
        trt = self.trt
        for profile in range(self.num_profiles):
            if scratch_ptr is None:
                context = self.engine.create_execution_context()
            else:
                context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if hasattr(context, "set_device_memory"):
                    context.set_device_memory(scratch_ptr, scratch_size)
                else:
                    context.device_memory = scratch_ptr
            if context is None:
                raise ModelLoadError(f"TensorRT could not create an execution context for {self.name}")
            context.set_optimization_profile_async(profile, stream_handle)
            self.contexts.append(context)

    def profile_max(self, name: str, profile: int = 0) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def dtype(self, torch, name: str):
        return _torch_dtype(torch, self.engine.get_tensor_dtype(name))

    def run(self, profile: int, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int],
            stream_handle: int) -> None:
        context = self.contexts[profile]
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise PromptTooLongError(f"{self.name}: input {name} of shape {shape} is outside the engine's "
                                         f"profile {profile}; rebuild with larger limits (edge-vit export trt)")
        for name, address in addresses.items():
            if not context.set_tensor_address(name, address):
                raise RuntimeError(f"{self.name}: TensorRT refused the address of {name} (256-byte alignment)")
        if not context.execute_async_v3(stream_handle):
            raise RuntimeError(f"TensorRT failed to enqueue {self.name} (profile {profile})")


class TrtVLM:
    """Three TensorRT engines plus the model's processor, behind the same interface as ``TorchVLM``/``OnnxVLM``."""

    def __init__(self, folder: Path, manifest: dict, processor: Any, model_config: Any, *, device: str = "cuda",
                 tiling: TilingPolicy = TilingPolicy.SINGLE, generation_config: Any = None) -> None:
        import tensorrt as trt
        import torch

        from export.trt import cuda_capability

        self.folder, self.manifest, self.name = folder, manifest, str(folder)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.tiling = TilingPolicy(tiling)
        self.model_type = check_model_type(model_config.model_type, self.name)
        image_token = getattr(model_config, "image_token_id", None)
        self.image_token_id = int(image_token if image_token is not None else model_config.image_token_index)
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        self.device = torch.device(device)
        torch.cuda.set_device(self.device)
        gpu, capability = cuda_capability()
        check_compatible(manifest, trt.__version__, gpu, capability)
        self._torch, self._trt = torch, trt
        self.stream = torch.cuda.Stream(self.device)
        handle = self.stream.cuda_stream

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.vision = _Engine(trt, self._runtime, folder / ENGINE_FILES[io_spec.VISION_ENCODER])
        self.embed = _Engine(trt, self._runtime, folder / ENGINE_FILES[io_spec.EMBED_TOKENS])
        self.decoder = _Engine(trt, self._runtime, folder / ENGINE_FILES[io_spec.DECODER])
        engines = (self.vision, self.embed, self.decoder)
        # One scratch block for every context: they run one after another on one stream.
        scratch = max(e.scratch_bytes() for e in engines)
        user_managed = hasattr(trt, "ExecutionContextAllocationStrategy")
        self._scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device) if user_managed else None
        for e in engines:
            e.create_contexts(self._scratch.data_ptr() if user_managed else None, scratch, handle)

        # Sizes from the engines' own profiles.
        self.num_layers = int(manifest["decoder"]["num_layers"])
        self.past_names = io_spec.past_names(self.num_layers)
        self.present_names = io_spec.present_names(self.num_layers)
        tiles_max, channels, size, _ = self.vision.profile_max("pixel_values")
        self.max_tiles, self.tile_size = tiles_max, size
        self.max_prompt = self.decoder.profile_max("inputs_embeds", PREFILL)[1]
        self.max_context = self.decoder.profile_max("attention_mask", DECODE)[1]
        _, kv_heads, _, head_dim = self.decoder.profile_max(self.past_names[0], DECODE)
        self.hidden = int(manifest["decoder"]["hidden_size"])
        self.tokens_per_tile = int(manifest["tiling"]["tokens_per_tile"])
        vocab = int(manifest["decoder"]["vocab_size"])
        self._shape = io_spec.DecoderShape(num_layers=self.num_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                                           hidden_size=self.hidden, vocab_size=vocab, max_positions=self.max_context)

        dev = self.device

        def dt(engine: _Engine, name: str):
            return engine.dtype(torch, name)

        self.pixels = torch.empty((tiles_max, channels, size, size), dtype=dt(self.vision, "pixel_values"), device=dev)
        self.features = torch.empty((tiles_max, self.tokens_per_tile, self.hidden),
                                    dtype=dt(self.vision, "image_features"), device=dev)  # [T, N, D]
        self.ids = torch.empty((1, self.max_prompt), dtype=dt(self.embed, "input_ids"), device=dev)
        self.embeds = torch.empty((1, self.max_prompt, self.hidden), dtype=dt(self.decoder, "inputs_embeds"),
                                  device=dev)  # decoder input [1, S, D]
        embed_out = dt(self.embed, "inputs_embeds")
        # The embedding engine writes straight into the decoder's input when the types agree.
        self.embed_out = self.embeds if embed_out == self.embeds.dtype else torch.empty(
            (1, self.max_prompt, self.hidden), dtype=embed_out, device=dev)
        self.ones = torch.ones((1, self.max_context), dtype=dt(self.decoder, "attention_mask"), device=dev)
        self.positions = torch.arange(self.max_prompt, dtype=dt(self.decoder, "position_ids"), device=dev)[None]
        self.step_position = torch.zeros((1, 1), dtype=self.positions.dtype, device=dev)
        self.step_id = torch.zeros((1, 1), dtype=self.ids.dtype, device=dev)
        self.kv_dtype = dt(self.decoder, self.past_names[0])
        # [slot, tensor (past name index), H_kv * max_context * Dh (+ padding to keep 256-byte aligned addresses)]:
        # two alternating caches, each cache tensor contiguous as [1, H_kv, P, Dh] for any P <= max_context.
        per_tensor = aligned_elements(kv_heads * self.max_context * head_dim, self.kv_dtype.itemsize)
        self.kv = torch.empty((2, len(self.past_names), per_tensor), dtype=self.kv_dtype, device=dev)
        rows = 1 if manifest.get("logits", "last") == "last" else self.max_prompt
        self.logits = torch.empty((1, rows, vocab), dtype=dt(self.decoder, "logits"), device=dev)
        self.logits_host = torch.empty((vocab,), dtype=torch.float32, pin_memory=self.device.type == "cuda")
        self._kv_addresses = [
            {name: int(self.kv[slot, i].data_ptr()) for i, name in enumerate(self.past_names)} for slot in (0, 1)
        ]
        apply_tiling(processor, self.tiling)

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cuda", tiling: TilingPolicy = TilingPolicy.SINGLE,
             trust_remote_code: bool = False) -> "TrtVLM":
        from export.trt import cuda_capability, import_tensorrt

        if not str(device).startswith("cuda"):
            raise EdgeVitError(f"the trt backend runs on a CUDA device, got '{device}'")
        path, manifest = check_trt_folder(folder)
        import_tensorrt()  # a missing TensorRT or GPU fails before the processor loads
        cuda_capability()
        from transformers import AutoConfig, AutoProcessor, GenerationConfig as HFGenerationConfig

        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            check_model_type(model_config.model_type, str(folder))
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load TensorRT build '{folder}': {str(exc).splitlines()[0]}") from None
        try:
            generation_config = HFGenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        return cls(path, manifest, processor, model_config, device=device, tiling=tiling,
                   generation_config=generation_config)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ stages (enqueue on self.stream)

    def _prepare(self, image: np.ndarray, prompt: str) -> dict[str, np.ndarray]:
        return dict(self.processor(text=chat_text(self.processor, prompt), images=[bgr_to_pil(image)],
                                   return_tensors="np"))

    def _tiles(self, inputs: dict[str, np.ndarray]) -> np.ndarray:  # -> [tiles, 3, S, S]
        pixels = inputs["pixel_values"]
        if pixels.ndim == 5:  # Idefics3: [1, tiles, 3, S, S]
            mask = inputs.get("pixel_attention_mask")
            if mask is not None and not np.all(mask):
                raise RuntimeError("the exported vision encoder takes full tiles only; the processor padded a tile")
            pixels = pixels[0]
        if pixels.shape[0] > self.max_tiles:
            raise PromptTooLongError(f"the frame makes {pixels.shape[0]} tiles but the engines take at most "
                                     f"{self.max_tiles}; use --tiling single or rebuild with --max-tiles")
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def _vision(self, tiles: np.ndarray) -> int:
        """Tiles -> self.features[:T]; returns T."""
        t = tiles.shape[0]
        self.pixels[:t].copy_(self._torch.from_numpy(tiles), non_blocking=False)
        self.vision.run(0, {"pixel_values": tuple(tiles.shape)},
                        {"pixel_values": self.pixels.data_ptr(), "image_features": self.features.data_ptr()},
                        self.stream.cuda_stream)
        return t

    def _embed_prompt(self, input_ids: np.ndarray, image_mask: np.ndarray, tiles: int) -> None:
        """Prompt ids -> self.embeds[:, :S] with the image features in the image-token slots."""
        torch = self._torch
        s = input_ids.shape[1]
        self.ids[:, :s].copy_(torch.from_numpy(input_ids))
        self.embed.run(PREFILL, {"input_ids": (1, s)},
                       {"input_ids": self.ids.data_ptr(), "inputs_embeds": self.embed_out.data_ptr()},
                       self.stream.cuda_stream)
        if self.embed_out is not self.embeds:
            self.embeds[:, :s].copy_(self.embed_out[:, :s])
        mask = torch.from_numpy(image_mask).to(self.device, non_blocking=False)  # [S] bool
        feats = self.features[:tiles].reshape(-1, self.hidden).to(self.embeds.dtype)  # [N_img, D]
        self.embeds[0, :s][mask] = feats

    def _decoder(self, step: int, past: int, seq: int) -> None:
        """One decoder call over self.embeds[:, :seq]; fills self.logits (last position) and the KV slot of ``step``."""
        read, write = kv_slots(step)
        profile = PREFILL if step == 0 else DECODE
        positions = self.positions if step == 0 else self.step_position
        addresses = {
            "inputs_embeds": self.embeds.data_ptr(),
            "attention_mask": self.ones.data_ptr(),
            "position_ids": positions.data_ptr(),
            "logits": self.logits.data_ptr(),
            **self._kv_addresses[read],
        }
        addresses.update({present: self._kv_addresses[write][past_name]
                          for past_name, present in zip(self.past_names, self.present_names)})
        self.decoder.run(profile, decoder_step_shapes(self._shape, past, seq), addresses, self.stream.cuda_stream)

    def _fetch_logits(self) -> np.ndarray:
        self.logits_host.copy_(self.logits[0, -1], non_blocking=True)
        self.stream.synchronize()
        return self.logits_host.numpy()

    def _decode_step(self, token: int, step: int, past: int) -> np.ndarray:
        """Embed ``token`` into self.embeds[:, :1] and run one decode call at position ``past``."""
        self.step_id.fill_(token)
        self.step_position.fill_(past)
        self.embed.run(DECODE, {"input_ids": (1, 1)},
                       {"input_ids": self.step_id.data_ptr(), "inputs_embeds": self.embed_out.data_ptr()},
                       self.stream.cuda_stream)
        if self.embed_out is not self.embeds:
            self.embeds[:, :1].copy_(self.embed_out[:, :1])
        self._decoder(step, past, 1)
        return self._fetch_logits()

    # ------------------------------------------------------------ generation

    def generate(
        self,
        image: np.ndarray,
        prompt: str,
        config: GenerationConfig = GenerationConfig(),
        cancel: threading.Event | None = None,
    ) -> Iterator[Step]:
        torch = self._torch
        stats = GenerationStats()
        t_start = time.perf_counter()
        inputs = self._prepare(image, prompt)
        input_ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int64)  # [1, T]
        stats.prompt_tokens = int(input_ids.shape[1])
        check_context(stats.prompt_tokens, config, self.max_context)
        if stats.prompt_tokens > self.max_prompt:
            raise PromptTooLongError(f"prompt of {stats.prompt_tokens} tokens (image included) exceeds the engines' "
                                     f"max prompt of {self.max_prompt}; shorten it or rebuild with --max-prompt")
        tiles = self._tiles(inputs)
        mask = input_ids[0] == self.image_token_id  # [T]
        stats.image_tokens = int(mask.sum())
        stats.tiles = int(tiles.shape[0])
        if stats.image_tokens != stats.tiles * self.tokens_per_tile:
            raise RuntimeError(f"{stats.image_tokens} image tokens in the prompt but "
                               f"{stats.tiles * self.tokens_per_tile} features")
        t_pre = time.perf_counter()
        stats.preprocess_ms = (t_pre - t_start) * 1000

        with torch.cuda.stream(self.stream):
            self._vision(tiles)
            self.stream.synchronize()
            t_vis = time.perf_counter()
            stats.vision_ms = (t_vis - t_pre) * 1000
            self._embed_prompt(input_ids, mask, stats.tiles)
            self._decoder(0, 0, stats.prompt_tokens)
            logits = self._fetch_logits()
        stats.prefill_ms = (time.perf_counter() - t_vis) * 1000
        position = {"past": stats.prompt_tokens, "step": 0}

        def step(tokens: list[int]) -> np.ndarray:  # one token a pass (max_step_tokens=1): no prompt lookup
            (token,) = tokens
            position["step"] += 1
            with torch.cuda.stream(self.stream):
                logits = self._decode_step(token, position["step"], position["past"])
            position["past"] += 1
            return logits[None]  # [1, V]

        yield from decode_stream(logits, step, self.tokenizer, self.stop_ids, config, cancel, stats, t_start)
