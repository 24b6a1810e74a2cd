"""Online latency model: what each endpoint's TTFT and TPOT will be, learned from the streams the
coordinator forwards.

Why. The load scorers see counts (requests in flight, queues, cache use), not speed: two decode
workers with the same queue get the same score even when one is twice as slow (an older GPU, a
noisy neighbour, a core shared with a prefill worker). The coordinator sees every streamed answer
anyway: when it sent the request, when the first chunk came back (TTFT) and how fast the
following chunks came (TPOT). This module turns those observations into per-endpoint predictions
that a scorer, an SLO filter and the P/D decider can use.

How. One small exponentially weighted least-squares line per endpoint and quantity::

    TTFT_direct(d)  ~  c_d + a_d * (u_d + Q_d)       decode endpoint d serving the prompt itself
    TTFT_pd(p, d)   ~  c_p + a_p * (u_p + Q_p)       prefill endpoint p's part ...
                      + t_d * u_d                    ... + the KV transfer to d ...
                      + H                            ... + the handover (sidecar hops)
    TPOT(d)         ~  b_d + k_d * n_d

    u_X : prompt tokens X does not already hold (the prefix index's answer)
    Q_X : uncached prompt tokens of requests routed to X by us whose first token has not come
          back yet (the prefill work queued ahead; assumed to cost the same per token)
    n_d : our requests in flight at d, this one included (the running batch)
    t_d : KV transfer seconds per token into d: from the worker's NIXL histogram
          (vllm:nixl_xfer_time_seconds_sum/_count, when the endpoint state carries them) as
          (mean seconds per transfer) / (mean tokens per disaggregated request to d), or the
          configured ``transfer_s_per_token``, else 0 (then the transfer is learnt as part of
          the prefill endpoint's line, which is fitted to the observed TTFT minus t_d*u_d + H)

Each line is fitted from exponentially decayed sums (weight 1/2 after ``half_life`` samples,
so a worker that slows down is followed within a few dozen requests)::

    S0 = sum w,  Sx = sum w x,  Sy = sum w y,  Sxx = sum w x^2,  Sxy = sum w x y
    slope = (S0 Sxy - Sx Sy) / (S0 Sxx - Sx^2),   intercept = (Sy - slope Sx) / S0

with a fallback to a line through the origin (slope = Sy / Sx) while the x values barely vary,
and slope and intercept kept >= 0. An update and a prediction are O(1) (a handful of float
operations; the coefficients are solved at update time). An endpoint with fewer than
``min_samples`` observations is *cold*: :meth:`LatencyModel.ttft` still answers, but callers
check :meth:`LatencyModel.warm` and fall back to the counting scorers / the threshold rule.

Only streamed answers teach TTFT and TPOT: a non-streamed answer arrives whole, so its first
byte is its last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EWLine", "LatencyModel", "TransferEstimator"]


class EWLine:
    """y ~ intercept + slope * x, fitted by exponentially weighted least squares."""

    __slots__ = ("_decay", "intercept", "n", "s0", "slope", "sx", "sxx", "sxy", "sy")

    def __init__(self, half_life: float = 32.0) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be > 0")
        self._decay = 0.5 ** (1.0 / half_life)
        self.n = 0
        self.s0 = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.intercept = 0.0
        self.slope = 0.0

    def update(self, x: float, y: float) -> None:
        d = self._decay
        self.n += 1
        self.s0 = d * self.s0 + 1.0
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y
        s0, sx, sy = self.s0, self.sx, self.sy
        var = s0 * self.sxx - sx * sx
        # x nearly constant (var tiny relative to its scale): the intercept cannot be told apart
        # from the slope; attribute the time to the tokens (a line through the origin).
        if var > 1e-6 * s0 * self.sxx and var > 0:
            slope = (s0 * self.sxy - sx * sy) / var
            intercept = (sy - slope * sx) / s0
        elif sx > 0:
            slope, intercept = sy / sx, 0.0
        else:
            slope, intercept = 0.0, sy / s0
        if slope < 0:
            slope, intercept = 0.0, sy / s0
        elif intercept < 0:
            slope, intercept = (sy / sx if sx > 0 else 0.0), 0.0
        self.slope, self.intercept = slope, intercept

    def predict(self, x: float) -> float:
        return self.intercept + self.slope * x

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "intercept": self.intercept, "slope": self.slope}


class TransferEstimator:
    """KV transfer seconds per token into one decode endpoint, from its NIXL histogram's
    cumulative ``_sum`` / ``_count`` and the tokens of the requests disaggregated to it."""

    __slots__ = ("_alpha", "_last", "n", "seconds_per_transfer", "tokens_per_transfer")

    def __init__(self, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._last: tuple[float, float] | None = None
        self.n = 0
        self.seconds_per_transfer: float | None = None
        self.tokens_per_transfer: float | None = None

    def tokens(self, transferred: int) -> None:
        """A request disaggregated to this endpoint moved about ``transferred`` tokens."""
        t = self.tokens_per_transfer
        self.tokens_per_transfer = (
            float(transferred) if t is None else t + self._alpha * (transferred - t)
        )

    def counters(self, seconds_sum: float, count: float) -> None:
        """The histogram's cumulative sum and count as last scraped (a reset starts over)."""
        last, self._last = self._last, (seconds_sum, count)
        if last is None or count <= last[1]:
            return
        mean = max(0.0, seconds_sum - last[0]) / (count - last[1])
        s = self.seconds_per_transfer
        self.seconds_per_transfer = mean if s is None else s + self._alpha * (mean - s)
        self.n += 1

    @property
    def seconds_per_token(self) -> float | None:
        s, t = self.seconds_per_transfer, self.tokens_per_transfer
        if s is None or not t:
            return None
        return s / t


