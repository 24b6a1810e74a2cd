"""Our block keys: a chained 64-bit hash of token ids, independent of any engine's hash seed.

Engines hash blocks with a per-process seed (``PYTHONHASHSEED``/``NONE_HASH``), so the same prompt
gets different engine hashes on different workers, and the coordinator cannot compute them. We
re-key every block from what the event carries (its token ids and its parent) and key requests
the same way, so a request's keys can be looked up without knowing any engine's seed::

    tokens   t0 ........ t15 | t16 ....... t31 | t32 .. t40 (partial: not keyed)
    content  c0 = T(t0..t15)   c1 = T(t16..t31)
    key      k0 = T(ROOT, c0)  k1 = T(k0, c1)          with an extra:  T(k_prev, c, X(extra))

    T(...)   CPython's hash of a tuple of ints (xxHash-style lanes over the ints' numeric hashes)
    X(extra) blake2b-8 of msgpack(extra), read as an unsigned little-endian int

* Why the tuple hash: ingestion keys every stored block (the coordinator must keep up with
  >200k blocks/s) and the request path keys every prompt. ``map(hash, zip(*[iter(tokens)] *
  block_size))`` hashes all the blocks of an event in C; chaining is one 2-tuple hash per block.
  About 4x cheaper than the previous key, one hashlib blake2b call per block (~1.3 µs with its
  slicing and concatenation): see ``benchmarks/results/2026-11-24-scheduler``.
* Deterministic across processes and machines running the same CPython build: an int hashes to
  its value modulo 2**61 - 1 (documented numeric hashing, 64-bit builds), and tuples are hashed
  without the per-process salt that ``str``/``bytes`` get. It is *not* a portable wire format
  (a 32-bit build, PyPy or a future CPython may hash tuples differently): keys live in the process
  that computes both sides (the coordinator keys events and requests alike) and must not be
  persisted or compared with keys computed by another interpreter.
* 64 bits (signed, as ``hash`` returns; the chained value is reduced modulo 2**61 - 1 when hashed
  again, so ~62 effective bits): a false hit needs a collision among ~1e6 live keys, p ~ 1e-7.
  Not collision-resistant against a crafted prompt: a collision only misroutes (the engine's own
  hash decides what is really reused), never serves wrong KV.
* ``extra`` (LoRA name, multimodal ids, cache salt: vLLM's per-block ``extra_keys``) is mixed in
  when present, so a LoRA or salted block never matches a plain-text request. It goes through
  blake2b of its msgpack encoding because ``str`` hashes are salted per process; the tuple hash
  covers the tuple's length, so a block with an extra and one without hash apart.
* A key depends on the block size: the same prompt keyed at 16 and at 32 tokens gives unrelated
  keys, so requests must be keyed with the block size the engines publish.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, TypeAlias

import msgspec

from pd_runtime.kv_events.native import native

__all__ = ["ROOT_KEY", "BlockKey", "chain_keys", "chain_keys_py"]

BlockKey: TypeAlias = int
#: The parent key of a prompt's first block.
ROOT_KEY: BlockKey = 0

_encode = msgspec.msgpack.encode


def _extra_hash(extra: tuple[Any, ...]) -> int:
    """X(extra): deterministic across processes, unlike ``hash`` of a tuple holding a str."""
    return int.from_bytes(blake2b(_encode(extra), digest_size=8).digest(), "little")


def chain_keys(
    parent: BlockKey,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
) -> list[BlockKey]:
    """Keys of the full blocks of ``token_ids`` (a trailing partial block is ignored).

    ``parent`` is the key of the block before ``token_ids[0]`` (:data:`ROOT_KEY` at the start of
    a prompt); ``extra_keys``, when given, has one entry per block (None: no extra). Token ids are
    hashed as Python ints (vLLM's are in ``[0, vocab)``). Raises ValueError for
    ``block_size < 1``.
    """
    if native is not None and not extra_keys and block_size >= 1:
        keys = native.chain_keys_ints(parent, token_ids, block_size)
        if keys is not None:  # None: not a list or tuple of 64-bit ints
            return keys
    return chain_keys_py(parent, token_ids, block_size, extra_keys)


def chain_keys_py(
    parent: BlockKey,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
) -> list[BlockKey]:
    """:func:`chain_keys` in Python: the reference (and the fallback) of the compiled version
    (:mod:`.native`), which must give the same keys."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    keys: list[BlockKey] = []
    if len(token_ids) < block_size:
        return keys
    append = keys.append
    # zip over one iterator repeated block_size times yields the full blocks as tuples (in C);
    # strict=False: it stops before a trailing partial block.
    contents = map(hash, zip(*[iter(token_ids)] * block_size, strict=False))
    key = parent
    if not extra_keys:
        for content in contents:
            key = hash((key, content))
            append(key)
        return keys
    n_extra = len(extra_keys)
    for i, content in enumerate(contents):
        extra = extra_keys[i] if i < n_extra else None
        key = hash((key, content)) if extra is None else hash((key, content, _extra_hash(extra)))
        append(key)
    return keys
