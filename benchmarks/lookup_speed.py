"""Prompt lookup decoding: how many tokens a forward pass yields on real answers, and what that is worth.

    python -m benchmarks.lookup_speed --lookup 1,2,4
    python -m benchmarks.lookup_speed --lookup 1,2,4 --pass-cost runs/smolvlm-256m-int8

Part 1 runs the shipped demo VLM (trained weights, ``edge_vit/assets/demo``; or ``--vlm``, torch or ONNX
with ``--backend``) on the shapes benchmark's frames, grounded by the demo detector as ``edge-vit run``
grounds them, two kinds of questions: the benchmark's short ones (count, exists, colour, position, size) and
"Describe the image in detail.". Each answer is generated without lookup and with each ``--lookup N``,
interleaved; it reports whether the tokens are the same, draft acceptance, tokens per forward pass and the
paired ratio of decode tok/s. The demo VLM is tiny, so its own tok/s says little about a real-size model.

Part 2 (``--pass-cost DIR``, an ``edge-vit export optimize`` folder, e.g. the SmolVLM-256M architecture with
random weights: cost does not depend on weight values) measures what a decode-graph pass over 1..16 tokens
costs after a 200-token prompt, and replays part 1's answers against that cost curve: the decode speed-up
the acceptance pattern of real answers gives at that model's pass costs. A model, not a measurement of a
real-size trained model's answers (none can be downloaded here); it says so in its output.
Prints tables, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "edge_vit" / "assets" / "demo"
DESCRIBE = "Describe the image in detail."
SHORT_KINDS = ("count", "exists", "colour", "position", "size")


def collect_answers(vlm, detector, grounding, images: int, lookups: list[int], max_new_tokens: int) -> list[dict]:
    """Every benchmark question and one description per frame, each answered with lookup off and at each N."""
    import cv2

    from edge_vit.grounding import ground
    from edge_vit.vlm import GenerationConfig
    from edge_vit.vlm.base import bgr_to_pil, chat_text
    from finetune.evaluate import BenchConfig, render_benchmark

    root = Path(tempfile.mkdtemp(prefix="edge-vit-lookup-"))
    items, _ = render_benchmark(root, BenchConfig(seed=2026, size=images, kinds=SHORT_KINDS))
    records, described = [], set()
    for item in items:
        frame = cv2.imread(str(root / item.image), cv2.IMREAD_COLOR)
        detections, _ = detector.detect(frame)
        questions = [("short", item.question)]
        if item.image not in described:
            described.add(item.image)
            questions.append(("describe", DESCRIBE))
        for kind, question in questions:
            prompt = ground(detections, question, grounding, count_tokens=vlm.count_tokens).text
            ids = vlm.processor(text=chat_text(vlm.processor, prompt), images=[bgr_to_pil(frame)],
                                return_tensors="np")["input_ids"][0].tolist()
            record = {"kind": kind, "prompt_ids": ids, "runs": {}}
            for n in [0, *lookups]:
                steps = list(vlm.generate(frame, prompt, GenerationConfig(max_new_tokens=max_new_tokens,
                                                                          lookup_tokens=n)))
                stats = steps[-1].stats
                record["runs"][n] = {"tokens": [s.token_id for s in steps[:-1]], "passes": stats.decode_steps,
                                     "decoded": stats.decode_tokens, "drafts": stats.draft_tokens,
                                     "accepted": stats.accepted_tokens, "decode_ms": stats.decode_ms}
            records.append(record)
    return records


def summarize(records: list[dict], lookups: list[int]) -> dict:
    out = {}
    for kind in ("short", "describe"):
        rows = [r for r in records if r["kind"] == kind]
        base = [r["runs"][0] for r in rows]
        out[kind] = {"answers": len(rows), "mean_tokens": round(statistics.mean(len(b["tokens"]) for b in base), 1)}
        for n in lookups:
            runs = [r["runs"][n] for r in rows]
            ratios = [b["decode_ms"] / o["decode_ms"] for b, o in zip(base, runs) if o["decode_ms"] > 0 and b["decoded"]]
            out[kind][n] = {
                "same_tokens": sum(o["tokens"] == b["tokens"] for b, o in zip(base, runs)),
                "acceptance": round(sum(o["accepted"] for o in runs) / max(1, sum(o["drafts"] for o in runs)), 3),
                "tokens_per_pass": round(sum(o["decoded"] for o in runs) / max(1, sum(o["passes"] for o in runs)), 3),
                "decode_speedup_paired": round(statistics.median(ratios), 3) if ratios else None,
            }
    return out


def pass_costs(folder: Path, threads: int, rounds: int, sizes=range(1, 17)) -> dict[int, float]:
    """Median ms of one decode-graph pass over n tokens after a 200-token prompt (the product's decoder path)."""
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig

    vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=threads))
    decoder, hidden = vlm.decoder, int(vlm.manifest["decoder"]["hidden_size"])
    if decoder.logit_rows is not None and decoder.logit_rows < max(sizes):
        raise SystemExit(f"{folder}: its decode graph returns {decoder.logit_rows} logits row(s); write it again "
                         f"with `edge-vit export optimize`")
    rng = np.random.default_rng(0)
    ones = np.ones((1, 256), np.int64)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:  # interleaved, so a change in load hits every size alike
            cache = decoder.new_cache(256)
            decoder.run(cache, rng.standard_normal((1, 200, hidden), dtype=np.float32), ones[:, :200])
            for _ in range(2):  # the step after a prompt is slower (caches, spinning threads)
                decoder.run(cache, rng.standard_normal((1, 1, hidden), dtype=np.float32), ones[:, : cache.length + 1])
            embeds = rng.standard_normal((1, n, hidden), dtype=np.float32)
            t0 = time.perf_counter()
            decoder.run_rows(cache, embeds, ones[:, : cache.length + n])
            times[n].append((time.perf_counter() - t0) * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def replay(records: list[dict], kind: str, lookup: int, cost: dict[int, float]) -> dict:
    """Decode the recorded greedy answers with ``lookup_draft`` as ``decode_stream`` does, at ``cost`` per pass."""
    from edge_vit.vlm.base import lookup_draft

    passes = tokens = 0
    ms = base_ms = 0.0
    for record in (r for r in records if r["kind"] == kind):
        prompt, answer = record["prompt_ids"], record["runs"][0]["tokens"]
        i = 0
        while i < len(answer):  # the pass after answer[i] (after the last: the one that chose the stop token)
            draft = lookup_draft(prompt + answer[: i + 1], min(lookup, max(0, len(answer) - i - 1))) if lookup else []
            accepted = 0
            while accepted < len(draft) and draft[accepted] == answer[i + 1 + accepted]:
                accepted += 1
            passes, tokens = passes + 1, tokens + accepted + 1
            ms += cost[1 + len(draft)]
            base_ms += cost[1] * (accepted + 1)
            i += accepted + 1
    return {"tokens_per_pass": round(tokens / max(1, passes), 3), "speedup": round(base_ms / ms, 3) if ms else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lookup_speed", description=__doc__.splitlines()[0])
    p.add_argument("--vlm", default=str(ASSETS / "vlm"), help="VLM folder (default: the shipped demo VLM)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--detector", default=str(ASSETS / "detector.onnx"))
    p.add_argument("--images", type=int, default=20, help="benchmark frames (each: its questions + a description)")
    p.add_argument("--lookup", default="1,2,4", help="draft lengths to compare with no lookup")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pass-cost", default=None, metavar="DIR", help="an `edge-vit export optimize` folder: "
                   "measure its decode pass cost per token count and replay the answers against it")
    p.add_argument("--rounds", type=int, default=15, help="--pass-cost: timed passes per token count")
    args = p.parse_args(argv)
    try:
        lookups = sorted({int(v) for v in args.lookup.split(",") if v.strip()})
    except ValueError:
        p.error(f"--lookup: expected comma-separated integers, got {args.lookup!r}")
    if not lookups or min(lookups) < 1 or max(lookups) > 15:
        p.error("--lookup: draft lengths in [1, 15]")

    from edge_vit.detector import Detector, DetectorConfig
    from edge_vit.grounding import GroundingConfig
    from edge_vit.vlm import Backend, load_vlm

    # the grounding the demo VLM was tuned with (what `make demo` runs it with)
    grounding = GroundingConfig(**json.loads((ASSETS / "models.json").read_text(encoding="utf-8"))["grounding"])
    detector = Detector.load(DetectorConfig(model=args.detector, imgsz=320))
    vlm = load_vlm(args.vlm, Backend(args.backend), threads=args.threads)
    records = collect_answers(vlm, detector, grounding, args.images, lookups, args.max_new_tokens)
    report = {"vlm": args.vlm, "backend": args.backend, "images": args.images, "answers": summarize(records, lookups)}
    print(f"{'answers':<10} {'lookup':>6} {'same':>9} {'accepted':>9} {'tok/pass':>9} {'decode x':>9}")
    for kind, summary in report["answers"].items():
        for n in lookups:
            r = summary[n]
            print(f"{kind:<10} {n:>6} {r['same_tokens']:>4}/{summary['answers']:<4} {r['acceptance']:>9.0%} "
                  f"{r['tokens_per_pass']:>9.2f} {r['decode_speedup_paired']:>9.2f}")
    if args.pass_cost:
        cost = pass_costs(Path(args.pass_cost), args.threads, args.rounds)
        report["pass_cost_ms"] = {n: round(v, 2) for n, v in cost.items()}
        report["modelled"] = {kind: {n: replay(records, kind, n, cost) for n in lookups}
                              for kind in ("short", "describe")}
        print(f"\npass cost, {args.pass_cost} (ms; x one token): " + ", ".join(
            f"{n}: {v:.2f} ({v / cost[1]:.2f})" for n, v in cost.items()))
        print("modelled decode speed-up at those costs with the answers above (a model, not a measurement):")
        for kind, rows in report["modelled"].items():
            print(f"  {kind:<9} " + ", ".join(f"lookup {n}: {r['speedup']:.2f}x ({r['tokens_per_pass']:.2f} tok/pass)"
                                                for n, r in rows.items()))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
