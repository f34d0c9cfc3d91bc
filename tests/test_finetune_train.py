"""LoRA training recipe on tiny local Idefics3 and LLaVA: prompt format, masking, what trains, resume, merge, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.collate import IGNORE_INDEX, encode_conversation, load_samples, to_messages
from finetune.instruct import InstructConfig, build_instruct_data
from finetune.lora import LORA_MODULES, arch_spec, text_lora_regex
from finetune.shapes import ShapesConfig, generate_shapes
from finetune.teachers import TemplateTeacher, load_prompts
from finetune.train import TrainConfig, load_recipe, lr_factor, micro_batches, run_training

RECIPES = Path(__file__).resolve().parents[1] / "finetune" / "recipes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_IMAGE = {"idefics3": 4, "llava": 16}  # one 64 px tile / 32 px CLIP with 8 px patches


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is ~10x faster than two (no spin-waiting)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 shapes images at 64 px, 2 samples each (conversation, detailed, reasoning cycled): instruct.json."""
    root = tmp_path_factory.mktemp("train-data")
    summary = generate_shapes(root / "shapes", ShapesConfig(images=8, imgsz=64, seed=5, val_fraction=0.0,
                                                             test_fraction=0.0, min_objects=1, max_objects=4))
    build_instruct_data(summary.data_yaml, root / "data", TemplateTeacher(load_prompts()),
                        InstructConfig(samples_per_image=2, seed=1))
    return root / "data" / "instruct.json"


@pytest.fixture(scope="module")
def models(tiny_idefics3, tiny_llava) -> dict[str, Path]:
    return {"idefics3": Path(tiny_idefics3), "llava": Path(tiny_llava)}


def _base_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- prompt format and masking


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_first_turn_tokens_are_the_runtime_prompt_and_labels_are_the_answers(kind, models, data):
    """Tokens of the first user turn + "Assistant:" = what the runtime feeds (chat_text via TorchVLM._prepare);
    labels are exactly every answer + its stop token."""
    import cv2
    import torch

    from edge_vit.vlm import load_vlm

    vlm = load_vlm(str(models[kind]))
    samples, root, _ = load_samples(data)
    sample = next(s for s in samples if len(s["conversations"]) >= 6)  # a multi-turn conversation
    frame = cv2.imread(str(root / sample["image"]))
    from edge_vit.vlm.base import bgr_to_pil

    enc = encode_conversation(vlm.processor, bgr_to_pil(frame), sample["conversations"], vlm.stop_ids)
    first_text = to_messages(sample["conversations"])[0]["content"][1]["text"]
    runtime = vlm._prepare(frame, first_text)  # the runtime's own prompt building and preprocessing
    n = runtime["input_ids"].shape[1]
    assert enc.input_ids[:n].tolist() == runtime["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values, runtime["pixel_values"])
    assert (enc.labels[:n] == IGNORE_INDEX).all()
    assert enc.image_tokens == TOKENS_PER_IMAGE[kind]
    assert first_text.startswith("Detected objects") and "<image>" not in first_text

    # The labelled spans, decoded, are the gpt turns in order, each ending with the stop token.
    labels = enc.labels.tolist()
    spans, current = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    if current:
        spans.append(current)
    answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
    assert len(spans) == len(answers) == enc.turns
    tok = vlm.tokenizer
    for span, answer in zip(spans, answers):
        assert span[-1] in vlm.stop_ids
        assert sum(t in vlm.stop_ids for t in span) == 1
        assert tok.decode(span[:-1]).strip() == answer
    # Every label is the input token at its position (labels are not shifted; the loss shifts them).
    ids = enc.input_ids.tolist()
    assert all(l == i for l, i in zip(labels, ids) if l != IGNORE_INDEX)


def test_eos_is_appended_where_the_template_has_no_stop_token(models):
    from edge_vit.vlm import load_vlm
    from edge_vit.vlm.base import bgr_to_pil

    vlm = load_vlm(str(models["llava"]))
    processor = vlm.processor
    processor.chat_template = processor.chat_template.replace("{{ eos_token }}", "")
    turns = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2 circles."}]
    enc = encode_conversation(processor, bgr_to_pil(np.zeros((32, 32, 3), np.uint8)), turns, vlm.stop_ids)
    labelled = [t for t in enc.labels.tolist() if t != IGNORE_INDEX]
    assert labelled[-1] == vlm.tokenizer.eos_token_id
    assert vlm.tokenizer.decode(labelled[:-1]).strip() == "2 circles."


def test_long_conversations_are_cut_at_turn_boundaries(models, data):
    from edge_vit.vlm import load_vlm
    from edge_vit.vlm.base import bgr_to_pil

    vlm = load_vlm(str(models["idefics3"]))
    samples, root, _ = load_samples(data)
    sample = next(s for s in samples if len(s["conversations"]) >= 6)
    image = bgr_to_pil(np.zeros((64, 64, 3), np.uint8))
    full = encode_conversation(vlm.processor, image, sample["conversations"], vlm.stop_ids)
    cut = encode_conversation(vlm.processor, image, sample["conversations"], vlm.stop_ids,
                              max_length=int(full.input_ids.shape[0]) - 1)
    assert 1 <= cut.turns < full.turns
    assert cut.input_ids.tolist() == full.input_ids[: cut.input_ids.shape[0]].tolist()
    from edge_vit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="max-length"):
        encode_conversation(vlm.processor, image, sample["conversations"], vlm.stop_ids, max_length=16)


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_a_padded_batch_has_the_loss_of_its_samples(kind, models, data):
    """Right padding, and for Idefics3 zero tiles padding images of fewer tiles (split tiling), change nothing."""
    import torch

    from edge_vit.vlm import TilingPolicy
    from edge_vit.vlm.base import bgr_to_pil
    from edge_vit.vlm.torch_backend import TorchVLM
    from finetune.collate import collate
    from finetune.train import _answer_loss_module

    vlm = TorchVLM.load(str(models[kind]), tiling=TilingPolicy.SPLIT)
    samples, _, _ = load_samples(data)
    rng = np.random.default_rng(0)
    images = [bgr_to_pil(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((64, 64, 3), (40, 130, 3))]
    encoded = [encode_conversation(vlm.processor, image, s["conversations"], vlm.stop_ids)
               for image, s in zip(images, (samples[0], samples[3]))]
    if kind == "idefics3":
        assert encoded[0].pixel_values.shape[1] != encoded[1].pixel_values.shape[1]
    loss = _answer_loss_module()(vlm.model).eval()
    pad = vlm.tokenizer.pad_token_id

    def run(batch):
        batch = dict(batch)
        batch.pop("image_tokens")
        with torch.no_grad():
            total, n = loss(**batch)
        return float(total), int(n)

    both = run(collate(encoded, pad))
    alone = [run(collate([e], pad)) for e in encoded]
    assert both[1] == sum(n for _, n in alone) == sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in encoded)
    assert both[0] == pytest.approx(sum(t for t, _ in alone), rel=1e-5)


