"""What a deployment writes, as text: the ``edge-vit run`` arguments, the run configuration, the systemd unit,
the ``docker run`` script. Pure functions of a ``ServiceSpec``; nothing here touches the disk.

The run configuration (``run.json``) records the exact ``edge-vit run`` argv and environment; the
unit's ExecStart and the docker script are generated from the same argv, so they cannot disagree.
Knows nothing about targets, budgets or engines.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from edge_vit.errors import EdgeVitError

RUN_CONFIG = "run.json"
RUN_CONFIG_FORMAT = "edge-vit-run"
RUN_CONFIG_VERSION = 1

# The service never downloads: models are local files, and Ultralytics must not pip-install at run time.
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("YOLO_OFFLINE", "1"),
    ("YOLO_AUTOINSTALL", "false"),
    ("PYTHONUNBUFFERED", "1"),  # answers reach journald as they are printed
)
_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")


def check_service_name(name: str) -> str:
    """A systemd unit / docker container name; a trailing ``.service`` is dropped."""
    name = name[: -len(".service")] if name.endswith(".service") else name
    if not _UNIT_NAME.fullmatch(name) or len(name) > 200:
        raise EdgeVitError(f"--service-name must be letters, digits and _ . @ - (a systemd unit name), got '{name}'")
    return name


def video_device(source: str) -> str | None:
    """The /dev/video* node a source opens: ``0`` -> /dev/video0, ``/dev/video2`` itself; None for files/URLs."""
    if source.isdigit():
        return f"/dev/video{int(source)}"
    return source if source.startswith("/dev/") else None


def run_args(*, source: str, vlm: str | Path, detector: str | Path, imgsz: int, prompt: str, tiling: str,
             extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``edge-vit run`` argv (without the program) for the TensorRT engines on the GPU; ``extra`` comes last."""
    return (
        "run", "--source", source, "--detector", str(detector), "--imgsz", str(imgsz),
        "--vlm", str(vlm), "--backend", "trt", "--device", "cuda", "--tiling", tiling, "--prompt", prompt,
        *extra,
    )


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    user: str
    working_dir: Path
    executable: tuple[str, ...]  # how the unit starts edge-vit: (".../bin/edge-vit",) or (python, "-m", "edge_vit")
    args: tuple[str, ...]  # run_args(...)
    environment: tuple[tuple[str, str], ...] = ENVIRONMENT


# ---------------------------------------------------------------- run.json


def run_config(spec: ServiceSpec, service_file: Path) -> str:
    data = {
        "format": RUN_CONFIG_FORMAT,
        "version": RUN_CONFIG_VERSION,
        "argv": list(spec.args),
        "environment": dict(spec.environment),
        "working_directory": str(spec.working_dir),
        "service": {"name": spec.name, "file": str(service_file)},
    }
    return json.dumps(data, indent=2) + "\n"


def read_run_config(text: str) -> tuple[str, ...]:
    """The ``edge-vit run`` argv recorded in a run.json."""
    data = json.loads(text)
    if data.get("format") != RUN_CONFIG_FORMAT or data.get("version") != RUN_CONFIG_VERSION:
        raise EdgeVitError(f"not an {RUN_CONFIG_FORMAT} v{RUN_CONFIG_VERSION} file")
    return tuple(data["argv"])


# ---------------------------------------------------------------- systemd


def systemd_quote(arg: str) -> str:
    """One word of an ExecStart= line: % (specifiers) and $ (variables) escaped, quoted if it has spaces."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", escaped):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def unit_file(spec: ServiceSpec) -> str:
    command = " ".join(systemd_quote(a) for a in (*spec.executable, *spec.args))
    env = "".join(f"Environment={k}={v}\n" for k, v in spec.environment)
    return (
        "# Written by `edge-vit deploy jetson`; the same arguments are in run.json.\n"
        f"# Install: sudo cp {spec.name}.service /etc/systemd/system/\n"
        f"#          sudo systemctl daemon-reload && sudo systemctl enable --now {spec.name}\n"
        "[Unit]\n"
        "Description=edge-vit camera service (YOLO detections ground a VLM)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"User={spec.user}\n"
        "SupplementaryGroups=video\n"
        f"WorkingDirectory={spec.working_dir}\n"
        f"{env}"
        f"ExecStart={command}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=30\n"
        "StandardOutput=journal\n"
        "StandardError=journal\n"
        f"SyslogIdentifier={spec.name}\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


# ---------------------------------------------------------------- docker


def docker_options(spec: ServiceSpec, *, devices: tuple[str, ...] = (),
                   volumes: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, ...]]:
    """The ``docker run`` options, one option with its value per group.

    ``volumes``: (host path, mode) pairs, mounted at the same path inside, so every path in the
    run arguments means the same thing in the container.
    """
    groups: list[tuple[str, ...]] = [("--detach",), ("--name", spec.name), ("--runtime", "nvidia"),
                                     ("--restart", "unless-stopped"), ("--log-driver", "journald")]
    groups += [("--device", device) for device in devices]
    groups += [("--volume", f"{path}:{path}:{mode}") for path, mode in volumes]
    groups.append(("--workdir", str(spec.working_dir)))
    groups += [("--env", f"{key}={value}") for key, value in spec.environment]
    return groups


def docker_run_argv(spec: ServiceSpec, *, image: str, devices: tuple[str, ...] = (),
                    volumes: tuple[tuple[str, str], ...] = ()) -> tuple[str, ...]:
    """``docker run`` for the image built from docker/Dockerfile.jetson (its entry point is ``edge-vit``)."""
    options = [word for group in docker_options(spec, devices=devices, volumes=volumes) for word in group]
    return ("docker", "run", *options, image, *spec.args)


def docker_script(spec: ServiceSpec, *, image: str, devices: tuple[str, ...] = (),
                  volumes: tuple[tuple[str, str], ...] = ()) -> str:
    """A POSIX shell script that starts the container; one option per line, like the unit file."""
    quote = lambda words: " ".join(shlex.quote(w) for w in words)  # noqa: E731
    lines = ["docker run", *(quote(g) for g in docker_options(spec, devices=devices, volumes=volumes)),
             quote((image, *spec.args))]
    body = " \\\n  ".join(lines)
    return (
        "#!/bin/sh\n"
        "# Written by `edge-vit deploy jetson --container`; the same arguments are in run.json.\n"
        "# The container restarts with the Docker daemon (--restart unless-stopped); logs go to journald:\n"
        f"#   docker logs -f {spec.name}   or   journalctl CONTAINER_NAME={spec.name} -f\n"
        "set -e\n"
        f"exec {body}\n"
    )
