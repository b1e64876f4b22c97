"""The study's data: the development store (the demo cohort without --data), each task's cohort
and folds, the outer folds of nested CV, external stores, and the volumes read before training."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from datasets.clinical_features import IMAGE_CLINICAL, check_clinical_inputs
from datasets.cohort import Cohort, CohortSpec
from datasets.errors import StudyError
from datasets.remote import stage_store
from datasets.store import CohortStore, array_checksum
from search_spaces import TASKS
from study.config import StudyConfig

SHARE_FRACTION = 0.25  # share volumes through the object store when they fit in this much RAM

OUTER_SEED = 7919  # outer folds are drawn independently of the inner ones


def open_data(config: StudyConfig) -> tuple[StudyConfig, CohortStore]:
    """The development store (the demo cohort, built once, without --data), staged locally."""
    if config.data is None:
        from study.demo import DEMO_PATIENTS, cache_root, demo_store

        print(f"No --data: using the built-in demo cohort ({DEMO_PATIENTS} synthetic patients with a known hazard "
              f"model, 32 x 32 x 24 voxels), cached under {cache_root()}; budget {config.budget}.", flush=True)
        config = replace(config, data=demo_store(workers=min(2, os.cpu_count() or 1)))
    return config, CohortStore(stage_store(config.data))


def outer_assignment(store: CohortStore, k: int, seed: int) -> dict[str, int]:
    """Nested CV: each usable patient's outer fold (stratified by death and glioblastoma flag)."""
    cohort = Cohort(store, CohortSpec())
    return dict(zip(cohort.patient_ids, cohort.folds(k, seed + OUTER_SEED).tolist()))


def excluded_patients(config: StudyConfig, store: CohortStore) -> tuple[str, ...]:
    """The patients a study must not see: its outer test fold under nested CV, else none."""
    if config.outer_fold is None:
        return ()
    assignment = outer_assignment(store, config.outer_folds, config.seed)
    return tuple(sorted(p for p, fold in assignment.items() if fold == config.outer_fold))


def task_cohorts(config: StudyConfig, store: CohortStore) -> dict[str, tuple[Cohort, np.ndarray]]:
    """Each task's cohort and folds; raises before any training if one is unusable."""
    out, exclude = {}, excluded_patients(config, store)
    for task in config.tasks:
        spec = TASKS[task]
        cohort = Cohort(store, CohortSpec(spec.filter, spec.endpoint, exclude))
        if IMAGE_CLINICAL in config.inputs:
            check_clinical_inputs(cohort.clinical, config.clinical_inputs, f"cohort store {store.path}, task {task}")
        out[task] = (cohort, cohort.folds(config.protocol.folds, config.fold_seed))
    return out


def check_external(config: StudyConfig, store: CohortStore) -> None:
    """External cohorts must match the development store's sequences and shape (the models' input)."""
    from datasets.external import check_external as check_compatible

    for path in config.external:
        external = CohortStore(stage_store(path))
        check_compatible(external, store, "--external")
        if IMAGE_CLINICAL in config.inputs:  # applied unchanged, a fusion model needs their values too
            check_clinical_inputs(external.clinical().iloc[external.usable()], config.clinical_inputs,
                                  f"--external {path}")


def study_slots(cohorts) -> np.ndarray:
    """The store slots of every patient some task of the study trains on (sorted)."""
    return np.unique(np.concatenate([c.slots for c, _ in cohorts.values()]))


def volume_bytes(store: CohortStore, cohorts) -> int:
    """Bytes of the study's volumes in memory (float16): patients x sequences x voxels x 2. At the
    full shape (4 x 120 x 120 x 78) 1,000 patients take 9.0 GB (8.4 GiB)."""
    return len(study_slots(cohorts)) * len(store.sequences) * int(np.prod(store.shape)) * 2


def shares_volumes(share: bool, size: int) -> bool:
    """Whether the volumes go to Ray's object store: asked for, and within `SHARE_FRACTION` of RAM."""
    import psutil

    return share and size <= SHARE_FRACTION * psutil.virtual_memory().total


def read_volumes(store: CohortStore, cohorts, share: bool = True) -> tuple[np.ndarray | None, tuple[int, ...]]:
    """Read every volume the study will train on, before anything is written anywhere.

    A damaged chunk then stops the study at once, naming the patient, instead of failing trials
    hours later. Volumes that fit in `SHARE_FRACTION` of RAM are returned for Ray's object store
    (one copy per node); larger cohorts are only checked, and each trial reads the store itself.
    """
    slots = study_slots(cohorts)
    size = volume_bytes(store, cohorts)
    keep = shares_volumes(share, size)
    if share and not keep:
        print(f"  volumes ({size / 2**30:.1f} GiB) exceed {SHARE_FRACTION:.0%} of this machine's memory: "
              "each trial reads the store itself")
    out = np.empty((len(slots), len(store.sequences), *store.shape), dtype=np.float16) if keep else None
    records = store.manifest["patients"]
    for k, slot in enumerate(slots):
        pid = store.patient_ids[slot]
        try:
            image = store.image(int(slot))
            # A chunk deleted from the store reads back as zeros: only the checksum recorded at
            # conversion tells (image, mask and label together, as `datasets.store.write_patient`).
            intact = array_checksum(image, store.mask(int(slot)), store.label(int(slot))) == records[pid].get("checksum")
        except StudyError as exc:
            raise StudyError(f"patient {pid}: {exc} (python -m datasets.convert --verify lists "
                             "every damaged patient; rerun the conversion to repair them)") from exc
        if not intact:
            raise StudyError(f"cohort store {store.path}: patient {pid}: its voxels differ from the checksum recorded at "
                             "conversion (a chunk deleted or altered reads back as zeros or other values); python -m "
                             "datasets.convert --verify lists every damaged patient, and rerunning the conversion "
                             "repairs them")
        if out is not None:
            out[k] = image
    return out, tuple(int(s) for s in slots)

