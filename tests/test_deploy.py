"""`edge-vit deploy jetson` without a Jetson: probing recorded filesystems, the memory budget against hand-computed
values, the generated unit/config/docker files, build-or-reuse decisions through a fake Jetson root (engine builds
replaced at the function boundary), the CLI's dry run and refusal on this machine, and the Dockerfiles.

Fixtures: tests/fixtures/jetson/<board>/root is a fake "/" and <board>/commands the recorded command output
(see the README there).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from helpers import run_cli

from edge_vit.deploy import service
from edge_vit.deploy.budget import MIB, BudgetOptions, DetectorFootprint, VisionShape, memory_budget
from edge_vit.deploy.plan import (
    DEPLOY_RECORD,
    ENGINES_DIR,
    Action,
    Builders,
    DeployOptions,
    engines_mismatch,
    execute,
    plan_deploy,
    validate_run_args,
)
from edge_vit.deploy.target import (
    L4tRelease,
    PythonStack,
    Status,
    Target,
    identify_module,
    parse_cuda_version_json,
    parse_device_tree_strings,
    parse_dpkg_nvinfer,
    parse_meminfo,
    parse_nv_tegra_release,
    parse_nvcc_version,
    parse_nvpmodel,
    probe_target,
    same_tensorrt,
    target_checks,
)
from edge_vit.errors import EdgeVitError
from export.trt import TrtBuildOptions
from export.trt_profiles import ENGINE_FILES, TRT_MANIFEST, TRT_MANIFEST_VERSION, plan_from_manifest
from export.yolo import YoloFormat

REPO = Path(__file__).resolve().parent.parent
BOARDS = Path(__file__).parent / "fixtures" / "jetson"
NANO, NX, AGX51 = "orin-nano-8gb-jp61", "orin-nx-16gb-jp62", "agx-orin-64gb-jp51"
JETSON_PYTHON = PythonStack(probed=True, tensorrt="10.3.0", torch="2.5.0", torch_cuda="12.6", cuda_available=True)

# SmolVLM-256M-Instruct (export/configs/smolvlm-256m.json); graph sizes = fp32 parameter bytes of each graph:
# vision 86,433,024 + connector 7,077,888 params; embed_tokens 28,385,280; decoder 134,588,736 (lm_head untied).
SMOLVLM_MANIFEST = {
    "source_model": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "decoder": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "hidden_size": 576, "vocab_size": 49280,
                "max_positions": 8192},
    "tiling": {"tile_size": 512, "tokens_per_tile": 64, "processor_splits_images": True},
    "graph_bytes": {"vision_encoder.onnx": 374_043_648, "embed_tokens.onnx": 113_541_120,
                    "decoder_model_merged.onnx": 538_354_944},
}
SMOLVLM_VISION = VisionShape(tokens=1024, heads=12, hidden=768, intermediate=3072)  # 512 px / 16 px patches
ORIN_NANO_TOTAL, ORIN_NANO_AVAILABLE = 7_620_176 * 1024, 5_398_344 * 1024  # the fixture's MemTotal/MemAvailable


def recorded(board: str):
    """A command runner that replays <board>/commands/<program>.out (None for anything not recorded)."""
    commands = BOARDS / board / "commands"

    def run(argv):
        out = commands / f"{Path(argv[0]).name}.out"
        return out.read_text() if out.is_file() else None

    return run


def board_target(board: str, root: Path | None = None, python: PythonStack | None = JETSON_PYTHON) -> Target:
    return probe_target(root or BOARDS / board / "root", run=recorded(board),
                        python=(lambda: python) if python else None)


@pytest.fixture(scope="session")
def onnx_export(tiny_idefics3, tmp_path_factory) -> Path:
    """A real `edge-vit export onnx` folder of the tiny Idefics3 (a few seconds, once per session)."""
    from export.onnx_export import export_vlm_onnx

    out = tmp_path_factory.mktemp("deploy") / "tiny-onnx"
    export_vlm_onnx(tiny_idefics3, out)
    return out


@pytest.fixture
def fake_jetson(tmp_path) -> Path:
    """A writable copy of the Orin Nano root, plus a detector file next to it."""
    root = tmp_path / "root"
    shutil.copytree(BOARDS / NANO / "root", root)
    (tmp_path / "yolo26n.pt").write_bytes(b"\0" * 5_000_000)
    return root


# ---------------------------------------------------------------- parsing recorded files


@pytest.mark.parametrize("board, major, revision, version, jetpack, board_name", [
    (NANO, 36, "4.0", "36.4.0", "6.1", "generic"),
    (NX, 36, "4.3", "36.4.3", "6.2", "generic"),
    (AGX51, 35, "2.1", "35.2.1", "5.1", "t186ref"),
])
def test_nv_tegra_release(board, major, revision, version, jetpack, board_name):
    release = parse_nv_tegra_release((BOARDS / board / "root/etc/nv_tegra_release").read_text())
    assert release == L4tRelease(major, revision, board_name)
    assert (release.version, release.jetpack) == (version, jetpack)
    assert release.describe() == f"L4T R{version} (JetPack {jetpack})"


def test_nv_tegra_release_unknown_and_garbage():
    assert L4tRelease(36, "4.9").describe() == "L4T R36.4.9 (JetPack 6.x)"  # not in the table: never guessed
    assert L4tRelease(36, "4").version == "36.4.0"
    assert parse_nv_tegra_release("") is None
    assert parse_nv_tegra_release("Ubuntu 22.04.4 LTS\n") is None


@pytest.mark.parametrize("board, model, name, memory, part", [
    (NANO, "NVIDIA Jetson Orin Nano Developer Kit", "Jetson Orin Nano 8GB (developer kit module)", 8, "p3767-0005"),
    (NX, "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "Jetson Orin NX 16GB", 16, "p3767-0000"),
    (AGX51, "NVIDIA Jetson AGX Orin Developer Kit", "Jetson AGX Orin 64GB", 64, "p3701-0005"),
])
def test_device_tree_module(board, model, name, memory, part):
    dt = BOARDS / board / "root/proc/device-tree"
    assert parse_device_tree_strings((dt / "model").read_bytes()) == (model,)  # the trailing NUL is dropped
    compatible = parse_device_tree_strings((dt / "compatible").read_bytes())
    assert compatible[-1] == "nvidia,tegra234" and len(compatible) == 3
    module = identify_module(model, compatible)
    assert (module.name, module.memory_gb, module.part) == (name, memory, part)


def test_module_from_model_string_only():
    assert identify_module("NVIDIA Jetson Orin Nano Developer Kit", ()).name == "Jetson Orin Nano Developer Kit"
    assert identify_module("Raspberry Pi 5 Model B Rev 1.0", ("raspberrypi,5-model-b",)) is None


def test_dpkg_nvinfer():
    assert parse_dpkg_nvinfer((BOARDS / NANO / "commands/dpkg-query.out").read_text()) == ("10.3.0.30", "libnvinfer10")
    assert parse_dpkg_nvinfer((BOARDS / AGX51 / "commands/dpkg-query.out").read_text()) == ("8.5.2", "libnvinfer8")
    assert parse_dpkg_nvinfer("libnvinfer7\t\nlibnvinfer-bin\t\n") is None  # known, not installed
    assert parse_dpkg_nvinfer("") is None


def test_cuda_versions():
    assert parse_cuda_version_json((BOARDS / NANO / "root/usr/local/cuda/version.json").read_text()) == "12.6.1"
    assert parse_cuda_version_json((BOARDS / AGX51 / "root/usr/local/cuda/version.json").read_text()) == "11.4.19"
    assert parse_cuda_version_json('{"cuda_cudart": {"version": "12.2.140"}}') == "12.2.140"
    assert parse_cuda_version_json("not json") is None
    assert parse_nvcc_version((BOARDS / NX / "commands/nvcc.out").read_text()) == "12.6.68"


def test_meminfo_and_power_mode():
    mem = parse_meminfo((BOARDS / NANO / "root/proc/meminfo").read_text())
    assert (mem["MemTotal"], mem["MemAvailable"]) == (ORIN_NANO_TOTAL, ORIN_NANO_AVAILABLE)
    assert parse_nvpmodel("NV Power Mode: 15W\n0\n") == "15W (mode 0)"
    assert parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n") == "MAXN (mode 0)"
    assert parse_nvpmodel("NV Power Mode: MAXN_SUPER") == "MAXN_SUPER"
    assert parse_nvpmodel("") is None


@pytest.mark.parametrize("a, b, same", [
    ("10.3.0", "10.3.0.30", True), ("10.3.0.30", "10.3.0.30", True), ("10.13.3.9", "10.13.3.9", True),
    ("10.3.0", "10.4.0.26", False), ("10.13.3.9", "10.13.3.10", False), ("10", "10.3.0", False),
])
def test_same_tensorrt(a, b, same):
    assert same_tensorrt(a, b) is same and same_tensorrt(b, a) is same


# ---------------------------------------------------------------- probing a root


@pytest.mark.parametrize("board, trt, trt_source, cuda, cuda_source, power, module", [
    (NANO, "10.3.0.30", "dpkg libnvinfer10", "12.6.1", "/usr/local/cuda/version.json", "15W (mode 0)",
     "Jetson Orin Nano 8GB (developer kit module)"),
    (NX, "10.3.0.30", "dpkg libnvinfer10", "12.6.68", "nvcc --version", "MAXN (mode 0)", "Jetson Orin NX 16GB"),
    (AGX51, "8.5.2", "dpkg libnvinfer8", "11.4.19", "/usr/local/cuda/version.json", "MAXN (mode 0)",
     "Jetson AGX Orin 64GB"),
])
def test_probe_recorded_boards(board, trt, trt_source, cuda, cuda_source, power, module):
    target = board_target(board, python=None)  # a fake root imports nothing: TensorRT comes from dpkg
    assert target.is_jetson and target.module.name == module
    assert (target.soc, target.compute_capability) == ("Orin", (8, 7))
    assert (target.tensorrt, target.tensorrt_source) == (trt, trt_source)
    assert (target.cuda, target.cuda_source) == (cuda, cuda_source)
    assert target.power_mode == power and not target.python.probed
    assert target.mem_available < target.mem_total


def test_probe_prefers_the_python_module():
    target = board_target(NANO)
    assert (target.tensorrt, target.tensorrt_source) == ("10.3.0", "Python module")


def test_probe_not_a_jetson(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 32000000 kB\nMemAvailable: 30000000 kB\n")
    called = []
    target = probe_target(tmp_path, run=lambda argv: called.append(argv[0]),
                          python=lambda: pytest.fail("no imports off a Jetson"))
    assert not target.is_jetson and target.module is None and target.power_mode is None
    assert target.not_jetson_reason().startswith("not a Jetson: no /etc/nv_tegra_release")
    assert "nvpmodel" not in called
    checks = target_checks(target)
    assert [c.status for c in checks if c.status is Status.FAIL] == [Status.FAIL]  # only the Jetson check fails


def test_checks_on_a_ready_jetson():
    checks = {c.name: c for c in target_checks(board_target(NANO), camera="/dev/video0", user="jetson")}
    assert {name: c.status for name, c in checks.items()} == {
        "Jetson": Status.OK, "JetPack": Status.OK, "TensorRT": Status.OK, "CUDA": Status.OK,
        "PyTorch": Status.OK, "memory": Status.INFO, "power": Status.INFO, "camera": Status.OK, "user": Status.OK}
    assert checks["Jetson"].detail == ("NVIDIA Jetson Orin Nano Developer Kit (Jetson Orin Nano 8GB (developer kit "
                                       "module), p3767-0005; Orin GPU sm_87)")
    assert checks["JetPack"].detail == "L4T R36.4.0 (JetPack 6.1)"
    assert checks["memory"].detail == "7.3 GiB total, 5.1 GiB available, shared by CPU and GPU"
    assert "15W (mode 0)" in checks["power"].detail


@pytest.mark.parametrize("board, python, failing", [
    (AGX51, None, {"JetPack", "TensorRT"}),  # JetPack 5.1: TensorRT 8.5 from dpkg, too old
    (NANO, PythonStack(probed=True), {"TensorRT", "PyTorch"}),  # dpkg has TensorRT, this Python cannot import it
    (NANO, replace(JETSON_PYTHON, torch_cuda=None, cuda_available=False), {"PyTorch"}),  # PyPI's CPU-only wheel
])
def test_failing_checks(board, python, failing):
    checks = target_checks(board_target(board, python=python))
    assert {c.name for c in checks if c.status is Status.FAIL} == failing


def test_camera_and_user_warnings():
    checks = {c.name: c for c in target_checks(board_target(NX), camera="/dev/video0", user="nobody-here")}
    assert checks["camera"].status is Status.WARN and "not found" in checks["camera"].detail
    assert checks["user"].status is Status.WARN
    assert {c.name: c.status for c in target_checks(board_target(NX), user="root")}["user"] is Status.WARN


# ---------------------------------------------------------------- memory budget


def test_budget_smolvlm_fp16_8192_on_orin_nano():
    """SmolVLM-256M, fp16 engines, one tile, 8192-token context, yolo26n (5.4 MB) on the Orin Nano 8GB fixture."""
    options = BudgetOptions(build=TrtBuildOptions(fp16=True, max_tiles=1, max_context=8192),
                            detector=DetectorFootprint("yolo26n.pt", 5_400_000, 640), vision=SMOLVLM_VISION)
    budget = memory_budget(SMOLVLM_MANIFEST, options, ORIN_NANO_TOTAL, ORIN_NANO_AVAILABLE)
    lines = {line.item: line.bytes for line in budget.lines}
    assert lines == {
        "VLM engine weights": 1_025_939_712 // 2,  # fp32 graphs, halved
        # (K, V) x layers x KV heads x head dim x fp16 bytes, x context, x 2 alternating buffers
        "KV cache": 2 * (2 * 30 * 3 * 64 * 2) * 8192,
        # pixels 3x512x512 fp32 + features 64x576 + 2 x 640x576 embeddings (fp32) + 640 ids + 2 x 8192 mask/pos
        # + last-token logits 49280 fp32; max_prompt = 67 + 512 = 579 -> 640
        "VLM I/O buffers": 3_145_728 + 147_456 + 2_949_120 + 5_120 + 131_072 + 197_120,
        # decoder prefill 640 x 8192: 9 query heads of fp16 scores + 12 x 640 x 576 activations
        # (> vision: 12 heads x 1024^2 + 4 x 1024 x 768 + 1024 x 3072, fp16 = 37,748,736)
        "TensorRT scratch": 2 * (9 * 640 * 8192 + 12 * 640 * 576),
        "detector": 5_400_000 + 96 * MIB,
        "CUDA context": 350 * MIB,
        "Python process": 650 * MIB,
    }
    assert budget.total_bytes == 2_154_891_328  # 2.01 GiB
    assert budget.fits is True and not budget.tight and budget.suggestions == ()
    assert budget.verdict() == "needs ~2.01 GiB, 5.1 GiB available of 7.3 GiB: fits, 3.1 GiB to spare"
    table = budget.table()
    assert table[0] == "memory budget (fp16 engines, 1 tile(s), prompt <= 640, context <= 8192 tokens):"
    assert table[2].split()[:4] == ["KV", "cache", "360.0", "MiB"]
    assert "22.5 KiB/token x 8192 tokens x 2 buffers" in table[2]


def test_budget_fp32_and_split_tiling():
    build = TrtBuildOptions(fp16=False, max_tiles=17, max_context=8192)
    budget = memory_budget(SMOLVLM_MANIFEST, BudgetOptions(build=build, vision=SMOLVLM_VISION), None, None)
    lines = {line.item: line.bytes for line in budget.lines}
    assert lines["VLM engine weights"] == 1_025_939_712
    assert lines["KV cache"] == 2 * (2 * 30 * 3 * 64 * 4) * 8192
    # 17 tiles: the vision encoder's scores (17 x 12 x 1024^2, fp32) outgrow the decoder's prefill (1664 x 8192)
    assert lines["TensorRT scratch"] == 4 * 17 * (12 * 1024 * 1024 + 4 * 1024 * 768 + 1024 * 3072)
    assert budget.fits is None and "not checked" in budget.verdict()


def test_budget_refuses_in_one_line_and_says_what_fits():
    build = TrtBuildOptions(fp16=False, max_tiles=17, max_context=8192)
    options = BudgetOptions(build=build, detector=DetectorFootprint("yolo26n.pt", 5_400_000), vision=SMOLVLM_VISION)
    total, available = 3_900_000 * 1024, 2_600_000 * 1024  # an Orin Nano 4GB with the desktop running
    budget = memory_budget(SMOLVLM_MANIFEST, options, total, available)
    assert budget.fits is False
    message = budget.refusal()
    assert "\n" not in message
    assert message.startswith("memory budget: the deployment needs ~3.99 GiB but only 2.5 GiB available of 3.7 GiB")
    # fp32 with 17 tiles does not fit at any context; fp16 does at 4096, and fp16 single-tile at the full 8192
    flags = [s.split(" (~")[0] for s in budget.suggestions]
    assert flags == ["--fp16 --max-context 4096", "--fp16 --tiling single"]  # more than the device has: no "free"
    assert all(s in message for s in budget.suggestions)
    for suggested in (replace(build, fp16=True, max_context=4096), replace(build, fp16=True, max_tiles=1)):
        assert memory_budget(SMOLVLM_MANIFEST, replace(options, build=suggested), total, available).fits
    # fp16, one tile: 2.01 GiB at 8192; with 1.9 GiB available a shorter context is the first suggestion
    single = replace(options, build=TrtBuildOptions(fp16=True, max_tiles=1, max_context=8192))
    shorter = memory_budget(SMOLVLM_MANIFEST, single, total, int(1.9 * (1 << 30)))
    assert [s.split(" (~")[0] for s in shorter.suggestions] == [
        "--max-context 4096", "free memory: stop other services, or boot without the desktop "
        "(`sudo systemctl set-default multi-user.target`, then reboot)"]


def test_vision_shape_from_config(onnx_export):
    config = json.loads((onnx_export / "config.json").read_text())
    assert VisionShape.from_config(config) == VisionShape(tokens=16, heads=2, hidden=32, intermediate=64)
    assert VisionShape.from_config({}) is None
    clip = {"vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                              "num_attention_heads": 16, "hidden_size": 1024, "intermediate_size": 4096}}
    assert VisionShape.from_config(clip).tokens == 577  # 24 x 24 patches + the class token


# ---------------------------------------------------------------- generated files


SPEC = service.ServiceSpec(
    name="edge-vit", user="jetson", working_dir=Path("/home/jetson/edge-vit-deploy"),
    executable=("/home/jetson/venv/bin/edge-vit",),
    args=service.run_args(source="/dev/video0", vlm="/home/jetson/edge-vit-deploy/vlm-trt",
                          detector="/home/jetson/edge-vit-deploy/yolo26n.engine", imgsz=640,
                          prompt='Is anyone without a "helmet"? Answer 100% honestly.', tiling="single",
                          extra=("--every", "2")),
)

EXPECTED_UNIT = r"""# Written by `edge-vit deploy jetson`; the same arguments are in run.json.
# Install: sudo cp edge-vit.service /etc/systemd/system/
#          sudo systemctl daemon-reload && sudo systemctl enable --now edge-vit
[Unit]
Description=edge-vit camera service (YOLO detections ground a VLM)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=jetson
SupplementaryGroups=video
WorkingDirectory=/home/jetson/edge-vit-deploy
Environment=HF_HUB_OFFLINE=1
Environment=TRANSFORMERS_OFFLINE=1
Environment=YOLO_OFFLINE=1
Environment=YOLO_AUTOINSTALL=false
Environment=PYTHONUNBUFFERED=1
ExecStart=/home/jetson/venv/bin/edge-vit run --source /dev/video0 --detector /home/jetson/edge-vit-deploy/yolo26n.engine --imgsz 640 --vlm /home/jetson/edge-vit-deploy/vlm-trt --backend trt --device cuda --tiling single --prompt "Is anyone without a \"helmet\"? Answer 100%% honestly." --every 2
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=30
StandardOutput=journal
StandardError=journal
SyslogIdentifier=edge-vit

