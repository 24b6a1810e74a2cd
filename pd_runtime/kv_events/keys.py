"""Our block keys: a chained 64-bit blake2b of token ids, independent of any engine's hash seed.

Engines hash blocks with a per-process seed (``PYTHONHASHSEED``/``NONE_HASH``), so the same prompt
gets different engine hashes on different workers, and the coordinator cannot compute them. We
re-key every block from what the event carries (its token ids and its parent) and key requests
the same way, so a request's keys can be looked up without knowing any engine's seed::

    tokens   t0 ........ t15 | t16 ....... t31 | t32 .. t40 (partial: not keyed)
    key      k0 = H(ROOT, b0)  k1 = H(k0, b1)
    H(parent, block) = blake2b(parent as 8 LE bytes + flag + [msgpack(extra)] + tokens as u32 LE,
                               digest_size=8) read as an unsigned little-endian int

* blake2b-8 (stdlib, C, deterministic across processes and machines; Python's ``hash`` is salted
  for str/bytes). 64 bits: a false hit needs a collision among ~1e6 live keys, p ~ 3e-8.
* ``extra`` (LoRA name, multimodal ids, cache salt: vLLM's per-block ``extra_keys``) is mixed in
  when present, so a LoRA or salted block never matches a plain-text request. The flag byte
  (0 = none, 1 = extra follows) and msgpack's self-delimiting encoding keep the input unambiguous.
* A key depends on the block size: the same prompt keyed at 16 and at 32 tokens gives unrelated
  keys, so requests must be keyed with the block size the engines publish.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, TypeAlias

import msgspec

__all__ = ["ROOT_KEY", "BlockKey", "chain_keys"]

BlockKey: TypeAlias = int
#: The parent key of a prompt's first block.
ROOT_KEY: BlockKey = 0

_encode = msgspec.msgpack.encode
_NO_EXTRA = b"\x00"
_SWAP = sys.byteorder != "little"


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as unsigned 32-bit little-endian; raises OverflowError outside [0, 2**32)."""
    arr = array("I", token_ids)
    if arr.itemsize != 4:  # pragma: no cover - no mainstream platform has a 2- or 8-byte C uint
        arr = array("L", token_ids)
    if _SWAP:  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def chain_keys(
    parent: BlockKey,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
) -> list[BlockKey]:
    """Keys of the full blocks of ``token_ids`` (a trailing partial block is ignored).

    ``parent`` is the key of the block before ``token_ids[0]`` (:data:`ROOT_KEY` at the start of
    a prompt); ``extra_keys``, when given, has one entry per block (None: no extra). Raises
    ValueError for ``block_size < 1`` and OverflowError for token ids outside ``[0, 2**32)``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(token_ids) // block_size
    data = _token_bytes(token_ids)
    width = 4 * block_size
    keys: list[BlockKey] = []
    append = keys.append
    from_bytes = int.from_bytes
    prev = parent.to_bytes(8, "little")
    for i in range(n):
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        flag = _NO_EXTRA if extra is None else b"\x01" + _encode(extra)
        prev = blake2b(prev + flag + data[i * width : (i + 1) * width], digest_size=8).digest()
        append(from_bytes(prev, "little"))
    return keys
