"""The ONNX Runtime backend against llama.cpp on the same decoder, same machine, interleaved.

    python -m benchmarks.llamacpp_compare --onnx-dir runs/smolvlm-256m-int8 \
        --llama-bench ~/llama.cpp/build/bin/llama-bench --gguf SmolLM2-135M-Q8_0.gguf --rounds 3

llama.cpp is the field's reference CPU engine for small language models, so it answers "is issue 4's
decode target reachable on this CPU at all, by anyone's kernels?". Each round runs ``--runs`` generations
of the product's own path (``OnnxVLM.generate``: one 512 px tile, a grounded prompt of about
``--prompt-tokens``, ``--max-new-tokens`` forced tokens) and then ``llama-bench`` on each GGUF: prompt
processing of the same token count (``-p P -n 0``) and decode of the same count after a context that deep
(``-p 0 -n N -d P``), at the same thread count. Rounds alternate so a change in machine load hits both;
the ratio is paired per round. Prints a table, then one JSON line last.

The GGUF must hold the same decoder architecture (SmolVLM-256M's text model is SmolLM2-135M: 30 layers,
576 wide, 9/3 heads; only the vocabulary differs, 49,152 against 49,280 rows); its weight values do not
matter for speed, so a GGUF requantized from another format (``llama-quantize --allow-requantize``) times
the same. This script does not build or download llama.cpp: it runs the ``llama-bench`` it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path


def llama_bench(binary: str, gguf: Path, threads: int, prompt: int, gen: int, depth: int,
                repetitions: int) -> dict:
    """One llama-bench test (``-o json``): {"tok_s", "samples_tok_s", "model_type", "model_size", "build_commit"}."""
    cmd = [binary, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-d", str(depth),
           "-r", str(repetitions), "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except OSError as exc:
        raise SystemExit(f"llamacpp_compare: cannot run {binary}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        code = done.returncode
        why = ""
        if code in (-signal.SIGILL, 128 + signal.SIGILL):
            # Seen here: -march=native turns on AMX where the CPU flags list it, but this VM traps the
            # instructions (tileloadd); the no-AMX build runs.
            why = (" (illegal instruction: a -march=native build may use AMX or AVX-512 instructions this machine "
                   "or VM does not run; rebuild llama.cpp with CMAKE_C_FLAGS/CMAKE_CXX_FLAGS "
                   "'-mno-amx-tile -mno-amx-int8 -mno-amx-bf16')")
        tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
        raise SystemExit(f"llamacpp_compare: llama-bench exited with {code} on {gguf}{why}"
                         + (f": {tail}" if tail else ""))
    try:
        (test,) = json.loads(done.stdout)
        return {"tok_s": float(test["avg_ts"]), "samples_tok_s": [float(x) for x in test["samples_ts"]],
                "model_type": test.get("model_type"), "model_size": test.get("model_size"),
                "build_commit": test.get("build_commit")}
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"llamacpp_compare: {binary} did not print one llama-bench JSON test "
                         f"(is it llama-bench, with -o json?): {done.stdout[:200]!r}") from None


def onnx_round(vlm, frame, prompt: str, new_tokens: int, runs: int) -> list:
    from edge_vit.vlm.base import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [list(vlm.generate(frame, prompt, config))[-1].stats for _ in range(runs)]


def run(args: argparse.Namespace) -> dict:
    from benchmarks.onnx_speed import benchmark_case
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig

    ggufs = [Path(g) for g in args.gguf.split(",") if g.strip()]
    for g in ggufs:
        if not g.is_file():
            raise SystemExit(f"llamacpp_compare: no GGUF file at {g}")
    vlm = OnnxVLM.load(args.onnx_dir, ort_config=OrtConfig(threads=args.threads))
    frame, prompt = benchmark_case(vlm.count_tokens, args.prompt_tokens,
                                   int(vlm.manifest.get("tiling", {}).get("tokens_per_tile", 64)))
    (warm,) = onnx_round(vlm, frame, prompt, args.max_new_tokens, 1)  # warm-up, not counted
    tokens = warm.prompt_tokens  # llama.cpp gets the same count, image tokens included
    rounds = []
    for _ in range(args.rounds):
        stats = onnx_round(vlm, frame, prompt, args.max_new_tokens, args.runs)
        row = {"onnx": {"decode_tok_s": statistics.median(s.decode_tok_s for s in stats),
                        "prefill_ms": statistics.median(s.prefill_ms for s in stats)},
               "llama_cpp": {}}
        for g in ggufs:
            pp = llama_bench(args.llama_bench, g, args.threads, tokens, 0, 0, args.repetitions)
            tg = llama_bench(args.llama_bench, g, args.threads, 0, args.max_new_tokens, tokens, args.repetitions)
            row["llama_cpp"][g.name] = {"decode_tok_s": tg["tok_s"], "prefill_ms": tokens / pp["tok_s"] * 1000,
                                        "model_type": tg["model_type"], "model_size": tg["model_size"],
                                        "build_commit": tg["build_commit"]}
        rounds.append(row)

    def med(values):
        return round(statistics.median(values), 1)

    summary = {"onnx": {"decode_tok_s": med(r["onnx"]["decode_tok_s"] for r in rounds),
                        "prefill_ms": med(r["onnx"]["prefill_ms"] for r in rounds)}}
    for g in ggufs:
        first = rounds[0]["llama_cpp"][g.name]
        summary[g.name] = {
            "decode_tok_s": med(r["llama_cpp"][g.name]["decode_tok_s"] for r in rounds),
            "prefill_ms": med(r["llama_cpp"][g.name]["prefill_ms"] for r in rounds),
            # paired per round: both measured minutes apart under the same load
            "onnx_decode_ratio": round(statistics.median(
                r["onnx"]["decode_tok_s"] / r["llama_cpp"][g.name]["decode_tok_s"] for r in rounds), 2),
            "model_type": first["model_type"], "model_size_mb": round((first["model_size"] or 0) / 1e6, 1),
            "build_commit": first["build_commit"]}
    return {"benchmark": "llamacpp_compare", "onnx_dir": str(args.onnx_dir),
            "decoder_precision": (vlm.manifest.get("optimization", {}).get("precision") or {}).get(
                "decoder_model_merged.onnx", "fp32"), "threads": args.threads,
            "prompt_tokens": tokens, "new_tokens": args.max_new_tokens, "rounds": rounds, "summary": summary,
            "cpu_count": os.cpu_count()}


def print_table(report: dict) -> None:
    print(f"{report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, {report['threads']} threads, "
          f"medians of {len(report['rounds'])} interleaved rounds")
    print(f"{'engine':<34} {'prefill ms':>10} {'decode tok/s':>12} {'ONNX decode x':>13}")
    onnx = report["summary"]["onnx"]
    print(f"{'ONNX Runtime ' + report['decoder_precision']:<34} {onnx['prefill_ms']:>10.1f} "
          f"{onnx['decode_tok_s']:>12.1f} {'':>13}")
    for name, row in report["summary"].items():
        if name != "onnx":
            print(f"{'llama.cpp ' + name:<34} {row['prefill_ms']:>10.1f} {row['decode_tok_s']:>12.1f} "
                  f"{row['onnx_decode_ratio']:>13.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx-dir", required=True, help="an `edge-vit export onnx`/`export optimize` folder")
    p.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-bench binary")
    p.add_argument("--gguf", required=True, help="comma-separated GGUF files of the same decoder (e.g. Q8_0,Q4_1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ONNX, then each GGUF)")
    p.add_argument("--runs", type=int, default=4, help="ONNX generations per round")
    p.add_argument("--repetitions", type=int, default=5, help="llama-bench -r per test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=158, help="about this many prompt tokens, image included")
    args = p.parse_args(argv)
    for name in ("rounds", "runs", "repetitions", "threads", "max_new_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not Path(args.onnx_dir).is_dir():
        p.error(f"--onnx-dir {args.onnx_dir}: no such folder")
    if shutil.which(args.llama_bench) is None:
        p.error(f"--llama-bench {args.llama_bench}: not an executable (build llama.cpp's llama-bench target)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
