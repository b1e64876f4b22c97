"""Cohort data: site export -> validated Zarr cohort store -> cohorts, folds and torch datasets."""

from datasets.cohort import Cohort, CohortSpec, evaluate_filter, stratified_folds
from datasets.errors import ClinicalTableError, ImageError, InputError, StoreError, StudyError
from datasets.store import FORMAT_VERSION, CohortStore, verify_store
from datasets.torch_data import CohortDataset, training_augmentation

__all__ = [
    "FORMAT_VERSION", "ClinicalTableError", "Cohort", "CohortDataset", "CohortSpec", "CohortStore",
    "ImageError", "InputError", "StoreError", "StudyError", "evaluate_filter", "stratified_folds",
    "training_augmentation", "verify_store",
]
