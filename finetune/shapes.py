"""The shapes world: procedural scenes of coloured shapes with exact boxes and attributes.

It writes what the offline demo needs in place of downloads:

* a YOLO detection dataset (``data.yaml``, ``images/{split}/*.png``,
  ``labels/{split}/*.txt`` in normalized ``class cx cy w h``) with an
  attributes sidecar (``attributes/{split}/*.json``: per object class, colour,
  size word, position word, pixel ``xyxy``), which ``finetune.instruct`` turns
  into instruction data;
* short clips of moving shapes (``clips/*.mp4``) with per-frame ground truth
  (``clips/*.jsonl``) for the stream demo.

Every image is drawn from its own numpy Generator, seeded from
``(seed, split, index)``: the same seed gives the same PNG and label bytes on
the same machine (cv2's PNG encoder is deterministic), and image ``i`` does not
depend on how many images are made. Boxes are exact: each box is the extent of
every pixel its shape coloured. Overlaps are limited (box IoU < 0.3, and every
shape keeps at least 70% of its pixels visible), shapes lie fully inside the
frame, and no box centre lies on a line of the runtime's 3x3 position grid, so
position words are unambiguous.

What it knows nothing about: models, prompts, the instruction format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edge_vit.errors import EdgeVitError
from edge_vit.grounding import SIZE_WORDS, PositionStyle, describe_position, describe_size

__all__ = [
    "SHAPE_CLASSES",
    "COLOURS",
    "COLOUR_NAMES",
    "SIZES",
    "LABEL_SCHEMES",
    "class_names",
    "label_class_id",
    "label_scheme",
    "BACKGROUNDS",
    "GENERATOR_VERSION",
    "ShapeObject",
    "ShapeScene",
    "ShapesConfig",
    "ShapesSummary",
    "size_word",
    "SIZE_THRESHOLDS",
    "render_scene",
    "render_clip",
    "generate_shapes",
    "render_records",
]

GENERATOR_VERSION = "shapes-v1"
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "hexagon")
# RGB; saturated, so that on the low-saturation backgrounds the colour word is never in doubt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 65),
    "blue": (40, 85, 220),
    "yellow": (240, 210, 35),
    "purple": (140, 55, 185),
    "orange": (245, 130, 25),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = SIZE_WORDS  # the grounding's words, so attributes and grounding name sizes alike
# Label schemes: the detector's classes. "shape" names the shape only ("circle"); "colour-shape" names
# colour and shape ("red circle", 30 classes), so the grounding text carries the colour too.
LABEL_SCHEMES = ("shape", "colour-shape")
BACKGROUNDS = ("flat", "gradient", "noise", "texture")
SPLITS = ("train", "val", "test")

# Longer box side as a fraction of the shorter image side: drawn from these ranges...
_SIZE_RANGES = {"small": (0.08, 0.13), "medium": (0.16, 0.23), "large": (0.27, 0.35)}
# ...and named by these thresholds (see size_word), which sit in the gaps between the ranges. The grounding's
# size words use the same ones (GroundingConfig(size_words=SIZE_THRESHOLDS)), so a detected box is named as its
# ground truth is.
SIZE_THRESHOLDS = (0.145, 0.25)
_MAX_IOU = 0.3
_MIN_VISIBLE = 0.7
_PLACEMENT_TRIES = 40
_COLOUR_JITTER = 12
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel vertex positions


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: pixel box ``xyxy`` (x2, y2 exclusive), attribute words, and drawing order ``index``."""

    class_name: str
    class_id: int
    colour: str
    size: str
    position: str
    xyxy: tuple[int, int, int, int]

    def to_json(self) -> dict:
        return {
            "class": self.class_name,
            "class_id": self.class_id,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "xyxy": list(self.xyxy),
        }


@dataclass(frozen=True)
class ShapeScene:
    """A rendered image (BGR, uint8, [H, W, 3]) and the objects in it, in drawing order."""

    image: np.ndarray
    objects: tuple[ShapeObject, ...]
    background: str
    blur_sigma: float
    noise_std: float

    def yolo_label_text(self, labels: str = "shape") -> str:
        """YOLO label lines ``class cx cy w h`` (normalized, 6 decimals); empty text for an empty scene."""
        h, w = self.image.shape[:2]
        rows = []
        for o in self.objects:
            x1, y1, x2, y2 = o.xyxy
            rows.append(f"{label_class_id(o.class_name, o.colour, labels)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                        f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n")
        return "".join(rows)


