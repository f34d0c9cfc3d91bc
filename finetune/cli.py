"""``edge-vit finetune``: thin subcommands over ``finetune.shapes`` and ``finetune.instruct``.

    edge-vit finetune shapes --out DIR --images N --seed S [--imgsz 320] [--clips K --clip-frames F]
    edge-vit finetune data --dataset data.yaml --out DIR [--split train] [--teacher template|openai] ...

:func:`add_finetune_commands` registers them on the main parser's subparsers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_finetune_commands"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_finetune_commands(subparsers) -> None:
    """Register ``finetune`` with its subcommands ``shapes`` and ``data`` on ``subparsers``."""
    from edge_vit.grounding import PositionStyle
    from finetune.instruct import SampleKind
    from finetune.teachers import DEFAULT_PROMPT_VERSION

    p = subparsers.add_parser("finetune", help="shapes world and instruction data from YOLO datasets")
    sub = p.add_subparsers(dest="finetune_command", required=True)

    s = sub.add_parser("shapes", help="write the synthetic shapes world: a YOLO dataset (+ attributes) and clips")
    s.add_argument("--out", required=True, help="output folder (must be empty or absent, unless --overwrite)")
    s.add_argument("--images", type=_positive_int, default=1000, help="images in all splits together")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--imgsz", type=int, default=320, help="image side in pixels (>= 64)")
    s.add_argument("--min-objects", type=_nonneg_int, default=0)
    s.add_argument("--max-objects", type=_nonneg_int, default=6)
    s.add_argument("--val-fraction", type=_fraction, default=0.2)
    s.add_argument("--test-fraction", type=_fraction, default=0.1)
    s.add_argument("--clips", type=_nonneg_int, default=0, help="short mp4 clips of moving shapes, with JSONL truth")
    s.add_argument("--clip-frames", type=_positive_int, default=90)
    s.add_argument("--clip-fps", type=_positive_float, default=15.0)
    s.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace a shapes dataset already in --out")
    s.set_defaults(func=cmd_shapes)

    d = sub.add_parser("data", help="LLaVA-style instruction data from a YOLO dataset (data.yaml)")
    d.add_argument("--dataset", required=True, help="the dataset's data.yaml")
    d.add_argument("--out", required=True, help="folder for instruct.json and manifest.json")
    d.add_argument("--split", default="train", help="train, val or test")
    d.add_argument("--seed", type=_nonneg_int, default=0)
    d.add_argument("--samples-per-image", type=_positive_int, default=3)
    d.add_argument("--kinds", default=",".join(k.value for k in SampleKind),
                   help="comma-separated sample kinds, cycled per image")
    d.add_argument("--ungrounded-fraction", type=_fraction, default=0.0,
                   help="fraction of samples written without the grounding text (ablations)")
    g = d.add_argument_group("grounding (use the values the runtime will use)")
    g.add_argument("--positions", choices=[s.value for s in PositionStyle], default=PositionStyle.WORDS.value)
    g.add_argument("--grounding-tokens", type=_positive_int, default=96, help="token budget of the grounding text")
    t = d.add_argument_group("teacher")
    t.add_argument("--teacher", choices=["template", "openai"], default="template",
                   help="template: exact answers from the labels, offline; openai: an OpenAI-compatible endpoint")
    t.add_argument("--prompt-version", default=DEFAULT_PROMPT_VERSION, help="folder under finetune/prompts/")
    t.add_argument("--endpoint", default="http://127.0.0.1:8000/v1", help="openai: API base URL")
    t.add_argument("--model", default=None, help="openai: model name the endpoint serves")
    t.add_argument("--timeout", type=_positive_float, default=60.0, help="openai: seconds per request")
    t.add_argument("--retries", type=_nonneg_int, default=3, help="openai: retries on 429/5xx/timeouts")
    t.add_argument("--backoff", type=_positive_float, default=0.5, help="openai: first retry wait, doubled each time")
    t.add_argument("--temperature", type=float, default=0.2)
    d.set_defaults(func=cmd_data)
    d.epilog = "The openai teacher sends the API key from the environment variable OPENAI_API_KEY, if set."


def cmd_shapes(args: argparse.Namespace) -> int:
    from finetune.shapes import ShapesConfig, generate_shapes

    config = ShapesConfig(
        images=args.images, imgsz=args.imgsz, seed=args.seed, min_objects=args.min_objects,
        max_objects=args.max_objects, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        clips=args.clips, clip_frames=args.clip_frames, clip_fps=args.clip_fps,
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
    from edge_vit.grounding import GroundingConfig, PositionStyle
    from finetune.instruct import InstructConfig, SampleKind, build_instruct_data
    from finetune.teachers import OpenAITeacher, TemplateTeacher, load_prompts

    try:
        kinds = tuple(SampleKind(k.strip()) for k in args.kinds.split(",") if k.strip())
    except ValueError:
        raise EdgeVitError(f"--kinds: use {', '.join(k.value for k in SampleKind)}; got {args.kinds!r}") from None
    config = InstructConfig(
        split=args.split, seed=args.seed, samples_per_image=args.samples_per_image, kinds=kinds,
        ungrounded_fraction=args.ungrounded_fraction,
        grounding=GroundingConfig(positions=PositionStyle(args.positions), max_tokens=args.grounding_tokens),
    )
    prompts = load_prompts(args.prompt_version)
    if args.teacher == "openai":
        teacher = OpenAITeacher(args.endpoint, args.model, prompts, api_key=os.environ.get("OPENAI_API_KEY") or None,
                                timeout_s=args.timeout, max_retries=args.retries, backoff_s=args.backoff,
                                temperature=args.temperature)
    else:
        teacher = TemplateTeacher(prompts)
    manifest = build_instruct_data(Path(args.dataset), Path(args.out), teacher, config)
    counts, skipped = manifest["counts"], manifest["skipped"]
    print(f"wrote {counts['samples']} samples from {counts['images']} images "
          f"({', '.join(f'{v} {k}' for k, v in counts['by_kind'].items())}); skipped "
          f"{skipped['bad_label_lines']} bad label lines, {skipped['teacher_failures']} samples: "
          f"{Path(args.out) / 'instruct.json'}", file=sys.stderr)
    return 0
