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
from dataclasses import dataclass
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

    def keyed(self, text: str) -> str:
        """A keyed hash of any text (a source path: it tells a moved or renamed source on resuming
        without revealing its name)."""
        return hmac.new(self._key, b"path:" + text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


WITHHELD = "[withheld]"


@dataclass(frozen=True)
class Redactor:
    """One patient's export names kept out of everything recorded under pseudonymisation.

    `literals` (source paths, file and folder names, longest first) are replaced by their labels
    (the pseudonym and the sequence: ``PSN-0123456789abcdef/t1c.nii.gz``), every spelling of the
    source id by the pseudonym, and any remaining `words` of the export's names (a patient's name
    and birth date as ``dcm2niix -f %n_%b_%t`` writes them, another patient's id in a misfiled
    name) by ``[withheld]``, wherever a reader's message quotes them.
    """

    source_id: str
    store_id: str
    literals: tuple[tuple[str, str], ...] = ()
    words: tuple[str, ...] = ()

    def __call__(self, text: str) -> str:
        labels: list[str] = []

        def hold(label: str) -> str:  # labels are put back last: no rule below rewrites them
            labels.append(label)
            return f"\x00{chr(0xE000 + len(labels) - 1)}\x00"  # private-use: no id or word matches it

        for literal, label in self.literals:
            if literal in text:
                text = text.replace(literal, hold(label))
        text = spellings(self.source_id).sub(lambda m: hold(self.store_id), text)
        if self.words:
            text = _words(self.words).sub(WITHHELD, text)
        return re.sub("\x00(.)\x00", lambda m: labels[ord(m.group(1)) - 0xE000], text)

    def record(self, value):
        """`value` (a manifest record: dicts, lists, strings) with every string redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.record(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.record(v) for v in value]
        return value


@functools.lru_cache(maxsize=256)
def _words(words: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(f"(?<![^\\W_])(?:{alternatives})(?![^\\W_])", re.IGNORECASE)


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
