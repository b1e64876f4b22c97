"""The study's results as the terminal shows them."""

from __future__ import annotations

from evaluation import metric_names as names
from evaluation.metrics import Estimate
from study.results import CellResult, terminal_table


def _cell(backbone: str, task: str, inputs: str, finished: bool = True) -> CellResult:
    best = {names.OOF_CINDEX.name: 0.6812, names.OOF_CINDEX_LOW.name: 0.6011, names.OOF_CINDEX_HIGH.name: 0.7533,
            names.BRIER_365.name: 0.2012, names.IBS.name: 0.1734} if finished else {}
    config = {"lr": 0.000123456, "weight_decay": 1.234e-06, "batch_size": 64, "dropout": 0.3141, "augmentation": 1.27,
              "optimizer": "adamw", "clinical_hidden": 32, "clinical_dropout": 0.4242} if finished else {}
    return CellResult(backbone, task, inputs, finished=20 if finished else 0, pruned=118, failed=12, best=best,
                      best_config=config, reference=best, bbc=Estimate(0.6701, 0.5912, 0.7489) if finished else None,
                      oracle={"clinical": 0.7, "image_content": 0.75, "imaging_term": 0.72, "total": 0.81})


def test_the_terminal_table_fits_120_columns_with_the_longest_names():
    cells = [_cell("resnet50_cbam", "1yr_gbm", "image+clinical"), _cell("seresnext50", "os_all", "image"),
             _cell("densenet121", "os_gbm", "image+clinical", finished=False)]
    text = terminal_table(cells)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert lines[1].split("  ")[:1] == ["resnet50_cbam+clinical / 1yr_gbm"]
    assert "0.670 [0.59, 0.75]" in lines[1] and "0.681 [0.60, 0.75]" in lines[1]
    assert "20/118/12" in lines[1] and "none finished" in lines[3]
    # Every selected configuration is shown whole, wrapped, not cut.
    joined = " ".join(line.strip() for line in lines[lines.index(next(l for l in lines if "Selected" in l)) + 1:])
    for key in ("lr=0.000123", "weight_decay=1.23e-06", "clinical_dropout=0.424"):
        assert key in joined


def test_a_long_value_without_separators_is_cut_not_looped_over():
    cell = _cell("densenet121", "os_all", "image")
    cell.best_config = {"note": "x" * 300}
    lines = terminal_table([cell]).splitlines()
    assert max(len(line) for line in lines) <= 120
    start = next(i for i, line in enumerate(lines) if "Selected configurations" in line)
    assert sum(line.count("x") for line in lines[start + 1:]) == 300


def test_selection_and_headline_do_not_depend_on_the_order_trials_are_listed(tmp_path):
    """Tune lists trials in another order after a resume; each trial's predictions list patients in
    its own order. The selected trial (ties included) and BBC-CV must not change."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    from ray.tune import Checkpoint

    from evaluation import metric_names as names
    from evaluation.metrics import harrell_c
    from search_spaces import SPACES
    from study.results import summarise

    rng = np.random.default_rng(0)
    n = 80
    ids = [f"P{i:03d}" for i in range(n)]
    time, event = rng.exponential(500, n), rng.integers(0, 2, n)
    event[0] = 1
    shared = rng.normal(size=n)
    results = []
    for t, risk in enumerate([rng.normal(size=n), shared, shared.copy(), rng.normal(size=n) + 0.1 * time / 500]):
        folder = tmp_path / f"t{t}"
        folder.mkdir()
        frame = pd.DataFrame({"patient_id": ids, "fold": 0, "time": time, "event": event, "risk": risk,
                              "surv_365": 0.5}).sample(frac=1, random_state=t)  # each trial's own patient order
        frame.to_csv(folder / names.OOF_FILE, index=False)
        metrics = {names.FINAL: True, names.OOF_CINDEX.name: 0.9 if t in (1, 2) else harrell_c(time, event, risk),
                   "trial_id": f"trial_{t}"}
        results.append(SimpleNamespace(config={"backbone": "seresnext50", "task": "os_all", "lr": 1e-3 * (t + 1),
                                               "batch_size": 4}, metrics=metrics, error=None,
                                       checkpoint=Checkpoint.from_directory(str(folder)), path=str(folder)))
    first = summarise(results, SPACES["smoke"], "demo", bootstrap=200)[0]
    again = summarise(list(reversed(results)), SPACES["smoke"], "demo", bootstrap=200)[0]
    assert first.best_trial == again.best_trial == "trial_1", "a tie goes to the lower trial id"
    assert first.bbc == again.bbc


def test_a_metric_added_to_the_registry_gets_its_row_in_the_results_table(monkeypatch):
    """CONTRIBUTING's metric recipe: a name in evaluation.metric_names.FINAL_METRICS reaches results.md
    with no change to study/results.py (its rows were hard-coded: Uno's C and the AUC never showed)."""
    from study.results import results_table

    time_auc = names.MetricName("time_auc_730", "cumulative/dynamic IPCW AUC at day 730")
    monkeypatch.setattr(names, "FINAL_METRICS", (*names.FINAL_METRICS, time_auc))
    cell = _cell("densenet121", "os_all", "image")
    cell.best[time_auc.name] = 0.7123
    table = results_table([cell])
    column = table[cell.label]
    assert column["cumulative/dynamic IPCW AUC at day 730"] == "0.712"
    assert "Uno's IPCW C-index truncated at the 90th percentile of times" in table.index
    assert list(table.index[-2:]) == ["selected configuration", "trials (finished/pruned/failed)"]
