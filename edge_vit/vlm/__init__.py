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
    provider: str | None = None,
    threads: int | None = None,
) -> VLM:
    """Load a VLM from a local folder or a cached hub id with the chosen backend.

    torch: a transformers model folder or hub id. onnx: the folder written by ``edge-vit export onnx``;
    ``provider`` (cpu, cuda, tensorrt) overrides the ONNX Runtime provider that ``device`` implies and
    ``threads`` sets its intra-op threads (default: one per physical core).
    """
    from edge_vit.errors import EdgeVitError

    backend = Backend(backend)
    if backend is Backend.TORCH:
        from edge_vit.vlm.torch_backend import TorchVLM

        return TorchVLM.load(model, device=device, dtype=dtype, tiling=tiling, trust_remote_code=trust_remote_code)
    if backend is Backend.ONNX:
        from edge_vit.vlm.onnx_backend import OnnxVLM, OrtConfig

        if dtype != "float32":
            raise EdgeVitError(f"the onnx backend runs the exported graphs as they are (float32); got dtype '{dtype}'")
        ort_config = OrtConfig.for_device(device, provider=provider, threads=threads)
        return OnnxVLM.load(model, ort_config=ort_config, tiling=tiling, trust_remote_code=trust_remote_code)
    if backend is Backend.TRT:
        from edge_vit.vlm.trt_backend import TrtVLM

        if not device.startswith("cuda") or dtype != "float32":
            raise EdgeVitError("the trt backend runs the engines of `edge-vit export trt` on a CUDA GPU at the precision "
                               f"they were built with: pass --device cuda and no --dtype (got '{device}', '{dtype}')")
        return TrtVLM.load(model, device=device, tiling=tiling, trust_remote_code=trust_remote_code)
    raise EdgeVitError(f"backend '{backend.value}' needs an exported model folder; it is not available in this build yet")


__all__ = ["Backend", "GenerationConfig", "GenerationStats", "Step", "TilingPolicy", "VLM", "collect", "load_vlm"]
