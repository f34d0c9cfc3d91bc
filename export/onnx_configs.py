"""Optimum ONNX configs for the three VLM graphs: vision encoder (+ connector), token embedding, decoder.

optimum-onnx 0.1.0 knows neither Idefics3/SmolVLM nor LLaVA, but exports any
model through "custom ONNX configs": one ``OnnxConfig`` per sub-model, saying
which inputs and outputs (with which dynamic axes) the graph has and how to
make dummy inputs for tracing and for Optimum's validation against PyTorch.
Names and axes come from ``export.io_spec``; nothing here knows about the
runtime that loads the graphs.

The decoder reuses Optimum's own config for the text model's architecture
(Llama for SmolVLM and llava-1.5, found through the TasksManager), adapted
to take ``inputs_embeds`` instead of ``input_ids``: Optimum's text dummy
generator only makes ``input_ids``, so a generator for ``inputs_embeds`` with a
matching attention mask and position ids is added.
"""

from __future__ import annotations

from collections import OrderedDict

from optimum.exporters.onnx import OnnxConfig
from optimum.exporters.onnx.base import OnnxConfigWithPast
from optimum.exporters.tasks import TasksManager
from optimum.utils import DummyInputGenerator, MistralDummyPastKeyValuesGenerator, NormalizedConfig
from optimum.utils.normalized_config import NormalizedTextConfigWithGQA

from export import io_spec

# fp32 graphs must match PyTorch to this (the bar); Optimum fails the export otherwise.
DEFAULT_ATOL = 1e-4


class DummyTilesGenerator(DummyInputGenerator):
    """``pixel_values`` [tiles, channels, tile, tile]: full tiles at the vision encoder's resolution."""

    SUPPORTED_INPUT_NAMES = ("pixel_values",)

    def __init__(self, task, normalized_config, batch_size: int = 2, **kwargs) -> None:
        self.task = task
        self.tiles = batch_size  # two tiles: the traced graph must not bake in one
        self.num_channels = normalized_config.num_channels
        self.image_size = normalized_config.image_size

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        shape = [self.tiles, self.num_channels, self.image_size, self.image_size]
        return self.random_float_tensor(shape, min_value=-1, max_value=1, framework=framework, dtype=float_dtype)


class DummyTokenIdsGenerator(DummyInputGenerator):
    """``input_ids`` [batch, sequence] over the whole vocabulary."""

    SUPPORTED_INPUT_NAMES = ("input_ids",)

    def __init__(self, task, normalized_config, batch_size: int = 2, sequence_length: int = 16, **kwargs) -> None:
        self.task = task
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.vocab_size = normalized_config.vocab_size

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        shape = [self.batch_size, self.sequence_length]
        return self.random_int_tensor(shape, self.vocab_size, framework=framework, dtype=int_dtype)


class DummyInputsEmbedsGenerator(DummyInputGenerator):
    """Decoder inputs: ``inputs_embeds`` [B, S, D], ``attention_mask`` [B, P+S], ``position_ids`` [B, S].

    The past length P equals the past generator's ``sequence_length``, as in Optimum's own
    text configs; the mask covers past + new tokens and positions continue after the past.
    """

    SUPPORTED_INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids")

    def __init__(self, task, normalized_config, batch_size: int = 2, sequence_length: int = 16, **kwargs) -> None:
        self.task = task
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.past_length = sequence_length
        self.hidden_size = normalized_config.hidden_size

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        b, s, p = self.batch_size, self.sequence_length, self.past_length
        if input_name == "inputs_embeds":
            # Roughly the scale of real token embeddings (std ~0.02 init, larger after training).
            return self.random_float_tensor([b, s, self.hidden_size], min_value=-0.1, max_value=0.1,
                                            framework=framework, dtype=float_dtype)
        if input_name == "attention_mask":
            return self.constant_tensor([b, p + s], value=1, dtype=_int_dtype(int_dtype, framework),
                                        framework=framework)
        import torch  # position_ids: [p, p+1, ..., p+s-1] per row

        positions = torch.arange(p, p + s, dtype=torch.int64).unsqueeze(0).expand(b, s).contiguous()
        return positions if framework == "pt" else positions.numpy()


def _int_dtype(int_dtype: str, framework: str):
    from optimum.utils.input_generators import DTYPE_MAPPER

    return getattr(DTYPE_MAPPER, framework)(int_dtype)


