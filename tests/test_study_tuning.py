"""The per-cell searches inside one Tuner: what Optuna is told about finished, stopped and failed
trials, the order in which cells are filled, and the concurrency limits."""

from __future__ import annotations

from optuna.trial import TrialState
from ray import tune

from evaluation import metric_names as names
from study.tuning import CellSearch


def _search(max_concurrent: int = 0, per_cell: int = 0) -> CellSearch:
    cells = {f"b__{t}": {"task": t, "backbone": "b", "epochs": 4} for t in ("os_all", "1yr_all")}
    space = {"lr": tune.loguniform(1e-4, 1e-2)}
    return CellSearch(cells, {c: space for c in cells}, {c: {"lr": 1e-3} for c in cells}, num_samples=3,
                      max_concurrent=max_concurrent, per_cell=per_cell)


def test_stopped_trials_are_pruned_in_optuna_and_finished_ones_complete_with_their_oof_cindex():
    search = _search(per_cell=2)
    configs = {f"t{i}": search.suggest(f"t{i}") for i in range(4)}
    assert [c["task"] for c in configs.values()] == ["os_all", "os_all", "1yr_all", "1yr_all"]  # filled to the cap
    assert configs["t0"]["lr"] == 1e-3 and configs["t2"]["lr"] == 1e-3  # the reference recipe first, per cell
    for trial in configs:
        for epoch in (1, 2):
            search.on_trial_result(trial, {names.EPOCH_CINDEX.name: 0.5 + 0.01 * epoch, "training_iteration": epoch})
    search.on_trial_complete("t0", {names.EPOCH_CINDEX.name: 0.6, names.OOF_CINDEX.name: 0.58, names.FINAL: True})
    search.on_trial_complete("t1", {names.EPOCH_CINDEX.name: 0.52})  # stopped by ASHA at epoch 2
    search.on_trial_complete("t2", {names.EPOCH_CINDEX.name: float("nan"), names.FAILED: "loss became nan"})
    study = search.studies()["b__os_all"]
    states = {t.number: (t.state, t.value) for t in study.trials}
    assert states[0] == (TrialState.COMPLETE, 0.58)  # the number the cell is ranked by, not the epoch mean
    assert states[1][0] == TrialState.PRUNED
    assert study.trials[1].intermediate_values == {1: 0.51, 2: 0.52}
    assert search.studies()["b__1yr_all"].trials[0].state == TrialState.FAIL
    # A crashed trial retried on resume (resume_errored) and finished is recorded again.
    search.on_trial_complete("t2", {names.OOF_CINDEX.name: 0.57, names.FINAL: True})
    ended = [(t.state, t.value) for t in search.studies()["b__1yr_all"].trials if t.state != TrialState.RUNNING]
    assert ended == [(TrialState.FAIL, None), (TrialState.COMPLETE, 0.57)]


def test_each_cell_gets_exactly_its_configurations_and_the_limit_holds(tmp_path):
    search = _search(max_concurrent=2)
    assert search.suggest("a") and search.suggest("b")
    assert search.suggest("c") is None  # two running
    search.on_trial_complete("a", {names.OOF_CINDEX.name: 0.6, names.FINAL: True})
    assert search.suggest("c") is not None and search.suggest("d") is None
    running = ["b", "c"]
    for i in range(3):  # the study goes on: each end lets exactly one more trial start
        search.on_trial_complete(running.pop(0))
        running.append(f"x{i}")
        assert search.suggest(f"x{i}") is not None and search.suggest(f"y{i}") is None
    assert search._suggested == {"b__os_all": 3, "b__1yr_all": 3}
    search.on_trial_complete(running.pop(0))
    assert search.suggest("z") == search.FINISHED  # every cell has its 3 configurations
    # Tune saves the searcher with the experiment and restores it on --resume.
    folder = tmp_path / "experiment"
    folder.mkdir()
    search.save_to_dir(str(folder), session_str="s1")
    assert [p.name for p in folder.iterdir()] == ["searcher-state-s1.pkl"]  # no temporary file left inside
    restored = _search(max_concurrent=2)
    restored.restore_from_dir(str(folder))
    assert restored._suggested == search._suggested and restored._live == search._live
    assert restored.suggest("w") == search.FINISHED


