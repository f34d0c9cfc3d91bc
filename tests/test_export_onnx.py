"""VLM to ONNX through Optimum: each graph against PyTorch, the folder's contents, the CLI as a user runs it.

Tiny local Idefics3 and LLaVA models (conftest); a real-size SmolVLM-256M with
random weights for the slow test. Nothing is downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from edge_vit.vlm import GenerationConfig, TilingPolicy, load_vlm
from export import io_spec
from export.onnx_export import ExportValidationError, OnnxExportOptions, export_vlm_onnx

ATOL = 1e-4


@pytest.fixture(scope="module")
def frame():
    return np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tiny_idefics3, tiny_llava, tmp_path_factory):
    """model kind -> (source folder, export folder)."""
    out = {}
    for kind, source in (("idefics3", tiny_idefics3), ("llava", tiny_llava)):
        folder = tmp_path_factory.mktemp(f"onnx-{kind}")
        export_vlm_onnx(source, folder)
        out[kind] = (Path(source), folder)
    return out


def _sessions(folder: Path):
    import onnxruntime as ort

    return {name: ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
            for name in io_spec.GRAPH_FILES}


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_each_graph_matches_pytorch(kind, exported, frame):
    """Vision features, embeddings, prefill logits and a cached decode step: max abs diff <= 1e-4 (fp32)."""
    import torch

    source, folder = exported[kind]
    # Split tiling for Idefics3: 5 tiles through a graph traced with 2 (dynamic tiles axis).
    tvlm = load_vlm(str(source), tiling=TilingPolicy.SPLIT)
    sess = _sessions(folder)
    inputs = tvlm._prepare(frame, "How many circles are there?")
    input_ids = inputs["input_ids"]  # [1, T]
    n_layers = tvlm.model.config.get_text_config().num_hidden_layers

    with torch.inference_mode():
        ref_feats = tvlm._image_features(inputs).numpy()  # [N_img, D]
        pixels = inputs["pixel_values"].numpy()
        tiles = pixels[0] if pixels.ndim == 5 else pixels
        ort_feats = sess[io_spec.VISION_ENCODER].run(None, {"pixel_values": tiles})[0]
        assert _max_diff(ort_feats.reshape(ref_feats.shape), ref_feats) <= ATOL
        if kind == "idefics3":
            assert tiles.shape[0] == 5

        ref_embeds = tvlm._embed(input_ids)
        ort_embeds = sess[io_spec.EMBED_TOKENS].run(None, {"input_ids": input_ids.numpy()})[0]
        assert _max_diff(ort_embeds, ref_embeds.numpy()) == 0.0  # a table lookup

        mask = input_ids == tvlm.image_token_id
        embeds = ref_embeds.masked_scatter(mask.unsqueeze(-1), torch.from_numpy(ref_feats))
        attention = inputs["attention_mask"]
        ref = tvlm.model(inputs_embeds=embeds, attention_mask=attention, use_cache=True)
        seq = input_ids.shape[1]
        shape = io_spec.DecoderShape.from_text_config(tvlm.model.config.get_text_config())
        empty = np.zeros((1, shape.num_kv_heads, 0, shape.head_dim), np.float32)  # prefill: empty cache
        feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": attention.numpy(),
                 "position_ids": np.arange(seq, dtype=np.int64)[None],
                 **{name: empty for name in io_spec.past_names(n_layers)}}
        out = sess[io_spec.DECODER].run(None, feeds)
        assert _max_diff(out[0], ref.logits.numpy()) <= ATOL  # every position

        token = int(ref.logits[0, -1].argmax())
        attention2 = torch.cat([attention, attention.new_ones((1, 1))], dim=1)
        ref2 = tvlm.model(input_ids=torch.tensor([[token]]), attention_mask=attention2,
                          past_key_values=ref.past_key_values, use_cache=True)
        step_embeds = sess[io_spec.EMBED_TOKENS].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
        feeds2 = {"inputs_embeds": step_embeds, "attention_mask": attention2.numpy(),
                  "position_ids": np.array([[seq]], np.int64),
                  **dict(zip(io_spec.past_names(n_layers), out[1:]))}
        out2 = sess[io_spec.DECODER].run(None, feeds2)
        assert _max_diff(out2[0], ref2.logits.numpy()) <= ATOL
        assert out2[1].shape[2] == seq + 1  # present grows by one


def test_graph_io_follows_io_spec(exported):
    _, folder = exported["idefics3"]
    sess = _sessions(folder)
    vision, embed, decoder = (sess[name] for name in io_spec.GRAPH_FILES)
    assert [i.name for i in vision.get_inputs()] == list(io_spec.VISION_INPUTS)
    assert [o.name for o in vision.get_outputs()] == list(io_spec.VISION_OUTPUTS)
    assert vision.get_inputs()[0].shape[0] == "tiles"
    assert [i.name for i in embed.get_inputs()] == list(io_spec.EMBED_INPUTS)
    assert [o.name for o in embed.get_outputs()] == list(io_spec.EMBED_OUTPUTS)
    n = 2  # tiny models
    assert sorted(i.name for i in decoder.get_inputs()) == sorted(io_spec.decoder_inputs(n))
    assert [o.name for o in decoder.get_outputs()] == io_spec.decoder_outputs(n)
    axes = io_spec.decoder_axes(n)
    for node in [*decoder.get_inputs(), *decoder.get_outputs()]:
        for index, name in axes[node.name].items():
            assert node.shape[index] == name, (node.name, node.shape)


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_folder_holds_model_files_and_manifest(kind, exported):
    from transformers import AutoConfig, AutoProcessor

    source, folder = exported[kind]
    manifest = json.loads((folder / io_spec.MANIFEST).read_text())
    assert manifest["model_type"] == kind and manifest["source_model"] == str(source)
    assert manifest["graphs"] == list(io_spec.GRAPH_FILES)
    assert all(manifest["graph_bytes"][name] == (folder / name).stat().st_size for name in io_spec.GRAPH_FILES)
    assert manifest["opset"] == OnnxExportOptions().opset and manifest["export_options"]["validate"] is True
    assert manifest["tiling"]["tokens_per_tile"] == (4 if kind == "idefics3" else 16)
    assert manifest["decoder"]["num_layers"] == 2 and manifest["decoder"]["num_kv_heads"] == 2
    assert {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"} <= set(manifest["versions"])
    # The folder loads on its own: config, processor and tokenizer, same prompt ids as the source.
    assert AutoConfig.from_pretrained(folder).model_type == kind
    text = "USER: hi"
    assert (AutoProcessor.from_pretrained(folder).tokenizer(text)["input_ids"]
            == AutoProcessor.from_pretrained(source).tokenizer(text)["input_ids"])


def test_validation_miss_fails_the_export_and_leaves_no_manifest(tiny_llava, tmp_path):
    """Optimum only logs a validation miss; the export must fail instead (here: an impossible atol)."""
    with pytest.raises(ExportValidationError, match="validation against PyTorch failed"):
        export_vlm_onnx(tiny_llava, tmp_path / "out", OnnxExportOptions(atol=1e-12))
    assert not (tmp_path / "out" / io_spec.MANIFEST).exists()


def test_cli_export_onnx_as_a_user_runs_it(tiny_idefics3, tmp_path):
    out = tmp_path / "exported"
    result = run_cli("export", "onnx", "--vlm", str(tiny_idefics3), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in (*io_spec.GRAPH_FILES, io_spec.MANIFEST, "config.json", "tokenizer.json",
                 "preprocessor_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "validated against PyTorch" in result.stdout and "--backend onnx" in result.stdout


@pytest.fixture
def bad_inputs(tmp_path, tiny_idefics3):
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    return {
        "not a model folder": (not_a_model, tmp_path / "o1", "expected a transformers model folder"),
        "unsupported model type": (bert, tmp_path / "o2", "model type 'bert' is not supported"),
        "--out is a file": (tiny_idefics3, a_file, "is a file"),
    }


@pytest.mark.parametrize("case", ["not a model folder", "unsupported model type", "--out is a file"])
def test_cli_export_bad_input_is_one_line_and_exit_2(case, bad_inputs):
    vlm, out, message = bad_inputs[case]
    result = run_cli("export", "onnx", "--vlm", str(vlm), "--out", str(out), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-vit: error:") and message in lines[0], result.stderr


def test_shipped_reference_config_is_smolvlm_256m():
    """export/configs/smolvlm-256m*.json: SmolVLM-256M-Instruct's architecture (validated, not just loaded)."""
    from export.reference_models import REFERENCE_MODELS, config_paths, load_model_config

    assert "smolvlm-256m" in REFERENCE_MODELS
    config = load_model_config("smolvlm-256m")
    text, vision = config.text_config, config.vision_config
    assert config.model_type == "idefics3" and config.scale_factor == 4 and config.image_token_id == 49190
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (768, 12, 16, 512)
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.vocab_size, text.rope_theta,
            text.max_position_embeddings) == ("llama", 576, 30, 9, 3, 1536, 49280, 100000, 8192)
    processor = json.loads(config_paths("smolvlm-256m")[1].read_text())
    tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    assert processor["image_seq_len"] == tokens_per_tile == 64


@pytest.mark.slow
def test_real_size_smolvlm_256m_exports_and_matches_pytorch_greedy(tmp_path):
    """Real SmolVLM-256M architecture (random weights): export with validation, 16 identical greedy tokens."""
    from export.reference_models import build_reference_model

    source = build_reference_model("smolvlm-256m", tmp_path / "smolvlm-256m")
    result = export_vlm_onnx(source, tmp_path / "onnx")
    sizes = result.graph_bytes
    assert 500e6 < sizes[io_spec.DECODER] < 580e6 and 350e6 < sizes[io_spec.VISION_ENCODER] < 400e6
    assert result.manifest["tiling"]["tokens_per_tile"] == 64

    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    prompt = "Describe the scene."
    torch_vlm = load_vlm(str(source))
    ref = [s.token_id for s in torch_vlm.generate(frame, prompt, cfg) if not s.done]
    del torch_vlm
    onnx_vlm = load_vlm(str(result.out_dir), "onnx", threads=2)
    steps = list(onnx_vlm.generate(frame, prompt, cfg))
    assert [s.token_id for s in steps[:-1]] == ref
    assert steps[-1].stats.image_tokens == 64 and steps[-1].stats.tiles == 1
