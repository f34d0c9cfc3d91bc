"""The paths a user takes without edge-vit, measured so every product figure has a ratio beside it.

- VLM: ``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained`` in fp32, PyTorch eager mode (no
  compile, transformers' default attention), the model's DEFAULT processor settings (SmolVLM splits a 512x512
  frame into 17 tiles of 512 px), and ``model.generate(..., max_new_tokens=N, min_new_tokens=N)``. The first
  token's time comes from a streamer passed to ``generate`` (it is called once with the prompt, then per token).
- Detector: ``YOLO(path).predict(frame)`` in PyTorch at the same image size.

These are the only places in the suite that do not go through edge-vit's own code; they exist to be compared
against it.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from benchmarks.measure import summarize


class _TimingStreamer:
    """A ``generate`` streamer that only records when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def vlm_generate_baseline(model_dir: str, frames: list[np.ndarray], instruction: str, new_tokens: int,
                          warmup: int, iterations: int, device: str = "cpu") -> tuple[dict, object]:
    """Stage samples of transformers ``generate`` with default settings; returns (result, model) — the model for
    the roofline's weight bytes. ``frames`` are BGR, as edge-vit receives them; converting to PIL is counted."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t_load = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    load_ms = (time.perf_counter() - t_load) * 1000
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    samples: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = {}
    for i in range(warmup + iterations):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        image = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
        inputs = processor(text=text, images=[image], return_tensors="pt").to(device)
        t1 = time.perf_counter()
        streamer = _TimingStreamer()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 streamer=streamer)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i < warmup:
            continue
        stamps = streamer.stamps
        first = stamps[0] if stamps else t2
        samples["preprocess"].append((t1 - t0) * 1000)
        samples["vision_prefill"].append((first - t1) * 1000)
        samples["ttft"].append((first - t0) * 1000)
        samples["decode"].append((t2 - first) * 1000)
        samples["vlm_total"].append((t2 - t0) * 1000)
        samples["answer"].append((t2 - t0) * 1000)
        if len(stamps) > 1:
            samples["decode_tok_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            samples["itl"].extend((np.diff(stamps) * 1000).tolist())
        pixels = inputs["pixel_values"]
        counts = {
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "image_tokens": int((inputs["input_ids"] == _image_token_id(model)).sum()),
            "tiles": int(pixels.shape[1]) if pixels.ndim == 5 else int(pixels.shape[0]),
            "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
        }
    splitting = getattr(getattr(processor, "image_processor", None), "do_image_splitting", None)
    result = {
        "stages": {name: summarize(values) for name, values in samples.items()},
        "tokens": counts,
        "load_ms": round(load_ms, 1),
        "settings": {"dtype": "float32", "attn_implementation": getattr(model.config, "_attn_implementation", None),
                     "processor_image_splitting": splitting, "generate": "greedy, min_new_tokens = max_new_tokens"},
    }
    return result, model


def _image_token_id(model) -> int:
    config = model.config
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def yolo_predict_baseline(pt_path: str, frames: list[np.ndarray], imgsz: int, warmup: int, iterations: int,
                          device: str = "cpu") -> dict:
    """Wall time of ``YOLO(pt).predict(frame)`` per frame, with Ultralytics' own pre/infer/post split."""
    from ultralytics import YOLO

    model = YOLO(pt_path)
    samples: dict[str, list[float]] = defaultdict(list)
    for i in range(warmup + iterations):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        result = model.predict(frame, imgsz=imgsz, device=device, verbose=False)[0]
        t1 = time.perf_counter()
        if i < warmup:
            continue
        speed = result.speed or {}
        samples["detect_pre"].append(float(speed.get("preprocess") or 0.0))
        samples["detect_infer"].append(float(speed.get("inference") or 0.0))
        samples["detect_post"].append(float(speed.get("postprocess") or 0.0))
        samples["detect"].append((t1 - t0) * 1000)
    return {"stages": {name: summarize(values) for name, values in samples.items()}}
