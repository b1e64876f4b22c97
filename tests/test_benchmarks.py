"""The benchmark scripts' own logic (their measurements live in benchmarks/results/)."""

from __future__ import annotations

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
