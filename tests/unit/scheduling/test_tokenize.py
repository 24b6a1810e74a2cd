"""Prompt tokenization as the engine does it: chat message normalisation, completions and chat
prompts against the tiny model's real tokenizer, the async path, and KVAwareScheduler.prepare."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import pytest

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from pd_runtime.scheduling.tokenize import PromptTokenizer, chat_messages
from tests.servers import free_port

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TEXT = "The quick brown fox jumps over the lazy dog. " * 4


# ---- chat_messages ------------------------------------------------------------------------


def test_string_and_missing_content_pass_through() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]},
    ]
    assert chat_messages(messages) == messages


def test_text_parts_are_joined_with_newlines() -> None:
    original = {
        "role": "user",
        "name": "u",
        "content": [
            {"type": "text", "text": "one"},
            {"type": "text", "text": "two"},
            {"type": "text"},
        ],
    }
    assert chat_messages([original]) == [{"role": "user", "name": "u", "content": "one\ntwo\n"}]
    assert isinstance(original["content"], list)  # the request body is not modified


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hello",
        [{"content": "no role"}],
        [{"role": 1, "content": "x"}],
        ["not a dict"],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}],
        [{"role": "user", "content": ["bare string part"]}],
        [{"role": "user", "content": {"type": "text", "text": "a dict"}}],
        [{"role": "user", "content": 42}],
    ],
)
def test_anything_but_text_is_none(messages: Any) -> None:
    assert chat_messages(messages) is None


# ---- PromptTokenizer against the tiny model's tokenizer ---------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The test install (the cpu and dev extras) always has these: fail, never skip, without them.
    import safetensors  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from pd_runtime.model.tiny import write_model

    return write_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    t = PromptTokenizer(str(model_dir))
    t.load()
    yield t
    t.close()


def test_unloaded_tokenizer_yields_none(model_dir: Path) -> None:
    t = PromptTokenizer(str(model_dir))
    try:
        assert not t.loaded
        assert t.tokenize(COMPLETIONS, {"prompt": TEXT}) is None
    finally:
        t.close()


def test_completion_prompt_string_equals_the_tokenizer(tok: PromptTokenizer, hf: Any) -> None:
    ids = tok.tokenize(COMPLETIONS, {"prompt": TEXT})
    assert ids == hf.encode(TEXT)
    assert ids is not None and len(ids) > 20
    assert tok.tokenize(COMPLETIONS, {"prompt": [TEXT]}) == ids  # a batch of one
    assert tok.tokenize(COMPLETIONS, {"prompt": TEXT, "add_special_tokens": False}) == hf.encode(
        TEXT, add_special_tokens=False
    )


def test_completion_token_ids_pass_through(tok: PromptTokenizer) -> None:
    assert tok.tokenize(COMPLETIONS, {"prompt": [5, 6, 7, 8]}) == [5, 6, 7, 8]
    assert tok.tokenize(COMPLETIONS, {"prompt": [[5, 6, 7]]}) == [5, 6, 7]  # a batch of one
    assert tok.tokenize(COMPLETIONS, {"prompt": [5]}) == [5]  # a one-token prompt


@pytest.mark.parametrize(
    "prompt",
    [
        ["first", "second"],  # batched: not one prompt
        [[1, 2], [3, 4]],
        [],
        [1, "two"],
        None,
        {"text": "x"},
    ],
)
def test_completion_prompts_that_are_not_one_prompt_yield_none(
    tok: PromptTokenizer, prompt: Any
) -> None:
    assert tok.tokenize(COMPLETIONS, {"prompt": prompt}) is None


def test_chat_is_templated_then_encoded_without_special_tokens(
    tok: PromptTokenizer, hf: Any
) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is a key-value cache?"},
    ]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf.encode(text, add_special_tokens=False)
    assert tok.tokenize(CHAT, {"messages": messages}) == expected
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt is there

    parts = [
        {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is a key-value cache?"}]},
    ]
    assert tok.tokenize(CHAT, {"messages": parts}) == expected


def test_chat_request_options_are_honoured(tok: PromptTokenizer, hf: Any) -> None:
    messages = [{"role": "user", "content": "hi"}]
    no_gen = hf.encode(
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
        add_special_tokens=False,
    )
    body = {"messages": messages, "add_generation_prompt": False}
    assert tok.tokenize(CHAT, body) == no_gen
    assert tok.tokenize(CHAT, {"messages": messages}) != no_gen


def test_chat_with_non_text_parts_yields_none(tok: PromptTokenizer) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    assert tok.tokenize(CHAT, {"messages": [{"role": "user", "content": [image]}]}) is None
    assert tok.tokenize(CHAT, {"messages": "hi"}) is None
    assert tok.tokenize(CHAT, {}) is None


async def test_atokenize_runs_off_the_loop_with_the_same_result(model_dir: Path, hf: Any) -> None:
    t = PromptTokenizer(str(model_dir))
    try:
        assert await t.atokenize(COMPLETIONS, {"prompt": TEXT}) is None  # not loaded yet
        await t.aload()
        assert t.loaded
        assert await t.atokenize(COMPLETIONS, {"prompt": TEXT}) == hf.encode(TEXT)
        messages = [{"role": "user", "content": "hello there"}]
        expected = hf.encode(
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        assert await t.atokenize(CHAT, {"messages": messages}) == expected
    finally:
        t.close()


@pytest.mark.parametrize("inline_chars", [0, 10**9])
async def test_atokenize_encodes_little_new_text_on_the_loop_and_much_on_the_thread(
    model_dir: Path, hf: Any, inline_chars: int
) -> None:
    """Up to ``inline_encode_chars`` of new text is encoded on the event loop (no thread hop:
    the tokenizer thread is never asked); more goes to the thread. Same ids either way, for
    chat and completion prompts, cached, new and in between, and concurrent requests."""
    import asyncio
    import random
    import threading

    t = PromptTokenizer(str(model_dir), inline_encode_chars=inline_chars)
    await t.aload()
    seg = t._segments
    assert seg is not None
    threads: set[str] = set()
    real = seg.encode_many

    def recording(chunks: list[str]) -> list[list[int]]:
        threads.add(threading.current_thread().name)
        return real(chunks)

    seg.encode_many = recording  # type: ignore[method-assign]
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "naïve", "日本", "42", "fox", "the"]
    system = " ".join(rng.choice(words) for _ in range(600))
    try:
        bodies: list[tuple[str, dict[str, Any]]] = []
        for i in range(12):
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(1, 900)))
            messages = [{"role": "system", "content": system}, {"role": "user", "content": doc}]
            bodies.append((CHAT, {"messages": messages}))
            bodies.append((COMPLETIONS, {"prompt": f"{system} {doc} {i}"}))
        expected = [
            hf.encode(
                hf.apply_chat_template(b["messages"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )
            if path == CHAT
            else hf.encode(b["prompt"])
            for path, b in bodies
        ]
        got = await asyncio.gather(*(t.atokenize(path, b) for path, b in bodies))
        assert got == expected
        assert await t.atokenize(*bodies[0]) == expected[0]  # cached now
        loop_thread = threading.current_thread().name
        if inline_chars:
            assert threads == {loop_thread}
        else:
            assert threads and loop_thread not in threads
    finally:
        t.close()


# ---- KVAwareScheduler.prepare with a tokenizer ---------------------------------------------


def _scheduler(model_dir: Path, block_size: int = 4) -> KVAwareScheduler:
    # Free ports: start() runs the metrics scraper, which must not reach anything real.
    eps = [
        EndpointConfig(
            name=f"decode-{i}",
            role="decode",
            address=f"127.0.0.1:{free_port()}",
            url="http://127.0.0.1:1",
        )
        for i in range(2)
    ]
    return KVAwareScheduler(eps, tokenizer=str(model_dir), block_size=block_size, seed=0)


async def test_prepare_fills_token_ids_and_block_keys(model_dir: Path, hf: Any) -> None:
    s = _scheduler(model_dir)
    await s.start()
    try:
        assert s.debug_state()["tokenizer"]["loaded"] is True
        req = SchedulingRequest("r", "m", COMPLETIONS, {"prompt": TEXT})
        prepared = await s.prepare(req)
        ids = hf.encode(TEXT)
        assert prepared.token_ids == ids
        assert prepared.block_keys == PrefixIndex.block_keys(ids, 4)
        assert len(prepared.block_keys) == len(ids) // 4
        assert (prepared.request_id, prepared.body) == (req.request_id, req.body)

        unchanged = SchedulingRequest("r", "m", COMPLETIONS, {"prompt": ["a", "b"]})
        assert await s.prepare(unchanged) is unchanged
        chat_req = SchedulingRequest(
            "r", "m", CHAT, {"messages": [{"role": "user", "content": "hi"}]}
        )
        chat = await s.prepare(chat_req)
        assert chat.token_ids == hf.encode(
            hf.apply_chat_template(
                chat_req.body["messages"], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        # The scheduler routes on what prepare learned.
        result = s.schedule(prepared)
        assert result.prompt_tokens == len(ids)
        assert result.reason == "no-prefill-endpoint"
    finally:
        await s.stop()


# ---- SegmentEncoder: the per-segment cache gives the whole encode's ids -------------------

_PIECES = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "|>", "<|", "\n", "\n\n", " ", "  ",
    "system\n", "user\n", "The quick brown fox", " jumps", "over the lazy dog.", "'s", "'ll",
    "123", "4567", "e\u0301", "\u0301", "café", "日本語のテキスト", "🙂", "\t", "a", "A",
]  # fmt: skip


def _random_text(rng: Any) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 40)))


def test_segment_encoder_equals_the_whole_encode_on_random_text(hf: Any) -> None:
    import random

    from pd_runtime.scheduling.tokenize import SegmentEncoder

    rng = random.Random(0)
    enc = SegmentEncoder(hf, max_tokens=200, verify_first=0)  # small: evictions happen too
    assert enc.enabled
    texts = [_random_text(rng) for _ in range(300)]
    for text in texts + texts[::7]:  # the second pass hits the cache
        assert enc.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
    assert enc.hits and enc.misses
    assert enc.describe()["tokens"] <= 200


@pytest.mark.parametrize("add_special", [False, True])
def test_long_pieces_cut_into_chunks_still_equal_the_whole_encode(
    hf: Any, add_special: bool
) -> None:
    """Chunks of a few characters (cut before a space between two letters) on random text of
    words, numbers, accents, CJK, emoji, whitespace runs and added tokens."""
    import random

    from pd_runtime.scheduling.tokenize import SegmentEncoder

    rng = random.Random(1)
    words = [*_PIECES, " the", " a", " word", " Word", "x", " é", " 日本", " 2", ".", ",", " "]
    for chunk_chars in (1, 3, 8, 40):
        enc = SegmentEncoder(hf, max_tokens=500, verify_first=0, chunk_chars=chunk_chars)
        for _ in range(200):
            text = "".join(rng.choice(words) for _ in range(rng.randint(0, 80)))
            want = hf.encode(text, add_special_tokens=add_special)
            assert enc.encode(text, add_special) == want, (chunk_chars, repr(text))
        assert enc.hits and enc.misses


def test_completions_sharing_a_long_document_reuse_its_chunks(hf: Any) -> None:
    from pd_runtime.scheduling.tokenize import SegmentEncoder

    enc = SegmentEncoder(hf, chunk_chars=64)
    document = " ".join(f"word{i % 7} alpha beta gamma" for i in range(200))
    first = enc.encode(f"{document} Question: what is alpha? Answer:", True)
    assert first == hf.encode(f"{document} Question: what is alpha? Answer:")
    misses = enc.misses
    prompt = f"{document} Question: and beta, then? Answer:"
    assert enc.encode(prompt, True) == hf.encode(prompt)
    # Only the chunk where the two prompts part (and the rest after it) was encoded again.
    assert enc.misses - misses <= 2 and enc.hits >= len(document) // 64 - 1


def test_new_chunks_are_encoded_in_one_batch_and_a_repeated_one_once(hf: Any) -> None:
    """The chunks a text brings that the cache lacks go to the tokenizer together, each once
    however often the text repeats it; the ids still equal the whole encode."""
    from pd_runtime.scheduling.tokenize import SegmentEncoder

    enc = SegmentEncoder(hf, chunk_chars=16, verify_first=0)
    batches: list[list[str]] = []
    real = enc.encode_many

    def recording(chunks: list[str]) -> list[list[int]]:
        batches.append(list(chunks))
        return real(chunks)

    enc.encode_many = recording  # type: ignore[method-assign]
    text = "alpha beta gamma delta <|im_end|>alpha beta gamma delta <|im_end|>epsilon zeta eta"
    assert enc.encode(text) == hf.encode(text, add_special_tokens=False)
    assert len(batches) == 1
    assert len(batches[0]) == len(set(batches[0])) == enc.misses
    assert batches[0] == ["alpha beta gamma", " delta ", "epsilon zeta eta"]
    assert enc.hits == 2  # the second "alpha beta gamma" and " delta ": encoded once each
    assert enc.encode(text) == hf.encode(text, add_special_tokens=False)
    assert len(batches) == 1  # all cached now: no call


def test_chat_prompts_sharing_a_system_prompt_reuse_its_tokens(
    tok: PromptTokenizer, hf: Any
) -> None:
    system = {"role": "system", "content": "You are terse. " * 50}
    seg = tok._segments
    assert seg is not None and seg.enabled
    for i in range(20):
        messages = [system, {"role": "user", "content": f"question {i}: " + "why? " * i}]
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before = seg.hits
        assert tok.tokenize(CHAT, {"messages": messages}) == hf.encode(
            text, add_special_tokens=False
        )
        if i:
            assert seg.hits > before  # at least the system turn came from the cache


def test_segment_encoder_turns_itself_off_on_a_difference(hf: Any) -> None:
    from pd_runtime.scheduling.tokenize import SegmentEncoder

    enc = SegmentEncoder(hf, verify_first=2)
    enc._cache["hello"] = array("I", [1, 2, 3])  # a wrong cached entry
    assert enc.encode("<|im_start|>hello") == hf.encode(
        "<|im_start|>hello", add_special_tokens=False
    )
    assert not enc.enabled and enc.encode("x") is None


def test_segment_encoder_is_off_when_added_tokens_strip_whitespace(hf: Any) -> None:
    from types import SimpleNamespace

    from pd_runtime.scheduling.tokenize import SegmentEncoder

    stripping = SimpleNamespace(
        content="<x>", normalized=False, lstrip=True, rstrip=False, single_word=False
    )
    fake = SimpleNamespace(
        backend_tokenizer=hf.backend_tokenizer, added_tokens_decoder={5: stripping}
    )
    assert not SegmentEncoder(fake).enabled
