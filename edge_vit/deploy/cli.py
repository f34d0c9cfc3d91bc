"""``edge-vit deploy jetson``: a thin command over ``edge_vit.deploy.plan`` (probe, plan, print, build, write).

Registered into the main parser by ``add_deploy_commands(subparsers)``. Exit codes: 0 when the
deployment was written, or when a ``--dry-run`` printed its plan (whatever the target checks found:
the last line is the verdict a real run would reach); 2 with one ``edge-vit: error: ...`` line when
a real run cannot go on (not a Jetson, a failed check, a budget that does not fit) and, dry run or
not, for input that cannot be planned (no ONNX export in --model-dir, impossible limits, a bad flag).
"""

from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path

from edge_vit.argtypes import positive_float, positive_int
from edge_vit.errors import EdgeVitError


def _current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def add_deploy_commands(subparsers) -> None:
    """Register ``deploy`` and its targets (``jetson``)."""
    from edge_vit.cli import DEFAULT_DETECTOR, DEFAULT_PROMPT

    deploy = subparsers.add_parser("deploy", help="set edge-vit up as a camera service on a device (Jetson)")
    targets = deploy.add_subparsers(dest="deploy_command", required=True)
    p = targets.add_parser(
        "jetson",
        help="check this Jetson, build or reuse the TensorRT engines, write a systemd unit (or docker run script)",
        description="Run on the Jetson itself. Checks the target (JetPack/L4T, module, TensorRT, CUDA, PyTorch, "
                    "memory), estimates the memory budget, builds the VLM and detector engines unless matching "
                    "ones exist in OUT, and writes OUT/run.json plus OUT/NAME.service (or, with --container, "
                    "OUT/NAME-docker-run.sh). Extra `edge-vit run` flags go after `--`. --dry-run prints every "
                    "step and file and writes nothing, on any machine.",
    )
    p.add_argument("--model-dir", required=True, type=Path, help="folder written by `edge-vit export onnx`")
    p.add_argument("--detector", default=DEFAULT_DETECTOR,
                   help="YOLO .pt (converted to a TensorRT engine here), or a ready .engine / .onnx "
                        f"(default: {DEFAULT_DETECTOR} in the working directory)")
    p.add_argument("--source", default="/dev/video0",
                   help="what the service reads: /dev/videoN, a webcam index, an RTSP/HTTP URL, a file or folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the instruction the service answers")
    p.add_argument("--out", type=Path, default=Path("edge-vit-deploy"),
                   help="folder for the engines, run.json, the unit and the record (default: ./edge-vit-deploy)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the checks, the memory budget, what would be built or reused and every file; "
                        "write nothing (exit 0)")
    p.add_argument("--service-name", default="edge-vit", help="systemd unit / container name")
    p.add_argument("--user", default=None, help="account the service runs as (default: the current user)")
    p.add_argument("--container", action="store_true",
                   help="write a `docker run` script (--runtime nvidia) instead of a systemd unit")
    p.add_argument("--image", default="edge-vit:jetson", help="with --container: the image to run "
                                                              "(built from docker/Dockerfile.jetson)")
    g = p.add_argument_group("engines")
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="fp16 engines and KV cache (half the memory of fp32)")
    g.add_argument("--tiling", choices=["single", "split"], default="single",
                   help="single: engines for one tile per frame (the run default); split: the processor's tiles")
    g.add_argument("--max-prompt", type=positive_int, default=None,
                   help="most prompt tokens, image included (default: the tiles + 512 text tokens)")
    g.add_argument("--max-context", type=positive_int, default=None,
                   help="most tokens of prompt + answer; sizes the KV cache (default: the model's maximum)")
    g.add_argument("--workspace-gb", type=positive_float, default=None, help="TensorRT scratch limit while building")
    g.add_argument("--imgsz", type=positive_int, default=640, help="detector input size the engine is fixed to")
    p.add_argument("run_args", nargs=argparse.REMAINDER, metavar="-- RUN_ARGS",
                   help="more `edge-vit run` flags for the service, e.g. -- --every 2 --classes person")
    p.set_defaults(func=cmd_deploy_jetson)


def cmd_deploy_jetson(args: argparse.Namespace) -> int:
    from edge_vit.deploy.plan import DeployOptions, execute, plan_deploy
    from edge_vit.deploy.target import probe_target

    target = probe_target("/")
    if not target.is_jetson and not args.dry_run:
        raise EdgeVitError(f"{target.not_jetson_reason()}; run `edge-vit deploy jetson` on the Jetson itself, "
                           f"or add --dry-run to see the plan here")
    extra = list(args.run_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    elif extra:
        raise EdgeVitError(f"put `edge-vit run` flags after `--`, got '{extra[0]}'")
    options = DeployOptions(
        model_dir=args.model_dir, out=args.out, user=args.user or _current_user(), detector=args.detector,
        source=args.source, prompt=args.prompt, service_name=args.service_name, container=args.container,
        image=args.image, fp16=args.fp16, tiling=args.tiling, max_prompt=args.max_prompt,
        max_context=args.max_context, workspace_gb=args.workspace_gb, imgsz=args.imgsz, run_extra=tuple(extra),
    )
    plan = plan_deploy(options, target)
    print("edge-vit deploy jetson --dry-run: every step, nothing built or written" if args.dry_run
          else f"edge-vit deploy jetson: deploying to {options.out.resolve()}")
    for line in plan.lines(dry_run=args.dry_run):
        print(line, flush=True)
    if args.dry_run:
        print("next, after a real run:")
        for step in plan.next_steps:
            print(f"  {step}")
        print(plan.verdict())
        return 0
    result = execute(plan)  # refuses a plan with problems: one line, exit 2
    for path in result.built:
        print(f"built {path}")
    print("wrote " + ", ".join(str(p) for p in result.written))
    print("next:")
    for step in plan.next_steps:
        print(f"  {step}")
    return 0
