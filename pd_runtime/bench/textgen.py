"""Prompt text of a requested token length, for the model under test.

Benchmarks ask for "a 512-token prompt"; the engine counts tokens with the model's tokenizer, so
the text must be built with it or the lengths drift. With a tokenizer we draw words that are one
token each (byte-level BPE tokens that start with the space marker and are alphabetic), join them,
and trim by re-encoding; without one we fall back to a fixed English word list at one token per
word (an estimate, reported as such by ``exact``).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

__all__ = ["TextGen"]

_FALLBACK = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
]


@lru_cache(maxsize=8)
def _load(path: str):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


class TextGen:
    """Seeded word text whose token count is close to the request (exact where a tokenizer is
    given, up to the first word's merge with what precedes it)."""

    def __init__(self, tokenizer: str | None = None) -> None:
        self.tokenizer_path = tokenizer
        self._tok = _load(tokenizer) if tokenizer else None
        if self._tok is None:
            self.pool = list(_FALLBACK)
        else:
            pool = []
            for token in self._tok.get_vocab():
                word = token[1:]
                if (
                    token.startswith("\u0120")
                    and word.isalpha()
                    and len(word) >= 3
                    and len(self._tok.encode(" " + word, add_special_tokens=False).ids) == 1
                ):
                    pool.append(word)
            self.pool = sorted(pool) or list(_FALLBACK)

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def count(self, text: str) -> int:
        """Tokens in ``text`` (the word count where no tokenizer is loaded)."""
        if self._tok is None:
            return len(text.split())
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def words(self, rng: random.Random, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of words drawn with ``rng`` (text starts with a space-free
        word; join pieces with a leading space to keep counts additive)."""
        if n_tokens <= 0:
            return ""
        words = [rng.choice(self.pool) for _ in range(n_tokens)]
        text = " ".join(words)
        while len(words) > 1 and self.count(text) > n_tokens:
            words.pop()
            text = " ".join(words)
        return text
