"""Long-document Q&A: a few long shared documents (``doc_len`` tokens each) and many short
questions about them (``question_len`` tokens), each request picking a document at random. Most
of each prompt is shared, so it measures prefix reuse of long contexts and the cost of a cold one."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import Conversation, Turn, Workload

__all__ = ["LongDocQA"]


@dataclass
class LongDocQA(Workload):
    documents: int = 2
    doc_len: int = 1200
    question_len: int = 24
    output_len: int = 24
    name = "long-doc"

    def build(self, rng: random.Random, text: TextGen, n_requests: int) -> list[Conversation]:
        docs = [text.words(rng, self.doc_len) for _ in range(self.documents)]
        out = []
        for i in range(n_requests or 4 * self.documents):
            d = rng.randrange(self.documents)
            question = text.words(rng, self.question_len)
            prompt = f"{docs[d]} Question: {question} Answer:"
            out.append(Conversation(f"doc-{i}", (Turn(prompt, self.output_len),), group=f"doc{d}"))
        return out
