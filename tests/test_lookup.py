"""Prompt lookup decoding: the draft search, the shared decode loop on a model whose next token depends on its
whole cache, and the torch backend (tiny random model and the shipped demo VLM): the same tokens as decoding
one token a pass, in fewer passes."""

from pathlib import Path

import numpy as np
import pytest

from edge_vit.vlm import GenerationConfig, load_vlm
from edge_vit.vlm.base import GenerationStats, decode_stream, lookup_draft

DEMO_VLM = Path(__file__).resolve().parents[1] / "edge_vit" / "assets" / "demo" / "vlm"


def test_lookup_draft_takes_what_followed_the_latest_longest_match():
    #        0  1  2  3  4  5  6  7  8  9
    ids = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    assert lookup_draft(ids, 3) == [9, 1, 5]  # "5 6" occurs at 0 and 4: the latest (4) wins
    assert lookup_draft(ids, 1) == [9]
    assert lookup_draft(ids, 3, max_ngram=3) == [9, 1, 5]  # "1 5 6" does not occur earlier: falls back to 2
    assert lookup_draft([1, 2, 3, 9, 2, 3], 2) == [9, 2]  # the tail itself never matches
    assert lookup_draft([4, 2, 3, 1, 2, 3], 4, max_ngram=3) == [1, 2, 3]  # "2 3" at 1, continuation to the end
    assert lookup_draft([7, 1, 2, 7, 3, 2], 3) == []  # no earlier "7 3"/"3 2"; one-token matches are off
    assert lookup_draft([7, 1, 2, 7, 3, 2], 3, min_ngram=1) == [7, 3, 2]  # "2" at 2
    assert lookup_draft([1, 2, 3, 1, 2, 3], 0) == [] and lookup_draft([1], 3) == [] and lookup_draft([], 3) == []


class CacheModel:
    """A toy decoder whose next token is a function of everything in its cache, so a cache that kept a
    rejected draft's positions (or lost accepted ones) changes what it says next."""

    def __init__(self, prompt: list[int], vocab: int = 50, stop: int = 0) -> None:
        self.cache = list(prompt)
        self.vocab, self.stop, self.calls = vocab, stop, []

    def next_token(self, ids: list[int]) -> int:
        # copies from the prompt most of the time (what lookup exploits), with a rolling twist
        if len(ids) % 7 == 3:
            return (sum(ids) % (self.vocab - 1)) + 1
        return ids[len(ids) % min(11, len(ids))]

    def logits(self, ids: list[int]) -> np.ndarray:
        row = np.zeros(self.vocab, np.float32)
        row[self.next_token(ids)] = 1.0
        return row

    def step(self, tokens: list[int]) -> np.ndarray:
        self.calls.append(len(tokens))
        rows = []
        for t in tokens:
            self.cache.append(t)
            rows.append(self.logits(self.cache))
        return np.stack(rows)

    def discard(self, n: int) -> None:
        del self.cache[-n:]


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _decode(lookup: int, max_new: int = 40, min_new: int = 0, prompt=None, stop: int = 0):
    prompt = prompt or [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3, 4, 5, 6]
    model = CacheModel(prompt, stop=stop)
    stats = GenerationStats()
    config = GenerationConfig(max_new_tokens=max_new, min_new_tokens=min_new, lookup_tokens=lookup)
    steps = list(decode_stream(model.logits(model.cache), model.step, _Tokenizer(), {stop}, config, None, stats,
                               0.0, discard=model.discard, prompt_ids=prompt, max_step_tokens=16))
    return [s.token_id for s in steps[:-1]], stats, model


@pytest.mark.parametrize("lookup", [1, 3, 8, 15])
def test_decode_stream_with_lookup_chooses_the_same_tokens_in_fewer_passes(lookup):
    want, plain, plain_model = _decode(0)
    got, stats, model = _decode(lookup)
    assert len(want) == 40 and got == want
    assert plain.decode_steps == plain.decode_tokens == 39 and set(plain_model.calls) == {1}
    assert stats.draft_tokens > 0 and 0 < stats.accepted_tokens < stats.draft_tokens  # some right, some wrong
    assert stats.decode_steps == len(model.calls) < 39 and max(model.calls) <= lookup + 1
    # every pass chooses one token of its own plus the drafts it accepted
    assert stats.decode_tokens == stats.decode_steps + stats.accepted_tokens == 39
    assert model.cache[-len(want) + 1:] == want[:-1]  # the cache holds exactly what was streamed (but the last)
    assert stats.acceptance == stats.accepted_tokens / stats.draft_tokens
    assert stats.timings()["draft_tokens"] == stats.draft_tokens and "draft_tokens" not in plain.timings()