def test_a_cell_runs_at_most_its_cap_while_other_cells_take_the_free_slots():
    cells = {f"b__{t}": {"task": t, "backbone": "b", "epochs": 4} for t in ("os_all", "1yr_all")}
    space = {"lr": tune.loguniform(1e-4, 1e-2)}
    search = CellSearch(cells, {c: space for c in cells}, {c: {"lr": 1e-3} for c in cells}, num_samples=4,
                        max_concurrent=8, per_cell=2)
    tasks = [search.suggest(f"t{i}")["task"] for i in range(4)]
    assert sorted(tasks) == ["1yr_all", "1yr_all", "os_all", "os_all"]
    assert search.suggest("t4") is None  # both cells at their cap, though 4 of 8 slots are free
    search.on_trial_complete("t0", {names.OOF_CINDEX.name: 0.6, names.FINAL: True})
    assert search.suggest("t5")["task"] == tasks[0]  # the freed cell, and only it, may start one more
    assert search.suggest("t6") is None


def test_cells_are_filled_in_order_of_cost_so_the_study_ends_on_its_cheapest_trials():
    cells = {f"b__{t}": {"task": t, "backbone": "b", "epochs": 4} for t in ("os_gbm", "os_all", "1yr_gbm")}
    space = {"lr": tune.loguniform(1e-4, 1e-2)}
    search = CellSearch(cells, {c: space for c in cells}, {c: {"lr": 1e-3} for c in cells}, num_samples=3,
                        max_concurrent=4, per_cell=2, costs={"b__os_gbm": 480.0, "b__os_all": 1100.0,
                                                            "b__1yr_gbm": 480.0})
    tasks = [search.suggest(f"t{i}")["task"] for i in range(4)]
    assert tasks == ["os_all", "os_all", "os_gbm", "os_gbm"]  # most patients first; equal costs keep their order
    search.on_trial_complete("t0")
    assert search.suggest("t4")["task"] == "os_all"  # a free slot goes to the first cell with work left
    search.on_trial_complete("t2")
    assert search.suggest("t5")["task"] == "os_gbm"  # os_all has suggested its 3
    search.on_trial_complete("t1")
    assert search.suggest("t6")["task"] == "1yr_gbm"  # os_gbm at its cap: the next cell takes the slot


def test_the_per_cell_cap_is_the_flag_or_ten_or_half_the_configurations():
    import pytest

    from datasets.errors import InputError
    from study.config import resolve
    from study.run import build_parser
    from study.tuning import cell_search

    def cap(*flags):
        return cell_search(resolve(build_parser().parse_args(["--space", "smoke", *flags])))._per_cell

    assert cap("--num-samples", "20") == 10 and cap("--num-samples", "40") == 20
    assert cap("--num-samples", "20", "--per-cell-concurrent", "3") == 3
    with pytest.raises(InputError, match="--per-cell-concurrent must be at least 1, got 0"):
        cap("--per-cell-concurrent", "0")


def test_a_searcher_saved_before_cells_were_filled_by_cost_resumes(tmp_path):
    """Studies started when cells took turns saved `_turn` and no `_order`; --resume must go on."""
    import pickle

    search = _search(max_concurrent=2)
    assert search.suggest("a")
    state = search.__dict__.copy()
    state.pop("_order")
    state["_turn"] = 1
    path = tmp_path / "searcher-state.pkl"
    path.write_bytes(pickle.dumps(state))
    restored = _search(max_concurrent=2)
    del restored.__dict__["_order"]  # as unpickled from an old tuner.pkl
    restored.restore(str(path))
    assert "_turn" not in restored.__dict__ and restored.suggest("b")["task"] == "os_all"
