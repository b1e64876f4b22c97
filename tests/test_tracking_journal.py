"""The tracking journal is a trust boundary: records planted on the storage path never upload a
file, delete a folder or forge a result (`study.tracking.journal`)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from study.tracking import tracker as tracking
from study.tracking.journal import KEY_TAG, UntrustedJournal
from study.tracking.tracker import StudyTracker

PARAMS = {"space": "s"}


def tracker_for(tmp_path, trust: bool = False, name: str = "study") -> StudyTracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking._LIVE.pop((uri, name), None)
    return StudyTracker(uri, name, tmp_path / "rr" / name / "tracking_journal.jsonl", retry_s=0.0, trust_storage=trust)


def study_run(tracker: StudyTracker):
    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name(tracker.study_name)
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("study_role") == "study"]
    return client, run


def interrupted_study(tmp_path) -> StudyTracker:
    """A study whose driver recorded one trial and stopped, its tracking records delivered."""
    tracker = tracker_for(tmp_path)
    tracker.start({}, PARAMS, {})
    tracker.trial_run("cell/t0", "cell/t0", {"lr": 0.001}, {})
    tracker.log_metrics(None, {"cell.bbc_cindex": 0.55})
    assert tracker.pending == 0
    return tracker


def plant(journal_path, record: dict) -> None:
    with open(journal_path, "a") as out:
        out.write(json.dumps(record) + "\n")


@pytest.fixture
def unrelated(tmp_path):
    """A folder of the user's that a planted record names."""
    folder = tmp_path / "home" / "secrets"
    folder.mkdir(parents=True)
    (folder / "id_rsa").write_text("PRIVATE KEY")
    return folder


@pytest.mark.parametrize("record", [
    {"op": "artifact", "key": None, "path": "SECRET"},  # the format of earlier versions
    {"op": "artifact", "key": None, "file": "../../../home/secrets/id_rsa", "sha256": ""},
    {"op": "metrics", "key": None, "values": {"cell.bbc_cindex": 0.99}, "step": 0, "timestamp": 1},
    {"op": "tags", "key": None, "tags": {"resume_state.tuner.pkl": "0" * 64}},
    {"op": "metrics", "key": None, "values": {"cell.bbc_cindex": 0.99}, "step": 0, "timestamp": 1, "mac": "0" * 64},
])
def test_a_planted_record_stops_a_plain_resume_and_changes_nothing(tmp_path, unrelated, record):
    first = interrupted_study(tmp_path)
    if record.get("path") == "SECRET":
        record = {**record, "path": str(unrelated / "id_rsa")}
    plant(first.journal.path, record)
    client, before = study_run(first)

    resumed = tracker_for(tmp_path)
    with pytest.raises(UntrustedJournal, match=r"tracking_journal\.jsonl holds 1 record\(s\).*line 1.*--trust-storage"):
        resumed.start({}, PARAMS, {})
    _, after = study_run(first)
    assert after.data.metrics == before.data.metrics and after.info.status == before.info.status
    assert (unrelated / "id_rsa").read_text() == "PRIVATE KEY"
    assert client.list_artifacts(after.info.run_id) == []


def test_trusted_storage_still_never_uploads_or_deletes_outside_the_journal(tmp_path, unrelated, capsys):
    first = interrupted_study(tmp_path)
    plant(first.journal.path, {"op": "artifact", "key": None, "path": str(unrelated / "id_rsa")})
    plant(first.journal.path, {"op": "artifact", "key": None, "file": "../../../home/secrets/id_rsa", "sha256": ""})
    resumed = tracker_for(tmp_path, trust=True)
    resumed.start({}, PARAMS, {})
    assert resumed.pending == 0
    client, run = study_run(resumed)
    assert client.list_artifacts(run.info.run_id) == [], "no file outside the journal's folder is uploaded"
    assert (unrelated / "id_rsa").read_text() == "PRIVATE KEY", "no folder outside the journal's is deleted"
    assert "dropped: not a copy in" in capsys.readouterr().out


def test_a_signed_artifact_whose_copy_was_swapped_is_not_uploaded(tmp_path, capsys):
    tracker = tracker_for(tmp_path)
    tracker.start({}, PARAMS, {})
    tracker._down_since, tracker._last_try = 1.0, 1e18  # as while the store is down: records wait in the journal
    source = tmp_path / "oof_predictions.csv"
    source.write_text("patient_id,risk\nP1,0.1\n")
    tracker.log_artifact(None, source)
    (kept,) = tracker.journal.files.glob("*/oof_predictions.csv")
    kept.write_text("patient_id,risk\nP1,9.9\n")  # someone with write access to the storage path
    resumed = tracker_for(tmp_path)
    resumed.start({}, PARAMS, {})
    client, run = study_run(resumed)
    assert client.list_artifacts(run.info.run_id) == []
    assert "is gone or changed" in capsys.readouterr().out


def test_the_key_lives_in_mlflow_only_and_a_record_cannot_set_it(tmp_path):
    tracker = interrupted_study(tmp_path)
    _, run = study_run(tracker)
    key = run.data.tags[KEY_TAG]
    assert len(key) == 64 and key not in tracker.journal.path.read_text()
    # A validly signed record (as the driver writes) cannot replace the key or a resume digest either.
    tracker.set_tags(None, {KEY_TAG: "0" * 64, "resume_state.tuner.pkl": "1" * 64, "ok": "yes"})
    _, run = study_run(tracker)
    assert run.data.tags[KEY_TAG] == key and "resume_state.tuner.pkl" not in run.data.tags
    assert run.data.tags["ok"] == "yes"
