"""The latency benchmark suite: ``edge-vit bench`` (see benchmarks/README.md).

    scenario.py      scenario files (YAML) as typed dataclasses; unknown keys and bad values refused on load
    scenarios/       full (real-size CPU), quick (tiny models, CI), cuda (GPU / Jetson)
    prepare.py       models, ONNX/int8/int4 exports, TensorRT engines, YOLO exports, the clip: built once, reused
    runner.py        every case on the product's own code path; warm-up excluded; ratios vs the baselines
    baselines.py     what a user does without edge-vit: transformers generate, YOLO().predict
    stream_bench.py  a clip at its native fps through StreamRunner
    roofline.py      measured bandwidth / bytes read per decoded token
    measure.py       percentiles, peak memory, machine description
    tegrastats.py    Jetson tegrastats lines -> samples (power, memory), and a monitor
    report.py        results.json, report.md (render_markdown), stages.png, roofline.png
    cli.py           `edge-vit bench`
"""
