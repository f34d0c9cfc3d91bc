"""Memory budget of a deployment: will the VLM engines, KV cache, detector and runtime fit the device? (pure)

``memory_budget(manifest, options, device_total, device_available)`` adds up, from an ONNX
export's manifest (``export.trt_profiles.plan_from_manifest`` computes the engine-side numbers:
weights from the ONNX graph sizes, fp16 halving fp32; the KV cache as bytes per token x max
context, twice, for the runtime's two alternating buffers; the I/O buffers):

- TensorRT scratch: an upper bound, the largest of the decoder's prefill and the vision encoder's
  activations at their profile maxima with attention scores materialized (fused attention kernels
  need less; TensorRT reports the real number when it builds). The engines share one scratch block.
- the detector: its weights (an Ultralytics .pt holds fp16 weights, about what an fp16 engine
  holds; an .onnx is fp32) plus an activation allowance that scales with the input area;
- the runtime: a CUDA context with lazily loaded kernels and a Python process with torch,
  transformers, Ultralytics and OpenCV imported. These are allowances, not measurements; measure
  a running service with tegrastats and adjust ``RUNTIME_OVERHEAD``.

On a Jetson the CPU and GPU share one memory, so everything is compared with MemAvailable. When it
does not fit, ``Budget.suggestions`` says what would (a smaller --max-context, --fp16, single tiling).

Knows nothing about the target machine beyond the two numbers it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from edge_vit.errors import EdgeVitError
from export.trt import TrtBuildOptions
from export.trt_profiles import EngineLimits, plan_from_manifest

MIB = 1 << 20
GIB = 1 << 30

RUNTIME_OVERHEAD: tuple[tuple[str, int, str], ...] = (
    ("CUDA context", 350 * MIB, "context and lazily loaded kernels of torch, TensorRT, cuBLAS (allowance)"),
    ("Python process", 650 * MIB, "torch, transformers, Ultralytics, OpenCV imported; frame buffers (allowance)"),
)
DETECTOR_ACTIVATIONS_640 = 96 * MIB  # YOLO activations and I/O tensors at 640 px (allowance; scales with area)
TIGHT = 0.9  # above this share of the available memory the budget warns


@dataclass(frozen=True)
class VisionShape:
    """What sizes the vision encoder's activations, from the model config's vision_config."""

    tokens: int  # patches per tile (plus a class token for CLIP)
    heads: int
    hidden: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Mapping) -> "VisionShape | None":
        vision = config.get("vision_config") or {}
        try:
            tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
            tokens += 1 if str(vision.get("model_type", "")).startswith("clip") else 0
            return cls(tokens, int(vision["num_attention_heads"]), int(vision["hidden_size"]),
                       int(vision["intermediate_size"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None


@dataclass(frozen=True)
class DetectorFootprint:
    name: str = "detector"
    weights_bytes: int = 0  # what the detector's engine holds
    imgsz: int = 640

    @property
    def activation_bytes(self) -> int:
        return int(DETECTOR_ACTIVATIONS_640 * (self.imgsz / 640) ** 2)


@dataclass(frozen=True)
class BudgetOptions:
    build: TrtBuildOptions = field(default_factory=TrtBuildOptions)  # max_tiles None: one tile
    detector: DetectorFootprint = field(default_factory=DetectorFootprint)
    vision: VisionShape | None = None  # None: vision activations are not estimated


@dataclass(frozen=True)
class BudgetLine:
    item: str
    bytes: int
    how: str


@dataclass(frozen=True)
class Budget:
    lines: tuple[BudgetLine, ...]
    limits: EngineLimits
    fp16: bool
    device_total: int | None
    device_available: int | None
    suggestions: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def fits(self) -> bool | None:
        """None when the available memory is unknown."""
        return None if self.device_available is None else self.total_bytes <= self.device_available

    @property
    def tight(self) -> bool:
        return bool(self.fits) and self.total_bytes > TIGHT * self.device_available

    def verdict(self) -> str:
        total = f"~{self.total_bytes / GIB:.2f} GiB"
        if self.fits is None:
            return f"needs {total}; the device's memory is unknown, so it is not checked"
        of = f" of {self.device_total / GIB:.1f} GiB" if self.device_total else ""
        avail = f"{self.device_available / GIB:.1f} GiB available{of}"
        if self.fits:
            spare = (self.device_available - self.total_bytes) / GIB
            return f"needs {total}, {avail}: fits, {spare:.1f} GiB to spare" + (" (tight)" if self.tight else "")
        return f"needs {total} but only {avail} (shared by CPU and GPU on a Jetson)"

    def refusal(self) -> str:
        """The one-line error of a deployment that does not fit."""
        fix = "; ".join(self.suggestions) if self.suggestions else "use a smaller model"
        return f"memory budget: the deployment {self.verdict()}; try: {fix}"

    def table(self) -> list[str]:
        lim = self.limits
        head = (f"memory budget ({'fp16' if self.fp16 else 'fp32'} engines, {lim.max_tiles} tile(s), "
                f"prompt <= {lim.max_prompt}, context <= {lim.max_context} tokens):")
        width = max(len(line.item) for line in self.lines)
        rows = [f"  {line.item:<{width}}  {line.bytes / MIB:8.1f} MiB  {line.how}" for line in self.lines]
        rows.append(f"  {'total':<{width}}  {self.total_bytes / MIB:8.1f} MiB  {self.verdict()}")
        return [head, *rows] + [f"  suggestion: {s}" for s in self.suggestions]


def decoder_activation_bytes(plan, act_bytes: int) -> tuple[int, str]:
    """Prefill at the profile maximum: every query head's scores [S, T] plus ~12 hidden-size tensors per token."""
    shape, lim = plan.shape, plan.limits
    heads = max(shape.hidden_size // shape.head_dim, shape.num_kv_heads)
    s, t = lim.max_prompt, lim.max_context
    return act_bytes * (heads * s * t + 12 * s * shape.hidden_size), \
        f"decoder prefill {s} x {t} tokens, {heads} heads of scores"


def vision_activation_bytes(vision: VisionShape, tiles: int, act_bytes: int) -> tuple[int, str]:
    n = vision.tokens
    per_tile = vision.heads * n * n + 4 * n * vision.hidden + n * vision.intermediate
    return act_bytes * tiles * per_tile, f"vision {tiles} tile(s) x {n} patches, {vision.heads} heads"


def memory_budget(manifest: Mapping, options: BudgetOptions, device_total: int | None,
                  device_available: int | None, *, suggest: bool = True) -> Budget:
    """The breakdown for an ONNX export's manifest at these build options (see the module docstring)."""
    b = options.build
    plan = plan_from_manifest(manifest, None, max_tiles=b.max_tiles or 1, max_prompt=b.max_prompt,
                              max_context=b.max_context, fp16=b.fp16)
    mem, lim = plan.memory, plan.limits
    act_bytes = 2 if b.fp16 else 4
    graph_bytes = sum(int(v) for v in (manifest.get("graph_bytes") or {}).values())
    scratch, scratch_how = decoder_activation_bytes(plan, act_bytes)
    if options.vision is not None:
        vision, vision_how = vision_activation_bytes(options.vision, lim.max_tiles, act_bytes)
        if vision > scratch:
            scratch, scratch_how = vision, vision_how
    det = options.detector
    lines = [
        BudgetLine("VLM engine weights", mem.weights_bytes,
                   f"ONNX graphs {graph_bytes / 1e6:,.0f} MB fp32" + (" / 2 for fp16" if b.fp16 else "")),
        BudgetLine("KV cache", mem.kv_buffers_bytes,
                   f"{mem.kv_bytes_per_token / 1024:.1f} KiB/token x {lim.max_context} tokens x 2 buffers"),
        BudgetLine("VLM I/O buffers", mem.io_buffers_bytes, "pixels, image features, embeddings, masks, logits"),
        BudgetLine("TensorRT scratch", scratch, f"upper bound: {scratch_how}"),
        BudgetLine("detector", det.weights_bytes + det.activation_bytes,
                   f"{det.name} {det.weights_bytes / 1e6:.1f} MB + activations at {det.imgsz} px (allowance)"),
        *(BudgetLine(item, size, how) for item, size, how in RUNTIME_OVERHEAD),
    ]
    budget = Budget(tuple(lines), lim, b.fp16, device_total, device_available)
    if suggest and (budget.fits is False or budget.tight):
        budget = replace(budget, suggestions=_suggestions(manifest, options, device_total, device_available,
                                                          budget))
    return budget


def _suggestions(manifest: Mapping, options: BudgetOptions, total: int | None, available: int,
                 budget: Budget) -> tuple[str, ...]:
    """Settings that fit, each a complete alternative, least harmful first: a shorter context (a stream's
    prompts are far below a model's maximum), then fp16, then single-tile engines; then freeing memory."""

    def fits(build: TrtBuildOptions) -> Budget | None:
        try:
            candidate = memory_budget(manifest, replace(options, build=build), total, available, suggest=False)
        except EdgeVitError:  # limits that cannot hold the prompt
            return None
        return candidate if candidate.fits else None

    b, lim = options.build, budget.limits
    combos: list[tuple[tuple[str, ...], TrtBuildOptions]] = [((), b)]
    if not b.fp16:
        combos.append((("--fp16",), replace(b, fp16=True)))
    if lim.max_tiles > 1:
        flags, last = combos[-1]
        combos.append(((*flags, "--tiling single"), replace(last, max_tiles=1)))
    out = []
    for flags, build in combos:
        found, used = (fits(build), flags) if flags else (None, flags)
        context = lim.max_context // 2
        while found is None and context >= 256:
            used = (*flags, f"--max-context {context}")
            found = fits(replace(build, max_context=context, max_prompt=None))
            context //= 2
        if found is not None:
            out.append(f"{' '.join(used)} (~{found.total_bytes / GIB:.2f} GiB)")
    if total and budget.total_bytes <= total:
        out.append("free memory: stop other services, or boot without the desktop "
                   "(`sudo systemctl set-default multi-user.target`, then reboot)")
    return tuple(out)
