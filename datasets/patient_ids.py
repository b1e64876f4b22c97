"""Patient ids as the converter accepts them: one spelling per patient, never a spreadsheet formula.

- **Spelling.** An id is matched after Unicode NFC normalisation (``Müller`` typed as one
  character ``ü`` or as ``u`` and a combining diaeresis is one id) and surrounding spaces removed.
  Ids that are equal after NFC and case folding (``SYN-0001``, ``syn-0001``) are one patient
  spelled two ways: never two patients (`identity`).
- **Formulas (CWE-1236).** The patient id is the first cell of every CSV file a study writes
  (out-of-fold predictions, external validation, Kaplan-Meier and Grad-CAM tables). A spreadsheet
  runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage return before
  one) as a formula: ``=HYPERLINK("http://x","y")`` opens a link, ``-2+3`` computes. Such ids, and
  ids holding a control character (a line break splits a row in naive CSV readers, so what follows
  starts a cell), are refused (`formula_problem`): the converter excludes the patient, a store
  holding one is refused on opening. The full-width forms (``＝＋－＠``) are refused too, as some
  spreadsheet locales read them as the ASCII ones.
- **Names in file names** (`name_key`): how an id is looked for in a file name, ignoring case
  and separators (``SYN-0002`` in ``syn_0002_t1c.nii.gz``).
"""

from __future__ import annotations

import re
import unicodedata

FORMULA_STARTS = "=+-@\t\r\n\uff1d\uff0b\uff0d\uff20"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ALNUM_RUNS = re.compile(r"[^\W_]+")


def normalise(patient_id: str) -> str:
    """The id as matched and stored: surrounding spaces removed, Unicode NFC."""
    text = patient_id.strip()
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def identity(patient_id: str) -> str:
    """Ids with the same identity are one patient: NFC, then case folded (``ß`` = ``ss``)."""
    text = normalise(patient_id)
    return text.lower() if text.isascii() else unicodedata.normalize("NFC", text.casefold())


def formula_problem(patient_id: str) -> str | None:
    """Why a spreadsheet would run this id as a formula (or split its row), or None."""
    if patient_id and patient_id[0] in FORMULA_STARTS:
        return f"starts with {patient_id[0]!r}"
    control = _CONTROL.search(patient_id)
    if control:
        return f"holds the control character {control.group()!r}"
    return None


def formula_reason(patient_id: str, withheld: bool = False) -> str:
    """The exclusion reason for an id that `formula_problem` refuses (the id itself left out
    where it is `withheld`, under pseudonymisation)."""
    who = "the patient's source id (withheld under --pseudonymise-key)" if withheld else f"patient id {patient_id!r}"
    return (f"{who} {formula_problem(patient_id)}: a spreadsheet would run it as a formula (CWE-1236) in the first "
            "column of the CSV files the study writes; rename the patient in the clinical table and its image "
            "folder (an id must not start with = + - @, a tab or a carriage return, nor hold control characters)")


def name_key(text: str) -> str:
    """`text` as looked for in file names: case folded, letters and digits only (``SYN-0002``,
    ``syn_0002`` and ``SYN0002`` are all ``syn0002``)."""
    return "".join(_ALNUM_RUNS.findall(identity(text)))


def name_parts(text: str) -> list[str]:
    """The letter-and-digit runs of a file name, case folded (separators dropped)."""
    return _ALNUM_RUNS.findall(identity(text))
