"""A VLM's text model started from a pretrained causal LM (finetune.base_lm): layers copied, vocabulary moved.

The "pretrained" LM is a tiny llama with its own tokenizer, saved with save_pretrained and loaded back through
the same code path as a hub model or a GGUF file.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from edge_vit.tiny import build_tokenizer

    raw, _ = build_tokenizer(["<unk>", "<s>", "</s>"], vocab_size=500, seed=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("lm") / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _target_tokenizer():
    """A BPE of its own, trained on text with words the source never merged ("hexagon", "purple")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edge_vit.tiny import IDEFICS3_SPECIAL_TOKENS, _corpus, idefics3_tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=IDEFICS3_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_corpus(seed=2) + ["a purple hexagon at top-left, two purple hexagons"] * 200,
                            trainer=trainer)
    return idefics3_tokenizer(raw)


def test_transfer_embeddings_copies_one_piece_tokens_and_averages_the_rest(tiny_lm):
    from finetune.base_lm import load_base_lm, transfer_embeddings

    base = load_base_lm(str(tiny_lm))
    target = _target_tokenizer()
    source = base.model.model.embed_tokens.weight
    emb, stats = transfer_embeddings(target, base.tokenizer, source)
    assert emb.shape == (len(target), source.shape[1])
    assert stats["one_piece"] > len(target) // 3 and sum(stats.values()) == len(target)
    checked = {1: 0, 2: 0}
    for t in range(len(target)):
        if t in target.all_special_ids:
            continue
        pieces = base.tokenizer(target.decode([t]), add_special_tokens=False)["input_ids"]
        if len(pieces) in checked:
            assert torch.allclose(emb[t], source[pieces].mean(0))
            checked[len(pieces)] += 1
    assert checked[1] > 0 and checked[2] > 0
    for t in target.all_special_ids:  # fresh rows near the mean, different from each other
        assert not torch.allclose(emb[t], source.mean(0)) and torch.linalg.norm(emb[t] - source.mean(0)) < torch.linalg.norm(source.std(0))
    again, _ = transfer_embeddings(target, base.tokenizer, source)
    assert torch.equal(emb, again)  # seeded


def test_demo_vlm_text_model_computes_what_the_truncated_lm_computes(tiny_lm, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune.base_lm import load_base_lm
    from finetune.demo_models import DemoRecipe, build_demo_vlm

    recipe = replace(DemoRecipe.quick(), base_lm=str(tiny_lm), base_lm_layers=2, vocab_size=360)
    corpus = ["How many red circles are there?", "- blue square at top-left", "There are 2 objects."] * 20
    folder, report = build_demo_vlm(tmp_path / "vlm", corpus, recipe)
    assert report["layers"] == 2 and report["source_layers"] == 3 and report["one_piece"] > 0
    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    text_cfg = vlm.config.text_config
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.num_key_value_heads, text_cfg.rope_theta) \
        == (64, 2, 2, 50000.0)
    tok = AutoProcessor.from_pretrained(folder).tokenizer
    base = load_base_lm(str(tiny_lm))
    # A text of tokens that are one source token each: the VLM's logits over those tokens equal the source LM's,
    # cut to its first two layers, over the same tokens.
    ids = [t for t in tok(" red circles are there", add_special_tokens=False)["input_ids"]]
    src_ids = [base.tokenizer(tok.decode([t]), add_special_tokens=False)["input_ids"] for t in ids]
    assert all(len(p) == 1 for p in src_ids), "test text must map one token to one token"
    src_ids = [p[0] for p in src_ids]
    base.model.model.layers = base.model.model.layers[:2]
    with torch.no_grad():
        ours = vlm(input_ids=torch.tensor([ids])).logits[0][:, ids]
        theirs = base.model(input_ids=torch.tensor([src_ids])).logits[0][:, src_ids]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_bad_base_lm_is_a_one_line_error(tmp_path, tiny_lm):
    from edge_vit.errors import EdgeVitError
    from finetune.base_lm import load_base_lm, text_dims

    with pytest.raises(EdgeVitError, match="no such file"):
        load_base_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(EdgeVitError, match="cannot load a causal LM"):
        load_base_lm(str(tmp_path))
    with pytest.raises(EdgeVitError, match="base_lm_layers must be 1..3"):
        text_dims(load_base_lm(str(tiny_lm)), 4)


def test_cli_builds_the_base_vlm_from_a_pretrained_lm(tiny_lm, tmp_path):
    """`finetune demo-models --base-lm DIR`, as a user runs it (the quick sizes): the base VLM's text model is the LM's."""
    import json

    from helpers import run_cli

    out = tmp_path / "run"
    r = run_cli("finetune", "demo-models", "--out", str(out), "--quick", "--base-lm", str(tiny_lm),
                "--base-lm-layers", "2", "--steps", "shapes,instruct,base", "--threads", "1", timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_lm"]["source"] == str(tiny_lm) and summary["base_lm"]["layers"] == 2
    assert summary["recipe"]["base_lm"] == str(tiny_lm) and summary["pretrain"][0]["final_loss"] < summary["pretrain"][0]["first_loss"]
    config = json.loads((out / "base" / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["rope_theta"]) == (64, 2, 50000.0)
