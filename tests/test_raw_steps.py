"""Known answers of the raw-export steps (`datasets.raw_steps`): registration undoes a known rigid
motion, N4 removes a known bias field, and ``--preset raw`` converts a misaligned synthetic export
and the real TCGA scan."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from datasets.raw_steps import known_motion, mean_displacement
from tests.conftest import PROJECT_ROOT

sitk = pytest.importorskip("SimpleITK")
pytestmark = pytest.mark.slow

TCGA = PROJECT_ROOT.parent / "shared" / "data" / "tcga-02-0003"


def _synthetic_head(voxel: float = 2.0):
    """A synthetic brain (MNI152 tissue maps: CSF, GM, WM intensities) as a SimpleITK image, with
    its brain and white-matter masks as arrays (x, y, z)."""
    from datasets.synthetic import _template

    maps = _template(voxel)
    head = 300 * maps["csf"] + 600 * maps["gm"] + 900 * maps["wm"]
    image = sitk.GetImageFromArray(np.transpose(head, (2, 1, 0)).astype(np.float32))
    image.SetSpacing((voxel,) * 3)
    return image, maps["brain"] > 0.5, maps["wm"] > 0.9


@pytest.mark.parametrize("rotation, shift, spacing", [
    ((8.0, -5.0, 6.0), (7.0, -6.0, 5.0), (1.5, 1.5, 4.0)),
    ((0.0, 0.0, 10.0), (10.0, 0.0, 0.0), (1.0, 1.0, 5.0)),
    ((-6.0, 7.0, 0.0), (0.0, -8.0, 6.0), (2.5, 2.5, 2.5)),
])
def test_registration_undoes_a_known_rigid_motion_of_a_synthetic_head(rotation, shift, spacing):
    from datasets.raw_steps import register

    fixed, brain, _ = _synthetic_head()
    moving, truth = known_motion(fixed, rotation, shift, spacing)
    _, found, result = register(fixed, moving, "rigid")
    assert mean_displacement(fixed, brain, found, truth) < 1.0
    assert result.flag is None and result.metric < -0.3


@pytest.mark.skipif(not TCGA.is_dir(), reason="../shared/data is not beside the project")
def test_registration_undoes_a_known_motion_of_the_real_tcga_scan():
    from datasets.raw_steps import head_mask, read_image, register

    fixed = read_image(TCGA / "t1c.nrrd")
    moving, truth = known_motion(fixed, (0.0, 0.0, 8.0), (6.0, -5.0, 0.0), (1.0, 1.0, 6.5))
    _, found, result = register(fixed, moving, "rigid")
    mask = np.transpose(sitk.GetArrayFromImage(head_mask(fixed)), (2, 1, 0)) > 0
    assert mean_displacement(fixed, mask, found, truth) < 1.0, result.info()


def test_n4_halves_the_white_matter_variation_under_a_known_field():
    from datasets.raw_steps import bias_correct

    image, brain, wm = _synthetic_head()
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in array.shape], indexing="ij")
    field = np.exp(0.35 * grids[0] - 0.25 * grids[1] + 0.3 * grids[2] ** 2)
    biased = sitk.GetImageFromArray(np.transpose(array * field * rng.normal(1, 0.02, array.shape), (2, 1, 0))
                                    .astype(np.float32))
    biased.CopyInformation(image)
    mask = sitk.GetImageFromArray(np.transpose(brain.astype(np.uint8), (2, 1, 0)))
    mask.CopyInformation(image)
    corrected = np.transpose(sitk.GetArrayFromImage(bias_correct(biased, mask)), (2, 1, 0))
    before = np.transpose(sitk.GetArrayFromImage(biased), (2, 1, 0))

    def cv(values):
        return values[wm].std() / values[wm].mean()

    assert cv(corrected) <= cv(before) / 2, (cv(before), cv(corrected))


def test_preset_raw_converts_a_misaligned_export_and_shows_each_step(tmp_path, capsys):
    pytest.importorskip("deepbet")
    from datasets import CohortStore, verify_store
    from datasets.convert import main
    from datasets.synthetic import SyntheticConfig, generate

    export = tmp_path / "export"
    generate(export, SyntheticConfig(n=2, voxel_size=3.0, seed=4, misaligned=True))
    out = tmp_path / "raw.zarr"
    assert main(["--images", str(export / "images"), "--clinical", str(export / "clinical.csv"), "--out", str(out),
                 "--preset", "raw", "--shape", "48x48x40", "--spacing", "3", "--workers", "1", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "per patient" in summary and "register" in summary and "bias_correct" in summary
    assert verify_store(out) == [] and len(CohortStore(out).usable()) == 2
    store = CohortStore(out)
    assert store.attrs["preprocessing"]["register"] == "rigid" and store.attrs["preprocessing"]["brain_mask"]
    truth = {r["patient_id"]: r for r in __import__("csv").DictReader(open(export / "truth.csv"))}
    manifest = json.loads((out / "manifest.json").read_text())
    for pid, record in manifest["patients"].items():
        registration = record["info"]["raw_steps"]["registration"]
        assert set(registration) == {"t1", "t2", "flair"}
        for sequence, found in registration.items():
            # the transform's rotation is the motion's (about another centre the shift differs)
            assert found["rotation_deg"] == pytest.approx(float(truth[pid][f"motion_{sequence}_deg"]), abs=1.0)
            assert found["flag"] is None
        assert (out / record["registration_board"]).is_file()
    page = (out / "qc" / "index.html").read_text()
    assert "final MI" in page and "_registration.png" in page and "Raw-export steps" in page


@pytest.mark.skipif(not TCGA.is_dir(), reason="../shared/data is not beside the project")
def test_preset_raw_converts_the_real_tcga_scan(tmp_path):
    pytest.importorskip("deepbet")
    from datasets import CohortStore
    from datasets.convert import convert
    from datasets.preprocess import PreprocessConfig

    folder = tmp_path / "images" / "TCGA-02-0003"
    folder.mkdir(parents=True)
    shutil.copy(TCGA / "t1c.nrrd", folder / "t1c.nrrd")
    (tmp_path / "clinical.csv").write_text("patient_id,time,event\nTCGA-02-0003,630,1\n")
    config = PreprocessConfig(sequences=("t1c",), shape=(64, 64, 48), spacing=2.0, register="rigid",
                              bias_correct=True, brain_mask=True)
    summary = convert(tmp_path / "images", tmp_path / "clinical.csv", tmp_path / "tcga.zarr", config, progress=False)
    assert summary.converted == ["TCGA-02-0003"], summary.excluded
    record = json.loads((tmp_path / "tcga.zarr" / "manifest.json").read_text())["patients"]["TCGA-02-0003"]
    assert record["info"]["raw_steps"]["brain_mask_from"] == "t1c"
    # The stored mask is the brain: a brain's volume (the 25 slices of 6.5 mm cover most of it),
    # well under the head mask of the same scan converted as it is.
    spacing = record["info"]["after"]["spacing"][0]
    brain_ml = record["info"]["mask_voxels"] * spacing ** 3 / 1000
    head = convert(tmp_path / "images", tmp_path / "clinical.csv", tmp_path / "head.zarr",
                   PreprocessConfig(sequences=("t1c",), shape=(64, 64, 48), spacing=2.0), progress=False)
    assert head.converted == ["TCGA-02-0003"]
    head_record = json.loads((tmp_path / "head.zarr" / "manifest.json").read_text())["patients"]["TCGA-02-0003"]
    head_ml = head_record["info"]["mask_voxels"] * head_record["info"]["after"]["spacing"][0] ** 3 / 1000
    assert 300 < brain_ml < 0.85 * head_ml, (brain_ml, head_ml)
    assert len(CohortStore(tmp_path / "tcga.zarr").usable()) == 1
