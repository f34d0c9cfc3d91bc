"""The latency suite itself: scenario validation, the tegrastats parser, the roofline arithmetic, and a real
``edge-vit bench --quick`` run as a subprocess (tiny local models) whose JSON, Markdown and plots are checked for
structure. No wall-clock number is asserted anywhere.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from benchmarks.measure import summarize
from benchmarks.roofline import kv_bytes_per_position, roofline
from benchmarks.scenario import SCENARIO_DIR, ScenarioError, load_scenario, parse_scenario
from benchmarks.tegrastats import TegrastatsMonitor, parse_line, parse_lines, summarize as tegra_summary, wait_for_samples

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
STAGE_KEYS = {"n", "mean", "min", "p50", "p90", "p99", "max"}


# ------------------------------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_is_valid(path):
    scenario, loaded = load_scenario(str(path))
    assert loaded == path
    assert scenario.vlms and scenario.backends and scenario.prompts and scenario.detectors


def test_the_shipped_scenarios_include_full_and_quick():
    names = {p.stem for p in SCENARIO_DIR.glob("*.yaml")}
    assert {"full", "quick"} <= names


def _quick() -> dict:
    return yaml.safe_load((SCENARIO_DIR / "quick.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["iterations"].update(vlms=3), "unknown key 'iterations.vlms'"),
    (lambda d: d["stream"]["backend"].update(dtype="fp32"), "unknown key 'stream.backend.dtype'"),
    (lambda d: d["backends"].append({"backend": "onnx", "precision": "bf16"}), "backend onnx runs fp32, int8, int4"),
    (lambda d: d["backends"].append({"backend": "tflite"}), "'backends[6].backend' must be one of"),
    (lambda d: d["vlms"][0].update(model={"reference": "smolvlm-9b"}), "unknown reference 'smolvlm-9b'"),
    (lambda d: d["vlms"][0].update(model={"tiny": "idefics3", "path": "x"}), "exactly one of reference, tiny, path"),
    (lambda d: d["detectors"][0].update(imgsz=100), "multiple of 32"),
    (lambda d: d["detectors"][0].update(imgsz="640"), "must be an integer"),
    (lambda d: d.update(new_tokens=True), "must be an integer"),
    (lambda d: d["pipeline"].update(detector="yolo99"), "pipeline.detector 'yolo99'"),
    (lambda d: d["pipeline"].update(backend="engine"), "not measured with backend engine"),
    (lambda d: d.pop("prompts"), "missing key 'prompts'"),
    (lambda d: d.update(device="tpu"), "device must be cpu, cuda or cuda:N"),
    (lambda d: d["prompts"].append(dict(d["prompts"][0])), "names must be unique"),
])
def test_bad_scenarios_are_refused_with_one_line(mutate, message):
    raw = _quick()
    mutate(raw)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw, "bad.yaml")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("bad.yaml: ")


def test_cli_unknown_key_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    from edge_vit.cli import main

    raw = _quick()
    raw["roofline"]["gigabytes"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["bench", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-vit: error: ") and "roofline.gigabytes" in err[0]
    assert main(["bench", "--quick", "--scenario", "full"]) == 2
    assert main(["bench", "--scenario", "no-such-scenario"]) == 2
    assert main(["bench", "--scenario", "full", "--check"]) == 0


def test_reference_smolvlm_500m_config_is_the_published_architecture():
    """export/configs/smolvlm-500m*.json: SmolVLM-500M-Instruct (Idefics3): SigLIP 768/12 layers/512 px, llama
    960 hidden/32 layers/15 heads/5 KV heads/2560 MLP/49,280 vocab; 507M parameters (counted on the meta device)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from export.reference_models import REFERENCE_MODELS, config_paths, load_model_config

    assert "smolvlm-500m" in REFERENCE_MODELS
    config = load_model_config("smolvlm-500m")
    text, vision = config.text_config, config.vision_config
    assert config.model_type == "idefics3" and config.scale_factor == 4 and config.image_token_id == 49190
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (768, 12, 16, 512)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (960, 32, 15, 5, 64, 2560, 49280)
    processor = json.loads(config_paths("smolvlm-500m")[1].read_text())
    assert processor["image_seq_len"] == (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2 == 64
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 507


# ------------------------------------------------------------------------------------------ tegrastats


def _fixture_lines(name: str) -> list[str]:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name, ram, cores, gpu, power, source, rail", [
    ("jetpack6_orin_nano.txt", (2791, 7620), 6, (0.0, None), 4402.0, "VDD_IN", ("VDD_CPU_GPU_CV", 641.0, 641.0)),
    ("jetpack5_agx_orin.txt", (3015, 30536), 8, (0.0, 305.0), 3174.0 + 396 + 2418 + 302, "sum of rails",
     ("VDD_GPU_SOC", 3174.0, 3174.0)),
    ("jetpack4_nano.txt", (2462, 3964), 4, (9.0, None), 3410.0, "POM_5V_IN", ("POM_5V_CPU", 1355.0, 1355.0)),
])
def test_tegrastats_first_line_of_each_format(name, ram, cores, gpu, power, source, rail):
    sample = parse_line(_fixture_lines(name)[0])
    assert (sample.ram_used_mb, sample.ram_total_mb) == ram
    assert len(sample.cpu_load) == cores
    assert (sample.gpu_percent, sample.gpu_mhz) == gpu
    assert sample.total_power_mw == power and sample.total_power_source == source
    rail_name, instant, average = rail
    assert (sample.rails[rail_name].instant_mw, sample.rails[rail_name].average_mw) == (instant, average)
    assert "RAM" not in sample.rails and "SWAP" not in sample.rails