@dataclass
class _Endpoint:
    ttft: EWLine
    tpot: EWLine
    transfer: TransferEstimator = field(default_factory=TransferEstimator)


class LatencyModel:
    """The per-endpoint lines, keyed by endpoint address (see the module docstring)."""

    def __init__(
        self,
        *,
        min_samples: int = 8,
        half_life: float = 32.0,
        handover_s: float = 0.01,
        transfer_s_per_token: float | None = None,
    ) -> None:
        if min_samples < 1:
            raise ValueError("min_samples must be >= 1")
        self.min_samples = min_samples
        self.half_life = half_life
        self.handover_s = handover_s
        self.transfer_s_per_token = transfer_s_per_token
        self._endpoints: dict[str, _Endpoint] = {}

    def _get(self, address: str) -> _Endpoint:
        e = self._endpoints.get(address)
        if e is None:
            e = self._endpoints[address] = _Endpoint(EWLine(self.half_life), EWLine(self.half_life))
        return e

    def forget(self, address: str) -> None:
        self._endpoints.pop(address, None)

    # ---- learning ---------------------------------------------------------------------------

    def observe_ttft(self, address: str, work_tokens: float, seconds: float) -> None:
        """A direct request's TTFT at decode ``address`` (or a prefill endpoint's share of a
        disaggregated one, see :meth:`observe_pd_ttft`) with ``u + Q`` = ``work_tokens``."""
        self._get(address).ttft.update(work_tokens, seconds)

    def observe_pd_ttft(
        self,
        prefill: str,
        decode: str,
        work_tokens: float,
        transferred_tokens: int,
        seconds: float,
    ) -> None:
        """A disaggregated request's TTFT: the prefill endpoint's line learns what is left after
        the transfer estimate and the handover constant."""
        rest = seconds - self.transfer_s(decode, transferred_tokens) - self.handover_s
        self._get(prefill).ttft.update(work_tokens, max(0.0, rest))

    def observe_tpot(self, address: str, batch: int, seconds: float) -> None:
        self._get(address).tpot.update(batch, seconds)

    def observe_transfer(
        self, decode: str, transferred_tokens: int, seconds_sum: float | None, count: float | None
    ) -> None:
        """A request disaggregated to ``decode`` moved ``transferred_tokens``; the worker's NIXL
        histogram (cumulative, None when not scraped) is at ``seconds_sum`` / ``count``."""
        t = self._get(decode).transfer
        t.tokens(transferred_tokens)
        if seconds_sum is not None and count is not None:
            t.counters(seconds_sum, count)

    # ---- predicting -------------------------------------------------------------------------

    def warm(self, address: str) -> bool:
        """Enough TTFT samples at ``address`` to trust its prediction."""
        e = self._endpoints.get(address)
        return e is not None and e.ttft.n >= self.min_samples

    def warm_tpot(self, address: str) -> bool:
        e = self._endpoints.get(address)
        return e is not None and e.tpot.n >= self.min_samples

    def ttft(self, address: str, work_tokens: float) -> float:
        """Predicted TTFT (seconds) at ``address`` for ``u + Q`` = ``work_tokens`` (0 if unknown)."""
        e = self._endpoints.get(address)
        return e.ttft.predict(work_tokens) if e is not None else 0.0

    def ttft_bound(self, address: str, work_tokens: float, wait_s: float) -> float:
        """Predicted TTFT at ``address``, at least ``wait_s``: how long its oldest request still
        without a first token has waited (a new one queues behind it). A cold endpoint's
        prediction is that wait alone (0 when nothing waits there)."""
        if not self.warm(address):
            return wait_s
        return max(self.ttft(address, work_tokens), wait_s)

    def tpot(self, address: str, batch: int) -> float:
        e = self._endpoints.get(address)
        return e.tpot.predict(batch) if e is not None else 0.0

    def transfer_s(self, decode: str, tokens: int) -> float:
        """Predicted KV transfer seconds of ``tokens`` into ``decode``."""
        e = self._endpoints.get(decode)
        rate = e.transfer.seconds_per_token if e is not None else None
        if rate is None:
            rate = self.transfer_s_per_token or 0.0
        return rate * tokens

    def pd_ttft(
        self, prefill: str, decode: str, prefill_work_tokens: float, transferred_tokens: int
    ) -> float:
        """Predicted TTFT when ``prefill`` computes the prompt and ``decode`` pulls its KV."""
        return (
            self.ttft(prefill, prefill_work_tokens)
            + self.transfer_s(decode, transferred_tokens)
            + self.handover_s
        )

    def describe(self) -> dict[str, Any]:
        return {
            address: {
                "ttft": e.ttft.describe(),
                "tpot": e.tpot.describe(),
                "transfer_s_per_token": e.transfer.seconds_per_token,
            }
            for address, e in self._endpoints.items()
        }
