"""Multi-turn chat: sessions of ``turns`` chat turns; each turn sends the whole conversation so
far (system prompt, earlier user turns and the model's earlier answers) plus a new user message,
so every turn's prompt extends the previous one. Requests carry ``x-session-id``. A router that
keeps a session on the worker holding its KV prefills only the new turn."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import Conversation, Turn, Workload

__all__ = ["MultiTurn"]


@dataclass
class MultiTurn(Workload):
    turns: int = 4
    system_len: int = 256
    user_len: int = 48
    output_len: int = 32
    name = "multi-turn"

    def build(self, rng: random.Random, text: TextGen, n_requests: int) -> list[Conversation]:
        """``ceil(n_requests / turns)`` sessions (0 requests: 8 sessions)."""
        sessions = -(-n_requests // self.turns) if n_requests else 8
        out = []
        for s in range(sessions):
            system = text.words(rng, self.system_len)
            turns = tuple(
                Turn(text.words(rng, self.user_len), self.output_len) for _ in range(self.turns)
            )
            sid = f"session-{s}-{rng.getrandbits(32):08x}"
            out.append(Conversation(f"chat-{s}", turns, api="chat", system=system, session=sid))
        return out
