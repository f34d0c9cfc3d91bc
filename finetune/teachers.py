"""Teachers: what writes the question/answer turns of an instruction sample from a symbolic scene.

* :class:`TemplateTeacher` (the default): offline and deterministic given the
  Generator it is handed; every answer is computed from the labels, so it is
  exactly right (counts, yes/no, colours, positions, sizes).
* :class:`OpenAITeacher`: any OpenAI-compatible ``/v1/chat/completions``
  endpoint (a local vLLM/llama.cpp server, or a hosted one), as LLaVA used
  GPT-4 on the symbolic scene. Its answers read better and vary more, but are
  only as right as the model: the prompts ask for exact answers, nothing checks
  them. Standard-library HTTP (``urllib``); retries with exponential back-off
  on 429, 5xx, timeouts and refused connections; a clear one-line
  :class:`EdgeVitError` when the endpoint stays unreachable.

Prompts are versioned files, ``finetune/prompts/<version>/*.txt``, read by
:func:`load_prompts` (never in a constructor); their version and sha256 go into
the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_vit.errors import EdgeVitError
from finetune.instruct import (
    QA,
    QUESTION_KINDS,
    TEMPLATE_VERSION,
    SampleKind,
    Scene,
    describe_scene,
    reasoning_questions,
    scene_questions,
)
from finetune.shapes import COLOUR_NAMES

__all__ = ["PROMPTS_DIR", "DEFAULT_PROMPT_VERSION", "PromptSet", "load_prompts", "scene_text", "parse_qa",
           "TemplateTeacher", "OpenAITeacher"]

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_PROMPT_VERSION = "v1"
_PROMPT_FILES = ("conversation", "detailed", "reasoning", "detailed_questions")


@dataclass(frozen=True)
class PromptSet:
    """The prompt texts of one version: a system prompt per sample kind and the pool of description requests."""

    version: str
    system: Mapping[str, str]  # SampleKind value -> system prompt
    detailed_questions: tuple[str, ...]
    sha256: Mapping[str, str]  # file name -> sha256 of its bytes

    def info(self) -> dict:
        return {"prompt_version": self.version, "prompt_sha256": dict(self.sha256)}


def load_prompts(version: str = DEFAULT_PROMPT_VERSION, prompts_dir: Path = PROMPTS_DIR) -> PromptSet:
    """Read ``prompts_dir/<version>/{conversation,detailed,reasoning,detailed_questions}.txt``."""
    folder = prompts_dir / version
    if not re.fullmatch(r"[A-Za-z0-9._-]+", version) or not folder.is_dir():
        have = sorted(p.name for p in prompts_dir.iterdir() if p.is_dir()) if prompts_dir.is_dir() else []
        raise EdgeVitError(f"no prompt version {version!r} in {prompts_dir} (have: {', '.join(have) or 'none'})")
    texts, digests = {}, {}
    for name in _PROMPT_FILES:
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise EdgeVitError(f"prompt file missing: {path}")
        raw = path.read_bytes()
        texts[name] = raw.decode("utf-8").strip()
        digests[path.name] = hashlib.sha256(raw).hexdigest()
    questions = tuple(line.strip() for line in texts["detailed_questions"].splitlines() if line.strip())
    if not questions:
        raise EdgeVitError(f"{folder / 'detailed_questions.txt'}: no questions")
    system = {k.value: texts[k.value] for k in SampleKind}
    return PromptSet(version=version, system=system, detailed_questions=questions, sha256=digests)


# ---------------------------------------------------------------- the template teacher


def check_focus(kind: str, share: float) -> tuple[str, float]:
    """A template teacher's focus, checked: a question kind and the share of turns it gets (0 < SHARE <= 1)."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"KIND must be one of {', '.join(QUESTION_KINDS)}, got {kind!r}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"SHARE must be in (0, 1], got {share}")
    return kind, float(share)


