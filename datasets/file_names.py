"""File names made from text an export controls (patient ids, store names): outputs name files after
patients, and an id is not a file name (``../x``, ``x' onerror='alert(1)``, ``a/b``, 300 characters)."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 80) -> str:
    """`text` as a file-name part: letters, digits, ``.``, ``_`` and ``-`` only, at most `limit`
    characters, never starting with a dot; when anything had to change, a short hash of the original
    is appended, so two ids never share a file."""
    text = str(text)
    cleaned = _UNSAFE.sub("_", text).lstrip(".")[:limit] or "_"
    if cleaned == text:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