@dataclass(frozen=True)
class ShapesConfig:
    """What :func:`generate_shapes` makes. ``images`` are split into train/val/test by the fractions."""

    images: int = 1000
    imgsz: int = 320
    seed: int = 0
    min_objects: int = 0
    max_objects: int = 6
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    clips: int = 0
    clip_frames: int = 90
    clip_fps: float = 15.0
    labels: str = "shape"  # one of LABEL_SCHEMES: the detector's classes

    def __post_init__(self) -> None:
        if self.labels not in LABEL_SCHEMES:
            raise EdgeVitError(f"shapes: --labels must be one of {', '.join(LABEL_SCHEMES)}, got {self.labels!r}")
        if self.images < 1:
            raise EdgeVitError(f"shapes: --images must be >= 1, got {self.images}")
        if self.imgsz < 64:
            raise EdgeVitError(f"shapes: --imgsz must be >= 64, got {self.imgsz}")
        if self.seed < 0:
            raise EdgeVitError(f"shapes: --seed must be >= 0, got {self.seed}")
        if not 0 <= self.min_objects <= self.max_objects <= 20:
            raise EdgeVitError(f"shapes: need 0 <= min_objects <= max_objects <= 20, "
                               f"got {self.min_objects}, {self.max_objects}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise EdgeVitError(f"shapes: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.clips < 0 or self.clip_frames < 1 or self.clip_fps <= 0:
            raise EdgeVitError("shapes: --clips must be >= 0, --clip-frames >= 1 and the fps > 0")

    def split_sizes(self) -> dict[str, int]:
        """Images per split; val gets at least one image when there are two or more, train keeps at least one."""
        n = self.images
        n_val = round(n * self.val_fraction)
        if self.val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_test = round(n * self.test_fraction)
        if n - n_val - n_test < 1:
            raise EdgeVitError(f"shapes: {n} images leave no training images with val_fraction "
                               f"{self.val_fraction} and test_fraction {self.test_fraction}")
        return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


@dataclass
class ShapesSummary:
    """What was written: the data.yaml, images and objects per split, clip paths."""

    data_yaml: Path
    images: dict[str, int]
    objects: dict[str, int]
    empty_images: dict[str, int]
    clips: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def class_names(labels: str = "shape") -> tuple[str, ...]:
    """The detector's class names under a label scheme (see LABEL_SCHEMES), in class-id order."""
    if labels == "shape":
        return SHAPE_CLASSES
    if labels == "colour-shape":
        return tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPE_CLASSES)
    raise EdgeVitError(f"shapes: unknown label scheme {labels!r} (one of {', '.join(LABEL_SCHEMES)})")


def label_scheme(names) -> str:
    """The label scheme whose classes a detector has (its ``names``, a dict or list); "shape" otherwise."""
    values = [str(v) for v in (names.values() if isinstance(names, dict) else names)]
    return "colour-shape" if values == list(class_names("colour-shape")) else "shape"


def label_class_id(shape: str, colour: str, labels: str = "shape") -> int:
    """The class id of a shape of a colour under a label scheme."""
    if labels == "colour-shape":
        return COLOUR_NAMES.index(colour) * len(SHAPE_CLASSES) + SHAPE_CLASSES.index(shape)
    return class_names(labels).index(shape)


def size_word(xyxy, image_size: tuple[int, int]) -> str:
    """"small" / "medium" / "large" from the longer box side over the shorter side of an image of (height, width)."""
    return describe_size(xyxy, image_size, SIZE_THRESHOLDS)


# ---------------------------------------------------------------- geometry and drawing


def _unit_polygon(class_name: str, angle: float) -> np.ndarray:
    """[K, 2] vertices of the shape around (0, 0), rotated by ``angle`` radians (y axis down)."""
    if class_name == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        radii = np.ones_like(t)
    elif class_name == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.ones(4)
    elif class_name == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.ones(3)
    elif class_name == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    elif class_name == "hexagon":
        t = np.arange(6) * np.pi / 3
        radii = np.ones(6)
    else:
        raise ValueError(f"unknown shape {class_name!r}")
    t = t + angle
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _rotation(class_name: str, rng: np.random.Generator) -> float:
    if class_name == "circle":
        return 0.0
    if class_name == "square":  # keep squares square-looking, not diamonds
        return float(rng.uniform(-0.35, 0.35))
    return float(rng.uniform(0, 2 * np.pi))


def _scaled(poly: np.ndarray, side: float) -> np.ndarray:
    """Scale so that the polygon's longer extent is ``side`` pixels."""
    extent = poly.max(axis=0) - poly.min(axis=0)
    return poly * (side / float(extent.max()))


