"""GPTQ for the decoder's ``MatMulNBits`` weights: calibration sequences, Hessians, error-compensated rounding.

``export.optimize`` rounds each weight to its nearest 4-bit level (RTN) unless
``OptimizeOptions(method="gptq")`` asks for GPTQ (Frantar et al., 2022): the
fp32 export answers ``calibration_prompts`` grounded prompts on synthetic frames
(other seeds than the validation's), each prompt and its greedy answer become one
sequence, the fused fp32 decoder runs those sequences with every weight-MatMul's
input as an extra output, and per input the Hessian ``H = sum(x x^T)`` steers the
rounding: each K-row's rounding error is pushed onto the rows not yet rounded,
in proportion to ``H^-1``, so the layer's output on that data changes least. The
grid is the one ``MatMulNBits`` dequantizes without zero points: per output
column and block of K, ``w = (q - 2^(bits-1)) * scale`` with the block's
largest-magnitude value on the grid's end (ONNX Runtime's own symmetric
convention), so the packed codes are exactly what GPTQ chose.

ONNX Runtime ships a GPTQ (``GPTQWeightOnlyQuantConfig``, Intel Neural
Compressor's code) but it works on plain MatMuls with its own session per
input, and it re-rounds GPTQ's values onto a second, asymmetric grid; here the
codes go straight into the same nodes RTN writes, next to the fused attention.

This module must not change a graph's inputs or outputs: the extra outputs exist
only in a temporary copy used to read activations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

# Dampening of H's diagonal, as a fraction of its mean (GPTQ's percdamp): keeps H^-1 well conditioned
# where the calibration data leave directions unexplored.
DEFAULT_DAMP = 0.01


def calibration_sequences(reference_dir: Path, prompts: int, *, skip: int, max_new_tokens: int = 32,
                          threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Decoder feeds (``inputs_embeds``, ``attention_mask``, ``position_ids``) of ``prompts`` sequences.

    Each is a grounded prompt on a synthetic frame (``validation_cases`` after its first ``skip``, so
    disjoint from the validation's) followed by the fp32 export's own greedy answer, as one prefill:
    the decoder sees its image tokens, the grounding and answer text, as it will at run time.
    """
    from edge_vit.vlm.base import GenerationConfig
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig
    from export.optimize import validation_cases

    ref = OnnxVLM.load(reference_dir, ort_config=OrtConfig(threads=threads))
    decoder_run = ref.decoder.run
    embeds: list[np.ndarray] = []

    def recording_run(cache, step_embeds, attention_mask):
        embeds.append(np.array(step_embeds, dtype=np.float32))
        return decoder_run(cache, step_embeds, attention_mask)

    ref.decoder.run = recording_run  # this instance only: the prefill, then each generated token
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    feeds = []
    for frame, prompt in validation_cases(skip + prompts, ref.count_tokens)[skip:]:
        embeds.clear()
        for _ in ref.generate(frame, prompt, config):
            pass
        sequence = np.concatenate(embeds, axis=1)  # [1, T, D]
        length = sequence.shape[1]
        feeds.append({"inputs_embeds": sequence, "attention_mask": np.ones((1, length), np.int64),
                      "position_ids": np.arange(length, dtype=np.int64)[None]})
    return feeds


def weight_matmul_inputs(model) -> dict[str, str]:
    """MatMul node name -> the activation whose statistics GPTQ needs, for each MatMul with a 2-D fp32
    initializer weight. ``lm_head`` behind the last-token Slice reads the hidden states before it (every
    position, not only the last)."""
    from onnx import TensorProto

    from export.trt import LAST_TOKEN_SLICE

    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            continue
        source = producer.get(node.input[0])
        out[node.name] = source.input[0] if source is not None and source.name == LAST_TOKEN_SLICE else node.input[0]
    return out


