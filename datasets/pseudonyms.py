"""Pseudonymised patient ids: a keyed hash (HMAC-SHA256), with the key kept outside the store.

The same key always maps an id to the same pseudonym, so a store can be resumed or extended and
results linked back to patients by whoever holds the key; without it, the pseudonyms reveal
nothing about the ids (unlike a plain hash, which anyone can recompute from a list of ids).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from pathlib import Path

from datasets.errors import InputError

PREFIX = "PSN-"
KEY_BYTES = 32


class Pseudonymiser:
    """Maps source patient ids to pseudonyms and scrubs them out of recorded text."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise InputError(f"pseudonymisation key is {len(key)} bytes; at least 16 are needed")
        self._key = key

    @property
    def fingerprint(self) -> str:
        """Identifies the key (stored, so a resume with another key is refused) without revealing it."""
        return hashlib.sha256(b"fingerprint:" + self._key).hexdigest()[:16]

    def __call__(self, patient_id: str) -> str:
        return PREFIX + hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]

    def scrub(self, text: str, patient_id: str) -> str:
        """`text` with every spelling of `patient_id` (`spellings`) replaced by its pseudonym."""
        return spellings(patient_id).sub(self(patient_id), text)


@functools.lru_cache(maxsize=4096)
def spellings(patient_id: str) -> re.Pattern:
    """Every spelling of an id that a site's files use: any case, and any one separator (``-``,
    ``_``, ``.``, a space) or none between its letter and digit runs, so that ``SYN-0001`` also
    matches ``syn_0001``, ``Syn.0001`` and ``SYN0001``. An occurrence must not continue a run of
    the same kind (``SYN-00012`` is another id, its ``SYN-0001`` untouched)."""
    runs = re.findall(r"[A-Za-z]+|[0-9]+", patient_id)
    if not runs:
        return re.compile(re.escape(patient_id))
    body = r"[-_.\s]?".join(re.escape(run) for run in runs)

    def edge(char: str) -> str:
        return "A-Za-z" if char.isalpha() else "0-9"

    spelled = f"(?<![{edge(runs[0][0])}]){body}(?![{edge(runs[-1][-1])}])"
    # The exact id as well: one with other characters (Müller01, Pat#001) has no spelling above.
    return re.compile(f"{re.escape(patient_id)}|{spelled}", re.IGNORECASE)


def load_or_create_key(path: Path, out: Path) -> tuple[bytes, bool]:
    """Read the key file (hex), or create one readable by its owner only; returns (key, created).

    Refuses a key inside the store: whoever gets the store must not get the key with it.
    """
    path, out = Path(path).expanduser().absolute(), Path(out).expanduser().absolute()
    if path == out or out in path.parents:
        raise InputError(f"--pseudonymise-key {path} is inside the store {out}; keep the key outside it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(os.urandom(KEY_BYTES).hex() + "\n")
        return bytes.fromhex(path.read_text().strip()), True
    try:
        return bytes.fromhex(path.read_text().strip()), False
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"--pseudonymise-key {path} is not a key file (one line of hex digits, as this tool "
                         f"creates when the file does not exist): {exc}") from exc
