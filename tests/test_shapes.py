"""The shapes world: determinism, exact boxes and attributes, the YOLO layout, clips, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_vit.errors import EdgeVitError
from edge_vit.grounding import PositionStyle, describe_position
from finetune import shapes
from finetune.shapes import COLOURS, SHAPE_CLASSES, ShapesConfig, generate_shapes, render_scene, size_word

SMALL = ShapesConfig(images=12, imgsz=160, seed=7, clips=1, clip_frames=8)


def _digests(root: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


def _decoded_frames(path: Path) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    generate_shapes(out, SMALL)
    return out


def test_same_seed_same_bytes(dataset, tmp_path):
    again = tmp_path / "again"
    generate_shapes(again, SMALL)
    for pattern in ("images/**/*.png", "labels/**/*.txt", "attributes/**/*.json", "clips/*.jsonl"):
        first, second = _digests(dataset, pattern), _digests(again, pattern)
        assert first and first == second, pattern
    # Video: compare what a reader sees (container bytes may legitimately differ between encoder builds).
    a, b = _decoded_frames(dataset / "clips/clip_000.mp4"), _decoded_frames(again / "clips/clip_000.mp4")
    assert len(a) == len(b) == SMALL.clip_frames
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

    other = tmp_path / "other"
    generate_shapes(other, ShapesConfig(images=12, imgsz=160, seed=8))
    assert _digests(other, "images/**/*.png") != _digests(dataset, "images/**/*.png")


def test_an_image_does_not_depend_on_how_many_are_made(dataset, tmp_path):
    more = tmp_path / "more"
    generate_shapes(more, ShapesConfig(images=30, imgsz=160, seed=7))
    for rel in ("images/train/000000.png", "labels/train/000005.txt", "images/val/000001.png"):
        assert (more / rel).read_bytes() == (dataset / rel).read_bytes(), rel


def test_layout_and_data_yaml(dataset):
    data = yaml.safe_load((dataset / "data.yaml").read_text())
    assert data["path"] == str(dataset)
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    assert data["names"] == dict(enumerate(SHAPE_CLASSES)) and len(SHAPE_CLASSES) >= 4
    sizes = SMALL.split_sizes()
    assert sizes == {"train": 9, "val": 2, "test": 1}
    for split, n in sizes.items():
        assert len(list((dataset / "images" / split).glob("*.png"))) == n
        assert len(list((dataset / "labels" / split).glob("*.txt"))) == n
        assert len(list((dataset / "attributes" / split).glob("*.json"))) == n
    meta = json.loads((dataset / "shapes.json").read_text())
    assert meta["generator"] == shapes.GENERATOR_VERSION and meta["images"] == sizes


def test_labels_agree_with_attributes_and_the_runtime_grid(dataset):
    import cv2

    n_objects = 0
    for attr_path in sorted(dataset.glob("attributes/*/*.json")):
        attrs = json.loads(attr_path.read_text())
        image = cv2.imread(str(dataset / attrs["image"]))
        h, w = image.shape[:2]
        assert [h, w] == attrs["image_size"]
        label = dataset / attrs["image"].replace("images/", "labels/", 1).replace(".png", ".txt")
        rows = [line.split() for line in label.read_text().splitlines()]
        objects = attrs["objects"]
        assert len(rows) == len(objects) <= 6
        n_objects += len(objects)
        for row, obj in zip(rows, objects):
            cid, cx, cy, bw, bh = int(row[0]), *map(float, row[1:])
            x1, y1, x2, y2 = obj["xyxy"]
            assert SHAPE_CLASSES[cid] == obj["class"] and cid == obj["class_id"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert cx == pytest.approx((x1 + x2) / 2 / w, abs=1e-6) and bw == pytest.approx((x2 - x1) / w, abs=1e-6)
            assert cy == pytest.approx((y1 + y2) / 2 / h, abs=1e-6) and bh == pytest.approx((y2 - y1) / h, abs=1e-6)
            assert obj["colour"] in COLOURS and obj["size"] == size_word(obj["xyxy"], (h, w))
            # The position word survives the round trip through the normalized label (what instruct reads).
            from_label = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            assert obj["position"] == describe_position(from_label, (h, w), PositionStyle.WORDS)
        for i in range(len(objects)):
            for j in range(i):
                assert shapes._iou(objects[i]["xyxy"], objects[j]["xyxy"]) < 0.3
    assert n_objects > 0


def test_scenes_cover_counts_sizes_backgrounds_and_empty_images():
    seen_counts, seen_sizes, seen_backgrounds, seen_classes, seen_colours = set(), set(), set(), set(), set()
    for i in range(60):
        scene = render_scene(np.random.default_rng(i), imgsz=96)
        seen_counts.add(len(scene.objects))
        seen_backgrounds.add(scene.background)
        seen_sizes.update(o.size for o in scene.objects)
        seen_classes.update(o.class_name for o in scene.objects)
        seen_colours.update(o.colour for o in scene.objects)
    assert 0 in seen_counts and max(seen_counts) >= 5
    assert seen_sizes == {"small", "medium", "large"}
    assert seen_backgrounds == set(shapes.BACKGROUNDS)
    assert seen_classes == set(SHAPE_CLASSES) and seen_colours == set(COLOURS)


def _clean_scenes(n_wanted: int, imgsz: int = 96):
    """Scenes on a flat background without blur or noise: every pixel outside the shapes is the background."""
    found = []
    for seed in range(2000):
        scene = render_scene(np.random.default_rng(seed), imgsz=imgsz, min_objects=1, max_objects=3)
        if scene.background == "flat" and scene.blur_sigma == 0 and scene.noise_std == 0:
            found.append(scene)
            if len(found) == n_wanted:
                break
    return found


def test_boxes_are_the_exact_extent_and_colours_match_the_pixels():
    palette = np.array([COLOURS[c][::-1] for c in COLOURS], np.int32)  # BGR
    names = list(COLOURS)
    scenes = _clean_scenes(4)
    assert len(scenes) == 4
    for scene in scenes:
        img = scene.image.astype(np.int32)
        background = img[0, 0]
        shape_pixels = np.any(img != background, axis=2)
        inside = np.zeros_like(shape_pixels)
        for o in scene.objects:
            x1, y1, x2, y2 = o.xyxy
            inside[y1:y2, x1:x2] = True
            # Tight: each edge row/column of the box holds a shape pixel.
            box = shape_pixels[y1:y2, x1:x2]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            # The colour word is what the pixels show: many pixels of the box are nearest to that palette colour.
            crop = img[y1:y2, x1:x2].reshape(-1, 1, 3)
            dist = np.abs(crop - palette[None]).sum(axis=2)
            nearest = np.array(names)[dist.argmin(axis=1)]
            close = dist.min(axis=1) < 80
            assert np.mean(close & (nearest == o.colour)) > 0.15, (o, scene.background)
        assert not (shape_pixels & ~inside).any()


def test_clip_ground_truth(dataset):
    clip = dataset / "clips/clip_000.mp4"
    lines = [json.loads(line) for line in clip.with_suffix(".jsonl").read_text().splitlines()]
    assert [row["frame"] for row in lines] == list(range(SMALL.clip_frames))
    h, w = lines[0]["image_size"]
    assert (w, h) == (160, 120)
    tracks = {}
    for row in lines:
        assert row["objects"], "every clip has shapes"
        for o in row["objects"]:
            assert {"class", "colour", "xyxy", "track_id", "size", "position"} <= set(o)
            x1, y1, x2, y2 = o["xyxy"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # The truth's size word is the one the grounding writes for the same box (GroundingConfig.size_words).
            assert o["size"] == size_word(o["xyxy"], (h, w))
            tracks.setdefault(o["track_id"], []).append(tuple(o["xyxy"]))
    assert any(len(set(boxes)) > 1 for boxes in tracks.values()), "shapes move"
    frames = _decoded_frames(clip)
    assert len(frames) == SMALL.clip_frames and frames[0].shape == (h, w, 3)
    rendered, _ = next(shapes.render_clip(shapes._clip_rng(SMALL.seed, 0), 1, w, h))
    assert np.abs(frames[0].astype(int) - rendered.astype(int)).mean() < 8  # lossy codec, same picture


def test_config_is_checked():
    with pytest.raises(EdgeVitError):
        ShapesConfig(images=0)
    with pytest.raises(EdgeVitError):
        ShapesConfig(imgsz=32)
    with pytest.raises(EdgeVitError):
        ShapesConfig(min_objects=4, max_objects=2)
    with pytest.raises(EdgeVitError):
        ShapesConfig(images=2, val_fraction=0.5, test_fraction=0.5).split_sizes()
    assert ShapesConfig(images=1).split_sizes() == {"train": 1, "val": 0, "test": 0}


def test_cli_shapes_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    from edge_vit.cli import main

    out = tmp_path / "cli"
    args = ["finetune", "shapes", "--out", str(out), "--images", "4", "--seed", "1", "--imgsz", "96"]
    assert main(args) == 0
    assert "images/s" in capsys.readouterr().err
    assert len(list(out.glob("images/*/*.png"))) == 4
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "\n" not in err
    assert main(args + ["--overwrite", "--images", "3"]) == 0
    assert len(list(out.glob("images/*/*.png"))) == 3, "stale images of the earlier run are gone"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user file")
    assert main(["finetune", "shapes", "--out", str(tmp_path / "other"), "--images", "2", "--overwrite"]) == 2
    assert (tmp_path / "other" / "keep.txt").exists()


def test_ultralytics_reads_the_dataset(dataset, tmp_path):
    """The next step trains YOLO on it: Ultralytics' own loader must see every box."""
    import shutil

    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    copy = tmp_path / "copy"  # Ultralytics writes label caches; keep the shared fixture clean
    shutil.copytree(dataset, copy)
    (copy / "data.yaml").write_text((dataset / "data.yaml").read_text().replace(str(dataset), str(copy)))
    data = check_det_dataset(str(copy / "data.yaml"))
    ds = YOLODataset(img_path=data["train"], data=data, imgsz=160, augment=False)
    ours = sum(len(json.loads(p.read_text())["objects"]) for p in copy.glob("attributes/train/*.json"))
    assert len(ds.labels) == SMALL.split_sizes()["train"]
    assert sum(len(lb["cls"]) for lb in ds.labels) == ours


