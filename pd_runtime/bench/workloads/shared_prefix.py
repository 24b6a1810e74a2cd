"""Shared prefix, the llm-d benchmark shape: ``groups`` system prompts of ``prefix_len`` tokens,
``prompts_per_group`` distinct questions after each, sent in a seeded shuffled order. A router
that sends a group to the worker already holding its prefix saves that prefill."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import Conversation, Turn, Workload

__all__ = ["SharedPrefix"]


@dataclass
class SharedPrefix(Workload):
    groups: int = 4
    prompts_per_group: int = 8
    prefix_len: int = 512
    question_len: int = 32
    output_len: int = 32
    name = "shared-prefix"

    def build(self, rng: random.Random, text: TextGen, n_requests: int) -> list[Conversation]:
        """``n_requests`` requests cycling over groups x prompts (0 = exactly groups x prompts)."""
        prefixes = [text.words(rng, self.prefix_len) for _ in range(self.groups)]
        total = n_requests or self.groups * self.prompts_per_group
        pairs = [(g, q) for g in range(self.groups) for q in range(self.prompts_per_group)]
        order = [pairs[i % len(pairs)] for i in range(total)]
        rng.shuffle(order)
        out = []
        for i, (g, q) in enumerate(order):
            question = text.words(rng, self.question_len)
            turn = Turn(f"{prefixes[g]} {question}", self.output_len)
            out.append(Conversation(f"prefix-{i}", (turn,), group=f"g{g}q{q}"))
        return out
