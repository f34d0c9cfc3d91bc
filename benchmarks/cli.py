"""``edge-vit bench``: run a scenario of the latency suite and write its report; a thin layer over runner/report.

    edge-vit bench                      # the full CPU scenario (benchmarks/scenarios/full.yaml)
    edge-vit bench --quick              # tiny local models, < 2 minutes: the suite's own smoke test (CI)
    edge-vit bench --scenario cuda      # a shipped scenario by name, or --scenario path/to/my.yaml
    edge-vit bench --table              # print the Markdown report of the newest results (for the README)

Progress goes to stderr; stdout carries only the results as one JSON object, on the last line (library output
during the run is sent to stderr). Exit code 0 when every case ran or was skipped with a reason, 1 when a case
failed (its error is in the report), 2 for a bad scenario file or option.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_SCENARIO = "full"


def add_bench_commands(subparsers) -> None:
    """Register ``bench`` on the ``edge-vit`` subparsers."""
    from benchmarks.prepare import DEFAULT_WORK_DIR

    p = subparsers.add_parser(
        "bench", help="latency suite: every stage and backend side by side, with baselines and a report",
        description="Time the product's own code path (source decode, detector, grounding, vision, prefill, time to "
                    "first token, decode, answer latency, a real-time stream) for every backend in a scenario file, "
                    "beside transformers/Ultralytics baselines and the decode roofline. Writes results.json, "
                    "report.md and plots; prints the JSON as the last line of stdout.",
    )
    p.add_argument("--scenario", default=None,
                   help=f"a shipped scenario name ({', '.join(_shipped())}) or a YAML file (default: {DEFAULT_SCENARIO})")
    p.add_argument("--quick", action="store_true",
                   help="the quick scenario: tiny local models, small images, few iterations (< 2 min; CI runs it)")
    p.add_argument("--out", default=None,
                   help="results folder (default: benchmarks/results/<date>-<machine>/, with -<scenario> unless full)")
    p.add_argument("--work-dir", default=None,
                   help=f"built models, exports and clips, reused between runs (default: {DEFAULT_WORK_DIR})")
    p.add_argument("--check", action="store_true", help="validate the scenario file and stop")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and stop")
    p.add_argument("--table", nargs="?", const="latest", default=None, metavar="RESULTS_JSON",
                   help="print the Markdown report of a results.json (default: the newest in benchmarks/results) "
                        "and stop")
    p.set_defaults(func=cmd_bench)


def _shipped() -> list[str]:
    from benchmarks.scenario import shipped_scenarios

    return shipped_scenarios()


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.scenario import ScenarioError, load_scenario

    if args.list:
        for name in _shipped():
            scenario, _ = load_scenario(name)
            print(f"{name:<8} {scenario.description}")
        return 0
    if args.table is not None:
        return _print_table(args.table)
    if args.quick and args.scenario:
        raise ScenarioError("give --quick or --scenario, not both")
    scenario, path = load_scenario("quick" if args.quick else args.scenario or DEFAULT_SCENARIO)
    if args.check:
        print(f"{path}: ok ({len(scenario.vlms)} VLMs x {len(scenario.backends)} backends x "
              f"{len(scenario.tiling)} tilings x {len(scenario.prompts)} prompts, {len(scenario.detectors)} detectors)")
        return 0

    # The benchmark never downloads and never lets Ultralytics pip-install helpers mid-run.
    for key, value in (("HF_HUB_OFFLINE", "1"), ("YOLO_OFFLINE", "1"), ("YOLO_AUTOINSTALL", "false"),
                       ("YOLO_VERBOSE", "false")):
        os.environ.setdefault(key, value)
    from benchmarks.prepare import DEFAULT_WORK_DIR
    from benchmarks.report import write_report
    from benchmarks.runner import run_suite

    t0 = time.monotonic()

    def progress(message: str) -> None:
        print(f"[bench {time.monotonic() - t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    work_dir = Path(args.work_dir) if args.work_dir else DEFAULT_WORK_DIR
    with _stdout_to_stderr():
        results = run_suite(scenario, path, work_dir, progress)
        out = Path(args.out) if args.out else _default_out(results, path.stem)
        write_report(results, out)
    summary = results["summary"]
    for error in results.get("report_errors", []):
        progress(f"report: {error}")
    progress(f"done in {summary['seconds']} s: {summary['ok']} ok, {len(summary['skipped'])} skipped, "
             f"{len(summary['failed'])} failed; report in {out}/report.md")
    print(json.dumps(results, separators=(",", ":")), flush=True)
    return 1 if summary["failed"] or results.get("report_errors") else 0


def _default_out(results: dict, scenario_name: str) -> Path:
    from benchmarks.measure import machine_slug

    date = dt.date.today().isoformat()
    suffix = "" if scenario_name == DEFAULT_SCENARIO else f"-{scenario_name}"
    return RESULTS_DIR / f"{date}-{machine_slug(results['machine'])}{suffix}"


def _print_table(which: str) -> int:
    from benchmarks.report import latest_results, render_markdown
    from edge_vit.errors import EdgeVitError

    path = latest_results(RESULTS_DIR) if which == "latest" else Path(which)
    if path is None or not path.is_file():
        raise EdgeVitError(f"no results to render: {which if which != 'latest' else RESULTS_DIR / '*/results.json'}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        print(render_markdown(results), end="")
    except (ValueError, KeyError) as exc:
        raise EdgeVitError(f"{path} is not an edge-vit bench results.json ({type(exc).__name__}: {exc})") from None
    return 0


class _stdout_to_stderr:
    """Point file descriptor 1 at stderr while the suite runs, so libraries that print (Ultralytics, ONNX export
    tools, C extensions) cannot interleave with the JSON line; restored before the JSON is printed."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
