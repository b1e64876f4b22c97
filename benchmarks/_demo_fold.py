"""Fold 0 of 5 of the built-in demo cohort, volumes in memory: the unit of the training probes."""

from __future__ import annotations

from datasets import Cohort, CohortSpec
from study.demo import demo_store
from trainables.fold import FoldData


def demo_fold(k: int = 5, fold: int = 0) -> FoldData:
    cohort = Cohort(demo_store(progress=False), CohortSpec())
    folds = cohort.folds(k, seed=0)
    return FoldData.from_cohort(cohort, folds, fold, cohort.store.images(cohort.slots))
