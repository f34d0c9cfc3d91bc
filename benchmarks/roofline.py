"""The decode roofline: measured memory bandwidth ÷ bytes read per decoded token, and each backend's share of it.

Decoding one token reads every decoder weight once (the transformer layers and the LM head; the embedding
table is a row lookup) plus the KV cache so far, so tokens/s cannot exceed ``bandwidth / bytes_per_token``.

- Bandwidth is measured here, two ways, best of N: a numpy copy of a large array counted as bytes read +
  bytes written (STREAM "Copy", one thread), and a multi-threaded torch sum counted as bytes read. The
  roofline uses the higher of the two, so a backend's share is not overstated.
- Weight bytes come from the model as it runs: the PyTorch parameters at their dtype, the ONNX decoder
  graph's initializers (quantized graphs are smaller), the TensorRT decoder engine's size.
- KV bytes per position: 2 (K and V) × layers × KV heads × head dim × element size; the cache read per token is
  that times the context, averaged over the answer (prompt + half the new tokens).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5, threads: int | None = None) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s): numpy copy (read + write, one thread) and torch sum (read,
    ``threads`` threads, default torch's), best of ``repeats``; ``gb_s`` is the higher one."""
    import torch

    n_bytes = megabytes * 2**20
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    best_copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    del dst
    tensor = torch.from_numpy(src)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        tensor.sum()
        best_read = min(_timed(lambda: tensor.sum()) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    copy_gb_s = 2 * n_bytes / best_copy / 1e9
    read_gb_s = n_bytes / best_read / 1e9
    return {
        "gb_s": round(max(copy_gb_s, read_gb_s), 2),
        "copy_gb_s": round(copy_gb_s, 2),
        "read_gb_s": round(read_gb_s, 2),
        "method": (f"best of {repeats}: numpy copy of {megabytes} MiB counted as read + write (one thread); "
                   f"torch sum of {megabytes} MiB counted as read ({threads or torch.get_num_threads()} threads); "
                   f"the roofline uses the higher"),
        "megabytes": megabytes,
        "repeats": repeats,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kv_bytes_per_position(num_layers: int, num_kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Bytes of K and V for one token position across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * element_bytes


def torch_decoder_bytes(model) -> int:
    """Bytes of the weights one decode step reads in a transformers VLM: the text model's parameters except the
    token embedding table, plus the LM head, at their stored dtype."""
    total = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        in_text = any(part in name for part in ("text_model.", "language_model.", "lm_head."))
        if in_text and "embed_tokens" not in name:
            total += param.numel() * param.element_size()
    return total


def graph_bytes(folder: Path, filename: str) -> int:
    """An ONNX graph's size on disk, external-data files included (``decoder.onnx_data``, ``decoder.onnx.data``)."""
    folder = Path(folder)
    stem = Path(filename).stem
    total = (folder / filename).stat().st_size
    for item in folder.iterdir():
        if item.is_file() and item.name != filename and item.name.startswith((stem + ".onnx_data", stem + ".onnx.data",
                                                                             stem + ".data", filename + "_data")):
            total += item.stat().st_size
    return total


def onnx_decoder_bytes(folder: Path, precision: str) -> tuple[int, str]:
    """Weight bytes one decode step reads from an ONNX export folder, and how they were counted: the decoder's
    initializers (``benchmarks.onnx_speed.decoder_weight_bytes``, rotary tables left out), or the graph's file
    size where that helper is not available."""
    from export import io_spec

    try:
        from benchmarks.onnx_speed import decoder_weight_bytes
    except ImportError:
        return graph_bytes(folder, io_spec.DECODER), f"size of {io_spec.DECODER} ({precision})"
    return decoder_weight_bytes(Path(folder)), f"initializers of {io_spec.DECODER} ({precision})"


def roofline(bandwidth_gb_s: float, weight_bytes: int, kv_position_bytes: int, context_tokens: float,
             measured_tok_s: float | None) -> dict:
    """The roofline tokens/s for this decoder at this context, and the measured share of it."""
    kv_bytes = kv_position_bytes * context_tokens
    per_token = weight_bytes + kv_bytes
    limit = bandwidth_gb_s * 1e9 / per_token if per_token > 0 else 0.0
    out = {
        "bandwidth_gb_s": bandwidth_gb_s,
        "weight_bytes": int(weight_bytes),
        "kv_bytes": int(kv_bytes),
        "bytes_per_token": int(per_token),
        "context_tokens": round(float(context_tokens), 1),
        "roofline_tok_s": round(limit, 2),
        "measured_tok_s": round(measured_tok_s, 2) if measured_tok_s is not None else None,
        "share": round(measured_tok_s / limit, 4) if measured_tok_s and limit else None,
    }
    return out