@pytest.mark.parametrize("turns, message", [
    ([{"from": "gpt", "value": "Hi."}], "alternate"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "human", "value": "Q2?"}], "alternate"),
    ([{"from": "human", "value": "<image>\nQ?"}], "no question/answer pair"),
    ([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."},
      {"from": "human", "value": "<image>\nQ2?"}, {"from": "gpt", "value": "B."}], "only the first turn"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "A."}], "expected"),
])
def test_bad_conversations_are_refused(turns, message):
    with pytest.raises(ValueError, match=message):
        to_messages(turns)


def test_image_placeholder_goes_first_and_trailing_question_is_dropped():
    msgs = to_messages([{"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "A."},
                        {"from": "human", "value": "More?"}])
    assert msgs == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]


# ---------------------------------------------------------------- LoRA scope, data order, schedule


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_lora_regex_hits_only_the_text_model(kind, models):
    import re

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(models[kind])
    spec = arch_spec(model)
    names = [n for n, _ in model.named_modules()]
    hit = [n for n in names if re.fullmatch(text_lora_regex(spec), n)]
    layers = model.config.get_text_config().num_hidden_layers
    assert len(hit) == layers * len(LORA_MODULES)
    assert all(n.startswith(spec.text_model + ".layers.") for n in hit)
    # The vision tower has q_proj/v_proj too: a plain name list would have hit them.
    assert any(n.startswith(spec.vision_tower) and n.endswith("q_proj") for n in names)
    attn_only = [n for n in names if re.fullmatch(text_lora_regex(spec, ["q_proj", "v_proj"]), n)]
    assert len(attn_only) == 2 * layers and all(n.endswith(("q_proj", "v_proj")) for n in attn_only)


