"""The tracking journal: records on their way to MLflow, kept where a tracking outage cannot lose
them and where an untrusted storage path cannot forge them.

The journal is a JSON-lines file beside the study's other records (``STORAGE/NAME/
tracking_journal.jsonl``; with object storage a driver-local copy that is uploaded there).
Every record is appended and flushed to disk (``fsync``) before it is sent, and removed only
after MLflow took it, so a record is in MLflow, in the journal, or in both, never in neither;
delivery is therefore at least once and every record is made idempotent by the tracker.

The storage path is a trust boundary (README, "The storage path is a trust boundary"): whoever can
write it could append records that upload any file the driver can read, forge a study's
headline, or name a folder for the clean-up to delete. So:

- every record carries an HMAC-SHA256 under the study's journal key, a random key created with
  the study run and kept only in MLflow (tag `KEY_TAG`, a separate trust domain) and in the
  driver's memory; a record whose MAC does not verify is never delivered unless the user says
  the storage is theirs alone (``--trust-storage``);
- an artifact is copied into the journal's own folder (``tracking_journal.jsonl.files/<32 hex>/``)
  when it is recorded, and its record names it relative to that folder with its SHA-256: a record
  can only ever upload a file of that folder whose content is the one recorded, and the clean-up
  after delivery deletes only such ``<32 hex>`` folders, which the journal itself created.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import StudyError

# The study run's tag holding the journal key (hex). Never set from a journal record.
KEY_TAG = "tracking_journal_key"
_FOLDER = re.compile(r"[0-9a-f]{32}")


class UntrustedJournal(StudyError):
    """The journal holds records that the study's driver did not write (exit 2)."""


@dataclass(frozen=True)
class Line:
    """One journal line: the record (None if it is not a JSON object) and whether its MAC verified."""

    number: int
    record: dict | None
    trusted: bool


def _canonical(record: dict) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TrackingJournal:
    """Append, sign, verify and rewrite the journal file; keep and find its artifact copies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = self.path.parent / f"{self.path.name}.files"
        self._key: bytes | None = None

    def set_key(self, key_hex: str) -> None:
        self._key = bytes.fromhex(key_hex)

    def mac(self, record: dict) -> str:
        if self._key is None:
            raise StudyError("the tracking journal has no key yet: start the study run first")
        return hmac.new(self._key, _canonical(record), hashlib.sha256).hexdigest()

    def sign(self, record: dict) -> dict:
        return {**record, "mac": self.mac(record)}

    def read(self) -> list[Line]:
        """Every non-empty line, verified against the key (unverified if the key is not known yet)."""
        if not self.path.exists():
            return []
        lines = []
        for number, text in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("op"), str):
                lines.append(Line(number, None, False))
                continue
            trusted = (self._key is not None and isinstance(record.get("mac"), str)
                       and hmac.compare_digest(record["mac"], self.mac(record)))
            lines.append(Line(number, record, trusted))
        return lines

    def append(self, record: dict) -> None:
        """Write one signed record and flush it to disk before it is sent anywhere."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def rewrite(self, records: list[dict]) -> None:
        """Replace the journal by `records` (those not yet delivered), atomically."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as out:
            out.write("".join(json.dumps(r) + "\n" for r in records))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    # -- artifacts ---------------------------------------------------------------------------

    def keep(self, path: Path) -> dict:
        """Copy an artifact into the journal's folder (Tune may delete its checkpoint before the
        record is delivered); the fields of its record."""
        folder = uuid.uuid4().hex
        (self.files / folder).mkdir(parents=True)
        shutil.copy2(path, self.files / folder / path.name)
        return {"file": f"{folder}/{path.name}", "sha256": sha256_file(self.files / folder / path.name)}

    def artifact(self, record: dict) -> Path | None:
        """The kept file an artifact record names, or None when it is not one of the journal's own
        copies with the recorded content (a record never reaches outside the journal's folder)."""
        name = record.get("file")
        if not isinstance(name, str) or name.count("/") != 1:
            return None
        folder, base = name.split("/")
        if not _FOLDER.fullmatch(folder) or base in ("", ".", "..") or "\\" in base:
            return None
        path = self.files / folder / base
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != (self.files / folder).resolve():
                return None
            if path.resolve().parent.parent != self.files.resolve():
                return None
            if not hmac.compare_digest(sha256_file(path), str(record.get("sha256", ""))):
                return None
        except OSError:
            return None
        return path

    def discard(self, record: dict) -> None:
        """Delete the journal's copy of a delivered artifact: only a ``<32 hex>`` folder of its own."""
        name = record.get("file")
        if not isinstance(name, str) or name.count("/") != 1:
            return
        folder = name.split("/")[0]
        target = self.files / folder
        if _FOLDER.fullmatch(folder) and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
