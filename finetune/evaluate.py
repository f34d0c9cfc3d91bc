"""The held-out shapes benchmark: exact questions about rendered scenes, answered through the real runtime.

    edge-vit finetune eval --vlm DIR [--adapter DIR] --detector PATH [--seed S] [--size N] [--out DIR]

1. ``render_benchmark`` draws ``size`` scenes with ``finetune.shapes.render_scene``
   from Generators seeded by (seed, image index) on a stream of their own (the
   training splits use other streams, so even the training seed gives new
   images), and writes them as a YOLO dataset (``images/val``, ``labels/val``,
   ``attributes/val``, ``data.yaml``) plus ``questions.json``: per image the
   (kind, question, answer) triples of ``finetune.instruct.scene_questions``.
2. ``answer_questions`` runs each question the way ``edge-vit run`` does:
   ``Detector.detect`` on the frame, ``edge_vit.grounding.ground`` with the
   VLM's own token counter (or the bare question, ungrounded), then
   ``collect(vlm.generate(frame, prompt, GenerationConfig))``.
3. ``score`` checks each reply with ``finetune.instruct.answer_matches`` and
   ``accuracy_table`` gives accuracy per question kind for grounded and
   ungrounded prompts, and for the grounded questions on the images whose
   detections were exactly the truth (``detector_exact``: every class at its
   grid position, nothing missed or extra), which leaves the detector's errors
   out: whether the detector or the VLM loses the answers.
4. ``detector_map50`` runs Ultralytics ``model.val`` on the benchmark dataset.
5. Optionally ``judge_scores``: an OpenAI-compatible endpoint rates each answer
   1-10 against the exact reference, LLaVA-Bench style (both are scored; the
   relative score is 100 * model / reference), through the teachers' HTTP client.

The report is printed as a table and as JSON (the last stdout line; also
``report.json`` in ``--out``, with every answer in ``answers.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from edge_vit.errors import EdgeVitError
from finetune.instruct import QUESTION_KINDS, SceneObject, answer_matches, describe_scene, scene_questions

__all__ = ["BenchConfig", "BenchItem", "render_benchmark", "answer_questions", "score", "accuracy_table",
           "detector_map50", "judge_scores", "format_table", "evaluate"]


BENCH_VERSION = "shapes-bench-v1"
_STREAM = 2  # SeedSequence spawn_key stream: shapes.py uses 0 (splits) and 1 (clips)


@dataclass(frozen=True)
class BenchConfig:
    seed: int = 1000
    size: int = 50  # images
    imgsz: int = 320
    per_kind: int = 1  # questions per kind per image (scene_questions' per_kind)
    min_objects: int = 0
    max_objects: int = 6
    labels: str = "shape"  # the detector's classes (finetune.shapes.LABEL_SCHEMES), for the mAP labels
    # The question kinds asked (of finetune.instruct.QUESTION_KINDS). Size is left out by default: without
    # GroundingConfig.size_words the grounding carries no sizes, so size is a question about the image alone.
    kinds: tuple[str, ...] = ("count", "exists", "colour", "position")

    def __post_init__(self) -> None:
        from finetune.shapes import LABEL_SCHEMES

        object.__setattr__(self, "kinds", tuple([self.kinds] if isinstance(self.kinds, str) else self.kinds))
        unknown = [k for k in self.kinds if k not in QUESTION_KINDS]
        if unknown or not self.kinds:
            raise EdgeVitError(f"eval: --kinds must be some of {', '.join(QUESTION_KINDS)}; got {', '.join(self.kinds)}")
        if self.labels not in LABEL_SCHEMES:
            raise EdgeVitError(f"eval: labels must be one of {', '.join(LABEL_SCHEMES)}, got {self.labels!r}")
        if self.seed < 0 or self.size < 1 or self.imgsz < 64 or self.per_kind < 1:
            raise EdgeVitError("eval: need --seed >= 0, --size >= 1, --imgsz >= 64 and --per-kind >= 1")
        if not 0 <= self.min_objects <= self.max_objects <= 20:
            raise EdgeVitError("eval: need 0 <= min objects <= max objects <= 20")


@dataclass(frozen=True)
class BenchItem:
    """One question about one benchmark image (path relative to the benchmark root)."""

    image: str
    kind: str
    question: str
    answer: str


def render_benchmark(root: str | Path, config: BenchConfig) -> tuple[list[BenchItem], Path]:
    """Render the benchmark under ``root``; returns its questions and its ``data.yaml``."""
    import cv2
    import yaml

    from finetune.shapes import class_names, render_scene

    root = Path(root)
    items: list[BenchItem] = []
    scenes = {}
    for sub in ("images", "labels", "attributes"):
        (root / sub / "val").mkdir(parents=True, exist_ok=True)
    for i in range(config.size):
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_STREAM, i)))
        scene = render_scene(rng, config.imgsz, config.min_objects, config.max_objects)
        rel = f"images/val/{i:06d}.png"
        ok, png = cv2.imencode(".png", scene.image)
        if not ok:
            raise RuntimeError("cv2 could not encode a PNG")
        (root / rel).write_bytes(png.tobytes())
        (root / "labels" / "val" / f"{i:06d}.txt").write_text(scene.yolo_label_text(config.labels), encoding="utf-8")
        objects = [o.to_json() for o in scene.objects]
        (root / "attributes" / "val" / f"{i:06d}.json").write_text(json.dumps(
            {"image": rel, "image_size": [config.imgsz, config.imgsz], "background": scene.background,
             "objects": objects}, indent=1) + "\n", encoding="utf-8")
        symbolic = [SceneObject.from_shape(o, (config.imgsz, config.imgsz)) for o in objects]
        scenes[rel] = {"objects": objects, "description": describe_scene(symbolic, scene.background)}
        q_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_STREAM, i, 1)))
        for kind, question, answer in scene_questions(symbolic, q_rng, per_kind=config.per_kind):
            if kind in config.kinds:
                items.append(BenchItem(rel, kind, question, answer))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(f"# {BENCH_VERSION}, seed {config.seed}: edge-vit finetune eval\n" + yaml.safe_dump(
        {"path": str(root.absolute()), "train": "images/val", "val": "images/val",  # Ultralytics needs both keys
         "names": dict(enumerate(class_names(config.labels)))},
        sort_keys=False), encoding="utf-8")
    (root / "questions.json").write_text(json.dumps(
        {"version": BENCH_VERSION, "config": asdict(config), "scenes": scenes,
         "questions": [asdict(it) for it in items]}, indent=1) + "\n", encoding="utf-8")
    return items, data_yaml


def answer_questions(items: Sequence[BenchItem], root: str | Path, detector: Any, vlm: Any, *,
                     grounding: Any | None, generation: Any, progress: bool = False) -> list[dict]:
    """Every question through detector → grounding → VLM, exactly as ``edge-vit run`` builds the prompt.

    ``grounding`` is an ``edge_vit.grounding.GroundingConfig`` or None for
    ungrounded prompts. The detector runs once per image.
    """
    import cv2
    from tqdm.auto import tqdm

    from edge_vit.grounding import ground
    from edge_vit.vlm import collect

    root = Path(root)
    frames: dict[str, tuple[np.ndarray, Any]] = {}
    records = []
    desc = "grounded" if grounding is not None else "ungrounded"
    for item in tqdm(items, desc=desc, unit="q", disable=not progress, file=sys.stderr, mininterval=0.5):
        if item.image not in frames:
            frame = cv2.imread(str(root / item.image), cv2.IMREAD_COLOR)
            if frame is None:
                raise EdgeVitError(f"cannot read benchmark image {root / item.image}")
            detections, _ = detector.detect(frame)
            frames = {item.image: (frame, detections)}  # questions of one image are consecutive
        frame, detections = frames[item.image]
        if grounding is not None:
            prompt = ground(detections, item.question, grounding, count_tokens=vlm.count_tokens).text
        else:
            prompt = item.question
        t0 = time.perf_counter()
        text, stats = collect(vlm.generate(frame, prompt, generation))
        records.append({**asdict(item), "grounded": grounding is not None, "prompt": prompt, "prediction": text,
                        "correct": answer_matches(item.kind, text, item.answer),
                        "detections": len(detections), "detected": detected_scene(detections),
                        "ms": round((time.perf_counter() - t0) * 1000, 2),
                        "new_tokens": stats.new_tokens})
    return records


def _scene_entry(name: str, xyxy, image_size: tuple[int, int]) -> str:
    from edge_vit.grounding import PositionStyle, describe_position

    return f"{name} at {describe_position(xyxy, image_size, PositionStyle.WORDS)}"


def detected_scene(detections: Any) -> list[str]:
    """A frame's detections as the grounding sees them: sorted "class at position" strings (grid words)."""
    return sorted(_scene_entry(detections.names.get(int(c), str(int(c))), xyxy, detections.image_size)
                  for xyxy, c in zip(detections.xyxy, detections.class_id))