[Install]
WantedBy=multi-user.target
"""


def test_unit_file_exact():
    assert service.unit_file(SPEC) == EXPECTED_UNIT


@pytest.mark.parametrize("arg, quoted", [
    ("/dev/video0", "/dev/video0"), ("a b", '"a b"'), ("100%", "100%%"), ("$HOME", '"$$HOME"'),
    ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"'), ("", '""'), ("line\nbreak", '"line\\nbreak"'),
])
def test_systemd_quote(arg, quoted):
    assert service.systemd_quote(arg) == quoted


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "edge-vit.service"
    spec = replace(SPEC, user="root", working_dir=tmp_path, executable=(sys.executable, "-m", "edge_vit"))
    unit.write_text(service.unit_file(spec))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if "Failed to" in done.stderr and "manager" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_run_config_records_the_argv_and_parses_with_the_run_parser():
    text = service.run_config(SPEC, Path("/home/jetson/edge-vit-deploy/edge-vit.service"))
    assert json.loads(text) == {
        "format": "edge-vit-run", "version": 1, "argv": list(SPEC.args),
        "environment": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1",
                        "YOLO_AUTOINSTALL": "false", "PYTHONUNBUFFERED": "1"},
        "working_directory": "/home/jetson/edge-vit-deploy",
        "service": {"name": "edge-vit", "file": "/home/jetson/edge-vit-deploy/edge-vit.service"},
    }
    assert service.read_run_config(text) == SPEC.args
    validate_run_args(SPEC.args)  # the real `edge-vit run` parser takes them
    with pytest.raises(EdgeVitError, match="unrecognized arguments: --bogus"):
        validate_run_args((*SPEC.args, "--bogus"))


def test_docker_script_exact():
    script = service.docker_script(SPEC, image="edge-vit:jetson", devices=("/dev/video0",),
                                   volumes=(("/home/jetson/edge-vit-deploy", "rw"),))
    assert script == (
        "#!/bin/sh\n"
        "# Written by `edge-vit deploy jetson --container`; the same arguments are in run.json.\n"
        "# The container restarts with the Docker daemon (--restart unless-stopped); logs go to journald:\n"
        "#   docker logs -f edge-vit   or   journalctl CONTAINER_NAME=edge-vit -f\n"
        "set -e\n"
        "exec docker run \\\n"
        "  --detach \\\n  --name edge-vit \\\n  --runtime nvidia \\\n  --restart unless-stopped \\\n"
        "  --log-driver journald \\\n  --device /dev/video0 \\\n"
        "  --volume /home/jetson/edge-vit-deploy:/home/jetson/edge-vit-deploy:rw \\\n"
        "  --workdir /home/jetson/edge-vit-deploy \\\n"
        "  --env HF_HUB_OFFLINE=1 \\\n  --env TRANSFORMERS_OFFLINE=1 \\\n  --env YOLO_OFFLINE=1 \\\n"
        "  --env YOLO_AUTOINSTALL=false \\\n  --env PYTHONUNBUFFERED=1 \\\n"
        "  edge-vit:jetson run --source /dev/video0 --detector /home/jetson/edge-vit-deploy/yolo26n.engine "
        "--imgsz 640 --vlm /home/jetson/edge-vit-deploy/vlm-trt --backend trt --device cuda --tiling single "
        "--prompt 'Is anyone without a \"helmet\"? Answer 100% honestly.' --every 2\n"
    )
    argv = service.docker_run_argv(SPEC, image="edge-vit:jetson", devices=("/dev/video0",))
    assert argv[:2] == ("docker", "run") and argv[argv.index("edge-vit:jetson") + 1:] == SPEC.args


@pytest.mark.parametrize("name, ok", [("edge-vit", "edge-vit"), ("cam2.service", "cam2"), ("a b", None),
                                      ("../x", None), ("", None)])
def test_service_name(name, ok):
    if ok:
        assert service.check_service_name(name) == ok
    else:
        with pytest.raises(EdgeVitError, match="--service-name"):
            service.check_service_name(name)


# ---------------------------------------------------------------- plan and execution on a fake Jetson


class FakeBuilders:
    """Stands in for export.trt.build_trt_engines / export.yolo.export_yolo; writes what they would."""

    def __init__(self, tensorrt: str = "10.3.0"):
        self.vlm_calls: list[tuple] = []
        self.detector_calls: list[tuple] = []
        self.tensorrt = tensorrt

    def vlm(self, onnx_dir, out_dir, options):
        self.vlm_calls.append((onnx_dir, out_dir, options))
        onnx_manifest = json.loads((Path(onnx_dir) / "edge_vit_export.json").read_text())
        preprocessor = json.loads((Path(onnx_dir) / "preprocessor_config.json").read_text())
        plan = plan_from_manifest(onnx_manifest, preprocessor, max_tiles=options.max_tiles,
                                  max_prompt=options.max_prompt, max_context=options.max_context, fp16=options.fp16)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ENGINE_FILES.values():
            (out_dir / name).write_bytes(b"engine")
        (out_dir / TRT_MANIFEST).write_text(json.dumps({  # the fields export.trt._manifest writes that reuse reads
            "manifest_version": TRT_MANIFEST_VERSION, "tensorrt": self.tensorrt,
            "device": {"name": "Orin", "compute_capability": [8, 7]},
            "precision": {"fp16": options.fp16, "int8": options.int8, "fp8": options.fp8},
            "limits": asdict(plan.limits), "source": {"onnx_dir": str(onnx_dir), "manifest": onnx_manifest},
        }))

    def detector(self, model, options, out):
        self.detector_calls.append((model, options, out))
        Path(out).write_bytes(b"yolo engine")

    def builders(self) -> Builders:
        return Builders(vlm=self.vlm, detector=self.detector)


def nano_options(onnx_export: Path, root: Path, **kw) -> DeployOptions:
    return DeployOptions(model_dir=onnx_export, out=root.parent / "deploy", user="jetson",
                         detector=str(root.parent / "yolo26n.pt"), executable=(sys.executable, "-m", "edge_vit"), **kw)


def test_fake_jetson_builds_then_reuses(onnx_export, fake_jetson):
    target = board_target(NANO, root=fake_jetson)
    options = nano_options(onnx_export, fake_jetson, prompt="How many people?", run_extra=("--every", "2"))
    plan = plan_deploy(options, target)
    assert plan.problems == []
    assert plan.vlm.action is Action.BUILD and "no edge_vit_trt.json there" in plan.vlm.reason
    assert plan.detector.action is Action.BUILD
    out = options.out.resolve()

    fake = FakeBuilders()
    result = execute(plan, fake.builders())
    assert fake.vlm_calls == [(onnx_export.resolve(), out / ENGINES_DIR,
                               TrtBuildOptions(fp16=True, max_tiles=1, max_prompt=None, max_context=None))]
    [(model, yolo_options, engine)] = fake.detector_calls
    assert model == str(fake_jetson.parent / "yolo26n.pt") and engine == out / "yolo26n.engine"
    assert (yolo_options.format, yolo_options.imgsz, yolo_options.half) == (YoloFormat.ENGINE, 640, True)
    assert result.written == [out / "run.json", out / "edge-vit.service", out / DEPLOY_RECORD]

    unit = (out / "edge-vit.service").read_text()
    assert f"ExecStart={sys.executable} -m edge_vit run --source /dev/video0 --detector {out}/yolo26n.engine " \
           f"--imgsz 640 --vlm {out}/vlm-trt --backend trt --device cuda --tiling single " \
           f'--prompt "How many people?" --every 2\n' in unit
    assert "User=jetson\n" in unit and f"WorkingDirectory={out}\n" in unit
    argv = service.read_run_config((out / "run.json").read_text())
    assert argv == ("run", "--source", "/dev/video0", "--detector", f"{out}/yolo26n.engine", "--imgsz", "640",
                    "--vlm", f"{out}/vlm-trt", "--backend", "trt", "--device", "cuda", "--tiling", "single",
                    "--prompt", "How many people?", "--every", "2")
    record = json.loads((out / DEPLOY_RECORD).read_text())
    assert record["detector"]["tensorrt"] == "10.3.0" and record["target"]["jetpack"] == "6.1"

    again = plan_deploy(options, board_target(NANO, root=fake_jetson))
    assert again.vlm.action is Action.REUSE and again.detector.action is Action.REUSE
    fake2 = FakeBuilders()
    execute(again, fake2.builders())
    assert fake2.vlm_calls == [] and fake2.detector_calls == []

    # A different context limit does not match the engines: rebuilt; the detector is still reused.
    smaller = plan_deploy(replace(options, max_context=256), board_target(NANO, root=fake_jetson))
    assert smaller.vlm.action is Action.BUILD
    assert smaller.vlm.reason == ("fp16, tiles <= 1, prompt <= 128, context <= 256; built for tiles <= 1, "
                                  "prompt <= 256, context <= 512, not these limits")
    assert smaller.detector.action is Action.REUSE
    # A changed detector file is re-exported.
    (fake_jetson.parent / "yolo26n.pt").write_bytes(b"\1" * 100)
    assert plan_deploy(options, board_target(NANO, root=fake_jetson)).detector.action is Action.BUILD


@pytest.mark.parametrize("change, reason", [
    (dict(tensorrt="10.7.0"), "built with TensorRT 10.3.0, this is TensorRT 10.7.0"),
    (dict(compute_capability=(7, 2)), "built for sm_87, this GPU is sm_72"),
    (dict(fp16=False), "built with fp16=True, asked for fp16=False"),
    (dict(onnx={"other": "export"}), "built from a different ONNX export"),
    (dict(tensorrt=None), "TensorRT version or GPU is unknown"),
])
def test_engine_mismatch_reasons(onnx_export, change, reason):
    manifest = json.loads((onnx_export / "edge_vit_export.json").read_text())
    options = TrtBuildOptions(fp16=True, max_tiles=1)
    limits = plan_from_manifest(manifest, max_tiles=1).limits
    built = {"manifest_version": TRT_MANIFEST_VERSION, "tensorrt": "10.3.0",
             "device": {"compute_capability": [8, 7]}, "precision": {"fp16": True, "int8": False, "fp8": False},
             "limits": asdict(limits), "source": {"manifest": manifest}}
    target = Target(root="/", tensorrt=change.get("tensorrt", "10.3.0.30"),
                    compute_capability=change.get("compute_capability", (8, 7)))
    assert engines_mismatch(built, target=Target(root="/", tensorrt="10.3.0.30", compute_capability=(8, 7)),
                            options=options, limits=limits, onnx_manifest=manifest) is None
    got = engines_mismatch(built, target=target, options=replace(options, fp16=change.get("fp16", True)),
                           limits=limits, onnx_manifest=change.get("onnx", manifest))
    assert reason in got


def test_fake_jetson_refuses_what_does_not_fit(onnx_export, fake_jetson):
    meminfo = fake_jetson / "proc/meminfo"
    meminfo.write_text(meminfo.read_text().replace("5398344 kB", "   524288 kB"))  # 512 MiB available
    plan = plan_deploy(nano_options(onnx_export, fake_jetson), board_target(NANO, root=fake_jetson))
    assert plan.budget.fits is False
    assert plan.problems == [plan.budget.refusal()]
    fake = FakeBuilders()
    with pytest.raises(EdgeVitError) as err:
        execute(plan, fake.builders())
    assert str(err.value).startswith("memory budget: the deployment needs ~1.") and "\n" not in str(err.value)
    assert "only 0.5 GiB available of 7.3 GiB" in str(err.value)
    assert fake.vlm_calls == [] and not (fake_jetson.parent / "deploy").exists()


def test_jetpack5_board_is_refused(onnx_export, tmp_path):
    (tmp_path / "yolo26n.pt").write_bytes(b"pt")
    options = nano_options(onnx_export, tmp_path / "root")
    plan = plan_deploy(options, board_target(AGX51, python=None))
    assert [p.split(":")[0] for p in plan.problems] == ["JetPack", "TensorRT"]
    assert "L4T R35.2.1 (JetPack 5.1): edge-vit needs JetPack 6.1 or newer" in plan.problems[0]
    with pytest.raises(EdgeVitError, match=r"JetPack 5.1.* \(and 1 more above\)"):
        execute(plan, FakeBuilders().builders())


def test_fake_jetson_container(onnx_export, fake_jetson):
    options = nano_options(onnx_export, fake_jetson, container=True, service_name="cam")
    plan = plan_deploy(options, board_target(NANO, root=fake_jetson))
    out = options.out.resolve()
    assert [f.path.name for f in plan.files] == ["run.json", "cam-docker-run.sh", DEPLOY_RECORD]
    assert "user" not in {c.name for c in plan.checks}  # the container runs as the image's user
    execute(plan, FakeBuilders().builders())
    script = (out / "cam-docker-run.sh").read_text()
    for expected in ("--runtime nvidia", "--restart unless-stopped", "--device /dev/video0",
                     f"--volume {out}:{out}:rw", "edge-vit:jetson run --source /dev/video0"):
        assert expected in script
    assert (out / "cam-docker-run.sh").stat().st_mode & 0o111
    assert "sh " + str(out / "cam-docker-run.sh") in plan.next_steps


def test_detector_kinds(onnx_export, fake_jetson):
    onnx_detector = fake_jetson.parent / "yolo26n.onnx"
    onnx_detector.write_bytes(b"onnx")
    plan = plan_deploy(replace(nano_options(onnx_export, fake_jetson), detector=str(onnx_detector)),
                       board_target(NANO, root=fake_jetson))
    assert plan.detector.action is Action.USE and plan.detector.path == onnx_detector
    with pytest.raises(EdgeVitError, match="--detector must be a YOLO .pt"):
        plan_deploy(replace(nano_options(onnx_export, fake_jetson), detector="yolo26n.yaml"),
                    board_target(NANO, root=fake_jetson))
    missing = plan_deploy(replace(nano_options(onnx_export, fake_jetson), detector=str(fake_jetson / "no.pt")),
                          board_target(NANO, root=fake_jetson))
    assert any(p.startswith("detector: ") and "not found" in p for p in missing.problems)


# ---------------------------------------------------------------- the CLI on this (non-Jetson) machine


@pytest.fixture(scope="module")
def not_a_jetson():
    if probe_target("/", python=PythonStack).is_jetson:
        pytest.skip("this machine is a Jetson")


def test_cli_dry_run_prints_the_plan_and_writes_nothing(onnx_export, tmp_path, not_a_jetson):
    (tmp_path / "yolo26n.pt").write_bytes(b"\0" * 1000)
    out = tmp_path / "deploy"
    done = run_cli("deploy", "jetson", "--model-dir", str(onnx_export), "--detector", str(tmp_path / "yolo26n.pt"),
                   "--out", str(out), "--dry-run", "--user", "root", "--prompt", "Anyone there?", "--", "--every",
                   "3", timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "[FAIL] Jetson     not a Jetson" in text
    assert "\ntarget check failed: not a Jetson: no /etc/nv_tegra_release" in text
    assert "memory budget (fp16 engines, 1 tile(s), prompt <= 256, context <= 512 tokens):" in text
    assert f"VLM engines: would build {out}/vlm-trt from {onnx_export}" in text
    assert f"detector: would build {out}/yolo26n.engine" in text
    for name in ("run.json", "edge-vit.service", DEPLOY_RECORD):
        assert f"--- {out}/{name} ---" in text
    assert '--prompt "Anyone there?" --every 3\n' in text and "Restart=on-failure" in text
    assert f"sudo cp {out}/edge-vit.service /etc/systemd/system/edge-vit.service" in text
    assert text.rstrip().splitlines()[-1].startswith("verdict: a real run would stop (exit 2): target check failed: "
                                                     "not a Jetson")
    assert not out.exists()


def test_cli_real_run_off_a_jetson_is_one_line(onnx_export, tmp_path, not_a_jetson):
    done = run_cli("deploy", "jetson", "--model-dir", str(onnx_export), "--out", str(tmp_path / "deploy"),
                   timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-vit: error: not a Jetson: ")
    assert "--dry-run" in lines[0] and not (tmp_path / "deploy").exists()


def test_cli_user_errors_are_one_line(onnx_export, tmp_path, not_a_jetson):
    cases = [
        (("--model-dir", str(tmp_path / "missing"), "--dry-run"), "has no exported ONNX graphs"),
        (("--model-dir", str(onnx_export), "--dry-run", "--", "--bogus"), "unrecognized arguments: --bogus"),
        (("--model-dir", str(onnx_export), "--dry-run", "--max-context", "9999"), "--max-context must be in [2, 512]"),
    ]
    for args, message in cases:
        done = run_cli("deploy", "jetson", "--out", str(tmp_path / "d"), *args, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


# ---------------------------------------------------------------- Dockerfiles, .dockerignore, docs


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1].strip()}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
            pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize("name", ["Dockerfile.jetson", "Dockerfile.gpu"])
def test_dockerfile_shape(name):
    steps = dockerfile_instructions(REPO / "docker" / name)
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "ENTRYPOINT", "CMD", "LABEL", "USER"}
    assert {k for k, _ in steps} <= known
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    froms = [args for k, args in steps if k == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    base = steps[0][1].split("=", 1)[1]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base) and not base.endswith(":latest"), base  # pinned tag, via ARG
    assert ("ENTRYPOINT", '["edge-vit"]') in steps
    assert any(k == "COPY" for k, _ in steps)
    runs = [args for k, args in steps if k == "RUN"]
    assert any("find_spec('tensorrt')" in r for r in runs)


def test_dockerfiles_install_the_package_the_same_way():
    installs = {name: [args for k, args in dockerfile_instructions(REPO / "docker" / name)
                       if k == "RUN" and "pip install" in args and args.rstrip().endswith(" .")]
                for name in ("Dockerfile.jetson", "Dockerfile.gpu")}
    assert installs["Dockerfile.jetson"] == installs["Dockerfile.gpu"] == ["python3 -m pip install --no-cache-dir ."]


def test_dockerignore_keeps_environments_and_outputs_out():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".demo", "runs", ".git", ".pytest_cache", ".hypothesis", "**/__pycache__", "**/*.engine",
            "edge-vit-deploy"} <= patterns
    for needed in ("README.md", "pyproject.toml", "edge_vit", "export"):  # what `pip install .` builds from
        assert needed not in patterns


def test_docs_use_real_flags():
    """Every `edge-vit deploy jetson` flag the guide shows exists in the parser."""
    from edge_vit.cli import build_parser

    doc = (REPO / "docs" / "jetson.md").read_text()
    parser = build_parser()
    deploy = parser._subparsers._group_actions[0].choices["deploy"]
    jetson = deploy._subparsers._group_actions[0].choices["jetson"]
    known = {s for action in jetson._actions for s in action.option_strings}
    shown = set()
    for line in doc.splitlines():
        if "edge-vit deploy jetson" in line:
            command = line.split("edge-vit deploy jetson", 1)[1].split(" -- ", 1)[0]
            shown |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
    assert shown and shown <= known, shown - known
