"""The deployment target, probed: Jetson module, L4T/JetPack, TensorRT, CUDA, PyTorch, memory, power mode.

``probe_target(root="/")`` reads everything under ``root`` (``etc/nv_tegra_release``,
``proc/device-tree/{model,compatible}``, ``usr/local/cuda/version.json``, ``proc/meminfo``), so
tests point it at a recorded filesystem tree. What cannot be read from files is injected:
``run`` executes a command and returns its stdout (``dpkg-query -W 'libnvinfer*'``, ``nvcc
--version``, ``nvpmodel -q``), ``python`` imports tensorrt/torch in this interpreter. Both default
to the real ones only when ``root`` is "/"; a fake root gets neither unless a test passes them.
Parsing is pure and separate from reading. ``target_checks`` turns a ``Target`` into the
ok/warn/FAIL lines that ``edge-vit deploy jetson`` prints.

Knows nothing about models, engines or services.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

from export.trt_profiles import tensorrt_install_hint

# L4T release -> JetPack release (NVIDIA's JetPack archive). An L4T release missing here is reported
# with its JetPack major only ("JetPack 6.x"), never guessed.
L4T_TO_JETPACK = {
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}
JETPACK_MAJOR = {32: "4", 34: "5", 35: "5", 36: "6"}
MIN_L4T_MAJOR = 36  # JetPack 6 (Ubuntu 22.04, Python 3.10); TensorRT 10 arrives with JetPack 6.1 (L4T 36.4)

# Module part numbers (the p3767-xxxx / p3701-xxxx in /proc/device-tree/compatible) -> (name, GB of memory).
MODULES = {
    "p3767-0000": ("Jetson Orin NX 16GB", 16),
    "p3767-0001": ("Jetson Orin NX 8GB", 8),
    "p3767-0003": ("Jetson Orin Nano 8GB", 8),
    "p3767-0004": ("Jetson Orin Nano 4GB", 4),
    "p3767-0005": ("Jetson Orin Nano 8GB (developer kit module)", 8),
    "p3701-0000": ("Jetson AGX Orin 32GB", 32),
    "p3701-0004": ("Jetson AGX Orin 32GB", 32),
    "p3701-0005": ("Jetson AGX Orin 64GB", 64),
    "p3701-0008": ("Jetson AGX Orin Industrial 64GB", 64),
}
# SoC compatible string -> (family, CUDA compute capability of its integrated GPU).
SOCS = {"nvidia,tegra234": ("Orin", (8, 7)), "nvidia,tegra194": ("Xavier", (7, 2))}

NV_TEGRA_RELEASE = "etc/nv_tegra_release"
DT_MODEL = "proc/device-tree/model"
DT_COMPATIBLE = "proc/device-tree/compatible"
CUDA_VERSION_JSON = "usr/local/cuda/version.json"
MEMINFO = "proc/meminfo"
PASSWD = "etc/passwd"

Runner = Callable[[Sequence[str]], "str | None"]


# ---------------------------------------------------------------- parsing (pure)


@dataclass(frozen=True)
class L4tRelease:
    """``# R36 (release), REVISION: 4.0, ...`` -> major 36, revision "4.0"."""

    major: int
    revision: str
    board: str | None = None

    @property
    def version(self) -> str:
        parts = [str(self.major), *self.revision.split(".")]
        return ".".join(parts + ["0"] * (3 - len(parts)))

    @property
    def jetpack(self) -> str | None:
        return L4T_TO_JETPACK.get(self.version)

    def describe(self) -> str:
        if self.jetpack:
            return f"L4T R{self.version} (JetPack {self.jetpack})"
        major = JETPACK_MAJOR.get(self.major)
        return f"L4T R{self.version} (JetPack {major}.x)" if major else f"L4T R{self.version} (unknown JetPack)"


_RELEASE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)(.*)$", re.MULTILINE)


def parse_nv_tegra_release(text: str) -> L4tRelease | None:
    match = _RELEASE.search(text)
    if not match:
        return None
    board = re.search(r"BOARD:\s*([^,\s]+)", match.group(3))
    return L4tRelease(int(match.group(1)), match.group(2), board.group(1) if board else None)


def parse_device_tree_strings(raw: bytes) -> tuple[str, ...]:
    """A device-tree string property: NUL-separated (``model`` has one, ``compatible`` several)."""
    return tuple(s.strip() for s in raw.decode("utf-8", errors="replace").split("\0") if s.strip())


