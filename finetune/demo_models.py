"""Reproduce the shipped demo models from scratch: the shapes detector and the small shapes VLM.

    edge-vit finetune demo-models --out runs/demo-models [--steps shapes,detector,...] [--quick] [--install]

The steps, each resumable (a step whose output exists is skipped):

1. ``shapes``: the shapes world with colour-shape labels (``red circle``: 30
   classes), so the grounding text carries each object's colour.
2. ``detector``: YOLO26n from ``yolo26n.yaml`` (random init, offline) trained by
   Ultralytics on it, then exported to ONNX by Ultralytics (the one-to-many head
   with NMS after it). The ONNX file is what ships: no pickle in the package.
3. ``instruct``: LLaVA-style instruction data from the training split with the
   template teacher: all three kinds for stage 2, descriptions only for stage 1.
   With ``vlm_images`` the VLM's scenes are a second, larger shapes set
   (``shapes-vlm``), rendered by this step: the detector needs a few thousand
   scenes, the VLM needs to see many more bindings of colour, shape and place.
   With ``size_words_from_round``, the same samples once more with size words
   in the grounding (``instruct-sizes``), for the stage-2 rounds from that one on.
   ``instruct-dense``: one conversation per scene of ``dense_turns`` questions,
   up to ``dense_per_kind`` of each kind, for stage 0. With ``pretrain_scenes``,
   ``instruct-stage0``: that many more scenes rendered in memory only (no
   images written), two dense conversations and a description of each, for
   stage 0 alone.
4. ``base``: the base VLM. An Idefics3 (SmolVLM architecture) of a small
   config with a byte-level BPE tokenizer trained on the instruction text,
   whose language model is then pretrained (all its weights, causal LM loss,
   text only) on ``pretrain_data``: the dense conversations and the
   descriptions as text-only chats (grounding, question, answer; no image),
   in ``pretrain_rounds`` (each a fresh schedule on the last round's weights),
   on ``--device`` (a GPU: bf16 autocast), each round cut to ``pretrain_hours``
   if set. Resumable: ``base.tmp`` keeps the tokenized texts and the finished
   rounds, so a folder prepared here can finish stage 0 on a GPU machine.
   The stand-in for the instruction-tuned LLM that SmolVLM starts from: it has
   learned to read an answer off the grounding before it sees an image. (A
   stage 0 of descriptions alone left a language model that bound an object
   to its grounding line no better than chance, and stage 2 could not teach it.)
   With ``base_lm`` (``--base-lm``, DemoRecipe.pretrained) the text model is a
   pretrained LM's instead (finetune.base_lm) and stage 0 only adapts it.
5. ``stage1``: ``edge-vit finetune train --stage 1`` (the connector only, on
   image + grounding -> description), merged.
6. ``stage2``: ``edge-vit finetune train --stage 2`` (LoRA on the text model,
   plus the connector, on all three kinds), merged; in rounds (``stage2``,
   ``stage2b``...), each a fresh LoRA on the previous round's merge. The last
   round is the demo VLM. Rounds from ``size_words_from_round`` on see size
   words in the grounding ("- small red star at right"), rounds from
   ``question_order_from_round`` the question order, rounds from
   ``question_counts_from_round`` the counts line ("Counts: 5 in all, red: 2."),
   and so does the demo VLM at run time (``models.json`` records its
   grounding). Rounds from ``focus_from_round`` train on data aimed at one
   question kind (``focus``: half of the samples are counting questions).
7. ``eval``: ``edge-vit finetune eval`` of stage 1 and stage 2 on a held-out
   benchmark (fresh seed) through detector -> grounding -> VLM, each model
   with the grounding it was tuned with.
8. ``export``: the demo VLM exported to ONNX (fp32), fused and quantized
   (int8, int4), each variant scored on the same benchmark with the ONNX
   Runtime backend: what quantization costs in accuracy.
9. ``install`` (with ``--install``): copy the detector and the demo VLM (or,
   with ``ship``, one of its ONNX variants) into ``edge_vit/assets/demo``.

What it must not do: download anything, or write into the package without
``--install``. CPU times on the 2-core machine are in the README.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError

__all__ = ["DemoRecipe", "STEPS", "VARIANTS", "TokenCorpus", "build_demo_vlm", "pretrain_texts", "pretrain_text",
           "run_demo_models", "ASSETS"]

log = logging.getLogger(__name__)

STEPS = ("shapes", "detector", "instruct", "base", "stage1", "stage2", "eval", "export", "install")
VARIANTS = ("fp32", "int8", "int4")  # the exported demo VLM's variants that the export step scores
ASSETS = Path(__file__).resolve().parent.parent / "edge_vit" / "assets" / "demo"
# The grounding budget the demo uses everywhere (data, eval, edge-vit demo): six objects always fit.
DEMO_GROUNDING_TOKENS = 160


@dataclass(frozen=True)
class DemoRecipe:
    """Every setting of the demo models; ``--quick`` shrinks it to a smoke run (minutes)."""

    seed: int = 0
    # shapes world
    shapes_seed: int = 1
    images: int = 2000
    imgsz: int = 256
    # Scenes for the VLM's data (instruction data and stage 0 text), rendered as a second shapes set
    # (``shapes-vlm``, another seed). 0: the detector's training split (1,600 scenes), which a 2M-param model
    # memorizes: the first shipped VLM answered 50% on fresh scenes with a training loss of 0.2.
    vlm_images: int = 16000
    # detector
    det_epochs: int = 40
    det_hours: float = 1.6  # Ultralytics' time limit (it shortens the schedule to fit)
    det_batch: int = 32
    det_init: str | None = None  # weights to start from (a .pt); None: random init
    # A second detector round: fine-tune the first round's best weights at det_ft_imgsz on det_ft_images fresh
    # scenes rendered at that size (another seed), det_ft_epochs epochs cut to det_ft_hours; the shipped ONNX
    # then takes det_ft_imgsz (the benchmark's and the clip's scenes are 320 px). det_ft_epochs 0: no second round.
    # Measured 2026-12-05 (seed 2026 benchmark): mAP50 0.966 -> 0.980, detections exactly right on 81.0% -> 87.5%
    # of the scenes (README).
    det_ft_epochs: int = 8
    det_ft_images: int = 4000
    det_ft_imgsz: int = 320
    det_ft_hours: float = 1.25
    # base VLM
    vocab_size: int = 1024
    tile: int = 128  # one 128-px tile: 16 image tokens
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vision_hidden: int = 64
    vision_layers: int = 2
    # Start the text model from a pretrained causal LM (finetune.base_lm: a hub id, a folder or a .gguf file),
    # its first base_lm_layers layers (None: all), its embeddings moved to the tokenizer above; hidden, layers,
    # heads, kv_heads and intermediate then come from it. None: a text model of those sizes, random init.
    # DemoRecipe.pretrained() is the recipe around one (measured in the README, not shipped).
    base_lm: str | None = None
    base_lm_layers: int | None = None
    # dtype of the demo VLM's saved weights (the last stage-2 round's merge: what eval, export and install
    # read; the runtime loads them as float32 unless told otherwise). Training is fp32 throughout.
    save_dtype: str = "float32"
    # What install copies as the demo VLM: "torch" (the last round's merged model, safetensors) or one of
    # VARIANTS (that ONNX export folder; edge-vit demo then runs the onnx backend). export_prefill_graph: the
    # quantized variants' decoder_prefill.onnx (faster prompts, the size of an int8 decoder more on disk).
    ship: str = "torch"
    export_prefill_graph: bool = True
    # Optimum's check of the fp32 graphs against PyTorch (max abs diff per output).
    export_atol: float = 1e-4
    # Stage 0 rounds (steps, peak lr), each a fresh optimizer and schedule on the previous round's weights with
    # seed + round. The second round (loss 0.300 -> 0.285) took the text-only probe of the benchmark's prompts
    # from 83 to 94% on counting and 33 to 64% on position; the demo VLM kept the counting part of it: 70.8% ->
    # 73.2% overall, counting 86.5 -> 91.5% (on a second seed 70.9 -> 71.5%, counting 86.0 -> 92.0%).
    pretrain_rounds: tuple[tuple[int, float], ...] = ((2500, 2e-3), (3000, 1e-3))
    pretrain_batch: int = 16
    # Wall-clock limit of each stage-0 round in hours (0: none). As Ultralytics' ``time``: after a few timed
    # steps the round's schedule is shortened to the steps that fit; the report says how many ran.
    pretrain_hours: float = 0.0
    # "auto": bf16 autocast on a CUDA device, fp32 on the CPU (as the shipped recipe trained); "fp32"; "bf16"
    # (autocast on either; this CPU's AVX-512 BF16 makes a stage-0 step 1.5x faster).
    pretrain_precision: str = "auto"
    # Shapes-world scenes rendered in memory only for stage 0 (folder instruct-stage0, seed shapes_seed + 2000,
    # no images written): each gives two dense conversations and a description, grounded as the demo VLM is
    # (final_grounding). 0: none.
    pretrain_scenes: int = 0
    # What stage 0 reads, as text-only chats (pretrain_texts): (data folder, sample kinds). instruct-dense:
    # one conversation per scene of dense_turns questions, up to dense_per_kind of each kind; a quarter of them
    # bind an object to its line ("What colour is the square at bottom?"), 2.4 per scene against 1.3 in the
    # mixed data's conversations.
    pretrain_data: tuple[tuple[str, tuple[str, ...]], ...] = (("instruct-dense", ("conversation",)),
                                                              ("instruct", ("detailed",)))
    dense_turns: tuple[int, int] = (8, 10)
    dense_per_kind: int = 5
    # stages (edge-vit finetune train)
    stage1_steps: int = 300
    stage1_lr: float = 3e-3
    # Stage 2 rounds (optimizer steps, peak lr): each round is a fresh LoRA on the previous round's merged
    # model. With one stage-0 round, a second stage-2 round of 3,000 steps took the benchmark from 65.5% to
    # 70.8%; after the two stage-0 rounds it adds nothing on the same data (73.2% -> 71.9% on seed 2026, 71.5% ->
    # 71.3% on 2027). The rounds after the first read the question-ordered data (question_order_from_round): each
    # of them took the benchmark further (seed 2026: 73.2% -> 85.4% -> 87.0% -> 88.9% -> 90.6%; README). The
    # sixth is the counting round (question_counts_from_round, focus_from_round).
    stage2_rounds: tuple[tuple[int, float], ...] = ((2000, 1e-3), (1500, 1e-3), (1500, 1e-3), (1500, 1e-3),
                                                    (1500, 1e-3), (1500, 1e-3))
    # The stage-2 round (0-based) from which the grounding says each object's size (GroundingConfig.size_words
    # with the shapes world's thresholds), in an extra data folder (instruct-sizes); None: never. About a fifth
    # of the benchmark's colour and position questions name the object by its size ("the small square"), which
    # the plain grounding cannot answer. The shipped VLM never saw size words (None): a 600-step pilot round on
    # the previous demo VLM (dense 10-turn conversations with size words, lr 1e-3) scored 66.5% against its
    # 64.9%, within noise; its answers bind the wrong grounding line far more often than they miss a size.
    size_words_from_round: int | None = None
    # The stage-2 round (0-based) from which the grounding lists first the objects the question names
    # (ObjectOrder.QUESTION), in an extra data folder (instruct-question, its conversations one question long);
    # None: never. The runtime grounds each question with it too (models.json's grounding says so), so the
    # line that answers a question about one object is nearly always the first.
    question_order_from_round: int | None = 1
    # The stage-2 round (0-based) from which the grounding has its counts line (GroundingConfig.question_counts:
    # "Counts: 5 in all, purple: 2."), in an extra data folder (instruct-...-counts, one question long as with
    # the question order); None: never. Alone it did not help: two such rounds (1,500 steps each at 1e-3, 8.5%
    # of the samples counting questions) on the previous demo VLM moved its counting within the noise (seed
    # 2026: 89.0% -> 91.5%, 91.0%). With the count focus below (the same round) it helps a little: without the
    # line the focused round scored 94.0% on counting against 95.0% (README).
    question_counts_from_round: int | None = 5
    # The stage-2 round (0-based) from which the conversations ask questions of focus[0] for a share focus[1]
    # of their turns (TemplateTeacher's focus; finetune data --focus count:0.75) and the samples' kinds cycle
    # through focus_kinds (conversations four times as often), in an extra data folder (instruct-...-count75,
    # from the same scenes): half of the samples are then counting questions, the rest as in the other rounds.
    # None: never. Measured 2026-12-05 (seed 2026, the shipped detector at NMS IoU 0.5): round f took counting
    # from 91.5% to 95.0% (the VLM's own misses on the 181 exactly detected scenes 11 -> 4) and overall from
    # 92.1% to 93.6%, no kind lost; seeds 2027 and 4711: counting 95.5% and 99.0% (README).
    focus_from_round: int | None = 5
    focus: tuple[str, float] = ("count", 0.75)
    focus_kinds: tuple[str, ...] = ("conversation",) * 4 + ("detailed", "reasoning")
    batch_size: int = 16
    lora_r: int = 64
    lora_alpha: int = 128
    # Whole modules trained in stage 2 besides the LoRA. lm_head: with a stage 0 of descriptions only, the
    # answers' first tokens ("Yellow", "Top-right") never occurred before stage 2 and a frozen lm_head
    # collapsed to one colour ("Blue." for all 173 colour questions; FIELD-NOTES). Kept with the dense stage 0.
    stage2_modules_to_save: tuple[str, ...] = ("lm_head",)
    samples_per_image: int = 2
    # evaluation
    eval_seed: int = 2026
    eval_size: int = 200
    threads: int | None = None  # torch threads for the VLM steps (None: torch's default)

    @classmethod
    def quick(cls) -> "DemoRecipe":
        return cls(images=60, det_epochs=1, det_hours=0.0, det_batch=8, vocab_size=400, hidden=64, layers=2,
                   intermediate=128, vision_hidden=32, vision_layers=1, tile=64, pretrain_rounds=((20, 2e-3),),
                   pretrain_batch=8, stage1_steps=10, stage1_lr=1e-2, stage2_rounds=((40, 1e-2),),
                   batch_size=4, lora_r=8, lora_alpha=16,
                   samples_per_image=1, eval_size=4, vlm_images=40, size_words_from_round=0,
                   det_ft_epochs=1, det_ft_images=16, det_ft_imgsz=128, det_ft_hours=0.0)

    @classmethod
    def pretrained(cls, base_lm: str, layers: int | None = None) -> "DemoRecipe":
        """The recipe around a pretrained language model (``--base-lm``), as measured on 2 cores with
        SmolLM2-135M-Instruct (README: not shipped). The text model is all of its 30 layers (106.6M weights with
        the demo's 616-token vocabulary; 15 s a stage-0 step of 16 here), so the steps are few and the lrs
        those of fine-tuning; its fp32 logits reach tens, so Optimum's check of the export is 1e-2 (measured
        max diff 3e-3); the merge is saved in bf16 (213 MB); --install would ship the int8 export (121 MB,
        0.5 points under fp32; int4, 69 MB, lost 9.4)."""
        return cls(base_lm=base_lm, base_lm_layers=layers, pretrain_rounds=((60, 1e-4),), stage1_steps=60,
                   stage1_lr=1e-3, stage2_rounds=((100, 2e-4),), save_dtype="bfloat16", ship="int8",
                   export_prefill_graph=False, export_atol=1e-2)

    def with_overrides(self, values: dict) -> "DemoRecipe":
        """This recipe with ``values`` (field -> value, e.g. read from a YAML file) replacing its fields; lists
        become tuples, as the fields hold them. An unknown field is an EdgeVitError naming it."""
        from dataclasses import fields

        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EdgeVitError(f"unknown demo recipe field(s): {', '.join(unknown)}")

        def frozen(v):
            return tuple(frozen(x) for x in v) if isinstance(v, list) else v

        return replace(self, **{k: frozen(v) for k, v in values.items()})

    @property
    def det_imgsz(self) -> int:
        """The input size of the shipped detector: the second round's, if there is one."""
        return self.det_ft_imgsz if self.det_ft_epochs else self.imgsz

    def grounding(self, round_: int | None = None):
        """The grounding of stage-2 round ``round_`` (None: stages 0 and 1); the last round's is the demo VLM's."""
        from edge_vit.grounding import GroundingConfig, ObjectOrder
        from finetune.shapes import SIZE_THRESHOLDS

        def from_(first: int | None) -> bool:
            return first is not None and round_ is not None and round_ >= first

        question = from_(self.question_order_from_round)
        return GroundingConfig(max_tokens=DEMO_GROUNDING_TOKENS,
                               size_words=SIZE_THRESHOLDS if from_(self.size_words_from_round) else None,
                               order=ObjectOrder.QUESTION if question else ObjectOrder.CONFIDENCE,
                               question_counts=from_(self.question_counts_from_round))

    def final_grounding(self):
        """The demo VLM's grounding: the last stage-2 round's."""
        return self.grounding(len(self.stage2_rounds) - 1)

    def instruct_data(self, round_: int) -> str:
        """The instruction data folder that stage-2 round ``round_`` trains on: instruct, or with the round's
        grounding options in its name (instruct-sizes, instruct-question, instruct-sizes-question-counts...)."""
        from edge_vit.grounding import ObjectOrder

        g = self.grounding(round_)
        question = g.order is ObjectOrder.QUESTION
        focus = self.focus_of(round_)
        return ("instruct" + ("-sizes" if g.size_words else "") + ("-question" if question else "")
                + ("-counts" if g.question_counts else "")
                + (f"-{focus[0]}{round(focus[1] * 100)}" if focus else ""))

    def focus_of(self, round_: int) -> tuple[str, float] | None:
        """The (question kind, share) that stage-2 round ``round_``'s conversations focus on, or None."""
        on = self.focus_from_round is not None and round_ >= self.focus_from_round
        return self.focus if on else None

    def one_question(self, round_: int) -> bool:
        """Whether round ``round_``'s conversations are one question long: its grounding depends on the
        question (question order, counts line), and at run time every question gets its own grounding."""
        from edge_vit.grounding import ObjectOrder

        g = self.grounding(round_)
        return g.order is ObjectOrder.QUESTION or g.question_counts


