"""finetune.lm_probe: the language model alone on an eval's grounded prompts, grouped by object count."""

import json
import subprocess
import sys
from pathlib import Path

from finetune.instruct import answer_matches
from finetune.lm_probe import listed_objects, main, names_another_listed, probe, probe_records, summarize

G3 = ("Detected objects: 1 blue circle, 1 red square, 1 yellow star.\n- red square at top-right\n"
      "- blue circle at center\n- yellow star at left\n")
G1 = "Detected objects: 1 green hexagon.\n- green hexagon at bottom\n"


def _records():
    return [
        {"grounded": True, "detector_exact": True, "kind": "colour", "question": "What colour is the circle?",
         "answer": "Blue.", "prompt": G3 + "What colour is the circle?"},
        {"grounded": True, "detector_exact": True, "kind": "position", "question": "Where is the small star?",
         "answer": "Left.", "prompt": G3 + "Where is the small star?"},
        {"grounded": True, "detector_exact": True, "kind": "position", "question": "Where is the hexagon?",
         "answer": "Bottom.", "prompt": G1 + "Where is the hexagon?"},
        {"grounded": True, "detector_exact": False, "kind": "colour", "question": "What colour is the star?",
         "answer": "Yellow.", "prompt": G3 + "What colour is the star?"},
        {"grounded": False, "detector_exact": False, "kind": "colour", "question": "What colour is the star?",
         "answer": "Yellow.", "prompt": "What colour is the star?"},
        {"grounded": True, "detector_exact": True, "kind": "count", "question": "How many stars are there?",
         "answer": "1 star.", "prompt": G3 + "How many stars are there?"},
    ]


def test_listed_objects_and_record_selection():
    assert listed_objects(G3 + "Where is it?") == [("red square", "top-right"), ("blue circle", "center"),
                                                  ("yellow star", "left")]
    assert listed_objects("Where is the red square at top-right?") == []
    q = G3 + "What colour is the circle?"
    assert names_another_listed("colour", "Red.", "Blue.", q)  # the square's colour
    assert not names_another_listed("colour", "Purple.", "Blue.", q)  # listed nowhere
    assert not names_another_listed("colour", "Blue.", "Blue.", q)  # right, so not "another's"
    assert names_another_listed("position", "Top-right.", "Left.", G3 + "Where is the star?")
    assert not names_another_listed("position", "Bottom.", "Left.", G3 + "Where is the star?")
    recs = _records()
    assert [r["answer"] for r in probe_records(recs)] == ["Blue.", "Left.", "Bottom."]
    assert len(probe_records(recs, exact_only=False)) == 4  # never the ungrounded one
    assert len(probe_records(recs, kinds=("count",))) == 1


def test_probe_groups_by_objects_and_size_words(tiny_idefics3):
    rows = probe(tiny_idefics3, probe_records(_records(), exact_only=False), max_new_tokens=4)
    assert [(r["objects"], r["size_word"]) for r in rows] == [(3, False), (3, True), (1, False), (3, False)]
    assert all(r["correct"] == answer_matches(r["kind"], r["prediction"], r["answer"]) for r in rows)
    summary = summarize(rows)
    assert summary["colour"]["all"]["total"] == 2 and summary["position"]["all"]["total"] == 2
    assert summary["position"]["size word"]["total"] == 1 and summary["position"]["objects=1"]["total"] == 1
    assert "objects=3" not in summary["position"]  # the one 3-object position question names a size
    # A wrong answer naming a value of the grounding's other objects counts as "another object's value".
    fake = [{**rows[0], "prediction": "Red.", "correct": False, "other_listed": True},
            {**rows[3], "prediction": "Purple.", "correct": False, "other_listed": False}]
    assert summarize(fake)["colour"]["wrong, another object's value"] == 0.5


def test_cli_writes_rows_and_one_line_errors(tiny_idefics3, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    # As the README runs it: python -m finetune.lm_probe.
    r = subprocess.run([sys.executable, "-m", "finetune.lm_probe", "--vlm", str(tiny_idefics3), "--answers",
                        str(answers), "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("colour: all ")
    assert json.loads(r.stdout.strip().splitlines()[-1])["colour"]["all"]["total"] == 1
    rows = [json.loads(line) for line in (tmp_path / "p" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and json.loads((tmp_path / "p" / "summary.json").read_text())["colour"]["all"]["total"] == 1
    assert main(["--vlm", str(tiny_idefics3), "--answers", str(tmp_path / "none.jsonl")]) == 2
    assert main(["--vlm", str(tiny_idefics3), "--answers", str(answers), "--kinds", "size"]) == 2
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_records()[0]) + "\n" + json.dumps({"frame": 3, "answer": "Yes."}) + "\n")
    assert main(["--vlm", str(tiny_idefics3), "--answers", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "line 2: not an eval record" in err[-1]
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
