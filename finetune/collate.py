"""LLaVA conversation samples → model inputs: input_ids, labels masked to the answers, pixel values.

The training prompt is the model's own chat template over the whole
multi-turn conversation, cut into segments by rendering its prefixes:

    segment 0  chat_text(processor, first question)   the runtime's exact prompt: user turn with
                                                       the image + generation prompt ("Assistant:")
    answer 0   " 2 circles.<end_of_utterance>\\n"       labelled up to and including the stop token
    user 1     "User: Is it red?<end_of_utterance>\\nAssistant:"
    answer 1   " Yes.<end_of_utterance>\\n"             ...

Segment 0 goes through the processor together with the image, exactly as
``TorchVLM`` prepares a frame at run time, so the first turn's tokens are the
runtime's tokens by construction; later segments are tokenized without special
tokens added. Labels are ``IGNORE_INDEX`` everywhere except the answer tokens
up to and including the first stop token (end-of-utterance / eos, the ids the
runtime stops on); what a template writes after it (a newline) is not learned.
Where a template ends an assistant turn without any stop token, eos is appended
to the answer (as LLaVA's own training does), so the model learns to stop.
A template whose multi-turn rendering does not extend its shorter renderings
cannot be cut this way and is refused.

What it knows nothing about: models, optimizers, LoRA, distributed training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_vit.errors import EdgeVitError
from edge_vit.vlm.base import chat_text

__all__ = ["IGNORE_INDEX", "Encoded", "to_messages", "conversation_segments", "encode_conversation", "collate",
           "load_samples", "InstructDataset"]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Encoded:
    """One sample: ``input_ids``/``labels`` [T] (long), the processor's image tensors, its image-token count."""

    input_ids: Any
    labels: Any
    pixel_values: Any
    pixel_attention_mask: Any | None
    image_tokens: int
    turns: int  # answered turns kept (after truncation)


