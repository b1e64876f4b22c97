"""Input formats and layouts beyond the default: DICOM series folders, a second site with thick
LPS-ordered slices, the Ray backend, and the 192 x 256 x 256 target shape."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from datasets import CohortStore, verify_store
from datasets.convert import convert
from datasets.preprocess import PreprocessConfig
from datasets.synthetic import SyntheticConfig, generate
from tests.conftest import TINY


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder) -> None:
    """Write a RAS NIfTI-style volume as an axial DICOM series (LPS patient coordinates)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    spacing = np.abs(np.diag(affine)[:3])
    series, study = generate_uid(), generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0])
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, study
        ds.PatientID = "DICOM-1"
        corner_ras = affine[:3, :3] @ np.array([0, 0, k]) + affine[:3, 3]
        ds.ImagePositionPatient = [float(v) for v in lps @ corner_ras]
        # Rows run along RAS y (LPS -y), columns along RAS x (LPS -x).
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(str(folder / f"{k:03d}.dcm"), enforce_file_format=True)


def test_dicom_series_folder_converts_like_the_nifti(export_copy, tmp_path):
    reference = tmp_path / "nifti.zarr"
    convert(export_copy / "images", export_copy / "clinical.csv", reference, TINY, progress=False)
    nifti = export_copy / "images" / "SYN-0001" / "SYN-0001_t1ce.nii.gz"
    image = nib.load(nifti)
    write_dicom_series(np.asarray(image.dataobj), image.affine, export_copy / "images" / "SYN-0001" / "T1C")
    nifti.unlink()
    out = tmp_path / "dicom.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, progress=False)
    assert summary.excluded == {}
    a, b = CohortStore(reference), CohortStore(out)
    channel = a.sequences.index("t1c")
    x, y = a.image(0)[channel].astype(float), b.image(0)[channel].astype(float)
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.98
    assert b.manifest["patients"]["SYN-0001"]["sources"]["t1c"]["path"].endswith("T1C")


@pytest.mark.slow
def test_second_site_with_thick_lps_slices_aligns_its_sequences(tmp_path):
    generate(tmp_path / "ext", SyntheticConfig(n=2, voxel_size=3.0, site_shift=True, seed=4, prefix="EXT"))
    folder = tmp_path / "ext" / "images" / "EXT-0001"
    t1, flair = nib.load(folder / "EXT-0001_t1.nii.gz"), nib.load(folder / "EXT-0001_flair.nii.gz")
    assert t1.affine[0, 0] < 0 and flair.header.get_zooms()[2] == pytest.approx(5.0, abs=0.2)
    out = tmp_path / "ext.zarr"
    summary = convert(tmp_path / "ext" / "images", tmp_path / "ext" / "clinical.csv", out,
                      PreprocessConfig(shape=(48, 56, 48), spacing=3.0), progress=False)
    assert summary.excluded == {}
    store = CohortStore(out)
    mask = store.mask(0).astype(bool)
    image = store.image(0).astype(float)
    # Sequences resampled onto one grid by physical coordinates: their head masks coincide.
    for channel in range(4):
        inside = np.abs(image[channel]) > 0
        assert (inside & mask).sum() / mask.sum() > 0.9
    truth = pd.read_csv(tmp_path / "ext" / "truth.csv")
    assert {"lp", "lp_imaging"} <= set(truth.columns)


@pytest.mark.slow
def test_ray_backend(export_copy, tmp_path):
    import ray

    out = tmp_path / "ray.zarr"
    try:
        summary = convert(export_copy / "images", export_copy / "clinical.csv", out, TINY, workers=2,
                          backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert len(summary.converted) == 3 and verify_store(out) == []


@pytest.mark.slow
def test_large_target_shape(export_copy, tmp_path):
    shutil.rmtree(export_copy / "images" / "SYN-0002")
    shutil.rmtree(export_copy / "images" / "SYN-0003")
    out = tmp_path / "large.zarr"
    summary = convert(export_copy / "images", export_copy / "clinical.csv", out,
                      PreprocessConfig(shape=(192, 256, 256), spacing=1.0), progress=False)
    assert summary.converted == ["SYN-0001"]
    store = CohortStore(out)
    assert store.image(0).shape == (4, 192, 256, 256)
    spacing = np.diag(store.affine(0))[:3]
    assert np.allclose(spacing, 1.0), "a head fits 192 x 256 x 256 at 1 mm: no scaling"
