"""Cohort data: site export -> validated Zarr cohort store -> cohorts, folds and torch datasets.

The torch dataset and its augmentation live in `datasets.torch_data` and are not re-exported here:
command-line entry points (``--help``, usage errors) must not pay for torch and MONAI.
"""

from datasets.cohort import Cohort, CohortSpec, evaluate_filter, stratified_folds
from datasets.errors import ClinicalTableError, ImageError, InputError, StoreError, StudyError
from datasets.store import FORMAT_VERSION, CohortStore, verify_store

__all__ = [
    "FORMAT_VERSION", "ClinicalTableError", "Cohort", "CohortSpec", "CohortStore",
    "ImageError", "InputError", "StoreError", "StudyError", "evaluate_filter", "stratified_folds", "verify_store",
]
