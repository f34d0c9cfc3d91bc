"""The ONNX Runtime backend on exported tiny Idefics3 and LLaVA models: same tokens, text and stats as torch."""

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_vit.errors import EdgeVitError, ModelLoadError, PromptTooLongError
from edge_vit.vlm import Backend, GenerationConfig, TilingPolicy, collect, load_vlm
from edge_vit.vlm.onnx_backend import ExecutionProvider, OnnxVLM, OrtConfig, provider_list
from export import io_spec
from export.onnx_export import export_vlm_onnx

PROMPT = "How many circles are there?"


@pytest.fixture(scope="module")
def frame():
    return np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folders(tiny_idefics3, tiny_llava, tmp_path_factory):
    """model kind -> (source model folder, export folder)."""
    out = {}
    for kind, source in (("idefics3", tiny_idefics3), ("llava", tiny_llava)):
        folder = tmp_path_factory.mktemp(f"vlm-onnx-{kind}")
        export_vlm_onnx(source, folder)
        out[kind] = (str(source), str(folder))
    return out


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def pair(request, folders):
    """(torch VLM, onnx VLM) of the same model."""
    source, folder = folders[request.param]
    return load_vlm(source, Backend.TORCH), load_vlm(folder, Backend.ONNX, threads=2)


def _tokens(vlm, frame, cfg, prompt=PROMPT):
    return [s.token_id for s in vlm.generate(frame, prompt, cfg) if not s.done]


def test_32_greedy_tokens_identical_to_torch(pair, frame):
    torch_vlm, onnx_vlm = pair
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    ours = _tokens(onnx_vlm, frame, cfg)
    assert len(ours) == 32 and ours == _tokens(torch_vlm, frame, cfg)


def test_load_vlm_streams_the_same_text_as_torch(pair, frame):
    torch_vlm, onnx_vlm = pair
    cfg = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    t_steps = list(torch_vlm.generate(frame, "Describe the scene.", cfg))
    o_steps = list(onnx_vlm.generate(frame, "Describe the scene.", cfg))
    assert [s.text for s in o_steps[:-1]] == [s.text for s in t_steps[:-1]]
    assert "".join(s.text for s in o_steps[:-1]).strip() == collect(iter(t_steps))[0]
    t_stats, o_stats = t_steps[-1].stats, o_steps[-1].stats
    for key in ("prompt_tokens", "image_tokens", "tiles", "new_tokens", "decode_steps", "finish_reason"):
        assert getattr(o_stats, key) == getattr(t_stats, key), key
    assert o_stats.new_tokens == 24 and o_stats.decode_steps == 23 and o_stats.finish_reason == "length"
    assert o_stats.ttft_ms > 0 and o_stats.decode_tok_s > 0 and o_stats.vision_ms > 0 and o_stats.prefill_ms > 0


def test_eos_stops_like_torch(pair, frame):
    torch_vlm, onnx_vlm = pair
    cfg = GenerationConfig(max_new_tokens=48)  # stop tokens allowed: both end at the same place
    t_text, t_stats = collect(torch_vlm.generate(frame, PROMPT, cfg))
    o_text, o_stats = collect(onnx_vlm.generate(frame, PROMPT, cfg))
    assert (o_text, o_stats.new_tokens, o_stats.finish_reason) == (t_text, t_stats.new_tokens, t_stats.finish_reason)


def test_attributes_and_count_tokens(pair):
    torch_vlm, onnx_vlm = pair
    assert onnx_vlm.max_context == torch_vlm.max_context == 512
    assert Path(onnx_vlm.name).is_dir() and onnx_vlm.providers == ["CPUExecutionProvider"]
    for text in ("", "two red circles at top-left"):
        assert onnx_vlm.count_tokens(text) == torch_vlm.count_tokens(text)


def test_cancel_and_prompt_too_long(pair, frame):
    _, onnx_vlm = pair
    cancel = threading.Event()
    cancel.set()
    _, stats = collect(onnx_vlm.generate(frame, "Describe.", GenerationConfig(max_new_tokens=30, min_new_tokens=30),
                                         cancel))
    assert stats.finish_reason == "cancelled" and stats.new_tokens == 1
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 512"):
        collect(onnx_vlm.generate(frame, "red circle " * 400, GenerationConfig(max_new_tokens=8)))


