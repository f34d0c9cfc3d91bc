"""The torch backend on tiny local Idefics3 and LLaVA models, loaded through the same path as hub models."""

import json
import threading

import numpy as np
import pytest

from edge_vit.errors import ModelLoadError, PromptTooLongError
from edge_vit.vlm import GenerationConfig, TilingPolicy, collect, load_vlm


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def vlm(request, tiny_idefics3, tiny_llava):
    path = tiny_idefics3 if request.param == "idefics3" else tiny_llava
    return load_vlm(str(path))


def test_greedy_tokens_match_transformers_generate(vlm, frame):
    """Our prefill/decode split (vision → embed/scatter → decoder with cache) equals HF generate, 32 tokens."""
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    ours = [s.token_id for s in vlm.generate(frame, "How many circles are there?", cfg) if not s.done]
    inputs = vlm._prepare(frame, "How many circles are there?")
    ref = vlm.model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_streamed_pieces_join_to_the_decoded_text(vlm, frame):
    cfg = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    steps = list(vlm.generate(frame, "Describe the scene.", cfg))
    assert steps[-1].done and not any(s.done for s in steps[:-1])
    ids = [s.token_id for s in steps[:-1]]
    text = "".join(s.text for s in steps[:-1])
    assert text.strip() == vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    stats = steps[-1].stats
    assert stats.new_tokens == 24 and stats.decode_steps == 23 and stats.finish_reason == "length"
    assert stats.ttft_ms > 0 and stats.decode_tok_s > 0 and stats.vision_ms > 0 and stats.prefill_ms > 0
    assert stats.image_tokens > 0 and stats.prompt_tokens > stats.image_tokens


def test_cancel_stops_at_next_token(vlm, frame):
    cancel = threading.Event()
    cancel.set()
    _, stats = collect(vlm.generate(frame, "Describe.", GenerationConfig(max_new_tokens=30, min_new_tokens=30), cancel))
    assert stats.finish_reason == "cancelled" and stats.new_tokens == 1


def test_prompt_longer_than_context_is_a_clear_error(vlm, frame):
    long_prompt = "red circle " * 400  # the tiny models have a 512-token context
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 512"):
        collect(vlm.generate(frame, long_prompt, GenerationConfig(max_new_tokens=8)))


def test_count_tokens_uses_the_model_tokenizer(vlm):
    assert vlm.count_tokens("") == 0
    assert vlm.count_tokens("two red circles at top-left") == len(
        vlm.tokenizer("two red circles at top-left", add_special_tokens=False)["input_ids"])


def test_tiling_policy_single_vs_split(tiny_idefics3, frame):
    single = load_vlm(str(tiny_idefics3), tiling=TilingPolicy.SINGLE)
    split = load_vlm(str(tiny_idefics3), tiling="split")
    _, s1 = collect(single.generate(frame, "hi", GenerationConfig(max_new_tokens=2)))
    _, s2 = collect(split.generate(frame, "hi", GenerationConfig(max_new_tokens=2)))
    assert s1.tiles == 1 and s1.image_tokens == 4
    assert s2.tiles == 5 and s2.image_tokens == 20  # 2x2 grid + global tile, as SmolVLM splits at scale


def test_single_tile_resizes_the_frame_once(tiny_idefics3):
    """SINGLE skips Idefics3's resize to `size` (an upscale the squash to one tile undoes): one resize,
    the same tile within a couple of grey levels, and a split processor keeps its resize."""
    from PIL import Image

    single = load_vlm(str(tiny_idefics3), tiling=TilingPolicy.SINGLE)
    split = load_vlm(str(tiny_idefics3), tiling="split")
    ip = single.processor.image_processor
    assert ip.do_resize is False and split.processor.image_processor.do_resize is True
    yy, xx = np.mgrid[0:150, 0:200]  # a smooth 200x150 frame; `size` would first take it to 128x96
    image = Image.fromarray(np.stack([xx, yy, 255 * ((xx // 25 + yy // 25) % 2)], -1).astype(np.uint8))
    once = ip(images=[image], return_tensors="np")["pixel_values"]
    ip.do_resize = True
    twice = ip(images=[image], return_tensors="np")["pixel_values"]
    direct = np.asarray(image.resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1
    assert once.shape == twice.shape == (1, 1, 3, 64, 64)
    assert np.abs(once[0, 0] - direct.transpose(2, 0, 1)).max() <= 2 / 127.5 + 1e-6  # frame -> tile, one step
    assert np.abs(once - twice).mean() < 0.02


def test_bfloat16_loads_and_generates(tiny_idefics3, frame):
    vlm = load_vlm(str(tiny_idefics3), dtype="bfloat16")
    text, stats = collect(vlm.generate(frame, "hi", GenerationConfig(max_new_tokens=4, min_new_tokens=4)))
    assert stats.new_tokens == 4 and isinstance(text, str)


def test_load_errors_are_one_line_and_name_what_was_expected(tmp_path, tiny_idefics3):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="expected a transformers model folder"):
        load_vlm(str(empty))
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError):
        load_vlm(str(a_file))
    with pytest.raises(ModelLoadError, match="not-a-real-org/not-a-model"):
        load_vlm("not-a-real-org/not-a-model")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model type 'bert' is not supported"):
        load_vlm(str(bert))
    for err in (ModelLoadError,):
        try:
            load_vlm(str(empty))
        except err as exc:
            assert "\n" not in str(exc)


def test_remote_code_is_off_by_default(tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_custom_vlm", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig"}}))
    (custom / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError):
        load_vlm(str(custom))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_cuda_gives_the_cpu_greedy_tokens(kind, tiny_idefics3, tiny_llava, frame, monkeypatch):
    """--device cuda: the same prefill/decode path on the GPU (fp32) gives the CPU's 24 greedy tokens."""
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 patch embedding, as on the CPU
    path = str(tiny_idefics3 if kind == "idefics3" else tiny_llava)
    cfg = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    tokens = {}
    for device in ("cpu", "cuda"):
        vlm = load_vlm(path, device=device)
        assert vlm.device.type == device
        tokens[device] = [s.token_id for s in vlm.generate(frame, "How many circles are there?", cfg) if not s.done]
    assert len(tokens["cuda"]) == 24 and tokens["cuda"] == tokens["cpu"]
