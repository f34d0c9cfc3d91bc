"""``edge-vit export ...``: thin subcommands over the export library (they write files and say what they wrote).

Registered into the main parser by ``add_export_commands(subparsers)``. Imports
nothing heavy until a command runs; user mistakes raise ``EdgeVitError``, which
the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from export.onnx_export import DEFAULT_OPSET, OnnxExportOptions

from edge_vit.argtypes import int_in, positive_float, positive_int

MIN_OPSET, MAX_OPSET = 14, 20  # scaled_dot_product_attention needs 14; torch's TorchScript exporter stops at 20


_opset = int_in(MIN_OPSET, MAX_OPSET)


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
    p.add_argument("--atol", type=positive_float, default=OnnxExportOptions.atol,
                   help="max abs difference to PyTorch that Optimum's validation accepts (fp32)")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                   help="check every graph against PyTorch (Optimum's validation); a miss fails the export")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="allow model code from the model folder/hub (off by default)")
    _add_optimize_arguments(p, optimize_default=False)
    p.set_defaults(func=cmd_export_onnx)

    p = kinds.add_parser(
        "optimize",
        help="fused (GroupQueryAttention, RMSNorm, rotary, ...) and int8/int4 variant of an `export onnx` folder "
             "for ONNX Runtime on CPU, validated against it",
    )
    p.add_argument("--onnx-dir", required=True, help="fp32 folder written by `edge-vit export onnx`")
    p.add_argument("--out", required=True, help="folder to write (not the --onnx-dir); files in it are replaced")
    _add_optimize_arguments(p, optimize_default=True)
    p.set_defaults(func=cmd_export_optimize)


def _add_optimize_arguments(p: argparse.ArgumentParser, *, optimize_default: bool) -> None:
    from export.optimize import OptimizeOptions

    g = p.add_argument_group("fusion and quantization (ONNX Runtime, CPU)")
    g.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=optimize_default,
                   help="fuse attention, RMSNorm/LayerNorm, rotary and GELU into ONNX Runtime's fused kernels")
    g.add_argument("--quantize", default=None, metavar="{int8,int4}",
                   help="decoder weights to int8 or int4 (MatMulNBits, int8 compute); default: keep fp32")
    g.add_argument("--quantize-vision", action=argparse.BooleanOptionalAction, default=OptimizeOptions.quantize_vision,
                   help="with --quantize: int8 vision encoder too, kept only if its features stay within "
                        f"cosine {OptimizeOptions.min_vision_cosine} of fp32")
    g.add_argument("--prefill-graph", action=argparse.BooleanOptionalAction, default=OptimizeOptions.prefill_graph,
                   help="with --quantize: also write decoder_prefill.onnx (int8 per-column GEMMs) that the ONNX "
                        "backend runs the prompt through on CPU: faster time to first token, more memory")
    g.add_argument("--int8-kernel", choices=("dynamic", "nbits"), default=OptimizeOptions.int8_kernel,
                   help="with --quantize int8: nbits (MatMulNBits blocks, as int4, with the prefill graph; "
                        "closest to fp32) or dynamic (DynamicQuantizeMatMul, int8 per-column weights, for the "
                        "prompt and each new token: one decoder graph, less memory); --method gptq uses nbits")
    g.add_argument("--block-size", type=int, default=None,
                   help="MatMulNBits quantization block along K (16-256; default: 128 for int8, 32 for int4)")
    g.add_argument("--method", choices=("rtn", "gptq"), default=OptimizeOptions.method,
                   help="with --quantize: how weights are rounded: rtn (nearest level) or gptq (each rounding "
                        "error compensated on calibration prompts run through the fp32 export; slower to build, "
                        "closer to fp32 at int4)")
    g.add_argument("--calibration-prompts", type=positive_int, default=OptimizeOptions.calibration_prompts,
                   help="with --method gptq: grounded prompts on synthetic frames (plus their fp32 answers) that "
                        "calibrate the rounding")
    g.add_argument("--validate-variant", action=argparse.BooleanOptionalAction, default=OptimizeOptions.validate,
                   help="compare the variant with the fp32 graphs (vision cosine, token agreement, teacher-forced "
                        "logits) and write the numbers into the manifest")
    g.add_argument("--validation-prompts", type=positive_int, default=OptimizeOptions.validation_prompts,
                   help="grounded prompts on synthetic frames for the validation")


def _optimize_options(args: argparse.Namespace):
    """OptimizeOptions from the flags, or None when neither --optimize nor --quantize asks for a variant."""
    from export.optimize import OptimizeOptions, parse_quantization

    quantize = parse_quantization(args.quantize)  # one-line error for e.g. --quantize int3
    if not args.optimize and quantize is None:
        return None
    return OptimizeOptions(fuse=args.optimize, quantize=quantize, quantize_vision=args.quantize_vision,
                           prefill_graph=args.prefill_graph, block_size=args.block_size, validate=args.validate_variant,
                           int8_kernel=args.int8_kernel,
                           validation_prompts=args.validation_prompts, method=args.method,
                           calibration_prompts=args.calibration_prompts)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import check_export_args, export_vlm_onnx

    check_export_args(args.vlm, args.out)  # milliseconds: a wrong path fails before torch loads
    optimize = _optimize_options(args)
    options = OnnxExportOptions(opset=args.opset, atol=args.atol, validate=args.validate,
                                trust_remote_code=args.trust_remote_code)
    if optimize is None:
        result = export_vlm_onnx(args.vlm, args.out, options)
        out_dir = result.out_dir
        for name, size in result.graph_bytes.items():
            print(f"  {name:<28} {size / 1e6:9.1f} MB")
    else:
        import tempfile
        from pathlib import Path

        from export.optimize import check_out_dir, optimize_onnx_folder, summary_lines

        out = check_out_dir(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-fp32-", dir=out.parent) as fp32_dir:
            result = export_vlm_onnx(args.vlm, Path(fp32_dir), options)  # the reference the variant is checked on
            variant = optimize_onnx_folder(fp32_dir, out, optimize, source_label=f"{args.vlm} (fp32 export, not kept)")
        out_dir = variant.out_dir
        print("\n".join(summary_lines(variant)))
    checked = "validated against PyTorch" if args.validate else "NOT validated (--no-validate)"
    print(f"exported {args.vlm} to {out_dir} in {result.seconds:.1f} s, opset {args.opset}, {checked}; "
          f"run it with: edge-vit run --backend onnx --vlm {out_dir} ...", file=sys.stdout)
    return 0


def cmd_export_optimize(args: argparse.Namespace) -> int:
    from export.optimize import check_out_dir, optimize_onnx_folder, read_export_manifest, summary_lines

    options = _optimize_options(args)
    if options is None:
        from edge_vit.errors import EdgeVitError

        raise EdgeVitError("nothing to do: --no-optimize without --quantize int8|int4")
    read_export_manifest(args.onnx_dir)  # cheap checks first: a folder that is not an fp32 export
    check_out_dir(args.out, not_same_as=args.onnx_dir)
    result = optimize_onnx_folder(args.onnx_dir, args.out, options)
    print("\n".join(summary_lines(result)))
    print(f"run it with: edge-vit run --backend onnx --vlm {result.out_dir} ...")
    return 0