def test_split_tiling_runs_five_tiles_like_torch(folders, frame):
    source, folder = folders["idefics3"]
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    torch_vlm = load_vlm(source, tiling=TilingPolicy.SPLIT)
    onnx_vlm = load_vlm(folder, Backend.ONNX, tiling=TilingPolicy.SPLIT)
    steps = list(onnx_vlm.generate(frame, PROMPT, cfg))
    assert [s.token_id for s in steps[:-1]] == _tokens(torch_vlm, frame, cfg)
    assert steps[-1].stats.tiles == 5 and steps[-1].stats.image_tokens == 20


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_io_binding_path_gives_the_same_tokens(kind, folders, frame):
    """The IO-binding decoder (the CUDA path) run on CPU: same tokens as plain ``run``."""
    _, folder = folders[kind]
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    plain = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, io_binding=False))
    bound = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, io_binding=True))
    assert type(bound.decoder).__name__ == "_BoundDecoder" and type(plain.decoder).__name__ == "_PlainDecoder"
    assert _tokens(bound, frame, cfg) == _tokens(plain, frame, cfg)


def test_session_options_threads_and_optimization(folders):
    import onnxruntime as ort

    vlm = OnnxVLM.load(folders["llava"][1], ort_config=OrtConfig(threads=1))
    for session in (vlm.vision, vlm.embed, vlm.decoder.session):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # two threads: the embedding lookup keeps one; only the decoder (once per token) spins between runs
    vlm = OnnxVLM.load(folders["llava"][1], ort_config=OrtConfig(threads=2))
    assert vlm.embed.get_session_options().intra_op_num_threads == 1
    assert vlm.vision.get_session_options().intra_op_num_threads == 2

    def stops_spinning(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        except Exception:  # not set
            return False

    assert stops_spinning(vlm.vision) and stops_spinning(vlm.embed) and not stops_spinning(vlm.decoder.session)


def test_folder_without_graphs_says_to_export_first(tiny_idefics3, tmp_path):
    for folder in (tiny_idefics3, tmp_path / "missing"):
        with pytest.raises(ModelLoadError, match="run `edge-vit export onnx") as info:
            load_vlm(str(folder), Backend.ONNX)
        assert "\n" not in str(info.value)


def test_folder_without_manifest_is_an_unfinished_export(folders, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(folders["llava"][1], copy)
    (copy / io_spec.MANIFEST).unlink()
    with pytest.raises(ModelLoadError, match="did not finish"):
        load_vlm(str(copy), Backend.ONNX)


@pytest.mark.parametrize("device, provider", [("cuda", None), ("cpu", "tensorrt"), ("cuda:1", "cuda")])
def test_unavailable_provider_is_one_line_naming_the_install(device, provider, folders):
    import onnxruntime as ort

    wanted = OrtConfig.for_device(device, provider=provider).provider
    if {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[wanted.value] in \
            ort.get_available_providers():
        pytest.skip("this onnxruntime has the provider")
    with pytest.raises(EdgeVitError, match=r"pip install edge-vit\[gpu\]") as info:
        load_vlm(folders["llava"][1], Backend.ONNX, device=device, provider=provider)
    assert "\n" not in str(info.value) and wanted.value in str(info.value)


def test_provider_lists():
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(OrtConfig(), every) == ["CPUExecutionProvider"]
    assert provider_list(OrtConfig.for_device("cuda:1"), every) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    trt = OrtConfig.for_device("cuda", provider="tensorrt")
    assert trt.provider is ExecutionProvider.TENSORRT and trt.uses_io_binding
    assert [p[0] if isinstance(p, tuple) else p for p in provider_list(trt, every)] == every
    assert not OrtConfig().uses_io_binding
    with pytest.raises(EdgeVitError, match="device must be"):
        OrtConfig.for_device("mps")


def test_onnx_backend_rejects_a_torch_dtype(folders):
    with pytest.raises(EdgeVitError, match="float32"):
        load_vlm(folders["llava"][1], Backend.ONNX, dtype="bfloat16")


def test_importing_the_onnx_backend_pulls_no_torch_or_optimum():
    code = ("import sys, edge_vit, edge_vit.vlm, edge_vit.vlm.onnx_backend, export.io_spec; "
            "bad = [m for m in ('torch', 'optimum', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- shared KV buffer (GroupQueryAttention graphs)


@pytest.fixture(scope="module")
def optimized(folders, tmp_path_factory):
    """variant -> the tiny Idefics3 export optimized: "fused" (fp32 GQA) and "int8" (GQA + MatMulNBits)."""
    from export.optimize import OptimizeOptions, Quantization, optimize_onnx_folder

    _, folder = folders["idefics3"]
    options = {"fused": OptimizeOptions(validate=False),
               "int8": OptimizeOptions(quantize=Quantization.INT8, quantize_vision=False, validate=False)}
    return {name: str(optimize_onnx_folder(folder, tmp_path_factory.mktemp(f"vlm-onnx-{name}"), opts).out_dir)
            for name, opts in options.items()}


def _decoder_kind(vlm):
    return type(vlm.decoder).__name__


def test_shared_kv_buffer_is_chosen_for_gqa_graphs_only(folders, optimized):
    from edge_vit.vlm.onnx_backend import uses_group_query_attention

    for folder in optimized.values():
        vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
        assert _decoder_kind(vlm) == "_SharedKVDecoder" and uses_group_query_attention(vlm.manifest)
        assert _decoder_kind(load_vlm(folder, Backend.ONNX, threads=1)) == "_SharedKVDecoder"  # the product path
        off = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, share_kv_buffer=False))
        assert _decoder_kind(off) == "_PlainDecoder"
    for kind in ("idefics3", "llava"):  # plain exports: standard attention with a growing KV Concat
        folder = folders[kind][1]
        vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
        assert _decoder_kind(vlm) == "_PlainDecoder" and not uses_group_query_attention(vlm.manifest)
        assert _decoder_kind(OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, io_binding=True))) == "_BoundDecoder"
        with pytest.raises(EdgeVitError, match="GroupQueryAttention") as info:
            OnnxVLM.load(folder, ort_config=OrtConfig(share_kv_buffer=True))
        assert "\n" not in str(info.value)
    # a decoder fused only partly still concatenates some layers' caches: not shareable
    partial = {"decoder": {"num_layers": 2}, "optimization": {"fusions": {"GroupQueryAttention": 1}}}
    assert not uses_group_query_attention(partial)


