"""Sensitivity of the added-value test on a known-answer cohort (imaging effect 1).

About 4 minutes on 2 CPU cores (600 patients, 3 folds x 16 epochs), so it is marked `benchmark`
and left out of the default run: ``python -m pytest -m benchmark tests/test_known_answer.py``.
The false-positive rate (imaging effect 0, 20 seeds) is measured by
``python -m benchmarks.added_value_calibration``, not tested.
"""

from __future__ import annotations

import pytest

from benchmarks.added_value_calibration import one_seed


@pytest.mark.benchmark
def test_added_value_detects_a_real_imaging_effect(tmp_path):
    row = one_seed(seed=0, effect=1.0, work=tmp_path)
    assert row["lr_p"] < 0.01, row
    assert row["hr_per_sd"] > 1.0, row
    assert row["dpi_vs_true_imaging_lp_r"] > 0.3, row
