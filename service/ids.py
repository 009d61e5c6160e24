"""Short, sortable, unguessable ids: ``job_01J8Z3...`` (a ULID behind a type prefix).

Why ULIDs: 48 bits of milliseconds then 80 random bits, in Crockford base32, sort by
creation time as plain strings — "newest first" and the list cursor need no extra column —
and the random part makes ids unguessable (another team's job is a 404, not an enumerable
sequence). The prefix tells a human what kind of id they are holding.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    return f"{prefix}_{ulid()}"
