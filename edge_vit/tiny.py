"""Tiny, locally built models and clips for tests and the offline demo.

Nothing here downloads. Each builder writes a real model folder with
``save_pretrained`` (safetensors, a processor, a locally trained tokenizer), so
tests and ``edge-vit demo`` load it through exactly the code path users take
for hub models. Random weights: the answers are not meaningful, only the
machinery is.

This module must not be imported by the runtime's hot path; it imports
``tokenizers``/``transformers``/``torch`` lazily inside the builders.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

# SmolVLM's chat template (Idefics3): "User:<image>text<end_of_utterance>\nAssistant:"
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# llava-1.5's template: "USER: <image>\ntext ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] }}{% endgeneration %}"
    "{% else %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SHAPE_CLASSES = ("circle", "square", "triangle")
COLOURS = {"red": (40, 40, 220), "green": (60, 180, 60), "blue": (220, 90, 30), "yellow": (30, 220, 230)}

_WORDS = (
    "the a an there is are one two three four five six seven eight nine ten zero no some many "
    "object objects circle circles square squares triangle triangles shape shapes person people car cars "
    "red green blue yellow white black left right top bottom center middle upper lower near far "
    "scene frame image picture camera detected detection count how what where which describe answer "
    "user assistant question yes no and or of in on at to with without it its this that see seen "
    "large small big tiny moving standing safety helmet worker robot box boxes"
).split()


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), f"{rng.randint(0, 999)}")
        lines.append(" ".join(words) + rng.choice([".", "?", ":", ",", "!", " (0.12, 0.5)", " [x1, y1]"]))
    return lines


def build_tokenizer(special_tokens: list[str], vocab_size: int = 600, seed: int = 0):
    """Train a small byte-level BPE on generated text; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    return tok, PreTrainedTokenizerFast


IDEFICS3_SPECIAL_TOKENS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<pad>", "<image>",
                            "<fake_token_around_image>", "<global-img>"]
                           + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def idefics3_tokenizer(raw):
    """Wrap a trained ``tokenizers.Tokenizer`` (with IDEFICS3_SPECIAL_TOKENS) the way SmolVLM's tokenizer is set up."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        model_input_names=["input_ids", "attention_mask"],
    )


def save_idefics3(out_dir: str | Path, tokenizer, *, tile: int, split: bool, vision: dict, text: dict,
                  max_positions: int, seed: int = 0, init=None) -> Path:
    """A randomly initialized Idefics3 (SmolVLM architecture) with its processor, saved to ``out_dir``.

    ``vision``/``text``: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads (text: also
    num_key_value_heads). One ``tile``-pixel tile gives ``(tile/16)^2 / 4`` image tokens; with ``split`` the
    processor splits a frame into 2x2 tiles plus the global one, like SmolVLM does at scale. ``init(model)``,
    if given, sets weights in place before the save (e.g. a pretrained text model: finetune.base_lm).
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    out = Path(out_dir)
    patch, scale = 16, 2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": (2 if split else 1) * tile},
                                               max_image_size={"longest_edge": tile}, do_image_splitting=split),
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(**vision, image_size=tile, patch_size=patch),
        text_config=dict(
            model_type="llama", **text, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    if init is not None:
        init(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_tiny_idefics3(out_dir: str | Path, seed: int = 0, tile: int = 64) -> Path:
    """A tiny SmolVLM-shaped (Idefics3) model with processor, saved to ``out_dir``.

    One ``tile``-pixel tile gives ``(tile/16)^2 / 4`` image tokens (4 at 64 px).
    With ``do_image_splitting`` the processor's default ``size`` (2 tiles a side)
    splits a frame into 4 tiles plus the global one, like SmolVLM does at scale.
    """
    raw, _ = build_tokenizer(IDEFICS3_SPECIAL_TOKENS, seed=seed)
    return save_idefics3(
        out_dir, idefics3_tokenizer(raw), tile=tile, split=True, seed=seed, max_positions=512,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    )


def build_tiny_llava(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny LLaVA (CLIP vision tower, llama text model) with processor, saved to ``out_dir``."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    raw, fast_cls = build_tokenizer(specials, seed=seed)
    tokenizer = fast_cls(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"], model_input_names=["input_ids", "attention_mask"],
    )
    patch = 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=32,
        ),
        text_config=dict(
            model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def render_shapes_frame(
    t: int, width: int = 320, height: int = 240, n_shapes: int = 3, seed: int = 0
) -> tuple[np.ndarray, list[dict]]:
    """One BGR frame of coloured shapes moving on a line; returns the frame and its ground truth."""
    import cv2

    rng = np.random.default_rng(seed)
    frame = np.full((height, width, 3), 235, np.uint8)
    truth = []
    for i in range(n_shapes):
        cls = SHAPE_CLASSES[i % len(SHAPE_CLASSES)]
        colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        colour = COLOURS[colour_name]
        r = int(rng.integers(height // 12, height // 6))
        x0, y0 = rng.integers(r, width - r), rng.integers(r, height - r)
        vx, vy = rng.integers(-4, 5), rng.integers(-3, 4)
        # Bounce inside the frame so every shape stays fully visible.
        cx = _bounce(int(x0 + vx * t), r, width - r)
        cy = _bounce(int(y0 + vy * t), r, height - r)
        if cls == "circle":
            cv2.circle(frame, (cx, cy), r, colour, -1)
        elif cls == "square":
            cv2.rectangle(frame, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(frame, [pts], colour)
        truth.append({"class": cls, "colour": colour_name, "xyxy": [cx - r, cy - r, cx + r, cy + r]})
    return frame, truth


def _bounce(v: int, lo: int, hi: int) -> int:
    span = hi - lo
    if span <= 0:
        return lo
    k = (v - lo) % (2 * span)
    return lo + (k if k <= span else 2 * span - k)


def write_clip(path: str | Path, n_frames: int = 60, fps: float = 15.0, width: int = 320, height: int = 240,
               seed: int = 0) -> Path:
    """Write a short MP4 clip of moving shapes (OpenCV ``mp4v``)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for t in range(n_frames):
            frame, _ = render_shapes_frame(t, width, height, seed=seed)
            writer.write(frame)
    finally:
        writer.release()
    return path


def build_tiny_yolo(out_path: str | Path, imgsz: int = 64) -> Path:
    """A YOLO26n with random weights from its YAML, saved as a ``.pt`` checkpoint Ultralytics loads."""
    from ultralytics import YOLO

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = YOLO("yolo26n.yaml")
    model.save(str(out))
    return out
