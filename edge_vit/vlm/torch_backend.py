"""The PyTorch VLM backend: transformers models (Idefics3/SmolVLM, LLaVA) with SDPA attention and a KV cache.

Generation is split the way the exported graphs are: vision encoder (+ connector),
token embedding with the image features scattered into the image-token slots,
then the decoder over ``inputs_embeds`` (prefill) and one token at a time with
the cache (decode). It yields text pieces as they are decoded.

Loading reads local folders or the Hugging Face cache; it never runs remote
code unless ``trust_remote_code`` is asked for.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge_vit.errors import ModelLoadError
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

DTYPES = ("float32", "bfloat16", "float16")


def check_model_folder(model_id: str) -> None:
    """A local path must be a model folder with config.json (transformers would otherwise guess from its name)."""
    path = Path(model_id)
    if not path.exists():
        return  # a hub id: resolved from the local cache (or downloaded when online)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load VLM '{model_id}': expected a transformers model folder "
            f"(config.json, safetensors weights, processor files) or a hub id"
        )


class TorchVLM:
    """A transformers image-text-to-text model plus its processor."""

    def __init__(self, model: Any, processor: Any, name: str, tiling: TilingPolicy = TilingPolicy.SINGLE) -> None:
        import torch

        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.tiling = TilingPolicy(tiling)
        config = model.config
        self.model_type = check_model_type(config.model_type, name)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 2048))
        self.image_token_id = int(
            getattr(config, "image_token_id", None) if getattr(config, "image_token_id", None) is not None
            else config.image_token_index
        )
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(model, "generation_config", None))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._embed = model.get_input_embeddings()
        self._torch = torch
        apply_tiling(processor, self.tiling)

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        tiling: TilingPolicy = TilingPolicy.SINGLE,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
    ) -> "TorchVLM":
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        check_model_folder(model_id)
        try:
            config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load VLM '{model_id}': expected a transformers model folder (config.json, "
                f"safetensors weights, processor files) or a hub id already in the local cache "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        check_model_type(config.model_type, model_id)
        try:
            processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                model_id,
                dtype=getattr(torch, dtype),
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load VLM '{model_id}': {str(exc).splitlines()[0]}") from None
        model = model.to(device).eval()
        return cls(model, processor, name=str(model_id), tiling=tiling)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, image: np.ndarray, prompt: str) -> dict:
        inputs = self.processor(text=chat_text(self.processor, prompt), images=[bgr_to_pil(image)], return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _image_features(self, inputs: dict):  # -> [tiles * tokens_per_tile, D]
        if self.model_type == "llava":
            feats = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.dtype))
        else:
            feats = self.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(self.dtype),
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
            )
        if isinstance(feats, (list, tuple)):
            feats = self._torch.cat(list(feats), dim=0)
        return feats.reshape(-1, feats.shape[-1])

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
        input_ids = inputs["input_ids"]  # [1, T]
        stats.prompt_tokens = int(input_ids.shape[1])
        check_context(stats.prompt_tokens, config, self.max_context)
        t_pre = time.perf_counter()
        stats.preprocess_ms = (t_pre - t_start) * 1000

        with torch.inference_mode():
            feats = self._image_features(inputs)  # [N_img, D]
            t_vis = time.perf_counter()
            stats.vision_ms = (t_vis - t_pre) * 1000
            mask = input_ids == self.image_token_id  # [1, T]
            stats.image_tokens = int(mask.sum())
            stats.tiles = int(inputs["pixel_values"].shape[1]) if inputs["pixel_values"].ndim == 5 else 1
            if stats.image_tokens != feats.shape[0]:
                raise RuntimeError(f"{stats.image_tokens} image tokens in the prompt but {feats.shape[0]} features")
            embeds = self._embed(input_ids)  # [1, T, D]
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
            attention = inputs["attention_mask"]
            out = self.model(inputs_embeds=embeds, attention_mask=attention, use_cache=True)
            logits = out.logits[0, -1].float().cpu().numpy()  # [V]
            t_prefill = time.perf_counter()
            stats.prefill_ms = (t_prefill - t_vis) * 1000

            state = {"past": out.past_key_values, "attention": attention}

            def step(tokens: list[int]) -> np.ndarray:  # [n, V]: the logits after each of the tokens
                attention = state["attention"]
                state["attention"] = torch.cat([attention, attention.new_ones((1, len(tokens)))], dim=1)
                out = self.model(
                    input_ids=torch.tensor([tokens], device=self.device),
                    attention_mask=state["attention"],
                    past_key_values=state["past"],
                    use_cache=True,
                )
                state["past"] = out.past_key_values
                return out.logits[0].float().cpu().numpy()

            def discard(n: int) -> None:  # prompt lookup: drop the rejected draft's positions
                state["past"].crop(state["past"].get_seq_length() - n)
                state["attention"] = state["attention"][:, :-n]

            yield from decode_stream(logits, step, self.tokenizer, self.stop_ids, config, cancel, stats, t_start,
                                     discard=discard, prompt_ids=input_ids[0].tolist(),
                                     max_step_tokens=config.lookup_tokens + 1)
