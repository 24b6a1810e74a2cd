"""The one server-sent-events parser (``text/event-stream``), for the gateway and the harness.

OpenAI-compatible servers (vLLM among them) stream an answer as events of one ``data:`` line each,
a blank line after each, and a last ``data: [DONE]``::

    data: {"choices": [{"text": " the"}]}\\n
    \\n
    data: [DONE]\\n
    \\n

:class:`SSEDecoder` takes the body in whatever pieces the network delivers (a piece may end inside
a line, inside a CRLF pair or inside a UTF-8 sequence) and returns the data of each complete event,
following the WHATWG rules that matter here: lines end at CRLF, LF or CR; a line starting with
``:`` is a comment; ``field: value`` loses one space after the colon; an event's ``data`` lines
are joined with ``\\n``; a blank line ends the event, and an event without data is not reported;
an event cut off by the end of the stream is dropped. ``event:``, ``id:`` and ``retry:`` are read
and ignored: OpenAI streams carry data only. ``[DONE]`` is reported like any other data (compare
with :data:`DONE`), so callers decide what a missing one means.
"""

from __future__ import annotations

__all__ = ["DONE", "SSEDecoder"]

#: The data of the OpenAI stream's last event.
DONE = "[DONE]"


class SSEDecoder:
    """Incremental decoder for one stream: :meth:`feed` it the body's bytes, in order."""

    __slots__ = ("_after_cr", "_data", "_partial")

    def __init__(self) -> None:
        self._partial = b""  # an unfinished line
        self._after_cr = False  # the last piece ended with CR: an LF first in the next is its pair
        self._data: list[bytes] | None = None  # the current event's data lines

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that ``chunk`` completes (often none or one)."""
        if not chunk:
            return []
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]  # the LF of a CRLF split across pieces: its line already ended
        buf = self._partial + chunk if self._partial else chunk
        self._after_cr = buf.endswith(b"\r")
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data is not None:
                    events.append(b"\n".join(self._data).decode("utf-8", errors="replace"))
                    self._data = None
            elif line[0] != 0x3A:  # not a ":" comment
                field, _, value = line.partition(b":")
                if field == b"data":
                    if value[:1] == b" ":
                        value = value[1:]
                    if self._data is None:
                        self._data = [value]
                    else:
                        self._data.append(value)
        return events
