"""Speed of the ONNX Runtime backend per export variant: vision, prefill, time to first token, decode tok/s.

    python -m benchmarks.onnx_speed --model-dir runs/smolvlm-256m-onnx --variants fp32,fp32-fused,int8,int4 --runs 5

``--model-dir`` is an fp32 ``edge-vit export onnx`` folder (``--build-reference smolvlm-256m`` writes the
random-weight SmolVLM-256M architecture and exports it there first). The other variants are built
from it with ``export.optimize`` into ``--variants-dir`` (reused when present). Every measurement
runs the product's own path, ``OnnxVLM.generate``, on one 512 px tile and a grounded prompt of about
``--prompt-tokens`` tokens, ``--max-new-tokens`` forced tokens. The variants run interleaved (one
generation each per round) so a change in machine load hits them alike; one warm-up round is
excluded; medians are reported.

Decode is memory-bound: the limit is bandwidth / decoder weight bytes read per token. The GEMV
floor is the variant's own weight GEMVs run alone, one row each (``gemv_floor_graph``): the tok/s a
decode step could reach with these kernels if attention, norms and the loop cost nothing. It is given
for the nominal 30 GB/s of FIELD-NOTES and for the bandwidth an fp32 GEMV in ONNX Runtime reaches
right now (a probe before and after), since other jobs on a shared machine change it. Prints a
table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

NOMINAL_GBS = 30.0
VARIANTS = {  # name -> OptimizeOptions keyword arguments (None: the fp32 export itself)
    "fp32": None,
    "fp32-fused": {"fuse": True},
    # int8/int4: what `edge-vit export onnx --quantize int8|int4` writes by default, the vision encoder in int8
    # too (validation, which may keep it fp32 on a real model, is off here: random weights).
    "int8": {"quantize": "int8", "quantize_vision": True},
    "int8-fp32-vision": {"quantize": "int8", "quantize_vision": False},
    "int4": {"quantize": "int4", "quantize_vision": True},
    "int4-fp32-vision": {"quantize": "int4", "quantize_vision": False},
}
# TTFT = preprocess (the HF processor on the frame) + vision + prefill (+ the first token's choice).


def decoder_weight_bytes(folder: Path) -> int:
    """Bytes of the decoder's initializers read per token (rotary cos/sin tables: one row per token, left out)."""
    import numpy as np
    import onnx
    from onnx import helper

    from export import io_spec

    model = onnx.load(str(folder / io_spec.DECODER), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name in ("cos_cache", "sin_cache"):
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def gemv_bandwidth_gbs(threads: int, rounds: int = 20) -> float:
    """Median read bandwidth of an fp32 GEMV over a 256 MB weight in ONNX Runtime (what decode can reach now)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 4096, 16384
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return weight.nbytes / _median_run_s(session, {"x": np.ones((1, k), np.float32)}, 3, rounds) / 1e9


def _median_run_s(session, feeds: dict, warmup: int, rounds: int) -> float:
    """Median seconds of ``session.run`` on ``feeds`` over ``rounds`` runs after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


WEIGHT_GEMMS = ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul")


def gemv_floor_graph(folder: Path):
    """The decoder's weight GEMMs alone, each on a one-row input of its K, in graph order and independent.

    Every ``MatMul``/``MatMulNBits``/``DynamicQuantizeMatMul`` whose weight is an initializer keeps its node
    (op, attributes, weight and scale initializers) and gets ``x<K>`` as its activation; attention, norms and
    everything else are left out. Its run time is what one decode step's weights cost with these kernels.
    """
    import onnx
    from onnx import TensorProto, helper

    from export import io_spec

    model = onnx.load(str(folder / io_spec.DECODER))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, keep, widths, outputs = [], set(), set(), []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_GEMMS or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k = int(attrs["K"]) if node.op_type == "MatMulNBits" else int(inits[node.input[1]].dims[0])
        out = f"y{len(nodes)}"
        nodes.append(helper.make_node(node.op_type, [f"x{k}", *node.input[1:]], [out], domain=node.domain, **attrs))
        keep.update(name for name in node.input[1:] if name)
        widths.add(k)
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted(widths)]
    graph = helper.make_graph(nodes, "decoder_gemvs", inputs, outputs, [inits[name] for name in sorted(keep)])
    floor = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return floor, sorted(widths)


