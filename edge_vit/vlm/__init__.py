"""VLM backends behind one interface: ``load_vlm(model, backend=...)`` returns an object with ``generate``."""

from __future__ import annotations

from enum import Enum

from edge_vit.vlm.base import GenerationConfig, GenerationStats, Step, TilingPolicy, VLM, collect


class Backend(str, Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TRT = "trt"


def load_vlm(
    model: str,
    backend: Backend = Backend.TORCH,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    tiling: TilingPolicy = TilingPolicy.SINGLE,
    trust_remote_code: bool = False,
) -> VLM:
    """Load a VLM from a local folder or a cached hub id with the chosen backend."""
    from edge_vit.errors import EdgeVitError

    backend = Backend(backend)
    if backend is Backend.TORCH:
        from edge_vit.vlm.torch_backend import TorchVLM

        return TorchVLM.load(model, device=device, dtype=dtype, tiling=tiling, trust_remote_code=trust_remote_code)
    raise EdgeVitError(f"backend '{backend.value}' needs an exported model folder; it is not available in this build yet")


__all__ = ["Backend", "GenerationConfig", "GenerationStats", "Step", "TilingPolicy", "VLM", "collect", "load_vlm"]
