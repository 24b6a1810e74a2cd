"""The one SSE parser (pd_runtime.common.sse): events however the network splits the bytes."""

from __future__ import annotations

import json

import pytest

from pd_runtime.common.sse import DONE, SSEDecoder

__all__: list[str] = []

STREAM = (
    b": a comment, then an OpenAI stream\n"
    b'data: {"choices": [{"text": " caf\xc3\xa9"}]}\n\n'
    b"event: ignored\nid: 7\nretry: 100\n"
    b"data: first line\ndata:second line\ndata\n\n"
    b'data: {"choices": [{"text": "!"}]}\r\n\r\n'
    b"data: [DONE]\r\r"
)
EXPECTED = [
    '{"choices": [{"text": " café"}]}',
    "first line\nsecond line\n",
    '{"choices": [{"text": "!"}]}',
    DONE,
]


def _feed(pieces: list[bytes]) -> list[str]:
    sse = SSEDecoder()
    return [event for piece in pieces for event in sse.feed(piece)]


def test_whole_stream() -> None:
    events = _feed([STREAM])
    assert events == EXPECTED
    assert json.loads(events[0])["choices"][0]["text"] == " café"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_any_split_gives_the_same_events(size: int) -> None:
    """Pieces ending mid-line, between CR and LF, inside the two bytes of 'é'."""
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert _feed(pieces) == EXPECTED


def test_every_two_way_split() -> None:
    for cut in range(len(STREAM) + 1):
        assert _feed([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_events_complete_only_at_the_blank_line() -> None:
    sse = SSEDecoder()
    assert sse.feed(b"data: {}\n") == []  # no blank line yet
    assert sse.feed(b"\n") == ["{}"]
    assert sse.feed(b": keep-alive\n\n") == []  # a comment alone is no event
    assert sse.feed(b"event: ping\n\n") == []  # nor an event without data
    assert sse.feed(b"data: cut off") == []  # the stream may end here: nothing is reported


def test_one_space_after_the_colon_is_dropped() -> None:
    assert _feed([b"data:  two\n\ndata:none\n\n"]) == [" two", "none"]
