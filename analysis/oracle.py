"""What there was to learn: on a store converted from a `datasets.synthetic` export, the C-index of
the cohort's true clinical, imaging and total linear predictors on the same patients and endpoint."""

from __future__ import annotations

from collections.abc import Mapping

from analysis.metrics import harrell_c


def oracle_cindices(store, cohorts: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """{task: {"clinical": C, "imaging": C, "total": C}} for each task's `datasets.Cohort`; {} for other stores."""
    from datasets.synthetic import find_truth

    truth = find_truth(store)
    if truth is None:
        return {}
    return {task: {"clinical": harrell_c(cohort.time, cohort.event, truth.loc[cohort.patient_ids, "lp_clinical"]),
                   "imaging": harrell_c(cohort.time, cohort.event, truth.loc[cohort.patient_ids, "lp_imaging"]),
                   "total": harrell_c(cohort.time, cohort.event, truth.loc[cohort.patient_ids, "lp"])}
            for task, cohort in cohorts.items()}