class VisionEncoderOnnxConfig(OnnxConfig):
    """vision_encoder.onnx: full tiles in, connector features out ([tiles, tokens_per_tile, text hidden])."""

    NORMALIZED_CONFIG_CLASS = NormalizedConfig  # reads image_size / num_channels from the vision config
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTilesGenerator,)
    ATOL_FOR_VALIDATION = DEFAULT_ATOL

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(io_spec.VISION_AXES[name])) for name in io_spec.VISION_INPUTS)

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(io_spec.VISION_AXES[name])) for name in io_spec.VISION_OUTPUTS)

    @property
    def values_override(self):
        return None  # the wrapper has no cache; leave the model's config alone


class EmbedTokensOnnxConfig(OnnxConfig):
    """embed_tokens.onnx: token ids to embeddings (the text model's input embedding table)."""

    NORMALIZED_CONFIG_CLASS = NormalizedConfig  # reads vocab_size from the text config
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTokenIdsGenerator,)
    ATOL_FOR_VALIDATION = DEFAULT_ATOL

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(io_spec.EMBED_AXES[name])) for name in io_spec.EMBED_INPUTS)

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(io_spec.EMBED_AXES[name])) for name in io_spec.EMBED_OUTPUTS)

    @property
    def values_override(self):
        return None


class _InputsEmbedsDecoderMixin:
    """Turns Optimum's text-generation-with-past config into the io_spec decoder over ``inputs_embeds``.

    One graph, always with past inputs: prefill passes an empty cache (past_sequence = 0), so
    Optimum's decoder / decoder-with-past pair and its ``use_cache_branch`` merge are not needed.
    """

    DUMMY_INPUT_GENERATOR_CLASSES = (DummyInputsEmbedsGenerator, MistralDummyPastKeyValuesGenerator)
    DUMMY_PKV_GENERATOR_CLASS = MistralDummyPastKeyValuesGenerator
    NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
    PAD_ATTENTION_MASK_TO_PAST = False  # our generator already makes the [B, P+S] mask (the base reads input_ids)
    ATOL_FOR_VALIDATION = DEFAULT_ATOL

    def __init__(self, config, task: str = "text-generation", int_dtype: str = "int64", float_dtype: str = "fp32",
                 use_past: bool = True, use_past_in_inputs: bool = True, preprocessors=None) -> None:
        super().__init__(config, task=task, int_dtype=int_dtype, float_dtype=float_dtype, use_past=True,
                         use_past_in_inputs=True, preprocessors=preprocessors)

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        n = self._normalized_config.num_layers
        axes = io_spec.decoder_axes(n)
        return OrderedDict((name, dict(axes[name])) for name in io_spec.decoder_inputs(n))

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        n = self._normalized_config.num_layers
        axes = io_spec.decoder_axes(n)
        return OrderedDict((name, dict(axes[name])) for name in io_spec.decoder_outputs(n))

    def add_past_key_values(self, inputs_or_outputs: dict[str, dict[int, str]], direction: str) -> None:
        n = self._normalized_config.num_layers
        axes = io_spec.decoder_axes(n)
        names = io_spec.past_names(n) if direction == "inputs" else io_spec.present_names(n)
        for name in names:
            inputs_or_outputs[name] = dict(axes[name])


def decoder_onnx_config(text_config, float_dtype: str = "fp32") -> OnnxConfigWithPast:
    """Optimum's config for the text model's architecture, adapted to ``inputs_embeds`` (see the mixin)."""
    text_type = text_config.model_type
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=text_type, task="text-generation-with-past", library_name="transformers"
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"Optimum has no text-generation ONNX config for text model type '{text_type}'") from exc
    base = constructor.func if hasattr(constructor, "func") else constructor
    if not issubclass(base, OnnxConfigWithPast):
        raise ValueError(f"Optimum's ONNX config for '{text_type}' ({base.__name__}) has no KV cache support")
    cls = type(f"InputsEmbeds{base.__name__}", (_InputsEmbedsDecoderMixin, base), {})
    return cls(text_config, task="text-generation", float_dtype=float_dtype)


def vlm_onnx_configs(config, float_dtype: str = "fp32") -> dict[str, OnnxConfig]:
    """The three custom configs, keyed by sub-model name (= graph file stem in io_spec)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    return {
        _stem(io_spec.VISION_ENCODER): VisionEncoderOnnxConfig(
            config.vision_config, task="feature-extraction", float_dtype=float_dtype),
        _stem(io_spec.EMBED_TOKENS): EmbedTokensOnnxConfig(
            text_config, task="feature-extraction", float_dtype=float_dtype),
        _stem(io_spec.DECODER): decoder_onnx_config(text_config, float_dtype=float_dtype),
    }


def _stem(filename: str) -> str:
    return filename.rsplit(".onnx", 1)[0]
