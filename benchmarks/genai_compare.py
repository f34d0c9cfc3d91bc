"""onnxruntime-genai as the decode loop vs our own (``OnnxVLM``), on the same exported graphs.

    python -m benchmarks.genai_compare --model-dir runs/smolvlm-256m-int8 --runs 7
    python -m benchmarks.genai_compare --build-reference smolvlm-256m --model-dir /tmp/genai_eval/int8

Needs ``onnxruntime-genai`` installed (it is not a dependency of edge-vit; ``pip install
onnxruntime-genai``); without it the script exits with a one-line message and measures nothing.

``--model-dir`` is an optimized ``edge-vit export onnx`` folder (``export.optimize``, e.g. int8: GroupQueryAttention +
MatMulNBits). ``--build-reference NAME`` builds the random-weight reference architecture, exports it and makes the
int8 variant there first. The script writes a genai model folder beside it (``MODEL_DIR-genai``): links to the
three graphs, a ``genai_config.json`` for them, and one extra graph, ``embed_tokens_mm.onnx``: our
``embed_tokens.onnx`` (the same Gather, the same weights) with the ``image_features`` input genai's VLM pipeline
feeds to its embedding session, merged at ``<image>`` positions. genai only runs a decoder that takes
``inputs_embeds`` with a separate embedding graph as a VLM (model type ``gemma3`` here: its generic multi-modal
pipeline, vision + embedding + decoder); its decoder-only path with an embedding graph needs the dynamic-batching
Engine, which wants a packed ``[num_tokens]`` embedding and decoder (see benchmarks/README.md).

Text-only prompts (embedding + decoder; the vision encoder is not run): the same ~``--prompt-tokens`` token ids
(a grounded prompt in the chat template) go to both loops, then ``--new-tokens`` greedy tokens (end of sequence
masked so every run decodes all of them). Measured per generation, token ids in hand to last token:

- **ours**: the calls ``OnnxVLM.generate`` makes after vision (``_embed``, ``decoder.run`` over the prompt, then
  ``decode_stream`` with ``decoder.run`` per token), so its own ``GenerationStats``: prefill, TTFT, decode tok/s.
- **genai**: ``Generator`` created, ``append_tokens`` (prefill), ``generate_next_token`` per token; TTFT = ids in
  hand to the first token; decode tok/s = (new tokens - 1) / (last token - first token), as ``decode_stream`` counts.
- **genai-shared**: the same with ``past_present_share_buffer`` (one max-length KV buffer GQA writes in place).

Both run ONNX Runtime on the CPU with ``--threads`` intra-op threads. The variants run interleaved (one generation
each per round, who goes first rotating, one warm-up round excluded) so machine load hits them alike; medians
are reported, with the ratio to ours (of the medians, and the median of the per-round ratios) and whether each
variant's greedy tokens equal ours. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

GENAI_MODEL_TYPE = "gemma3"  # genai's generic VLM pipeline: vision + embedding(input_ids, image_features) + decoder
EMBED_MM = "embed_tokens_mm.onnx"


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise SystemExit("genai_compare: onnxruntime-genai is not installed (pip install onnxruntime-genai); "
                         "nothing measured") from None
    return og


def write_multimodal_embedding(src: Path, dst: Path, image_token_id: int, hidden: int) -> None:
    """``embed_tokens.onnx`` plus an ``image_features`` input ([N, D] or [tiles, T, D]) put at the ``<image>`` ids."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if [n.op_type for n in graph.node] != ["Gather"]:
        raise RuntimeError(f"{src}: expected a single Gather (the token embedding)")
    graph.node[0].output[0] = "text_embeds"
    del graph.output[:]
    # any rank: [N, D] from genai for text-only prompts, [tiles, tokens_per_tile, D] from our vision encoder
    graph.input.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT, None))
    graph.output.append(
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", hidden]))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(image_token_id, np.int64), "image_token_id"),
        numpy_helper.from_array(np.zeros((1, hidden), np.float32), "zero_row"),
        numpy_helper.from_array(np.array(-1, np.int64), "last_axis"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axes"),
        numpy_helper.from_array(np.array([-1, hidden], np.int64), "feature_rows_shape"),
    ])
    graph.node.extend([
        helper.make_node("Reshape", ["image_features", "feature_rows_shape"], ["feature_rows"]),  # [N, D]
        helper.make_node("Equal", ["input_ids", "image_token_id"], ["is_image"]),  # [B, S]
        helper.make_node("Cast", ["is_image"], ["is_image_i"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["is_image_i", "last_axis"], ["image_rank"]),  # k at the k-th image token
        helper.make_node("Mul", ["image_rank", "is_image_i"], ["feature_row"]),  # 0 at text tokens
        helper.make_node("Concat", ["zero_row", "feature_rows"], ["features_padded"], axis=0),
        helper.make_node("Gather", ["features_padded", "feature_row"], ["image_embeds"]),  # [B, S, D]
        helper.make_node("Unsqueeze", ["is_image", "last_axes"], ["is_image_3d"]),
        helper.make_node("Where", ["is_image_3d", "image_embeds", "text_embeds"], ["inputs_embeds"]),
    ])
    onnx.save(model, str(dst))


def genai_config(manifest: dict, model_config: dict, generation_config: dict, threads: int) -> dict:
    """genai_config.json for our three graphs (decoder contract: export/io_spec.py)."""
    dec = manifest["decoder"]
    text = model_config.get("text_config", {})

    def token_id(key: str, default: int):
        for source in (generation_config, text, model_config):
            if source.get(key) is not None:
                return source[key]
        return default
    session = {"log_id": "onnxruntime-genai", "provider_options": [], "intra_op_num_threads": threads,
               "inter_op_num_threads": 1}
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": token_id("bos_token_id", 1),
            "eos_token_id": token_id("eos_token_id", 2),
            "pad_token_id": token_id("pad_token_id", 2),
            "context_length": dec["max_positions"],
            "vocab_size": dec["vocab_size"],
            "vision": {
                "filename": "vision_encoder.onnx", "session_options": dict(session),
                "inputs": {"pixel_values": "pixel_values"}, "outputs": {"image_features": "image_features"},
            },
            "embedding": {
                "filename": EMBED_MM, "session_options": dict(session),
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "decoder": {
                "filename": "decoder_model_merged.onnx", "session_options": dict(session),
                "head_size": dec["head_dim"], "hidden_size": dec["hidden_size"],
                "num_attention_heads": text.get("num_attention_heads"), "num_key_value_heads": dec["num_kv_heads"],
                "num_hidden_layers": dec["num_layers"],
                "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": dec["max_positions"],
                   "min_length": 0, "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def prepare_genai_folder(model_dir: Path, out: Path, threads: int) -> Path:
    from export import io_spec

    manifest = json.loads((model_dir / io_spec.MANIFEST).read_text(encoding="utf-8"))
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    generation_file = model_dir / "generation_config.json"
    generation_config = json.loads(generation_file.read_text(encoding="utf-8")) if generation_file.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    for name in io_spec.GRAPH_FILES:
        link = out / name
        if not link.exists():
            link.symlink_to((model_dir / name).resolve())
    if not (out / EMBED_MM).is_file():
        write_multimodal_embedding(model_dir / io_spec.EMBED_TOKENS, out / EMBED_MM,
                                   int(manifest["image_token_id"]), int(manifest["decoder"]["hidden_size"]))
    config = genai_config(manifest, model_config, generation_config, threads)
    (out / "genai_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def prompt_ids(vlm, prompt_tokens: int) -> list[int]:
    """A grounded prompt of about ``prompt_tokens`` tokens in the model's chat template, text only."""
    from benchmarks.onnx_speed import benchmark_case

    _, prompt = benchmark_case(vlm.count_tokens, prompt_tokens, image_tokens=0)
    extra = " Name each shape's colour, position and size in one short sentence."
    while True:  # the synthetic scene grounds to fewer tokens than asked: lengthen the instruction
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(vlm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= prompt_tokens:
            return ids
        prompt += extra


def run_ours(vlm, ids: list[int], new_tokens: int) -> dict:
    """``OnnxVLM.generate`` after its vision step, on token ids: its own cache, decoder.run and decode_stream."""
    import numpy as np

    from edge_vit.vlm.base import GenerationConfig, GenerationStats, decode_stream

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    stats = GenerationStats()
    t_start = time.perf_counter()
    input_ids = np.array([ids], dtype=np.int64)
    stats.prompt_tokens = len(ids)
    embeds = vlm._embed(input_ids)
    ones = np.ones((1, len(ids) + new_tokens), dtype=np.int64)
    decoder = vlm.decoder
    cache = decoder.new_cache()
    logits = decoder.run(cache, embeds, ones[:, : len(ids)])
    stats.prefill_ms = (time.perf_counter() - t_start) * 1000

    def step(tokens: list[int]):  # one token a pass: [1, V]
        return decoder.run_rows(cache, vlm._embed(np.array([tokens], dtype=np.int64)),
                                ones[:, : cache.length + len(tokens)])

    steps = list(decode_stream(logits, step, vlm.tokenizer, vlm.stop_ids, config, None, stats, t_start))
    return {"tokens": [s.token_id for s in steps if not s.done], "prefill_ms": stats.prefill_ms,
            "ttft_ms": stats.ttft_ms, "decode_tok_s": stats.decode_tok_s}


def run_genai(og, model, ids: list[int], new_tokens: int) -> dict:
    import numpy as np

    total = len(ids) + new_tokens
    t_start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)  # min: no early end of sequence
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    t_prefill = time.perf_counter()
    generator.generate_next_token()
    tokens = [int(generator.get_next_tokens()[0])]
    t_first = time.perf_counter()
    while len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    t_end = time.perf_counter()
    return {"tokens": tokens, "prefill_ms": (t_prefill - t_start) * 1000, "ttft_ms": (t_first - t_start) * 1000,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_first) if new_tokens > 1 else 0.0}


def loaded_ort_libraries() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps.splitlines() if "libonnxruntime" in line and "/" in line})


def build_reference(name: str, model_dir: Path) -> None:
    from export import io_spec
    from export.onnx_export import export_vlm_onnx
    from export.optimize import OptimizeOptions, optimize_onnx_folder
    from export.reference_models import build_reference_model

    if (model_dir / io_spec.MANIFEST).is_file():
        return
    fp32 = model_dir.with_name(model_dir.name + "-fp32")
    if not (fp32 / io_spec.MANIFEST).is_file():
        print(f"building {name} and exporting it to {fp32} ...", file=sys.stderr, flush=True)
        export_vlm_onnx(build_reference_model(name, model_dir.with_name(model_dir.name + "-source")), fp32)
    print(f"optimizing {fp32} -> {model_dir} (int8) ...", file=sys.stderr, flush=True)
    optimize_onnx_folder(fp32, model_dir, OptimizeOptions(quantize="int8", quantize_vision=False, validate=False))


def run(args: argparse.Namespace) -> dict:
    og = import_genai()
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig

    model_dir = Path(args.model_dir)
    if args.build_reference:
        build_reference(args.build_reference, model_dir)
    genai_dir = prepare_genai_folder(model_dir, Path(args.genai_dir) if args.genai_dir else
                                     model_dir.with_name(model_dir.name + "-genai"), args.threads)
    vlm = OnnxVLM.load(model_dir, ort_config=OrtConfig(threads=args.threads))
    models = {}
    for name, shared in (("genai", False), ("genai-shared", True)):
        config = og.Config(str(genai_dir))
        config.overlay(json.dumps({"search": {"past_present_share_buffer": shared}}))
        models[name] = og.Model(config)
    ids = prompt_ids(vlm, args.prompt_tokens)
    runners = {"ours": lambda: run_ours(vlm, ids, args.new_tokens)}
    for name, model in models.items():
        runners[name] = lambda model=model: run_genai(og, model, ids, args.new_tokens)

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    for round_ in range(args.runs + 1):  # round 0 is the warm-up
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate who goes first
            result = runners[name]()
            if round_ > 0:
                runs[name].append(result)
        print(f"round {round_}/{args.runs} done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    reference = runs["ours"][0]["tokens"]
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("prefill_ms", "ttft_ms", "decode_tok_s")}
           for name, rs in runs.items()}
    results = []
    for name, rs in runs.items():
        m = med[name]
        results.append({
            "loop": name, "runs": len(rs),
            "prefill_ms": round(m["prefill_ms"], 1), "ttft_ms": round(m["ttft_ms"], 1),
            "decode_tok_s": round(m["decode_tok_s"], 2),
            "decode_tok_s_min_max": [round(min(r["decode_tok_s"] for r in rs), 2),
                                     round(max(r["decode_tok_s"] for r in rs), 2)],
            "ttft_ms_min_max": [round(min(r["ttft_ms"] for r in rs), 1), round(max(r["ttft_ms"] for r in rs), 1)],
            "decode_vs_ours": round(m["decode_tok_s"] / med["ours"]["decode_tok_s"], 3),
            "ttft_vs_ours": round(m["ttft_ms"] / med["ours"]["ttft_ms"], 3),
            # the same ratios per round (both measured seconds apart), then their median: less load noise
            "decode_vs_ours_paired": round(statistics.median(
                r["decode_tok_s"] / o["decode_tok_s"] for r, o in zip(rs, runs["ours"])), 3),
            "ttft_vs_ours_paired": round(statistics.median(
                r["ttft_ms"] / o["ttft_ms"] for r, o in zip(rs, runs["ours"])), 3),
            "same_tokens_as_ours": all(r["tokens"] == reference for r in rs),
            "first_tokens": rs[0]["tokens"][:8],
        })
    return {"benchmark": "genai_compare", "model_dir": str(model_dir), "genai_dir": str(genai_dir),
            "genai_model_type": GENAI_MODEL_TYPE, "onnxruntime_genai": og.__version__ if hasattr(og, "__version__")
            else None, "ort_libraries": loaded_ort_libraries(), "threads": args.threads,
            "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "runs": args.runs,
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)], "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}


