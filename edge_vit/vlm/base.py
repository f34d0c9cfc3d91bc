"""What every VLM backend shares: configuration, the streamed step type, prompt building and token streaming.

A backend (torch, onnx, trt) turns (frame, prompt) into a stream of ``Step``s:
text pieces as they are decoded, then one final step carrying ``GenerationStats``.
The shared helpers here know the Hugging Face processor and tokenizer, not the
runtime that executes the graphs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from edge_vit.errors import ModelLoadError, PromptTooLongError


class TilingPolicy(str, Enum):
    """How a frame becomes vision tiles.

    SINGLE: one tile at the vision encoder's resolution (SmolVLM: 64 image tokens). The default
    for streams: SmolVLM's own processor settings split a 512 px frame into 17 tiles (about
    1,100 image tokens, 15-25x the vision cost on a small CPU).
    SPLIT: the processor's own settings (image splitting into a grid plus a global tile).
    """

    SINGLE = "single"
    SPLIT = "split"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # benchmarks set min = max so runs compare
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    # Prompt lookup decoding: up to this many draft tokens per forward pass, copied from what followed the
    # latest earlier occurrence of the answer's last 2-3 tokens in the prompt or the answer, and verified
    # in the same pass (transformers' prompt_lookup_num_tokens, llama.cpp's lookup). 0 = off. The tokens
    # are the ones decoding one at a time would choose; only the number of forward passes changes.
    lookup_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.lookup_tokens < 0:
            raise ValueError("lookup_tokens must be >= 0")


@dataclass
class GenerationStats:
    """Per-stage timings (ms) and token counts of one generation."""

    prompt_tokens: int = 0
    image_tokens: int = 0
    tiles: int = 0
    new_tokens: int = 0
    decode_steps: int = 0  # forward passes after prefill
    draft_tokens: int = 0  # prompt lookup: draft tokens verified
    accepted_tokens: int = 0  # prompt lookup: draft tokens the model agreed with
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    finish_reason: str = "stop"

    @property
    def decode_tokens(self) -> int:
        """Tokens the passes after prefill chose (stop token included): one per pass, plus accepted drafts."""
        return self.decode_steps + self.accepted_tokens

    @property
    def decode_tok_s(self) -> float:
        # The first token comes from prefill; decode speed counts the tokens the passes after it chose.
        n = self.decode_tokens
        return n / (self.decode_ms / 1000.0) if n > 0 and self.decode_ms > 0 else 0.0

    @property
    def acceptance(self) -> float:
        """Share of prompt-lookup draft tokens the model accepted (0 when none were drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def timings(self) -> dict[str, float]:
        return {
            "preprocess": self.preprocess_ms,
            "vision": self.vision_ms,
            "prefill": self.prefill_ms,
            "ttft": self.ttft_ms,
            "decode": self.decode_ms,
            "vlm_total": self.total_ms,
            "decode_tok_s": self.decode_tok_s,
            "prompt_tokens": float(self.prompt_tokens),
            "image_tokens": float(self.image_tokens),
            **({"draft_tokens": float(self.draft_tokens), "accepted_tokens": float(self.accepted_tokens)}
               if self.draft_tokens else {}),
        }


@dataclass(frozen=True)
class Step:
    """One streamed item: a decoded text piece, or (last) the stats of the whole generation."""

    text: str = ""
    token_id: int | None = None
    stats: GenerationStats | None = field(default=None)

    @property
    def done(self) -> bool:
        return self.stats is not None


class VLM(Protocol):
    """A loaded vision-language model that answers one prompt about one frame."""

    name: str
    max_context: int

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self, image: np.ndarray, prompt: str, config: GenerationConfig = ..., cancel: threading.Event | None = None
    ) -> Iterator[Step]: ...


SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm", "llava")


def check_model_type(model_type: str, source: str) -> str:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model type '{model_type}' is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def apply_tiling(processor: Any, policy: TilingPolicy) -> None:
    """Set the processor's tiling once at load time (Idefics3/SmolVLM; LLaVA always uses one image)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and hasattr(image_processor, "do_image_splitting"):
        image_processor.do_image_splitting = policy is TilingPolicy.SPLIT
        if hasattr(image_processor, "do_resize"):
            # Without splitting, Idefics3 first resizes to `size` (SmolVLM: 4 tiles a side, a 4x upscale of a
            # 512-px frame) and then squashes that to one tile: the first resize changes nothing but time
            # (83 -> 14 ms per 640x480 frame for a 512-px tile; pixels within 2/255). One resize, frame -> tile.
            # Splitting needs it: `size` decides the tile grid.
            image_processor.do_resize = policy is TilingPolicy.SPLIT


def chat_text(processor: Any, prompt: str) -> str:
    """The model's own chat template around one image and the prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def bgr_to_pil(image: np.ndarray):
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"expected a BGR image HxWx3, got shape {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))


def stop_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    if isinstance(eou, int) and eou != tokenizer.unk_token_id:
        ids.add(eou)
    return ids


def check_context(prompt_tokens: int, config: GenerationConfig, max_context: int) -> None:
    if prompt_tokens + config.max_new_tokens > max_context:
        raise PromptTooLongError(
            f"prompt of {prompt_tokens} tokens (image included) + {config.max_new_tokens} new tokens "
            f"exceeds the model's context of {max_context}; shorten the prompt or lower the grounding budget"
        )


