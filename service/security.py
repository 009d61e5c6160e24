"""API key hashing, kept free of web imports so the admin CLI starts fast."""

from __future__ import annotations

import hashlib


def hash_key(key: str) -> str:
    """API keys are 32 random bytes, so a plain sha256 is enough (no password hashing needed)."""
    return hashlib.sha256(key.encode()).hexdigest()
