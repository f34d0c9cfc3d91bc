"""The demo-model recipe end to end at smoke size: every step runs, losses fall, the install layout is right.

It never retrains the shipped models (that takes hours); it proves the script that made them runs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from edge_vit.errors import EdgeVitError
from finetune.demo_models import STEPS, DemoRecipe, install, pretrain_texts, run_demo_models, shipped_vlm


@pytest.mark.slow
def test_quick_recipe_runs_every_step_and_installs(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = replace(DemoRecipe.quick(), pretrain_rounds=((40, 2e-3), (10, 1e-3)), threads=1,
                     stage2_rounds=((40, 1e-2), (6, 1e-2), (6, 1e-2)), question_order_from_round=1,
                     question_counts_from_round=1, focus_from_round=2)
    summary = run_demo_models(out, recipe, steps=STEPS, install_to=tmp_path / "installed")
    assert set(summary["seconds"]) == {"shapes", "detector", "instruct", "base", "stage1", "stage2", "stage2b",
                                       "stage2c", "eval stage1", "eval stage2", "eval stage2b", "eval stage2c",
                                       "export", "install"}
    # The installed models.json holds this run's reports, the export step's included.
    installed = json.loads((tmp_path / "installed" / "models.json").read_text())
    assert installed["export"] == json.loads(json.dumps(summary["export"])) and installed["eval"]
    assert (out / "detector.onnx").is_file()
    # The second detector round fine-tunes the first's weights at det_ft_imgsz; the export takes that size.
    import onnx

    assert (out / "runs" / "detector-ft" / "weights" / "best.pt").is_file()
    dims = onnx.load(str(out / "detector.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, recipe.det_ft_imgsz, recipe.det_ft_imgsz] and recipe.det_imgsz == 128
    # The VLM's data comes from its own scenes (shapes-vlm), not the detector's training split.
    vlm_scenes = json.loads((out / "instruct" / "manifest.json").read_text())
    assert "shapes-vlm" in json.dumps(vlm_scenes) and summary["instruct"]["images"] == len(
        list((out / "shapes-vlm" / "images" / "train").iterdir()))
    # Stages 0-1 see the plain grounding; the stage-2 rounds from size_words_from_round on (all of them in the
    # quick recipe) the same samples with size words; each model is scored with the grounding it was tuned with.
    assert recipe.size_words_from_round == 0 and summary["instruct_sizes"]["samples"] == summary["instruct"]["samples"]
    plain = json.loads((out / "instruct" / "instruct.json").read_text())
    sized = json.loads((out / "instruct-sizes" / "instruct.json").read_text())
    assert [s["conversations"][1:] for s in plain] == [s["conversations"][1:] for s in sized]
    assert json.loads((out / "instruct-sizes" / "manifest.json").read_text())["grounding"]["size_words"] == [0.145, 0.25]
    assert json.loads((out / "instruct" / "manifest.json").read_text())["grounding"]["size_words"] is None
    assert any(" small " in s["conversations"][0]["value"] or " medium " in s["conversations"][0]["value"]
               or " large " in s["conversations"][0]["value"] for s in sized)
    assert summary["eval"]["stage1"]["grounding"]["size_words"] is None
    assert summary["eval"]["stage2b"]["grounding"]["size_words"] == [0.145, 0.25]
    assert installed["grounding"]["size_words"] == [0.145, 0.25]
    # From question_order_from_round on, the same samples again with the lines the first question names first,
    # and from question_counts_from_round on (the same round here) with the counts line after the header.
    assert summary["instruct_sizes_question_counts"]["samples"] == summary["instruct"]["samples"]
    asked = json.loads((out / "instruct-sizes-question-counts" / "instruct.json").read_text())
    asked_grounding = json.loads((out / "instruct-sizes-question-counts" / "manifest.json").read_text())["grounding"]
    assert asked_grounding["order"] == "question" and asked_grounding["question_counts"] is True
    def listing(sample):  # the grounding's object lines, without the question
        return [line for line in sample["conversations"][0]["value"].splitlines()[1:-1]
                if not line.startswith("Counts: ")]

    assert [sorted(listing(a)) for a in asked] == [sorted(listing(s)) for s in sized]
    assert any(listing(a) != listing(s) for a, s in zip(asked, sized))
    assert all("\nCounts: " in a["conversations"][0]["value"] for a in asked if a["meta"]["grounded"])
    assert not any("\nCounts: " in s["conversations"][0]["value"] for s in sized)
    assert {len(a["conversations"]) for a in asked if a["kind"] == "conversation"} == {2}  # one question each
    assert [summary["eval"][n]["grounding"]["order"] for n in ("stage1", "stage2", "stage2b")] == [
        "confidence", "confidence", "question"]
    assert [summary["eval"][n]["grounding"]["question_counts"] for n in ("stage1", "stage2", "stage2b")] == [
        False, False, True]
    assert installed["grounding"]["order"] == "question" and installed["grounding"]["question_counts"] is True
    # From focus_from_round on, the same scenes with the samples' kinds cycling through focus_kinds and the
    # conversations asking counting questions for focus[1] of their turns.
    focused = out / "instruct-sizes-question-counts-count75"
    assert json.loads((focused / "manifest.json").read_text())["teacher"]["focus"] == {"kind": "count", "share": 0.75}
    kinds = Counter(s["kind"] for s in json.loads((focused / "instruct.json").read_text()))
    assert kinds["conversation"] > kinds["detailed"] + kinds["reasoning"]
    assert summary["stage2c"]["data"]["file"].endswith("instruct-sizes-question-counts-count75/instruct.json")
    pre = summary["pretrain"]  # one report per stage-0 round, each continuing from the last
    assert [(r["steps"], r["lr"]) for r in pre] == [(40, 2e-3), (10, 1e-3)]
    assert pre[0]["final_loss"] < 0.8 * pre[0]["first_loss"]  # stage 0 learns the description text
    assert pre[1]["first_loss"] < pre[0]["first_loss"]  # round 2 starts from round 1's weights
    assert len((out / "pretrain_loss_r2.jsonl").read_text().splitlines()) == 10
    for stage in ("stage1", "stage2"):
        assert (out / stage / "model.safetensors").is_file() and (out / stage / "training_history.json").is_file()
    losses = [json.loads(line)["loss"] for line in (out / "stage2-adapter" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) >= 30 and sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8  # stage 2 learns
    history = json.loads((out / "stage2b" / "training_history.json").read_text())
    assert [s["stage"] for s in history["stages"]] == [1, 2, 2]  # the second round trains on the first's merge
    for name in ("stage1", "stage2", "stage2b"):
        report = summary["eval"][name]
        assert {"grounded", "ungrounded"} <= set(report["accuracy"]) and report["questions"] > 0
        assert report["detector_val"]["classes_match"]  # the detector has the colour-shape classes
    # The exported variants answer the same benchmark through the ONNX Runtime backend.
    assert set(summary["export"]) == {"fp32", "int8", "int4"}
    assert summary["export"]["fp32"]["questions"] == summary["eval"]["stage2c"]["questions"]
    fp32_answers = (out / "eval" / "onnx-fp32" / "answers.jsonl").read_text().splitlines()
    torch_answers = (out / "eval" / "stage2c" / "answers.jsonl").read_text().splitlines()  # the last round's
    assert [json.loads(a)["prediction"] for a in fp32_answers] == [json.loads(a)["prediction"] for a in torch_answers]
    # Stage 0 reads the dense conversations and the descriptions as text-only chats in the model's own template.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out / "base")
    dense = json.loads((out / "instruct-dense" / "instruct.json").read_text())
    texts = pretrain_texts(out / "instruct-dense" / "instruct.json", processor, ("conversation",))
    assert len(texts) == len(dense) == summary["instruct"]["images"] and {s["kind"] for s in dense} == {"conversation"}
    assert all(t.startswith("<|im_start|>User: Detected objects") and "<image>" not in t for t in texts)
    assert [t.count("<end_of_utterance>\nAssistant: ") for t in texts] == [len(s["conversations"]) // 2 for s in dense]
    assert max(len(s["conversations"]) // 2 for s in dense) >= 6  # denser than the mixed data's 3 to 5 turns
    mixed = json.loads((out / "instruct" / "instruct.json").read_text())
    detailed = pretrain_texts(out / "instruct" / "instruct.json", processor, ("detailed",))
    assert len(detailed) == sum(s["kind"] == "detailed" for s in mixed) > 0
    assert [r["texts"] for r in summary["pretrain"]] == [len(texts) + len(detailed)] * 2
    # A second run skips what is there.
    again = run_demo_models(out, recipe, steps=("shapes", "detector", "instruct", "base", "stage1", "stage2"))
    assert again["seconds"] == summary["seconds"]
    dest = install(out, tmp_path / "assets", out / "stage2b")
    assert (dest / "detector.onnx").is_file() and (dest / "vlm" / "model.safetensors").is_file()
    assert not (dest / "vlm" / "training_history.json").exists()
    assert json.loads((dest / "models.json").read_text())["recipe"]["lora_r"] == recipe.lora_r
    from edge_vit.vlm import load_vlm

    assert load_vlm(str(dest / "vlm")).count_tokens("How many circles are there?") > 0
    # Shipping an ONNX variant instead (ship="int4"): its graphs and manifest, and edge-vit demo runs it with onnx.
    from edge_vit.demo import demo_paths

    onnx_dest = install(out, tmp_path / "assets-onnx", shipped_vlm(out, replace(recipe, ship="int4")))
    assert {"vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx", "edge_vit_export.json",
            "tokenizer.json"} <= {f.name for f in (onnx_dest / "vlm").iterdir()}
    assert demo_paths(assets=onnx_dest).vlm_backend == "onnx"
    assert load_vlm(str(onnx_dest / "vlm"), "onnx").count_tokens("How many circles are there?") > 0
    with pytest.raises(EdgeVitError, match="ship must be torch or one of"):
        shipped_vlm(out, replace(recipe, ship="int2"))


def test_cli_unknown_step_is_one_line_exit_2(tmp_path):
    from helpers import run_cli

    r = run_cli("finetune", "demo-models", "--out", str(tmp_path / "run"), "--steps", "shapes,bogus", "--quick")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "bogus" in r.stderr
    assert not (tmp_path / "run" / "shapes").exists()  # checked before any step ran


def _stage0_recipe(**kw) -> DemoRecipe:
    values = dict(threads=1, pretrain_scenes=12, pretrain_rounds=((30, 2e-3), (20, 1e-3)),
                  pretrain_data=(("instruct-dense", ("conversation",)),
                                 ("instruct-stage0", ("conversation", "detailed"))))
    return replace(DemoRecipe.quick(), **{**values, **kw})


def test_stage0_scenes_tokens_and_a_resumed_round(tmp_path, monkeypatch):
    """Stage 0 reads scenes rendered in memory (instruct-stage0), tokenized once into base.tmp; a stage 0
    stopped after its first round resumes with the second (the tokens and the first round kept); base.tmp of
    other base settings is rebuilt."""
    import finetune.demo_models as dm

    out = tmp_path / "run"
    recipe = _stage0_recipe()
    run_demo_models(out, recipe, steps=("shapes", "instruct"))
    manifest = json.loads((out / "instruct-stage0" / "manifest.json").read_text())
    assert manifest["dataset"]["rendered"]["images"] == 12 and manifest["dataset"]["rendered"]["seed"] == 2001
    assert manifest["counts"]["by_kind"] == {"conversation": 24, "detailed": 12, "reasoning": 0}
    assert not (out / "instruct-stage0" / "images").exists()

    real, calls = dm.pretrain_text, []

    def stop_in_round_2(model_dir, corpus, recipe, log_path=None, round_=0, device="cpu"):
        calls.append(round_)
        if round_ == 1:
            raise KeyboardInterrupt
        return real(model_dir, corpus, recipe, log_path, round_, device)

    monkeypatch.setattr(dm, "pretrain_text", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_demo_models(out, recipe, steps=("base",))
    state = json.loads((out / "base.tmp" / dm.STAGE0_STATE).read_text())
    assert len(state["rounds"]) == 1 and (out / "base.tmp" / dm.STAGE0_TOKENS).is_file()
    corpus = dm.TokenCorpus.load(out / "base.tmp" / dm.STAGE0_TOKENS)
    dense = json.loads((out / "instruct-dense" / "instruct.json").read_text())
    assert len(corpus) == len(dense) + 36 and state["rounds"][0]["texts"] == len(corpus)
    ids, mask = corpus.batch([0, 1], pad_id=0)
    lengths = np.diff(corpus.offsets)[:2]
    assert ids.shape == (2, lengths.max()) and mask.sum(1).tolist() == lengths.tolist()

    monkeypatch.setattr(dm, "pretrain_text", real)
    summary = run_demo_models(out, recipe, steps=("base",))
    assert calls == [0, 1] and [r["steps"] for r in summary["pretrain"]] == [30, 20]
    assert summary["pretrain"][0] == state["rounds"][0]  # round 1 was not run again
    assert (out / "base" / "model.safetensors").is_file() and not (out / "base.tmp").exists()
    assert not (out / "base" / dm.STAGE0_TOKENS).exists()

    (out / "base").rename(out / "base.tmp")  # a stopped stage 0 of other settings: rebuilt, not resumed
    (out / "base.tmp" / dm.STAGE0_STATE).write_text(json.dumps(state))
    tmp, _, fresh = dm.prepare_stage0(out, replace(recipe, pretrain_batch=4))  # a round ran with batch 8
    assert fresh["rounds"] == [] and fresh["rounds_recipe"]["pretrain_batch"] == 4
    weights = (tmp / "model.safetensors").stat().st_mtime_ns
    _, _, same = dm.prepare_stage0(out, replace(recipe, pretrain_batch=2))  # no round yet: nothing to redo
    assert same["rounds_recipe"]["pretrain_batch"] == 2 and (tmp / "model.safetensors").stat().st_mtime_ns == weights
    tmp, _, fresh = dm.prepare_stage0(out, replace(recipe, hidden=32))
    assert fresh["rounds"] == [] and json.loads((tmp / "config.json").read_text())["text_config"]["hidden_size"] == 32


def test_stage0_time_limit_shortens_the_round(tmp_path):
    """pretrain_hours cuts a round's schedule to the steps that fit (as Ultralytics' time=); the report says so."""
    import finetune.demo_models as dm

    out = tmp_path / "run"
    recipe = _stage0_recipe(pretrain_rounds=((2000, 2e-3),), pretrain_hours=0.5 / 3600, pretrain_precision="bf16")
    run_demo_models(out, recipe, steps=("shapes", "instruct"))
    tmp, corpus, _ = dm.prepare_stage0(out, recipe)
    report = dm.pretrain_text(tmp, corpus, recipe, tmp_path / "loss.jsonl")
    assert 50 < report["steps"] < 2000 and report["planned_steps"] == 2000 and report["device"] == "cpu"
    assert report["precision"] == "bf16"  # autocast on the CPU too when asked
    with pytest.raises(EdgeVitError, match="pretrain_precision must be auto, fp32 or bf16"):
        dm.pretrain_text(tmp, corpus, replace(recipe, pretrain_precision="fp16"))
    assert len((tmp_path / "loss.jsonl").read_text().splitlines()) == report["steps"]
    assert report["final_loss"] < report["first_loss"]


def test_recipe_overrides_from_yaml(tmp_path):
    """--recipe FILE: DemoRecipe fields from YAML (lists become tuples); the shipped GPU stage-0 file is valid;
    an unknown field or a file that is not a mapping is a one-line error, exit 2."""
    from pathlib import Path

    from helpers import run_cli

    shipped = Path(__file__).resolve().parents[1] / "finetune" / "recipes" / "demo" / "stage0_gpu.yaml"
    import yaml

    recipe = DemoRecipe().with_overrides(yaml.safe_load(shipped.read_text()))
    assert recipe.pretrain_scenes > 0 and recipe.pretrain_rounds[0][0] > 0 and recipe.pretrain_hours > 0
    assert ("instruct-stage0", ("conversation", "detailed")) in recipe.pretrain_data
    hash(recipe)  # still a frozen, hashable recipe (tuples, not lists)
    for text, message in (("hiddn: 3\n", "unknown demo recipe field(s): hiddn"), ("- 1\n", "a recipe is a mapping"),
                          ("a: [\n", "not valid YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        r = run_cli("finetune", "demo-models", "--out", str(tmp_path / "run"), "--quick", "--recipe", str(bad))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()


def _tiny_stage0(tmp_path):
    """A quick-size base VLM and a small token corpus of its chat texts."""
    import finetune.demo_models as dm

    texts = [f"User: How many circles are there? Detected objects: {n} red circle.\nAssistant: {n} circles."
             for n in range(1, 9)]
    folder, _ = dm.build_demo_vlm(tmp_path / "base", texts, DemoRecipe.quick())
    from transformers import AutoProcessor

    return folder, dm.TokenCorpus.from_texts(AutoProcessor.from_pretrained(folder).tokenizer, texts)


@pytest.mark.gpu
def test_stage0_on_cuda_learns_like_cpu(tmp_path):
    """Stage 0 on a CUDA device (bf16 autocast, fused AdamW, losses read back every 100 steps): its first loss is
    the fp32 CPU loss of the same batch, it learns, and the saved weights are fp32 on disk."""
    import shutil

    import torch
    from safetensors.torch import load_file

    import finetune.demo_models as dm

    folder, corpus = _tiny_stage0(tmp_path)
    recipe = replace(DemoRecipe.quick(), pretrain_rounds=((150, 2e-3),), pretrain_batch=8)
    cpu_dir = tmp_path / "cpu"
    shutil.copytree(folder, cpu_dir)
    cpu = dm.pretrain_text(cpu_dir, corpus, replace(recipe, pretrain_rounds=((1, 2e-3),)))
    report = dm.pretrain_text(folder, corpus, recipe, tmp_path / "loss.jsonl", device="cuda")
    assert report["device"] == torch.cuda.get_device_name("cuda") and report["steps"] == 150
    assert report["first_loss"] == pytest.approx(cpu["first_loss"], rel=0.02)
    assert report["final_loss"] < 0.5 * report["first_loss"]
    assert len((tmp_path / "loss.jsonl").read_text().splitlines()) == 150
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float32}


def test_an_export_older_than_the_demo_vlm_is_redone(tmp_path):
    """The export step reuses a finished export only if it was made after the demo VLM last changed: a stage-2
    round added to a run folder must not be scored (and shipped) through the previous VLM's ONNX graphs."""
    import os

    from export import io_spec
    from finetune.demo_models import _finished_after

    vlm = tmp_path / "stage2f" / "model.safetensors"
    vlm.parent.mkdir()
    vlm.write_bytes(b"weights")
    export = tmp_path / "onnx" / "fp32"
    export.mkdir(parents=True)
    assert not _finished_after(export, vlm)  # unfinished: no manifest yet
    (export / io_spec.MANIFEST).write_text("{}")
    os.utime(vlm, (1_000, 1_000))
    os.utime(export / io_spec.MANIFEST, (2_000, 2_000))
    assert _finished_after(export, vlm)
    os.utime(vlm, (3_000, 3_000))  # a new round merged after the export
    assert not _finished_after(export, vlm)
