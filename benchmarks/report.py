"""The results of a run as files people read: ``results.json``, ``report.md`` and two plots.

``render_markdown(results)`` is the table to paste into the README: a heading with the date and the machine
line (CPU, cores, RAM, OS, library versions, load average), then the VLM, detector, stream, source/grounding
and roofline tables. Times are milliseconds at p50 with p90/p99 where shown; "×" is the speed-up over the
baseline measured in the same run. ``write_report`` writes everything into the results folder.
This module only formats; it never measures.
"""

from __future__ import annotations

import json
from pathlib import Path

VLM_STACK = ("detect", "grounding", "preprocess", "vision", "prefill", "decode")
BASELINE_STACK = ("preprocess", "vision_prefill", "decode")
DETECT_STACK = ("detect_pre", "detect_infer", "detect_post")
COLOURS = {"detect": "#8c8c8c", "grounding": "#bcbd22", "preprocess": "#17becf", "vision": "#1f77b4",
           "prefill": "#ff7f0e", "vision_prefill": "#9467bd", "decode": "#2ca02c",
           "detect_pre": "#17becf", "detect_infer": "#1f77b4", "detect_post": "#ff7f0e"}


# ------------------------------------------------------------------------------------------ formatting


def _ms(value) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 1 else f"{value:.2f}"


def _stage(case: dict, name: str, key: str = "p50"):
    return case.get("stages", {}).get(name, {}).get(key)


def _pct(case: dict, name: str) -> str:
    """'p50 (p90 / p99)' of a stage."""
    st = case.get("stages", {}).get(name, {})
    if not st.get("n"):
        return "—"
    return f"{_ms(st['p50'])} ({_ms(st['p90'])} / {_ms(st['p99'])})"


def _x(value) -> str:
    return f"{value:.2f}×" if value else "—"


def _share(value) -> str:
    return f"{value * 100:.0f}%" if value is not None else "—"


def _memory(case: dict) -> str:
    """Peak resident memory of the process (and how much the case's model load added), CUDA peak allocation,
    Jetson board power, where measured."""
    m = case.get("memory") or {}
    if not m:
        return "—"
    text = f"{_ms(m.get('peak_rss_mb'))} (+{_ms(max(m.get('peak_rss_delta_mb', 0.0), 0.0))})"
    if m.get("cuda_max_allocated_mb") is not None:
        text += f" · GPU {_ms(m['cuda_max_allocated_mb'])}"
    tegra = m.get("tegrastats") or {}
    if tegra.get("power_mw_mean") is not None:
        text += f" · {tegra['power_mw_mean'] / 1000:.1f} W"
    return text


def machine_line(results: dict) -> str:
    m = results["machine"]
    v = m.get("versions", {})
    libs = " · ".join(f"{name} {v[name]}" for name in ("torch", "onnxruntime", "transformers", "ultralytics") if name in v)
    gpu = f" · {m['gpu']}" if m.get("gpu") else ""
    jetson = " · Jetson" if m.get("jetson") else ""
    start = ", ".join(f"{x:.2f}" for x in m.get("load_avg_start", []))
    end = ", ".join(f"{x:.2f}" for x in m.get("load_avg_end", []))
    return (f"{m['date'][:10]} · {m['cpu']}, {m['cores_logical']} cores, {m['ram_gb']} GB RAM{gpu}{jetson} · "
            f"{m['os']} · Python {m['python']} · {libs} · load average (1/5/15 min) {start} at start, {end} at end")


def _skip_row(case: dict, columns: int, lead: list[str], notes: dict[str, int] | None = None) -> str:
    """A row for a case that did not run: its status and a note number (the reason is listed once, below)."""
    reason = case.get("reason", "")
    mark = ""
    if notes is not None:
        mark = f" [{notes.setdefault(reason, len(notes) + 1)}]"
    cells = lead + [f"*{case['status']}*{mark}" if notes is not None else f"*{case['status']}*: {reason}"]
    return "| " + " | ".join(cells + [""] * (columns - len(cells))) + " |"