def to_messages(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA ``[{from: human|gpt, value}]`` → chat messages; the first human turn gets the image.

    The ``<image>`` placeholder (LLaVA writes ``"<image>\\n"`` before the text)
    is removed from the text: the image goes first in the user message, as the
    runtime sends it. Turns must alternate human/gpt starting with human; a
    trailing human turn without an answer is dropped.
    """
    messages: list[dict] = []
    for k, turn in enumerate(conversations):
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(turn.get("from"))
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            raise ValueError(f"turn {k}: expected {{'from': 'human'|'gpt', 'value': str}}")
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise ValueError(f"turn {k}: turns must alternate human, gpt, human, ... (got '{turn.get('from')}')")
        if k == 0:
            text = value.replace(IMAGE_PLACEHOLDER + "\n", "", 1) if value.startswith(IMAGE_PLACEHOLDER) else value
            text = text.replace("\n" + IMAGE_PLACEHOLDER, "", 1).replace(IMAGE_PLACEHOLDER, "", 1).strip()
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            if IMAGE_PLACEHOLDER in value:
                raise ValueError(f"turn {k}: only the first turn may carry the image")
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
    if len(messages) % 2:
        messages.pop()
    if not messages:
        raise ValueError("no question/answer pair")
    return messages


def conversation_segments(processor: Any, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the chat template's rendering of ``messages``."""
    first_text = messages[0]["content"][1]["text"]
    segments: list[tuple[str, bool]] = []
    done = ""
    for k in range(0, len(messages), 2):
        if k == 0:
            prompt = chat_text(processor, first_text)  # the runtime's own prompt builder
        else:
            prompt = processor.apply_chat_template(list(messages[: k + 1]), add_generation_prompt=True)
        answered = processor.apply_chat_template(list(messages[: k + 2]))
        if not prompt.startswith(done) or not answered.startswith(prompt):
            raise EdgeVitError("the model's chat template does not render a conversation as a prefix of its "
                               "longer continuation; answer tokens cannot be located for masking")
        segments.append((prompt[len(done):], False))
        segments.append((answered[len(prompt):], True))
        done = answered
    return segments


def _answer_labels(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Labels of one answer segment: its tokens up to and including the first stop token, the rest ignored."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1] + [IGNORE_INDEX] * (len(ids) - i - 1)
    return list(ids)


def encode_conversation(processor: Any, image: Any, conversations: Sequence[dict], stop_ids: set[int],
                        max_length: int | None = None) -> Encoded:
    """Tokenize one sample; turns that do not fit ``max_length`` are dropped from the end (at least one stays)."""
    import torch

    messages = to_messages(conversations)
    segments = conversation_segments(processor, messages)
    first = processor(text=segments[0][0], images=[image], return_tensors="pt")
    ids: list[int] = first["input_ids"][0].tolist()
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    if max_length is not None and len(ids) >= max_length:
        raise EdgeVitError(f"a first prompt of {len(ids)} tokens (image included) does not fit --max-length "
                           f"{max_length}")
    tok = processor.tokenizer
    turns = 0
    for k in range(1, len(segments), 2):
        answer = tok(segments[k][0], add_special_tokens=False)["input_ids"]
        if not any(t in stop_ids for t in answer) and tok.eos_token_id is not None:
            answer = answer + [tok.eos_token_id]  # a template that ends turns without a stop token: add eos
        piece_ids = ([] if k == 1 else tok(segments[k - 1][0], add_special_tokens=False)["input_ids"]) + answer
        piece_labels = [IGNORE_INDEX] * (len(piece_ids) - len(answer)) + _answer_labels(answer, stop_ids)
        if max_length is not None and len(ids) + len(piece_ids) > max_length:
            if turns == 0:  # the first answer is cut to fit: better a partial answer than no sample
                room = max_length - len(ids)
                ids += piece_ids[:room]
                labels += piece_labels[:room]
                turns = 1
            break
        ids += piece_ids
        labels += piece_labels
        turns += 1
    image_token_id = _image_token_id(processor)
    return Encoded(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        pixel_values=first["pixel_values"],
        pixel_attention_mask=first.get("pixel_attention_mask"),
        image_tokens=int(sum(1 for t in ids if t == image_token_id)),
        turns=turns,
    )


def _image_token_id(processor: Any) -> int:
    tok = processor.tokenizer
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    return int(tok.convert_tokens_to_ids(str(token)))


def collate(samples: Sequence[Encoded], pad_id: int) -> dict:
    """Right-pad to the longest sample; image tiles padded with zeros (Idefics3 drops all-zero tiles)."""
    import torch

    length = max(int(s.input_ids.shape[0]) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(samples):
        t = int(s.input_ids.shape[0])
        input_ids[i, :t] = s.input_ids
        labels[i, :t] = s.labels
        attention[i, :t] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if samples[0].pixel_values.ndim == 5:  # Idefics3: [1, tiles, 3, H, W]
        tiles = max(int(s.pixel_values.shape[1]) for s in samples)
        pv = samples[0].pixel_values
        pixel_values = pv.new_zeros((n, tiles, *pv.shape[2:]))
        masks = None
        if samples[0].pixel_attention_mask is not None:
            pm = samples[0].pixel_attention_mask
            masks = pm.new_zeros((n, tiles, *pm.shape[2:]))
        for i, s in enumerate(samples):
            k = int(s.pixel_values.shape[1])
            pixel_values[i, :k] = s.pixel_values[0]
            if masks is not None:
                masks[i, :k] = s.pixel_attention_mask[0]
        batch["pixel_values"] = pixel_values
        if masks is not None:
            batch["pixel_attention_mask"] = masks
    else:  # LLaVA: [1, 3, H, W]
        batch["pixel_values"] = torch.cat([s.pixel_values for s in samples], dim=0)
    batch["image_tokens"] = torch.tensor([s.image_tokens for s in samples], dtype=torch.long)
    return batch


def load_samples(data: str | Path, image_root: str | Path | None = None) -> tuple[list[dict], Path, dict | None]:
    """Read ``instruct.json``; returns (samples, image root, manifest or None). Every problem is one EdgeVitError.

    Image paths are relative to the dataset root: ``image_root`` if given, else
    the ``dataset.root`` of the ``manifest.json`` next to the data file, else the
    data file's folder. Every image must exist (checked here, before training).
    """
    path = Path(data)
    if not path.is_file():
        raise EdgeVitError(f"data file not found: {path}")
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeVitError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(samples, list) or not samples:
        raise EdgeVitError(f"{path}: expected a non-empty JSON list of LLaVA conversation samples")
    manifest = None
    manifest_path = path.parent / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            raise EdgeVitError(f"{manifest_path}: not valid JSON") from None
    if image_root is not None:
        root = Path(image_root)
    elif manifest and isinstance(manifest.get("dataset"), dict) and manifest["dataset"].get("root"):
        root = Path(manifest["dataset"]["root"])
    else:
        root = path.parent
    for k, s in enumerate(samples):
        if not isinstance(s, dict) or not isinstance(s.get("conversations"), list):
            raise EdgeVitError(f"{path}: sample {k} has no 'conversations' list")
        if not isinstance(s.get("image"), str):
            raise EdgeVitError(f"{path}: sample {k} ({s.get('id', '?')}) has no 'image'; text-only samples are "
                               f"not supported by this recipe")
        try:
            to_messages(s["conversations"])
        except ValueError as exc:
            raise EdgeVitError(f"{path}: sample {k} ({s.get('id', '?')}): {exc}") from None
        if not (root / s["image"]).is_file():
            raise EdgeVitError(f"{path}: sample {k}: image not found: {root / s['image']} (set --image-root?)")
    return samples, root, manifest


class InstructDataset:
    """Map-style dataset: index → :class:`Encoded`; images read with OpenCV and converted as the runtime's frames."""

    def __init__(self, samples: list[dict], image_root: Path, processor: Any, stop_ids: set[int],
                 max_length: int | None = None) -> None:
        self.samples = samples
        self.image_root = Path(image_root)
        self.processor = processor
        self.stop_ids = set(stop_ids)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int):
        import cv2

        from edge_vit.vlm.base import bgr_to_pil

        path = self.image_root / self.samples[i]["image"]
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise EdgeVitError(f"cannot read image {path}")
        return bgr_to_pil(frame)

    def __getitem__(self, i: int) -> Encoded:
        return encode_conversation(self.processor, self.image(i), self.samples[i]["conversations"], self.stop_ids,
                                   self.max_length)