def gemv_floor_ms(folder: Path, threads: int, huge_pages: bool = True, rounds: int = 30) -> float:
    """Median time of ``gemv_floor_graph`` (the fastest a decode step can be with these kernels), in ms;
    its weights on the pages the decoder's would be on (``OrtConfig.huge_pages``)."""
    import numpy as np
    import onnxruntime as ort

    from edge_vit.vlm.hugepages import new_memory_on_huge_pages

    model, widths = gemv_floor_graph(folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    with new_memory_on_huge_pages(huge_pages):
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": np.random.default_rng(k).standard_normal((1, k), dtype=np.float32) for k in widths}
    return _median_run_s(session, feeds, 5, rounds) * 1000


def benchmark_case(count_tokens, prompt_tokens: int, image_tokens: int):
    """A 512x512 synthetic frame and a grounded prompt of about ``prompt_tokens`` (image and template included)."""
    import numpy as np

    from edge_vit.grounding import GroundingConfig, ground
    from edge_vit.tiny import SHAPE_CLASSES, render_shapes_frame
    from edge_vit.types import Detections

    frame, truth = render_shapes_frame(t=3, width=512, height=512, n_shapes=8, seed=1)
    detections = Detections(
        xyxy=np.array([t["xyxy"] for t in truth], np.float32), confidence=np.linspace(0.95, 0.4, len(truth)),
        class_id=np.array([SHAPE_CLASSES.index(t["class"]) for t in truth]), names=dict(enumerate(SHAPE_CLASSES)),
        image_size=frame.shape[:2])
    instruction = "Describe the scene: which shapes are where, and which one is the largest?"
    budget = max(8, prompt_tokens - image_tokens - 20)  # ~20 tokens of chat template and instruction
    return frame, ground(detections, instruction, GroundingConfig(max_tokens=budget), count_tokens=count_tokens).text


def build_variants(model_dir: Path, variants_dir: Path, names: list[str]) -> dict[str, Path]:
    from export import io_spec
    from export.optimize import OptimizeOptions, optimize_onnx_folder

    folders = {}
    for name in names:
        if VARIANTS[name] is None:
            folders[name] = model_dir
            continue
        folder = variants_dir / name
        if not (folder / io_spec.MANIFEST).is_file():
            print(f"building {name} in {folder} ...", file=sys.stderr, flush=True)
            optimize_onnx_folder(model_dir, folder, OptimizeOptions(validate=False, **VARIANTS[name]))
        folders[name] = folder
    return folders


def run(args: argparse.Namespace) -> dict:
    from edge_vit.vlm.base import GenerationConfig
    from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig
    from export import io_spec

    model_dir = Path(args.model_dir)
    if args.build_reference and not (model_dir / io_spec.MANIFEST).is_file():
        from export.onnx_export import export_vlm_onnx
        from export.reference_models import build_reference_model

        source = build_reference_model(args.build_reference, model_dir.with_name(model_dir.name + "-source"))
        export_vlm_onnx(source, model_dir)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"onnx_speed: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    variants_dir = Path(args.variants_dir) if args.variants_dir else model_dir.with_name(model_dir.name + "-variants")
    folders = build_variants(model_dir, variants_dir, names)

    load_before, bw_before = os.getloadavg()[0], gemv_bandwidth_gbs(args.threads)
    ort_config = OrtConfig(threads=args.threads, huge_pages=args.huge_pages == "on")
    vlms = {name: OnnxVLM.load(folder, ort_config=ort_config) for name, folder in folders.items()}
    first = vlms[names[0]]
    huge_pages = {name: vlm.huge_pages.as_dict() for name, vlm in vlms.items()}
    precision = {name: vlm.manifest.get("optimization", {}).get("precision") for name, vlm in vlms.items()}
    frame, prompt = benchmark_case(first.count_tokens, args.prompt_tokens,
                                   int(first.manifest.get("tiling", {}).get("tokens_per_tile", 64)))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    stats: dict[str, list] = {name: [] for name in names}
    for round_ in range(args.runs + 1):  # round 0 is the warm-up
        for name in names:
            steps = list(vlms[name].generate(frame, prompt, config))
            if round_ > 0:
                stats[name].append(steps[-1].stats)
    bw_after, load_after = gemv_bandwidth_gbs(args.threads), os.getloadavg()[0]
    del vlms, first  # the floor graphs below hold the weights again
    floors = {name: gemv_floor_ms(folders[name], args.threads, args.huge_pages == "on") for name in names}
    bandwidth = statistics.median([bw_before, bw_after])

    results = []
    for name in names:
        runs = stats[name]
        weight_bytes = decoder_weight_bytes(folders[name])
        med = {key: statistics.median(getattr(s, key) for s in runs)
               for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "preprocess_ms")}
        tok_s = statistics.median(s.decode_tok_s for s in runs)
        results.append({
            "variant": name, "folder": str(folders[name]),
            "precision": precision[name],
            "prompt_tokens": runs[0].prompt_tokens, "image_tokens": runs[0].image_tokens,
            "new_tokens": runs[0].new_tokens, "runs": len(runs),
            "vision_ms": round(med["vision_ms"], 1), "prefill_ms": round(med["prefill_ms"], 1),
            "ttft_ms": round(med["ttft_ms"], 1), "preprocess_ms": round(med["preprocess_ms"], 1),
            "decode_tok_s": round(tok_s, 1),
            "decode_tok_s_min_max": [round(min(s.decode_tok_s for s in runs), 1),
                                     round(max(s.decode_tok_s for s in runs), 1)],
            "ttft_ms_min_max": [round(min(s.ttft_ms for s in runs), 1), round(max(s.ttft_ms for s in runs), 1)],
            "decoder_weight_mb": round(weight_bytes / 1e6, 1),
            "huge_pages": huge_pages[name],
            # the decoder's weight GEMVs alone (gemv_floor_graph): decode cannot beat this with these kernels
            "gemv_floor_ms": round(floors[name], 2), "gemv_floor_tok_s": round(1000 / floors[name], 1),
            "decode_share_of_gemv_floor": round(tok_s * floors[name] / 1000, 3),
            "limit_tok_s_nominal": round(NOMINAL_GBS * 1e9 / weight_bytes, 1),
            "share_of_nominal_limit": round(tok_s * weight_bytes / (NOMINAL_GBS * 1e9), 3),
            "limit_tok_s_measured_bw": round(bandwidth * 1e9 / weight_bytes, 1),
            "share_of_measured_limit": round(tok_s * weight_bytes / (bandwidth * 1e9), 3),
        })
    return {"benchmark": "onnx_speed", "model_dir": str(model_dir), "threads": args.threads,
            "max_new_tokens": args.max_new_tokens, "runs": args.runs,
            "gemv_bandwidth_gbs": [round(bw_before, 1), round(bw_after, 1)], "nominal_bandwidth_gbs": NOMINAL_GBS,
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)], "cpu_count": os.cpu_count(),
            "results": results}


