"""Read a YOLO-format detection dataset: data.yaml, the image lists of a split, and the label files.

Follows the Ultralytics conventions: a split entry (``train:``, ``val:``,
``test:``) is a folder (searched recursively), a list of folders, a ``.txt``
file listing image paths (``./x`` is relative to the list file, other relative
paths to the dataset root), or one image; an image's label file is its path
with the last ``/images/`` replaced by ``/labels/`` and the suffix by ``.txt``.
An image with no label file has zero objects. Label lines are
``class cx cy w h`` (normalized); polygon lines (``class x1 y1 x2 y2 ...``)
count as their bounding box, and pose lines (with ``kpt_shape`` in data.yaml)
as their box.

Differences from Ultralytics, on purpose: a relative ``path:`` is taken
relative to the data.yaml's folder (then the working directory), never a global
datasets folder, and nothing is ever downloaded; split entries (and any image
or label file, after following links) must stay inside the dataset root. A bad
label line costs only that line: it is logged as one warning with
``path:line``, counted, and every other line is kept.

What it knows nothing about: instruction data, models, grounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edge_vit.errors import EdgeVitError

__all__ = [
    "IMAGE_SUFFIXES",
    "DataYaml",
    "LabelBox",
    "ImageRecord",
    "ReadReport",
    "load_data_yaml",
    "label_path_for",
    "parse_label_file",
    "read_split",
    "dataset_hash",
]

log = logging.getLogger(__name__)

# Ultralytics' IMG_FORMATS.
IMAGE_SUFFIXES = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif",
                            "tiff", "webp", "pfm"})


@dataclass(frozen=True)
class DataYaml:
    """A parsed data.yaml: the dataset root (resolved), class names, and the raw split entries."""

    yaml_path: Path
    root: Path
    names: dict[int, str]
    splits: Mapping[str, Any]
    kpt_shape: tuple[int, int] | None = None


@dataclass(frozen=True)
class LabelBox:
    """One good label line: class id and normalized centre/size; ``line`` is its 1-based line number."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float
    line: int

    def xyxy(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Pixel corners in an image of (height, width), clipped to the image."""
        ih, iw = image_size
        x1 = min(max((self.cx - self.w / 2) * iw, 0.0), iw)
        x2 = min(max((self.cx + self.w / 2) * iw, 0.0), iw)
        y1 = min(max((self.cy - self.h / 2) * ih, 0.0), ih)
        y2 = min(max((self.cy + self.h / 2) * ih, 0.0), ih)
        return x1, y1, x2, y2


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split with its good boxes and, where the dataset has them, per-box attributes."""

    path: Path  # absolute
    rel: str  # POSIX path relative to the dataset root
    image_size: tuple[int, int]  # (height, width)
    boxes: tuple[LabelBox, ...]
    label_path: Path | None  # None: no label file (zero objects)
    file_size: int
    attributes: tuple[dict | None, ...] = ()  # one per box (None where nothing matched); empty if no sidecar
    attributes_path: Path | None = None
    scene_attributes: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"background": "gradient"}


@dataclass
class ReadReport:
    """What reading a split skipped or noticed; ``bad_lines`` counts by reason."""

    images: int = 0
    objects: int = 0
    bad_lines: Counter = field(default_factory=Counter)
    images_without_labels: int = 0
    labels_without_image: int = 0
    missing_images: int = 0
    unreadable_images: int = 0
    unreadable_labels: int = 0
    outside_root: int = 0
    bad_attribute_files: int = 0
    images_with_attributes: int = 0

    def skipped_json(self) -> dict:
        """What was left out, for the manifest (images without a label file are not skipped: they are empty)."""
        return {
            "bad_label_lines": sum(self.bad_lines.values()),
            "bad_label_lines_by_reason": dict(sorted(self.bad_lines.items())),
            "labels_without_image": self.labels_without_image,
            "missing_images": self.missing_images,
            "unreadable_images": self.unreadable_images,
            "unreadable_labels": self.unreadable_labels,
            "outside_root": self.outside_root,
            "bad_attribute_files": self.bad_attribute_files,
        }


# ---------------------------------------------------------------- data.yaml