@pytest.mark.parametrize("variant", ["fused", "int8"])
def test_shared_kv_buffer_gives_the_same_32_greedy_tokens(variant, folders, optimized, frame):
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    folder = optimized[variant]
    shared = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
    plain = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, share_kv_buffer=False))
    bound = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, io_binding=True, share_kv_buffer=False))
    assert (_decoder_kind(shared), _decoder_kind(plain), _decoder_kind(bound)) == (
        "_SharedKVDecoder", "_PlainDecoder", "_BoundDecoder")
    ours = _tokens(shared, frame, cfg)
    assert len(ours) == 32 and ours == _tokens(plain, frame, cfg) == _tokens(bound, frame, cfg)
    if variant == "fused":  # fp32 GQA: the same tokens as torch, as the growing-cache path gives
        assert ours == _tokens(load_vlm(folders["idefics3"][0], Backend.TORCH), frame, cfg)


def test_shared_kv_buffer_is_written_in_place_with_the_same_logits(optimized):
    """Logits of prefill + decode steps equal the growing path's; GQA fills the bound buffers, nothing else."""
    shared = OnnxVLM.load(optimized["fused"], ort_config=OrtConfig(threads=1))
    plain = OnnxVLM.load(optimized["fused"], ort_config=OrtConfig(threads=1, share_kv_buffer=False))
    hidden = shared.manifest["decoder"]["hidden_size"]
    embeds = np.random.default_rng(0).standard_normal((1, 12, hidden), dtype=np.float32)
    ones = np.ones((1, 16), np.int64)
    s_cache, p_cache = shared.decoder.new_cache(16), plain.decoder.new_cache(16)
    buffers = dict(s_cache.past)
    for seq, start in ((9, 0), (1, 9), (1, 10), (1, 11)):  # prefill, then decode steps
        step = embeds[:, start:start + seq]
        a = shared.decoder.run(s_cache, step, ones[:, : start + seq])
        b = plain.decoder.run(p_cache, step, ones[:, : start + seq])
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-5
    assert s_cache.length == 12 and s_cache.capacity == 16
    for name, value in s_cache.past.items():
        assert value is buffers[name]  # still the buffer allocated up front
        kv = value.numpy()  # [1, H_kv, 16, Dh]; the CPU OrtValue shares the numpy memory
        assert kv.shape[2] == 16
        np.testing.assert_allclose(kv[:, :, :12], p_cache.past[name], atol=1e-5)
        assert not np.any(kv[:, :, 12:])  # not yet written


