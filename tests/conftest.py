"""Shared fixtures: tiny models built locally once per session; the network is never used."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

from pathlib import Path

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_idefics3(models_dir) -> Path:
    from edge_vit.tiny import build_tiny_idefics3

    return build_tiny_idefics3(models_dir / "tiny-idefics3")


@pytest.fixture(scope="session")
def tiny_llava(models_dir) -> Path:
    from edge_vit.tiny import build_tiny_llava

    return build_tiny_llava(models_dir / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_yolo(models_dir) -> Path:
    from edge_vit.tiny import build_tiny_yolo

    return build_tiny_yolo(models_dir / "tiny-yolo26n.pt")


@pytest.fixture(scope="session")
def clip(models_dir) -> Path:
    from edge_vit.tiny import write_clip

    return write_clip(models_dir / "shapes.mp4", n_frames=40, width=160, height=120)