def true_scenes(root: str | Path, labels: str) -> dict[str, list[str]]:
    """Each benchmark image's objects in :func:`detected_scene`'s form, from ``questions.json`` (the truth)."""
    from finetune.shapes import class_names, label_class_id

    meta = json.loads((Path(root) / "questions.json").read_text(encoding="utf-8"))
    side = meta["config"]["imgsz"]
    names = class_names(labels)
    return {image: sorted(_scene_entry(names[label_class_id(o["class"], o["colour"], labels)], o["xyxy"],
                                       (side, side)) for o in scene["objects"])
            for image, scene in meta["scenes"].items()}


def score(kind: str, prediction: str, answer: str) -> bool:
    """Whether one reply is right (the benchmark's only notion of correctness)."""
    return answer_matches(kind, prediction, answer)


def accuracy_table(records: Iterable[dict]) -> dict:
    """{"grounded"|"ungrounded"|"detector_exact": {kind: {"correct", "total", "accuracy"}, ..., "all": {...}}}.

    ``detector_exact``: the grounded questions about images whose detections were exactly right (records with
    ``detector_exact`` true, set by :func:`evaluate`): the VLM's own accuracy, with the detector's errors left out.
    """
    counts: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        conds = ["grounded" if r["grounded"] else "ungrounded"]
        if r["grounded"] and r.get("detector_exact"):
            conds.append("detector_exact")
        ok = score(r["kind"], r["prediction"], r["answer"])
        for cond in conds:
            for key in (r["kind"], "all"):
                counts[cond][key][0] += ok
                counts[cond][key][1] += 1
    order = [k for k in QUESTION_KINDS] + ["all"]
    out = {}
    for cond in ("grounded", "ungrounded", "detector_exact"):
        if cond not in counts:
            continue
        table = counts[cond]
        out[cond] = {k: {"correct": table[k][0], "total": table[k][1],
                         "accuracy": round(table[k][0] / table[k][1], 4)}
                     for k in [*order, *sorted(set(table) - set(order))] if k in table}
    return out


