"""How long the sidecar lets a prefill call run: a total deadline from what the prefill should take.

Why: ``prefill_timeout_s`` bounds each *read* of the prefill call, so a prefill worker that accepts
connections but never answers (stopped, wedged) holds every request for that long (120 s) before
the sidecar gives up and the decode worker prefills locally. A prefill usually takes a small,
predictable fraction of that, so each call gets a total deadline::

    deadline = clamp(floor_s, factor * predicted_s + slack_s, ceiling_s)
    predicted_s = seconds_per_token(prefiller) * estimated prompt tokens

The sidecar settings: ``floor_s`` is ``prefill_deadline_floor_s`` (5), ``factor``
``prefill_deadline_factor`` (4), ``cold_s`` ``prefill_deadline_cold_s`` (15), ``ceiling_s``
``prefill_timeout_s`` (120); ``slack_s`` is 1. Both rates are learned online from the prefills the
sidecar sends, as ratios of exponentially weighted sums (alpha 0.2), so each sample weighs by its
size: short prompts, whose time is mostly fixed overhead, weigh little against the long ones whose
per-token rate matters (with only short ones seen, long prompts are overestimated, the safe way):

* seconds per computed prompt token, per prefiller, plus a shared one over all prefillers; the
  time includes any queueing on the worker, so a loaded worker earns a longer deadline;
* prompt tokens per prompt character (shared: one model), from the prefill response's
  ``usage.prompt_tokens``; token-id prompts are counted exactly.

Cold start: a prefiller this sidecar has no completed prefill from yet gets at least ``cold_s``
(15 s; the first requests to a vLLM-CPU worker took up to ~10 s), or more for a long prompt: its
prediction then uses the shared rate, or before any prefill at all pessimistic defaults (2 ms per
token, 0.5 tokens per character; measured on vLLM-CPU with the tiny model: 0.5-1.5 ms per token,
~0.25 tokens per character of English).

Only prefills that answered 200 are samples. One cancelled at its deadline is not: its time says
nothing about the worker's speed, and feeding it (even as a lower bound) would let a hung worker
lengthen its own deadline with each request it holds. So a worker whose prefills legitimately take
longer than the cold deadline never yields a sample: raise ``cold_s``/``floor_s`` for such a model.

Known slack, both erring towards a local prefill or a longer wait, never a lost request: a burst
after a quiet spell may queue prefills past ``factor`` times the quiet rate (those fall back until
the slower samples come in), and a slow first prefill (warm-up) lengthens the next few deadlines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Deadline", "DeadlinePolicy", "PrefillDeadlines", "PromptSize", "prompt_size"]


@dataclass(frozen=True)
class DeadlinePolicy:
    floor_s: float = 5.0
    factor: float = 4.0
    ceiling_s: float = 120.0
    cold_s: float = 15.0
    slack_s: float = 1.0
    #: Weight of a new sample in the exponentially weighted sums.
    alpha: float = 0.2
    #: Before the sidecar has seen any prefill complete (pessimistic on purpose).
    cold_seconds_per_token: float = 0.002
    cold_tokens_per_char: float = 0.5


@dataclass(frozen=True)
class PromptSize:
    """What the model will read: text characters (prompt, messages, tools) and token ids."""

    chars: int
    token_ids: int = 0


@dataclass(frozen=True)
class Deadline:
    seconds: float
    #: The prediction it came from, and the prompt tokens that prediction assumed.
    predicted_s: float
    tokens: float
    #: True when the prefiller had no completed prefill yet (the cold minimum applied).
    cold: bool


_TEXT_KEYS = ("prompt", "messages", "tools", "suffix")


def prompt_size(body: dict[str, Any]) -> PromptSize:
    """Characters of every string under the body's prompt-making keys, and token ids given as a
    token-id prompt (a list of ints, or a list of such lists). Walks without recursion."""
    chars = token_ids = 0
    pending: list[Any] = []
    for key in _TEXT_KEYS:
        value = body.get(key)
        if key == "prompt" and isinstance(value, list) and value:
            if all(isinstance(t, int) for t in value):
                token_ids += len(value)
                continue
            if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in value):
                token_ids += sum(len(p) for p in value)
                continue
        pending.append(value)
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return PromptSize(chars, token_ids)


class _Ratio:
    """Exponentially weighted sums of a numerator and a denominator; their ratio."""

    __slots__ = ("den", "num", "samples")

    def __init__(self) -> None:
        self.num = self.den = 0.0
        self.samples = 0

    def add(self, num: float, den: float, alpha: float) -> None:
        if self.samples == 0:
            self.num, self.den = num, den
        else:
            self.num += alpha * (num - self.num)
            self.den += alpha * (den - self.den)
        self.samples += 1

    def value(self) -> float | None:
        return self.num / self.den if self.samples and self.den > 0 else None


class PrefillDeadlines:
    """The online estimates and the deadline they give; one per sidecar (single event loop)."""

    def __init__(self, policy: DeadlinePolicy) -> None:
        self.policy = policy
        self._rates: dict[str, _Ratio] = {}
        self._shared = _Ratio()
        self._tokens_per_char = _Ratio()

    def seconds_per_token(self, prefiller: str | None = None) -> float | None:
        """The learned rate of ``prefiller`` (None: the shared one); None without samples."""
        ratio = self._shared if prefiller is None else self._rates.get(prefiller)
        return ratio.value() if ratio is not None else None

    def samples(self, prefiller: str | None = None) -> int:
        ratio = self._shared if prefiller is None else self._rates.get(prefiller)
        return ratio.samples if ratio is not None else 0

    def tokens_per_char(self) -> float:
        return self._tokens_per_char.value() or self.policy.cold_tokens_per_char

    def estimate_tokens(self, size: PromptSize) -> float:
        return size.token_ids + size.chars * self.tokens_per_char()

    def deadline(self, prefiller: str, size: PromptSize) -> Deadline:
        p = self.policy
        tokens = max(self.estimate_tokens(size), 1.0)
        rate = self.seconds_per_token(prefiller)
        cold = rate is None
        if rate is None:
            rate = self.seconds_per_token() or p.cold_seconds_per_token
        predicted = rate * tokens
        lowest = max(p.floor_s, p.cold_s) if cold else p.floor_s
        seconds = min(max(lowest, p.factor * predicted + p.slack_s), p.ceiling_s)
        return Deadline(seconds, predicted, tokens, cold)

    def observe(
        self,
        prefiller: str,
        size: PromptSize,
        seconds: float,
        prompt_tokens: int | None,
        cached_tokens: int = 0,
    ) -> None:
        """One prefill that answered: its time, and the prompt tokens it reported (None: use
        the estimate); ``cached_tokens`` (prefix-cache hits) were not computed."""
        p = self.policy
        if prompt_tokens is not None and prompt_tokens > 0:
            if size.chars > 0:
                text_tokens = max(prompt_tokens - size.token_ids, 0)
                self._tokens_per_char.add(text_tokens, size.chars, p.alpha)
            computed = float(max(prompt_tokens - max(cached_tokens, 0), 1))
        else:
            computed = max(self.estimate_tokens(size), 1.0)
        seconds = max(seconds, 0.0)
        self._rates.setdefault(prefiller, _Ratio()).add(seconds, computed, p.alpha)
        self._shared.add(seconds, computed, p.alpha)

    def retain(self, prefillers: Iterable[str]) -> None:
        """Forget the per-prefiller estimates of prefillers no longer in ``prefillers``."""
        keep = set(prefillers)
        for gone in [a for a in self._rates if a not in keep]:
            del self._rates[gone]
