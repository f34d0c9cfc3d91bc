"""Real-size VLM architectures with random weights, built offline from the configs in ``export/configs``.

``build_reference_model("smolvlm-256m", out_dir)`` writes a transformers folder
(safetensors, processor, tokenizer) with exactly the architecture of
HuggingFaceTB/SmolVLM-256M-Instruct: the export, parity and speed of the real
model can be checked without downloading it. The tokenizer is a small
byte-level BPE trained locally, padded to the config's vocabulary size with the
SmolVLM special tokens at their real ids, so every id the model can produce
decodes. Random weights: answers are noise, only shapes and costs are real.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
REFERENCE_MODELS = ("smolvlm-256m", "smolvlm-500m")


def config_paths(name: str) -> tuple[Path, Path]:
    """(model config, processor config) of a shipped reference architecture."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model '{name}'; expected one of {', '.join(REFERENCE_MODELS)}")
    return CONFIG_DIR / f"{name}.json", CONFIG_DIR / f"{name}.processor.json"


def load_model_config(name: str):
    """The shipped config as a transformers config object (``_``-prefixed notes dropped)."""
    from transformers import AutoConfig

    model_file, _ = config_paths(name)
    raw = {k: v for k, v in json.loads(model_file.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    return AutoConfig.for_model(model_type, **raw)


def build_padded_tokenizer(vocab_size: int, tokenizer_spec: dict, seed: int = 0):
    """A locally trained BPE padded to ``vocab_size`` ids, special tokens at the ids the spec gives."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from edge_vit.tiny import build_tokenizer

    fixed = dict(tokenizer_spec["special_token_ids"])
    first_row_col = int(tokenizer_spec["row_col_tokens_from"])
    for i, (r, c) in enumerate((r, c) for r in range(1, 7) for c in range(1, 7)):
        fixed[f"<row_{r}_col_{c}>"] = first_row_col + i
    low = sorted((tok for tok, i in fixed.items() if i < 16), key=fixed.get)
    raw, _ = build_tokenizer(low, vocab_size=2000, seed=seed)  # specials below 16 come first, in id order
    spec = json.loads(raw.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    taken = set(vocab.values())
    clash = [tok for tok, i in fixed.items() if i >= 16 and i in taken]
    if clash or any(vocab.get(tok) not in (None, i) for tok, i in fixed.items()):
        raise RuntimeError(f"trained vocabulary collides with the fixed special-token ids: {clash[:3]}")
    by_id = {i: tok for tok, i in fixed.items()}
    for i in range(vocab_size):
        if i in taken:
            continue
        vocab[by_id.get(i, f"<|reserved_{i}|>")] = i
    added = {a["content"] for a in spec["added_tokens"]}
    for tok, i in sorted(fixed.items(), key=lambda kv: kv[1]):
        if tok not in added:
            spec["added_tokens"].append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tokenizer_spec["bos_token"],
        eos_token=tokenizer_spec["eos_token"],
        pad_token=tokenizer_spec["pad_token"],
        unk_token=tokenizer_spec["unk_token"],
        additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        model_input_names=["input_ids", "attention_mask"],
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer


def build_reference_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the random-weight model, its processor and tokenizer to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText, Idefics3ImageProcessor, Idefics3Processor

    from edge_vit.tiny import IDEFICS3_CHAT_TEMPLATE

    config = load_model_config(name)
    _, processor_file = config_paths(name)
    proc_spec = json.loads(processor_file.read_text(encoding="utf-8"))
    text_config = config.get_text_config()
    tokenizer = build_padded_tokenizer(text_config.vocab_size, proc_spec["tokenizer"], seed=seed)
    if tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise RuntimeError("tokenizer's <image> id differs from the config's image_token_id")
    image_processor = Idefics3ImageProcessor(**proc_spec["image_processor"])
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=proc_spec["image_seq_len"], chat_template=IDEFICS3_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
