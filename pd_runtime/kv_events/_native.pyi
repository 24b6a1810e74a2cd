# The compiled module of _native.c; see native.py.
from collections.abc import Mapping, Sequence
from types import NotImplementedType
from typing import Any

INTERFACE_VERSION: int

def leading_blocks(
    keys: list[int] | tuple[int, ...],
    masks: Mapping[int, int],
    endpoint_of_bit: Mapping[int, str],
    spans: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...] | None,
    claims: Mapping[int, Sequence[Any]] | None,
    /,
) -> dict[str, int] | NotImplementedType: ...
def chain_keys_msgpack(
    parent: int, raw: bytes | memoryview, block_size: int, n_blocks: int, /
) -> list[int] | None: ...
def chain_keys_ints(
    parent: int, token_ids: list[int] | tuple[int, ...], block_size: int, /
) -> list[int] | None: ...
def insert_new(
    tier: dict[bytes | int, int],
    held: dict[int, int],
    hashes: list[bytes | int] | list[bytes] | list[int],
    keys: list[int],
    ep_bit: int,
    start: int,
    /,
) -> int: ...