def test_micro_batches_cover_each_epoch_and_resume_mid_stream():
    n, world, bs = 10, 2, 2
    streams = [micro_batches(n, seed=3, rank=r, world=world, batch_size=bs) for r in range(world)]
    per_epoch = 3  # ceil(10 / 4)
    first = [[next(s) for _ in range(per_epoch)] for s in streams]
    seen = [i for rank in first for b in rank for i in b]
    assert set(seen) == set(range(n)) and len(seen) == per_epoch * world * bs
    again = micro_batches(n, seed=3, rank=1, world=world, batch_size=bs)
    later = [next(again) for _ in range(2 * per_epoch + 1)]
    resumed = micro_batches(n, seed=3, rank=1, world=world, batch_size=bs, start=4)
    assert [next(resumed) for _ in range(3)] == later[4:7]
    assert later[:per_epoch] != later[per_epoch:2 * per_epoch]  # a new order each epoch


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert f[0] > 0 and f[0] < f[1] < f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] >= 0.1
    assert lr_factor(10, warmup=2, total=10, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    values = load_recipe(recipe)
    config = TrainConfig.from_sources(recipe, data="x.json", out="o", model=values.get("model") or "m")
    assert config.stage in (1, 2)
    assert config.stage == 1 or config.lora_r >= 1


def test_recipe_keys_are_checked_and_flags_win(tmp_path):
    from edge_vit.errors import EdgeVitError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nstage: 1\nlr: 0.001\nlora_rank: 8\n")
    with pytest.raises(EdgeVitError, match="unknown option.*lora_rank"):
        TrainConfig.from_sources(recipe, data="d.json", out="o")
    recipe.write_text("model: m\nstage: 1\nlr: 0.001\nmodules_to_save: [lm_head]\n")
    config = TrainConfig.from_sources(recipe, data="d.json", out="o", lr=0.5, stage=None)
    assert (config.model, config.stage, config.lr, config.modules_to_save) == ("m", 1, 0.5, ("lm_head",))
    with pytest.raises(EdgeVitError, match="stage must be 1 or 2"):
        TrainConfig.from_sources(recipe, data="d.json", out="o", stage=3)


# ---------------------------------------------------------------- training runs


def _train(models, data, tmp: Path, kind: str, stage: int, **kw) -> tuple[Path, dict]:
    out = tmp / f"{kind}-stage{stage}"
    options = dict(max_steps=12, batch_size=2, lr=1e-2 if stage == 1 else 3e-3, modules_to_save=("lm_head",),
                   progress=False, seed=0)
    options.update(kw)
    summary = run_training(TrainConfig(model=str(models[kind]), data=str(data), out=str(out), stage=stage, **options))
    return out, summary


@pytest.fixture(scope="module")
def runs(models, data, tmp_path_factory) -> dict:
    """(kind, stage) -> (out folder, summary): both stages on both tiny architectures, 12 steps each."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("idefics3", "llava"):
        out[(kind, 1)] = _train(models, data, tmp, kind, 1)
        out[(kind, 2)] = _train(models, data, tmp, kind, 2, train_connector=(kind == "llava"))
    return out


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
@pytest.mark.parametrize("stage", [1, 2])
def test_training_lowers_the_loss_and_changes_only_the_intended_parameters(kind, stage, runs, models):
    from safetensors.torch import load_file

    from finetune.merge import apply_adapter

    out, summary = runs[(kind, stage)]
    losses = _losses(out)
    assert len(losses) == summary["steps"] == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert summary["visual_tokens_per_sample"] == TOKENS_PER_IMAGE[kind]
    assert summary["peak_memory"]["peak_rss_mb"] > 0 and summary["steps_per_s"] > 0

    # The adapter holds only what the stage trains.
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(models[kind])
    spec = arch_spec(base)
    lora_keys = [k for k in keys if ".lora_" in k]
    if stage == 1:
        assert not lora_keys
    else:
        assert lora_keys and all(f"{spec.text_model}.layers." in k for k in lora_keys)
    assert not any(spec.vision_tower in k for k in keys)

    # Merged weights: vision tower untouched; text layers only change in stage 2; connector where trained.
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = apply_adapter(base, out).state_dict()
    changed = {k for k in before if not np.allclose(before[k].numpy(), merged[k].numpy())}
    assert not any(k.startswith(spec.vision_tower + ".") for k in changed)
    text_changed = any(k.startswith(spec.text_model + ".layers.") for k in changed)
    assert text_changed == (stage == 2)
    connector_changed = any(k.startswith(spec.connector + ".") for k in changed)
    assert connector_changed == (stage == 1 or summary["config"]["train_connector"])
    assert any(k.startswith("lm_head.") for k in changed)
    assert not any(k.startswith(spec.text_model + ".embed_tokens") for k in changed)


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_outputs_adapter_card_loss_log_and_plot(kind, runs, data):
    out, summary = runs[(kind, 2)]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"].endswith(f"tiny-{kind}")
    card = (out / "README.md").read_text()
    manifest = json.loads((data.parent / "manifest.json").read_text())
    for text in (manifest["dataset"]["hash"], f"tiny-{kind}", "final", "| lora_r | `16` |", "stage 2",
                 f"{summary['final_loss']}"):
        assert text in card
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["answer_tokens"] > 0 and r["lr"] > 0 for r in records)
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["final_loss"] == summary["final_loss"] and saved["stages"][-1]["stage"] == 2


def test_connector_only_stage_1_trains_nothing_else(models, data, tmp_path):
    out, summary = _train(models, data, tmp_path, "idefics3", 1, max_steps=2, modules_to_save=())
    assert summary["trainable_by_part"]["lora"] == 0 and summary["trainable_by_part"]["other"] == 0
    assert summary["trainable_params"] == summary["trainable_by_part"]["connector"] > 0


def test_resume_continues_to_the_same_result(models, data, tmp_path):
    """6 steps straight vs 3 steps, then resume from that checkpoint for 3: same losses and weights.

    Dropout on (so the saved RNG state matters), accumulation over 2 micro-batches.
    """
    from safetensors.torch import load_file

    kw = dict(max_steps=6, save_every=3, lora_dropout=0.2, grad_accum=2, batch_size=2, lr=3e-3)
    straight, _ = _train(models, data, tmp_path / "a", "idefics3", 2, **kw)
    resumed = tmp_path / "b" / "idefics3-stage2"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    # A crash after the checkpoint leaves later steps in the log; resume must redo them.
    lines = (straight / "loss.jsonl").read_text().splitlines()[:5]
    (resumed / "loss.jsonl").write_text("".join(line + "\n" for line in lines))
    _train(models, data, tmp_path / "b", "idefics3", 2, resume=True, **kw)
    np.testing.assert_allclose(_losses(resumed), _losses(straight), rtol=0, atol=1e-5)
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6)


def test_gradient_accumulation_equals_the_bigger_batch(models, data, tmp_path):
    """2 micro-batches of 1 = 1 batch of 2: the loss is normalized by the answer tokens of the whole step."""
    kw = dict(max_steps=4, lora_dropout=0.0, lr=3e-3)
    _train(models, data, tmp_path / "acc", "idefics3", 2, batch_size=1, grad_accum=2, **kw)
    _train(models, data, tmp_path / "big", "idefics3", 2, batch_size=2, grad_accum=1, **kw)
    np.testing.assert_allclose(_losses(tmp_path / "acc" / "idefics3-stage2"),
                               _losses(tmp_path / "big" / "idefics3-stage2"), rtol=0, atol=1e-5)


def test_resume_refuses_another_setup(models, data, tmp_path):
    from edge_vit.errors import EdgeVitError

    out, _ = _train(models, data, tmp_path, "idefics3", 2, max_steps=1, save_every=1)
    with pytest.raises(EdgeVitError, match="lora_r"):
        _train(models, data, tmp_path, "idefics3", 2, max_steps=2, save_every=1, resume=True, lora_r=4)
    with pytest.raises(EdgeVitError, match="already holds a training run"):
        _train(models, data, tmp_path, "idefics3", 2, max_steps=1)


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", ["idefics3", "llava"])
def test_merged_model_loads_with_load_vlm_and_generates_like_base_plus_adapter(kind, runs, models, tmp_path):
    import cv2
    from peft import PeftModel

    from edge_vit.vlm import GenerationConfig, load_vlm
    from edge_vit.vlm.torch_backend import TorchVLM
    from finetune.merge import merge_adapter

    out, _ = runs[(kind, 2)]
    merged_dir = merge_adapter(str(models[kind]), out, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "README.md").is_file()
    # the base's processor settings, not the runtime's tiling (apply_tiling changes the loaded processor)
    assert (json.loads((merged_dir / "preprocessor_config.json").read_text()) ==
            json.loads((Path(models[kind]) / "preprocessor_config.json").read_text()))
    history = json.loads((merged_dir / "training_history.json").read_text())
    assert [s["stage"] for s in history["stages"]] == [2]
    merged = load_vlm(str(merged_dir))
    base = load_vlm(str(models[kind]))
    unmerged = TorchVLM(PeftModel.from_pretrained(base.model, str(out)).eval(), base.processor, name="peft")
    images = sorted((Path(json.loads((out / "train_summary.json").read_text())["data"]["file"]).parent.parent
                     / "shapes" / "images" / "train").glob("*.png"))[:2]
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    for path in images:
        frame = cv2.imread(str(path))
        for prompt in ("How many circles are there?", "Detected objects: 1 star.\nIs there a red star?"):
            a = [s.token_id for s in merged.generate(frame, prompt, cfg) if not s.done]
            b = [s.token_id for s in unmerged.generate(frame, prompt, cfg) if not s.done]
            assert a == b


def test_merged_model_exports_to_onnx(runs, models, tmp_path):
    from export.onnx_export import export_vlm_onnx
    from finetune.merge import merge_adapter

    merged_dir = merge_adapter(str(models["idefics3"]), runs[("idefics3", 2)][0], tmp_path / "merged")
    export_vlm_onnx(merged_dir, tmp_path / "onnx")
    assert (tmp_path / "onnx" / "decoder_model_merged.onnx").is_file()


def test_stage_2_on_a_merged_stage_1_model_lists_both_stages(runs, models, data, tmp_path):
    from finetune.merge import merge_adapter

    merged = merge_adapter(str(models["idefics3"]), runs[("idefics3", 1)][0], tmp_path / "stage1-merged")
    summary = run_training(TrainConfig(model=str(merged), data=str(data), out=str(tmp_path / "s2"), stage=2,
                                       max_steps=1, progress=False))
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    assert "| 1 |" in (tmp_path / "s2" / "README.md").read_text()


# ---------------------------------------------------------------- CLI: bad inputs, several processes


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from edge_vit.cli import main

    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing data", "not a model", "missing recipe", "bad adapter", "unknown module"])
def test_bad_inputs_end_with_one_error_line(case, capsys, models, data, tmp_path):
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    args = {
        "missing data": ["finetune", "train", "--model", str(models["idefics3"]), "--data", str(tmp_path / "no.json"),
                         "--out", str(tmp_path / "o")],
        "not a model": ["finetune", "train", "--model", str(not_model), "--data", str(data), "--out",
                        str(tmp_path / "o")],
        "missing recipe": ["finetune", "train", "--config", str(tmp_path / "none.yaml")],
        "bad adapter": ["finetune", "merge", "--base", str(models["idefics3"]), "--adapter", str(not_model),
                        "--out", str(tmp_path / "m")],
        "unknown module": ["finetune", "train", "--model", str(models["idefics3"]), "--data", str(data), "--out",
                           str(tmp_path / "o"), "--modules-to-save", "lm_hed"],
    }[case]
    rc, _, err = _cli(capsys, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge-vit: error:"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_processes_with_gloo_match_one_process_with_the_whole_batch(models, data, tmp_path):
    """torchrun, 2 CPU ranks x 2 samples = 1 rank x 4 samples: same loss curve; both ran; rank 0 alone wrote."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edge_vit", "finetune", "train", "--model", str(models["idefics3"]), "--data", str(data),
           "--out", str(out), "--stage", "2", "--max-steps", "6", "--save-every", "3", "--batch-size", "2",
           "--lr", "3e-3", "--lora-dropout", "0", "--modules-to-save", "lm_head", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2 done: 6 steps" in proc.stderr and "rank 1/2 done: 6 steps" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["samples"] == 12 for r in summary["ranks"])
    assert [r["files_written"] > 0 for r in summary["ranks"]] == [True, False]
    losses = _losses(out)
    assert losses[-1] < losses[0] - 0.3
    for step in (3, 6):
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["written_by_rank"] == 0 and state["world_size"] == 2
        assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "optimizer.pt", "rng.pt", "scheduler.pt",
                                                          "trainer_state.json"]
    assert not list(out.rglob("*.tmp"))
    single = run_training(TrainConfig(model=str(models["idefics3"]), data=str(data), out=str(tmp_path / "one"),
                                      stage=2, max_steps=6, batch_size=4, lr=3e-3, lora_dropout=0.0,
                                      modules_to_save=("lm_head",), progress=False))
    assert single["world_size"] == 1
    np.testing.assert_allclose(_losses(tmp_path / "one"), losses, rtol=0, atol=1e-4)


def test_merge_saves_in_save_dtype_what_the_fp32_merge_computes(runs, models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from finetune.merge import merge_adapter

    out = runs[("idefics3", 2)][0]
    fp32 = load_file(str(merge_adapter(str(models["idefics3"]), out, tmp_path / "fp32") / "model.safetensors"))
    bf16_dir = merge_adapter(str(models["idefics3"]), out, tmp_path / "bf16", save_dtype="bfloat16")
    bf16 = load_file(str(bf16_dir / "model.safetensors"))
    assert set(bf16) == set(fp32) and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert "saved in bfloat16" in (bf16_dir / "README.md").read_text()