def print_table(report: dict) -> None:
    header = (f"{'variant':<12} {'prep ms':>7} {'vision ms':>9} {'prefill ms':>10} {'TTFT ms':>8} "
              f"{'decode tok/s':>12} {'GEMV floor':>10} {'weights MB':>10} {'limit@30':>8} {'share':>6} "
              f"{'limit@now':>9} {'share':>6}")
    print(f"prompt {report['results'][0]['prompt_tokens']} tokens ({report['results'][0]['image_tokens']} image), "
          f"{report['max_new_tokens']} new tokens, {report['threads']} threads, medians of {report['runs']} runs; "
          f"GEMV bandwidth now {report['gemv_bandwidth_gbs']} GB/s; load {report['loadavg_1min']}")
    print(header)
    for r in report["results"]:
        print(f"{r['variant']:<12} {r['preprocess_ms']:>7.0f} {r['vision_ms']:>9.0f} {r['prefill_ms']:>10.0f} "
              f"{r['ttft_ms']:>8.0f} {r['decode_tok_s']:>12.1f} {r['gemv_floor_tok_s']:>10.1f} "
              f"{r['decoder_weight_mb']:>10.0f} "
              f"{r['limit_tok_s_nominal']:>8.0f} {r['share_of_nominal_limit']:>6.0%} "
              f"{r['limit_tok_s_measured_bw']:>9.0f} {r['share_of_measured_limit']:>6.0%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="fp32 `edge-vit export onnx` folder")
    p.add_argument("--variants", default="fp32,fp32-fused,int8,int8-fp32-vision,int4,int4-fp32-vision",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--variants-dir", default=None, help="where variants are built/reused (default: MODEL_DIR-variants)")
    p.add_argument("--runs", type=int, default=5, help="measured generations per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--huge-pages", choices=("on", "off"), default="on",
                   help="the decoder's weights on 2 MB pages (OrtConfig.huge_pages; on = the product default)")
    p.add_argument("--prompt-tokens", type=int, default=150, help="about this many prompt tokens, image included")
    p.add_argument("--build-reference", default=None, metavar="NAME",
                   help="if MODEL_DIR has no export: build this reference architecture (smolvlm-256m) and export it")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
