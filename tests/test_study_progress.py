"""The study's live progress lines and their ETAs."""

from __future__ import annotations

from types import SimpleNamespace

from evaluation import metric_names as names
from study import progress as progress_module
from study.progress import Progress


def _trial(trial_id: str, backbone: str = "densenet121", inputs: str = "image"):
    return SimpleNamespace(trial_id=trial_id, config={"backbone": backbone, "task": "os_all", "inputs": inputs},
                           last_result={})


def test_progress_lines_count_trials_and_estimate_from_measured_pace(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress = Progress(total_trials=4, fold_epochs_per_trial=10, interval_s=60)
    first, second = _trial("a1"), _trial("b2", "seresnext50", "image+clinical")
    for step in range(1, 5):  # 10 s per fold-epoch for the first trial
        progress.on_trial_result(0, [], first, {names.FOLD_EPOCHS.name: step, names.EPOCH_CINDEX.name: 0.6})
        clock[0] += 10
    progress.on_trial_result(0, [], second, {names.FOLD_EPOCHS.name: 2, names.EPOCH_CINDEX.name: 0.55})
    first.last_result = {names.FINAL: True}
    progress.on_trial_complete(0, [], first)  # ended after 4 fold-epochs
    lines = progress.lines()
    assert lines[0].split(": ", 1)[1] == "1 of 4 trials ended (1 finished), 1 running; study ETA ~2m40s"
    # running: 8 fold-epochs left; waiting: 2 trials x 4 fold-epochs (as the ended one); 10 s each, 1 at once
    assert lines[1].startswith("  seresnext50+clinical/os_all/b2  fold-epochs 2/10  mean val C 0.550  0s")
    assert len(lines) == 2


def test_progress_prints_at_its_interval_only(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    progress = Progress(total_trials=2, fold_epochs_per_trial=4, interval_s=30)
    progress.on_step_end(0, [])
    assert capsys.readouterr().out == ""
    clock[0] = 31.0
    progress.on_step_end(1, [])
    assert capsys.readouterr().out.startswith("progress ")