class TextStreamer:
    """Turns token ids into text deltas, holding back incomplete UTF-8 (byte-level BPE splits characters)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()


# n-gram sizes prompt lookup matches. Single-token matches drafted more often but were mostly rejected: the demo
# VLM's short shapes answers replayed at the SmolVLM-256M int8 pass costs (lookup 2) lost 17% of decode speed
# with a 1-3 window against 7% with 2-3 (benchmarks/lookup_speed.py's replay).
LOOKUP_NGRAM = (2, 3)


def lookup_draft(ids: Sequence[int], num_tokens: int, max_ngram: int = LOOKUP_NGRAM[1],
                 min_ngram: int = LOOKUP_NGRAM[0]) -> list[int]:
    """Prompt lookup: up to ``num_tokens`` ids that followed the latest earlier occurrence of the last n ids.

    Tries n = ``max_ngram`` down to ``min_ngram`` and takes the first n that occurs earlier with at least
    one id after it. The latest occurrence, not the first: an answer that repeats itself repeats its
    latest phrasing. Empty when nothing matches.
    """
    ids = np.asarray(ids, dtype=np.int64)
    length = len(ids)
    if num_tokens < 1:
        return []
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # windows that end before the last id, so each has a continuation; the tail itself is excluded
        windows = np.lib.stride_tricks.sliding_window_view(ids[: length - 1], n)
        hits = np.flatnonzero((windows == ids[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start: start + num_tokens].tolist()
    return []


def decode_stream(
    logits: np.ndarray,
    step: Callable[[list[int]], np.ndarray],
    tokenizer: Any,
    stop_ids: set[int],
    config: GenerationConfig,
    cancel: threading.Event | None,
    stats: GenerationStats,
    t_start: float,
    *,
    discard: Callable[[int], None] | None = None,
    prompt_ids: Sequence[int] = (),
    max_step_tokens: int = 1,
) -> Iterator[Step]:
    """The decode phase every backend shares: choose a token from ``logits`` [V], stream its text, and call
    ``step`` for the next logits until a stop token, ``max_new_tokens`` or ``cancel``; then the stats.

    ``step(tokens)`` appends ``tokens`` to the model's cache in one forward pass and returns the logits after
    each, [len(tokens), V]. With ``config.lookup_tokens`` the tokens are the last chosen one plus a prompt
    lookup draft (``lookup_draft`` over ``prompt_ids`` and the answer so far); the draft is accepted up to the
    first token the model would not have chosen, and ``discard(n)`` drops the cache's last ``n`` positions
    (the rejected rest). A backend without ``discard`` or whose step takes one token
    (``max_step_tokens=1``) decodes one token a pass. ``t_start`` is when the generation began (for time to
    first token); the backend has filled in the prefill part of ``stats``.
    """
    streamer = TextStreamer(tokenizer)
    rng = np.random.default_rng(config.seed)
    draft_limit = min(config.lookup_tokens, max_step_tokens - 1) if discard is not None else 0
    history = [int(i) for i in prompt_ids] if draft_limit else []
    chosen: list[int] = []  # tokens chosen by the last pass that are not yet streamed
    stats.finish_reason = "length"
    t_first = time.perf_counter()
    for i in range(config.max_new_tokens):
        token = chosen.pop(0) if chosen else choose_token(logits, config, i, stop_ids, rng)
        if i == 0:
            t_first = time.perf_counter()
            stats.ttft_ms = (t_first - t_start) * 1000
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        stats.new_tokens += 1
        yield Step(text=streamer.push(token), token_id=token)
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            break
        if i + 1 == config.max_new_tokens:
            break
        if chosen:  # an accepted draft token: already in the cache, its successor already chosen
            continue
        # Drafts stop one short of max_new_tokens: a pass over d drafts yields up to d + 1 tokens.
        draft = []
        if draft_limit:
            history.append(token)
            draft = lookup_draft(history, min(draft_limit, config.max_new_tokens - i - 2))
        rows = step([token, *draft])  # [1 + len(draft), V]
        stats.decode_steps += 1
        for j, row in enumerate(rows[: len(draft) + 1]):
            chosen.append(choose_token(row, config, i + 1 + j, stop_ids, rng))
            if j == len(draft) or chosen[-1] != draft[j] or chosen[-1] in stop_ids:
                break
        accepted = len(chosen) - 1  # drafts matched; the last chosen token is the pass's own next one
        if draft:
            stats.draft_tokens += len(draft)
            stats.accepted_tokens += accepted
            history.extend(chosen[:accepted])
            if accepted < len(draft):
                discard(len(draft) - accepted)
    t_end = time.perf_counter()
    stats.decode_ms = (t_end - t_first) * 1000
    stats.total_ms = (t_end - t_start) * 1000
    yield Step(text="", stats=stats)


def collect(steps: Iterator[Step]) -> tuple[str, GenerationStats]:
    """Run a generation to the end; return the whole text and its stats."""
    pieces: list[str] = []
    stats = GenerationStats()
    for step in steps:
        if step.done:
            stats = step.stats
        else:
            pieces.append(step.text)
    return "".join(pieces).strip(), stats


def choose_token(logits: np.ndarray, config: GenerationConfig, step: int, stop_ids: set[int],
                 rng: np.random.Generator) -> int:
    """Greedy (or temperature sampling) over one logits row [V]; stop tokens are masked before min_new_tokens."""
    logits = np.asarray(logits, dtype=np.float64).copy()
    if step < config.min_new_tokens:
        for i in stop_ids:
            if 0 <= i < logits.shape[-1]:
                logits[i] = -np.inf
    if config.temperature <= 0:
        return int(np.argmax(logits))
    z = logits / config.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(p), p=p))
