"""Tracking records survive a tracking server that goes away at any point of a study's life.

A real MLflow server (`tests.services.TrackingServer`) is reached through a TCP link the test can
cut (`tests.services.FaultyLink`). The tracker's fault hook (called before every MLflow call)
cuts it at a call chosen by a seeded schedule: before the call (the server is gone), after the
server did the work but before its answer arrived (the answer is lost; then gone, or back at once
so that MLflow's client sends the request again), or for a few calls only; some schedules kill the
server process itself. The study's life then goes on, ends with the server down, and a new
tracker (a resumed driver) delivers the journal. Every trial run must then hold every parameter,
tag, metric step and artifact exactly once, and the study run its own.
"""

from __future__ import annotations

import random

import pytest
from mlflow.tracking import MlflowClient

from study.tracking import tracker as tracking
from study.tracking.tracker import StudyTracker
from tests.services import FaultyLink

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRIALS, EPOCHS = 2, 2
PARAMS = {"space": "faults", "seed": "0"}


def life(tracker: StudyTracker, tmp) -> None:
    """A study's records in the order the driver writes them (`MlflowTrialCallback`, `run_study`)."""
    for t in range(TRIALS):
        key = f"seresnext50__os_all/t{t}"
        tracker.trial_run(key, f"seresnext50 / os_all/t{t}", {"lr": 10.0 ** -(t + 3), "batch_size": 4},
                          {"backbone": "seresnext50", "task": "os_all", "inputs": "image", "trial_id": f"t{t}"})
        for epoch in range(1, EPOCHS + 1):
            tracker.log_metrics(key, {"epoch_val_cindex_mean": 0.5 + epoch / 100 + t / 10,
                                      "fold0_val_cindex": 0.4 + epoch / 100}, step=epoch)
            if epoch == 1:
                tracker.set_tags(key, {"node_id": "node-a"})
        tracker.log_metrics(key, {"oof_cindex": 0.6 + t / 10, "brier_365": 0.2})
        oof = tmp / f"t{t}" / "oof_predictions.csv"
        oof.parent.mkdir(exist_ok=True)
        oof.write_text(f"patient_id,risk\nP{t},0.{t}\n")
        tracker.log_artifact(key, oof)
        tracker.set_tags(key, {"outcome": "finished", "mlflow.runName": f"seresnext50 / os_all/t{t}"})
        tracker.terminate(key, "FINISHED")
    tracker.log_metrics(None, {"seresnext50__os_all.bbc_cindex": 0.61})
    results = tmp / "results.csv"
    results.write_text("cell,bbc\nseresnext50__os_all,0.61\n")
    tracker.finish_parent("FINISHED", {"csv": results})


def new_tracker(uri: str, name: str, journal) -> StudyTracker:
    """A driver's tracker, as a new process would make it (none live for the study)."""
    tracking._LIVE.pop((uri, name), None)
    tracker = StudyTracker(uri, name, journal, retry_s=0.0)
    tracker.start({"space": "faults"}, PARAMS, {"study_config.json": "{}"})
    return tracker


def assert_exactly_once(uri: str, name: str) -> None:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("study_role") == "study"]
    trials = [r for r in runs if r.data.tags.get("study_role") == "trial"]
    assert len(parents) == 1, "one study run"
    assert sorted(r.data.tags["trial_key"] for r in trials) == [f"seresnext50__os_all/t{t}" for t in range(TRIALS)]
    for run in trials:
        t = int(run.data.tags["trial_id"][1:])
        assert run.data.params == {"lr": str(10.0 ** -(t + 3)), "batch_size": "4"}, run.data.params
        assert run.data.tags["node_id"] == "node-a" and run.data.tags["outcome"] == "finished"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for metric in ("epoch_val_cindex_mean", "fold0_val_cindex"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
            assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
        for metric in ("oof_cindex", "brier_365"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == 1, metric
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["oof_predictions.csv"]
        assert run.info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params == PARAMS
    assert parent.info.status == "FINISHED"
    assert len(client.get_metric_history(parent.info.run_id, "seresnext50__os_all.bbc_cindex")) == 1
    assert {"results.csv", "study_config.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def schedule(calls: int, seed: int = 35) -> list[tuple[int, str]]:
    """(call number, fault) pairs: every call is hit by some fault, the faults drawn seeded."""
    rng = random.Random(seed)
    faults = ["down", "lost-answer", "lost-answer-retried", "blip"]
    points = [(k, faults[k % len(faults)]) for k in range(1, calls + 1)]
    points += [(rng.randint(1, calls), fault) for fault in faults]
    points += [(rng.randint(1, calls), "kill") for _ in range(2)]
    return points


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.services import TrackingServer

    server = TrackingServer(tmp_path_factory.mktemp("tracking"))
    server.start()
    link = FaultyLink(server.port)
    yield server, link
    link.close()
    server.kill()


def test_a_record_in_flight_is_never_lost_or_duplicated(served, tmp_path, monkeypatch):
    server, link = served
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    # Undisturbed, to count the MLflow calls of a life.
    calm = new_tracker(link.uri, "calm", tmp_path / "calm" / "journal.jsonl")
    life(calm, tmp_path / "calm")
    assert calm.pending == 0
    assert_exactly_once(link.uri, "calm")
    calls = calm._calls
    assert calls >= 20

    for number, (at, fault) in enumerate(schedule(calls)):
        name, folder = f"fault{number}", tmp_path / f"fault{number}"
        folder.mkdir()
        # MLflow's client sends a request again once (the driver's setting) only where the fault needs it.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1" if fault == "lost-answer-retried" else "0")
        link.up()
        tracker = new_tracker(link.uri, name, folder / "journal.jsonl")

        def hook(call: str, count: int, at=at, fault=fault, start=tracker._calls) -> None:
            n = count - start
            if n == at:
                {"down": link.down, "blip": link.down, "lost-answer": link.lose_next_response,
                 "lost-answer-retried": lambda: link.lose_next_response(then="up"), "kill": server.kill}[fault]()
            elif fault == "blip" and n == at + 3:
                link.up()

        tracker.fault_hook = hook
        life(tracker, folder)
        tracker.fault_hook = None
        if fault == "kill":
            server.start()
        link.up()
        resumed = new_tracker(link.uri, name, folder / "journal.jsonl")  # delivers what waits in the journal
        resumed.terminate(None, "FINISHED")  # as the resumed study ends
        assert not resumed.pending, (at, fault)
        assert (folder / "journal.jsonl").read_text() == "", (at, fault)
        assert not any((folder / "journal.jsonl.files").iterdir()), "delivered artifacts' copies removed"
        assert_exactly_once(link.uri, name)