def test_colour_shape_labels(tmp_path):
    """The colour-shape scheme: 30 classes "<colour> <shape>", each label's id naming its object's colour and shape."""
    from finetune.shapes import class_names, label_class_id, label_scheme

    names = class_names("colour-shape")
    assert len(names) == len(COLOURS) * len(SHAPE_CLASSES) == len(set(names))
    assert label_scheme(dict(enumerate(names))) == "colour-shape" and label_scheme(list(SHAPE_CLASSES)) == "shape"
    out = tmp_path / "cs"
    generate_shapes(out, ShapesConfig(images=8, imgsz=128, seed=5, labels="colour-shape"))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert list(data["names"].values()) == list(names)
    seen = 0
    for attr_path in sorted(out.glob("attributes/*/*.json")):
        objects = json.loads(attr_path.read_text())["objects"]
        label = out / "labels" / attr_path.parent.name / attr_path.with_suffix(".txt").name
        ids = [int(line.split()[0]) for line in label.read_text().splitlines()]
        assert [names[i] for i in ids] == [f"{o['colour']} {o['class']}" for o in objects]
        assert ids == [label_class_id(o["class"], o["colour"], "colour-shape") for o in objects]
        seen += len(ids)
    assert seen > 0
    # Same images as the shape scheme: only the label ids differ.
    generate_shapes(tmp_path / "s", ShapesConfig(images=8, imgsz=128, seed=5))
    assert (out / "images/train/000000.png").read_bytes() == (tmp_path / "s/images/train/000000.png").read_bytes()
    with pytest.raises(EdgeVitError, match="labels"):
        ShapesConfig(labels="colour")