def test_prefill_graph_runs_the_prompt_and_fills_the_same_kv_buffers(optimized):
    """The int8 variant's prompt goes through decoder_prefill.onnx on every decoder path; the decode steps
    after it read the cache it wrote."""
    folder = optimized["int8"]
    vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
    prefill = vlm.decoder.prefill
    assert prefill is not None
    assert OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, prefill_graph=False)).decoder.prefill is None
    hidden = vlm.manifest["decoder"]["hidden_size"]
    embeds = np.random.default_rng(0).standard_normal((1, 10, hidden), dtype=np.float32)
    ones = np.ones((1, 10), np.int64)
    # the prefill graph alone: its last-position logits and the cache it returns
    dec = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1)).decoder
    empty = np.zeros((1, dec.kv_heads, 0, dec.head_dim), np.float32)
    feeds = {"inputs_embeds": embeds[:, :9], "attention_mask": ones[:, :9],
             "position_ids": np.arange(9, dtype=np.int64)[None], **{n: empty for n in dec.past_names}}
    want = prefill.run(None, feeds)
    assert want[0].shape[:2] == (1, 1)  # last-token logits
    for config in (OrtConfig(threads=1), OrtConfig(threads=1, share_kv_buffer=False),
                   OrtConfig(threads=1, share_kv_buffer=False, io_binding=True)):
        decoder = OnnxVLM.load(folder, ort_config=config).decoder
        cache = decoder.new_cache(10)
        np.testing.assert_allclose(decoder.run(cache, embeds[:, :9], ones[:, :9]), want[0][0, -1], atol=1e-6)
        for name, kv in zip(decoder.past_names, want[1:]):
            value = cache.past[name]
            got = value if isinstance(value, np.ndarray) else value.numpy()
            np.testing.assert_allclose(got[:, :, :9], kv, atol=1e-6)
        step = decoder.run(cache, embeds[:, 9:], ones)  # a decode step on the decode graph, from that cache
        assert step.shape == want[0][0, -1].shape and np.isfinite(step).all()
        if config.share_kv_buffer is None:
            shared_step = step
        else:
            np.testing.assert_allclose(step, shared_step, atol=1e-5)
    with pytest.raises(EdgeVitError, match="no decoder_prefill.onnx") as info:
        OnnxVLM.load(optimized["fused"], ort_config=OrtConfig(prefill_graph=True))
    assert "\n" not in str(info.value)


def test_shared_kv_buffer_runs_to_the_end_of_the_context_and_errors_past_it(optimized, frame):
    folder = optimized["fused"]
    shared = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
    plain = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1, share_kv_buffer=False))
    prompt_tokens = collect(shared.generate(frame, PROMPT, GenerationConfig(max_new_tokens=1)))[1].prompt_tokens
    n = shared.max_context - prompt_tokens  # the last new token fills the model's context exactly
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    ours = _tokens(shared, frame, cfg)
    assert len(ours) == n and ours == _tokens(plain, frame, cfg)
    # driven directly: a full buffer refuses the next position with a clear error instead of writing past it
    decoder = shared.decoder
    hidden = shared.manifest["decoder"]["hidden_size"]
    cache = decoder.new_cache(4)
    ones = np.ones((1, 5), np.int64)
    decoder.run(cache, np.zeros((1, 3, hidden), np.float32), ones[:, :3])
    decoder.run(cache, np.zeros((1, 1, hidden), np.float32), ones[:, :4])
    with pytest.raises(RuntimeError, match="KV cache full: 4 \\+ 1 positions exceed the 4"):
        decoder.run(cache, np.zeros((1, 1, hidden), np.float32), ones[:, :5])
    assert decoder.new_cache(10**6).capacity == shared.max_context == decoder.max_positions  # capped


def _decoders(folder):
    """The three decoder paths of one folder: shared KV buffer (GQA graphs only), growing cache, IO binding."""
    configs = [OrtConfig(threads=1, share_kv_buffer=False), OrtConfig(threads=1, io_binding=True, share_kv_buffer=False)]
    vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
    extra = [vlm] if _decoder_kind(vlm) == "_SharedKVDecoder" else []
    return extra + [OnnxVLM.load(folder, ort_config=c) for c in configs]