def _coverage(poly: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage (uint8, 0..255) of the filled polygon on a frame of ``shape_hw``."""
    mask = np.zeros(shape_hw, np.uint8)
    pts = np.round(poly * (1 << _SHIFT)).astype(np.int32)
    import cv2

    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    return mask


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Extent of the nonzero pixels as (x1, y1, x2, y2) with exclusive x2, y2; None if empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _on_grid_line(box, h: int, w: int) -> bool:
    """True when the box centre is within half a pixel of a 1/3 or 2/3 line of the position grid."""
    cx3, cy3 = 1.5 * (box[0] + box[2]), 1.5 * (box[1] + box[3])
    return any(abs(cx3 - k * w) < 1.5 for k in (1, 2)) or any(abs(cy3 - k * h) < 1.5 for k in (1, 2))


def _jittered_colour(name: str, rng: np.random.Generator) -> np.ndarray:
    """BGR uint8 colour near the named one."""
    rgb = np.array(COLOURS[name], np.int32) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
    return np.clip(rgb, 0, 255).astype(np.uint8)[::-1].copy()


def _paint(image: np.ndarray, mask: np.ndarray, bgr: np.ndarray) -> None:
    """Blend ``bgr`` into ``image`` with ``mask`` as alpha, in integer arithmetic (same bytes everywhere)."""
    box = _mask_box(mask)
    if box is None:
        return
    x1, y1, x2, y2 = box
    m = mask[y1:y2, x1:x2, None].astype(np.int32)
    roi = image[y1:y2, x1:x2].astype(np.int32)
    image[y1:y2, x1:x2] = ((roi * (255 - m) + bgr.astype(np.int32) * m + 127) // 255).astype(np.uint8)


# ---------------------------------------------------------------- backgrounds


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation BGR colour (grey with a slight tint), value 70..225, as float."""
    grey = rng.uniform(70, 225)
    return np.clip(grey + rng.uniform(-14, 14, 3), 0, 255)


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    import cv2

    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = _muted_colour(rng).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]  # [H, 1]
    xx = np.arange(w, dtype=np.float32)[None, :]  # [1, W]
    if kind == "flat":
        img = np.broadcast_to(base, (h, w, 3))
    elif kind == "gradient":
        other = _muted_colour(rng).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.float32(math.cos(angle)) + yy * np.float32(math.sin(angle))  # [H, W]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + (other - base) * t[..., None]
    elif kind == "noise":
        cells = int(rng.integers(4, 24))
        field_ = rng.standard_normal((cells, cells), dtype=np.float32)
        field_ = cv2.resize(field_, (w, h), interpolation=cv2.INTER_CUBIC)
        amp = np.float32(rng.uniform(6, 16))
        tint = rng.uniform(0.8, 1.2, 3).astype(np.float32)
        img = base + (amp * field_)[..., None] * tint
    else:  # texture: stripes, checks or a grid, in two close muted tones
        other = np.clip(base + rng.choice([-1.0, 1.0]) * rng.uniform(15, 35), 0, 255).astype(np.float32)
        period = int(rng.integers(max(4, min(h, w) // 40), max(6, min(h, w) // 8)))
        yi, xi = np.arange(h)[:, None], np.arange(w)[None, :]
        pattern = int(rng.integers(3))
        if pattern == 0:  # diagonal or straight stripes
            a, b = (int(v) for v in rng.integers(0, 2, 2))
            on = ((xi * (a or 1) + yi * b) // period) % 2 == 1
        elif pattern == 1:  # checkerboard
            on = ((xi // period) + (yi // period)) % 2 == 1
        else:  # grid lines
            on = ((xi % period) < 2) | ((yi % period) < 2)
        img = np.where(on[..., None], other, base)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kind


def _finish(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Camera-like degradation: Gaussian blur (sometimes) and pixel noise (sometimes)."""
    import cv2

    sigma = float(rng.choice([0.0, 0.0, 0.6, 1.0]))
    if sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    std = float(rng.choice([0.0, 3.0, 6.0]))
    if std > 0:
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
        image = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    return image, sigma, std


# ---------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, imgsz: int = 320, min_objects: int = 0, max_objects: int = 6) -> ShapeScene:
    """One square image of ``imgsz`` pixels with ``min_objects``..``max_objects`` shapes (fewer if they do not fit).

    Shapes are placed one by one; a candidate is dropped (and redrawn, up to a
    fixed number of tries) when its box overlaps a placed box with IoU >= 0.3,
    touches a box of the same colour, would hide more than 30% of an earlier
    shape's pixels, or has its centre on a grid line.
    """
    h = w = int(imgsz)
    image, background = _background(rng, h, w)
    n_target = int(rng.integers(min_objects, max_objects + 1))
    owner = np.full((h, w), -1, np.int16)  # which object shows at each pixel (coverage >= half)
    areas: list[int] = []
    objects: list[ShapeObject] = []
    masks: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n_target):
        for _try in range(_PLACEMENT_TRIES):
            cid = int(rng.integers(len(SHAPE_CLASSES)))
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            lo, hi = _SIZE_RANGES[SIZES[int(rng.integers(len(SIZES)))]]
            side = rng.uniform(lo, hi) * min(h, w)
            poly = _scaled(_unit_polygon(SHAPE_CLASSES[cid], _rotation(SHAPE_CLASSES[cid], rng)), side)
            low, high = poly.min(axis=0), poly.max(axis=0)
            # Keep one pixel of margin so the anti-aliased edge stays inside the frame.
            cx = rng.uniform(1 - low[0], w - 1 - high[0])
            cy = rng.uniform(1 - low[1], h - 1 - high[1])
            mask = _coverage(poly + [cx, cy], (h, w))
            box = _mask_box(mask)
            if box is None or _on_grid_line(box, h, w):
                continue
            if any(_iou(box, o.xyxy) >= _MAX_IOU for o in objects):
                continue
            if any(o.colour == colour and _iou(box, o.xyxy) > 0 for o in objects):
                continue
            solid = mask >= 128
            x1, y1, x2, y2 = box
            under = owner[y1:y2, x1:x2][solid[y1:y2, x1:x2]]
            hidden = np.bincount(under[under >= 0], minlength=len(objects)) if len(objects) else np.zeros(0)
            visible = [(owner == j).sum() - hidden[j] for j in range(len(objects))] if hidden.any() else None
            if visible is not None and any(visible[j] < _MIN_VISIBLE * areas[j] for j in range(len(objects))):
                continue
            owner[solid] = len(objects)
            areas.append(int(solid.sum()))
            masks.append((mask, _jittered_colour(colour, rng)))
            objects.append(ShapeObject(
                class_name=SHAPE_CLASSES[cid], class_id=cid, colour=colour, size=size_word(box, (h, w)),
                position=describe_position(box, (h, w), PositionStyle.WORDS), xyxy=box,
            ))
            break
    for mask, bgr in masks:
        _paint(image, mask, bgr)
    image, sigma, std = _finish(image, rng)
    return ShapeScene(image=image, objects=tuple(objects), background=background, blur_sigma=sigma, noise_std=std)


# ---------------------------------------------------------------- clips


def _bounce(v: float, lo: float, hi: float) -> float:
    span = hi - lo
    if span <= 0:
        return lo
    k = (v - lo) % (2 * span)
    return lo + (k if k <= span else 2 * span - k)


def render_clip(rng: np.random.Generator, n_frames: int, width: int = 320, height: int = 240) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Frames (BGR) of 1-5 shapes moving in straight lines and bouncing off the edges, with ground truth.

    Shapes keep their orientation and size, so each track's size word is fixed;
    they may pass over each other (drawing order = track id), and ``visible``
    says which fraction of a shape's pixels shows in that frame.
    """
    background, _ = _background(rng, height, width)
    n = int(rng.integers(1, 6))
    scale = min(width, height) / 240
    tracks = []
    for tid in range(n):
        cid = int(rng.integers(len(SHAPE_CLASSES)))
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        size = SIZES[int(rng.integers(2))]  # small or medium: large ones would crowd a clip
        lo, hi = _SIZE_RANGES[size]
        poly = _scaled(_unit_polygon(SHAPE_CLASSES[cid], _rotation(SHAPE_CLASSES[cid], rng)),
                       rng.uniform(lo, hi) * min(width, height))
        low, high = poly.min(axis=0), poly.max(axis=0)
        speed = rng.uniform(1.0, 4.0) * scale
        heading = rng.uniform(0, 2 * np.pi)
        start = (rng.uniform(1 - low[0], width - 1 - high[0]), rng.uniform(1 - low[1], height - 1 - high[1]))
        tracks.append(dict(cid=cid, colour=colour, size=size, poly=poly, low=low, high=high, start=start,
                           v=(speed * math.cos(heading), speed * math.sin(heading)),
                           bgr=_jittered_colour(colour, rng)))
    for t in range(n_frames):
        frame = background.copy()
        owner = np.full((height, width), -1, np.int16)
        truth = []
        for tid, tr in enumerate(tracks):
            cx = _bounce(tr["start"][0] + tr["v"][0] * t, 1 - tr["low"][0], width - 1 - tr["high"][0])
            cy = _bounce(tr["start"][1] + tr["v"][1] * t, 1 - tr["low"][1], height - 1 - tr["high"][1])
            mask = _coverage(tr["poly"] + [cx, cy], (height, width))
            box = _mask_box(mask)
            if box is None:
                continue
            _paint(frame, mask, tr["bgr"])
            owner[mask >= 128] = tid
            truth.append(dict(track_id=tid, box=box, area=int((mask >= 128).sum())))
        objects = []
        for row in truth:
            tr = tracks[row["track_id"]]
            visible = float((owner == row["track_id"]).sum()) / max(row["area"], 1)
            objects.append({
                "track_id": row["track_id"], "class": SHAPE_CLASSES[tr["cid"]], "class_id": tr["cid"],
                "colour": tr["colour"], "size": tr["size"],
                "position": describe_position(row["box"], (height, width), PositionStyle.WORDS),
                "xyxy": list(row["box"]), "visible": round(visible, 3),
            })
        frame_rng = np.random.default_rng(np.random.SeedSequence(int(rng.integers(2**63)), spawn_key=(t,)))
        frame, _, _ = _finish(frame, frame_rng)
        yield frame, objects


# ---------------------------------------------------------------- writing


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, SPLITS.index(split), index)))


def _clip_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_clip(path: Path, rng: np.random.Generator, n_frames: int, width: int, height: int, fps: float) -> int:
    """Write the mp4 and its ground-truth JSONL next to it; returns the number of frames."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise EdgeVitError(f"OpenCV cannot write {path} (no mp4v encoder in this OpenCV build?)")
    lines = []
    try:
        for t, (frame, objects) in enumerate(render_clip(rng, n_frames, width, height)):
            writer.write(frame)
            lines.append(json.dumps({"frame": t, "image_size": [height, width], "objects": objects}) + "\n")
    finally:
        writer.release()
    path.with_suffix(".jsonl").write_text("".join(lines), encoding="utf-8")
    return len(lines)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with other files: ``out`` must be empty, or hold a shapes dataset and ``overwrite`` be set."""
    import shutil

    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise EdgeVitError(f"{out} is not empty; pass --overwrite to replace a shapes dataset there")
    if not (out / "shapes.json").is_file():
        raise EdgeVitError(f"{out} does not hold a shapes dataset (no shapes.json); not deleting anything there")
    for name in ("images", "labels", "attributes", "clips"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("data.yaml", "shapes.json"):
        (out / name).unlink(missing_ok=True)


def generate_shapes(out: str | Path, config: ShapesConfig = ShapesConfig(), overwrite: bool = False) -> ShapesSummary:
    """Write the shapes dataset (and clips) under ``out``; returns what was written.

    Layout::

        out/data.yaml                      path (absolute), train/val[/test], names
        out/shapes.json                    generator version, config, counts
        out/images/{split}/000000.png
        out/labels/{split}/000000.txt      class cx cy w h (normalized); empty file for an empty image
        out/attributes/{split}/000000.json {"image", "image_size", "background", "objects": [...]}
        out/clips/clip_000.mp4 + .jsonl    one JSON line per frame: frame, image_size, objects

    ``out`` must be empty or absent; with ``overwrite``, a shapes dataset already
    there (it has shapes.json) is replaced, and nothing else is deleted.
    """
    import time

    import cv2
    import yaml

    t0 = time.perf_counter()
    out = Path(out).absolute()
    sizes = config.split_sizes()
    _prepare_out(out, overwrite)
    counts_objects = {s: 0 for s in sizes}
    counts_empty = {s: 0 for s in sizes}
    for split, n in sizes.items():
        for i in range(n):
            scene = render_scene(_scene_rng(config.seed, split, i), config.imgsz, config.min_objects, config.max_objects)
            stem = f"{i:06d}"
            ok, png = cv2.imencode(".png", scene.image)
            if not ok:
                raise RuntimeError("cv2 could not encode a PNG")
            _write_bytes(out / "images" / split / f"{stem}.png", png.tobytes())
            _write_bytes(out / "labels" / split / f"{stem}.txt", scene.yolo_label_text(config.labels).encode())
            attributes = {
                "image": f"images/{split}/{stem}.png",
                "image_size": [config.imgsz, config.imgsz],
                "background": scene.background,
                "blur_sigma": scene.blur_sigma,
                "noise_std": scene.noise_std,
                "objects": [o.to_json() for o in scene.objects],
            }
            _write_bytes(out / "attributes" / split / f"{stem}.json", (json.dumps(attributes, indent=1) + "\n").encode())
            counts_objects[split] += len(scene.objects)
            counts_empty[split] += not scene.objects
    data = {"path": str(out)}
    data.update({s: f"images/{s}" for s, n in sizes.items() if n})
    data["names"] = dict(enumerate(class_names(config.labels)))
    header = f"# Shapes world ({GENERATOR_VERSION}), seed {config.seed}, {config.imgsz}x{config.imgsz}: edge-vit finetune shapes\n"
    (out / "data.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    clips = []
    width, height = config.imgsz, (config.imgsz * 3 // 4) // 2 * 2  # 4:3, even sides for the codec
    for k in range(config.clips):
        path = out / "clips" / f"clip_{k:03d}.mp4"
        _write_clip(path, _clip_rng(config.seed, k), config.clip_frames, width, height, config.clip_fps)
        clips.append(path)
    meta = {
        "generator": GENERATOR_VERSION,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "classes": list(class_names(config.labels)), "shapes": list(SHAPE_CLASSES), "colours": list(COLOUR_NAMES), "sizes": list(SIZES),
        "images": sizes, "objects": counts_objects, "empty_images": counts_empty,
        "clips": [p.relative_to(out).as_posix() for p in clips],
    }
    (out / "shapes.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return ShapesSummary(data_yaml=out / "data.yaml", images=sizes, objects=counts_objects,
                         empty_images=counts_empty, clips=clips, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- scenes in memory


def _record_parts(seed: int, index: int, imgsz: int, labels: str, min_objects: int,
                  max_objects: int) -> tuple[str, list[dict], str]:
    """(YOLO label text, the attributes sidecar's objects, background) of training scene ``index``."""
    scene = render_scene(_scene_rng(seed, "train", index), imgsz, min_objects, max_objects)
    return scene.yolo_label_text(labels), [o.to_json() for o in scene.objects], scene.background


def _record_parts_chunk(args: tuple) -> list[tuple[str, list[dict], str]]:
    seed, indices, *rest = args
    return [_record_parts(seed, i, *rest) for i in indices]


def render_records(seed: int, count: int, imgsz: int = 256, labels: str = "colour-shape", *, min_objects: int = 0,
                   max_objects: int = 6, workers: int = 1) -> list:
    """``count`` training scenes of the shapes world rendered in memory, nothing written, each as the
    ``finetune.dataset.ImageRecord`` that reading its written image back would give.

    Scene ``i`` is the one :func:`generate_shapes` would write as ``images/train/{i:06d}.png`` with the same
    seed: the same label lines (parsed from the same 6-decimal text), the sidecar's objects as each box's
    attributes (in drawing order, as the sidecar matches them) and the background. For text-only uses that
    need many more scenes than images are worth writing (stage 0 of the demo VLM). ``workers`` > 1 renders in
    that many processes; the records do not depend on it.
    """
    from concurrent.futures import ProcessPoolExecutor

    from finetune.dataset import ImageRecord, LabelBox, _parse_line

    if count < 1 or workers < 1:
        raise EdgeVitError(f"shapes: need count >= 1 and workers >= 1, got {count}, {workers}")
    nc = len(class_names(labels))
    chunk = 256
    jobs = [(seed, range(a, min(a + chunk, count)), imgsz, labels, min_objects, max_objects)
            for a in range(0, count, chunk)]
    if workers == 1:
        parts = [p for job in jobs for p in _record_parts_chunk(job)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = [p for done in pool.map(_record_parts_chunk, jobs) for p in done]
    records = []
    for i, (label_text, objects, background) in enumerate(parts):
        boxes = []
        for lineno, line in enumerate(label_text.splitlines(), 1):
            box = _parse_line(line.split(), nc, None)[0]
            boxes.append(LabelBox(box.class_id, box.cx, box.cy, box.w, box.h, lineno))
        rel = f"images/train/{i:06d}.png"
        records.append(ImageRecord(path=Path(rel), rel=rel, image_size=(imgsz, imgsz), boxes=tuple(boxes),
                                   label_path=None, file_size=0, attributes=tuple(objects),
                                   scene_attributes={"background": background}))
    return records
