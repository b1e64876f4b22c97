"""Synthetic patients written as a PACS would export them: DICOM series whose file and folder
names say nothing, told apart only by their tags (`datasets.dicom`).

``python -m datasets.synthetic_dicom EXPORT OUT`` rewrites a synthetic NIfTI export
(`datasets.synthetic`) as DICOM: each patient's four sequences become four MR series of one study,
with the descriptions and timing a Siemens 3 T scanner writes (`SEQUENCES`), either all files side
by side in ``OUT/images/<patient>/DICOM/IM00001`` (``--layout flat``, as viewers export a study) or
one numbered folder per series, ``S0001/I0001`` (``--layout folders``). The clinical table is
copied; the tumour label is not (a site's PACS has none). The synthetic volumes are integers, so
the DICOM copy is lossless: converting it gives the same store as converting the NIfTI files.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from datasets.errors import InputError

# sequence key -> (SeriesDescription, TR, TE, TI or None, ScanningSequence, ContrastBolusAgent)
SEQUENCES: dict[str, tuple[str, float, float, float | None, str, str]] = {
    "t1": ("t1_mprage_sag_p2_iso", 2300.0, 2.32, 900.0, "GR\\IR", ""),
    "t1c": ("t1_mprage_sag_p2_iso_KM", 2300.0, 2.32, 900.0, "GR\\IR", "Gadovist"),
    "t2": ("t2_tse_tra_p2", 5000.0, 98.0, None, "SE", ""),
    "flair": ("t2_tirm_tra_dark-fluid", 9000.0, 81.0, 2500.0, "SE\\IR", ""),
}
_FILE_KEYS = {"t1": "t1", "t1ce": "t1c", "t1c": "t1c", "t2": "t2", "flair": "flair"}


def write_series(volume: np.ndarray, affine: np.ndarray, files: list[Path], *, description: str = "",
                 tr: float | None = None, te: float | None = None, ti: float | None = None,
                 scanning: str = "", contrast_agent: str = "", patient_id: str = "ANON", series_number: int = 1,
                 study_uid: str | None = None, image_type: str = "ORIGINAL\\PRIMARY\\M\\ND") -> str:
    """Write a RAS volume [X, Y, Z] (integer values) as an axial MR series, one file per slice at
    `files` (LPS patient coordinates, rows along RAS y, columns along RAS x); returns its UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if len(files) != volume.shape[2]:
        raise ValueError(f"{len(files)} file names for {volume.shape[2]} slices")
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    series, study = generate_uid(), study_uid or generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0])
    row = lps @ (affine[:3, 0] / spacing[0])  # along a row: the volume's first axis
    col = lps @ (affine[:3, 1] / spacing[1])
    for k, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, study
        ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = patient_id, series_number, k + 1
        ds.ImageType = image_type.split("\\")
        if description:
            ds.SeriesDescription = ds.ProtocolName = description
        for tag, value in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti)):
            if value is not None:
                setattr(ds, tag, value)
        if scanning:
            ds.ScanningSequence = scanning.split("\\")
        if contrast_agent:
            ds.ContrastBolusAgent = contrast_agent
        corner = affine[:3, :3] @ np.array([0, 0, k]) + affine[:3, 3]
        ds.ImagePositionPatient = [float(v) for v in lps @ corner]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(np.asarray(volume)[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return series


def write_patient(nifti_folder: Path, out: Path, layout: str = "flat", patient_id: str = "ANON") -> dict[str, str]:
    """One synthetic NIfTI patient folder as a DICOM study under `out` (`layout` flat or folders);
    returns sequence key -> SeriesInstanceUID."""
    import nibabel as nib
    from pydicom.uid import generate_uid

    study = generate_uid()
    uids, first = {}, 1
    for number, path in enumerate(sorted(nifti_folder.glob("*.nii.gz")), start=1):
        suffix = path.name[: -len(".nii.gz")].rsplit("_", 1)[-1].lower()
        key = _FILE_KEYS.get(suffix)
        if key is None:  # the tumour label: no PACS holds one
            continue
        image = nib.load(path)
        volume = np.asarray(image.dataobj)
        if not np.issubdtype(volume.dtype, np.integer):
            raise InputError(f"{path}: integer voxels are needed for a lossless DICOM copy")
        description, tr, te, ti, scanning, agent = SEQUENCES[key]
        n = volume.shape[2]
        if layout == "flat":
            files = [out / "DICOM" / f"IM{first + k:05d}" for k in range(n)]
        else:
            files = [out / f"S{number:04d}" / f"I{k + 1:04d}" for k in range(n)]
        first += n
        uids[key] = write_series(volume, image.affine, files, description=description, tr=tr, te=te, ti=ti,
                                 scanning=scanning, contrast_agent=agent, patient_id=patient_id,
                                 series_number=number, study_uid=study)
    return uids


def main(argv: list[str] | None = None) -> int:
    from datasets.cli import new_parser

    parser = new_parser("datasets.synthetic_dicom", __doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a synthetic NIfTI export (images/<patient>/, clinical.csv)")
    parser.add_argument("out", type=Path, help="the DICOM export to write (must not exist)")
    parser.add_argument("--layout", choices=("flat", "folders"), default="flat",
                        help="all files of a study in one folder (flat), or a folder per series (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.export / "images").is_dir():
        print(f"error: {args.export}/images is not a folder", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"error: {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    for folder in sorted(p for p in (args.export / "images").iterdir() if p.is_dir()):
        write_patient(folder, args.out / "images" / folder.name, args.layout, patient_id=folder.name)
    for table in ("clinical.csv", "truth.csv"):
        if (args.export / table).exists():
            shutil.copy(args.export / table, args.out / table)
    print(f"wrote {args.out}/images as DICOM ({args.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
