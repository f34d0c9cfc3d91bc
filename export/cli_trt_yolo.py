"""``edge-vit export trt`` and ``edge-vit export yolo``: thin subcommands over ``export.trt`` and ``export.yolo``.

Registered on the ``export`` subparsers by ``add_trt_yolo_commands(kinds)`` (called from
``export.cli``). Nothing heavy is imported until a command runs. A machine without TensorRT
gets one line saying what to install, and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_vit.argtypes import positive_float, positive_int


def add_trt_yolo_commands(kinds) -> None:
    """Register ``trt`` and ``yolo`` on the ``export`` subparsers."""
    p = kinds.add_parser(
        "trt",
        help="TensorRT engines from an `export onnx` folder (optimization profiles from the model config)",
        description="Build vision/embedding/decoder TensorRT engines on this GPU. Profiles come from the model "
                    "config: tiles up to --max-tiles, prompts up to --max-prompt, context up to --max-context; "
                    "the decoder has a prefill and a decode profile.",
    )
    p.add_argument("--onnx-dir", required=True, help="folder written by `edge-vit export onnx`")
    p.add_argument("--out", required=True, help="folder for the engines; created if missing, files in it are replaced")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="fp16 kernels (normalization kept in fp32) and an fp16 KV cache")
    p.add_argument("--int8", action="store_true", help="INT8 kernels where the graphs carry Q/DQ nodes")
    p.add_argument("--fp8", action="store_true", help="FP8 kernels where the graphs carry Q/DQ nodes (sm_89+)")
    p.add_argument("--max-tiles", type=positive_int, default=None,
                   help="most image tiles per frame (default: the most the export's processor makes)")
    p.add_argument("--max-prompt", type=positive_int, default=None,
                   help="most prompt tokens, image included (default: all tiles + 512 text tokens)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="most tokens of prompt + answer (default: the model's max_position_embeddings)")
    p.add_argument("--workspace-gb", type=positive_float, default=None, help="TensorRT scratch limit while building")
    p.add_argument("--timing-cache", default=None,
                   help="timing cache file to load and update (default: OUT/timing.cache)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the profiles and memory plan and stop (no TensorRT or GPU needed)")
    p.set_defaults(func=cmd_export_trt)

    p = kinds.add_parser(
        "yolo",
        help="YOLO detector to ONNX or a TensorRT engine through Ultralytics (NMS-free end-to-end output)",
    )
    p.add_argument("--model", required=True, help="trained YOLO .pt file, e.g. yolo26n.pt")
    p.add_argument("--format", choices=["onnx", "engine"], default="onnx",
                   help="onnx: ONNX Runtime (CPU); engine: TensorRT on this GPU")
    p.add_argument("--imgsz", type=int, default=640, help="input size the export is fixed to (multiple of 32)")
    p.add_argument("--half", action="store_true", help="fp16 weights")
    p.add_argument("--int8", action="store_true", help="INT8, calibrated on --data")
    p.add_argument("--data", default=None, help="dataset YAML with local images, for --int8 calibration")
    p.add_argument("--device", default=None, help="engine: CUDA device (default 0)")
    p.add_argument("--workspace-gb", type=positive_float, default=None, help="engine: TensorRT scratch limit")
    p.add_argument("--end2end", action=argparse.BooleanOptionalAction, default=True,
                   help="NMS-free one-to-one head (default); --no-end2end exports the one-to-many head, NMS after")
    p.add_argument("--out", default=None,
                   help="output file (default: next to the .pt, where `edge-vit run --detector X.pt` finds it)")
    p.set_defaults(func=cmd_export_yolo)


def cmd_export_trt(args: argparse.Namespace) -> int:
    from export.trt import TrtBuildOptions, build_trt_engines, describe, import_tensorrt, plan_build

    options = TrtBuildOptions(
        fp16=args.fp16, int8=args.int8, fp8=args.fp8, max_tiles=args.max_tiles, max_prompt=args.max_prompt,
        max_context=args.max_context, workspace_gb=args.workspace_gb,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )
    plan = plan_build(args.onnx_dir, options)  # milliseconds: a wrong folder or limit fails before TensorRT loads
    if not args.plan_only:
        import_tensorrt()  # no TensorRT: one line saying what to install
    for line in plan.lines():
        print(line)
    if args.plan_only:
        return 0
    result = build_trt_engines(args.onnx_dir, args.out, options)
    for line in describe(result):
        print(line)
    print(f"run it with: edge-vit run --backend trt --device cuda --vlm {result.out_dir} ...")
    return 0


def cmd_export_yolo(args: argparse.Namespace) -> int:
    # Ultralytics reads these when it is imported: no downloads or pip installs during an export.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from export.yolo import YoloExportOptions, export_yolo

    options = YoloExportOptions(format=args.format, imgsz=args.imgsz, half=args.half, int8=args.int8,
                                data=args.data, device=args.device, workspace_gb=args.workspace_gb,
                                end2end=args.end2end)
    result = export_yolo(args.model, options, args.out)
    shape = f", output {result.output_shape}" if result.output_shape else ""
    kind = " (NMS-free end-to-end)" if result.end2end else (" (raw head: NMS after)" if result.end2end is False else "")
    print(f"exported {args.model} to {result.path} in {result.seconds:.1f} s{shape}{kind}", file=sys.stdout)
    return 0
