"""Turn an OpenAI request into the token ids the engine will see, with the model's own tokenizer.

Precise prefix matching needs the exact tokens: for ``/v1/completions`` the prompt (a string,
tokenized with special tokens as vLLM does by default, or already a list of token ids); for
``/v1/chat/completions`` the messages rendered through the model's chat template with vLLM's
defaults (``add_generation_prompt`` true, no extra special tokens). Anything else (batched
prompts, multimodal parts) yields None: the request is routed on load alone.

Loading ``transformers`` and the tokenizer takes seconds, so it happens once in ``load`` (the
scheduler awaits it in a thread at start-up). A prompt is rendered and looked up in the segment
cache below on the event loop; the byte-pair encoding of a large amount of new text goes to one
dedicated thread, where the tokenizer runs without the GIL (see :data:`INLINE_ENCODE_CHARS` for
why not everything goes there). The whole encode, used when the cache is off, runs on that thread
only: a Hugging Face tokenizer must not be reconfigured while another thread encodes with it.

Chat prompts share long heads (a system prompt, earlier turns), so the rendered text is encoded
per *segment* and segments are cached (:class:`SegmentEncoder`)::

    <|im_start|>system\nYou are ...<|im_end|>\n<|im_start|>user\nSummarise ...<|im_end|>\n...
    |  added  ||      segment (cached)      ||added|seg|  added  ||   segment (new)   |

A fast tokenizer cuts its input at added tokens before it normalizes or pre-tokenizes anything, so
the text between two added tokens is encoded on its own: ``encode(A + S + B) == encode(A) +
[id(S)] + encode(B)`` for an added token ``S``, as long as ``S`` matches on the raw text and eats
no neighbouring whitespace (``normalized``, ``lstrip``, ``rstrip`` and ``single_word`` all false:
anything else switches the cache off) and no special tokens are added around the whole text
(``add_special_tokens`` false, the chat default). The first prompts are encoded both ways and the
cache switches itself off, with a warning, if they ever differ.

Long pieces are cut further, into chunks of about ``chunk_chars`` characters, each cut made just
before a single space that sits between two letters (``...word| next...``): byte-level BPE
pre-tokenizers (GPT-2, Llama 3, Qwen) never join a word to the space-led word after it, so
encoding the chunks one by one gives the same ids as encoding the piece. The cuts are counted
from the start of the piece, so two prompts that share a long head (a document asked about
again, a long system prompt with a new question after it) share its chunks, and only the chunk
where they part and those after it are encoded again. Plain-text completion prompts go the same
way (with the tokenizer's own leading special tokens, if any, put in front).
"""

from __future__ import annotations

import asyncio
import logging
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["PromptTokenizer", "SegmentEncoder", "chat_messages"]

log = logging.getLogger(__name__)

# Where a long piece may be cut: before a single space between two letters (see the docstring).
_CHUNK_CUT = re.compile(r"(?<=[^\W\d_]) (?=[^\W\d_])")


@dataclass(slots=True)
class SegmentPlan:
    """What :meth:`SegmentEncoder.plan` found: the pieces of ``text`` and the chunks to encode."""

    text: str
    add_special: bool
    head: list[int]  # the tokenizer's leading special tokens, when asked for
    parts: list[Sequence[int]]
    missing: dict[str, list[int]]  # chunk -> its places in parts

    @property
    def missing_chars(self) -> int:
        return sum(map(len, self.missing))


