"""The exported VLM's graph contract: file names, input/output names and dynamic axes, declared once.

The exporter writes graphs with exactly these names; the ONNX Runtime and
TensorRT loaders read them from here. The split (vision encoder + connector,
token embedding, decoder over ``inputs_embeds`` with a KV cache) is the one
transformers.js and onnxruntime-genai use. Pure data and small functions: no
torch, onnx or tensorrt imports.
"""

from __future__ import annotations

from dataclasses import dataclass

VISION_ENCODER = "vision_encoder.onnx"
EMBED_TOKENS = "embed_tokens.onnx"
DECODER = "decoder_model_merged.onnx"
GRAPH_FILES = (VISION_ENCODER, EMBED_TOKENS, DECODER)
# Optional (export.optimize's quantized variants): the same decoder, inputs and outputs as DECODER, with
# int8 GEMMs suited to many rows; the ONNX backend runs the prompt (prefill) through it when present.
DECODER_PREFILL = "decoder_prefill.onnx"
# export.optimize's decode graph returns the logits of the last this-many input positions (1 on a decode step):
# prompt lookup verifies up to LOOKUP_LOGITS_POSITIONS - 1 draft tokens in one pass
LOOKUP_LOGITS_POSITIONS = 16
MANIFEST = "edge_vit_export.json"  # what was exported, from which model, with which options

# vision_encoder.onnx: full tiles only (the processor's pixel_attention_mask is all ones for them).
VISION_INPUTS = ("pixel_values",)  # [tiles, 3, H, W] float32
VISION_OUTPUTS = ("image_features",)  # [tiles, tokens_per_tile, hidden]
VISION_AXES = {"pixel_values": {0: "tiles"}, "image_features": {0: "tiles"}}

# embed_tokens.onnx
EMBED_INPUTS = ("input_ids",)  # [batch, seq] int64
EMBED_OUTPUTS = ("inputs_embeds",)  # [batch, seq, hidden]
EMBED_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}


@dataclass(frozen=True)
class DecoderShape:
    """What the decoder's KV cache looks like, from the text model's config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    @classmethod
    def from_text_config(cls, text_config) -> "DecoderShape":
        heads = text_config.num_attention_heads
        return cls(
            num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            max_positions=getattr(text_config, "max_position_embeddings", 2048),
        )


def past_names(num_layers: int) -> list[str]:
    """Decoder cache inputs, [batch, kv_heads, past_sequence, head_dim] each."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Decoder cache outputs, [batch, kv_heads, past_sequence + sequence, head_dim] each."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def decoder_inputs(num_layers: int) -> list[str]:
    # inputs_embeds [batch, seq, hidden]; attention_mask [batch, past+seq] int64; position_ids [batch, seq] int64
    return ["inputs_embeds", "attention_mask", "position_ids", *past_names(num_layers)]


def decoder_outputs(num_layers: int) -> list[str]:
    # logits [batch, seq, vocab]; [batch, 1, vocab] (the last position) in export.optimize variants and TRT engines
    return ["logits", *present_names(num_layers)]


def decoder_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in past_names(num_layers):
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in present_names(num_layers):
        axes[name] = {0: "batch", 2: "total_sequence"}
    return axes
