"""How a row says what made it: every row carries the hash of the settings that shaped it."""

from __future__ import annotations

import hashlib
import json


def settings_hash(settings: dict) -> str:
    """A short content hash of `settings` (JSON-able; anything else hashed by its str)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