class SegmentEncoder:
    """``encode(text)`` (no special tokens added) as the concatenation of the encodings of the
    pieces between added tokens, with the pieces' token ids kept in an LRU bounded by
    ``max_tokens`` (4 bytes a token). ``enabled`` is False when the tokenizer's added tokens do
    not allow the split (see the module docstring); ``encode`` then returns None.

    ``verify_first``: the first prompts are also encoded whole and compared; a difference
    disables the encoder (the caller falls back to the whole encode) and is logged.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_tokens: int = 1_000_000,
        verify_first: int = 16,
        chunk_chars: int = 1024,
    ):
        if chunk_chars < 1:
            raise ValueError("chunk_chars must be >= 1")
        self._tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.chunk_chars = chunk_chars
        self._verify = verify_first
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.misses = 0
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        # Looked up once, not per request (older tokenizers have no encode_batch_fast).
        self._encode_batch: Any = getattr(self._backend, "encode_batch_fast", None) or getattr(
            self._backend, "encode_batch", None
        )
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._ids = {t.content: i for i, t in added.items()}
        self.enabled = bool(
            self._backend is not None
            and self._ids
            and not any(
                t.normalized or t.lstrip or t.rstrip or t.single_word for t in added.values()
            )
        )
        # Longest first: the tokenizer matches added tokens leftmost-longest.
        alternatives = sorted(self._ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")").split
        # The special tokens the tokenizer puts around a text when asked to (a leading BOS is
        # the common case); None when they are not a pure prefix (then only add_special=False).
        self._leading: list[int] | None = None
        if self.enabled:
            bare = list(tokenizer.encode("hello", add_special_tokens=False))
            full = list(tokenizer.encode("hello", add_special_tokens=True))
            if full[len(full) - len(bare) :] == bare:
                self._leading = full[: len(full) - len(bare)]

    def _chunks(self, piece: str) -> list[str]:
        """``piece`` cut before a space between two letters, every ``chunk_chars`` or so."""
        size = self.chunk_chars
        if len(piece) <= size:
            return [piece]
        out: list[str] = []
        start, search = 0, _CHUNK_CUT.search
        while len(piece) - start > size:
            found = search(piece, start + size)
            if found is None:
                break
            out.append(piece[start : found.start()])
            start = found.start()
        out.append(piece[start:])
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int] | None:
        plan = self.plan(text, add_special_tokens)
        if plan is None:
            return None
        return self.finish(plan, self.encode_many(list(plan.missing)) if plan.missing else [])

    def plan(self, text: str, add_special_tokens: bool = False) -> SegmentPlan | None:
        """``text`` laid out as pieces: an added token's id, a cached chunk's ids, or a place for
        a chunk not seen before (``SegmentPlan.missing``, each chunk once however often the text
        repeats it). None when the encoder is off or cannot add these special tokens."""
        if not self.enabled:
            return None
        if add_special_tokens:
            if self._leading is None:
                return None
            head = list(self._leading)
        else:
            head = []
        ids, cache = self._ids, self._cache
        parts: list[Sequence[int]] = []
        missing: dict[str, list[int]] = {}  # chunk -> its places in parts
        # split with one group: text, token, text, token, ..., text
        for i, piece in enumerate(self._split(text)):
            if i & 1:
                parts.append((ids[piece],))
                continue
            if not piece:
                continue
            for chunk in self._chunks(piece):
                cached = cache.get(chunk)
                if cached is not None:
                    cache.move_to_end(chunk)
                    self.hits += 1
                    parts.append(cached)
                    continue
                places = missing.get(chunk)
                if places is None:
                    self.misses += 1
                    missing[chunk] = [len(parts)]
                else:  # seen earlier in this text: encoded once, counted as a hit
                    self.hits += 1
                    places.append(len(parts))
                parts.append(())
        return SegmentPlan(text, add_special_tokens, head, parts, missing)

    def finish(self, plan: SegmentPlan, encoded: list[list[int]]) -> list[int]:
        """The ids of the planned text, given ``encode_many(list(plan.missing))``; the new
        chunks go into the cache."""
        parts, cache = plan.parts, self._cache
        for (chunk, places), chunk_ids in zip(plan.missing.items(), encoded, strict=True):
            ids_of_chunk = array("I", chunk_ids)
            for place in places:
                parts[place] = ids_of_chunk
            if chunk not in cache:  # another request may have put it since the plan
                self._put(chunk, ids_of_chunk)
        out = plan.head
        for part in parts:
            out.extend(part)
        if self._verify > 0:
            self._verify -= 1
            whole = self._backend.encode(plan.text, add_special_tokens=plan.add_special).ids
            if whole != out:
                self.enabled = False
                self._cache.clear()
                log.warning(
                    "tokenizer: per-segment encoding differs from the whole encode; "
                    "the segment cache is off"
                )
                return list(whole)
        return out

    def encode_many(self, chunks: list[str]) -> list[list[int]]:
        """The ids of each chunk, as ``encode(chunk, add_special_tokens=False)`` gives them.
        One ``encode_batch_fast`` call: it skips the character offsets nobody here reads (~20 %
        of a chunk's BPE time measured single-threaded) and encodes the chunks of a new
        document in parallel on the tokenizer's own threads, without the GIL. It touches no
        state of this encoder, so it may run on another thread while the loop plans."""
        return [e.ids for e in self._encode_batch(chunks, add_special_tokens=False)]

    def _put(self, piece: str, ids: array[int]) -> None:
        if len(ids) > self.max_tokens:
            return
        cache = self._cache
        cache[piece] = ids
        self._tokens += len(ids)
        while self._tokens > self.max_tokens:
            _, old = cache.popitem(last=False)
            self._tokens -= len(old)

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "segments": len(self._cache),
            "tokens": self._tokens,
            "hits": self.hits,
            "misses": self.misses,
        }


class _Text(NamedTuple):
    text: str
    add_special: bool


def chat_messages(messages: Any) -> list[dict[str, Any]] | None:
    """Messages with text-part lists flattened to strings (as vLLM does for string-content
    templates); None when a message carries anything but text."""
    if not isinstance(messages, list) or not messages:
        return None
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    return None
                texts.append(str(part.get("text", "")))
            message = {**message, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            return None
        out.append(message)
    return out


#: New text up to this many characters (~700 tokens of English) is encoded on the event loop,
#: longer text on the tokenizer thread. Handing work to a thread and back costs ~170 µs of wall
#: time on a 2-vCPU VM (two cross-thread wake-ups), more than the whole of a cached chat
#: prompt's encode (~110 µs), and the Python part of an encode holds the GIL on either thread.
INLINE_ENCODE_CHARS = 2048


class PromptTokenizer:
    """The coordinator's tokenizer. ``atokenize`` renders the prompt and looks its pieces up in
    the segment cache on the event loop, and hands only a large amount of new text's BPE to the
    tokenizer thread (which runs it without the GIL); everything else, and the whole encode when
    the segment cache is off, runs on that one thread, as fast tokenizers are not safe to
    reconfigure while another thread encodes."""

    def __init__(
        self,
        name_or_path: str,
        *,
        cache_tokens: int = 4_000_000,
        inline_encode_chars: int = INLINE_ENCODE_CHARS,
    ) -> None:
        self.name_or_path = name_or_path
        self.cache_tokens = cache_tokens
        self.inline_encode_chars = inline_encode_chars
        self._tokenizer: Any = None
        self._segments: SegmentEncoder | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def load(self) -> None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            if self.cache_tokens > 0:
                self._segments = SegmentEncoder(self._tokenizer, max_tokens=self.cache_tokens)

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def atokenize(self, path: str, body: dict[str, Any]) -> list[int] | None:
        loop = asyncio.get_running_loop()
        segments = self._segments
        if self._tokenizer is None or segments is None or not segments.enabled:
            return await loop.run_in_executor(self._executor, self.tokenize, path, body)
        source = self._source(path, body)
        if not isinstance(source, _Text):
            return source
        plan = segments.plan(source.text, source.add_special)
        if plan is None:
            return await loop.run_in_executor(self._executor, self._encode_whole, source)
        chunks = list(plan.missing)
        if not chunks:
            encoded: list[list[int]] = []
        elif plan.missing_chars <= self.inline_encode_chars:
            encoded = segments.encode_many(chunks)
        else:
            encoded = await loop.run_in_executor(self._executor, segments.encode_many, chunks)
        return segments.finish(plan, encoded)

    def tokenize(self, path: str, body: dict[str, Any]) -> list[int] | None:
        if self._tokenizer is None:
            return None
        source = self._source(path, body)
        if not isinstance(source, _Text):
            return source
        if self._segments is not None:
            ids = self._segments.encode(source.text, source.add_special)
            if ids is not None:
                return ids
        return self._encode_whole(source)

    def _encode_whole(self, source: _Text) -> list[int]:
        return list(self._tokenizer.encode(source.text, add_special_tokens=source.add_special))

    def _source(self, path: str, body: dict[str, Any]) -> _Text | list[int] | None:
        """What to encode (text, and whether to add special tokens), or the prompt's token ids
        when the request carries them, or None when it cannot be tokenized here."""
        if path.endswith("/chat/completions"):
            return self._chat(body)
        return self._completion(body)

    def _completion(self, body: dict[str, Any]) -> _Text | list[int] | None:
        prompt = body.get("prompt")
        # A batch of one prompt (["text"] or [[ids]]), but not a one-token prompt ([id]).
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return _Text(prompt, bool(body.get("add_special_tokens", True)))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None

    def _chat(self, body: dict[str, Any]) -> _Text | None:
        messages = chat_messages(body.get("messages"))
        if messages is None:
            return None
        kwargs = body.get("chat_template_kwargs")
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tools=body.get("tools"),
                tokenize=False,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                **(kwargs if isinstance(kwargs, dict) else {}),
            )
        except Exception:  # a template that rejects these messages: vLLM will say why
            return None
        return _Text(text, bool(body.get("add_special_tokens", False)))

    def describe(self) -> dict[str, Any]:
        """The segment cache's state (None: off)."""
        return {"segment_cache": self._segments.describe() if self._segments else None}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
