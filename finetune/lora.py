"""LoRA helpers as free functions: where each architecture keeps its parts, what each stage trains, checks.

Stage 1 (alignment) trains the connector only: the vision-to-text projection,
Idefics3/SmolVLM ``model.connector``, LLaVA ``model.multi_modal_projector``.
Stage 2 puts LoRA on the linear layers of the *text* model's decoder layers
(Idefics3 ``model.text_model.layers.N...``, LLaVA
``model.language_model.layers.N...``), optionally training the connector and
other whole modules (``modules_to_save``, e.g. ``lm_head``) too. Both stages
produce one PEFT adapter: stage 1 has no LoRA layers (peft's
``DUMMY_TARGET_MODULES``) and carries the connector as a module to save.

The LoRA target is a regex anchored on the text model's prefix: SigLIP/CLIP
vision towers name their projections ``q_proj``/``v_proj`` too, so a plain
list of names would also adapt the vision tower.

What it knows nothing about: data, tokenizers, optimizers, files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from edge_vit.errors import EdgeVitError

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "LORA_MODULES",
    "arch_spec",
    "text_lora_regex",
    "lora_config",
    "trainable_names",
    "count_parameters",
    "check_trainable",
    "check_module_names",
    "unwrap_name",
]

# Linear layers of a Llama-style decoder layer (SmolVLM's and LLaVA's text models).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (as ``named_modules`` of the ``*ForConditionalGeneration`` model writes them)."""

    model_type: str
    text_model: str  # the decoder stack; its ``.layers.N`` get LoRA
    connector: str  # vision features -> text embeddings; stage 1 trains it
    vision_tower: str  # never trained here

    def parts(self) -> tuple[str, str, str]:
        return self.text_model, self.connector, self.vision_tower


# transformers >= 4.52 layout (checked against the real module names of 4.57).
ARCHITECTURES: dict[str, ArchSpec] = {
    "idefics3": ArchSpec("idefics3", "model.text_model", "model.connector", "model.vision_model"),
    "smolvlm": ArchSpec("smolvlm", "model.text_model", "model.connector", "model.vision_model"),
    "llava": ArchSpec("llava", "model.language_model", "model.multi_modal_projector", "model.vision_tower"),
}


def arch_spec(model: Any) -> ArchSpec:
    """The ArchSpec of a loaded model; a clear error when the model's layout is not the expected one."""
    model_type = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise EdgeVitError(f"training supports model types {', '.join(ARCHITECTURES)}; got '{model_type}'")
    names = {n for n, _ in model.named_modules()}
    missing = [p for p in spec.parts() if p not in names]
    if missing:
        raise EdgeVitError(f"{model_type} model has no module {', '.join(missing)}; this transformers version "
                           f"lays the model out differently than edge-vit expects")
    return spec


def text_lora_regex(spec: ArchSpec, modules: Sequence[str] = LORA_MODULES) -> str:
    """A regex (peft matches it with ``re.fullmatch`` on module names) for ``modules`` in the text decoder layers."""
    modules = list(dict.fromkeys(modules))
    bad = [m for m in modules if m not in LORA_MODULES]
    if not modules or bad:
        raise EdgeVitError(f"LoRA modules must be among {', '.join(LORA_MODULES)}; got {', '.join(modules) or 'none'}")
    attn = [m for m in modules if m in _ATTENTION]
    mlp = [m for m in modules if m not in _ATTENTION]
    alternatives = []
    if attn:
        alternatives.append(rf"self_attn\.({'|'.join(attn)})")
    if mlp:
        alternatives.append(rf"mlp\.({'|'.join(mlp)})")
    return rf"{re.escape(spec.text_model)}\.layers\.\d+\.({'|'.join(alternatives)})"


def lora_config(
    spec: ArchSpec,
    stage: int,
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    modules: Sequence[str] = LORA_MODULES,
    train_connector: bool = False,
    modules_to_save: Iterable[str] = (),
):
    """The peft ``LoraConfig`` of a stage: 1 = connector (+ modules_to_save); 2 = text LoRA (+ connector, modules)."""
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if stage not in (1, 2):
        raise EdgeVitError(f"--stage must be 1 or 2, got {stage}")
    save = list(dict.fromkeys(modules_to_save))
    for name in save:
        if spec.vision_tower == name or spec.vision_tower.endswith("." + name) or name.startswith(spec.vision_tower):
            raise EdgeVitError(f"modules_to_save: '{name}' is the vision tower, which edge-vit keeps frozen")
    if stage == 1 or train_connector:
        save = [spec.connector, *[s for s in save if s != spec.connector]]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=DUMMY_TARGET_MODULES if stage == 1 else text_lora_regex(spec, modules),
        modules_to_save=save or None,
        bias="none",
    )


def check_module_names(model: Any, names: Iterable[str]) -> None:
    """Every ``modules_to_save`` name must name a module (peft matches a name or a dotted suffix of one)."""
    modules = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not any(m == name or m.endswith("." + name) for m in modules):
            top = sorted({m.split(".")[0] for m in modules} | {".".join(m.split(".")[:2]) for m in modules})
            raise EdgeVitError(f"modules_to_save: no module named '{name}' in this model "
                               f"(it has e.g. {', '.join(top[:8])})")


def unwrap_name(name: str) -> str:
    """A PeftModel parameter name as the base model names it (adapter wrappers removed)."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    name = name.replace(".base_layer.", ".")
    return name


def trainable_names(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; modules_to_save copies count once as trainable, once in the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." not in n)
    return trainable, total


def check_trainable(model: Any, spec: ArchSpec, stage: int) -> dict[str, int]:
    """Assert that only the intended parameters train; returns trainable parameter counts per part.

    Nothing under the vision tower trains; LoRA matrices exist only inside the
    text model's layers; stage 1 has no LoRA at all. A violation is a bug (or a
    model laid out in an unexpected way) and raises RuntimeError.
    """
    parts = {"lora": 0, "connector": 0, "other": 0}
    for name, p in model.named_parameters():
        base = unwrap_name(name)
        is_lora = ".lora_" in name
        if is_lora and (stage == 1 or not re.match(rf"{re.escape(spec.text_model)}\.layers\.\d+\.", base)):
            raise RuntimeError(f"LoRA parameter outside the text model's layers: {name}")
        if not p.requires_grad:
            continue
        if base.startswith(spec.vision_tower + "."):
            raise RuntimeError(f"vision tower parameter is trainable: {name}")
        if is_lora:
            parts["lora"] += p.numel()
        elif base.startswith(spec.connector + "."):
            parts["connector"] += p.numel()
        else:
            parts["other"] += p.numel()
    if stage == 1 and parts["connector"] == 0:
        raise RuntimeError("stage 1 trains no connector parameter")
    if stage == 2 and parts["lora"] == 0:
        raise RuntimeError("stage 2 has no LoRA parameter")
    return parts