class TemplateTeacher:
    """Answers computed from the labels: exact, offline, deterministic given the Generator.

    A conversation has ``min_turns``..``max_turns`` turns taken from
    :func:`finetune.instruct.scene_questions` (at most ``per_kind`` of each kind:
    count, exists, colour, position, size); a reasoning sample is one of
    :func:`finetune.instruct.reasoning_questions`; a detailed sample pairs a
    request from the prompt set with :func:`finetune.instruct.describe_scene`.
    """

    def __init__(self, prompts: PromptSet, min_turns: int = 3, max_turns: int = 5,
                 colours: tuple[str, ...] = COLOUR_NAMES, per_kind: int = 2,
                 focus: tuple[str, float] | None = None) -> None:
        if not 1 <= min_turns <= max_turns:
            raise ValueError(f"TemplateTeacher: need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
        if per_kind < 1:
            raise ValueError(f"TemplateTeacher: need per_kind >= 1, got {per_kind}")
        if focus is not None:
            try:
                focus = check_focus(*focus)
            except ValueError as e:
                raise ValueError(f"TemplateTeacher: focus must be (KIND, SHARE): {e}") from None
        self.per_kind = per_kind
        self.focus = focus
        self.prompts = prompts
        self.min_turns = min_turns
        self.max_turns = max_turns
        self.colours = colours

    def info(self) -> dict:
        info = {"name": "template", "version": TEMPLATE_VERSION, "min_turns": self.min_turns,
                "max_turns": self.max_turns, "per_kind": self.per_kind, **self.prompts.info()}
        if self.focus is not None:  # absent otherwise: manifests written before it stay comparable
            info["focus"] = {"kind": self.focus[0], "share": self.focus[1]}
        return info

    def write(self, scene: Scene, kind: SampleKind, rng: np.random.Generator) -> list[QA]:
        if kind is SampleKind.DETAILED:
            question = self.prompts.detailed_questions[int(rng.integers(len(self.prompts.detailed_questions)))]
            return [QA(question, describe_scene(scene.objects, scene.background), "")]
        if kind is SampleKind.REASONING:
            triples = reasoning_questions(scene.objects, rng, classes=scene.classes)
            return [QA(q, a, k) for k, q, a in triples[:1]]
        triples = scene_questions(scene.objects, rng, classes=scene.classes, colours=self.colours,
                                  per_kind=self.per_kind)
        n = int(rng.integers(self.min_turns, self.max_turns + 1))
        if self.focus is not None:
            triples = self._focused(triples, n, rng)
        return [QA(q, a, k) for k, q, a in triples[:n]]

    def _focused(self, triples: list, n: int, rng: np.random.Generator) -> list:
        """Up to ``n`` turns, each of the focus kind with probability ``share`` (while the scene has questions of
        both), else of the other kinds in their shuffled order: data aimed at what a model gets wrong."""
        kind, share = self.focus
        focus = [t for t in triples if t[0] == kind]
        other = [t for t in triples if t[0] != kind]
        chosen = []
        while len(chosen) < n and (focus or other):
            first, second = (focus, other) if rng.random() < share else (other, focus)
            chosen.append((first or second).pop(0))
        return chosen


# ---------------------------------------------------------------- the chat-endpoint teacher


def scene_text(scene: Scene) -> str:
    """The symbolic scene as the chat model reads it: one line per object, boxes normalized."""
    h, w = scene.image_size
    lines = [f"Image: {w}x{h} pixels (width x height)."]
    if scene.background:
        lines.append(f"Background: {scene.background}.")
    if not scene.objects:
        lines.append("Objects: none.")
        return "\n".join(lines)
    lines.append("Objects (class, colour, size, position, box [x1, y1, x2, y2]):")
    for o in scene.objects:
        box = "[" + ", ".join(f"{v:.2f}" for v in o.box) + "]" if o.box else "unknown"
        lines.append(f"- {o.name}, {o.colour or 'colour unknown'}, {o.size or 'size unknown'}, {o.position}, {box}")
    return "\n".join(lines)


_Q = re.compile(r"^\s*(?:[*_#>\-\d.)\s]*)(?:q|question|user)\s*[:：]\s*(.*)$", re.IGNORECASE)
_A = re.compile(r"^\s*(?:[*_#>\-\d.)\s]*)(?:a|answer|assistant|gpt)\s*[:：]\s*(.*)$", re.IGNORECASE)


def parse_qa(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from "Q: ..." / "A: ..." lines; an answer may continue on following lines."""
    pairs: list[list[str]] = []
    current = None  # "q" or "a"
    for line in text.splitlines():
        if m := _Q.match(line):
            pairs.append([m.group(1).strip(" *"), ""])
            current = "q"
        elif (m := _A.match(line)) and pairs and current == "q":
            pairs[-1][1] = m.group(1).strip(" *")
            current = "a"
        elif line.strip() and pairs and current == "a":
            pairs[-1][1] += " " + line.strip()
        elif line.strip() and pairs and current == "q":
            pairs[-1][0] += " " + line.strip()
    return [(q.strip(), a.strip()) for q, a in pairs if q.strip() and a.strip()]


class OpenAITeacher:
    """A teacher backed by an OpenAI-compatible chat endpoint (``{endpoint}/chat/completions``).

    ``endpoint`` is the API base, e.g. ``http://127.0.0.1:8000/v1``. Requests
    carry a seed drawn from the sample's Generator and ``temperature``, so a
    server that honours seeds gives the same data twice. Transient failures
    (HTTP 429 and 5xx, timeouts, refused or reset connections) are retried
    ``max_retries`` times after ``backoff_s * 2**attempt`` seconds (or the
    server's Retry-After, capped at 30 s); then, or on any other HTTP error, an
    :class:`EdgeVitError` ends the run. A reply that cannot be parsed skips the
    sample (logged, counted in the manifest).
    """

    def __init__(self, endpoint: str, model: str, prompts: PromptSet, api_key: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 temperature: float = 0.2, max_tokens: int = 512) -> None:
        if not re.match(r"^https?://[^/\s]+", endpoint or ""):
            raise EdgeVitError(f"teacher endpoint must be an http(s) URL like http://127.0.0.1:8000/v1, got {endpoint!r}")
        if not model:
            raise EdgeVitError("the openai teacher needs --model (the name the endpoint serves)")
        self.endpoint = endpoint.rstrip("/")
        self.url = self.endpoint + "/chat/completions"
        self.model = model
        self.prompts = prompts
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0

    def info(self) -> dict:
        return {"name": "openai", "endpoint": self.endpoint, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **self.prompts.info()}

    def write(self, scene: Scene, kind: SampleKind, rng: np.random.Generator) -> list[QA]:
        question = None
        if kind is SampleKind.DETAILED:
            question = self.prompts.detailed_questions[int(rng.integers(len(self.prompts.detailed_questions)))]
        seed = int(rng.integers(2**31))
        content = self.chat(self.prompts.system[kind.value], scene_text(scene), seed)
        if content is None:
            return []
        if kind is SampleKind.DETAILED:
            answer = content.strip()
            return [QA(question, answer, "")] if answer else []
        pairs = parse_qa(content)
        if kind is SampleKind.REASONING:
            pairs = pairs[:1]
        if not pairs:
            log.warning("teacher reply for %s (%s) has no 'Q: ... A: ...' lines; sample skipped", scene.image, kind.value)
        return [QA(q, a, "") for q, a in pairs]

    def chat(self, system: str, user: str, seed: int) -> str | None:
        """The assistant message of one chat completion; None if the reply is not a usable completion."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        raw = self._post(body, headers)
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            log.warning("teacher endpoint %s sent a reply that is not a chat completion; sample skipped", self.url)
            return None
        return content if isinstance(content, str) else None

    def _post(self, body: bytes, headers: dict) -> bytes:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            self.requests += 1
            wait = self.backoff_s * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                detail = " ".join(exc.read(300).decode("utf-8", "replace").split())
                if exc.code != 429 and exc.code < 500:
                    hint = " (set OPENAI_API_KEY?)" if exc.code in (401, 403) else ""
                    raise EdgeVitError(f"teacher endpoint {self.url} answered HTTP {exc.code}{hint}: {detail[:200]}") from None
                last = f"HTTP {exc.code}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 30.0)
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"no answer within {self.timeout_s:g} s"
                elif isinstance(reason, socket.gaierror):
                    raise EdgeVitError(f"cannot reach the teacher endpoint {self.endpoint}: unknown host") from None
                else:
                    last = getattr(reason, "strerror", None) or str(reason)
            except (TimeoutError, socket.timeout):
                last = f"no answer within {self.timeout_s:g} s"
            except (ConnectionError, OSError) as exc:  # reset or aborted while reading the reply
                last = exc.strerror or type(exc).__name__
            if attempt < self.max_retries:
                log.info("teacher endpoint %s: %s; retrying in %.2g s", self.url, last, wait)
                time.sleep(wait)
        raise EdgeVitError(f"cannot reach the teacher endpoint {self.endpoint}: {last} "
                           f"(after {self.max_retries + 1} tries; is the server running?)")