def test_tegrastats_details_dates_off_cores_disabled_sensors_units():
    jp6 = parse_lines(_fixture_lines("jetpack6_orin_nano.txt"))
    assert jp6[1].cpu_load == (61.0, 58.0, 40.0, 37.0, None, None)  # date prefix stripped, off cores are None
    assert jp6[1].cpu_mhz[0] == 1510.0 and jp6[1].gpu_mhz == 1020.0 and jp6[1].emc_percent == 21.0
    assert jp6[1].rails["VDD_IN"].average_mw == 7102.0
    assert jp6[0].temperatures_c["tj"] == 47.5
    agx = parse_line(_fixture_lines("jetpack5_agx_orin.txt")[0])
    assert "CV0" not in agx.temperatures_c and "GPU" not in agx.temperatures_c  # -256C = sensor off
    assert agx.temperatures_c["CPU"] == 44.062
    nano = parse_lines(_fixture_lines("jetpack4_nano.txt"))
    assert nano[1].swap_total_mb == 1982.0 and nano[1].gpu_mhz == 76.0  # IRAM line; GR3D with a clock
    assert nano[1].cpu_load == (5.0, None, None, 3.0)
    assert parse_line("") is None and parse_line("tegrastats: not a line") is None


def test_tegrastats_summary():
    summary = tegra_summary(parse_lines(_fixture_lines("jetpack6_orin_nano.txt")))
    assert summary["samples"] == 3
    assert summary["ram_used_mb_peak"] == 3471.0 and summary["power_mw_peak"] == 10002.0
    assert summary["power_mw_mean"] == pytest.approx((4402 + 9802 + 10002) / 3)
    assert summary["power_source"] == "VDD_IN"
    assert tegra_summary([]) == {"samples": 0}


def test_tegrastats_monitor_reads_a_running_process():
    lines = _fixture_lines("jetpack6_orin_nano.txt")
    script = "import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + "time.sleep(30)\n"
    monitor = TegrastatsMonitor(command=[sys.executable, "-c", script]).start()
    try:
        assert wait_for_samples(monitor, len(lines), timeout_s=20)
    finally:
        samples = monitor.stop()
    assert [s.ram_used_mb for s in samples] == [2791.0, 3467.0, 3471.0]


