"""The VLM's language model alone on a benchmark's grounded prompts: does it bind, or guess among the listed?

    python -m finetune.lm_probe --vlm DIR --answers EVAL_OUT/answers.jsonl [--kinds colour,position] [--all]

Reads the grounded records of an ``edge-vit finetune eval`` run (``answers.jsonl``: each question's prompt
as the runtime built it, the exact answer, whether the detections were exactly right; by default only those
records) and asks the language model each prompt as text only: the model's own chat template with the image
left out, greedy. Accuracy per question kind, by how many objects the grounding lists and by whether the
question names the object by its size ("the small square", which a grounding without size words cannot
answer), plus the share of wrong colour/position answers that name a value some *other* listed object has.
A model that binds is right whatever the object count; one that guesses among the listed values falls
towards 1/n and its wrong answers are nearly all another object's value.

It runs neither the detector nor the vision tower and trains nothing; the benchmark itself is
``finetune.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from edge_vit.errors import EdgeVitError
from finetune.instruct import answer_key, answer_matches

__all__ = ["listed_objects", "names_another_listed", "probe_records", "probe", "format_table", "main"]

_LINE = re.compile(r"^- (.+?) at ([a-z]+(?:-[a-z]+)*)\s*$")
_SIZE = re.compile(r"\b(small|medium|large)\b", re.IGNORECASE)


def listed_objects(prompt: str) -> list[tuple[str, str]]:
    """(class name, position) of each per-object grounding line ("- red square at top-right")."""
    return [(m.group(1), m.group(2)) for m in (_LINE.match(line) for line in prompt.splitlines()) if m]


def _listed_values(kind: str, objects: list[tuple[str, str]]) -> set[str]:
    if kind == "position":
        return {p for _, p in objects}
    if kind == "colour":  # colour-shape class names ("red square"): the colour is the first word
        return {name.split()[0].lower() for name, _ in objects if " " in name}
    return set()


def names_another_listed(kind: str, prediction: str, answer: str, prompt: str) -> bool:
    """A wrong colour/position ``prediction`` that is the value of some other object the grounding lists."""
    key, truth = answer_key(kind, prediction), answer_key(kind, answer)
    return key != truth and key in _listed_values(kind, listed_objects(prompt))


def _bucket(n: int) -> str:
    return str(n) if n <= 3 else "4+"


def probe_records(records: Iterable[dict], kinds: tuple[str, ...] = ("colour", "position"),
                  exact_only: bool = True, limit: int | None = None) -> list[dict]:
    """The grounded records to probe: of ``kinds``, with exactly right detections unless ``exact_only`` is off."""
    out = [r for r in records if r.get("grounded") and r.get("kind") in kinds
           and (r.get("detector_exact") or not exact_only)]
    return out[:limit] if limit else out


def probe(vlm_dir: str | Path, records: list[dict], max_new_tokens: int = 8,
          trust_remote_code: bool = False) -> list[dict]:
    """Answer each record's prompt with the language model alone; one row per record."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not records:
        raise EdgeVitError("no records to probe (grounded, of the chosen kinds, detector-exact unless --all)")
    processor = AutoProcessor.from_pretrained(vlm_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code).eval()
    tok = processor.tokenizer
    rows = []
    for r in records:
        messages = [{"role": "user", "content": [{"type": "text", "text": r["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)
        prediction = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        objects = listed_objects(r["prompt"])
        rows.append({"kind": r["kind"], "question": r["question"], "answer": r["answer"], "prediction": prediction,
                     "correct": answer_matches(r["kind"], prediction, r["answer"]), "objects": len(objects),
                     "size_word": bool(_SIZE.search(r["question"])),
                     "other_listed": names_another_listed(r["kind"], prediction, r["answer"], r["prompt"])})
    return rows


def summarize(rows: list[dict]) -> dict:
    """{kind: {"all"|"no size word"|"size word"|"objects=N": {"correct", "total", "accuracy"}, "wrong, another
    object's value": share}}. The objects=N groups (1, 2, 3, 4+ listed) leave out the questions with a size
    word, which the grounding cannot answer whatever the binding."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        groups = {"all": mine, "no size word": [r for r in mine if not r["size_word"]],
                  "size word": [r for r in mine if r["size_word"]]}
        for n in sorted({_bucket(r["objects"]) for r in mine}):
            groups[f"objects={n}"] = [r for r in mine if _bucket(r["objects"]) == n and not r["size_word"]]
        table = {name: {"correct": sum(r["correct"] for r in g), "total": len(g),
                        "accuracy": round(sum(r["correct"] for r in g) / len(g), 4)} for name, g in groups.items() if g}
        wrong = [r for r in mine if not r["correct"]]
        table["wrong, another object's value"] = round(sum(r["other_listed"] for r in wrong) / len(wrong), 4) \
            if wrong else None
        out[kind] = table
    return out


def format_table(summary: dict) -> str:
    lines = []
    for kind, table in summary.items():
        cells = [f"{name} {100 * v['accuracy']:.1f}% ({v['total']})"
                 for name, v in table.items() if isinstance(v, dict)]
        other = table.get("wrong, another object's value")
        if other is not None:
            cells.append(f"wrong answers naming another listed object's value {100 * other:.0f}%")
        lines.append(f"{kind}: " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.lm_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--vlm", required=True, help="VLM folder (a demo VLM, a merged model)")
    p.add_argument("--answers", required=True, help="answers.jsonl of an `edge-vit finetune eval` run")
    p.add_argument("--kinds", default="colour,position", help="question kinds to probe (comma-separated)")
    p.add_argument("--all", action="store_true", help="also the records whose detections were not exactly right")
    p.add_argument("--limit", type=int, default=None, help="probe the first N records only")
    p.add_argument("--out", default=None, help="write the rows (JSONL) and the summary (JSON) here")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        path = Path(args.answers)
        if not path.is_file():
            raise EdgeVitError(f"{path}: no such file (the answers.jsonl an `edge-vit finetune eval --out` writes)")
        if not (Path(args.vlm) / "config.json").is_file():
            raise EdgeVitError(f"{args.vlm}: not a model folder (no config.json)")
        try:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise EdgeVitError(f"{path}: line {e.lineno}: not JSON") from None
        missing = next((i for i, r in enumerate(records, 1) if not isinstance(r, dict)
                        or not {"kind", "question", "answer", "prompt"} <= r.keys()), None)
        if missing:
            raise EdgeVitError(f"{path}: line {missing}: not an eval record (kind, question, answer, prompt)")
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        rows = probe(args.vlm, probe_records(records, kinds, exact_only=not args.all, limit=args.limit),
                     trust_remote_code=args.trust_remote_code)
    except EdgeVitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    print(format_table(summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