@pytest.mark.parametrize("variant", ["fused", "plain"])
def test_a_draft_is_verified_in_one_pass_and_its_rejected_rest_discarded(variant, folders, optimized):
    """run_rows over 5 tokens = 5 decode steps' logits; after discard(3) the next step equals the step of a
    cache that never saw those 3 positions, on every decoder path."""
    folder = optimized["fused"] if variant == "fused" else folders["idefics3"][1]
    hidden = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1)).manifest["decoder"]["hidden_size"]
    embeds = np.random.default_rng(4).standard_normal((1, 16, hidden), dtype=np.float32)
    ones = np.ones((1, 20), np.int64)
    for vlm in _decoders(folder):
        decoder = vlm.decoder
        one_by_one = decoder.new_cache(20)
        decoder.run(one_by_one, embeds[:, :9], ones[:, :9])
        want = np.stack([decoder.run(one_by_one, embeds[:, i:i + 1], ones[:, : i + 1]) for i in range(9, 14)])
        cache = decoder.new_cache(20)
        decoder.run(cache, embeds[:, :9], ones[:, :9])
        rows = decoder.run_rows(cache, embeds[:, 9:14], ones[:, :14])
        assert rows.shape == want.shape and float(np.abs(rows - want).max()) <= 1e-4, _decoder_kind(vlm)
        decoder.discard(cache, 3)  # keep 2 of the 5
        assert cache.length == 11
        got = decoder.run(cache, embeds[:, 15:16], ones[:, :12])
        fresh = decoder.new_cache(20)
        decoder.run(fresh, embeds[:, :11], ones[:, :11])
        expected = decoder.run(fresh, embeds[:, 15:16], ones[:, :12])
        assert float(np.abs(got - expected).max()) <= 1e-4, _decoder_kind(vlm)


@pytest.mark.parametrize("variant", ["fused", "int8", "plain"])
def test_lookup_gives_the_same_tokens_on_every_decoder_path(variant, folders, optimized, frame):
    folder = folders["idefics3"][1] if variant == "plain" else optimized[variant]
    prompt = "Describe the scene. Describe the scene. Describe the scene."
    cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    lookup = GenerationConfig(max_new_tokens=32, min_new_tokens=32, lookup_tokens=6)
    accepted = 0
    for vlm in _decoders(folder):
        want = _tokens(vlm, frame, cfg, prompt)
        steps = list(vlm.generate(frame, prompt, lookup))
        stats = steps[-1].stats
        assert [s.token_id for s in steps[:-1]] == want, _decoder_kind(vlm)
        assert stats.decode_tokens == 31 == stats.decode_steps + stats.accepted_tokens
        accepted += stats.accepted_tokens
    assert accepted > 0  # the repeated prompt gets the tiny model to repeat itself: drafts were taken
    if variant == "fused":  # fp32: the same tokens as the torch backend with lookup
        torch_vlm = load_vlm(folders["idefics3"][0], Backend.TORCH)
        assert _tokens(torch_vlm, frame, lookup, prompt) == want


def test_a_decode_graph_with_one_logits_row_decodes_without_lookup(folders, frame, tmp_path, caplog):
    """Folders written before prompt lookup return the last position's logits only ([B, 1, V]): they decode one
    token a pass, with one warning, instead of failing."""
    import shutil

    import onnx

    from export.trt import last_token_logits

    folder = tmp_path / "one-row"
    shutil.copytree(folders["idefics3"][1], folder)
    model = onnx.load(str(folder / io_spec.DECODER))
    onnx.save(last_token_logits(model), str(folder / io_spec.DECODER))
    vlm = OnnxVLM.load(folder, ort_config=OrtConfig(threads=1))
    assert vlm.decoder.logit_rows == 1
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=12, lookup_tokens=4)
    with caplog.at_level("WARNING"):
        steps = list(vlm.generate(frame, PROMPT, cfg))
        list(vlm.generate(frame, PROMPT, cfg))
    assert steps[-1].stats.draft_tokens == 0 and steps[-1].stats.decode_steps == 11
    assert [s.token_id for s in steps[:-1]] == _tokens(vlm, frame, GenerationConfig(max_new_tokens=12,
                                                                                     min_new_tokens=12))
    warnings = [r.getMessage() for r in caplog.records if "prompt lookup is off" in r.getMessage()]
    assert len(warnings) == 1 and "edge-vit export optimize" in warnings[0]