# ------------------------------------------------------------------------------------------ arithmetic


def test_summarize_percentiles():
    out = summarize([float(v) for v in range(1, 101)])
    assert out["n"] == 100 and out["p50"] == 50.5 and out["min"] == 1.0 and out["max"] == 100.0
    assert out["p90"] == pytest.approx(90.1) and out["p99"] == pytest.approx(99.01)
    assert summarize([]) == {"n": 0}


def test_roofline_arithmetic():
    # SmolVLM-256M's decoder: 30 layers, 3 KV heads of 64, fp32 cache -> 46,080 bytes per cached position.
    kv = kv_bytes_per_position(30, 3, 64, 4)
    assert kv == 46080
    r = roofline(30.0, 540_000_000, kv, 200, measured_tok_s=20.0)
    assert r["bytes_per_token"] == 540_000_000 + 200 * kv
    assert r["roofline_tok_s"] == pytest.approx(30e9 / (540_000_000 + 200 * kv), abs=0.01)
    assert r["share"] == pytest.approx(20.0 / r["roofline_tok_s"], abs=1e-3)
    assert roofline(30.0, 1, 0, 0, None)["share"] is None


def test_quantization_goes_through_export_optimize_or_is_skipped_with_the_reason(tmp_path):
    from dataclasses import dataclass
    from types import SimpleNamespace

    from benchmarks.prepare import Skip, run_optimize
    from benchmarks.scenario import Precision

    @dataclass(frozen=True)
    class Options:
        quantize: str | None = None
        quantize_vision: bool = True
        validate: bool = True

    calls = []
    module = SimpleNamespace(OptimizeOptions=Options,
                             optimize_onnx_folder=lambda src, out, options: calls.append((src, out, options)))
    run_optimize(module, tmp_path / "fp32", tmp_path / "int4", Precision.INT4)
    # onnx_speed's "int4": what `export onnx --quantize int4` writes by default, int8 vision encoder included
    assert calls == [(tmp_path / "fp32", tmp_path / "int4", Options("int4", True, False))]
    with pytest.raises(Skip, match="needs export optimize"):
        run_optimize(SimpleNamespace(), tmp_path / "fp32", tmp_path / "int8", Precision.INT8)


def test_a_cases_memory_does_not_count_building_its_model(monkeypatch):
    """Exports and quantization run in the bench process: they happen before the case's memory monitor starts
    (the 2026-12-01 run's int8 rows had counted the quantization: +6 GB for a model that runs in 1.4 GB)."""
    from types import SimpleNamespace

    from benchmarks import runner
    from benchmarks.scenario import BackendSpec, Precision, Tiling, VlmBackend

    events = []

    class Monitor:
        result = {"peak_rss_mb": 1.0}

        def __enter__(self):
            events.append("monitor")
            return self

        def __exit__(self, *exc):
            events.append("monitor done")

    def load(suite, folder, backend, tiling):
        events.append(f"load {folder}")
        return object(), None

    monkeypatch.setattr(runner, "_load_vlm", load)
    ws = SimpleNamespace(onnx_folder=lambda spec, precision: events.append(f"build {precision.value}") or "/x")
    suite = SimpleNamespace(s=SimpleNamespace(prompts=[]), ws=ws, cuda=False, monitor=Monitor,
                            guarded=lambda case, fn: {**case, **fn(), "status": "ok"})
    ran = runner._vlm_group(suite, SimpleNamespace(name="m"), BackendSpec(VlmBackend.ONNX, Precision.INT8),
                            Tiling.SINGLE, [], [], None, {}, None)
    assert ran and events == ["build int8", "monitor", "load /x", "monitor done"]


# ------------------------------------------------------------------------------------------ the quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick")
    proc = run_cli("bench", "--quick", "--out", str(out / "results"), "--work-dir", str(out / "work"), timeout=240)
    return proc, out / "results"


