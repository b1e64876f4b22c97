"""The built-in demo cohort: a synthetic cohort built once through the real converter and cached.

Cached under ``$GLIOMA_STUDY_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/glioma-survival-study``
as ``demo-v2/cohort.zarr`` (150 patients, 32 x 32 x 24 voxels of ~5 mm), with the site export
and ``truth.csv`` beside it. A half-built cache (interrupted) is resumed by the converter.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets.convert import convert
from datasets.preprocess import PreprocessConfig
from datasets.store import CohortStore
from datasets.synthetic import SyntheticConfig, generate

DEMO_VERSION = "demo-v2"  # v2: truth.csv records lp_image_content (analysis.oracle)
DEMO_PATIENTS = 150
DEMO_VOXEL_SIZE = 6.0  # mm, of the synthetic export
DEMO_PREPROCESSING = PreprocessConfig(shape=(32, 32, 24), spacing=4.0)


def cache_root() -> Path:
    if os.environ.get("GLIOMA_STUDY_CACHE"):
        return Path(os.environ["GLIOMA_STUDY_CACHE"]).expanduser().absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base / "glioma-survival-study").absolute()


def demo_store(workers: int = 2, progress: bool = True) -> Path:
    """Path of the demo cohort store, building it on first use."""
    root = cache_root() / DEMO_VERSION
    store = root / "cohort.zarr"
    export = root / "export"
    if store.exists():
        try:
            if len(CohortStore(store).usable()) == DEMO_PATIENTS:
                return store
        except Exception:  # an interrupted build: the converter resumes it below
            pass
    if not (export / "clinical.csv").exists():
        generate(export, SyntheticConfig(n=DEMO_PATIENTS, voxel_size=DEMO_VOXEL_SIZE, seed=0), workers=workers,
                 progress=progress)
    convert(export / "images", export / "clinical.csv", store, DEMO_PREPROCESSING, workers=workers, progress=progress)
    return store
