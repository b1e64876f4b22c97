"""What there was to learn: on a store converted from a `datasets.synthetic` export, the C-index of
the cohort's true predictors on the same patients and endpoint (`KINDS`):

- ``clinical``: the clinical part of the true log hazard;
- ``image_content``: E[lp | image content, the task's cohort filter], everything the images can
  tell about the hazard within the task's patients, the grade they show included
  (`datasets.synthetic`): the ceiling of an image-only network. For the whole cohort it is the
  truth's ``lp_image_content``; for a filtered cohort (e.g. glioblastoma, whose grade is known)
  it is recomputed from the truth's tumour columns and generator settings;
- ``imaging_term``: the imaging effect term of the hazard only (formerly "the imaging oracle").
  Not a ceiling: the images also show the grade, so an image-only model can beat it, and with
  imaging effect 0 it is 0.5 while the images still predict;
- ``total``: the whole true log hazard, the ceiling of an image + clinical model.

A ``truth.csv`` written before the generator recorded ``lp_image_content`` has no image-content
oracle: its dict lacks ``image_content``, `FALLBACK_NOTE` is printed and `oracle_text` shows the
imaging effect term instead, saying so (regenerate the cohort to get it). So does a filter the
generator's distribution cannot evaluate (one on the outcome).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from datasets.clinical_features import IMAGE_CLINICAL
from evaluation.metrics import harrell_c

KINDS = {"clinical": "lp_clinical", "image_content": "lp_image_content", "imaging_term": "lp_imaging", "total": "lp"}
LABELS = {"clinical": "true clinical predictor", "image_content": "what the images can tell",
          "imaging_term": "imaging effect term only", "total": "true total predictor"}
ROW = "oracle C-index (true clinical / image content / total predictor)"
FALLBACK_NOTE = ("no oracle of what the images can tell for some task: this synthetic cohort's truth.csv predates "
                 "lp_image_content (regenerate the cohort), or the task's filter selects on the outcome; the "
                 "imaging effect term only is shown there")


_FILTERED = ("tumour_volume_ml", "necrosis_fraction", "enhancing", "imaging_effect", "site_shift")


def image_content(truth: pd.DataFrame, cohort) -> pd.Series | None:
    """E[lp | image content, the cohort's filter] for the cohort's patients, None if the truth
    cannot give it (an older truth.csv; a filter on the outcome)."""
    from datasets.errors import InputError
    from datasets.synthetic import image_content_predictor

    rows = truth.loc[list(cohort.patient_ids)]
    cohort_filter = str(getattr(getattr(cohort, "spec", None), "filter", "all")).strip()
    if cohort_filter in ("", "all"):
        return rows[KINDS["image_content"]] if KINDS["image_content"] in rows.columns else None
    if not set(_FILTERED) <= set(rows.columns) or rows["site_shift"].nunique() != 1:
        return None

    def flag(values: pd.Series) -> pd.Series:  # True/False as truth.csv writes them (or 1/0)
        return values.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))

    try:
        values = image_content_predictor(rows["tumour_volume_ml"], rows["necrosis_fraction"], flag(rows["enhancing"]),
                                         float(rows["imaging_effect"].iloc[0]), bool(flag(rows["site_shift"]).iloc[0]),
                                         cohort_filter)
    except InputError:
        return None
    return pd.Series(values, index=rows.index)


def oracle_from_truth(truth: pd.DataFrame, cohorts: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """{task: {kind: C}} for each task's cohort (``time``, ``event``, ``patient_ids``, optionally
    ``spec.filter``) from a truth table indexed by patient id; kinds it cannot give are left out."""
    out = {}
    for task, cohort in cohorts.items():
        ids = list(cohort.patient_ids)
        predictors = {kind: truth.loc[ids, column] for kind, column in KINDS.items()
                      if column in truth.columns and kind != "image_content"}
        content = image_content(truth, cohort)
        if content is not None:
            predictors["image_content"] = content
        out[task] = {kind: harrell_c(cohort.time, cohort.event, predictors[kind]) for kind in KINDS
                     if kind in predictors}
    return out


def oracle_cindices(store, cohorts: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """{task: {"clinical", "image_content", "imaging_term", "total": C}} for each task's
    `datasets.Cohort`; {} for other stores (no ``image_content`` for an older synthetic store)."""
    from datasets.synthetic import find_truth

    truth = find_truth(store)
    if truth is None:
        return {}
    oracles = oracle_from_truth(truth, cohorts)
    if any("image_content" not in oracle for oracle in oracles.values()):
        print(f"  (oracle: {FALLBACK_NOTE})", flush=True)
    return oracles


def oracle_text(oracle: Mapping[str, float]) -> str:
    """``clinical / image content / total`` as the results table and the report show it (`ROW`);
    for an older store the image-content place says that only the imaging effect term is known."""
    middle = (f"{oracle['image_content']:.3f}" if "image_content" in oracle else
              f"n/a (older truth.csv or outcome filter; imaging effect term only {oracle['imaging_term']:.3f})"
              if "imaging_term" in oracle else "n/a")
    return f"{oracle['clinical']:.3f} / {middle} / {oracle['total']:.3f}"


def ceiling(oracle: Mapping[str, float], inputs: str) -> float | None:
    """What a cell with these inputs could reach: the image-content oracle for an image-only cell,
    the total for image + clinical; None when unknown."""
    return oracle.get("total" if inputs == IMAGE_CLINICAL else "image_content")