def matmul_hessians(model, feeds: list[dict[str, np.ndarray]], work_dir: Path,
                    threads: int | None = None) -> dict[str, np.ndarray]:
    """Activation name -> ``sum(x x^T)`` over every row of every feed ([K, K], float64), for the inputs
    of the weight MatMuls, read from a copy of ``model`` that outputs them (``model`` is not changed)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.optimize import _save

    names = sorted(set(weight_matmul_inputs(model).values()))
    probe = copy.deepcopy(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                              if n not in known)
    path = Path(work_dir) / "hessian_probe.onnx"
    _save(probe, path)
    del probe
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    hessians = {n: None for n in names}
    for feed in feeds:
        run_feed = dict(feed)
        for p in past:  # an empty cache: the whole sequence is the prompt
            run_feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
        for name, x in zip(names, session.run(names, run_feed)):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            h = x.T @ x
            hessians[name] = h if hessians[name] is None else hessians[name] + h
    del session
    path.unlink(missing_ok=True)
    (path.parent / (path.name + "_data")).unlink(missing_ok=True)
    return hessians


def symmetric_scales(weight: np.ndarray, bits: int) -> np.ndarray:
    """Per column of ``weight`` [B, N] (one block of K rows): the scale that puts its largest-magnitude
    value on the grid's low end, ``-2^(bits-1)`` (sign kept, as ONNX Runtime's symmetric packing does)."""
    idx = np.abs(weight).argmax(axis=0)
    extreme = weight[idx, np.arange(weight.shape[1])]
    scale = extreme / -float(2 ** (bits - 1))
    scale[scale == 0] = 1.0  # an all-zero block: every code is the centre
    return scale


def gptq_codes(weight: np.ndarray, hessian: np.ndarray, bits: int = 4, block_size: int = 32,
               damp: float = DEFAULT_DAMP, lazy: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of one MatMul weight [K, N] (y = x @ W) with its input Hessian [K, K].

    Returns (codes uint8 [N, blocks, block_size], scales float32 [N, blocks]) on the symmetric grid
    ``w ~ (code - 2^(bits-1)) * scale`` per output column and block of ``block_size`` K-rows (K is padded
    with zero rows to whole blocks). Rows are rounded in order, ``lazy`` at a time (a multiple of the
    block size), each row's error spread over the later rows through the Cholesky factor of ``H^-1``.
    """
    import torch

    k, n = weight.shape
    blocks = -(-k // block_size)
    kp = blocks * block_size
    lazy = max(block_size, lazy // block_size * block_size)
    centre, top = 2 ** (bits - 1), 2 ** bits - 1
    w = torch.zeros((kp, n), dtype=torch.float64)
    w[:k] = torch.from_numpy(np.asarray(weight, dtype=np.float64))
    h = torch.zeros((kp, kp), dtype=torch.float64)
    h[:k, :k] = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    dead = torch.diag(h) == 0  # inputs never active (and the padding): nothing to compensate with
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += torch.eye(kp, dtype=torch.float64) * (damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros((kp, n), dtype=torch.uint8)
    scales = torch.zeros((blocks, n), dtype=torch.float64)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1 = w[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:  # the block's scale from its rows as updated so far
                s = torch.from_numpy(symmetric_scales(w1[i:i + block_size].numpy(), bits))
                scales[row // block_size] = s
            s = scales[row // block_size]
            q = torch.clamp(torch.round(w1[i] / s) + centre, 0, top)
            codes[row] = q.to(torch.uint8)
            e = (w1[i] - (q - centre) * s) / hinv1[i, i]
            w1[i:] -= torch.outer(hinv1[i, i:], e)
            err1[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err1
    return (codes.T.reshape(n, blocks, block_size).numpy().copy(),
            scales.T.numpy().astype(np.float32).copy())


def rtn_codes(weight: np.ndarray, bits: int = 4, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest on the same grid as :func:`gptq_codes` (the reference GPTQ is compared with)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((blocks * block_size, n), np.float64)
    w[:k] = weight
    w = w.reshape(blocks, block_size, n)
    scales = np.stack([symmetric_scales(b, bits) for b in w])  # [blocks, N]
    centre, top = 2 ** (bits - 1), 2 ** bits - 1
    codes = np.clip(np.rint(w / scales[:, None, :]) + centre, 0, top).astype(np.uint8)  # [blocks, B, N]
    return codes.transpose(2, 0, 1).copy(), scales.T.astype(np.float32).copy()


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """codes [N, blocks, B], scales [N, blocks] -> weight [K, N] (float32)."""
    n, blocks, b = codes.shape
    w = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[:, :, None]
    return w.reshape(n, blocks * b)[:, :k].T.copy()


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [N, blocks, B] -> ``MatMulNBits``'s B input [N, blocks, B * bits / 8]: 8-bit as they are,
    4-bit two to a byte, the even element in the low nibble."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"packing supports 4 and 8 bits, not {bits}")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def squared_output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``sum over the calibration rows of |x (W - W')|^2`` = trace(D^T H D): what GPTQ minimizes."""
    d = np.asarray(weight, np.float64) - np.asarray(approx, np.float64)
    return float(np.einsum("kn,kj,jn->", d, hessian, d))