def print_table(report: dict) -> None:
    print(f"prompt {report['prompt_tokens']} tokens (text only), {report['new_tokens']} new tokens greedy, "
          f"{report['threads']} threads, medians of {report['runs']} interleaved runs; load {report['loadavg_1min']}")
    print(f"{'loop':<13} {'prefill ms':>10} {'TTFT ms':>8} {'x ours':>7} {'paired':>7} {'decode tok/s':>12} "
          f"{'x ours':>7} {'paired':>7} {'same tokens':>11}")
    for r in report["results"]:
        print(f"{r['loop']:<13} {r['prefill_ms']:>10.1f} {r['ttft_ms']:>8.1f} {r['ttft_vs_ours']:>7.2f} "
              f"{r['ttft_vs_ours_paired']:>7.2f} {r['decode_tok_s']:>12.2f} {r['decode_vs_ours']:>7.2f} "
              f"{r['decode_vs_ours_paired']:>7.2f} {str(r['same_tokens_as_ours']):>11}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.genai_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="optimized (e.g. int8) `edge-vit export onnx` folder")
    p.add_argument("--build-reference", default=None, metavar="NAME",
                   help="if MODEL_DIR has no export: build this reference architecture (smolvlm-256m), export "
                        "it to MODEL_DIR-fp32 and optimize it to int8 in MODEL_DIR")
    p.add_argument("--genai-dir", default=None, help="where the genai model folder goes (default: MODEL_DIR-genai)")
    p.add_argument("--runs", type=int, default=7, help="measured generations per loop (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both loops")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=150, help="about this many prompt tokens")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
