"""The one content hash behind every fingerprint, directory name and cache key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_hash(*parts: Any, length: int = 16) -> str:
    """Stable hash of JSON-serialisable parts (sorted keys); used for fingerprints and cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
