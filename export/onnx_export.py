"""VLM to ONNX through Optimum: three graphs, the model's own files, and a manifest, in one folder.

``export_vlm_onnx(model, out_dir)`` loads an Idefics3/SmolVLM or LLaVA-family
model (a transformers folder or a cached hub id; a merged LoRA model is just a
folder), wraps it as three traceable sub-models and hands them to
``optimum.exporters.onnx.onnx_export_from_model`` with the custom configs of
``export.onnx_configs``. Optimum traces each graph and validates it against
PyTorch; a validation miss fails the export here (Optimum itself would only log
it). The folder then gets the processor/tokenizer files (so the ONNX backend
loads it on its own) and ``io_spec.MANIFEST`` last, which marks the export
complete.

The wrappers:
- vision: tiles [T, 3, S, S] -> connector features [T, tokens_per_tile, D]. For
  Idefics3 it skips HF's per-image Python loop, which is only valid for full
  tiles (what the processor produces), and takes the patch position ids from HF's
  own embedding code (they are bucketized, not ``arange``); a parity check
  against HF's ``get_image_features`` runs before the export.
- embedding: the text model's input embedding table.
- decoder: the model's own text model and ``lm_head`` put into the matching
  ``*ForCausalLM`` class (no copies), so Optimum's cache handling applies.

Heavy imports (torch, transformers, optimum) happen inside the functions.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_vit.errors import EdgeVitError, ModelLoadError
from export import io_spec

DEFAULT_OPSET = 18
MANIFEST_VERSION = 1
_VERSIONED = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


@dataclass(frozen=True)
class OnnxExportOptions:
    opset: int = DEFAULT_OPSET
    atol: float = 1e-4  # fp32 graphs vs PyTorch, checked by Optimum on every graph
    validate: bool = True
    trust_remote_code: bool = False


@dataclass(frozen=True)
class OnnxExportResult:
    out_dir: Path
    graph_bytes: dict[str, int]
    seconds: float
    manifest: dict = field(repr=False)


class ExportValidationError(EdgeVitError):
    """An exported graph does not match PyTorch within the tolerance."""


# ---------------------------------------------------------------- checks (cheap, before any heavy import)


def check_export_args(model_id: str, out_dir: str | Path) -> None:
    """Fail in milliseconds on inputs a user can fix: an --out that is a file, a folder that is not a model."""
    from edge_vit.vlm.base import check_model_type

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"--out '{out}' is a file; give a folder for the exported graphs")
    path = Path(model_id)
    if path.exists():
        config_file = path / "config.json"
        if not path.is_dir() or not config_file.is_file():
            raise ModelLoadError(
                f"cannot export '{model_id}': expected a transformers model folder (config.json, safetensors "
                f"weights, processor files) or a hub id in the local cache"
            )
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot export '{model_id}': config.json is not valid JSON ({exc})") from None
        check_model_type(str(model_type), model_id)
        if out.exists() and out.resolve() == path.resolve():
            raise EdgeVitError("--out must be a different folder than the model folder")


# ---------------------------------------------------------------- traceable sub-models


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config.text_config


def _language_model(model):
    inner = model.model
    lm = getattr(inner, "text_model", None)  # Idefics3
    return lm if lm is not None else inner.language_model  # LLaVA


def _make_vision_encoder(model):
    import torch
    from torch import nn

    config = model.config

    class Idefics3VisionEncoder(nn.Module):
        """Full tiles [T, 3, S, S] -> connector features [T, tokens_per_tile, D]."""

        def __init__(self) -> None:
            super().__init__()
            self.vision_model = model.model.vision_model
            self.connector = model.model.connector
            self.config = copy.deepcopy(config.vision_config)
            self.register_buffer("position_ids", _idefics3_position_ids(self.vision_model, config), persistent=False)

        def forward(self, pixel_values):
            emb = self.vision_model.embeddings
            x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # [T, Dv, h, w]
            x = x.flatten(2).transpose(1, 2)  # [T, N, Dv]
            x = x + emb.position_embedding(self.position_ids)  # + [1, N, Dv]
            # Full tiles: HF's all-ones patch mask becomes an all-zero additive mask, i.e. none.
            x = self.vision_model.encoder(inputs_embeds=x).last_hidden_state
            x = self.vision_model.post_layernorm(x)
            return self.connector(x)  # [T, N / scale^2, D]

    class LlavaVisionEncoder(nn.Module):
        """Images [T, 3, S, S] -> projected features [T, tokens, D] (layer / CLS choice from the config)."""

        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            self.layers = config.vision_feature_layer
            self.strategy = config.vision_feature_select_strategy
            if self.strategy not in ("default", "full"):
                raise ModelLoadError(f"vision_feature_select_strategy '{self.strategy}' is not supported")
            self.config = copy.deepcopy(config.vision_config)

        def forward(self, pixel_values):
            hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            picked = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
            feats = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
            return self.projector(feats)

    if config.model_type == "llava":
        return LlavaVisionEncoder().eval()
    return Idefics3VisionEncoder().eval()


def _idefics3_position_ids(vision_model, config):
    """Patch position ids of one full tile, taken from HF's own embedding code (bucketized, not arange)."""
    import torch

    emb = vision_model.embeddings
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    captured: list = []
    hook = emb.position_embedding.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    try:
        with torch.no_grad():
            pixels = torch.zeros(1, config.vision_config.num_channels, size, size,
                                 dtype=emb.patch_embedding.weight.dtype)
            emb(pixel_values=pixels, patch_attention_mask=torch.ones(1, size // patch, size // patch, dtype=torch.bool))
    finally:
        hook.remove()
    return captured[0].to(torch.int64)  # [1, N]


def _make_token_embedding(model):
    from torch import nn

    class TokenEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = model.get_input_embeddings()
            self.config = copy.deepcopy(_text_config(model.config))

        def forward(self, input_ids):  # [B, S] -> [B, S, D]
            return self.embed_tokens(input_ids)

    return TokenEmbedding().eval()


def _make_decoder(model):
    """The model's own text model + lm_head inside the matching ``*ForCausalLM`` (built on meta, no copies)."""
    import torch
    from transformers import AutoModelForCausalLM

    text_config = copy.deepcopy(_text_config(model.config))
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    causal.model = _language_model(model)
    causal.lm_head = model.lm_head
    leftover = [name for name, p in causal.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"decoder wrapper has parameters not taken from the model: {leftover[:3]}")
    return causal.eval()


def submodels_for_export(model) -> dict[str, Any]:
    """Sub-model name (= graph file stem) -> traceable module, in io_spec's order."""
    return {
        Path(io_spec.VISION_ENCODER).stem: _make_vision_encoder(model),
        Path(io_spec.EMBED_TOKENS).stem: _make_token_embedding(model),
        Path(io_spec.DECODER).stem: _make_decoder(model),
    }


def check_vision_wrapper(model, vision_encoder, atol: float) -> int:
    """The traceable vision wrapper must equal HF's ``get_image_features`` on full tiles; returns tokens per tile."""
    import torch

    vc = model.config.vision_config
    generator = torch.Generator().manual_seed(0)
    tiles = torch.rand(1, vc.num_channels, vc.image_size, vc.image_size, generator=generator) * 2 - 1
    with torch.no_grad():
        ours = vision_encoder(tiles)  # [1, N, D]
        if model.config.model_type == "llava":
            ref = model.get_image_features(pixel_values=tiles)
        else:
            ref = model.get_image_features(pixel_values=tiles[None])
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    ref = ref.reshape(ours.shape)
    diff = float((ours - ref).abs().max())
    if diff > atol:
        raise ExportValidationError(f"vision wrapper differs from transformers by {diff:.3g} (atol {atol})")
    return int(ours.shape[1])


# ---------------------------------------------------------------- export


class _OptimumValidationLog(logging.Handler):
    """Collects the warnings by which Optimum reports a graph that failed its validation (it does not raise)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "succeeded with the warning" in message:
            self.failures.append(message)


def _versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _graph_bytes(out: Path, filename: str) -> int:
    size = (out / filename).stat().st_size
    data = out / f"{filename}_data"  # external weights (graphs over 2 GB)
    return size + (data.stat().st_size if data.exists() else 0)


def load_for_export(model_id: str, trust_remote_code: bool = False):
    """Model (fp32, eval) and processor, with user-facing errors for what a user can fix."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from edge_vit.vlm.base import check_model_type

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise ModelLoadError(
            f"cannot export '{model_id}': no such model folder, and no hub model of that id in the local cache "
            f"(or reachable)"
        ) from None
    check_model_type(config.model_type, model_id)
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot export '{model_id}': {str(exc).splitlines()[0]}") from None
    return model.eval(), processor


def export_vlm_onnx(
    model_id: str | Path, out_dir: str | Path, options: OnnxExportOptions = OnnxExportOptions()
) -> OnnxExportResult:
    """Export a local/cached VLM to ``out_dir`` (three graphs + config/processor/tokenizer + manifest)."""
    check_export_args(str(model_id), out_dir)
    model, processor = load_for_export(str(model_id), options.trust_remote_code)
    return export_loaded_vlm(model, processor, out_dir, options, source=str(model_id))


def export_loaded_vlm(
    model, processor, out_dir: str | Path, options: OnnxExportOptions = OnnxExportOptions(), *, source: str = ""
) -> OnnxExportResult:
    """Export an already loaded model (e.g. after ``merge_and_unload``) with its processor.

    The model is put in float32 eval mode in place; fp32 graphs are what the exporter validates.
    """
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from edge_vit.vlm.base import check_model_type
    from export.onnx_configs import vlm_onnx_configs

    check_model_type(model.config.model_type, source or "model")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"--out '{out}' is a file; give a folder for the exported graphs")
    out.mkdir(parents=True, exist_ok=True)
    (out / io_spec.MANIFEST).unlink(missing_ok=True)  # written last: its presence marks a complete export
    model = model.float().eval()
    t0 = time.perf_counter()

    submodels = submodels_for_export(model)
    tokens_per_tile = check_vision_wrapper(model, submodels[Path(io_spec.VISION_ENCODER).stem], options.atol)
    configs = vlm_onnx_configs(model.config)
    use_cache = {id(c): getattr(c, "use_cache", None) for c in (model.config, _text_config(model.config))}

    validation = _OptimumValidationLog()
    optimum_logger = logging.getLogger("optimum.exporters.onnx.convert")
    optimum_logger.addHandler(validation)
    try:
        with warnings.catch_warnings():
            # Tracing notes on Python-side shape logic (constant per graph here) and torch.onnx's op notes.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            onnx_export_from_model(
                model,
                out,
                task="image-text-to-text",
                custom_onnx_configs=configs,
                fn_get_submodels=lambda _: submodels,
                opset=options.opset,
                atol=options.atol,
                no_post_process=True,  # one decoder graph with past inputs; nothing to merge
                do_validation=options.validate,
            )
    finally:
        optimum_logger.removeHandler(validation)
        for cfg in (model.config, _text_config(model.config)):  # Optimum's patcher flips use_cache in place
            if use_cache.get(id(cfg)) is not None:
                cfg.use_cache = use_cache[id(cfg)]
    if validation.failures:
        detail = " ".join(validation.failures[0].split()).replace("The ONNX export succeeded with the warning: ", "")
        detail = detail.split(" The exported model was saved at")[0]
        raise ExportValidationError(f"Optimum's validation against PyTorch failed; the export is incomplete: {detail}")
    seconds = time.perf_counter() - t0

    processor.save_pretrained(out)  # the processor the model was loaded with (Optimum saves it from the source path)
    manifest = _manifest(model, processor, options, source, tokens_per_tile, seconds, out)
    (out / io_spec.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return OnnxExportResult(out_dir=out, graph_bytes=manifest["graph_bytes"], seconds=seconds, manifest=manifest)


def _manifest(model, processor, options: OnnxExportOptions, source: str, tokens_per_tile: int, seconds: float,
              out: Path) -> dict:
    config = model.config
    shape = io_spec.DecoderShape.from_text_config(_text_config(config))
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    image_processor = getattr(processor, "image_processor", None)
    return {
        "manifest_version": MANIFEST_VERSION,
        "source_model": source,
        "model_type": config.model_type,
        "opset": options.opset,
        "dtype": "float32",
        "graphs": list(io_spec.GRAPH_FILES),
        "graph_bytes": {name: _graph_bytes(out, name) for name in io_spec.GRAPH_FILES},
        "image_token_id": int(image_token_id),
        "tiling": {
            "tile_size": int(config.vision_config.image_size),
            "tokens_per_tile": tokens_per_tile,
            "processor_splits_images": bool(getattr(image_processor, "do_image_splitting", False)),
            "full_tiles_only": config.model_type != "llava",
        },
        "decoder": asdict(shape),
        "export_options": {**asdict(options), "validated_by_optimum": options.validate,
                           "attn_implementation": "sdpa", "no_post_process": True},
        "export_seconds": round(seconds, 2),
        "versions": _versions(),
    }
