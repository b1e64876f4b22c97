"""The real TCGA scan (single T1c, 6.5 mm LPS NRRD) converts and lands in RAS at the right place."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest

from datasets import CohortStore
from datasets.convert import convert
from datasets.preprocess import PreprocessConfig
from tests.conftest import SHARED_DATA

TCGA = SHARED_DATA / "tcga-02-0003"
pytestmark = pytest.mark.skipif(not TCGA.is_dir(), reason="shared/data/tcga-02-0003 is not beside the project")


@pytest.fixture(scope="module")
def tcga_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcga")
    folder = root / "images" / "TCGA-02-0003"
    folder.mkdir(parents=True)
    (folder / "t1c.nrrd").symlink_to(TCGA / "t1c.nrrd")
    (folder / "tumor_label.nrrd").symlink_to(TCGA / "tumor_label.nrrd")
    (root / "clinical.csv").write_text("patient_id,time,event,pathology\nTCGA-02-0003,630,1,glioblastoma\n")
    out = root / "tcga.zarr"
    summary = convert(root / "images", root / "clinical.csv", out, PreprocessConfig(), progress=False)
    assert summary.converted == ["TCGA-02-0003"]
    return CohortStore(out)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    voxels = np.argwhere(mask > 0).mean(axis=0)
    return affine[:3, :3] @ voxels + affine[:3, 3]


def test_single_sequence_converts_with_the_missing_policy(tcga_store):
    assert tcga_store.missing(0).tolist() == [True, False, True, True]
    image = tcga_store.image(0)
    assert image[1].any() and not image[0].any()


def test_output_is_ras_isotropic_and_covers_the_head(tcga_store):
    affine = tcga_store.affine(0)
    spacing = np.diag(affine)[:3]
    assert np.allclose(affine[:3, :3], np.diag(spacing)), "axes aligned with RAS, no flips"
    assert (spacing > 0).all() and np.allclose(spacing, spacing[0])
    # 25 slices of 6.5 mm = 162.5 mm superior-inferior must fit in the 78 output slices.
    extent = spacing * np.array(tcga_store.shape)
    assert extent[2] >= 162.0
    assert extent[0] >= 195.0 and extent[1] >= 195.0  # 256 x 0.78 mm = 200 mm field of view


def test_tumour_lands_at_the_same_physical_place(tcga_store):
    data, header = nrrd.read(str(TCGA / "tumor_label.nrrd"))
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = header["space directions"].T
    lps_affine[:3, 3] = header["space origin"]
    centre_lps = _world_centroid(data, lps_affine)
    centre_ras = centre_lps * np.array([-1, -1, 1])
    converted = _world_centroid(tcga_store.label(0), tcga_store.affine(0))
    assert np.linalg.norm(converted - centre_ras) < 3.0  # mm, within about one output voxel


def test_qc_montage_written(tcga_store):
    import re

    record = tcga_store.manifest["patients"]["TCGA-02-0003"]
    assert (tcga_store.path / record["montage"]).stat().st_size > 10_000
    page = tcga_store.path / "qc" / "index.html"
    sources = re.findall(r"<img [^>]*src='([^']+)'", page.read_text())
    assert sources and all((page.parent / s).is_file() for s in sources), "the report's images resolve"
    assert record["info"]["before"]["t1c"]["spacing"] == pytest.approx([0.78125, 0.78125, 6.5])
