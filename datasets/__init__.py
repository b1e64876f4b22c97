"""Cohort data: site export -> validated Zarr cohort store -> cohorts, folds and torch datasets.

The torch dataset and its augmentation are imported on first use: command-line entry points
(``--help``, usage errors) must not pay for torch and MONAI.
"""

from datasets.cohort import Cohort, CohortSpec, evaluate_filter, stratified_folds
from datasets.errors import ClinicalTableError, ImageError, InputError, StoreError, StudyError
from datasets.store import FORMAT_VERSION, CohortStore, verify_store

_LAZY = {"CohortDataset": "datasets.torch_data", "training_augmentation": "datasets.torch_data"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION", "ClinicalTableError", "Cohort", "CohortDataset", "CohortSpec", "CohortStore",
    "ImageError", "InputError", "StoreError", "StudyError", "evaluate_filter", "stratified_folds",
    "training_augmentation", "verify_store",
]