@dataclass(frozen=True)
class JetsonModule:
    name: str
    memory_gb: int | None = None
    part: str | None = None  # p3767-0005


def identify_module(model: str | None, compatible: Sequence[str]) -> JetsonModule | None:
    """The module from its part number in ``compatible``; else from the model string; None if not a Jetson."""
    for entry in compatible:
        for part in re.findall(r"p\d{4}-\d{4}", entry):
            if part in MODULES:
                name, memory = MODULES[part]
                return JetsonModule(name, memory, part)
    if model and "jetson" in model.lower():
        return JetsonModule(re.sub(r"^NVIDIA\s+", "", model))
    return None


def identify_soc(compatible: Sequence[str]) -> tuple[str | None, tuple[int, int] | None]:
    for entry in compatible:
        if entry in SOCS:
            return SOCS[entry]
    return None, None


def parse_dpkg_nvinfer(text: str) -> tuple[str, str] | None:
    """(upstream version, package) of the newest installed ``libnvinfer<N>`` in ``dpkg-query -W 'libnvinfer*'``.

    Lines are ``package<TAB>version``; known but uninstalled packages have an empty version.
    ``10.3.0.30-1+cuda12.5`` -> ``10.3.0.30``.
    """
    best: tuple[int, str, str] | None = None
    for line in text.splitlines():
        package, _, version = line.partition("\t")
        match = re.fullmatch(r"libnvinfer(\d+)", package.strip())
        version = version.strip()
        if match and version:
            upstream = version.split(":", 1)[-1].split("-", 1)[0]
            if best is None or int(match.group(1)) > best[0]:
                best = (int(match.group(1)), upstream, package.strip())
    return (best[1], best[2]) if best else None


