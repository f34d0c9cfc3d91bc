"""``edge-vit export ...``: thin subcommands over the export library (they write files and say what they wrote).

Registered into the main parser by ``add_export_commands(subparsers)``. Imports
nothing heavy until a command runs; user mistakes raise ``EdgeVitError``, which
the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from export.onnx_export import DEFAULT_OPSET, OnnxExportOptions

MIN_OPSET, MAX_OPSET = 14, 20  # scaled_dot_product_attention needs 14; torch's TorchScript exporter stops at 20


def _opset(text: str) -> int:
    value = int(text)
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"must be in [{MIN_OPSET}, {MAX_OPSET}], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_export_commands(subparsers) -> None:
    """Register ``export`` and its kinds (``onnx``; ``trt`` and ``yolo`` from ``export.cli_trt_yolo``)."""
    export = subparsers.add_parser("export", help="offline conversions that write files (VLM to ONNX, TensorRT "
                                                  "engines, YOLO)")
    kinds = export.add_subparsers(dest="export_command", required=True)
    from export.cli_trt_yolo import add_trt_yolo_commands
    add_trt_yolo_commands(kinds)
    p = kinds.add_parser(
        "onnx",
        help="VLM to ONNX through Optimum: vision_encoder / embed_tokens / decoder_model_merged graphs, "
             "processor files and a manifest, validated against PyTorch",
    )
    p.add_argument("--vlm", required=True,
                   help="Idefics3/SmolVLM or LLaVA model: a transformers folder (a merged LoRA model is one) "
                        "or a hub id already in the local cache")
    p.add_argument("--out", required=True, help="folder to write; created if missing, files in it are replaced")
    p.add_argument("--opset", type=_opset, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET})")
    p.add_argument("--atol", type=_positive_float, default=OnnxExportOptions.atol,
                   help="max abs difference to PyTorch that Optimum's validation accepts (fp32)")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="check every graph against PyTorch (Optimum's validation); a miss fails the export")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the model folder/hub (off by default)")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import check_export_args, export_vlm_onnx

    check_export_args(args.vlm, args.out)  # milliseconds: a wrong path fails before torch loads
    options = OnnxExportOptions(opset=args.opset, atol=args.atol, validate=args.validate,
                                trust_remote_code=args.trust_remote_code)
    result = export_vlm_onnx(args.vlm, args.out, options)
    for name, size in result.graph_bytes.items():
        print(f"  {name:<28} {size / 1e6:9.1f} MB")
    checked = "validated against PyTorch" if args.validate else "NOT validated (--no-validate)"
    print(f"exported {args.vlm} to {result.out_dir} in {result.seconds:.1f} s, opset {args.opset}, {checked}; "
          f"run it with: edge-vit run --backend onnx --vlm {result.out_dir} ...", file=sys.stdout)
    return 0