@contextlib.contextmanager
def _ultralytics_to_stderr():
    """Send Ultralytics' log handler (bound to stdout at import) and its progress bars to stderr, then restore."""
    from edge_vit.detector import ultralytics_logs_to_stderr

    moved = ultralytics_logs_to_stderr()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler in moved:
            handler.setStream(sys.stdout)


def detector_map50(detector: str, data_yaml: Path, *, imgsz: int, device: str, workdir: Path,
                  labels: str = "shape") -> dict:
    """Ultralytics' own validation of ``detector`` on the benchmark: mAP50 and mAP50-95 of the box head."""
    from ultralytics import YOLO

    from finetune.shapes import class_names

    model = YOLO(detector, task="detect")
    names = [str(v) for v in dict(model.names).values()]
    with _ultralytics_to_stderr():  # Ultralytics prints its own table to stdout; stdout is for our report
        metrics = model.val(data=str(data_yaml), split="val", imgsz=imgsz, batch=16, device=device, plots=False,
                            verbose=False, workers=0, project=str(workdir), name="val", exist_ok=True)
    return {"map50": round(float(metrics.box.map50), 4), "map50_95": round(float(metrics.box.map), 4),
            "classes_match": names == list(class_names(labels))}


# ---------------------------------------------------------------- judge (optional)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = """[Context]
{context}

[Question]
{question}

[Assistant 1]
{reference}
[End of Assistant 1]

[Assistant 2]
{prediction}
[End of Assistant 2]

[System]
{instructions}"""

# LLaVA-Bench's reviewer instructions, with one sentence added about the context being exact.
JUDGE_INSTRUCTIONS = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The context describes the image exactly.\n"
    "Please rate the helpfulness, relevance, accuracy and level of detail of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please provide a "
    "comprehensive explanation of your evaluation."
)

_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[ ,]\s*(\d+(?:\.\d+)?)")


def parse_judge_scores(text: str) -> tuple[float, float] | None:
    """(reference score, model score) from the judge's first line; None when it does not start with two scores."""
    m = _SCORES.match(text.strip().splitlines()[0] if text.strip() else "")
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def judge_scores(records: Sequence[dict], scenes: dict, client: Any) -> dict:
    """LLaVA-Bench style: the judge scores the exact reference and the model's answer, 1-10 each.

    ``client`` has ``chat(system, user, seed) -> str | None`` (``finetune.teachers.OpenAITeacher``).
    Returns per condition the mean model score, mean reference score, relative score and how many replies parsed.
    """
    out: dict = {}
    for cond in ("grounded", "ungrounded"):
        rows = [r for r in records if r["grounded"] == (cond == "grounded")]
        if not rows:
            continue
        model_scores, ref_scores, failed = [], [], 0
        for k, r in enumerate(rows):
            user = JUDGE_TEMPLATE.format(context=scenes.get(r["image"], {}).get("description", ""),
                                         question=r["question"], reference=r["answer"], prediction=r["prediction"],
                                         instructions=JUDGE_INSTRUCTIONS)
            reply = client.chat(JUDGE_SYSTEM, user, k)
            parsed = parse_judge_scores(reply) if reply else None
            if parsed is None:
                failed += 1
                continue
            ref_scores.append(parsed[0])
            model_scores.append(parsed[1])
            r["judge"] = {"reference": parsed[0], "model": parsed[1]}
        mean = (lambda xs: round(sum(xs) / len(xs), 3) if xs else None)
        out[cond] = {"model_score": mean(model_scores), "reference_score": mean(ref_scores),
                     "relative_score": round(100 * sum(model_scores) / sum(ref_scores), 1) if sum(ref_scores) else None,
                     "judged": len(model_scores), "unparsed": failed}
    return out