def parse_cuda_version_json(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    for key in ("cuda", "cuda_cudart", "cuda_nvcc"):
        version = (data.get(key) or {}).get("version")
        if version:
            return str(version)
    return None


def parse_nvcc_version(text: str) -> str | None:
    """``Cuda compilation tools, release 12.6, V12.6.68`` -> ``12.6.68``."""
    match = re.search(r"release\s+(\d+\.\d+),\s*V(\d+(?:\.\d+)*)", text)
    return match.group(2) if match else None


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` -> bytes per field (the kernel writes kB, meaning KiB)."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            out[match.group(1)] = int(match.group(2)) * 1024
    return out


def parse_nvpmodel(text: str) -> str | None:
    """``nvpmodel -q`` -> ``15W (mode 0)``: the mode name, then its id on the next line."""
    match = re.search(r"NV Power Mode:[ \t]*(\S+)[ \t]*(?:\r?\n[ \t]*(\d+)[ \t]*$)?", text, re.MULTILINE)
    if not match:
        return None
    return f"{match.group(1)} (mode {match.group(2)})" if match.group(2) else match.group(1)


def same_tensorrt(a: str, b: str) -> bool:
    """Whether two TensorRT version strings name one release: Python says ``10.3.0``, dpkg ``10.3.0.30``."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return n >= 3 and pa[:n] == pb[:n]


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class PythonStack:
    """What this interpreter imports: TensorRT and PyTorch (and whether torch sees CUDA)."""

    probed: bool = False
    tensorrt: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None  # CUDA version torch was built for; None: a CPU-only wheel
    cuda_available: bool = False


def probe_python_stack() -> PythonStack:
    """Imports tensorrt and torch (seconds on a Jetson); call it only on the target itself."""
    trt_version = torch_version = torch_cuda = None
    available = False
    try:
        import tensorrt

        trt_version = str(tensorrt.__version__)
    except Exception:  # ImportError, or a broken install raising OSError from its shared libraries
        pass
    try:
        import torch

        torch_version, torch_cuda = str(torch.__version__), torch.version.cuda
        available = bool(torch.cuda.is_available())
    except Exception:
        pass
    return PythonStack(True, trt_version, torch_version, torch_cuda, available)


def run_command(argv: Sequence[str], timeout: float = 15.0) -> str | None:
    """stdout of a command that exits 0; None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def no_commands(argv: Sequence[str]) -> None:
    return None


@dataclass(frozen=True)
class Target:
    root: str
    l4t: L4tRelease | None = None
    model: str | None = None
    compatible: tuple[str, ...] = ()
    module: JetsonModule | None = None
    soc: str | None = None
    compute_capability: tuple[int, int] | None = None
    tensorrt: str | None = None
    tensorrt_source: str | None = None  # "Python module" or the dpkg package (libnvinfer10)
    cuda: str | None = None
    cuda_source: str | None = None
    mem_total: int | None = None
    mem_available: int | None = None
    power_mode: str | None = None
    python: PythonStack = field(default_factory=PythonStack)

    @property
    def is_jetson(self) -> bool:
        return (self.l4t is not None or any(c.startswith("nvidia,tegra") for c in self.compatible)
                or "jetson" in (self.model or "").lower())

    def not_jetson_reason(self) -> str:
        seen = f"device tree model '{self.model}'" if self.model else "no device tree model"
        return f"not a Jetson: no /{NV_TEGRA_RELEASE}, no NVIDIA Tegra device tree ({seen})"

    def describe(self) -> str:
        """``NVIDIA Jetson Orin Nano Developer Kit (Jetson Orin Nano 8GB (...), p3767-0005; Orin GPU sm_87)``."""
        parts = []
        if self.module and self.module.part:
            parts.append(f"{self.module.name}, {self.module.part}")
        if self.soc and self.compute_capability:
            parts.append(f"{self.soc} GPU sm_{self.compute_capability[0]}{self.compute_capability[1]}")
        head = self.model or (self.module.name if self.module else "Jetson")
        return f"{head} ({'; '.join(parts)})" if parts else head


def _read(root: Path, relative: str) -> bytes | None:
    try:
        return (root / relative).read_bytes()
    except OSError:
        return None


def probe_target(root: str | Path = "/", *, run: Runner | None = None,
                 python: Callable[[], PythonStack] | None = None) -> Target:
    """Everything ``edge-vit deploy jetson`` needs to know about the machine under ``root``."""
    root = Path(root)
    system = root.resolve() == Path("/")
    run = run or (run_command if system else no_commands)
    text = lambda rel: (_read(root, rel) or b"").decode("utf-8", errors="replace")  # noqa: E731

    l4t = parse_nv_tegra_release(text(NV_TEGRA_RELEASE))
    model = next(iter(parse_device_tree_strings(_read(root, DT_MODEL) or b"")), None)
    compatible = parse_device_tree_strings(_read(root, DT_COMPATIBLE) or b"")
    soc, capability = identify_soc(compatible)
    module = identify_module(model, compatible)
    jetson = l4t is not None or soc is not None or module is not None

    # The imports take seconds and mean nothing off the target: only on a Jetson, only when asked.
    stack = (python or (probe_python_stack if system else PythonStack))() if jetson else PythonStack()
    trt, trt_source = (stack.tensorrt, "Python module") if stack.tensorrt else (None, None)
    if trt is None:
        found = parse_dpkg_nvinfer(run(["dpkg-query", "-W", "libnvinfer*"]) or "")
        if found:
            trt, trt_source = found[0], f"dpkg {found[1]}"

    cuda, cuda_source = parse_cuda_version_json(text(CUDA_VERSION_JSON)), f"/{CUDA_VERSION_JSON}"
    if cuda is None:
        for nvcc in ("nvcc", "/usr/local/cuda/bin/nvcc"):  # JetPack does not put nvcc on PATH
            cuda = parse_nvcc_version(run([nvcc, "--version"]) or "")
            if cuda:
                cuda_source = "nvcc --version"
                break
    memory = parse_meminfo(text(MEMINFO))
    power = parse_nvpmodel(run(["nvpmodel", "-q"]) or "") if jetson else None
    return Target(
        root=str(root), l4t=l4t, model=model, compatible=compatible, module=module, soc=soc,
        compute_capability=capability, tensorrt=trt, tensorrt_source=trt_source,
        cuda=cuda, cuda_source=cuda_source if cuda else None,
        mem_total=memory.get("MemTotal"), mem_available=memory.get("MemAvailable"),
        power_mode=power, python=stack,
    )


def passwd_users(root: str | Path) -> set[str]:
    """User names in ``root/etc/passwd`` (directory-service users are not listed there)."""
    raw = _read(Path(root), PASSWD) or b""
    return {line.split(":", 1)[0] for line in raw.decode("utf-8", errors="replace").splitlines() if ":" in line}


# ---------------------------------------------------------------- checks


class Status(str, Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"  [{self.status.value:<4}] {self.name:<10} {self.detail}"


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def target_checks(target: Target, *, camera: str | None = None, user: str | None = None) -> list[Check]:
    """The target's checks in the order they print. FAIL blocks a real deploy; WARN and INFO do not.

    ``camera``: a video device path the service will open (checked under the target's root);
    ``user``: the account the systemd unit runs as.
    """
    S = Status
    if not target.is_jetson:
        checks = [Check("Jetson", S.FAIL, target.not_jetson_reason())]
    else:
        checks = [Check("Jetson", S.OK, target.describe())]
    l4t = target.l4t
    if l4t is None:
        checks.append(Check("JetPack", S.WARN if target.is_jetson else S.INFO, f"no /{NV_TEGRA_RELEASE}"))
    elif l4t.major < MIN_L4T_MAJOR:
        checks.append(Check("JetPack", S.FAIL, f"{l4t.describe()}: edge-vit needs JetPack 6.1 or newer "
                                               f"(L4T R36.4+: Python 3.10, TensorRT 10); reflash with JetPack 6"))
    else:
        checks.append(Check("JetPack", S.OK, l4t.describe()))

    fail = S.FAIL if target.is_jetson else S.INFO  # off a Jetson only the Jetson check matters
    trt = target.tensorrt
    if trt is None:
        checks.append(Check("TensorRT", fail, tensorrt_install_hint(jetson=True)))
    elif int(trt.split(".")[0]) < 10:
        checks.append(Check("TensorRT", fail, f"{trt} ({target.tensorrt_source}) is too old: edge-vit builds "
                                              f"engines with TensorRT 10 (JetPack 6.1 or newer)"))
    elif target.tensorrt_source != "Python module" and target.is_jetson:
        checks.append(Check("TensorRT", S.FAIL, f"{trt} is installed ({target.tensorrt_source}) but this Python "
                                                f"cannot import it: `sudo apt install python3-libnvinfer` and use "
                                                f"a venv created with --system-site-packages"))
    elif int(trt.split(".")[0]) >= 11:
        checks.append(Check("TensorRT", S.WARN, f"{trt}: strongly typed networks only, build with --no-fp16"))
    else:
        checks.append(Check("TensorRT", S.OK, f"{trt} ({target.tensorrt_source})"))

    if target.cuda:
        checks.append(Check("CUDA", S.OK, f"{target.cuda} ({target.cuda_source})"))
    else:
        checks.append(Check("CUDA", fail, f"no CUDA toolkit (/{CUDA_VERSION_JSON}, nvcc); on a Jetson: "
                                          f"`sudo apt install nvidia-jetpack`"))

    py = target.python
    if not py.probed:
        checks.append(Check("PyTorch", S.INFO, "not checked (only on a Jetson)"))
    elif py.torch is None:
        checks.append(Check("PyTorch", S.FAIL, "torch is not importable: install the JetPack-matched wheel "
                                               "(docs/jetson.md)"))
    elif py.torch_cuda is None or not py.cuda_available:
        why = "is a CPU-only build" if py.torch_cuda is None else f"(CUDA {py.torch_cuda}) sees no GPU"
        checks.append(Check("PyTorch", S.FAIL, f"torch {py.torch} {why}: install the JetPack-matched wheel "
                                               f"(docs/jetson.md), not the one from PyPI"))
    else:
        checks.append(Check("PyTorch", S.OK, f"{py.torch} with CUDA {py.torch_cuda}"))

    if target.mem_total and target.mem_available is not None:
        shared = ", shared by CPU and GPU" if target.is_jetson else " (this machine's RAM)"
        checks.append(Check("memory", S.INFO, f"{gib(target.mem_total)} total, {gib(target.mem_available)} "
                                              f"available{shared}"))
    else:
        checks.append(Check("memory", S.WARN, f"no /{MEMINFO}: the memory budget cannot be checked"))
    if target.is_jetson:
        mode = target.power_mode or "unknown (nvpmodel -q gave nothing)"
        checks.append(Check("power", S.INFO, f"{mode}; clocks set latency: record the mode with benchmark "
                                             f"results (docs/jetson.md)"))
    if camera:
        present = (Path(target.root) / camera.lstrip("/")).exists()
        checks.append(Check("camera", S.OK if present else S.WARN,
                            f"{camera} exists" if present else f"{camera} not found: plug the camera in "
                                                               f"before starting the service"))
    if user is not None:
        if user == "root":
            checks.append(Check("user", S.WARN, "the service would run as root; pass --user USER"))
        elif user in passwd_users(target.root):
            checks.append(Check("user", S.OK, f"{user} (the unit adds the video group for the camera and GPU)"))
        else:
            checks.append(Check("user", S.WARN, f"{user} is not in /{PASSWD} (a directory-service user is fine; "
                                                f"otherwise create it or pass --user)"))
    return checks
