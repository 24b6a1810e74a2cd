"""Random lengths: independent prompts (no shared text), input and output lengths uniform around
a mean. The cache-cold baseline: routing cannot win by prefix locality here."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import Conversation, Turn, Workload, jitter

__all__ = ["RandomLengths"]


@dataclass
class RandomLengths(Workload):
    input_len: int = 256
    output_len: int = 32
    range_ratio: float = (
        0.0  # 0: fixed lengths (the shape `vllm bench serve --dataset-name random` uses)
    )
    name = "random"

    def build(self, rng: random.Random, text: TextGen, n_requests: int) -> list[Conversation]:
        out = []
        for i in range(n_requests):
            prompt = text.words(rng, jitter(rng, self.input_len, self.range_ratio))
            turn = Turn(prompt, jitter(rng, self.output_len, self.range_ratio))
            out.append(Conversation(f"random-{i}", (turn,)))
        return out