STAGE0_STATE, STAGE0_TOKENS = "stage0.json", "stage0_tokens.npz"  # in base.tmp while stage 0 runs
# The recipe's settings that make the base VLM (stage 0 included): a base.tmp built with others is rebuilt.
_BASE_FIELDS = ("seed", "shapes_seed", "vlm_images", "vocab_size", "tile", "hidden", "layers", "heads", "kv_heads",
                "intermediate", "vision_hidden", "vision_layers", "base_lm", "base_lm_layers", "pretrain_data",
                "pretrain_scenes", "dense_turns", "dense_per_kind", "size_words_from_round")
# ...and those of its rounds: changing them only matters once a round has moved the weights.
_ROUND_FIELDS = ("pretrain_rounds", "pretrain_batch", "pretrain_precision")

# ---------------------------------------------------------------- the base VLM


def _corpus(instruct_json: Path) -> list[str]:
    """Every turn's text of an instruction file (the tokenizer's training text)."""
    samples = json.loads(instruct_json.read_text(encoding="utf-8"))
    return [t["value"].replace("<image>", "").strip() for s in samples for t in s["conversations"]]


def build_demo_vlm(out_dir: Path, corpus: list[str], recipe: DemoRecipe) -> tuple[Path, dict | None]:
    """An Idefics3 of the recipe's size with a BPE tokenizer trained on ``corpus``: randomly initialized, or
    with ``recipe.base_lm``'s first ``base_lm_layers`` layers as its text model (finetune.base_lm).

    Returns the folder and the base LM's report (None without one).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edge_vit.tiny import IDEFICS3_SPECIAL_TOKENS, idefics3_tokenizer, save_idefics3

    raw = Tokenizer(models.BPE())
    # Digits one by one: counts are read and written digit by digit, never as merged number tokens.
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=IDEFICS3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus + ["User: Assistant: 0 1 2 3 4 5 6 7 8 9"], trainer=trainer)
    tokenizer = idefics3_tokenizer(raw)
    base = None
    if recipe.base_lm:
        from finetune.base_lm import load_base_lm, text_dims

        base = load_base_lm(recipe.base_lm)
        text = text_dims(base, recipe.base_lm_layers)
    else:
        text = dict(hidden_size=recipe.hidden, intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
                    num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads)
    report: dict = {}
    if base is not None:
        from finetune.base_lm import init_text_model

        def init(model) -> None:
            report.update(init_text_model(model, base, tokenizer, seed=recipe.seed))
    save_idefics3(
        out_dir, tokenizer, tile=recipe.tile, split=False, seed=recipe.seed, max_positions=1024,
        vision=dict(hidden_size=recipe.vision_hidden, intermediate_size=2 * recipe.vision_hidden,
                    num_hidden_layers=recipe.vision_layers, num_attention_heads=2),
        text=text, init=init if base is not None else None,
    )
    return out_dir, report or None


def pretrain_texts(instruct_json: Path, processor: Any, kinds: tuple[str, ...]) -> list[str]:
    """Stage 0 text: each instruction sample of ``kinds`` as a text-only chat in the processor's chat template.

    The grounding and request, the answer, any further turns; the image left out. The stand-in for an
    instruction-tuned LLM: it has read questions about such grounding (and descriptions) before it ever
    sees an image.
    """
    from finetune.collate import to_messages

    samples = json.loads(instruct_json.read_text(encoding="utf-8"))
    texts = []
    for s in samples:
        if s.get("kind") not in kinds:
            continue
        messages = to_messages(s["conversations"])  # the trainer's own conversion, image placeholder removed
        messages[0]["content"] = [c for c in messages[0]["content"] if c["type"] != "image"]
        texts.append(processor.apply_chat_template(messages))
    return texts


@dataclass(frozen=True)
class TokenCorpus:
    """Stage 0's texts, tokenized once: every text's ids end to end (``ids``) and where each starts (``offsets``,
    one more than there are texts). Saved beside the base model while stage 0 runs, so a resumed run (or one
    moved to a GPU machine) does not tokenize again."""

    ids: Any  # np.ndarray [total] uint16 (int32 for vocabularies over 65,536)
    offsets: Any  # np.ndarray [texts + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: list[str], chunk: int = 20000) -> "TokenCorpus":
        """``texts`` tokenized without special tokens (the chat template opens with bos), ``chunk`` at a time:
        the token lists of a whole stage-0 corpus (120M tokens) would take tens of GB as Python ints."""
        import itertools

        import numpy as np

        dtype = np.uint16 if len(tokenizer) <= 2 ** 16 else np.int32
        parts, lengths = [np.zeros(0, dtype)], []
        for a in range(0, len(texts), chunk):
            encoded = tokenizer(texts[a:a + chunk], add_special_tokens=False)["input_ids"]
            lengths.extend(len(e) for e in encoded)
            parts.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype))
        offsets = np.zeros(len(lengths) + 1, np.int64)
        offsets[1:] = np.cumsum(lengths)
        return cls(np.concatenate(parts), offsets)

    @classmethod
    def concatenate(cls, corpora: list["TokenCorpus"]) -> "TokenCorpus":
        import numpy as np

        starts = np.cumsum([0] + [int(c.offsets[-1]) for c in corpora[:-1]])
        offsets = np.concatenate([[0]] + [c.offsets[1:] + s for c, s in zip(corpora, starts)])
        return cls(np.concatenate([c.ids for c in corpora]), offsets.astype(np.int64))

    def save(self, path: Path) -> None:
        import numpy as np

        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, ids=self.ids, offsets=self.offsets)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TokenCorpus":
        import numpy as np

        with np.load(path) as f:
            return cls(f["ids"], f["offsets"])

    def batch(self, idx: list[int], pad_id: int) -> tuple[Any, Any]:
        """(ids [B, T] int64, attention mask [B, T]) of texts ``idx``, right-padded to the longest."""
        import torch

        starts, ends = self.offsets[idx], self.offsets[[i + 1 for i in idx]]
        width = int((ends - starts).max())
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            ids[r, :b - a] = torch.from_numpy(self.ids[a:b].astype("int64"))
            mask[r, :b - a] = 1
        return ids, mask


def pretrain_text(model_dir: Path, corpus: TokenCorpus, recipe: DemoRecipe, log_path: Path | None = None,
                  round_: int = 0, device: str = "cpu") -> dict:
    """Stage 0 round ``round_``: causal-LM training of the language model's weights (all of them) on ``corpus``,
    with the round's steps and peak lr and seed + round, saved in place.

    On a CUDA device the loss is read back every 100 steps rather than every step, and AdamW is fused;
    ``recipe.pretrain_precision`` says whether forward and backward run under bf16 autocast (fp32 master
    weights). ``recipe.pretrain_hours`` > 0 shortens the round's schedule to the steps that fit that time.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune.train import lr_factor

    if len(corpus) == 0:
        raise EdgeVitError("stage 0: no samples of the recipe's pretrain_data to pretrain on")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise EdgeVitError(f"stage 0: --device {device}, but torch sees no CUDA GPU")
    if recipe.pretrain_precision not in ("auto", "fp32", "bf16"):
        raise EdgeVitError(f"stage 0: pretrain_precision must be auto, fp32 or bf16, got {recipe.pretrain_precision!r}")
    bf16 = recipe.pretrain_precision == "bf16" or (recipe.pretrain_precision == "auto" and cuda)
    pad_id = AutoProcessor.from_pretrained(model_dir).tokenizer.pad_token_id
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device)
    text_model, lm_head = model.model.text_model, model.lm_head
    params = [p for p in [*text_model.parameters(), *lm_head.parameters()]]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    steps, lr = recipe.pretrain_rounds[round_]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=cuda)
    plan = {"total": steps, "warmup": max(1, steps // 20)}  # the time limit may shorten both
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=plan["warmup"], total=plan["total"], min_ratio=0.1))
    g = torch.Generator().manual_seed(recipe.seed + round_)
    model.train()
    losses: list[float] = []
    pending: list[Any] = []  # loss tensors not read back yet
    limit_s = recipe.pretrain_hours * 3600
    timed_from, timed_steps = 10, 40  # steps whose duration sets the schedule under a time limit
    t0 = time.perf_counter()
    t_timed = None
    log_f = open(log_path, "w", encoding="utf-8") if log_path else None

    def read_back() -> None:
        values = torch.stack(pending).tolist() if pending else []
        pending.clear()
        for v in values:
            losses.append(v)
            if log_f:
                log_f.write(json.dumps({"step": len(losses), "loss": round(v, 5)}) + "\n")

    try:
        step = 0
        while step < plan["total"]:
            if limit_s and step == timed_from:
                if cuda:
                    torch.cuda.synchronize()
                t_timed = time.perf_counter()
            if limit_s and step == timed_from + timed_steps:
                if cuda:
                    torch.cuda.synchronize()
                per_step = (time.perf_counter() - t_timed) / timed_steps
                fits = step + int((limit_s - (time.perf_counter() - t0)) / per_step)
                plan["total"] = max(step + 1, min(steps, fits))
                plan["warmup"] = max(1, min(plan["warmup"], plan["total"] // 20))
            idx = torch.randint(len(corpus), (recipe.pretrain_batch,), generator=g).tolist()
            ids, mask = corpus.batch(idx, pad_id)
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            labels = ids.masked_fill(mask == 0, -100)
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = lm_head(hidden[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            pending.append(loss.detach())
            step += 1
            if not cuda or step % 100 == 0 or step == plan["total"]:
                read_back()
            if step % 100 == 0 or step == plan["total"]:
                print(f"stage 0 round {round_ + 1}/{len(recipe.pretrain_rounds)}: step {step}/{plan['total']} "
                      f"loss {sum(losses[-100:]) / len(losses[-100:]):.4f}", file=sys.stderr, flush=True)
    finally:
        if log_f:
            log_f.close()
    model.eval()
    model.to("cpu").save_pretrained(model_dir, safe_serialization=True)
    report = {"steps": len(losses), "lr": lr, "texts": len(corpus), "first_loss": losses[0],
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.perf_counter() - t0, 1),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "precision": "bf16" if bf16 else "fp32"}
    if len(losses) < steps:
        report["planned_steps"] = steps  # shortened by pretrain_hours
    return report


def prepare_stage0(out: Path, recipe: DemoRecipe) -> tuple[Path, TokenCorpus, dict]:
    """``out/base.tmp`` ready for stage 0: the base VLM built (build_demo_vlm), the stage-0 texts tokenized
    (STAGE0_TOKENS) and the state (STAGE0_STATE: the recipe's base settings, the base LM report, each finished
    round's report). Returns (folder, tokens, state).

    What is there already is kept, so a stopped stage 0 resumes after its last finished round, and a folder
    prepared on one machine can finish on another (a GPU's); a base.tmp of other base settings is rebuilt.
    """
    tmp = out / "base.tmp"
    state_path, tokens_path = tmp / STAGE0_STATE, tmp / STAGE0_TOKENS
    key, rounds_key = (json.loads(json.dumps({k: getattr(recipe, k) for k in fields}))
                       for fields in (_BASE_FIELDS, _ROUND_FIELDS))
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    if state.get("recipe") != key or (state["rounds"] and state.get("rounds_recipe") != rounds_key):
        shutil.rmtree(tmp, ignore_errors=True)
        report = build_demo_vlm(tmp, _corpus(out / "instruct" / "instruct.json"), recipe)[1]
        state = {"recipe": key, "base_lm": report, "rounds": []}
    state["rounds_recipe"] = rounds_key
    state_path.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if tokens_path.is_file():
        return tmp, TokenCorpus.load(tokens_path), state
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp)
    # one folder at a time: a folder's JSON is let go before the next one is read
    corpus = TokenCorpus.concatenate([TokenCorpus.from_texts(processor.tokenizer, pretrain_texts(
        out / folder / "instruct.json", processor, kinds)) for folder, kinds in recipe.pretrain_data])
    if len(corpus) == 0:
        raise EdgeVitError("stage 0: no samples of the recipe's pretrain_data to pretrain on")
    corpus.save(tokens_path)
    return tmp, corpus, state


# ---------------------------------------------------------------- steps


def _detector(out: Path, recipe: DemoRecipe, device: str) -> Path:
    from ultralytics import YOLO

    from export.yolo import YoloExportOptions, export_yolo

    data = out / "shapes" / "data.yaml"
    model = YOLO("yolo26n.yaml")
    if recipe.det_init:
        model = model.load(recipe.det_init)
    # "auto" picks lr 2.9e-4 for 30 classes: too slow
    model.train(**_yolo_train_args(out, recipe, device, "detector", data, recipe.imgsz, recipe.det_epochs,
                                   recipe.det_hours, close_mosaic=8, lr0=0.002, warmup_epochs=1))
    best = out / "runs" / "detector" / "weights" / "best.pt"
    if recipe.det_ft_epochs:
        best = _detector_finetune(out, best, recipe, device)
    # The one-to-many head (NMS after, in Ultralytics' predictor): after this short training the NMS-free
    # one-to-one head trails it (mAP50 0.902 vs 0.966 on the benchmark).
    result = export_yolo(str(best), YoloExportOptions(imgsz=recipe.det_imgsz, end2end=False), out / "detector.onnx")
    return result.path


def _detector_finetune(out: Path, weights: Path, recipe: DemoRecipe, device: str) -> Path:
    """The second detector round (``det_ft_*``): ``weights`` fine-tuned at ``det_ft_imgsz``; its best.pt."""
    from ultralytics import YOLO

    from finetune.shapes import ShapesConfig, generate_shapes

    data = out / "shapes-det-ft" / "data.yaml"
    if not data.is_file():
        shutil.rmtree(data.parent, ignore_errors=True)
        generate_shapes(data.parent, ShapesConfig(images=recipe.det_ft_images, imgsz=recipe.det_ft_imgsz,
                                                  seed=recipe.shapes_seed + 3000, val_fraction=0.05,
                                                  test_fraction=0.0, labels="colour-shape"))
    # A low lr without warm-up (warm-up starts the biases at lr 0.1), mosaic off for the last two epochs.
    YOLO(str(weights)).train(**_yolo_train_args(out, recipe, device, "detector-ft", data, recipe.det_ft_imgsz,
                                                recipe.det_ft_epochs, recipe.det_ft_hours, close_mosaic=2, lr0=3e-4,
                                                lrf=0.1, warmup_epochs=0, cos_lr=True))
    return out / "runs" / "detector-ft" / "weights" / "best.pt"


def _yolo_train_args(out: Path, recipe: DemoRecipe, device: str, name: str, data: Path, imgsz: int, epochs: int,
                     hours: float, **schedule) -> dict:
    """Ultralytics ``train`` arguments both detector rounds share (data, augmentation, AdamW), plus ``schedule``;
    ``hours`` > 0 is Ultralytics' time limit (it shortens the schedule to fit)."""
    args = dict(data=str(data), imgsz=imgsz, epochs=epochs, batch=recipe.det_batch, workers=2, device=device,
                project=str(out / "runs"), name=name, exist_ok=True, seed=recipe.seed, plots=True, amp=False,
                fliplr=0.5, mosaic=1.0, hsv_h=0.01, hsv_s=0.3, hsv_v=0.3, cache="ram", optimizer="AdamW", **schedule)
    if hours > 0:
        args["time"] = hours
    return args


def _train_stage(stage: int, model: Path, data: Path, out: Path, recipe: DemoRecipe, round_: int = 0) -> dict:
    """Stage 1, or round ``round_`` of stage 2 (a fresh LoRA on the previous round's merged model), merged."""
    from finetune.merge import merge_adapter
    from finetune.train import TrainConfig, run_training

    name = stage_name(stage, round_)
    steps, lr = (recipe.stage1_steps, recipe.stage1_lr) if stage == 1 else recipe.stage2_rounds[round_]
    common = dict(model=str(model), data=str(data), out=str(out / f"{name}-adapter"), stage=stage,
                  batch_size=recipe.batch_size, seed=recipe.seed + round_, tiling="single", precision="fp32",
                  device="cpu", warmup_ratio=0.05 if round_ == 0 else 0.02, min_lr_ratio=0.1, lora_dropout=0.0,
                  progress=sys.stderr.isatty(), log_every=max(1, steps // 300), max_steps=steps, lr=lr)
    if stage == 1:
        config = TrainConfig(**common)
    else:
        config = TrainConfig(**common, lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, train_connector=True,
                             modules_to_save=recipe.stage2_modules_to_save)
    summary = run_training(config)
    last = stage == 2 and round_ == len(recipe.stage2_rounds) - 1
    merge_adapter(str(model), out / f"{name}-adapter", out / name, overwrite=True,
                  save_dtype=recipe.save_dtype if last else None)
    return summary


def stage_name(stage: int, round_: int = 0) -> str:
    """Folder of a stage's merged model: stage1, stage2, then stage2b, stage2c... for further stage-2 rounds."""
    return f"stage{stage}" + ("" if round_ == 0 else "bcdefgh"[round_ - 1])


def final_vlm(out: Path, recipe: DemoRecipe) -> Path:
    """The demo VLM: the last stage-2 round's merged model."""
    return out / stage_name(2, len(recipe.stage2_rounds) - 1)


def shipped_vlm(out: Path, recipe: DemoRecipe) -> Path:
    """The folder install copies: the demo VLM itself, or its ONNX variant ``recipe.ship``."""
    if recipe.ship == "torch":
        return final_vlm(out, recipe)
    if recipe.ship not in VARIANTS:
        raise EdgeVitError(f"ship must be torch or one of {', '.join(VARIANTS)}, got {recipe.ship}")
    return out / "onnx" / recipe.ship


def _finished_after(folder: Path, source: Path) -> bool:
    """Whether ``folder`` holds a finished export (its manifest is written last) made after ``source`` last
    changed: a round added to a run folder makes a new demo VLM, whose exports must not be the previous one's."""
    from export import io_spec

    manifest = folder / io_spec.MANIFEST
    return manifest.is_file() and manifest.stat().st_mtime >= source.stat().st_mtime


def _export_variants(out: Path, recipe: DemoRecipe, device: str) -> dict:
    from export import io_spec
    from export.onnx_export import OnnxExportOptions, export_vlm_onnx
    from export.optimize import OptimizeOptions, optimize_onnx_folder

    onnx_dir = out / "onnx"
    fp32 = onnx_dir / "fp32"
    if not _finished_after(fp32, final_vlm(out, recipe) / "model.safetensors"):
        shutil.rmtree(fp32, ignore_errors=True)
        export_vlm_onnx(str(final_vlm(out, recipe)), fp32, OnnxExportOptions(atol=recipe.export_atol))
    reports = {}
    for variant in VARIANTS:
        folder = onnx_dir / variant
        if variant != "fp32" and not _finished_after(folder, fp32 / io_spec.MANIFEST):
            shutil.rmtree(folder, ignore_errors=True)
            optimize_onnx_folder(fp32, folder, OptimizeOptions(quantize=variant, prefill_graph=recipe.export_prefill_graph))
        reports[variant] = _evaluate(out, folder, recipe, device, backend="onnx", name=f"onnx-{variant}")
    return reports


def _evaluate(out: Path, vlm_dir: Path, recipe: DemoRecipe, device: str, backend: str = "torch",
              name: str | None = None, grounding: Any = None) -> dict:
    """``finetune eval`` of one model; ``grounding``: the one it was tuned with (default: the demo VLM's)."""
    from edge_vit.demo import DETECTOR_AGNOSTIC_NMS, DETECTOR_IOU
    from edge_vit.detector import Detector, DetectorConfig
    from edge_vit.vlm import GenerationConfig, load_vlm
    from finetune.evaluate import BenchConfig, evaluate, format_table
    from finetune.shapes import label_scheme

    detector_path = out / "detector.onnx"
    detector = Detector.load(DetectorConfig(model=str(detector_path), imgsz=recipe.det_imgsz, device=device,
                                            iou=DETECTOR_IOU, agnostic_nms=DETECTOR_AGNOSTIC_NMS))
    bench = BenchConfig(seed=recipe.eval_seed, size=recipe.eval_size, imgsz=320, labels=label_scheme(detector.names))
    vlm = load_vlm(str(vlm_dir), backend, device=device)
    name = name or vlm_dir.name
    root = out / "eval" / name
    if root.exists():
        shutil.rmtree(root)
    report, records = evaluate(vlm=vlm, detector=detector, bench=bench, root=root / "benchmark",
                               generation=GenerationConfig(max_new_tokens=24),
                               grounding=grounding or recipe.final_grounding(),
                               detector_path=str(detector_path), detector_imgsz=recipe.det_imgsz, device=device,
                               progress=sys.stderr.isatty())
    with open(root / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{name}:\n{format_table(report)}", file=sys.stderr)
    return report


def run_demo_models(out: str | Path, recipe: DemoRecipe = DemoRecipe(), steps: tuple[str, ...] = STEPS[:-1],
                    device: str = "cpu", install_to: Path = ASSETS) -> dict:
    """Run ``steps`` (in STEPS order) under ``out``; a step whose output exists is skipped. Returns the summary."""
    import torch

    from finetune.instruct import InstructConfig, SampleKind, build_instruct_data, build_instruct_rendered
    from finetune.shapes import ShapesConfig, generate_shapes
    from finetune.teachers import TemplateTeacher, load_prompts

    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise EdgeVitError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    summary["recipe"] = asdict(recipe)

    def save() -> None:
        summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    def timed(name: str, fn):
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        value = fn()
        summary.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        save()
        return value

    data_yaml = out / "shapes" / "data.yaml"
    grounding = recipe.grounding()  # stages 0 and 1
    data_names = {recipe.instruct_data(k) for k in range(len(recipe.stage2_rounds))}
    if "shapes" in steps and not data_yaml.is_file():
        timed("shapes", lambda: generate_shapes(out / "shapes", ShapesConfig(
            images=recipe.images, imgsz=recipe.imgsz, seed=recipe.shapes_seed, val_fraction=0.15, test_fraction=0.05,
            labels="colour-shape")))
    if "detector" in steps and not (out / "detector.onnx").is_file():
        timed("detector", lambda: _detector(out, recipe, device))
    instruct_dirs = tuple(dict.fromkeys(["instruct", "instruct-detailed", *sorted(data_names),
                                         *(d for d, _ in recipe.pretrain_data)]))
    if "instruct" in steps and not all((out / d / "instruct.json").is_file() for d in instruct_dirs):
        def instruct():
            vlm_yaml = data_yaml
            if recipe.vlm_images:
                vlm_yaml = out / "shapes-vlm" / "data.yaml"
                if not vlm_yaml.is_file():
                    shutil.rmtree(vlm_yaml.parent, ignore_errors=True)
                    generate_shapes(vlm_yaml.parent, ShapesConfig(
                        images=recipe.vlm_images, imgsz=recipe.imgsz, seed=recipe.shapes_seed + 1000,
                        val_fraction=0.01, test_fraction=0.0, labels="colour-shape"))
            teacher = TemplateTeacher(load_prompts())
            dense = TemplateTeacher(load_prompts(), min_turns=recipe.dense_turns[0], max_turns=recipe.dense_turns[1],
                                    per_kind=recipe.dense_per_kind)
            mixed = InstructConfig(seed=recipe.seed, samples_per_image=recipe.samples_per_image, grounding=grounding)

            def round_teacher(k: int) -> TemplateTeacher:
                one = dict(min_turns=1, max_turns=1) if recipe.one_question(k) else {}
                return TemplateTeacher(load_prompts(), **one, focus=recipe.focus_of(k))
            jobs = {  # folder: (teacher, config)
                "instruct": (teacher, mixed),
                "instruct-detailed": (teacher, InstructConfig(seed=recipe.seed, samples_per_image=1,
                                                              kinds=(SampleKind.DETAILED,), grounding=grounding)),
                # The same scenes (same seed) for each stage-2 round, grounded as that round is (size words,
                # question order): instruct-sizes, instruct-question, ... With the question order, conversations
                # are one question long: the grounding is ordered for the first question only, so later turns
                # would teach the model to look past the first line, while at run time every question gets its
                # own grounding.
                **{recipe.instruct_data(k): (round_teacher(k), replace(
                    mixed, grounding=recipe.grounding(k),
                    kinds=recipe.focus_kinds if recipe.focus_of(k) else mixed.kinds))
                   for k in range(len(recipe.stage2_rounds))},
                "instruct-dense": (dense, InstructConfig(seed=recipe.seed, samples_per_image=1,
                                                         kinds=(SampleKind.CONVERSATION,), grounding=grounding)),
                # Stage 0 only: two dense conversations and a description of each scene rendered in memory,
                # grounded as the demo VLM will be (size words too, if its last round has them), in the order
                # of stages 0 and 1 (a question order or counts line would hold for a conversation's first
                # question only).
                "instruct-stage0": (dense, InstructConfig(
                    seed=recipe.seed, samples_per_image=3,
                    grounding=replace(recipe.final_grounding(), order=grounding.order,
                                      question_counts=grounding.question_counts),
                    kinds=(SampleKind.CONVERSATION, SampleKind.CONVERSATION, SampleKind.DETAILED))),
            }
            for name in instruct_dirs:
                if (out / name / "instruct.json").is_file():
                    continue
                if name == "instruct-stage0":
                    if recipe.pretrain_scenes < 1:
                        raise EdgeVitError("pretrain_data names instruct-stage0: set pretrain_scenes "
                                           "(the scenes to render)")
                    counts = build_instruct_rendered(out / name, *jobs[name], seed=recipe.shapes_seed + 2000,
                                                     images=recipe.pretrain_scenes, imgsz=recipe.imgsz,
                                                     workers=os.cpu_count() or 1)["counts"]
                else:
                    counts = build_instruct_data(vlm_yaml, out / name, *jobs[name])["counts"]
                summary[name.replace("-", "_")] = counts
        timed("instruct", instruct)
    base = out / "base"
    if "base" in steps and not (base / "model.safetensors").is_file():
        def build_base():
            tmp, corpus, state = prepare_stage0(out, recipe)
            summary["base_lm"] = state["base_lm"]
            for k in range(len(state["rounds"]), len(recipe.pretrain_rounds)):
                log_name = "pretrain_loss.jsonl" if k == 0 else f"pretrain_loss_r{k + 1}.jsonl"
                state["rounds"].append(pretrain_text(tmp, corpus, recipe, out / log_name, k, device))
                (tmp / STAGE0_STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            summary["pretrain"] = state["rounds"]
            (tmp / STAGE0_TOKENS).unlink()
            (tmp / STAGE0_STATE).unlink()
            tmp.rename(base)
        timed("base", build_base)
    if "stage1" in steps and not (out / "stage1" / "config.json").is_file():
        summary["stage1"] = timed("stage1", lambda: _train_stage(1, base, out / "instruct-detailed" / "instruct.json",
                                                                 out, recipe))
    if "stage2" in steps:
        previous = out / "stage1"
        for k in range(len(recipe.stage2_rounds)):
            name = stage_name(2, k)
            if not (out / name / "config.json").is_file():
                summary[name] = timed(name, lambda k=k, previous=previous: _train_stage(
                    2, previous, out / recipe.instruct_data(k) / "instruct.json", out, recipe, k))
            previous = out / name
    if "eval" in steps:
        tuned = {"stage1": recipe.grounding(), **{stage_name(2, k): recipe.grounding(k)
                                                  for k in range(len(recipe.stage2_rounds))}}
        summary["eval"] = {name: timed(f"eval {name}", lambda name=name, g=g: _evaluate(out, out / name, recipe, device,
                                                                                       grounding=g))
                           for name, g in tuned.items()}
    if "export" in steps:
        summary["export"] = timed("export", lambda: _export_variants(out, recipe, device))
    if "install" in steps:
        save()  # install copies summary.json into models.json: the export step's report must be in it
        timed("install", lambda: install(out, install_to, shipped_vlm(out, recipe), grounding=recipe.final_grounding()))
    save()
    return summary


def install(out: Path, dest: Path = ASSETS, vlm_src: Path | None = None, grounding: Any = None) -> Path:
    """Copy the detector and the demo VLM (weights, config, processor files only) into ``dest``.

    ``grounding``: the GroundingConfig the VLM was tuned with (default: the default recipe's last round's).
    """
    from edge_vit.demo import vlm_backend, vlm_files

    vlm_src = vlm_src or final_vlm(out, DemoRecipe())
    if not (out / "detector.onnx").is_file() or not all((vlm_src / f).is_file() for f in vlm_files(vlm_backend(vlm_src))):
        raise EdgeVitError(f"{out}: run the detector and stage2 steps (and export, to ship an ONNX variant) before install")
    vlm_dest = dest / "vlm"
    if vlm_dest.exists():
        shutil.rmtree(vlm_dest)
    vlm_dest.mkdir(parents=True)
    for item in vlm_src.iterdir():
        if item.is_file() and item.suffix in (".json", ".safetensors", ".onnx", ".jinja", ".txt") \
                and item.name != "training_history.json":
            shutil.copy2(item, vlm_dest / item.name)
    shutil.copy2(out / "detector.onnx", dest / "detector.onnx")
    from edge_vit.demo import write_demo_clip

    write_demo_clip(dest)  # the bundled clip with its per-frame ground truth
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8")) if (out / "summary.json").is_file() else {}
    keep = {k: summary.get(k) for k in ("recipe", "seconds", "base_lm", "pretrain", "eval", "export") if k in summary}
    # The grounding the demo VLM was tuned with: edge-vit demo runs it with the same (demo_paths reads it).
    keep["grounding"] = (grounding or DemoRecipe().final_grounding()).as_json()
    (dest / "models.json").write_text(json.dumps(keep, indent=1) + "\n", encoding="utf-8")
    return dest