def render_markdown(results: dict) -> str:
    """The report as Markdown: heading with date and machine line, then one table per part of the suite."""
    cfg = results["config"]
    lines = [f"### edge-vit latency benchmark: `{cfg['name']}` scenario",
             "",
             f"**{machine_line(results)}**",
             "",
             ("Milliseconds unless marked; p50 (p90 / p99) over the measured runs, warm-up excluded. "
              "×: speed-up over the baseline measured in the same run (>1 is faster). Memory: peak resident "
              "memory of the process (+ what loading and running the case added). "
              + ("Random weights: the latency is the real architecture's, the answers are noise."
                 if any(c.get("random_weights") for c in results.get("vlm", [])) else "")),
             ""]
    notes: dict[str, int] = {}
    lines += _vlm_table(results, notes)
    lines += _detector_table(results, notes)
    lines += _stream_table(results, notes)
    lines += _stage_table(results)
    lines += _roofline_table(results)
    if notes:
        lines += ["Cases that did not run:", ""]
        lines += [f"{number}. {reason}" for reason, number in notes.items()]
    return "\n".join(lines).rstrip() + "\n"


def _vlm_table(results: dict, notes: dict[str, int]) -> list[str]:
    cases = results.get("vlm", [])
    baselines = results.get("baselines", {}).get("vlm", [])
    if not cases and not baselines:
        return []
    new_tokens = results["config"]["scenario_data"]["new_tokens"]
    header = ["model", "backend", "prompt", "tiles · image · prompt tokens", "vision", "prefill", "TTFT",
              "decode tok/s", "ITL p50 / p99", "answer", "× answer", "× TTFT", "roofline share", "memory MB"]
    out = [f"**VLM: frame in hand → answer** ({new_tokens} new tokens, min = max; answer = detector + grounding + "
           f"VLM; ITL = time between streamed tokens)", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_model: dict[str, list[dict]] = {}
    for case in baselines + cases:
        by_model.setdefault(case["vlm"], []).append(case)
    for model, rows in by_model.items():
        for case in rows:
            baseline = case["kind"] == "vlm_baseline"
            backend = ("baseline: transformers generate fp32, default processor" if baseline
                       else f"{case['backend']} {case['precision']}" + (f" ({case['tiling']})" if case["tiling"] != "single" else ""))
            lead = [model, backend, case.get("prompt", "")]
            if case.get("status") != "ok":
                out.append(_skip_row(case, len(header), lead, notes))
                continue
            t = case.get("tokens", {})
            vs = case.get("vs_baseline", {})
            itl = f"{_ms(_stage(case, 'itl'))} / {_ms(_stage(case, 'itl', 'p99'))}"
            vision = _ms(_stage(case, "vision")) if not baseline else "—"
            prefill = _ms(_stage(case, "prefill")) if not baseline else f"{_ms(_stage(case, 'vision_prefill'))} (vision + prefill)"
            tok_s = _stage(case, "decode_tok_s")
            out.append("| " + " | ".join(lead + [
                f"{t.get('tiles', '—')} · {t.get('image_tokens', '—')} · {t.get('prompt_tokens', '—')}",
                vision, prefill, _ms(_stage(case, "ttft")), f"{tok_s:.1f}" if tok_s else "—", itl,
                _pct(case, "answer"),
                "1.00× (baseline)" if baseline else _x(vs.get("answer")),
                "1.00× (baseline)" if baseline else _x(vs.get("ttft")),
                _share(case.get("roofline", {}).get("share")),
                _memory(case),
            ]) + " |")
    return out + [""]


def _detector_table(results: dict, notes: dict[str, int]) -> list[str]:
    cases = results.get("detectors", [])
    baselines = results.get("baselines", {}).get("detector", [])
    if not cases and not baselines:
        return []
    header = ["detector", "backend", "imgsz", "pre", "infer", "post", "detect() wall", "fps", "× wall", "× infer",
              "memory MB"]
    random = any(c.get("random_weights") for c in cases)
    out = ["**Detector** (Ultralytics' pre/infer/post split; wall = the whole `Detector.detect` call"
           + ("; random weights find no boxes, so post-processing is a lower bound" if random else "") + ")", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_name: dict[str, list[dict]] = {}
    for case in baselines + cases:
        by_name.setdefault(case["detector"], []).append(case)
    for name, rows in by_name.items():
        for case in rows:
            baseline = case["kind"] == "detector_baseline"
            lead = [name, "baseline: YOLO().predict, PyTorch" if baseline else case["backend"], str(case["imgsz"])]
            if case.get("status") != "ok":
                out.append(_skip_row(case, len(header), lead, notes))
                continue
            vs = case.get("vs_baseline", {})
            wall = _stage(case, "detect")
            out.append("| " + " | ".join(lead + [
                _ms(_stage(case, "detect_pre")), _ms(_stage(case, "detect_infer")), _ms(_stage(case, "detect_post")),
                _pct(case, "detect"), f"{1000 / wall:.1f}" if wall else "—",
                "1.00× (baseline)" if baseline else _x(vs.get("detect")),
                "1.00× (baseline)" if baseline else _x(vs.get("detect_infer")),
                _memory(case),
            ]) + " |")
    return out + [""]


def _stream_table(results: dict, notes: dict[str, int]) -> list[str]:
    st = results.get("stream")
    if not st:
        return []
    header = ["VLM", "detector", "clip fps", "detector fps", "of clip fps", "frames processed / dropped", "answers",
              "answer latency", "× answer", "frame age at answer", "TTFT"]
    out = ["**Stream** (the clip at its native fps through StreamRunner, the VLM answering continuously on the "
           "latest frame; frame age = capture → answer complete)", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lead = [f"{st['vlm']} {st['backend']} {st['precision']}", f"{st['detector']} {st['detector_backend']}"]
    if st.get("status") != "ok":
        return out + [_skip_row(st, len(header), lead, notes), ""]
    vs = st.get("vs_baseline", {})
    out.append("| " + " | ".join(lead + [
        f"{st['clip_fps']:g}" if st.get("clip_fps") else "—", f"{st['detector_fps']:.1f}",
        _share(vs.get("detector_fps_of_clip")),
        f"{st['frames_processed']} / {st['frames_dropped']} ({st['drop_rate'] * 100:.0f}% dropped)",
        str(st["answers"]), _pct(st, "vlm_total"), _x(vs.get("answer")), _pct(st, "frame_age"), _pct(st, "ttft"),
    ]) + " |")
    return out + [""]


def _stage_table(results: dict) -> list[str]:
    rows = []
    src = results.get("source")
    if src and src.get("status") == "ok":
        size = "x".join(str(v) for v in src.get("frame") or [])
        rows.append(("source decode", f"{size} frame, OpenCV/FFmpeg file source", src))
    for g in results.get("grounding", []):
        if g.get("status") == "ok":
            rows.append(("grounding", f"{g['objects']} objects → {g['grounding_tokens']} tokens ({g['vlm']} tokenizer)", g))
    if not rows:
        return []
    out = ["**Source and grounding**", "", "| stage | what | p50 | p90 | p99 | n |", "|---|---|---|---|---|---|"]
    for name, what, case in rows:
        st = next(iter(case["stages"].values()))
        out.append(f"| {name} | {what} | {_ms(st['p50'])} | {_ms(st['p90'])} | {_ms(st['p99'])} | {st['n']} |")
    return out + [""]


def _roofline_table(results: dict) -> list[str]:
    r = results.get("roofline")
    if not r or not r.get("cases"):
        return []
    out = [f"**Decode roofline**: measured bandwidth {r['gb_s']} GB/s ({r['method']}); "
           f"roofline = bandwidth ÷ bytes read per token (decoder weights + KV cache)", "",
           "| case | bytes per token | roofline tok/s | measured tok/s | share | GEMV floor tok/s |",
           "|---|---|---|---|---|---|"]
    for row in r["cases"]:
        floor = row.get("gemv_floor_tok_s")
        out.append(f"| {row['id']} | {row['bytes_per_token'] / 1e6:,.1f} MB | {row['roofline_tok_s']:.1f} | "
                   f"{row['measured_tok_s'] or 0:.1f} | {_share(row['share'])} | "
                   f"{f'{floor:.1f}' if floor else '—'} |")
    out.append("")
    out.append("GEMV floor (ONNX on CPU): the decoder's own weight GEMVs run alone, one row each, without attention, "
               "norms or the loop: the most decode can reach with these kernels.")
    return out + [""]


# ------------------------------------------------------------------------------------------ plots


def plot_stages(results: dict, path: Path) -> None:
    """Per-stage p50 latency bars: one row per VLM backend/prompt (and baseline), one per detector backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vlm = [c for c in results.get("baselines", {}).get("vlm", []) + results.get("vlm", []) if c.get("status") == "ok"]
    det = [c for c in results.get("baselines", {}).get("detector", []) + results.get("detectors", [])
           if c.get("status") == "ok"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 2.5 + 0.35 * (len(vlm) + len(det))),
                             gridspec_kw={"height_ratios": [max(len(vlm), 1), max(len(det), 1)]})
    _stacked(axes[0], vlm, lambda c: BASELINE_STACK if c["kind"] == "vlm_baseline" else VLM_STACK,
             lambda c: f"{c['vlm']} · " + ("baseline generate" if c["kind"] == "vlm_baseline"
                                          else f"{c['backend']} {c['precision']}") + f" · {c['prompt']}",
             "VLM: frame → answer, p50 per stage (ms)")
    _stacked(axes[1], det, lambda c: DETECT_STACK,
             lambda c: f"{c['detector']} · " + ("baseline predict" if c["kind"] == "detector_baseline" else c["backend"]),
             "Detector, p50 per stage (ms)")
    fig.suptitle(machine_line(results), fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stacked(ax, cases: list[dict], stack, label, title: str) -> None:
    from matplotlib.patches import Patch

    seen: list[str] = []
    for row, case in enumerate(cases):
        left = 0.0
        for stage in stack(case):
            value = _stage(case, stage) or 0.0
            ax.barh(row, value, left=left, color=COLOURS[stage])
            if stage not in seen:
                seen.append(stage)
            left += value
    ax.set_yticks(range(len(cases)), [label(c) for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("ms")
    order = [name for name in COLOURS if name in seen]
    if order:
        ax.legend(handles=[Patch(color=COLOURS[name], label=name) for name in order], fontsize=7,
                  loc="lower right")
    if not cases:
        ax.text(0.5, 0.5, "no cases ran", ha="center", va="center", transform=ax.transAxes)


def plot_roofline(results: dict, path: Path) -> None:
    """Measured decode tokens/s per backend against its roofline (bandwidth ÷ bytes per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("roofline", {}).get("cases", [])
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.35 * max(len(rows), 1)))
    for i, row in enumerate(rows):
        ax.barh(i, row["measured_tok_s"] or 0, color="#2ca02c", label="measured" if i == 0 else None)
        ax.plot([row["roofline_tok_s"]] * 2, [i - 0.4, i + 0.4], color="#d62728", linewidth=2,
                label="roofline" if i == 0 else None)
        ax.text((row["measured_tok_s"] or 0), i, f"  {_share(row['share'])}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["id"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    bw = results.get("roofline", {}).get("gb_s")
    ax.set_xlabel("decode tokens/s")
    ax.set_title(f"Decode tokens/s vs roofline ({bw} GB/s ÷ bytes per token)", fontsize=9)
    if rows:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no VLM cases ran", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: Path) -> dict[str, str]:
    """results.json and report.md first (so nothing measured is lost), then stages.png and roofline.png in
    ``out_dir``; returns the paths. A plot that cannot be drawn is recorded in ``results["report_errors"]`` (and
    results.json rewritten), not raised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "results.json", "markdown": out_dir / "report.md",
             "stages_plot": out_dir / "stages.png", "roofline_plot": out_dir / "roofline.png"}
    results["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    files["markdown"].write_text(render_markdown(results), encoding="utf-8")
    errors = []
    for key, plot in (("stages_plot", plot_stages), ("roofline_plot", plot_roofline)):
        try:
            plot(results, files[key])
        except Exception as exc:  # a missing or broken matplotlib must not lose the measurements
            errors.append(f"{files[key].name}: {type(exc).__name__}: {exc}")
    if errors:
        results["report_errors"] = errors
        files["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results["files"]


def latest_results(root: Path) -> Path | None:
    """The newest results.json under ``root`` (the default results folder), if any."""
    found = sorted(root.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
