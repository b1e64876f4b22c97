"""The benchmark scripts' own logic (their measurements live in benchmarks/results/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import compute


def test_compute_halves_the_batch_until_it_fits(monkeypatch):
    tried = []

    def measure(name, mode, shape, batch, *rest):
        tried.append(batch)
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 10.0 * batch, True

    monkeypatch.setattr(compute, "_measure", measure)
    rate, batch, finite = compute.train_rate("seresnext50", "bf16", (4, 8, 8, 8), 64, 1, 0, torch.device("cpu"), 1.0, 1.0)
    assert tried == [64, 32, 16] and batch == 16 and rate == 160.0 and finite


def test_compute_measures_a_real_training_step_on_the_cpu():
    rate, batch, finite = compute.train_rate("seresnext50", "fp32", (2, 16, 16, 12), 2, 1, 0, torch.device("cpu"), 0.25, 0.2)
    assert batch == 2 and rate > 0 and finite


def test_the_scheduling_model_has_no_idle_time_on_one_gpu_and_writes_its_table(tmp_path, monkeypatch):
    """Known answer: on one GPU, without start-up cost, trials run back to back, so the makespan
    is the lower bound exactly, whatever the policy; the benchmark's table has every policy."""
    from benchmarks.schedule_policies import main, simulate
    from search_spaces import SPACES

    monkeypatch.setitem(SPACES, "cluster_sim", SPACES["smoke"])  # the benchmark registers its space: undone after

    for policy in ("filling", "taking turns"):
        run = simulate(policy, 10, seed=0, gpus=1, configurations=3, startup=0.0)
        assert run["makespan / bound"] == pytest.approx(1.0)
    assert simulate("filling", 10, seed=0, gpus=1, configurations=3, startup=0.6)["makespan / bound"] > 1.05
    out = tmp_path / "policies.md"
    assert main(["--seeds", "1", "--gpus", "4", "--configurations", "3", "--out", str(out)]) == 0
    table = out.read_text()
    assert table.count("| taking turns |") == 2 and table.count("| filling |") == 4


def _table(epochs: int = 9, folds: int = 2, patients: int = 60, seed: int = 0) -> dict:
    """A known table for the search replay: configuration i's curve rises to its own level, its
    out-of-fold and test C-index equal that level (so the best is known)."""
    from benchmarks.search_quality import configurations, key

    rng = np.random.default_rng(seed)
    time_, event = rng.exponential(365, patients), rng.integers(0, 2, patients)
    table = {}
    for i, config in enumerate(configurations()):
        level = 0.55 + 0.01 * ((i * 7) % 24)
        risk = -time_ * level + rng.normal(0, 300 * (1 - level), patients)
        fold = (np.arange(patients) % folds).tolist()
        table[key(config)] = {"config": config, "curve": [0.5 + (level - 0.5) * e / epochs for e in range(1, epochs + 1)],
                              "rungs": {e: (fold, risk.tolist()) for e in range(1, epochs + 1)},
                              "final": risk.tolist(), "oof_c": level, "test_c": level}
    return table, time_, event


def test_each_search_spends_at_most_its_budget_and_the_grid_finds_the_best():
    """The search replay of `benchmarks.search_quality` on a table whose best configuration is known."""
    from benchmarks.search_quality import REFERENCE, key, replay, selected_at

    table, _, _ = _table()
    full = 9 * 2
    grid = replay(table, "grid", 0, 24 * full, 9, 2)
    assert len(grid) == 24 and all(t["finished"] for t in grid)
    assert table[selected_at(grid, table, np.inf)]["test_c"] == max(r["test_c"] for r in table.values())
    (reference,) = replay(table, "reference recipe", 0, 8 * full, 9, 2)
    assert reference["key"] == key(REFERENCE) and reference["finished"]
    for method in ("random", "random + ASHA", "TPE", "TPE + ASHA, reference first (default)"):
        trials = replay(table, method, 1, 8 * full, 9, 2)
        assert sum(t["cost"] for t in trials) <= 8 * full, method
        if "ASHA" in method:  # curves ordered as their final levels: ASHA stops some, and runs more than 8
            assert any(not t["finished"] for t in trials) and len(trials) > 8, method
        else:
            assert len(trials) == 8 and all(t["finished"] for t in trials), method
    assert replay(table, "TPE + ASHA, reference first (default)", 2, 8 * full, 9, 2)[0]["key"] == key(REFERENCE)
