"""Adapters onto base models: in memory for evaluation, or merged into a full model folder.

    edge-vit finetune merge --base MODEL --adapter ADAPTER_DIR --out MERGED_DIR

``merge_adapter`` loads the base the way the runtime does (``TorchVLM.load``),
applies the PEFT adapter, folds it in with ``merge_and_unload`` and writes a
plain transformers folder (safetensors weights, config, generation config and
the base's processor files) that ``load_vlm`` and ``edge-vit export onnx``
take like any hub model. A ``training_history.json`` lists the stages the
weights went through, so the next stage's model card can list them too.

What it knows nothing about: data, training, the optimizer.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError, ModelLoadError

__all__ = ["read_adapter_config", "apply_adapter", "load_vlm_with_adapter", "merge_adapter"]

log = logging.getLogger(__name__)


def read_adapter_config(adapter: str | Path) -> dict:
    """The adapter's ``adapter_config.json``; one-line error when the folder is not a PEFT adapter."""
    path = Path(adapter)
    config = path / "adapter_config.json"
    if not path.is_dir() or not config.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"'{adapter}' is not a PEFT adapter folder (adapter_config.json + "
                             f"adapter_model.safetensors, as edge-vit finetune train writes)")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelLoadError(f"{config}: not valid JSON") from None


def _untie_if_needed(model: Any) -> None:
    """A trained lm_head copy is no longer the embedding table: stop the config from tying them on reload."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is emb.weight:
        return
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        configs.append(text)
    if any(getattr(c, "tie_word_embeddings", False) for c in configs):
        for c in configs:
            c.tie_word_embeddings = False


def apply_adapter(model: Any, adapter: str | Path) -> Any:
    """``model`` with the adapter merged into its weights (``merge_and_unload``); the model is changed in place."""
    from peft import PeftModel

    read_adapter_config(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"cannot apply adapter '{adapter}' to this model: {str(exc).splitlines()[0]}") from None
    merged = peft_model.merge_and_unload()
    _untie_if_needed(merged)
    return merged.eval()


def load_vlm_with_adapter(base: str, adapter: str | Path | None = None, *, device: str = "cpu",
                          dtype: str = "float32", tiling: Any = "single") -> Any:
    """A runtime ``TorchVLM`` for ``base`` with ``adapter`` merged in memory (or the base alone)."""
    from edge_vit.vlm import TilingPolicy
    from edge_vit.vlm.torch_backend import TorchVLM

    if adapter is not None:
        read_adapter_config(adapter)  # fail before loading the base
    vlm = TorchVLM.load(base, device=device, dtype=dtype, tiling=TilingPolicy(tiling))
    if adapter is None:
        return vlm
    model = apply_adapter(vlm.model, adapter)
    return TorchVLM(model, vlm.processor, name=f"{base}+{Path(adapter).name}", tiling=TilingPolicy(tiling))


def _history(base: str, adapter: Path) -> dict:
    stages: list = []
    summary = adapter / "train_summary.json"
    if summary.is_file():
        try:
            stages = list(json.loads(summary.read_text(encoding="utf-8")).get("stages", []))
        except (ValueError, AttributeError):
            stages = []
    if not stages:  # an adapter from elsewhere: record what we know
        base_history = Path(base) / "training_history.json"
        if base_history.is_file():
            try:
                stages = list(json.loads(base_history.read_text(encoding="utf-8")).get("stages", []))
            except (ValueError, AttributeError):
                stages = []
        stages.append({"stage": None, "adapter": str(adapter.absolute())})
    return {"base_model": base, "adapter": str(adapter.absolute()), "stages": stages}


def merge_adapter(base: str, adapter: str | Path, out: str | Path, *, dtype: str = "float32",
                  overwrite: bool = False, save_dtype: str | None = None) -> Path:
    """Write ``base`` + ``adapter`` as one transformers model folder at ``out``; returns ``out``.

    ``dtype``: what the merge runs in; ``save_dtype``: the saved weights' dtype, when not that (e.g. merge in
    float32, where small LoRA deltas survive, and save in bfloat16).
    """
    from transformers import AutoProcessor

    from edge_vit.vlm.torch_backend import TorchVLM, check_model_folder

    adapter = Path(adapter)
    out = Path(out)
    adapter_config = read_adapter_config(adapter)
    check_model_folder(base)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not (out / "config.json").is_file():
            raise EdgeVitError(f"--out {out} is not empty" + ("; pass --overwrite to replace a merged model there"
                                                             if (out / "config.json").is_file() else ""))
        shutil.rmtree(out)
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and Path(recorded).name != Path(base).name:
        log.warning("adapter %s was trained on %s, merging into %s", adapter, recorded, base)
    vlm = TorchVLM.load(base, dtype=dtype)
    model = apply_adapter(vlm.model, adapter)
    if save_dtype and save_dtype != dtype:
        import torch

        model = model.to(getattr(torch, save_dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # The base's processor as it is on disk: the loaded one carries the runtime's tiling settings
    # (apply_tiling), which would otherwise become the merged model's defaults.
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    history = _history(base, adapter)
    (out / "training_history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    card = adapter / "README.md"
    body = card.read_text(encoding="utf-8").split("---", 2)[-1] if card.is_file() else ""
    (out / "README.md").write_text(
        f"# Merged model\n\n`{base}` with the adapter `{adapter}` merged in (`edge-vit finetune merge`, "
        f"{dtype}" + (f", saved in {save_dtype}" if save_dtype and save_dtype != dtype else "") + "). Stages: {', '.join(str(s.get('stage')) for s in history['stages'])}.\n\n"
        f"## The adapter's card\n{body}", encoding="utf-8")
    return out
