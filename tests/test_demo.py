"""`edge-vit demo` (what `make demo` runs): the whole pipeline offline, outputs written, notice printed."""

from helpers import count_video_frames, read_jsonl, run_cli


def test_demo_runs_offline_and_writes_outputs(tmp_path):
    work = tmp_path / "demo"
    r = run_cli("demo", "--workdir", str(work), "--frames", "24", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "NOT meaningful" in r.stderr  # says plainly what the random models are
    events = read_jsonl(work / "demo.jsonl")
    types = {e["type"] for e in events}
    assert {"start", "detections", "answer", "status"} <= types
    assert count_video_frames(work / "demo.mp4") == 24
    assert "[frame 0]" in r.stdout