def _assert_stage(stage: dict) -> None:
    assert STAGE_KEYS <= set(stage), stage
    assert stage["n"] >= 1 and stage["p50"] <= stage["p90"] <= stage["p99"] <= stage["max"]


def test_quick_run_exits_0_and_prints_json_last(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["schema"] == "edge-vit-bench/1"
    m = results["machine"]
    for key in ("cpu", "cores_logical", "ram_gb", "os", "python", "date", "load_avg_start", "load_avg_end"):
        assert m[key], key
    assert {"torch", "transformers", "onnxruntime", "ultralytics"} <= set(m["versions"])
    assert results["config"]["name"] == "quick" and results["config"]["scenario_data"]["new_tokens"] == 8
    assert results["summary"]["failed"] == []


def test_quick_run_has_every_stage_with_percentiles_and_ratios(quick_run):
    proc, _ = quick_run
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["source"]["status"] == "ok"
    _assert_stage(results["source"]["stages"]["decode"])

    detectors = results["detectors"]
    assert {(d["detector"], d["backend"]) for d in detectors} == {
        ("yolo26n", "torch"), ("yolo26n", "onnx"), ("yolo11n", "torch"), ("yolo11n", "onnx")}
    for case in detectors + results["baselines"]["detector"]:
        assert case["status"] == "ok", case
        for stage in ("detect_pre", "detect_infer", "detect_post", "detect"):
            _assert_stage(case["stages"][stage])
    for case in detectors:
        assert case["vs_baseline"]["detect"] > 0 and case["memory"]["peak_rss_mb"] > 0

    assert [g["status"] for g in results["grounding"]] == ["ok"]
    _assert_stage(results["grounding"][0]["stages"]["grounding"])

    ran = [c for c in results["vlm"] if c["status"] == "ok"]
    assert {(c["backend"], c["precision"]) for c in ran} >= {("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32")}
    for case in ran:
        for stage in ("detect", "grounding", "preprocess", "vision", "prefill", "ttft", "decode", "vlm_total",
                      "answer", "decode_tok_s", "itl"):
            _assert_stage(case["stages"][stage])
        assert case["tokens"]["new_tokens"] == 8 and case["tokens"]["tiles"] == 1
        vs = case["vs_baseline"]
        assert vs["baseline"] == "tiny-idefics3/baseline"
        assert all(vs[k] > 0 for k in ("answer", "ttft", "vlm_total", "decode_tok_s"))
        r = case["roofline"]
        assert r["bandwidth_gb_s"] > 0 and r["bytes_per_token"] > r["weight_bytes"] > 0
        assert r["roofline_tok_s"] > 0 and r["measured_tok_s"] > 0 and r["share"] > 0
        if case["backend"] == "onnx":  # ONNX on CPU: the decoder's weight GEMVs alone bound decode
            assert r["gemv_floor_tok_s"] > 0 and r["share_of_gemv_floor"] == pytest.approx(
                r["measured_tok_s"] / r["gemv_floor_tok_s"], abs=2e-3)
        else:
            assert "gemv_floor_tok_s" not in r
        assert case["memory"]["peak_rss_mb"] >= case["memory"]["rss_before_mb"] > 0
    grounded = {c["backend"] + c["precision"]: c["tokens"]["prompt_tokens"] for c in ran if c["grounding"]}
    plain = {c["backend"] + c["precision"]: c["tokens"]["prompt_tokens"] for c in ran if not c["grounding"]}
    assert all(grounded[k] > plain[k] for k in grounded)  # the grounding text is in the prompt

    import importlib.util

    if importlib.util.find_spec("export.optimize") is not None:  # int8/int4 folders come from export.optimize
        assert {("onnx", "int8"), ("onnx", "int4")} <= {(c["backend"], c["precision"]) for c in ran}
    not_run = {(c["backend"], c["precision"]): c for c in results["vlm"] if c["status"] != "ok"}
    for (backend, precision), case in not_run.items():
        assert case["status"] == "skipped" and case["reason"]
        if backend == "trt":
            assert "CUDA" in case["reason"]
        elif precision in ("int8", "int4"):
            assert "export optimize" in case["reason"]

    (baseline,) = results["baselines"]["vlm"]
    assert baseline["status"] == "ok" and baseline["tokens"]["tiles"] > 1  # the processor's default splitting
    for stage in ("preprocess", "ttft", "decode", "vlm_total", "answer", "decode_tok_s"):
        _assert_stage(baseline["stages"][stage])

    stream = results["stream"]
    assert stream["status"] == "ok" and stream["errors"] == 0, stream
    assert stream["frames_processed"] > 0 and stream["answers"] >= 1 and stream["frames_dropped"] >= 0
    assert stream["detector_fps"] > 0 and stream["vs_baseline"]["answer"] > 0
    assert stream["detector_spinning_off"] is True  # the .onnx detector as `edge-vit run` loads it next to a VLM
    for stage in ("detect", "vlm_total", "frame_age", "ttft"):
        _assert_stage(stream["stages"][stage])

    roof = results["roofline"]
    assert roof["gb_s"] > 0 and roof["copy_gb_s"] > 0 and roof["read_gb_s"] > 0 and roof["method"]
    assert {row["id"] for row in roof["cases"]} >= {c["id"] for c in ran}


def test_quick_run_writes_markdown_and_plots(quick_run, capsys):
    from benchmarks.report import machine_line, render_markdown
    from edge_vit.cli import main

    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("results.json", "report.md", "stages.png", "roofline.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown == render_markdown(results)
    assert machine_line(results) in markdown and results["machine"]["date"][:10] in markdown
    assert "| tiny-idefics3 | torch fp32 | grounded |" in markdown and "yolo26n" in markdown
    # the README helper: the same table, printed from a results file
    assert main(["bench", "--table", str(out / "results.json")]) == 0
    assert capsys.readouterr().out == markdown


def test_results_can_be_rendered_again_after_edits(quick_run):
    """render_markdown copes with cases that failed (e.g. an older results file)."""
    from benchmarks.report import render_markdown

    _, out = quick_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    broken = copy.deepcopy(results)
    broken["vlm"][0].update(status="failed", reason="RuntimeError: boom")
    assert "RuntimeError: boom" in render_markdown(broken)


@pytest.mark.skipif(not (Path(__file__).parents[1] / "edge_vit/assets/demo/detector.onnx").is_file(),
                    reason="the demo detector is not built")
def test_stream_bench_compares_detector_spinning_as_its_docstring_shows(tiny_idefics3, tmp_path):
    """python -m benchmarks.stream_bench: StreamRunner on a generated real-time clip, the detector's ONNX Runtime
    threads spinning on and off, one row each; bad settings are argparse's one-line error."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    cmd = [sys.executable, "-m", "benchmarks.stream_bench", "--vlm", str(tiny_idefics3), "--backend", "torch",
           "--detector", str(root / "edge_vit/assets/demo/detector.onnx"), "--imgsz", "320", "--seconds", "2",
           "--rounds", "1", "--new-tokens", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert set(report["summary"]) == {"on", "off"} and lines[1].startswith("spinning")  # the table, then JSON
    for setting, (run,) in report["runs"].items():
        assert run["errors"] == 0 and run["frames_processed"] > 0 and run["answers"] >= 1
        assert run["detector_spinning_off"] is (setting == "off")
        assert report["summary"][setting]["detector_fps"] == run["detector_fps"] > 0
    bad = subprocess.run(cmd + ["--detector-spinning", "on,maybe"], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert bad.returncode == 2 and "--detector-spinning takes on and/or off" in bad.stderr.strip().splitlines()[-1]