# ---------------------------------------------------------------- report


def format_table(report: dict) -> str:
    """Accuracy per kind, grounded vs ungrounded, with counts; then the detector and judge lines."""
    acc = report["accuracy"]
    conds = [c for c in ("grounded", "ungrounded", "detector_exact") if c in acc]
    kinds = list(dict.fromkeys(k for c in conds for k in acc[c]))
    heads = {"detector_exact": "det-exact"}
    lines = [f"{'kind':<10}" + "".join(f"{heads.get(c, c):>14}" for c in conds) + f"{'questions':>11}"]
    for k in kinds:
        cells = "".join(f"{acc[c][k]['accuracy'] * 100:>13.1f}%" if k in acc[c] else f"{'-':>14}" for c in conds)
        n = acc[conds[0]][k]["total"] if k in acc[conds[0]] else 0
        lines.append(f"{k:<10}{cells}{n:>11}")
    exact = report.get("detector_exact")
    if exact:
        lines.append(f"det-exact: grounded questions on the {exact['images']} of {exact['of']} images whose "
                     f"detections were exactly right (classes and positions): the VLM's own accuracy")
    det = report.get("detector_val")
    if det:
        lines.append(f"detector mAP50 {det['map50']:.3f}, mAP50-95 {det['map50_95']:.3f} on {report['images']} "
                     f"held-out images" + ("" if det["classes_match"] else " (its classes are not the shapes')"))
    for cond, j in (report.get("judge") or {}).items():
        lines.append(f"judge ({cond}): {j['model_score']} / 10, relative {j['relative_score']}% "
                     f"({j['judged']} judged, {j['unparsed']} unparsed)")
    return "\n".join(lines)


def _detector_settings(detector: Any) -> dict | None:
    """The detector's model and the settings its boxes depend on (None for a detector without a config)."""
    config = getattr(detector, "config", None)
    return None if config is None else {"model": config.model, **config.box_settings()}


def evaluate(*, vlm: Any, detector: Any, bench: BenchConfig, root: Path, generation: Any, grounding: Any,
             ungrounded: bool = True, detector_path: str | None = None, detector_imgsz: int = 320,
             device: str = "cpu", judge: Any | None = None, progress: bool = False) -> tuple[dict, list[dict]]:
    """Render, answer, score (and validate the detector, judge); returns (report, answer records)."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    items, data_yaml = render_benchmark(root, bench)
    records = answer_questions(items, root, detector, vlm, grounding=grounding, generation=generation,
                               progress=progress)
    if ungrounded:
        records += answer_questions(items, root, detector, vlm, grounding=None, generation=generation,
                                    progress=progress)
    truth = true_scenes(root, bench.labels)
    for r in records:
        r["detector_exact"] = r["detected"] == truth[r["image"]]
    exact_images = {r["image"] for r in records if r["detector_exact"]}
    accuracy = accuracy_table(records)
    gain = None
    if "grounded" in accuracy and "ungrounded" in accuracy:
        gain = {k: round(v["accuracy"] - accuracy["ungrounded"][k]["accuracy"], 4)
                for k, v in accuracy["grounded"].items() if k in accuracy["ungrounded"]}
    report = {
        "type": "eval",
        "benchmark": {"version": BENCH_VERSION, **asdict(bench)},
        "vlm": getattr(vlm, "name", type(vlm).__name__),
        "detector_settings": _detector_settings(detector),
        "grounding": grounding.as_json() if grounding is not None else None,
        "images": bench.size,
        "questions": len(items),
        "accuracy": accuracy,
        "grounding_gain": gain,
        # Images whose detections are exactly the truth (every class at its grid position, nothing extra).
        "detector_exact": {"images": len(exact_images), "of": bench.size,
                           "share": round(len(exact_images) / bench.size, 4)},
        "detector_val": None,
        "judge": None,
    }
    if detector_path is not None:
        report["detector_val"] = detector_map50(detector_path, data_yaml, imgsz=detector_imgsz, device=device,
                                                workdir=root / "val", labels=bench.labels)
    if judge is not None:
        scenes = json.loads((root / "questions.json").read_text(encoding="utf-8"))["scenes"]
        report["judge"] = judge_scores(records, scenes, judge)
    answered = len(records)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["answers_per_s"] = round(answered / max(sum(r["ms"] for r in records) / 1000, 1e-9), 2)
    return report, records