def _names(raw: Any, nc: Any, where: Path) -> dict[int, str]:
    if raw is None:
        if isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
            return {i: f"class_{i}" for i in range(nc)}
        raise EdgeVitError(f"{where}: needs 'names' (a list or an id: name mapping) or a positive 'nc'")
    if isinstance(raw, (list, tuple)):
        names = {i: str(n) for i, n in enumerate(raw)}
    elif isinstance(raw, dict):
        try:
            names = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise EdgeVitError(f"{where}: 'names' keys must be class ids (0, 1, ...)") from None
        if sorted(names) != list(range(len(names))):
            raise EdgeVitError(f"{where}: 'names' ids must be 0..{len(names) - 1} without gaps")
    else:
        raise EdgeVitError(f"{where}: 'names' must be a list or an id: name mapping, not {type(raw).__name__}")
    if not names:
        raise EdgeVitError(f"{where}: 'names' is empty")
    if nc is not None and nc != len(names):
        raise EdgeVitError(f"{where}: 'nc: {nc}' does not match the {len(names)} names")
    return names


def load_data_yaml(path: str | Path) -> DataYaml:
    """Parse and check a data.yaml; every problem is one :class:`EdgeVitError` line."""
    import yaml

    yaml_path = Path(path)
    if yaml_path.is_dir():
        candidates = sorted(yaml_path.glob("*.yaml")) + sorted(yaml_path.glob("*.yml"))
        if len(candidates) != 1:
            raise EdgeVitError(f"{yaml_path}: is a folder; pass its data.yaml")
        yaml_path = candidates[0]
    if not yaml_path.is_file():
        raise EdgeVitError(f"dataset file not found: {yaml_path}")
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise EdgeVitError(f"{yaml_path}: not valid YAML{at}: {reason}") from None
    except OSError as exc:
        raise EdgeVitError(f"{yaml_path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise EdgeVitError(f"{yaml_path}: must be a mapping with train/val and names, not {type(data).__name__}")
    yaml_dir = yaml_path.absolute().parent
    raw_root = data.get("path")
    if raw_root in (None, ""):
        root = yaml_dir
    elif not isinstance(raw_root, str):
        raise EdgeVitError(f"{yaml_path}: 'path' must be a string")
    else:
        root = Path(os.path.expanduser(raw_root))
        if not root.is_absolute():
            root = next((p for p in (yaml_dir / root, Path.cwd() / root) if p.is_dir()), yaml_dir / root)
    root = Path(os.path.normpath(root))
    if not root.is_dir():
        raise EdgeVitError(f"{yaml_path}: dataset root {root} is not a folder")
    kpt = data.get("kpt_shape")
    kpt_shape = None
    if kpt is not None:
        if not (isinstance(kpt, (list, tuple)) and len(kpt) == 2 and all(isinstance(v, int) for v in kpt)):
            raise EdgeVitError(f"{yaml_path}: 'kpt_shape' must be [keypoints, dims]")
        kpt_shape = (int(kpt[0]), int(kpt[1]))
    splits = {k: data[k] for k in ("train", "val", "test") if data.get(k)}
    if "val" not in splits and data.get("validation"):
        splits["val"] = data["validation"]
    return DataYaml(yaml_path=yaml_path, root=root, names=_names(data.get("names"), data.get("nc"), yaml_path),
                    splits=splits, kpt_shape=kpt_shape)


# ---------------------------------------------------------------- paths


def _inside(path: Path, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_SUFFIXES and "." in name


def label_path_for(image: Path, folder: str = "labels", suffix: str = ".txt") -> Path:
    """Ultralytics' rule: the last ``/images/`` of the path becomes ``/{folder}/``, the suffix ``suffix``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}{folder}{os.sep}"
    text = sb.join(os.fspath(image).rsplit(sa, 1))
    return Path(text.rsplit(".", 1)[0] + suffix)


def _split_entries(data: DataYaml, split: str) -> list[str]:
    if split not in data.splits:
        have = ", ".join(data.splits) or "none"
        raise EdgeVitError(f"{data.yaml_path}: has no '{split}' entry (has: {have})")
    raw = data.splits[split]
    entries = raw if isinstance(raw, (list, tuple)) else [raw]
    if not all(isinstance(e, str) and e for e in entries):
        raise EdgeVitError(f"{data.yaml_path}: '{split}' must be a path or a list of paths")
    return list(entries)


def _confined(data: DataYaml, split: str, entry: str, real_root: str) -> Path:
    """The entry as an absolute path under the root, or a refusal naming it."""
    p = Path(os.path.normpath(data.root / os.path.expanduser(entry)))
    if not _inside(p, real_root):
        raise EdgeVitError(f"{data.yaml_path}: '{split}' entry {entry!r} points outside the dataset root "
                           f"{data.root}; split paths must stay inside it")
    return p


def _images_of_split(data: DataYaml, split: str, report: ReadReport) -> tuple[list[Path], list[Path]]:
    """Image paths of the split (sorted, unique) and the label folders to check for orphan labels."""
    real_root = os.path.realpath(data.root)
    images: set[Path] = set()
    label_dirs: list[Path] = []
    for entry in _split_entries(data, split):
        p = _confined(data, split, entry, real_root)
        if p.is_dir():
            for dirpath, _, files in os.walk(p):
                images.update(Path(dirpath) / f for f in files if _is_image(f))
            label_dir = label_path_for(p / "x.x").parent
            if label_dir != p:
                label_dirs.append(label_dir)
        elif p.is_file() and p.suffix.lower() == ".txt":
            images.update(_listed_images(p, data, report, real_root))
        elif p.is_file() and _is_image(p.name):
            images.add(p)
        else:
            raise EdgeVitError(f"{data.yaml_path}: '{split}' entry {entry!r} is not an existing folder, "
                               f".txt list or image ({p})")
    kept = []
    for image in sorted(images):
        if _inside(image, real_root):
            kept.append(image)
        else:
            report.outside_root += 1
            log.warning("%s: leads outside the dataset root %s; image skipped", image, data.root)
    return kept, label_dirs


def _listed_images(list_file: Path, data: DataYaml, report: ReadReport, real_root: str) -> list[Path]:
    out = []
    text = list_file.read_text(encoding="utf-8-sig", errors="replace")
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or not _is_image(line):
            continue
        if line.startswith("./"):
            p = list_file.parent / line[2:]
        else:
            p = data.root / line  # an absolute line stays absolute
        p = Path(os.path.normpath(p))
        if not _inside(p, real_root):
            report.outside_root += 1
            log.warning("%s:%d: %s is outside the dataset root %s; skipped", list_file, lineno, line, data.root)
            continue
        if not p.is_file():
            report.missing_images += 1
            log.warning("%s:%d: image %s does not exist; skipped", list_file, lineno, p)
            if label_path_for(p).is_file():
                report.labels_without_image += 1
            continue
        out.append(p)
    return out


# ---------------------------------------------------------------- labels


def _parse_line(fields: list[str], nc: int, kpt_shape: tuple[int, int] | None) -> tuple[LabelBox | None, str, str]:
    """(box, reason key, message); box is None for a bad line."""
    n = len(fields)
    if kpt_shape is not None:
        expected = 5 + kpt_shape[0] * kpt_shape[1]
        if n != expected:
            return None, "field_count", f"expected {expected} values (class cx cy w h + keypoints), got {n}"
    elif n != 5 and (n < 7 or n % 2 == 0):
        return None, "field_count", f"expected 5 values (class cx cy w h) or a polygon, got {n}"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        bad = next(v for v in fields if not _is_float(v))
        return None, "non_numeric", f"non-numeric value {bad[:20]!r}"
    if not all(math.isfinite(v) for v in values):
        return None, "non_numeric", "non-finite value (nan or inf)"
    cls = values[0]
    if cls != int(cls) or not 0 <= cls < nc:
        return None, "class_out_of_range", f"class id {fields[0][:20]} not in 0..{nc - 1}"
    coords = values[1:5] if (kpt_shape is not None or n == 5) else values[1:]
    if any(v < 0.0 or v > 1.0 for v in coords):
        return None, "coordinates_out_of_range", "coordinates outside [0, 1]"
    if kpt_shape is not None or n == 5:
        cx, cy, w, h = coords
    else:  # polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    if w <= 0 or h <= 0:
        return None, "zero_size", "zero-size box"
    return LabelBox(int(cls), cx, cy, w, h, 0), "", ""


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_label_file(path: Path, nc: int, report: ReadReport, kpt_shape: tuple[int, int] | None = None) -> tuple[LabelBox, ...]:
    """Good boxes of one label file; each bad line is one warning ``path:line: reason; line skipped``."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    boxes = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        box, reason, message = _parse_line(fields, nc, kpt_shape)
        if box is None:
            report.bad_lines[reason] += 1
            log.warning("%s:%d: %s; line skipped", path, lineno, message)
            continue
        boxes.append(LabelBox(box.class_id, box.cx, box.cy, box.w, box.h, lineno))
    return tuple(boxes)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) after EXIF rotation, reading only the header; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:  # a broken EXIF block does not make the image unusable
                orientation = None
    except (OSError, UnidentifiedImageError, ValueError, ImportError):
        # ImportError: once Ultralytics is imported it patches Image.open to try an optional HEIF plugin
        # on files Pillow cannot identify, and raises ModuleNotFoundError when that plugin is absent.
        return None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (h, w) if w > 0 and h > 0 else None


# ---------------------------------------------------------------- attributes sidecar


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _attributes(image: Path, boxes: tuple[LabelBox, ...], size: tuple[int, int], names: Mapping[int, str],
                report: ReadReport) -> tuple[tuple[dict | None, ...], dict, Path | None]:
    """Match the sidecar's objects to the label boxes by class name and box (IoU >= 0.5, best first)."""
    side = label_path_for(image, "attributes", ".json")
    if side == image or not side.is_file():
        return (), {}, None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
        objects = data["objects"]
        if not isinstance(objects, list):
            raise TypeError("'objects' is not a list")
        candidates = [(o, [float(v) for v in o["xyxy"]]) for o in objects]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        report.bad_attribute_files += 1
        log.warning("%s: unusable attributes file (%s); attributes ignored", side, exc)
        return (), {}, None
    report.images_with_attributes += 1
    taken: set[int] = set()
    out: list[dict | None] = []
    for box in boxes:
        xyxy = box.xyxy(size)
        best, best_iou = None, 0.5
        for j, (obj, oxy) in enumerate(candidates):
            # A label class names the object's class, or its colour and class ("red circle": the shapes
            # world's colour-shape labels).
            if j in taken or names.get(box.class_id) not in (obj.get("class"), f"{obj.get('colour')} {obj.get('class')}"):
                continue
            iou = _box_iou(xyxy, oxy)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is None:
            out.append(None)
        else:
            taken.add(best)
            out.append(candidates[best][0])
    scene = {k: v for k, v in data.items() if k == "background" and isinstance(v, str)}
    return tuple(out), scene, side


# ---------------------------------------------------------------- a whole split


def read_split(data: DataYaml, split: str) -> tuple[list[ImageRecord], ReadReport]:
    """Every readable image of ``split`` with its good boxes, plus a report of what was skipped.

    A split without a single usable image is an :class:`EdgeVitError`, not an empty result.
    """
    report = ReadReport()
    images, label_dirs = _images_of_split(data, split, report)
    real_root = os.path.realpath(data.root)
    nc = len(data.names)
    records = []
    used_labels: set[Path] = set()
    for image in images:
        label = label_path_for(image)
        used_labels.add(label)
        size = _image_size(image)
        if size is None:
            report.unreadable_images += 1
            log.warning("%s: cannot read the image; skipped", image)
            continue
        boxes: tuple[LabelBox, ...] = ()
        label_path: Path | None = None
        if label.is_file():
            if not _inside(label, real_root):
                report.outside_root += 1
                log.warning("%s: leads outside the dataset root %s; image skipped", label, data.root)
                continue
            try:
                boxes = parse_label_file(label, nc, report, data.kpt_shape)
            except OSError as exc:
                report.unreadable_labels += 1
                log.warning("%s: cannot read the label file (%s); image skipped", label, exc.strerror or exc)
                continue
            label_path = label
        else:
            report.images_without_labels += 1
        attributes, scene, side = _attributes(image, boxes, size, data.names, report)
        records.append(ImageRecord(
            path=image, rel=Path(os.path.relpath(image, data.root)).as_posix(), image_size=size, boxes=boxes,
            label_path=label_path, file_size=image.stat().st_size, attributes=attributes, attributes_path=side,
            scene_attributes=scene,
        ))
        report.images += 1
        report.objects += len(boxes)
    orphans: set[Path] = set()
    for label_dir in label_dirs:
        for dirpath, _, files in os.walk(label_dir):
            orphans.update(Path(dirpath) / f for f in files if f.endswith(".txt"))
    for p in sorted(orphans - used_labels):
        report.labels_without_image += 1
        log.warning("%s: label file has no image; skipped", p)
    if not records:
        entries = ", ".join(_split_entries(data, split))
        raise EdgeVitError(f"{data.yaml_path}: split '{split}' ({entries}) has no usable images")
    return records, report


def dataset_hash(data: DataYaml, records: list[ImageRecord]) -> str:
    """sha256 over the class names and, per image, its relative path and byte size, its label and sidecar bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(data.names, sort_keys=True).encode())
    for r in sorted(records, key=lambda r: r.rel):
        h.update(f"\0{r.rel}\0{r.file_size}\0".encode())
        h.update(r.label_path.read_bytes() if r.label_path is not None else b"\0no-label")
        if r.attributes_path is not None:
            h.update(b"\0attributes\0" + r.attributes_path.read_bytes())
    return "sha256:" + h.hexdigest()