def test_lookup_respects_max_new_tokens_stop_tokens_and_min_new_tokens():
    for max_new in (1, 2, 3, 17):
        want, _, _ = _decode(0, max_new=max_new)
        got, stats, model = _decode(4, max_new=max_new)
        assert got == want and len(got) == max_new
        assert len(model.cache) <= 16 + max_new  # never past prompt + max_new_tokens (the shared buffer's size)
    # a stop token inside an accepted stretch ends the answer there, as without lookup
    prompt = [3, 4, 5, 6, 7, 8, 9, 0, 11, 12, 13, 14, 3, 4, 5, 6]
    want, w_stats, _ = _decode(0, prompt=prompt)
    got, stats, _ = _decode(6, prompt=prompt)
    assert got == want and stats.finish_reason == w_stats.finish_reason == "stop"
    # min_new_tokens masks the stop token in the drafts' rows too
    want, _, _ = _decode(0, prompt=prompt, min_new=30)
    got, _, _ = _decode(6, prompt=prompt, min_new=30)
    assert got == want and len(got) >= 30


def test_lookup_is_off_without_discard_or_with_one_row_steps():
    model = CacheModel([3, 4, 5, 6, 3, 4, 5, 6])
    stats = GenerationStats()
    config = GenerationConfig(max_new_tokens=20, lookup_tokens=4)
    list(decode_stream(model.logits(model.cache), model.step, _Tokenizer(), {0}, config, None, stats, 0.0,
                       discard=model.discard, prompt_ids=[3, 4, 5, 6, 3, 4, 5, 6], max_step_tokens=1))
    assert set(model.calls) == {1} and stats.draft_tokens == 0
    with pytest.raises(ValueError, match="lookup_tokens"):
        GenerationConfig(lookup_tokens=-1)


def test_sampling_with_lookup_runs_and_counts(tiny_idefics3):
    vlm = load_vlm(str(tiny_idefics3))
    frame = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cfg = GenerationConfig(max_new_tokens=24, min_new_tokens=24, temperature=0.8, seed=3, lookup_tokens=4)
    steps = list(vlm.generate(frame, "Describe the scene.", cfg))
    stats = steps[-1].stats
    assert len(steps) == 25 and stats.decode_tokens == 23 == stats.decode_steps + stats.accepted_tokens


def test_torch_backend_lookup_gives_the_same_tokens(tiny_idefics3, tiny_llava):
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for path in (tiny_idefics3, tiny_llava):
        vlm = load_vlm(str(path))
        prompt = "Describe the scene. Describe the scene. Describe the scene."
        cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
        want = [s.token_id for s in vlm.generate(frame, prompt, cfg) if not s.done]
        steps = list(vlm.generate(frame, prompt, GenerationConfig(max_new_tokens=32, min_new_tokens=32,
                                                                  lookup_tokens=5)))
        assert [s.token_id for s in steps[:-1]] == want
        stats = steps[-1].stats
        assert stats.decode_tokens == 31 == stats.decode_steps + stats.accepted_tokens


@pytest.mark.skipif(not (DEMO_VLM / "model.safetensors").is_file(), reason="the demo VLM is not built")
def test_demo_vlm_descriptions_accept_drafts_and_keep_every_token():
    """The trained demo VLM describing shapes frames copies the grounding: drafts are accepted, answers unchanged."""
    import json

    from edge_vit.grounding import GroundingConfig, ground
    from edge_vit.types import Detections
    from finetune.shapes import class_names, render_scene

    tuned = json.loads((DEMO_VLM.parent / "models.json").read_text())["grounding"]
    names = class_names("shape")
    vlm = load_vlm(str(DEMO_VLM))
    accepted = drafted = 0
    for seed in range(3):
        scene = render_scene(np.random.default_rng(seed), 320, 3, 5)
        detections = Detections(  # the scene's true boxes, as a perfect detector would give them
            xyxy=np.array([o.xyxy for o in scene.objects], np.float32).reshape(-1, 4),
            confidence=np.full(len(scene.objects), 0.9, np.float32),
            class_id=np.array([names.index(o.class_name) for o in scene.objects], np.int64),
            names=dict(enumerate(names)), image_size=scene.image.shape[:2])
        prompt = ground(detections, "Describe the image in detail.", GroundingConfig(**tuned),
                        count_tokens=vlm.count_tokens).text
        want = [s.token_id for s in vlm.generate(scene.image, prompt, GenerationConfig(max_new_tokens=64))
                if not s.done]
        steps = list(vlm.generate(scene.image, prompt, GenerationConfig(max_new_tokens=64, lookup_tokens=3)))
        assert [s.token_id for s in steps[:-1]] == want and len(want) > 10
        stats = steps[-1].stats
        accepted, drafted = accepted + stats.accepted_tokens, drafted + stats.draft_tokens
        assert stats.decode_steps < stats.decode_tokens
    assert 0 < accepted < drafted
