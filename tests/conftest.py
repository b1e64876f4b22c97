"""Shared fixtures: tiny synthetic site exports and cohort stores (16-32 voxels a side)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from datasets.convert import convert
from datasets.preprocess import PreprocessConfig
from datasets.synthetic import SyntheticConfig, build_store, generate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
TINY = PreprocessConfig(shape=(32, 32, 24), spacing=2.0)


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    """A 12-patient synthetic site export at 6 mm voxels."""
    out = tmp_path_factory.mktemp("export")
    generate(out, SyntheticConfig(n=12, voxel_size=6.0, seed=1))
    return out


@pytest.fixture(scope="session")
def small_store(small_export, tmp_path_factory) -> Path:
    """The small export converted to a 32x32x24 cohort store."""
    out = tmp_path_factory.mktemp("stores") / "small.zarr"
    convert(small_export / "images", small_export / "clinical.csv", out, TINY, progress=False)
    return out


@pytest.fixture
def export_copy(small_export, tmp_path) -> Path:
    """A private copy of the first 3 patients of the small export, free to damage."""
    out = tmp_path / "export"
    (out / "images").mkdir(parents=True)
    import pandas as pd

    table = pd.read_csv(small_export / "clinical.csv").head(3)
    for pid in table["patient_id"]:
        shutil.copytree(small_export / "images" / pid, out / "images" / pid)
    table.to_csv(out / "clinical.csv", index=False)
    return out


@pytest.fixture(scope="session")
def learnable_store(tmp_path_factory) -> Path:
    """150 synthetic patients (imaging effect 1) at 32x32x24: enough to learn the imaging signal."""
    return build_store(tmp_path_factory.mktemp("learnable"), SyntheticConfig(n=150, voxel_size=6.0, seed=0),
                       PreprocessConfig(shape=(32, 32, 24), spacing=4.0), name="learnable.zarr", workers=2)


@pytest.fixture
def server(tmp_path):
    """A real MLflow tracking server on loopback (`tests.services.TrackingServer`), stopped after."""
    from tests.services import TrackingServer

    server = TrackingServer(tmp_path)
    server.start()
    yield server
    server.kill()
